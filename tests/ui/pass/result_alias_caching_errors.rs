//! A fn returning an alias of `Result` caches its errors with `true` or a
//! predicate of its error type.

#![deny(warnings)]

use idem_core::idempotent;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
enum PayError {
    Declined,
    Idem(String),
}

impl From<idem_core::Error> for PayError {
    fn from(error: idem_core::Error) -> Self {
        Self::Idem(error.to_string())
    }
}

type PayResult<T> = Result<T, PayError>;

fn is_permanent(error: &PayError) -> bool {
    matches!(error, PayError::Declined)
}

#[idempotent(key = id, cache_errors = is_permanent)]
async fn charge(id: u64) -> PayResult<u64> {
    Ok(id)
}

#[idempotent(key = id, cache_errors = true)]
async fn refund(id: u64) -> PayResult<u64> {
    Err(PayError::Declined).or(Ok(id))
}

fn main() {
    let _ = charge(1);
    let _ = refund(1);
}
