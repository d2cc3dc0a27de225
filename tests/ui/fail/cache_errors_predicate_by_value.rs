use idem_core::idempotent;

#[derive(Debug, serde::Serialize, serde::Deserialize)]
enum PayError {
    Declined,
    Idem(String),
}

impl From<idem_core::Error> for PayError {
    fn from(e: idem_core::Error) -> Self {
        Self::Idem(e.to_string())
    }
}

fn is_permanent(error: PayError) -> bool {
    matches!(error, PayError::Declined)
}

#[idempotent(key = id, cache_errors = is_permanent)]
async fn charge(id: u64) -> Result<u64, PayError> {
    Ok(id)
}

fn main() {}
