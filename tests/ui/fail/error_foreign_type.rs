use idem_core::idempotent;

#[idempotent(key = id)]
async fn charge(id: u64) -> Result<u64, std::fmt::Error> {
    Ok(id)
}

fn main() {}
