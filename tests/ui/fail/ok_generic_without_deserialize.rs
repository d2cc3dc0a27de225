use idem_core::idempotent;

#[derive(Debug)]
struct Error;

impl From<idem_core::Error> for Error {
    fn from(_: idem_core::Error) -> Self {
        Error
    }
}

#[idempotent(key = id)]
async fn echo<T: serde::Serialize + Send>(id: u64, value: T) -> Result<T, Error> {
    let _ = id;
    Ok(value)
}

fn main() {}
