use idem_core::{PostgresStore, idempotent};

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
    async fn charge(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
        order: u64,
    ) -> Result<u64, Error> {
        let _ = tx;
        Ok(order)
    }
}

fn main() {}
