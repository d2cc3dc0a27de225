use idem_core::idempotent;

#[derive(Debug)]
struct Error;

impl From<idem_core::Error> for Error {
    fn from(_: idem_core::Error) -> Self {
        Error
    }
}

#[idempotent(key = id, ttl = "10ms")]
async fn charge(id: u64) -> Result<u64, Error> {
    Ok(id)
}

fn main() {}
