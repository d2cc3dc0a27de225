use idem_core::{PostgresStore, idempotent};
use sqlx::PgConnection;

#[derive(Debug)]
struct Error;

impl From<idem_core::Error> for Error {
    fn from(_: idem_core::Error) -> Self {
        Error
    }
}

struct Shop {
    pg: PostgresStore,
}

impl Shop {
    #[idempotent(key = order, store = self.pg, transaction = tx)]
    async fn charge(&self, tx: &PgConnection, order: u64) -> Result<u64, Error> {
        let _ = tx;
        Ok(order)
    }
}

/// Callers written for the fixed function raise no errors of their own.
async fn caller(shop: &Shop) -> Result<u64, Error> {
    shop.charge(7).await
}

fn main() {
    let _ = caller;
}
