use idem_core::idempotent;

#[derive(Debug)]
struct Error;

impl From<idem_core::Error> for Error {
    fn from(_: idem_core::Error) -> Self {
        Error
    }
}

struct Reports;

impl Reports {
    #[idempotent(ttl = "1h")]
    async fn nightly(&self) -> Result<u64, Error> {
        Ok(1)
    }
}

fn main() {}
