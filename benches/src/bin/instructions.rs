//! Instruction counts of idem's in-memory path, for `callgrind`, whose
//! counts (unlike times on a shared machine) repeat from run to run:
//!
//! ```sh
//! cargo build --release -p benches --bin instructions
//! valgrind --tool=callgrind --toggle-collect='*measured*' \
//!     target/release/instructions hit 20000
//! ```
//!
//! Each mode runs its operation `N` times inside a function whose name holds
//! `measured`, so that callgrind counts that loop alone; divide the total by
//! `N`. Modes: `hit` (a replayed hit on the memory store), `first` (a first
//! run), `bare` (the bare call), `fingerprint` (the arguments' fingerprint),
//! `key` (the key), `layer` (a request of 1 KB replayed by
//! `IdempotencyLayer` on the memory store, in process) and `layer-bare` (the
//! same request to the same axum handler without the layer); `layer-ns`
//! times those two (best of 9), not for callgrind.

use std::hint::black_box;

use axum::body::Body;
use benches::{BenchError, ChargeRequest, Receipt, charge, request};
use idem_core::http::IdempotencyLayer;
use idem_core::{Fingerprint, Idempotency, Key, idempotent};
use tower_service::Service as _;

#[idempotent(key = req.idempotency_key, store = idem, skip(idem), name = "bench.charge")]
async fn idem_charge(idem: &Idempotency, req: ChargeRequest) -> Result<Receipt, BenchError> {
    Ok(charge(&req))
}

#[inline(never)]
async fn bare_charge(req: ChargeRequest) -> Result<Receipt, BenchError> {
    Ok(charge(&req))
}

#[inline(never)]
fn measured_hits(
    runtime: &tokio::runtime::Runtime,
    idem: &Idempotency,
    requests: &[ChargeRequest],
) {
    runtime.block_on(async {
        for req in requests {
            black_box(idem_charge(idem, req.clone()).await.unwrap());
        }
    });
}

#[inline(never)]
fn measured_bare(runtime: &tokio::runtime::Runtime, requests: &[ChargeRequest]) {
    runtime.block_on(async {
        for req in requests {
            black_box(bare_charge(req.clone()).await.unwrap());
        }
    });
}

#[inline(never)]
fn measured_fingerprints(requests: &[ChargeRequest]) {
    for req in requests {
        black_box(Fingerprint::of(&(req,)).unwrap());
    }
}

#[inline(never)]
fn measured_keys(requests: &[ChargeRequest]) {
    for req in requests {
        black_box(Key::new("bench.charge", &req.idempotency_key).unwrap());
    }
}

/// The charge handler, behind the idempotency layer on the memory store or
/// bare.
fn router(layered: bool) -> axum::Router {
    let router = benches::charges_router();
    if layered {
        router.layer(IdempotencyLayer::unscoped(Idempotency::memory()))
    } else {
        router
    }
}

/// A request of about 1 KB of JSON, under one idempotency key.
fn layer_request(body: &bytes::Bytes) -> http::Request<Body> {
    http::Request::post("/charges")
        .header("content-type", "application/json")
        .header("idempotency-key", "\"order-1\"")
        .body(Body::from(body.clone()))
        .expect("a request")
}

async fn send(router: &axum::Router, body: &bytes::Bytes) {
    let response = router
        .clone()
        .call(layer_request(body))
        .await
        .expect("an answer");
    assert!(response.status().is_success(), "{}", response.status());
    black_box(
        axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("a body"),
    );
}

#[inline(never)]
fn measured_layer(
    runtime: &tokio::runtime::Runtime,
    router: &axum::Router,
    n: u64,
    body: &bytes::Bytes,
) {
    runtime.block_on(async {
        for _ in 0..n {
            send(router, body).await;
        }
    });
}

fn kilobyte_body() -> bytes::Bytes {
    serde_json::to_vec(&benches::kilobyte_request(1))
        .expect("JSON")
        .into()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "hit".to_owned());
    let n: u64 = args.next().and_then(|n| n.parse().ok()).unwrap_or(10_000);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let idem = Idempotency::memory();
    match mode.as_str() {
        "hit" => {
            let requests = vec![request(1); n as usize];
            // Stored once, then replayed `n` times.
            runtime.block_on(idem_charge(&idem, request(1))).unwrap();
            measured_hits(&runtime, &idem, &requests);
        }
        "first" => {
            let requests: Vec<_> = (0..n).map(request).collect();
            measured_hits(&runtime, &idem, &requests);
        }
        "bare" => measured_bare(&runtime, &vec![request(1); n as usize]),
        "fingerprint" => measured_fingerprints(&vec![request(1); n as usize]),
        "key" => measured_keys(&vec![request(1); n as usize]),
        "footprint" => {
            use idem_core::store::{Outcome, Record, Store, Token};
            let store = idem_core::MemoryStore::builder()
                .max_records(2 * n as usize)
                .build();
            let fingerprint = Fingerprint::of(&request(0)).unwrap();
            let before = benches::resident_bytes();
            runtime.block_on(async {
                for i in 0..n {
                    let key = Key::new("footprint", &i).unwrap();
                    let token = Token::random();
                    let lease = std::time::Duration::from_secs(60);
                    store.begin(key, fingerprint, token, lease).await.unwrap();
                    let payload = serde_json::to_vec(&charge(&request(i))).unwrap();
                    let record = Record::new(Outcome::Ok, payload);
                    let ttl = std::time::Duration::from_secs(3_600);
                    store.complete(key, token, record, ttl).await.unwrap();
                }
            });
            let per_record = (benches::resident_bytes() - before) as f64 / n as f64;
            println!("{n} records: {per_record:.0} resident bytes each");
        }
        "ns" => {
            // Not for callgrind: the best of 9 timed batches, to compare the
            // hashing with SHA-256 alone on this CPU (SHA-NI where present).
            use sha2::{Digest as _, Sha256};
            let req = request(1);
            let json = serde_json::to_vec(&req).unwrap();
            let best = |f: &dyn Fn()| {
                (0..9)
                    .map(|_| {
                        let start = std::time::Instant::now();
                        for _ in 0..n {
                            f();
                        }
                        start.elapsed().as_nanos() as f64 / n as f64
                    })
                    .fold(f64::MAX, f64::min)
            };
            let fingerprint = best(&|| {
                black_box(Fingerprint::of(&(black_box(&req),)).unwrap());
            });
            let sha = best(&|| {
                black_box(Sha256::digest(black_box(&json)));
            });
            let key = best(&|| {
                black_box(Key::new("bench.charge", black_box(&req.idempotency_key)).unwrap());
            });
            println!(
                "fingerprint {fingerprint:.0} ns, SHA-256 of the JSON {sha:.0} ns ({:.2}x); key {key:.0} ns",
                fingerprint / sha
            );
            runtime.block_on(idem_charge(&idem, request(1))).unwrap();
            let timed = |hit: bool| {
                (0..9)
                    .map(|_| {
                        let start = std::time::Instant::now();
                        runtime.block_on(async {
                            for _ in 0..n {
                                if hit {
                                    black_box(idem_charge(&idem, request(1)).await.unwrap());
                                } else {
                                    black_box(bare_charge(request(1)).await.unwrap());
                                }
                            }
                        });
                        start.elapsed().as_nanos() as f64 / n as f64
                    })
                    .fold(f64::MAX, f64::min)
            };
            let (bare, hit) = (timed(false), timed(true));
            println!(
                "memory hit {hit:.0} ns, bare call {bare:.0} ns: +{:.0} ns",
                hit - bare
            );
        }
        "layer" | "layer-bare" => {
            let (router, body) = (router(mode == "layer"), kilobyte_body());
            // Stored once, then replayed `n` times.
            runtime.block_on(send(&router, &body));
            measured_layer(&runtime, &router, n, &body);
        }
        "layer-ns" => {
            let body = kilobyte_body();
            let timed = |router: &axum::Router| {
                runtime.block_on(send(router, &body));
                (0..9)
                    .map(|_| {
                        let start = std::time::Instant::now();
                        measured_layer(&runtime, router, n, &body);
                        start.elapsed().as_nanos() as f64 / n as f64
                    })
                    .fold(f64::MAX, f64::min)
            };
            let (bare, replay) = (timed(&router(false)), timed(&router(true)));
            println!(
                "layer replay of 1 KB on memory {replay:.0} ns, bare handler {bare:.0} ns: +{:.0} ns",
                replay - bare
            );
        }
        "sizes" => {
            let call = idem_charge(&idem, request(1));
            println!("the attribute's future: {} bytes", size_of_val(&call));
        }
        other => panic!(
            "unknown mode `{other}`: hit, first, bare, fingerprint, key, layer, layer-bare, layer-ns, ns, footprint or sizes"
        ),
    }
}
