use std::rc::Rc;

use idem_core::idempotent;

#[idempotent(key = id, skip(cache))]
async fn charge(id: u64, cache: Rc<u64>) -> Result<u64, String> {
    Ok(*cache + id)
}

fn require_send<T: Send>(_: T) {}

fn main() {
    require_send(charge(1, Rc::new(1)));
}
