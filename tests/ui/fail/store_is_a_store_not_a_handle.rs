use idem_core::idempotent;

#[derive(Debug)]
struct Error;

impl From<idem_core::Error> for Error {
    fn from(_: idem_core::Error) -> Self {
        Error
    }
}

struct Payments {
    store: idem_core::MemoryStore,
}

impl Payments {
    #[idempotent(key = id, store = self.store)]
    async fn charge(&self, id: u64) -> Result<u64, Error> {
        Ok(id)
    }
}

fn main() {}
