use idem_core::idempotent;

#[derive(Debug)]
struct Error;

impl From<idem_core::Error> for Error {
    fn from(_: idem_core::Error) -> Self {
        Error
    }
}

struct Receipt {
    id: u64,
}

#[idempotent(key = id)]
async fn charge(id: u64) -> Result<Receipt, Error> {
    Ok(Receipt { id })
}

fn main() {}
