use idem_core::idempotent;

#[idempotent(key = id)]
async fn notify<F: Fn() -> u64>(id: u64, callback: F) -> Result<u64, String> {
    Ok(callback() + id)
}

fn main() {}
