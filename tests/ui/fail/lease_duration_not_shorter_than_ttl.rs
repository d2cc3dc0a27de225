use idem_core::idempotent;

#[derive(Debug)]
struct Error;

impl From<idem_core::Error> for Error {
    fn from(_: idem_core::Error) -> Self {
        Error
    }
}

use std::time::Duration;

#[idempotent(key = id, ttl = Duration::from_secs(30), lease = Duration::from_secs(60))]
async fn charge(id: u64) -> Result<u64, Error> {
    Ok(id)
}

fn main() {}
