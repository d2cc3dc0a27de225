//! idem against the floor and against its peers, all in one run on one
//! machine: `cargo bench -p benches`.
//!
//! The floor is a raw redis-rs `GET` on the same kind of connection idem uses
//! (a `ConnectionManager`) and, in memory, a bare call of the same function.
//! The peers are the `cached` crate (`#[cached(sync_writes = "by_key")]` in
//! memory, its `AsyncRedisCache` on Redis), the `idempotent` crate (its memory
//! and Valkey stores) and the check → lock → run → store → unlock sequence a
//! user would write on redis-rs. The Redis server is a private
//! `redis-server` started on a free loopback port.
//!
//! Results are printed as markdown and written to `target/idem-bench/`.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use benches::{
    BenchError, ChargeRequest, Latency, Receipt, Table, bar_chart, charge, interleaved,
    per_call_nanos, request, resident_bytes, throughput,
};
use cached::ConcurrentCachedAsync as _;
use cached::proc_macro::cached;
use idem_core::store::{Outcome, Record, ReplayCache, Store, Token};
use idem_core::{
    Fingerprint, Idempotency, Key, MemoryStore, PostgresStore, RedisStore, idempotent,
};
use idem_test::postgres_server::PostgresServer;
use idem_test::redis_server::RedisServer;
use idempotent::store::{IdempotencyStore, InsertResult};
use redis::aio::ConnectionManager;
use sha2::{Digest as _, Sha256};

mod edges;

const SEQUENTIAL: u64 = 4_000;
const ROUNDS: u64 = 8;
const TASKS: u64 = 64;
const WINDOW: Duration = Duration::from_secs(2);
/// Redis throughput: rounds of each row, interleaved, and each round's
/// length.
const THROUGHPUT_ROUNDS: u64 = 3;
const ROUND_WINDOW: Duration = Duration::from_secs(1);
const HIT: u64 = 1;

#[idempotent(key = req.idempotency_key, store = idem, skip(idem), name = "bench.charge")]
async fn idem_charge(idem: &Idempotency, req: ChargeRequest) -> Result<Receipt, BenchError> {
    Ok(charge(&req))
}

#[idempotent(key = req.idempotency_key, store = idem, skip(idem), name = "bench.decline")]
async fn idem_decline(idem: &Idempotency, req: ChargeRequest) -> Result<Receipt, BenchError> {
    black_box(&req);
    Err(BenchError::Declined)
}

#[idempotent(key = req.idempotency_key, store = idem, skip(idem, runs), name = "bench.storm")]
async fn idem_storm(
    idem: &Idempotency,
    req: ChargeRequest,
    runs: &AtomicU64,
) -> Result<Receipt, BenchError> {
    runs.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(5)).await;
    Ok(charge(&req))
}

/// The function without idempotency: the floor of the in-memory figures.
#[inline(never)]
async fn bare_charge(req: ChargeRequest) -> Result<Receipt, BenchError> {
    Ok(charge(&req))
}

#[cached(
    sync_writes = "by_key",
    key = "String",
    convert = r#"{ req.idempotency_key.clone() }"#
)]
async fn cached_charge(req: ChargeRequest) -> Result<Receipt, BenchError> {
    Ok(charge(&req))
}

fn failed(error: impl std::fmt::Display) -> BenchError {
    BenchError::Failed(error.to_string())
}

/// The `idempotent` crate's documented flow: fingerprint the request, claim,
/// run, complete; or replay a completed entry.
async fn idempotent_charge<S: IdempotencyStore>(
    store: &S,
    req: ChargeRequest,
) -> Result<Receipt, BenchError> {
    use idempotent::entry::{CachedResponse, ExistingEntry, IdempotencyEntry, Metadata};
    use idempotent::fingerprint::{DefaultFingerprintStrategy, FingerprintStrategy as _};
    let body = serde_json::to_vec(&req).map_err(failed)?;
    let fingerprint = DefaultFingerprintStrategy.compute("charge", &body);
    let key = idempotent::key::IdempotencyKey::new(req.idempotency_key.clone()).map_err(failed)?;
    let ttl = Duration::from_secs(86_400);
    match store
        .try_insert(&key, IdempotencyEntry::new(fingerprint, ttl))
        .await
        .map_err(failed)?
    {
        InsertResult::Claimed { fencing_token } => {
            let receipt = charge(&req);
            let response = CachedResponse {
                status_code: 200,
                metadata: Metadata::default(),
                body: serde_json::to_vec(&receipt).map_err(failed)?.into(),
            };
            let done = IdempotencyEntry::new(fingerprint, ttl).complete(response);
            store
                .complete(&key, done, fencing_token)
                .await
                .map_err(failed)?;
            Ok(receipt)
        }
        InsertResult::Exists(ExistingEntry::Completed(done))
            if done.fingerprint_matches(fingerprint) =>
        {
            serde_json::from_slice(&done.response().body).map_err(failed)
        }
        InsertResult::Exists(_) => Err(BenchError::Failed("in progress or reused".to_owned())),
    }
}

/// The sequence many guides write on redis-rs: check for a stored result,
/// take a lock with `SET NX PX`, run, store the result, delete the lock.
async fn manual_charge(
    mut conn: ConnectionManager,
    req: ChargeRequest,
) -> Result<Receipt, BenchError> {
    let result_key = format!("manual:result:{}", req.idempotency_key);
    let lock_key = format!("manual:lock:{}", req.idempotency_key);
    loop {
        let stored: Option<Vec<u8>> = redis::cmd("GET")
            .arg(&result_key)
            .query_async(&mut conn)
            .await
            .map_err(failed)?;
        if let Some(bytes) = stored {
            return serde_json::from_slice(&bytes).map_err(failed);
        }
        let locked: Option<String> = redis::cmd("SET")
            .arg(&lock_key)
            .arg(Token::random().to_string())
            .arg("NX")
            .arg("PX")
            .arg(30_000)
            .query_async(&mut conn)
            .await
            .map_err(failed)?;
        if locked.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let receipt = charge(&req);
    redis::cmd("SET")
        .arg(&result_key)
        .arg(serde_json::to_vec(&receipt).map_err(failed)?)
        .arg("PX")
        .arg(86_400_000)
        .exec_async(&mut conn)
        .await
        .map_err(failed)?;
    redis::cmd("DEL")
        .arg(&lock_key)
        .exec_async(&mut conn)
        .await
        .map_err(failed)?;
    Ok(receipt)
}

fn us(latency: Latency) -> [String; 2] {
    [format!("{:.1}", latency.p50), format!("{:.1}", latency.p99)]
}

fn ratio(value: f64, floor: f64) -> String {
    format!("{:.2}×", value / floor)
}

/// Client commands the server ran, leaving out those our scripts run inside.
fn client_commands(server: &RedisServer) -> u64 {
    const INSIDE_SCRIPTS: [&str; 3] = ["get", "psetex", "del"];
    server
        .command_calls()
        .into_iter()
        .filter(|(name, _)| !INSIDE_SCRIPTS.contains(&name.as_str()) && name != "info")
        .map(|(_, calls)| calls)
        .sum()
}

struct Report {
    markdown: String,
    bars: Vec<(String, f64)>,
}

impl Report {
    fn section(&mut self, title: &str, table: &Table, note: &str) {
        let text = format!("### {title}\n\n{}\n{note}\n", table.render());
        println!("{text}");
        self.markdown.push_str(&text);
        self.markdown.push('\n');
    }
}

/// The Redis tables; answers the Redis row of the duplicate-storm table.
async fn redis_figures(report: &mut Report) -> StormRow {
    let server = RedisServer::start();
    let url = server.url();
    let store = RedisStore::node(&url)
        .connect()
        .await
        .expect("idem on redis");
    let store: &'static Idempotency = Box::leak(Box::new(Idempotency::new(store)));
    // The same store behind an in-process replay cache: its own row, as a
    // hot replay answered without the round trip is not the Redis hit.
    let cached_store = RedisStore::node(&url)
        .connect()
        .await
        .expect("idem on redis, behind a replay cache");
    let cached_store: &'static Idempotency = Box::leak(Box::new(Idempotency::new(
        ReplayCache::new(cached_store, 1024, Duration::from_secs(60)),
    )));
    let conn = ConnectionManager::new(redis::Client::open(url.as_str()).unwrap())
        .await
        .expect("a raw connection");

    // The floor: a GET of a value as large as a stored receipt.
    let value = serde_json::to_vec(&charge(&request(HIT))).unwrap();
    benches::set_floor(&conn, &value).await;

    // Peers on the same server and workload.
    let cache = cached::AsyncRedisCache::<String, Receipt>::builder("cached-bench")
        .ttl(Duration::from_secs(86_400))
        .connection_string(&url)
        .build()
        .await
        .expect("cached's redis store");
    let cache: &'static _ = Box::leak(Box::new(cache));
    let cached_flow = move |req: ChargeRequest| async move {
        if let Some(hit) = cache.async_cache_get(&req.idempotency_key).await.unwrap() {
            return hit;
        }
        let receipt = charge(&req);
        cache
            .async_cache_set(req.idempotency_key.clone(), receipt.clone())
            .await
            .unwrap();
        receipt
    };
    let valkey =
        idempotent::store::valkey::ValkeyStore::new(redis::Client::open(url.as_str()).unwrap())
            .await
            .expect("idempotent's valkey store");
    let valkey: &'static _ = Box::leak(Box::new(valkey));

    // Every contender's hit key is stored first; first runs take fresh keys.
    idem_charge(store, request(HIT)).await.unwrap();
    idem_charge(cached_store, request(HIT)).await.unwrap();
    manual_charge(conn.clone(), request(HIT)).await.unwrap();
    cached_flow(request(HIT)).await;
    idempotent_charge(valkey, request(HIT)).await.unwrap();
    let c = conn.clone();
    let ops: Vec<(&str, benches::Op)> = vec![
        ("raw GET", benches::floor_op(c.clone())),
        (
            "idem hit",
            Box::new(move |_| {
                Box::pin(async move {
                    black_box(idem_charge(store, request(HIT)).await.unwrap());
                })
            }),
        ),
        (
            "idem first",
            Box::new(move |i| {
                Box::pin(async move {
                    black_box(idem_charge(store, request(1_000_000 + i)).await.unwrap());
                })
            }),
        ),
        (
            "idem failed",
            Box::new(move |i| {
                Box::pin(async move {
                    black_box(
                        idem_decline(store, request(2_000_000 + i))
                            .await
                            .unwrap_err(),
                    );
                })
            }),
        ),
        (
            "idem hit, replay cache",
            Box::new(move |_| {
                Box::pin(async move {
                    black_box(idem_charge(cached_store, request(HIT)).await.unwrap());
                })
            }),
        ),
        ("manual hit", {
            let c = conn.clone();
            Box::new(move |_| {
                let c = c.clone();
                Box::pin(async move {
                    black_box(manual_charge(c, request(HIT)).await.unwrap());
                })
            })
        }),
        ("manual first", {
            let c = conn.clone();
            Box::new(move |i| {
                let c = c.clone();
                Box::pin(async move {
                    black_box(manual_charge(c, request(3_000_000 + i)).await.unwrap());
                })
            })
        }),
        (
            "cached hit",
            Box::new(move |_| {
                Box::pin(async move {
                    black_box(cached_flow(request(HIT)).await);
                })
            }),
        ),
        (
            "cached first",
            Box::new(move |i| {
                Box::pin(async move {
                    black_box(cached_flow(request(4_000_000 + i)).await);
                })
            }),
        ),
        (
            "idempotent hit",
            Box::new(move |_| {
                Box::pin(async move {
                    black_box(idempotent_charge(valkey, request(HIT)).await.unwrap());
                })
            }),
        ),
        (
            "idempotent first",
            Box::new(move |i| {
                Box::pin(async move {
                    black_box(
                        idempotent_charge(valkey, request(5_000_000 + i))
                            .await
                            .unwrap(),
                    );
                })
            }),
        ),
    ];
    let measured = interleaved(&ops, ROUNDS, SEQUENTIAL / ROUNDS).await;
    let [
        floor,
        hit,
        first,
        fail,
        replay_cached,
        manual_hit,
        manual_first,
        cached_hit,
        cached_first,
        valkey_hit,
        valkey_first,
    ] = measured[..]
    else {
        unreachable!("one latency per operation")
    };

    for t in 0..TASKS {
        idem_charge(store, request(10_000 + t)).await.unwrap();
    }
    // 64 tasks: the floor, the hit and the first run in interleaved rounds,
    // as the latencies are, so that the machine's drift touches each alike;
    // the median round of each.
    let (mut floor_rounds, mut hit_rounds, mut first_rounds) = (vec![], vec![], vec![]);
    for round in 0..THROUGHPUT_ROUNDS {
        let floor_conn = conn.clone();
        floor_rounds.push(
            throughput(TASKS, ROUND_WINDOW, move |_| {
                benches::get_floor(floor_conn.clone())
            })
            .await,
        );
        hit_rounds.push(
            throughput(TASKS, ROUND_WINDOW, move |i| async move {
                black_box(
                    idem_charge(store, request(10_000 + i % TASKS))
                        .await
                        .unwrap(),
                );
            })
            .await,
        );
        // New keys in every round.
        let first = 100_000_000 + round * 10_000_000;
        first_rounds.push(
            throughput(TASKS, ROUND_WINDOW, move |i| async move {
                black_box(idem_charge(store, request(first + i)).await.unwrap());
            })
            .await,
        );
    }
    let [floor_tput, hit_tput, first_tput] =
        [floor_rounds, hit_rounds, first_rounds].map(|mut rounds| {
            rounds.sort_by(f64::total_cmp);
            rounds[rounds.len() / 2]
        });

    let mut table = Table::new(&["operation", "p50 µs", "p99 µs", "p50 ÷ GET", "target"]);
    table.row(
        &[
            ["raw `GET` (floor)".to_owned()].as_slice(),
            &us(floor),
            &["1.00×".to_owned(), String::new()],
        ]
        .concat(),
    );
    table.row(
        &[
            ["idem replayed hit".to_owned()].as_slice(),
            &us(hit),
            &[ratio(hit.p50, floor.p50), "≤ 1.05×".to_owned()],
        ]
        .concat(),
    );
    table.row(
        &[
            ["idem first run".to_owned()].as_slice(),
            &us(first),
            &[ratio(first.p50, floor.p50), "≤ 2.2×".to_owned()],
        ]
        .concat(),
    );
    table.row(
        &[
            ["idem failed run".to_owned()].as_slice(),
            &us(fail),
            &[ratio(fail.p50, floor.p50), String::new()],
        ]
        .concat(),
    );
    table.row(
        &[
            ["idem replayed hit from a `ReplayCache`, in process".to_owned()].as_slice(),
            &us(replay_cached),
            &[
                ratio(replay_cached.p50, floor.p50),
                "its own row".to_owned(),
            ],
        ]
        .concat(),
    );
    report.section(
        "Redis, 1 task: latency against a raw GET round trip",
        &table,
        "The replay cache's row is a hot replay answered without a round trip (`ReplayCache` in front of the same Redis store, records kept 60 s): not the Redis hit, which it skips.",
    );
    let mut table = Table::new(&[
        "operation, 64 tasks on distinct keys",
        "calls/s",
        "÷ GET",
        "target",
    ]);
    table.row(&[
        "raw `GET` (floor)".to_owned(),
        format!("{floor_tput:.0}"),
        "1.00×".to_owned(),
        String::new(),
    ]);
    table.row(&[
        "idem replayed hit".to_owned(),
        format!("{hit_tput:.0}"),
        ratio(hit_tput, floor_tput),
        "≥ 0.7×".to_owned(),
    ]);
    table.row(&[
        "idem first run".to_owned(),
        format!("{first_tput:.0}"),
        ratio(first_tput, floor_tput),
        String::new(),
    ]);
    report.section(
        "Redis, 64 tasks: throughput against raw GETs",
        &table,
        "The three rows in 3 interleaved rounds of 1 s each; the median round of each.\n",
    );
    report.bars.push(("raw GET (floor)".to_owned(), floor.p50));
    report.bars.push(("idem hit".to_owned(), hit.p50));
    report.bars.push(("idem first run".to_owned(), first.p50));

    let mut peers = Table::new(&[
        "on Redis",
        "hit p50 µs",
        "hit p99 µs",
        "first run p50 µs",
        "first run p99 µs",
        "hit ÷ idem",
        "first run ÷ idem",
    ]);
    let mut row = |name: &str, h: Latency, f: Latency| {
        peers.row(
            &[
                [name.to_owned()].as_slice(),
                &us(h),
                &us(f),
                &[ratio(h.p50, hit.p50), ratio(f.p50, first.p50)],
            ]
            .concat(),
        );
    };
    row("**idem**", hit, first);

    row(
        "hand-written check → lock → run → store → unlock",
        manual_hit,
        manual_first,
    );
    row(
        "`cached` 4.1 `AsyncRedisCache` (no lock)",
        cached_hit,
        cached_first,
    );
    row("`idempotent` 0.3.0 `ValkeyStore`", valkey_hit, valkey_first);
    report.section(
        "Peers on Redis, 1 task, same server and workload",
        &peers,
        "The latencies of this table and of the first Redis table were measured together, in 8 \
         interleaved rounds of 500 calls per operation, so the machine's drift touches them all alike.",
    );
    report
        .bars
        .push(("hand-written hit".to_owned(), manual_hit.p50));
    report
        .bars
        .push(("hand-written first run".to_owned(), manual_first.p50));
    report.bars.push(("cached hit".to_owned(), cached_hit.p50));
    report
        .bars
        .push(("cached first run".to_owned(), cached_first.p50));
    report
        .bars
        .push(("idempotent hit".to_owned(), valkey_hit.p50));
    report
        .bars
        .push(("idempotent first run".to_owned(), valkey_first.p50));

    // A storm of duplicates on Redis.
    let runs: &'static AtomicU64 = Box::leak(Box::new(AtomicU64::new(0)));
    let before = client_commands(&server);
    let (p50, p99) = storm(move || async move {
        idem_storm(store, request(7_777), runs).await.unwrap();
    })
    .await;
    let commands = client_commands(&server) - before;
    [
        "Redis".to_owned(),
        runs.load(Ordering::SeqCst).to_string(),
        format!("{p50:.1}"),
        format!("{p99:.1}"),
        commands.to_string(),
    ]
}

/// A row of the duplicate-storm table: store, executions, p50, p99, commands.
type StormRow = [String; 5];

/// 1000 concurrent same-key callers; each caller's latency, p50 and p99 in ms.
async fn storm<F, Fut>(call: F) -> (f64, f64)
where
    F: Fn() -> Fut + Send + Sync + Copy + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..1000 {
        set.spawn(async move {
            call().await;
            start.elapsed()
        });
    }
    let mut latencies: Vec<f64> = set
        .join_all()
        .await
        .into_iter()
        .map(|d| d.as_secs_f64() * 1e3)
        .collect();
    latencies.sort_by(f64::total_cmp);
    (latencies[499], latencies[989])
}

#[idempotent(key = req.idempotency_key, store = idem, skip(idem), name = "bench.pg")]
async fn idem_pg_charge(idem: &Idempotency, req: ChargeRequest) -> Result<Receipt, BenchError> {
    Ok(charge(&req))
}

/// The sequence a service writes by hand on one table: claim with `INSERT …
/// ON CONFLICT DO NOTHING`, read back on a conflict, run, store with
/// `UPDATE`.
async fn manual_pg_charge(pool: &sqlx::PgPool, req: ChargeRequest) -> Result<Receipt, BenchError> {
    let claimed = sqlx::query(
        "INSERT INTO manual_keys (key, response, expires_at) VALUES ($1, NULL, now() + interval '1 day') \
         ON CONFLICT (key) DO NOTHING",
    )
    .bind(&req.idempotency_key)
    .execute(pool)
    .await
    .map_err(failed)?
    .rows_affected()
        == 1;
    if !claimed {
        let stored: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT response FROM manual_keys WHERE key = $1")
                .bind(&req.idempotency_key)
                .fetch_one(pool)
                .await
                .map_err(failed)?;
        return match stored {
            Some(bytes) => serde_json::from_slice(&bytes).map_err(failed),
            None => Err(BenchError::Failed("in progress".to_owned())),
        };
    }
    let receipt = charge(&req);
    sqlx::query("UPDATE manual_keys SET response = $2 WHERE key = $1")
        .bind(&req.idempotency_key)
        .bind(serde_json::to_vec(&receipt).map_err(failed)?)
        .execute(pool)
        .await
        .map_err(failed)?;
    Ok(receipt)
}

/// A private PostgreSQL server (stopped when it is dropped), idem's store on
/// it with a pool of 4 connections, and that pool for the run's own
/// statements.
async fn postgres_store() -> (PostgresServer, PostgresStore, &'static sqlx::PgPool) {
    let server = PostgresServer::start();
    let store = PostgresStore::builder(server.url())
        .max_connections(4)
        .connect()
        .await
        .expect("idem on postgres");
    let pool = Box::leak(Box::new(store.pool().clone()));
    (server, store, pool)
}

/// The PostgreSQL table: latency against a `SELECT 1` round trip on the same
/// pool, and against the hand-written sequence.
async fn postgres_figures(report: &mut Report) {
    let (server, store, pool) = postgres_store().await;
    // A pool with sqlx's default options, which ping each connection before
    // handing it out: what the floor was before the store's own pool
    // stopped doing so, and what a pool passed to `with_pool` costs.
    let default_pool: &'static sqlx::PgPool = Box::leak(Box::new(
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(&server.url())
            .await
            .expect("a pool with sqlx's defaults"),
    ));
    let idem: &'static Idempotency = Box::leak(Box::new(Idempotency::new(store)));
    sqlx::query(
        "CREATE TABLE manual_keys (key text PRIMARY KEY, response bytea, expires_at timestamptz)",
    )
    .execute(pool)
    .await
    .expect("the hand-written table");
    idem_pg_charge(idem, request(HIT)).await.unwrap();
    manual_pg_charge(pool, request(HIT)).await.unwrap();
    let ops: Vec<(&str, benches::Op)> = vec![
        (
            "SELECT 1",
            Box::new(move |_| {
                Box::pin(async move {
                    let one: i32 = sqlx::query_scalar("SELECT 1")
                        .fetch_one(pool)
                        .await
                        .unwrap();
                    black_box(one);
                })
            }),
        ),
        (
            "SELECT 1, sqlx's default pool",
            Box::new(move |_| {
                Box::pin(async move {
                    let one: i32 = sqlx::query_scalar("SELECT 1")
                        .fetch_one(default_pool)
                        .await
                        .unwrap();
                    black_box(one);
                })
            }),
        ),
        (
            "idem hit",
            Box::new(move |_| {
                Box::pin(async move {
                    black_box(idem_pg_charge(idem, request(HIT)).await.unwrap());
                })
            }),
        ),
        (
            "idem first",
            Box::new(move |i| {
                Box::pin(async move {
                    black_box(idem_pg_charge(idem, request(6_000_000 + i)).await.unwrap());
                })
            }),
        ),
        (
            "manual hit",
            Box::new(move |_| {
                Box::pin(async move {
                    black_box(manual_pg_charge(pool, request(HIT)).await.unwrap());
                })
            }),
        ),
        (
            "manual first",
            Box::new(move |i| {
                Box::pin(async move {
                    black_box(
                        manual_pg_charge(pool, request(7_000_000 + i))
                            .await
                            .unwrap(),
                    );
                })
            }),
        ),
    ];
    let measured = interleaved(&ops, ROUNDS, 2_000 / ROUNDS).await;
    let [floor, default_floor, hit, first, manual_hit, manual_first] = measured[..] else {
        unreachable!("one latency per operation")
    };
    let mut table = Table::new(&["operation", "p50 µs", "p99 µs", "p50 ÷ SELECT 1", "target"]);
    for (name, latency, target) in [
        ("`SELECT 1` on the same pool (floor)", floor, ""),
        (
            "`SELECT 1` on a pool with sqlx's defaults (a ping before each statement)",
            default_floor,
            "",
        ),
        ("idem replayed hit", hit, "≤ 1.15×"),
        ("idem first run", first, "≤ 2.3×"),
        (
            "hand-written hit (INSERT … ON CONFLICT DO NOTHING, SELECT)",
            manual_hit,
            "",
        ),
        (
            "hand-written first run (INSERT … ON CONFLICT, UPDATE)",
            manual_first,
            "",
        ),
    ] {
        table.row(
            &[
                [name.to_owned()].as_slice(),
                &us(latency),
                &[ratio(latency.p50, floor.p50), target.to_owned()],
            ]
            .concat(),
        );
    }
    report.section(
        "PostgreSQL, 1 task: latency against a `SELECT 1` round trip",
        &table,
        "idem's hit is one statement (a read, which calls the claim function only for a key it can claim) and its first run two (the read and its claim, then complete), against the hand-written sequence's two and three. The store's pool pings a connection before use only after 100 ms idle; a pool with sqlx's defaults pings before every statement, a second round trip, as the row below the floor shows. PostgreSQL runs on the same two cores, with `fsync=off`.",
    );
}

/// The memory tables; answers the memory row of the duplicate-storm table.
async fn memory_figures(report: &mut Report) -> StormRow {
    let store: &'static Idempotency = Box::leak(Box::new(Idempotency::memory()));
    let (batches, batch) = (200, 2_000);
    let bare_hit = per_call_nanos(batches, batch, |_| async {
        black_box(bare_charge(request(HIT)).await.unwrap());
    })
    .await;
    idem_charge(store, request(HIT)).await.unwrap();
    let hit = per_call_nanos(batches, batch, |_| async {
        black_box(idem_charge(store, request(HIT)).await.unwrap());
    })
    .await;
    let bare_first = per_call_nanos(batches, batch, |i| async move {
        black_box(bare_charge(request(10_000_000 + i)).await.unwrap());
    })
    .await;
    let first = per_call_nanos(batches, batch, |i| async move {
        black_box(idem_charge(store, request(10_000_000 + i)).await.unwrap());
    })
    .await;
    cached_charge(request(HIT)).await.unwrap();
    let cached_hit = per_call_nanos(batches, batch, |_| async {
        black_box(cached_charge(request(HIT)).await.unwrap());
    })
    .await;
    let idempotent_store: &'static _ = Box::leak(Box::new(
        idempotent::store::memory::MemoryStore::new(1024, Duration::from_secs(60)),
    ));
    idempotent_charge(idempotent_store, request(HIT))
        .await
        .unwrap();
    let idempotent_hit = per_call_nanos(batches / 4, batch / 4, |_| async {
        black_box(
            idempotent_charge(idempotent_store, request(HIT))
                .await
                .unwrap(),
        );
    })
    .await;

    let req_bytes = serde_json::to_vec(&request(HIT)).unwrap().len();
    let res_bytes = serde_json::to_vec(&charge(&request(HIT))).unwrap().len();
    let mut table = Table::new(&[
        "in memory",
        "ns per call",
        "over the bare call",
        "÷ `cached` hit",
        "target",
    ]);
    table.row(&[
        "bare call, hit workload (floor)".to_owned(),
        format!("{bare_hit:.0}"),
        "—".to_owned(),
        String::new(),
        String::new(),
    ]);
    table.row(&[
        "**idem replayed hit**".to_owned(),
        format!("{hit:.0}"),
        format!("+{:.0} ns", hit - bare_hit),
        ratio(hit, cached_hit),
        "≤ 2× `cached`".to_owned(),
    ]);
    table.row(&[
        "bare call, new keys (floor)".to_owned(),
        format!("{bare_first:.0}"),
        "—".to_owned(),
        String::new(),
        String::new(),
    ]);
    table.row(&[
        "**idem first run**".to_owned(),
        format!("{first:.0}"),
        format!("+{:.0} ns", first - bare_first),
        String::new(),
        String::new(),
    ]);
    table.row(&[
        "`cached` 4.1 `#[cached(sync_writes = \"by_key\")]` hit".to_owned(),
        format!("{cached_hit:.0}"),
        format!("+{:.0} ns", cached_hit - bare_hit),
        "1.00×".to_owned(),
        String::new(),
    ]);
    table.row(&[
        "`idempotent` 0.3.0 `MemoryStore` hit".to_owned(),
        format!("{idempotent_hit:.0}"),
        format!("+{:.0} ns", idempotent_hit - bare_hit),
        ratio(idempotent_hit, cached_hit),
        String::new(),
    ]);
    report.section(
        "Memory store, 1 task: overhead over a bare call",
        &table,
        &format!("Arguments are {req_bytes} bytes of JSON, the result {res_bytes}. A hit computes the key and fingerprint, claims, and decodes the stored result; `cached` hashes the key and clones the value."),
    );

    let runs: &'static AtomicU64 = Box::leak(Box::new(AtomicU64::new(0)));
    let (p50, p99) = storm(move || async move {
        idem_storm(store, request(8_888), runs).await.unwrap();
    })
    .await;
    [
        "memory".to_owned(),
        runs.load(Ordering::SeqCst).to_string(),
        format!("{p50:.1}"),
        format!("{p99:.1}"),
        "—".to_owned(),
    ]
}

async fn footprint_and_fingerprints(report: &mut Report) {
    const RECORDS: u64 = 1_000_000;
    let store = MemoryStore::builder()
        .max_records(2 * RECORDS as usize)
        .build();
    let fingerprint = Fingerprint::of(&request(0)).unwrap();
    let before = resident_bytes();
    for i in 0..RECORDS {
        let key = Key::new("footprint", &i).unwrap();
        let token = Token::random();
        store
            .begin(key, fingerprint, token, Duration::from_secs(60))
            .await
            .unwrap();
        let payload = serde_json::to_vec(&charge(&request(i))).unwrap();
        store
            .complete(
                key,
                token,
                Record::new(Outcome::Ok, payload),
                Duration::from_secs(3_600),
            )
            .await
            .unwrap();
    }
    let per_record = (resident_bytes() - before) as f64 / RECORDS as f64;
    let payload = serde_json::to_vec(&charge(&request(0))).unwrap().len();
    let mut table = Table::new(&[
        "records",
        "resident bytes per record",
        "of which the result's JSON",
    ]);
    table.row(&[
        RECORDS.to_string(),
        format!("{per_record:.0}"),
        payload.to_string(),
    ]);
    report.section("Memory store footprint", &table, "Measured as the growth of the process's resident memory while 1 M completed records were stored.");
    drop(store);

    #[derive(serde::Serialize)]
    struct Payload {
        data: String,
    }
    let mut table = Table::new(&[
        "what is hashed",
        "ns",
        "MB/s",
        "SHA-256 alone over as many bytes, ns",
    ]);
    let sha = |bytes: usize| {
        let data = vec![b'x'; bytes];
        async move {
            let batch = (1_000_000 / bytes.max(1)).clamp(2, 5_000) as u64;
            per_call_nanos(30, batch, |_| async {
                black_box(Sha256::digest(black_box(&data)));
            })
            .await
        }
    };
    let req = request(HIT);
    let key = per_call_nanos(100, 5_000, |_| async {
        black_box(Key::new("bench.charge", &req.idempotency_key).unwrap());
    })
    .await;
    let key_bytes = "bench.charge".len() + req.idempotency_key.len();
    table.row(&[
        format!("the workload's key ({key_bytes} B of name and key)"),
        format!("{key:.0}"),
        "—".to_owned(),
        format!("{:.0}", sha(key_bytes).await),
    ]);
    let args = per_call_nanos(100, 5_000, |_| async {
        black_box(Fingerprint::of(&(&req,)).unwrap());
    })
    .await;
    let json = serde_json::to_vec(&req).unwrap().len();
    table.row(&[
        format!("the workload's arguments ({json} B as JSON)"),
        format!("{args:.0}"),
        "—".to_owned(),
        format!("{:.0}", sha(json).await),
    ]);
    for (size, batches, batch) in [
        (100_usize, 100, 5_000),
        (10_000, 100, 200),
        (1_000_000, 30, 2),
    ] {
        let payload = Payload {
            data: "x".repeat(size),
        };
        let nanos = per_call_nanos(batches, batch, |_| async {
            black_box(Fingerprint::of(&payload).unwrap());
        })
        .await;
        let label = match size {
            100 => "a 100 B string argument",
            10_000 => "a 10 KB string argument",
            _ => "a 1 MB string argument",
        };
        table.row(&[
            label.to_owned(),
            format!("{nanos:.0}"),
            format!("{:.0}", size as f64 / nanos * 1e3),
            format!("{:.0}", sha(size).await),
        ]);
    }
    report.section(
        "Key and fingerprint cost",
        &table,
        "SHA-256 over the canonical encoding, streamed into the hasher. The last column is the floor: SHA-256 alone over as many bytes as the input has (the canonical encoding adds type tags, varint lengths and an 8-byte digest of each struct's field names; target: ≤ 1.3× for the arguments).",
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        // `cargo test --benches` and harness probes: nothing to list or check.
        return;
    }
    let mut report = Report {
        markdown: String::new(),
        bars: Vec::new(),
    };
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/idem-bench");
    std::fs::create_dir_all(&dir).expect("the report directory");
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "edges") {
        // `cargo bench -p benches -- edges [transactional] [http] [consumer]`:
        // the edges' tables alone.
        edges::figures(&mut report, &args).await;
        std::fs::write(dir.join("edges.md"), &report.markdown).expect("the report");
        println!("written to {}", dir.display());
        return;
    }
    if args.iter().any(|a| a == "redis") {
        // `cargo bench -p benches -- redis`: the Redis tables alone.
        redis_figures(&mut report).await;
        std::fs::write(dir.join("redis.md"), &report.markdown).expect("the report");
        println!("written to {}", dir.display());
        return;
    }
    if args.iter().any(|a| a == "postgres") {
        // `cargo bench -p benches -- postgres`: the PostgreSQL table alone.
        postgres_figures(&mut report).await;
        std::fs::write(dir.join("postgres.md"), &report.markdown).expect("the report");
        println!("written to {}", dir.display());
        return;
    }
    let memory_storm = memory_figures(&mut report).await;
    let redis_storm = redis_figures(&mut report).await;
    postgres_figures(&mut report).await;
    edges::figures(&mut report, &[]).await;
    let mut storms = Table::new(&[
        "1000 same-key callers",
        "executions",
        "caller p50 ms",
        "caller p99 ms",
        "Redis commands",
    ]);
    storms.row(&memory_storm);
    storms.row(&redis_storm);
    report.section(
        "Duplicate storm: 1000 concurrent callers of one key, body takes 5 ms",
        &storms,
        "",
    );
    footprint_and_fingerprints(&mut report).await;

    std::fs::write(dir.join("report.md"), &report.markdown).expect("the report");
    std::fs::write(
        dir.join("redis-latency.svg"),
        bar_chart(
            "Redis, 1 task: p50 latency (µs, lower is better)",
            "µs",
            &report.bars,
        ),
    )
    .expect("the chart");
    println!("written to {}", dir.display());
}
