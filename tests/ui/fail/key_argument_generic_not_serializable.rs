use idem_core::idempotent;

// A generic key that is also a fingerprinted argument: one error, as the key.
#[idempotent(key = id)]
async fn charge<K: Send + Sync>(id: K, amount: u64) -> Result<u64, String> {
    let _ = id;
    Ok(amount)
}

fn main() {}
