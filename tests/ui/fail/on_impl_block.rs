use idem_core::idempotent;

struct Payments;

#[idempotent(key = id)]
impl Payments {
    async fn charge(&self, id: u64) -> u64 {
        id
    }
}

fn main() {}
