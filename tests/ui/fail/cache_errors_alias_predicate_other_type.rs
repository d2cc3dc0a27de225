use idem_core::idempotent;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct PayError;
impl From<idem_core::Error> for PayError {
    fn from(_: idem_core::Error) -> Self { PayError }
}
type PayResult<T> = Result<T, PayError>;

fn is_permanent(_: &String) -> bool { true }

#[idempotent(key = id, cache_errors = is_permanent)]
async fn charge(id: u64) -> PayResult<u64> {
    Ok(id)
}

fn main() {}
