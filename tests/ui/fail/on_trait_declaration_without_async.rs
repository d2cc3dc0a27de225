use idem_core::idempotent;

#[derive(Debug)]
struct Error;

impl From<idem_core::Error> for Error {
    fn from(_: idem_core::Error) -> Self {
        Error
    }
}

trait Ledger {
    #[idempotent(key = id)]
    fn record(&self, id: u64) -> Result<u64, Error>;
}

fn main() {}
