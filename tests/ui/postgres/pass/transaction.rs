//! `transaction = tx`: the parameter leaves the signature; idem opens the
//! transaction on the store and passes it in.

use idem_core::{PostgresStore, idempotent};
use sqlx::PgConnection;

#[derive(Debug, serde::Serialize, serde::Deserialize)]
enum Error {
    Declined,
    Db(String),
    Idem(String),
}

impl From<idem_core::Error> for Error {
    fn from(e: idem_core::Error) -> Self {
        Self::Idem(e.to_string())
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        Self::Db(e.to_string())
    }
}

fn is_declined(e: &Error) -> bool {
    matches!(e, Error::Declined)
}

struct Shop {
    pg: PostgresStore,
}

impl Shop {
    #[idempotent(key = order, store = self.pg, transaction = tx)]
    async fn charge(&self, tx: &mut PgConnection, order: u64, amount: i64) -> Result<i64, Error> {
        let id: i64 = sqlx::query_scalar("INSERT INTO charges (order_id, amount) VALUES ($1, $2) RETURNING id")
            .bind(order as i64)
            .bind(amount)
            .fetch_one(&mut *tx)
            .await?;
        Ok(id)
    }

    #[idempotent(key = order, store = &self.pg, transaction = tx, on_conflict = reject, cache_errors = is_declined)]
    async fn refund(&self, order: u64, tx: &mut PgConnection) -> Result<(), Error> {
        sqlx::query("DELETE FROM charges WHERE order_id = $1")
            .bind(order as i64)
            .execute(&mut *tx)
            .await?;
        Ok(())
    }
}

fn main() {
    let _ = |shop: Shop| async move {
        let _ = shop.charge(1, 100).await;
        let _ = shop.refund(1).await;
    };
}
