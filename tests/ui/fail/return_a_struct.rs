use idem_core::idempotent;

#[derive(Debug)]
struct Error;

impl From<idem_core::Error> for Error {
    fn from(_: idem_core::Error) -> Self {
        Error
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Receipt;

#[idempotent(key = id)]
async fn charge(id: u64) -> Receipt {
    let _ = id;
    Receipt
}

fn main() {}
