use idem_core::idempotent;

#[derive(Debug)]
struct Error;

impl From<idem_core::Error> for Error {
    fn from(_: idem_core::Error) -> Self {
        Error
    }
}

struct Tenant;

#[idempotent(key = id, scope = tenant, skip(tenant))]
async fn charge(tenant: &Tenant, id: u64) -> Result<u64, Error> {
    let _ = tenant;
    Ok(id)
}

fn main() {}
