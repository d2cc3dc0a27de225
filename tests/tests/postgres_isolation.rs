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

/// A store of a schema of its own (`prefix` and a random number) on the
/// shared server, with the schema's name.
async fn store_of_schema(
    prefix: &str,
    connections: u32,
    response_timeout: std::time::Duration,
) -> (PostgresStore, String) {
    let schema = format!(
        "{prefix}_{}",
        idem_core::store::Token::random().as_u128() % 1_000_000_007
    );
    let store = PostgresStore::builder(shared().url())
        .schema(&schema)
        .response_timeout(response_timeout)
        .max_connections(connections)
        .connect()
        .await
        .unwrap();
    (store, schema)
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

/// At `SERIALIZABLE`, idem's own statements do not make calls of different
/// keys fail to serialize: a first run's claim inserts without reading the
/// key's index page, and its record is written by the row's address, so
/// that concurrent calls whose bodies touch nothing of each other's all
/// commit, on a table small enough that every key shares one index page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serializable_calls_of_different_keys_do_not_conflict() {
    let (store, _) = store_of_schema("serializable", 10, std::time::Duration::from_secs(5)).await;
    let settings = Settings::builder()
        .isolation(idem_core::Isolation::Serializable)
        .build()
        .unwrap();
    let op = op("serializable-keys");
    let mut failures = Vec::new();
    for round in 0..5 {
        let calls = (0..8).map(|n| {
            let (store, op) = (store.clone(), op.clone());
            async move {
                let key = Key::new(&op, &(round, n)).unwrap();
                store
                    .run_in_transaction(&settings, key, Fingerprint::of(&n).unwrap(), |_tx| {
                        Box::pin(async move {
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            Ok::<_, ChargeError>(n)
                        })
                    })
                    .await
            }
        });
        for answer in futures_util::future::join_all(calls).await {
            if let Err(error) = answer {
                failures.push(error);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 40 failed: {failures:?}",
        failures.len()
    );
}

/// Two `SERIALIZABLE` calls whose bodies each count what the other inserts
/// (a write skew): one of them fails to serialize and is rolled back, and
/// its error does not call the outcome unknown (the database refused it:
/// nothing was committed); run again, it commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_fails_to_serialize_is_rolled_back_and_says_so() {
    let server = shared();
    server.psql("CREATE TABLE IF NOT EXISTS skew (op text NOT NULL, n int NOT NULL)");
    let store = connect(&server.url()).await;
    let settings = Settings::builder()
        .isolation(idem_core::Isolation::Serializable)
        .build()
        .unwrap();
    let op = op("skew");
    let both_read = std::sync::Arc::new(tokio::sync::Barrier::new(2));
    let call = |n: i32, gate: Option<std::sync::Arc<tokio::sync::Barrier>>| {
        let (store, op) = (store.clone(), op.clone());
        async move {
            let key = Key::new(&op, &n).unwrap();
            store
                .run_in_transaction(&settings, key, Fingerprint::of(&n).unwrap(), move |tx| {
                    Box::pin(async move {
                        let seen: i64 =
                            sqlx::query_scalar("SELECT count(*) FROM skew WHERE op = $1")
                                .bind(&op)
                                .fetch_one(&mut *tx)
                                .await?;
                        if let Some(gate) = gate {
                            gate.wait().await;
                        }
                        sqlx::query("INSERT INTO skew (op, n) VALUES ($1, $2)")
                            .bind(&op)
                            .bind(n)
                            .execute(&mut *tx)
                            .await?;
                        Ok::<_, ChargeError>(seen)
                    })
                })
                .await
        }
    };
    let (first, second) = tokio::join!(
        call(1, Some(both_read.clone())),
        call(2, Some(both_read.clone()))
    );
    let failed = match (&first, &second) {
        (Ok(_), Err(error)) => (2, format!("{error:?}")),
        (Err(error), Ok(_)) => (1, format!("{error:?}")),
        other => panic!("exactly one should fail to serialize: {other:?}"),
    };
    assert!(failed.1.contains("could not serialize"), "{}", failed.1);
    assert!(!failed.1.contains("may or may not"), "{}", failed.1);
    let rows = server.psql(&format!("SELECT count(*) FROM skew WHERE op = '{op}'"));
    assert_eq!(rows, "1", "the failed call's row was rolled back");
    assert_eq!(
        call(failed.0, None).await.unwrap(),
        1,
        "run again, it commits"
    );
}

/// A deferred constraint the body's writes break fails at `COMMIT`: the
/// database refused it and nothing was committed, so the error does not
/// call the outcome unknown, and a retry runs again.
#[tokio::test]
async fn a_deferred_constraint_broken_at_commit_is_no_unknown_outcome() {
    let server = shared();
    server.psql(
        "CREATE TABLE IF NOT EXISTS deferred (op text NOT NULL, n int NOT NULL, \
         CONSTRAINT deferred_unique UNIQUE (op, n) DEFERRABLE INITIALLY DEFERRED)",
    );
    let store = connect(&server.url()).await;
    let op = op("deferred");
    let key = Key::new(&op, &1).unwrap();
    // The retry runs again: it breaks the constraint again, not replaying.
    for _ in 0..2 {
        let answer = store
            .run_in_transaction(
                &Settings::DEFAULT,
                key,
                Fingerprint::of(&1).unwrap(),
                |tx| {
                    let op = op.clone();
                    Box::pin(async move {
                        for _ in 0..2 {
                            sqlx::query("INSERT INTO deferred (op, n) VALUES ($1, 1)")
                                .bind(&op)
                                .execute(&mut *tx)
                                .await?;
                        }
                        Ok::<_, ChargeError>(())
                    })
                },
            )
            .await;
        let error = format!(
            "{:?}",
            answer.expect_err("the commit breaks the constraint")
        );
        assert!(error.contains("deferred_unique"), "{error}");
        assert!(!error.contains("may or may not"), "{error}");
    }
    let rows = server.psql(&format!("SELECT count(*) FROM deferred WHERE op = '{op}'"));
    assert_eq!(rows, "0", "nothing was committed");
}

/// A transactional claim of an expired key finds the key's row by its key,
/// not by scanning the expired rows with the purge's index (which a
/// generic plan would do when statistics say few rows are expired): on a
/// table whose purge lags, every claim would read them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_of_an_expired_key_reads_its_row_by_key() {
    let server = shared();
    let (store, schema) = store_of_schema("reclaim", 1, std::time::Duration::from_secs(5)).await;
    let op = op("reclaim");
    let keys: Vec<Key> = (0..12).map(|n| Key::new(&op, &n).unwrap()).collect();
    let rows: Vec<String> = keys
        .iter()
        .map(|key| {
            format!(
                "(decode('{key}', 'hex'), '\\x01', '\\x02', '\\x03', now(), now() - interval '1 hour')"
            )
        })
        .collect();
    // Among many live records, analyzed before the expired ones came, so
    // that statistics say none is expired.
    server.psql(&format!(
        "INSERT INTO {schema}.idempotency_keys SELECT sha256(i::text::bytea), '\\x01', '\\x02', \
             '\\x03', now(), now() + interval '1 day' FROM generate_series(1, 20000) i; \
         ANALYZE {schema}.idempotency_keys; \
         INSERT INTO {schema}.idempotency_keys VALUES {}",
        rows.join(", ")
    ));
    let scans = async || {
        // The pool's one session sends its statistics now (PostgreSQL 15
        // and later; earlier ones send them within half a second).
        let _ = sqlx::query("SELECT pg_stat_force_next_flush()")
            .execute(store.pool())
            .await;
        tokio::time::sleep(std::time::Duration::from_millis(700)).await;
        server
            .psql(&format!(
                "SELECT coalesce(sum(idx_scan), 0) FROM pg_stat_user_indexes \
                 WHERE schemaname = '{schema}' AND indexrelname LIKE '%expires%'"
            ))
            .parse::<i64>()
            .unwrap()
    };
    let before = scans().await;
    for (n, key) in keys.iter().enumerate() {
        let ran = store
            .run_in_transaction(
                &Settings::DEFAULT,
                *key,
                Fingerprint::of(&n).unwrap(),
                |_tx| Box::pin(async move { Ok::<_, ChargeError>(n) }),
            )
            .await
            .unwrap();
        assert_eq!(ran, n, "the expired key was claimed and run");
    }
    assert_eq!(
        scans().await,
        before,
        "no claim scanned the expired rows' index"
    );
}

/// Two stores of different tables in one database lock a key apart: a
/// `forget` on one (which never saw the key) neither ends nor reports the
/// other's transactional holder of that key, and `inspect` there does not
/// see it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_of_two_tables_lock_a_key_apart() {
    let (a, _) = store_of_schema("locks_a", 4, std::time::Duration::from_secs(3)).await;
    let (b, b_schema) = store_of_schema("locks_b", 4, std::time::Duration::from_secs(3)).await;
    let key = Key::new(&op("two-tables"), &1).unwrap();
    let (held, claimed) = tokio::sync::oneshot::channel();
    let holder = tokio::spawn({
        let b = b.clone();
        async move {
            b.run_in_transaction(
                &Settings::DEFAULT,
                key,
                Fingerprint::of(&1).unwrap(),
                |tx| {
                    Box::pin(async move {
                        let _ = held.send(());
                        tokio::time::sleep(std::time::Duration::from_millis(800)).await;
                        let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&mut *tx).await?;
                        Ok::<_, ChargeError>(one)
                    })
                },
            )
            .await
        }
    });
    claimed.await.unwrap();
    let a = idem_core::Idempotency::new(a);
    assert_eq!(a.inspect(key).await.unwrap(), idem_core::Inspection::Absent);
    assert!(
        !a.forget(key).await.unwrap(),
        "nothing of store A's was forgotten"
    );
    assert_eq!(holder.await.unwrap().unwrap(), 1, "store B's call went on");
    let stored = shared().psql(&format!(
        "SELECT count(*) FROM {b_schema}.idempotency_keys \
         WHERE key = decode('{key}', 'hex') AND record IS NOT NULL"
    ));
    assert_eq!(stored, "1");
}

/// A body that updates idem's own row of its key (which moves the row) is
/// still recorded, not taken for a body that ended the transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_touches_its_own_row_is_recorded() {
    let (store, schema) = store_of_schema("touch", 4, std::time::Duration::from_secs(3)).await;
    let key = Key::new(&op("touch"), &1).unwrap();
    let table = format!("{schema}.idempotency_keys");
    let digest = key.digest().to_vec();
    let answer = store
        .run_in_transaction(
            &Settings::DEFAULT,
            key,
            Fingerprint::of(&1).unwrap(),
            |tx| {
                Box::pin(async move {
                    sqlx::query(&format!(
                        "UPDATE {table} SET stored_at = stored_at WHERE key = $1"
                    ))
                    .bind(digest)
                    .execute(&mut *tx)
                    .await?;
                    Ok::<_, ChargeError>(7)
                })
            },
        )
        .await;
    assert_eq!(answer.unwrap(), 7);
    let replay = store
        .run_in_transaction(
            &Settings::DEFAULT,
            key,
            Fingerprint::of(&1).unwrap(),
            |_tx| Box::pin(async move { Ok::<_, ChargeError>(8) }),
        )
        .await;
    assert_eq!(replay.unwrap(), 7, "recorded, and replayed");
}
