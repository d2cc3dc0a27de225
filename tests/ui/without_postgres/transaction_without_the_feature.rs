use idem_core::{Idempotency, idempotent};

/// A connection type of the user's own; without the `postgres` feature the
/// one error is the missing feature.
struct PgConnection;

struct Shop {
    idem: Idempotency,
}

impl Shop {
    #[idempotent(key = order, store = self.idem, transaction = tx)]
    async fn charge(&self, tx: &mut PgConnection, order: u64) -> Result<u64, String> {
        let _ = tx;
        Ok(order)
    }
}

fn main() {}
