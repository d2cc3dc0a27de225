use idem_core::idempotent;

#[derive(Debug)]
struct Error;

impl From<idem_core::Error> for Error {
    fn from(_: idem_core::Error) -> Self {
        Error
    }
}

#[idempotent(key = id)]
async fn charge(id: u64) -> &'static str {
    let _ = id;
    "done"
}

fn main() {}
