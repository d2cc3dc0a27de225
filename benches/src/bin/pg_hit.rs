//! Where a replayed PostgreSQL hit spends its time: the same hit measured
//! layer by layer, in interleaved rounds against the same server, so that
//! the difference between two rows is what the layer between them adds.
//!
//! ```sh
//! cargo run --release -p benches --bin pg_hit [ROUNDS]
//! ```
//!
//! Rows, each on the store's own pool:
//!
//! - `SELECT 1` — the floor: one round trip;
//! - a plain read of the hit's row (`SELECT fingerprint, record, expires_at
//!   … WHERE key = $1`): what a read-only hit would cost;
//! - `PostgresStore::begin` — idem's claim-or-read statement for the hit;
//! - `Idempotency::run` — the engine around it, key and fingerprint given;
//! - `#[idempotent]` — the benchmark's function, which also hashes the key
//!   and the request's fingerprint on every call.
//!
//! `pg_hit select|read|begin|fn N` runs one row `N` times on a
//! `current_thread` runtime, for a profiler.
//!
//! ```sh
//! cargo run --release -p benches --bin pg_hit first [ROUNDS]
//! ```
//!
//! measures first runs on fresh keys the same way: the hand-written pair
//! of writes (`INSERT … ON CONFLICT DO NOTHING`, then `UPDATE`), the
//! store's `begin` and `complete`, `Idempotency::run`, and the fn.

use std::hint::black_box;
use std::time::Duration;

use benches::{BenchError, ChargeRequest, Op, Receipt, charge, interleaved, request};
use idem_core::store::{Begin, Completion, Outcome, Record, Store, Token};
use idem_core::{Fingerprint, Idempotency, Key, PostgresStore, Settings, idempotent};
use idem_test::postgres_server::PostgresServer;

#[idempotent(key = req.idempotency_key, store = idem, skip(idem), name = "bench.pg")]
async fn idem_charge(idem: &Idempotency, req: ChargeRequest) -> Result<Receipt, BenchError> {
    Ok(charge(&req))
}

/// What every row needs: the store, its pool, and the hit's key.
struct Setup {
    store: &'static PostgresStore,
    idem: &'static Idempotency,
    pool: &'static sqlx::PgPool,
    key: Key,
    fingerprint: Fingerprint,
}

async fn setup(server: &PostgresServer) -> Setup {
    let store = PostgresStore::builder(server.url())
        .max_connections(4)
        .connect()
        .await
        .expect("idem on postgres");
    let store: &'static PostgresStore = Box::leak(Box::new(store));
    let idem: &'static Idempotency = Box::leak(Box::new(Idempotency::new(store.clone())));
    let pool: &'static sqlx::PgPool = Box::leak(Box::new(store.pool().clone()));
    idem_charge(idem, request(1)).await.expect("a first run");
    let key = Key::new("bench.pg", &request(1).idempotency_key).expect("a key");
    let fingerprint = match store.inspect(key).await.expect("inspect") {
        idem_core::Inspection::Completed { fingerprint, .. } => fingerprint,
        other => panic!("expected the first run's record under the key, got {other:?}"),
    };
    Setup {
        store,
        idem,
        pool,
        key,
        fingerprint,
    }
}

async fn select_one(pool: &sqlx::PgPool) {
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(pool)
        .await
        .expect("SELECT 1");
    black_box(one);
}

async fn read(pool: &sqlx::PgPool, key: Key) {
    let row: (Vec<u8>, Option<Vec<u8>>) = sqlx::query_as(
        "SELECT fingerprint, record FROM idempotency_keys WHERE key = $1 AND expires_at > now()",
    )
    .bind(key.digest().as_slice())
    .fetch_one(pool)
    .await
    .expect("the hit's row");
    black_box(row);
}

async fn begin(s: &Setup) {
    let begin = s
        .store
        .begin(
            s.key,
            s.fingerprint,
            Token::random(),
            Duration::from_secs(60),
        )
        .await
        .expect("a begin");
    assert!(matches!(begin, Begin::Completed(_)));
    black_box(begin);
}

async fn run(s: &Setup) {
    let receipt: Result<Receipt, BenchError> = s
        .idem
        .run(&Settings::DEFAULT, s.key, s.fingerprint, async {
            unreachable!("a replayed hit does not run the body")
        })
        .await;
    black_box(receipt.expect("a replay"));
}

/// The hand-written claim: `INSERT … ON CONFLICT DO NOTHING` of `key`.
async fn manual_claim(pool: &sqlx::PgPool, key: &str) {
    sqlx::query(
        "INSERT INTO manual_keys (key, response, expires_at) \
         VALUES ($1, NULL, now() + interval '1 day') ON CONFLICT (key) DO NOTHING",
    )
    .bind(key)
    .execute(pool)
    .await
    .expect("the claim");
}

/// First runs on fresh keys, layer by layer.
fn first_runs(s: &'static Setup) -> Vec<(&'static str, Op)> {
    let receipt: &'static [u8] = Box::leak(
        serde_json::to_vec(&charge(&request(1)))
            .unwrap()
            .into_boxed_slice(),
    );
    vec![
        (
            "`SELECT 1` (floor)",
            Box::new(move |_| Box::pin(select_one(s.pool))),
        ),
        (
            "hand-written: `INSERT … ON CONFLICT DO NOTHING`, `UPDATE`",
            Box::new(move |i| {
                Box::pin(async move {
                    let key = format!("manual-{}-{i}", std::process::id());
                    manual_claim(s.pool, &key).await;
                    sqlx::query("UPDATE manual_keys SET response = $2 WHERE key = $1")
                        .bind(&key)
                        .bind(receipt)
                        .execute(s.pool)
                        .await
                        .expect("the record");
                })
            }),
        ),
        (
            "hand-written: `INSERT … ON CONFLICT DO NOTHING` alone",
            Box::new(move |i| {
                Box::pin(async move {
                    manual_claim(s.pool, &format!("manual-alone-{}-{i}", std::process::id())).await;
                })
            }),
        ),
        (
            "`begin` alone",
            Box::new(move |i| {
                Box::pin(async move {
                    let key = Key::new("pg-begin", &(std::process::id(), i)).unwrap();
                    let begin = s
                        .store
                        .begin(key, s.fingerprint, Token::random(), Duration::from_secs(60))
                        .await;
                    assert!(matches!(begin, Ok(Begin::Claimed)));
                })
            }),
        ),
        (
            "`begin` + `complete`",
            Box::new(move |i| {
                Box::pin(async move {
                    let key = Key::new("pg-first", &(std::process::id(), i)).unwrap();
                    let token = Token::random();
                    let lease = Duration::from_secs(60);
                    let begin = s.store.begin(key, s.fingerprint, token, lease).await;
                    assert!(matches!(begin, Ok(Begin::Claimed)));
                    let record = Record::new(Outcome::Ok, receipt);
                    let done = s
                        .store
                        .complete(key, token, record, Duration::from_secs(86_400))
                        .await;
                    assert!(matches!(done, Ok(Completion::Stored)));
                })
            }),
        ),
        (
            "`Idempotency::run`",
            Box::new(move |i| {
                Box::pin(async move {
                    let key = Key::new("pg-run", &(std::process::id(), i)).unwrap();
                    let receipt: Result<Receipt, BenchError> = s
                        .idem
                        .run(&Settings::DEFAULT, key, s.fingerprint, async {
                            Ok(charge(&request(1)))
                        })
                        .await;
                    black_box(receipt.expect("a first run"));
                })
            }),
        ),
        (
            "`#[idempotent]` fn",
            Box::new(move |i| {
                Box::pin(async move {
                    black_box(
                        idem_charge(s.idem, request(1_000_000 + i))
                            .await
                            .expect("a first run"),
                    );
                })
            }),
        ),
    ]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let server = PostgresServer::start();
    if let [mode, rest @ ..] = args.as_slice()
        && mode == "first"
    {
        let rounds: u64 = rest.first().and_then(|n| n.parse().ok()).unwrap_or(8);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let rows = runtime.block_on(async {
            let s: &'static Setup = Box::leak(Box::new(setup(&server).await));
            sqlx::query(
                "CREATE TABLE manual_keys (key text PRIMARY KEY, response bytea, \
                 expires_at timestamptz)",
            )
            .execute(s.pool)
            .await
            .expect("the hand-written table");
            let ops = first_runs(s);
            let latencies = interleaved(&ops, rounds, 250).await;
            ops.iter()
                .map(|(name, _)| *name)
                .zip(latencies)
                .collect::<Vec<_>>()
        });
        benches::print_layers(
            &format!("first runs, current_thread runtime, {rounds} rounds of 250 each"),
            "`SELECT 1`",
            &rows,
        );
        return;
    }
    if let [mode, n] = args.as_slice() {
        let n: u64 = n.parse().expect("a number of hits");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(async {
            let s = setup(&server).await;
            for _ in 0..n {
                match mode.as_str() {
                    "select" => select_one(s.pool).await,
                    "read" => read(s.pool, s.key).await,
                    "begin" => begin(&s).await,
                    "run" => run(&s).await,
                    _ => {
                        black_box(idem_charge(s.idem, request(1)).await.expect("a replay"));
                    }
                }
            }
        });
        return;
    }
    let rounds: u64 = args.first().and_then(|n| n.parse().ok()).unwrap_or(8);
    for (flavor, runtime) in [
        (
            "current_thread",
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime"),
        ),
        (
            "multi_thread",
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .expect("a runtime"),
        ),
    ] {
        let rows = runtime.block_on(async {
            let s: &'static Setup = Box::leak(Box::new(setup(&server).await));
            let ops: Vec<(&str, Op)> = vec![
                (
                    "`SELECT 1` (floor)",
                    Box::new(move |_| Box::pin(select_one(s.pool))),
                ),
                (
                    "plain read of the row",
                    Box::new(move |_| Box::pin(read(s.pool, s.key))),
                ),
                (
                    "`PostgresStore::begin`",
                    Box::new(move |_| Box::pin(begin(s))),
                ),
                ("`Idempotency::run`", Box::new(move |_| Box::pin(run(s)))),
                (
                    "`#[idempotent]` fn",
                    Box::new(move |_| {
                        Box::pin(async move {
                            black_box(idem_charge(s.idem, request(1)).await.expect("a replay"));
                        })
                    }),
                ),
                (
                    "`SELECT 1` again (drift within a round)",
                    Box::new(move |_| Box::pin(select_one(s.pool))),
                ),
            ];
            let latencies = interleaved(&ops, rounds, 500).await;
            ops.iter()
                .map(|(name, _)| *name)
                .zip(latencies)
                .collect::<Vec<_>>()
        });
        benches::print_layers(
            &format!("{flavor} runtime, {rounds} rounds of 500 hits each"),
            "`SELECT 1`",
            &rows,
        );
    }
}
