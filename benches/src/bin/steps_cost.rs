//! What a journaled step costs on Redis, in round trips: first runs of
//! the same call with and without one step, in interleaved rounds against
//! a raw `GET`, so that the difference between two rows, divided by the
//! `GET`, is the round trips the step adds.
//!
//! ```sh
//! cargo run --release -p benches --bin steps_cost [ROUNDS]
//! ```
//!
//! Rows, each a first run on a key of its own:
//!
//! - `GET` — the floor, one round trip;
//! - no step — the claim and the recording of the result (two round trips);
//! - one step, journal read with the claim — the call's settings expect
//!   steps (as the attribute's do for a body that calls `step`): the claim
//!   and the journal's read go as one pipeline, then the step's append;
//! - one step, journal read at the step — settings that do not expect
//!   steps: the first step reads the journal, then appends.

use std::hint::black_box;

use benches::{Op, interleaved};
use idem_core::{Fingerprint, Idempotency, Key, RedisStore, Settings, step};
use idem_test::redis_server::RedisServer;
use redis::aio::ConnectionManager;

fn main() {
    let rounds: u64 = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(8);
    let server = RedisServer::start();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let rows = runtime.block_on(measure(&server, rounds));
    println!("\ncurrent_thread runtime, {rounds} rounds of 500 first runs each:\n");
    println!("| row | p50 µs | p99 µs | p50 ÷ GET | over no step, in GETs |");
    println!("|---|---|---|---|---|");
    let (floor, plain) = (rows[0].1.p50, rows[1].1.p50);
    for (name, latency) in rows {
        println!(
            "| {name} | {:.1} | {:.1} | {:.2}× | {:+.2} |",
            latency.p50,
            latency.p99,
            latency.p50 / floor,
            (latency.p50 - plain) / floor
        );
    }
}

/// A first run on key `n` of `name`: with `steps` one journaled step.
fn first_run(
    idem: &'static Idempotency,
    name: &'static str,
    settings: Settings,
    steps: bool,
) -> Op {
    Box::new(move |n| {
        Box::pin(async move {
            let key = Key::new(name, &n).expect("a key");
            let fingerprint = Fingerprint::of(&n).expect("a fingerprint");
            let done: Result<u64, idem_core::Error> = idem
                .run(&settings, key, fingerprint, async move {
                    if steps {
                        step("charge", async move { Ok::<_, idem_core::Error>(n) }).await
                    } else {
                        Ok(n)
                    }
                })
                .await;
            black_box(done.expect("a first run"));
        })
    })
}

async fn measure(server: &RedisServer, rounds: u64) -> Vec<(&'static str, benches::Latency)> {
    let url = server.url();
    let store = RedisStore::node(&url).connect().await.expect("a store");
    let idem: &'static Idempotency = Box::leak(Box::new(Idempotency::new(store)));
    let conn = ConnectionManager::new(redis::Client::open(url.as_str()).expect("a client"))
        .await
        .expect("a raw connection");
    benches::set_floor(&conn, &[b'r'; 109]).await;
    let plain = Settings::default();
    let expecting = Settings::builder()
        .expect_steps(true)
        .build()
        .expect("valid settings");
    let ops: Vec<(&str, Op)> = vec![
        ("`GET` (floor)", benches::floor_op(conn)),
        ("no step", first_run(idem, "steps.none", plain, false)),
        (
            "one step, journal read with the claim",
            first_run(idem, "steps.expected", expecting, true),
        ),
        (
            "one step, journal read at the step",
            first_run(idem, "steps.lazy", plain, true),
        ),
    ];
    let latencies = interleaved(&ops, rounds, 500).await;
    ops.iter().map(|(name, _)| *name).zip(latencies).collect()
}
