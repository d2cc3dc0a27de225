use idem_core::idempotent;

#[derive(Debug)]
struct Error;

impl From<idem_core::Error> for Error {
    fn from(_: idem_core::Error) -> Self {
        Error
    }
}

use std::time::Duration;

#[idempotent(key = id, wait_timeout = Duration::from_secs(0))]
async fn charge(id: u64) -> Result<u64, Error> {
    Ok(id)
}

fn main() {}
