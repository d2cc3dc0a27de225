//! One process of the PostgreSQL transactional tests.
//!
//! - `idem-pg-storm charge URL OPERATION CALLERS`: `CALLERS` concurrent
//!   transactional charges of one key, each inserting a row into `charges`
//!   inside the transaction; prints every caller's charge id on its own line.
//! - `idem-pg-storm hold URL OPERATION`: one transactional charge that inserts
//!   its row, prints `holding`, and never finishes: the test kills it.

use std::time::Duration;

use idem_core::{Fingerprint, Key, PostgresStore, Settings};
use sqlx::PgConnection;

async fn insert(tx: &mut PgConnection, operation: &str) -> Result<i64, idem_core::Error> {
    sqlx::query_scalar("INSERT INTO charges (op, amount) VALUES ($1, 100) RETURNING id")
        .bind(operation)
        .fetch_one(tx)
        .await
        .map_err(|e| {
            idem_core::Error::Store(idem_core::store::StoreError::new(
                idem_core::store::StoreErrorKind::Other,
                e.to_string(),
            ))
        })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: idem-pg-storm charge URL OPERATION CALLERS | hold URL OPERATION";
    let (mode, url, operation) = match args.as_slice() {
        [mode, url, operation, ..] => (mode.as_str(), url.clone(), operation.clone()),
        _ => return Err(usage.into()),
    };
    // Callers that wait for the key's lock hold a pooled connection while
    // they wait, so most of the 250 wait for a connection first: a generous
    // timeout keeps a loaded machine from failing them closed.
    let store = PostgresStore::builder(&url)
        .max_connections(20)
        .connect_timeout(Duration::from_secs(5))
        .response_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    let key = Key::new(&operation, "the-one-key")?;
    let fingerprint = Fingerprint::of(&100)?;
    let settings = Settings::builder()
        .wait_timeout(Duration::from_secs(30))
        .build()?;
    match mode {
        "charge" => {
            let callers: usize = args.get(3).ok_or(usage)?.parse()?;
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..callers {
                let (store, operation) = (store.clone(), operation.clone());
                tasks.spawn(async move {
                    store
                        .run_in_transaction(&settings, key, fingerprint, |tx| {
                            Box::pin(async move {
                                let id = insert(tx, &operation).await?;
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                Ok::<_, idem_core::Error>(id)
                            })
                        })
                        .await
                });
            }
            let mut out = String::new();
            for result in tasks.join_all().await {
                out.push_str(&result?.to_string());
                out.push('\n');
            }
            print!("{out}");
        }
        "hold" => {
            store
                .run_in_transaction(&settings, key, fingerprint, |tx| {
                    Box::pin(async move {
                        let id = insert(tx, &operation).await?;
                        println!("holding");
                        std::future::pending::<()>().await;
                        Ok::<_, idem_core::Error>(id)
                    })
                })
                .await?;
        }
        _ => return Err(usage.into()),
    }
    Ok(())
}
