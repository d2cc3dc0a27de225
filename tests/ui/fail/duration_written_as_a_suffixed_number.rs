use idem_core::idempotent;

#[derive(Debug)]
struct Error;

impl From<idem_core::Error> for Error {
    fn from(_: idem_core::Error) -> Self {
        Error
    }
}

// Rust reads `24h` as the number 24 with a suffix.
#[idempotent(key = id, ttl = 24h)]
async fn charge(id: u64) -> Result<u64, Error> {
    Ok(id)
}

fn main() {}
