use idem_core::idempotent;

#[derive(Debug)]
struct Error;

impl From<idem_core::Error> for Error {
    fn from(_: idem_core::Error) -> Self {
        Error
    }
}

#[derive(serde::Serialize)]
struct Request {
    order: u64,
    amount: u64,
}

#[idempotent(key = req.order, skip(req.amount))]
async fn charge(req: Request) -> Result<u64, Error> {
    Ok(req.amount)
}

fn main() {}
