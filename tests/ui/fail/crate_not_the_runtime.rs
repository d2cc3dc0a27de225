use idem_core::idempotent;

#[idempotent(key = id, crate = "serde")]
async fn charge(id: u64) -> Result<u64, String> {
    Ok(id)
}

fn main() {}
