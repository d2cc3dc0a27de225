use idem_core::idempotent;

struct Customer(u64);

// A key tuple element that is also a fingerprinted argument: one error.
#[idempotent(key = (customer, order))]
async fn charge(customer: Customer, order: u64) -> Result<u64, String> {
    Ok(customer.0 + order)
}

fn main() {}
