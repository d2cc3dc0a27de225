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

fn code(error: &PayError) -> u8 {
    match error {
        PayError::Declined => 1,
        PayError::Idem(_) => 2,
    }
}

#[idempotent(key = id, cache_errors = code)]
async fn charge(id: u64) -> Result<u64, PayError> {
    Ok(id)
}

fn main() {}
