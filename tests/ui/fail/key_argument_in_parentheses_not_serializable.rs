use idem_core::idempotent;

struct OrderId(u64);

// However many parentheses, the key that is an argument is one error.
#[idempotent(key = ((order)))]
async fn charge(order: OrderId) -> Result<u64, String> {
    Ok(order.0)
}

fn main() {}
