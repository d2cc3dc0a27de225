use std::future::Future;

use idem_core::idempotent;

#[idempotent(key = id)]
fn charge(id: u64) -> impl Future<Output = Result<u64, String>> {
    async move { Ok(id) }
}

fn main() {}
