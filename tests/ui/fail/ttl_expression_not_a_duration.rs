use idem_core::idempotent;

#[derive(Debug)]
struct Error;

impl From<idem_core::Error> for Error {
    fn from(_: idem_core::Error) -> Self {
        Error
    }
}

const DAY: u64 = 86_400;

#[idempotent(key = id, ttl = DAY)]
async fn charge(id: u64) -> Result<u64, Error> {
    Ok(id)
}

fn main() {}
