use idem_core::{PostgresStore, idempotent};
use sqlx::PgConnection;

struct Shop {
    pg: PostgresStore,
}

impl Shop {
    #[idempotent(key = order, store = self.pg, transaction = tx)]
    async fn charge(&self, tx: &mut PgConnection, order: u64) -> Result<u64, String> {
        let task = tokio::spawn(async move {
            sqlx::query("SELECT 1").execute(&mut *tx).await.map(|_| ())
        });
        task.await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
        Ok(order)
    }
}

fn main() {}
