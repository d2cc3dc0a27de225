use idem_core::idempotent;

#[derive(Debug)]
struct Error;

impl From<idem_core::Error> for Error {
    fn from(_: idem_core::Error) -> Self {
        Error
    }
}

struct Pool;

#[idempotent(key = id, skip = pool)]
async fn charge(pool: &Pool, id: u64) -> Result<u64, Error> {
    let _ = pool;
    Ok(id)
}

fn main() {}
