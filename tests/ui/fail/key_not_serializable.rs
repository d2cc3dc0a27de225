use idem_core::idempotent;

#[derive(Debug)]
struct Error;

impl From<idem_core::Error> for Error {
    fn from(_: idem_core::Error) -> Self {
        Error
    }
}

struct OrderId(u64);

#[idempotent(key = order, skip(order))]
async fn charge(order: &OrderId) -> Result<u64, Error> {
    Ok(order.0)
}

fn main() {}
