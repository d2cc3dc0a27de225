use idem_core::idempotent;

struct OrderId(u64);

// The key is also a fingerprinted argument: one error, as the key.
#[idempotent(key = order)]
async fn charge(order: OrderId) -> Result<u64, String> {
    Ok(order.0)
}

fn main() {}
