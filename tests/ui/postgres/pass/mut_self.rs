//! `transaction = tx` on a `&mut self` method whose body uses `self`
//! mutably, with the store named through `self`.

#![deny(warnings)]

use idem_core::{PostgresStore, idempotent};
use sqlx::PgConnection;

struct Shop {
    pg: PostgresStore,
    charged: u32,
}

impl Shop {
    fn count(&mut self) -> u32 {
        self.charged += 1;
        self.charged
    }

    #[idempotent(key = order, store = self.pg, transaction = tx)]
    async fn charge(&mut self, tx: &mut PgConnection, order: u64) -> Result<u32, String> {
        sqlx::query("SELECT 1")
            .execute(&mut *tx)
            .await
            .map_err(|e| e.to_string())?;
        Ok(self.count())
    }
}

async fn caller(shop: &mut Shop) -> Result<u32, String> {
    shop.charge(7).await
}

fn main() {
    let _ = caller;
}
