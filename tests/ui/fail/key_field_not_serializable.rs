use idem_core::idempotent;

#[derive(Debug)]
struct Error;

impl From<idem_core::Error> for Error {
    fn from(_: idem_core::Error) -> Self {
        Error
    }
}

struct Tenant;

struct Request {
    tenant: Tenant,
    order: u64,
}

#[idempotent(key = req.tenant, skip(req))]
async fn charge(req: Request) -> Result<u64, Error> {
    Ok(req.order)
}

fn main() {}
