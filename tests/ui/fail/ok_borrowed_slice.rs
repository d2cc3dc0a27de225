use idem_core::idempotent;

#[derive(Debug)]
struct Error;

impl From<idem_core::Error> for Error {
    fn from(_: idem_core::Error) -> Self {
        Error
    }
}

#[idempotent(key = id)]
async fn charge(id: u64) -> Result<&'static [u8], Error> {
    let _ = id;
    Ok(b"done")
}

fn main() {}
