//! Where a replayed Redis hit spends its time: the same hit measured layer
//! by layer, in interleaved rounds against the same server, so that the
//! difference between two rows is what the layer between them adds.
//!
//! ```sh
//! cargo run --release -p benches --bin redis_hit [ROUNDS]
//! ```
//!
//! Rows, each one a replayed hit of the benchmark's receipt:
//!
//! - `GET` — the floor: a raw `GET` of the stored receipt's bytes;
//! - `SET NX GET` — the command idem sends for a hit, raw, on the same kind
//!   of connection;
//! - `store.begin` — the same through [`RedisStore`]'s `begin` (the key's
//!   name, the claim's envelope, parsing the answer);
//! - `Idempotency::run` — the engine around it (in-process coalescing, the
//!   call's span and counters, decoding the receipt), with the key and
//!   fingerprint computed once beforehand;
//! - `#[idempotent]` — the benchmark's function, which also hashes the key
//!   and the request's fingerprint on every call.
//!
//! Each row on a `current_thread` runtime and on a multi-threaded one (the
//! benchmark's), whose thread hand-offs between the caller and the
//! connection's driver task cost as much as a layer.
//!
//! ```sh
//! cargo run --release -p benches --bin redis_hit cpu 3 [GET begin run fn]
//! ```
//!
//! runs each row with 64 tasks on distinct keys and reports the CPU the
//! client process and the server spent per call: what bounds throughput
//! when they share two cores. `redis_hit get|begin|run|fn N` runs one row N
//! times on a `current_thread` runtime, for a profiler; under callgrind, the
//! difference between two runs of different N is the row's instructions per
//! call.

use std::hint::black_box;
use std::time::Duration;

use benches::{BenchError, ChargeRequest, Op, Receipt, charge, interleaved, request};
use idem_core::store::{Begin, Store, Token};
use idem_core::{Fingerprint, Idempotency, Key, RedisStore, Settings, idempotent};
use idem_test::redis_server::RedisServer;
use redis::aio::ConnectionManager;

#[idempotent(key = req.idempotency_key, store = idem, skip(idem), name = "bench.charge")]
async fn idem_charge(idem: &Idempotency, req: ChargeRequest) -> Result<Receipt, BenchError> {
    Ok(charge(&req))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [mode, seconds, rows @ ..] = args.as_slice()
        && mode == "cpu"
    {
        let rows: Vec<&str> = rows.iter().map(String::as_str).collect();
        cpu(seconds.parse().expect("a number of seconds"), &rows);
        return;
    }
    if let [mode, n] = args.as_slice() {
        // `redis_hit get|begin|run|fn N`: only that row, N times, for `perf record`.
        profile(mode, n.parse().expect("a number of hits"));
        return;
    }
    let rounds: u64 = args.first().and_then(|n| n.parse().ok()).unwrap_or(8);
    let server = RedisServer::start();
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
        let rows = runtime.block_on(measure(&server, rounds));
        benches::print_layers(
            &format!("{flavor} runtime, {rounds} rounds of 500 hits each"),
            "GET",
            &rows,
        );
    }
}

async fn measure(server: &RedisServer, rounds: u64) -> Vec<(&'static str, benches::Latency)> {
    let url = server.url();
    let store = RedisStore::node(&url).connect().await.expect("a store");
    let idem: &'static Idempotency = Box::leak(Box::new(Idempotency::new(store.clone())));
    let conn = ConnectionManager::new(redis::Client::open(url.as_str()).expect("a client"))
        .await
        .expect("a raw connection");

    // The hit's record, stored by a first call.
    let req = request(1);
    idem_charge(idem, req.clone()).await.expect("a first run");
    let key = Key::new("bench.charge", &req.idempotency_key).expect("a key");
    let fingerprint = match store.inspect(key).await.expect("inspect") {
        idem_core::Inspection::Completed { fingerprint, .. } => fingerprint,
        other => panic!("expected the first run's record under the key, got {other:?}"),
    };
    let Begin::Completed(record) = store
        .begin(key, fingerprint, Token::random(), Duration::from_secs(60))
        .await
        .expect("a begin")
    else {
        panic!("the first run's record replays")
    };
    let record_key = store.record_key(&key);
    let stored: Vec<u8> = redis::cmd("GET")
        .arg(&record_key)
        .query_async(&mut conn.clone())
        .await
        .expect("the stored record");
    benches::set_floor(&conn, record.payload().as_ref()).await;
    // A claim's size: what `begin` sends (the envelope of a claim).
    let claim = vec![b'c'; 64];
    black_box(&stored);
    let settings = Settings::default();

    let c = conn.clone();
    let c2 = conn.clone();
    let rk: &'static str = Box::leak(record_key.into_boxed_str());
    let claim: &'static [u8] = Box::leak(claim.into_boxed_slice());
    let s: &'static RedisStore = Box::leak(Box::new(store));
    let ops: Vec<(&str, Op)> = vec![
        ("`GET` (floor)", benches::floor_op(c)),
        (
            "`SET NX GET`, raw",
            Box::new(move |_| {
                let mut c = c2.clone();
                Box::pin(async move {
                    let v: Option<Vec<u8>> = redis::cmd("SET")
                        .arg(rk)
                        .arg(claim)
                        .arg("NX")
                        .arg("GET")
                        .arg("PX")
                        .arg(60_000)
                        .query_async(&mut c)
                        .await
                        .unwrap();
                    black_box(v);
                })
            }),
        ),
        (
            "`RedisStore::begin`",
            Box::new(move |_| {
                Box::pin(async move {
                    let begin = s
                        .begin(key, fingerprint, Token::random(), Duration::from_secs(60))
                        .await
                        .unwrap();
                    assert!(matches!(begin, Begin::Completed(_)));
                    black_box(begin);
                })
            }),
        ),
        (
            "`Idempotency::run`",
            Box::new(move |_| {
                Box::pin(async move {
                    let receipt: Result<Receipt, BenchError> = idem
                        .run(&settings, key, fingerprint, async {
                            unreachable!("a replayed hit does not run the body")
                        })
                        .await;
                    black_box(receipt.unwrap());
                })
            }),
        ),
        (
            "key + fingerprint, `run`",
            Box::new(move |_| {
                Box::pin(async move {
                    let req = request(1);
                    let key = Key::new("bench.charge", &req.idempotency_key).unwrap();
                    let fingerprint = Fingerprint::of(&(&req,)).unwrap();
                    let receipt: Result<Receipt, BenchError> = idem
                        .run(&settings, key, fingerprint, async {
                            unreachable!("a replayed hit does not run the body")
                        })
                        .await;
                    black_box((receipt.is_err(), key));
                })
            }),
        ),
        (
            "`#[idempotent]` fn",
            Box::new(move |_| {
                Box::pin(async move {
                    black_box(idem_charge(idem, request(1)).await.unwrap());
                })
            }),
        ),
        (
            "`GET` again (drift within a round)",
            benches::floor_op(conn.clone()),
        ),
    ];
    let latencies = interleaved(&ops, rounds, 500).await;
    ops.iter().map(|(name, _)| *name).zip(latencies).collect()
}

/// Runs one row `n` times on a `current_thread` runtime, for a profiler.
fn profile(mode: &str, n: u64) {
    let server = RedisServer::start();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let store = RedisStore::node(server.url())
            .connect()
            .await
            .expect("a store");
        let idem = Idempotency::new(store.clone());
        let conn = ConnectionManager::new(redis::Client::open(server.url()).expect("a client"))
            .await
            .expect("a raw connection");
        idem_charge(&idem, request(1)).await.expect("a first run");
        let value = serde_json::to_vec(&charge(&request(1))).unwrap();
        benches::set_floor(&conn, &value).await;
        let key = Key::new("bench.charge", &request(1).idempotency_key).expect("a key");
        let fingerprint = match store.inspect(key).await.expect("inspect") {
            idem_core::Inspection::Completed { fingerprint, .. } => fingerprint,
            other => panic!("expected the first run's record, got {other:?}"),
        };
        let settings = Settings::default();
        for _ in 0..n {
            match mode {
                "get" => benches::get_floor(conn.clone()).await,
                "begin" => {
                    black_box(
                        store
                            .begin(key, fingerprint, Token::random(), Duration::from_secs(60))
                            .await
                            .unwrap(),
                    );
                }
                "run" => {
                    let receipt: Result<Receipt, BenchError> = idem
                        .run(&settings, key, fingerprint, async {
                            unreachable!("a replayed hit does not run the body")
                        })
                        .await;
                    black_box(receipt.unwrap());
                }
                _ => {
                    black_box(idem_charge(&idem, request(1)).await.unwrap());
                }
            }
        }
    });
}

/// `redis_hit cpu SECONDS`: each row with 64 tasks on distinct keys for
/// SECONDS, on a multi-threaded runtime, and the CPU the client process and
/// the server spent per call. `redis_hit cpu SECONDS ROW…` runs only those
/// rows (`GET`, `begin`, `run`, `fn`), e.g. under `perf record`.
fn cpu(seconds: u64, only: &[&str]) {
    const TASKS: u64 = 64;
    let server = RedisServer::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let window = Duration::from_secs(seconds);
    runtime.block_on(async {
        let store = RedisStore::node(server.url())
            .connect()
            .await
            .expect("a store");
        let idem: &'static Idempotency = Box::leak(Box::new(Idempotency::new(store.clone())));
        let conn = ConnectionManager::new(redis::Client::open(server.url()).expect("a client"))
            .await
            .expect("a raw connection");
        let value = serde_json::to_vec(&charge(&request(1))).unwrap();
        benches::set_floor(&conn, &value).await;
        let mut keys = Vec::new();
        for t in 0..TASKS {
            let req = request(10_000 + t);
            idem_charge(idem, req.clone()).await.expect("a first run");
            let key = Key::new("bench.charge", &req.idempotency_key).expect("a key");
            keys.push((key, Fingerprint::of(&(&req,)).expect("a fingerprint")));
        }
        let keys: &'static [(Key, Fingerprint)] = Box::leak(keys.into_boxed_slice());
        let s: &'static RedisStore = Box::leak(Box::new(store));
        let settings: &'static Settings = Box::leak(Box::new(Settings::default()));
        {
            let (key, fingerprint) = keys[0];
            let begin = s.begin(key, fingerprint, Token::random(), Duration::from_secs(60));
            let run = idem.run::<Receipt, BenchError, _>(settings, key, fingerprint, async {
                unreachable!("a replayed hit does not run the body")
            });
            let call = idem_charge(idem, request(1));
            println!(
                "futures: begin {} B, run {} B, fn {} B",
                std::mem::size_of_val(&*begin),
                std::mem::size_of_val(&run),
                std::mem::size_of_val(&call)
            );
        }
        println!("| 64 tasks, {seconds} s each | calls/s | client CPU µs per call | server CPU µs per call |");
        println!("|---|---|---|---|");
        for row in ["GET", "begin", "run", "fn"] {
            if !only.is_empty() && !only.contains(&row) {
                continue;
            }
            let (client, redis) = (benches::cpu_time("self"), benches::redis_cpu(&server));
            let conn = conn.clone();
            let rate = benches::throughput(TASKS, window, move |i| {
                let conn = conn.clone();
                async move {
                    let (key, fingerprint) = keys[(i % TASKS) as usize];
                    match row {
                        "GET" => benches::get_floor(conn).await,
                        "begin" => {
                            let begin = s
                                .begin(key, fingerprint, Token::random(), Duration::from_secs(60))
                                .await
                                .unwrap();
                            assert!(matches!(begin, Begin::Completed(_)));
                        }
                        "run" => {
                            let receipt: Result<Receipt, BenchError> = idem
                                .run(settings, key, fingerprint, async {
                                    unreachable!("a replayed hit does not run the body")
                                })
                                .await;
                            black_box(receipt.unwrap());
                        }
                        _ => {
                            black_box(idem_charge(idem, request(10_000 + i % TASKS)).await.unwrap());
                        }
                    }
                }
            })
            .await;
            let calls = rate * window.as_secs_f64();
            let client = (benches::cpu_time("self") - client).as_secs_f64() * 1e6 / calls;
            let redis = (benches::redis_cpu(&server) - redis).as_secs_f64() * 1e6 / calls;
            println!("| {row} | {rate:.0} | {client:.2} | {redis:.2} |");
        }
    });
}
