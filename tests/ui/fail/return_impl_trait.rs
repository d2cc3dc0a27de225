use idem_core::idempotent;

#[derive(Debug)]
struct Error;

impl From<idem_core::Error> for Error {
    fn from(_: idem_core::Error) -> Self {
        Error
    }
}

#[idempotent(key = id)]
async fn charge(id: u64) -> Result<impl std::fmt::Display, Error> {
    Ok(id)
}

fn main() {}
