use idem_core::idempotent;

#[idempotent(key = id, crate = "my_reexports::idem")]
async fn refund(id: u64) -> Result<u64, String> {
    Ok(id)
}

fn main() {}
