//! The transaction's isolation level as a setting, on a real PostgreSQL. In a
//! test binary of its own: its calls share no process with the tests that
//! capture idem's tracing output.

use idem_core::{Error, Fingerprint, Key, PostgresStore, Settings, idempotent};
use idem_test::postgres_server::{RESPONSE_TIMEOUT, shared};
use sqlx::PgConnection;

#[derive(Debug)]
enum ChargeError {
    Db(#[allow(dead_code)] String),
    Idem(#[allow(dead_code)] String),
}

impl From<Error> for ChargeError {
    fn from(error: Error) -> Self {
        Self::Idem(error.to_string())
    }
}

impl From<sqlx::Error> for ChargeError {
    fn from(error: sqlx::Error) -> Self {
        Self::Db(error.to_string())
    }
}

async fn connect(url: &str) -> PostgresStore {
    PostgresStore::builder(url)
        .response_timeout(RESPONSE_TIMEOUT)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

fn op(test: &str) -> String {
    format!("{test}-{}", idem_core::store::Token::random())
}

/// The isolation level is a setting: idem opens the transaction at it, on
/// the attribute and on the plain API (a body cannot set it, since idem's
/// statements run first).
#[tokio::test]
async fn the_isolation_level_is_a_setting() {
    struct Levels {
        pg: PostgresStore,
    }

    impl Levels {
        #[idempotent(key = id, store = self.pg, transaction = tx, isolation = serializable)]
        async fn serializable(
            &self,
            tx: &mut PgConnection,
            id: String,
        ) -> Result<String, ChargeError> {
            Ok(sqlx::query_scalar("SHOW transaction_isolation")
                .fetch_one(&mut *tx)
                .await?)
        }
    }

    let levels = Levels {
        pg: connect(&shared().url()).await,
    };
    assert_eq!(
        levels.serializable(op("isolation")).await.unwrap(),
        "serializable"
    );
    let settings = Settings::builder()
        .isolation(idem_core::Isolation::RepeatableRead)
        .build()
        .unwrap();
    let key = Key::new(&op("isolation-plain"), "k").unwrap();
    let level = levels
        .pg
        .run_in_transaction(&settings, key, Fingerprint::of(&1).unwrap(), |tx| {
            Box::pin(async move {
                let level: String = sqlx::query_scalar("SHOW transaction_isolation")
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(ChargeError::from)?;
                Ok::<_, ChargeError>(level)
            })
        })
        .await
        .unwrap();
    assert_eq!(level, "repeatable read");
}
