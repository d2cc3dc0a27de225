use idem_core::idempotent;

#[derive(Debug)]
struct Error;

impl From<idem_core::Error> for Error {
    fn from(_: idem_core::Error) -> Self {
        Error
    }
}

struct Pool;

#[idempotent(skip(pool))]
async fn refresh(pool: &Pool) -> Result<(), Error> {
    let _ = pool;
    Ok(())
}

fn main() {}
