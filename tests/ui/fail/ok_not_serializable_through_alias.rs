use idem_core::idempotent;

#[derive(Debug)]
struct Error;

impl From<idem_core::Error> for Error {
    fn from(_: idem_core::Error) -> Self {
        Error
    }
}

struct Receipt;

type AppResult<T> = Result<T, Error>;

#[idempotent(key = id)]
async fn charge(id: u64) -> AppResult<Receipt> {
    let _ = id;
    Ok(Receipt)
}

fn main() {}
