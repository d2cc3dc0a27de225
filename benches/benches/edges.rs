//! The edges around the engine, each against what a user would run without
//! idem, in the same run: the HTTP layer against the same axum handler
//! without it, the JetStream consumer against a bare ack loop on the same
//! stream, and a transactional PostgreSQL call against the same `INSERT`
//! with a hand-written claim and record in its transaction.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer::pull, stream};
use benches::{
    ChargeRequest, Latency, Table, charge, interleaved, kilobyte_request, request, throughput,
};
use futures_util::StreamExt as _;
use idem_core::consumer::Consumer;
use idem_core::consumer::jetstream::JetStream;
use idem_core::http::IdempotencyLayer;
use idem_core::{Idempotency, PostgresStore, RedisStore, idempotent};
use idem_test::nats_server::NatsServer;
use idem_test::redis_server::RedisServer;
use redis::aio::ConnectionManager;
use sqlx::PgConnection;

use super::{ROUNDS, Report, TASKS, WINDOW, ratio, us};

/// The edges' tables: those named among `only` (`transactional`, `http`,
/// `consumer`), or all of them when it names none.
pub(crate) async fn figures(report: &mut Report, only: &[String]) {
    let named = |edge: &str| only.iter().any(|name| name == edge);
    let all = !["transactional", "http", "consumer"].into_iter().any(named);
    if all || named("transactional") {
        transactional_figures(report).await;
    }
    if all || named("http") {
        http_figures(report).await;
    }
    if all || named("consumer") {
        consumer_figures(report).await;
    }
}

/// Serves `router` on a free loopback port; answers its base URL.
async fn serve(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let addr = listener.local_addr().expect("the port");
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}/charges")
}

/// A POST of request `n`'s kilobyte under idempotency key `n`; checks the
/// status.
async fn post_charge(client: &reqwest::Client, url: &str, n: u64, body: &[u8]) {
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .header("idempotency-key", format!("\"order-{n}\""))
        .body(body.to_vec())
        .send()
        .await
        .expect("an answer");
    assert!(response.status().is_success(), "{}", response.status());
    black_box(response.bytes().await.expect("a body"));
}

fn body(n: u64) -> Vec<u8> {
    serde_json::to_vec(&kilobyte_request(n)).expect("JSON")
}

/// The HTTP layer: the same axum handler with and without
/// `IdempotencyLayer`, on memory and on Redis, over loopback with reqwest.
async fn http_figures(report: &mut Report) {
    let redis = RedisServer::start();
    let redis_idem = Idempotency::new(
        RedisStore::node(redis.url())
            .connect()
            .await
            .expect("idem on redis"),
    );
    let raw = ConnectionManager::new(redis::Client::open(redis.url().as_str()).unwrap())
        .await
        .expect("a raw connection");
    let routes = benches::charges_router;
    let bare: &'static str = serve(routes()).await.leak();
    let memory: &'static str =
        serve(routes().layer(IdempotencyLayer::unscoped(Idempotency::memory())))
            .await
            .leak();
    let on_redis: &'static str = serve(routes().layer(IdempotencyLayer::unscoped(redis_idem)))
        .await
        .leak();
    let client: &'static reqwest::Client = Box::leak(Box::new(reqwest::Client::new()));
    let hit: &'static [u8] = body(1).leak();
    let value = serde_json::to_vec(&charge(&kilobyte_request(1))).unwrap();
    benches::set_floor(&raw, &value).await;
    for url in [memory, on_redis] {
        post_charge(client, url, 1, hit).await;
    }

    let post = |url: &'static str, fresh: Option<u64>| -> benches::Op {
        Box::new(move |i| {
            Box::pin(async move {
                match fresh {
                    Some(base) => post_charge(client, url, base + i, &body(base + i)).await,
                    None => post_charge(client, url, 1, hit).await,
                }
            })
        })
    };
    let ops: Vec<(&str, benches::Op)> = vec![
        ("GET", benches::floor_op(raw.clone())),
        ("bare replay-sized", post(bare, None)),
        ("memory replay", post(memory, None)),
        ("memory first", post(memory, Some(10_000_000))),
        ("redis replay", post(on_redis, None)),
        ("redis first", post(on_redis, Some(20_000_000))),
        ("bare fresh", post(bare, Some(30_000_000))),
    ];
    let measured = interleaved(&ops, ROUNDS, 2_000 / ROUNDS).await;
    let [
        get,
        bare_hit,
        memory_hit,
        memory_first,
        redis_hit,
        redis_first,
        bare_fresh,
    ] = measured[..]
    else {
        unreachable!("one latency per operation")
    };
    let mut table = Table::new(&[
        "request, 1 KB body",
        "p50 µs",
        "p99 µs",
        "added p50 µs",
        "target (added)",
        "status",
    ]);
    // A measured row, and with a floor the p50 it adds and, with a limit
    // on that, the target and whether it is met.
    let mut row =
        |name: &str, latency: Latency, floor: Option<Latency>, limit: Option<(String, f64)>| {
            let added = floor.map(|f| latency.p50 - f.p50);
            let (target, status) = match (added, limit) {
                (Some(added), Some((target, limit))) => (
                    target,
                    if added <= limit { "met" } else { "**missed**" }.to_owned(),
                ),
                _ => (String::new(), String::new()),
            };
            table.row(
                &[
                    [name.to_owned()].as_slice(),
                    &us(latency),
                    &[
                        added.map_or(String::new(), |a| format!("{a:+.1}")),
                        target,
                        status,
                    ],
                ]
                .concat(),
            );
        };
    row("raw Redis `GET` (one round trip)", get, None, None);
    row("axum handler, no layer (floor)", bare_hit, None, None);
    row(
        "memory, replay",
        memory_hit,
        Some(bare_hit),
        Some(("≤ 5 µs".to_owned(), 5.0)),
    );
    row(
        "axum handler, no layer, fresh bodies (floor)",
        bare_fresh,
        None,
        None,
    );
    row(
        "memory, first request",
        memory_first,
        Some(bare_fresh),
        None,
    );
    row(
        "Redis, replay",
        redis_hit,
        Some(bare_hit),
        Some((
            format!("≤ 1 round trip + 30 = {:.1} µs", get.p50 + 30.0),
            get.p50 + 30.0,
        )),
    );
    row(
        "Redis, first request",
        redis_first,
        Some(bare_fresh),
        Some((
            format!("≤ 2 round trips + 50 = {:.1} µs", 2.0 * get.p50 + 50.0),
            2.0 * get.p50 + 50.0,
        )),
    );
    report.section(
        "HTTP layer, 1 connection: the same axum handler with and without `IdempotencyLayer`",
        &table,
        "reqwest over loopback (HTTP/1.1, one kept-alive connection per server), 8 interleaved rounds. A replay is measured against the handler without the layer on the same body; a first request against the handler without the layer on fresh bodies (each first request serializes its own body).",
    );

    let mut table = Table::new(&["64 connections", "requests/s", "÷ no layer"]);
    let floor = throughput(TASKS, WINDOW, move |_| post_charge(client, bare, 1, hit)).await;
    let rows = [
        ("axum handler, no layer (floor)", floor),
        (
            "memory, replay",
            throughput(TASKS, WINDOW, move |_| post_charge(client, memory, 1, hit)).await,
        ),
        (
            "Redis, replay",
            throughput(TASKS, WINDOW, move |_| {
                post_charge(client, on_redis, 1, hit)
            })
            .await,
        ),
        (
            "Redis, first request",
            throughput(TASKS, WINDOW, move |i| async move {
                post_charge(client, on_redis, 40_000_000 + i, &body(40_000_000 + i)).await;
            })
            .await,
        ),
    ];
    for (name, rate) in rows {
        table.row(&[name.to_owned(), format!("{rate:.0}"), ratio(rate, floor)]);
    }
    report.section(
        "HTTP layer, 64 connections: throughput",
        &table,
        "64 tasks on one reqwest client (one connection each), 2 s per row; the server and the client share the machine's two cores.",
    );
}

/// The error of the transactional bench call.
#[derive(Debug)]
pub(crate) enum TxError {
    Idem(idem_core::Error),
    Db(sqlx::Error),
}

impl From<idem_core::Error> for TxError {
    fn from(error: idem_core::Error) -> Self {
        Self::Idem(error)
    }
}

impl From<sqlx::Error> for TxError {
    fn from(error: sqlx::Error) -> Self {
        Self::Db(error)
    }
}

impl std::fmt::Display for TxError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Idem(error) => error.fmt(f),
            Self::Db(error) => error.fmt(f),
        }
    }
}

/// The charge row and idem's record in one transaction.
#[idempotent(key = order, store = pg, transaction = tx, skip(pg), name = "bench.tx_charge")]
async fn idem_tx_charge(
    pg: &PostgresStore,
    tx: &mut PgConnection,
    order: String,
    cents: i64,
) -> Result<i64, TxError> {
    Ok(
        sqlx::query_scalar("INSERT INTO tx_charges (order_id, cents) VALUES ($1, $2) RETURNING id")
            .bind(&order)
            .bind(cents)
            .fetch_one(&mut *tx)
            .await?,
    )
}

/// The same, hand-written: claim the key with `INSERT … ON CONFLICT DO
/// NOTHING`, run the `INSERT`, record the response, commit; a key already
/// there answers its recorded response.
async fn manual_tx_charge(pool: &sqlx::PgPool, order: String, cents: i64) -> Result<i64, TxError> {
    let mut tx = pool.begin().await?;
    let claimed = sqlx::query(
        "INSERT INTO manual_tx_keys (key, created_at) VALUES ($1, now()) ON CONFLICT DO NOTHING",
    )
    .bind(&order)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if !claimed {
        let id: Option<i64> =
            sqlx::query_scalar("SELECT response FROM manual_tx_keys WHERE key = $1")
                .bind(&order)
                .fetch_one(&mut *tx)
                .await?;
        tx.rollback().await?;
        return Ok(id.unwrap_or_default());
    }
    let id: i64 =
        sqlx::query_scalar("INSERT INTO tx_charges (order_id, cents) VALUES ($1, $2) RETURNING id")
            .bind(&order)
            .bind(cents)
            .fetch_one(&mut *tx)
            .await?;
    sqlx::query("UPDATE manual_tx_keys SET response = $2 WHERE key = $1")
        .bind(&order)
        .bind(id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(id)
}

/// A transactional call against the same `INSERT` with a hand-written
/// claim and record (Brandur Leach's pattern), and against the `INSERT`
/// alone.
async fn transactional_figures(report: &mut Report) {
    let (_server, store, pool) = super::postgres_store().await;
    let pg: &'static PostgresStore = Box::leak(Box::new(store));
    for table in [
        "CREATE TABLE tx_charges (id bigserial PRIMARY KEY, order_id text NOT NULL, cents bigint NOT NULL)",
        "CREATE TABLE manual_tx_keys (key text PRIMARY KEY, created_at timestamptz NOT NULL, response bigint)",
    ] {
        sqlx::query(table).execute(pool).await.expect("a table");
    }
    let order = |n: u64| format!("order-{n}");
    idem_tx_charge(pg, order(1), 100)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    manual_tx_charge(pool, order(1), 100)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let ops: Vec<(&str, benches::Op)> = vec![
        (
            "INSERT",
            Box::new(move |i| {
                Box::pin(async move {
                    let id: i64 = sqlx::query_scalar(
                        "INSERT INTO tx_charges (order_id, cents) VALUES ($1, $2) RETURNING id",
                    )
                    .bind(order(i))
                    .bind(100_i64)
                    .fetch_one(pool)
                    .await
                    .unwrap();
                    black_box(id);
                })
            }),
        ),
        (
            "idem first",
            Box::new(move |i| {
                Box::pin(async move {
                    let id = idem_tx_charge(pg, order(1_000_000 + i), 100).await;
                    black_box(id.unwrap_or_else(|e| panic!("{e}")));
                })
            }),
        ),
        (
            "manual first",
            Box::new(move |i| {
                Box::pin(async move {
                    let id = manual_tx_charge(pool, order(2_000_000 + i), 100).await;
                    black_box(id.unwrap_or_else(|e| panic!("{e}")));
                })
            }),
        ),
        (
            "idem replay",
            Box::new(move |_| {
                Box::pin(async move {
                    let id = idem_tx_charge(pg, order(1), 100).await;
                    black_box(id.unwrap_or_else(|e| panic!("{e}")));
                })
            }),
        ),
        (
            "manual replay",
            Box::new(move |_| {
                Box::pin(async move {
                    let id = manual_tx_charge(pool, order(1), 100).await;
                    black_box(id.unwrap_or_else(|e| panic!("{e}")));
                })
            }),
        ),
    ];
    let measured = interleaved(&ops, ROUNDS, 2_000 / ROUNDS).await;
    let [insert, idem_first, manual_first, idem_replay, manual_replay] = measured[..] else {
        unreachable!("one latency per operation")
    };
    let mut table = Table::new(&[
        "call",
        "p50 µs",
        "p99 µs",
        "÷ `INSERT` alone",
        "idem ÷ hand-written",
        "target",
    ]);
    let first_met = idem_first.p50 <= 1.1 * manual_first.p50;
    for (name, latency, versus, target) in [
        (
            "the `INSERT` alone, autocommit (floor)",
            insert,
            None,
            String::new(),
        ),
        (
            "idem, transactional, first run",
            idem_first,
            Some(manual_first),
            format!("≤ 1.10×: {}", if first_met { "met" } else { "**missed**" }),
        ),
        (
            "hand-written claim, `INSERT`, record, commit",
            manual_first,
            None,
            String::new(),
        ),
        (
            "idem, transactional, replay",
            idem_replay,
            Some(manual_replay),
            String::new(),
        ),
        (
            "hand-written replay (claim refused, read, rollback)",
            manual_replay,
            None,
            String::new(),
        ),
    ] {
        table.row(
            &[
                [name.to_owned()].as_slice(),
                &us(latency),
                &[
                    ratio(latency.p50, insert.p50),
                    versus.map_or(String::new(), |v| ratio(latency.p50, v.p50)),
                    target,
                ],
            ]
            .concat(),
        );
    }
    report.section(
        "Transactional PostgreSQL, 1 task: the body's `INSERT` with idem's record in its transaction",
        &table,
        "idem's first run: `BEGIN` with the key's advisory lock and the idle limit, the claim, the body's `INSERT`, the record, `COMMIT`: five round trips, as many as the hand-written sequence (`BEGIN`, the claim as `INSERT … ON CONFLICT DO NOTHING`, the `INSERT`, the record, `COMMIT`), which has no lock for waiting duplicates, no lease and no argument check. A replay is two round trips for idem (its transaction, which wrote nothing, is rolled back as the connection goes back to the pool), four for the hand-written one.",
    );
}

const MESSAGES: u64 = 10_000;

/// Publishes `MESSAGES` messages with distinct `Nats-Msg-Id`s to `subject`.
async fn publish(context: &jetstream::Context, subject: &str, round: u64) {
    let mut acks = Vec::new();
    for n in 0..MESSAGES {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("r{round}-m{n}").as_str());
        acks.push(
            context
                .publish_with_headers(subject.to_owned(), headers, charge_payload(n))
                .await
                .expect("published"),
        );
        if acks.len() == 256 {
            for ack in acks.drain(..) {
                ack.await.expect("stored");
            }
        }
    }
    for ack in acks {
        ack.await.expect("stored");
    }
}

fn charge_payload(n: u64) -> bytes::Bytes {
    serde_json::to_vec(&request(n)).expect("JSON").into()
}

async fn durable(stream: &stream::Stream, name: &str) -> jetstream::consumer::PullConsumer {
    stream
        .create_consumer(pull::Config {
            durable_name: Some(name.to_owned()),
            ack_wait: Duration::from_secs(30),
            ..Default::default()
        })
        .await
        .expect("a pull consumer")
}

/// Messages per second of a bare loop that acknowledges every message
/// (`double` waits for the server's confirmation, as idem does).
async fn bare_loop(pull: jetstream::consumer::PullConsumer, double: bool) -> f64 {
    let start = Instant::now();
    let done = AtomicU64::new(0);
    let messages = pull.messages().await.expect("messages");
    messages
        .take(MESSAGES as usize)
        .for_each_concurrent(Consumer::DEFAULT_CONCURRENCY, |message| {
            let done = &done;
            async move {
                let message = message.expect("a message");
                let req: ChargeRequest = serde_json::from_slice(&message.payload).expect("JSON");
                black_box(charge(&req));
                if double {
                    message.double_ack().await.expect("acknowledged");
                } else {
                    message.ack().await.expect("acknowledged");
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        })
        .await;
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// Messages per second through `JetStream::consume` with idem on `idem`.
async fn idem_loop(
    context: &jetstream::Context,
    pull: jetstream::consumer::PullConsumer,
    idem: Idempotency,
    name: &str,
) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let all = Arc::new(tokio::sync::Notify::new());
    let consumer = Consumer::new(idem, name.to_owned());
    let js = JetStream::new(context.clone());
    let start = Instant::now();
    let handler = {
        let (done, all) = (done.clone(), all.clone());
        move |delivery: idem_core::consumer::Delivery| {
            let (done, all) = (done.clone(), all.clone());
            async move {
                let req: ChargeRequest = serde_json::from_slice(delivery.payload())
                    .map_err(|error| error.to_string())?;
                let receipt = charge(&req);
                if done.fetch_add(1, Ordering::Relaxed) + 1 == MESSAGES {
                    all.notify_one();
                }
                Ok::<_, String>(receipt)
            }
        }
    };
    let consuming = tokio::spawn(async move {
        let error = js.consume(&consumer, &pull, handler).await;
        panic!("the consumer stopped: {error:?}");
    });
    all.notified().await;
    let rate = MESSAGES as f64 / start.elapsed().as_secs_f64();
    consuming.abort();
    rate
}

/// `JetStream::consume` with a Redis store against a bare ack loop on the
/// same stream.
async fn consumer_figures(report: &mut Report) {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let idem = Idempotency::new(
        RedisStore::node(redis.url())
            .connect()
            .await
            .expect("idem on redis"),
    );
    let client = async_nats::connect(nats.url()).await.expect("NATS");
    let context = jetstream::new(client);
    let stream = context
        .create_stream(stream::Config {
            name: "BENCH".to_owned(),
            subjects: vec!["bench.charges".to_owned()],
            ..Default::default()
        })
        .await
        .expect("a stream");
    // Each loop's rate, and the CPU the client process, nats-server and
    // redis-server spent per message while it ran: the machine's two cores
    // are shared by all three.
    let nats_pid = nats.pid().to_string();
    let cpu = || {
        [
            benches::cpu_time("self"),
            benches::cpu_time(&nats_pid),
            benches::redis_cpu(&redis),
        ]
    };
    let per_message = |before: [Duration; 3], after: [Duration; 3]| {
        [0, 1, 2].map(|i| (after[i] - before[i]).as_secs_f64() * 1e6 / MESSAGES as f64)
    };
    let (mut acks, mut double_acks, mut idems) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..3 {
        stream.purge().await.expect("purged");
        publish(&context, "bench.charges", round).await;
        let pull = durable(&stream, &format!("bare-{round}")).await;
        let before = cpu();
        let rate = bare_loop(pull, false).await;
        acks.push((rate, per_message(before, cpu())));
        let pull = durable(&stream, &format!("double-{round}")).await;
        let before = cpu();
        let rate = bare_loop(pull, true).await;
        double_acks.push((rate, per_message(before, cpu())));
        let name = format!("idem-{round}");
        let pull = durable(&stream, &name).await;
        let before = cpu();
        let rate = idem_loop(&context, pull, idem.clone(), &name).await;
        idems.push((rate, per_message(before, cpu())));
    }
    // The median round by rate, with its CPU.
    let median = |mut rounds: Vec<(f64, [f64; 3])>| {
        rounds.sort_by(|a, b| a.0.total_cmp(&b.0));
        rounds[rounds.len() / 2]
    };
    let (ack, double_ack, with_idem) = (median(acks), median(double_acks), median(idems));
    let mut table = Table::new(&[
        "consuming 10 000 messages, 16 at a time",
        "messages/s",
        "÷ bare `ack` loop",
        "client CPU µs per message",
        "nats-server CPU µs",
        "redis-server CPU µs",
        "target",
    ]);
    // A loop's row: its rate, the ratio to the bare `ack` loop, the CPU
    // per message of each process, and the target when it has one.
    let row = |name: &str, (rate, cpu): (f64, [f64; 3]), target: String| {
        let mut cells = vec![name.to_owned(), format!("{rate:.0}"), ratio(rate, ack.0)];
        cells.extend(cpu.map(|us| format!("{us:.1}")));
        cells.push(target);
        cells
    };
    table.row(&row("bare loop, `ack` (floor)", ack, String::new()));
    table.row(&row("bare loop, `double_ack`", double_ack, String::new()));
    let met = with_idem.0 >= 0.5 * ack.0;
    table.row(&row(
        "`JetStream::consume`, Redis store",
        with_idem,
        format!("≥ 0.50×: {}", if met { "met" } else { "**missed**" }),
    ));
    report.section(
        "JetStream consumer: messages per second against a bare ack loop",
        &table,
        "One stream on a private `nats-server -js`, 10 000 messages of 235 bytes with distinct `Nats-Msg-Id`s; every loop decodes the request and computes the receipt. Median of 3 rounds, each with fresh durable pull consumers; the CPU columns are the median round's, per message, of this process (the client), `nats-server` and `redis-server` (USER_HZ ticks, ±1 µs). idem claims each message's id in Redis, runs the handler, records its result and, once Redis confirmed the record, acknowledges with a plain `ack`; `double_ack` (waiting for the server's confirmation of each ack) is shown for comparison.",
    );
}
