//! `transaction = tx` with `tx` bound `mut` (passed on as `&mut tx`) and a
//! `mut` argument the body changes: no warning.

#![deny(warnings)]

use idem_core::{PostgresStore, idempotent};
use sqlx::PgConnection;

struct Shop {
    pg: PostgresStore,
}

async fn insert(tx: &mut &mut PgConnection, note: &str) -> Result<(), String> {
    sqlx::query("SELECT $1::text")
        .bind(note)
        .execute(&mut **tx)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

impl Shop {
    #[idempotent(key = order, store = self.pg, transaction = tx)]
    async fn charge(
        &self,
        mut tx: &mut PgConnection,
        order: u64,
        mut note: String,
    ) -> Result<u64, String> {
        note.push('!');
        insert(&mut tx, &note).await?;
        Ok(order)
    }
}

async fn caller(shop: &Shop) -> Result<u64, String> {
    shop.charge(7, "paid".to_owned()).await
}

fn main() {
    let _ = caller;
}
