use idem_core::idempotent;

#[derive(Debug)]
struct Error;

impl From<idem_core::Error> for Error {
    fn from(_: idem_core::Error) -> Self {
        Error
    }
}

struct Attempt;

#[idempotent(key = (order, attempt), skip(attempt))]
async fn charge(order: u64, attempt: Attempt) -> Result<u64, Error> {
    let _ = attempt;
    Ok(order)
}

fn main() {}
