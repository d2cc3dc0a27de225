use idem_core::idempotent;

#[derive(Debug)]
struct Error;

impl From<idem_core::Error> for Error {
    fn from(_: idem_core::Error) -> Self {
        Error
    }
}

#[idempotent(key = id, ttl = "forever")]
async fn charge(id: u64) -> Result<u64, Error> {
    Ok(id)
}

async fn caller() -> Result<u64, Error> {
    let receipt: u64 = charge(7).await?;
    Ok(receipt + 1)
}

fn main() {
    let _ = caller();
}
