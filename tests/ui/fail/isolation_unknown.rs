use idem_core::idempotent;

#[idempotent(key = id, isolation = "read uncommitted")]
async fn charge(id: u64) -> Result<u64, String> {
    Ok(id)
}

fn main() {}
