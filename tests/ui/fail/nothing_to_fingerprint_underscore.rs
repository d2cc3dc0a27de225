use idem_core::idempotent;

#[derive(Debug)]
struct Error;

impl From<idem_core::Error> for Error {
    fn from(_: idem_core::Error) -> Self {
        Error
    }
}

#[idempotent]
async fn touch(_: u64) -> Result<(), Error> {
    Ok(())
}

fn main() {}
