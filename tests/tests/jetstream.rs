//! The consumer on a real `nats-server` with JetStream (started by the
//! harness on a free port): duplicates, redelivery while a handler runs,
//! dead letters, a consumer process killed with `kill -9` mid-batch, two
//! consumer processes on one durable consumer with a Redis store, and what
//! must not stop consumption: panics, multi-line errors, dead letters that
//! cannot be published, a broker outage, a recreated stream.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer::PullConsumer, consumer::pull, stream};
use futures_util::StreamExt as _;
use idem_core::Idempotency;
use idem_core::consumer::jetstream::{ConsumeError, JetStream, MessageKey};
use idem_core::consumer::{Consumer, Delivery, Message as _};
use idem_test::nats_server::NatsServer;
use idem_test::redis_server::RedisServer;
use tokio::time::Instant;

async fn context(server: &NatsServer) -> jetstream::Context {
    jetstream::new(async_nats::connect(server.url()).await.unwrap())
}

/// The `ORDERS` stream on `orders.>`.
async fn orders_stream(context: &jetstream::Context) -> stream::Stream {
    context
        .create_stream(stream::Config {
            name: "ORDERS".into(),
            subjects: vec!["orders.>".into()],
            ..Default::default()
        })
        .await
        .unwrap()
}

/// The `ORDERS` stream on `orders.>`, and a durable pull consumer on it.
async fn orders(context: &jetstream::Context, ack_wait: Duration) -> PullConsumer {
    orders_stream(context)
        .await
        .create_consumer(pull::Config {
            durable_name: Some("billing".into()),
            ack_wait,
            ..Default::default()
        })
        .await
        .unwrap()
}

/// Publishes one message per id, keyed by its `Event-Id` header (not
/// `Nats-Msg-Id`, so the stream's own deduplication does not hide the
/// duplicates), and waits for the stream to store them all.
async fn publish(context: &jetstream::Context, ids: &[u64]) {
    for chunk in ids.chunks(500) {
        let mut acks = Vec::with_capacity(chunk.len());
        for id in chunk {
            let mut headers = HeaderMap::new();
            headers.insert("Event-Id", id.to_string().as_str());
            let payload = format!("order {id}").into();
            acks.push(
                context
                    .publish_with_headers("orders.new", headers, payload)
                    .await
                    .unwrap(),
            );
        }
        for ack in acks {
            ack.await.unwrap();
        }
    }
}

/// `distinct` ids and `duplicates` more messages repeating some of them, as
/// a publisher that retries sends them: each duplicate after its original.
fn with_duplicates(distinct: u64, duplicates: u64) -> Vec<u64> {
    let mut ids: Vec<u64> = (0..distinct).collect();
    for n in 0..duplicates {
        let original = (n * 7919) % distinct;
        let at = ids.iter().position(|id| *id == original).unwrap() + 1 + (n as usize % 5);
        ids.insert(at.min(ids.len()), original);
    }
    ids
}

/// Waits until the durable consumer has nothing pending or unacknowledged.
async fn drained(pull: &mut PullConsumer, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        // An error (the server restarting) is "not yet".
        let state = match pull.info().await {
            Ok(info) if info.num_pending == 0 && info.num_ack_pending == 0 => return,
            Ok(info) => format!(
                "{} pending, {} unacknowledged",
                info.num_pending, info.num_ack_pending
            ),
            Err(error) => error.to_string(),
        };
        assert!(
            Instant::now() < deadline,
            "not drained within {within:?}: {state}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[derive(Default)]
struct Effects(Mutex<HashMap<String, u32>>);

impl Effects {
    fn apply(&self, delivery: &Delivery) {
        *self
            .0
            .lock()
            .unwrap()
            .entry(delivery.id().to_owned())
            .or_default() += 1;
    }

    fn runs(&self) -> HashMap<String, u32> {
        self.0.lock().unwrap().clone()
    }
}

#[test]
fn the_kits_server_names_its_process_and_a_restart_changes_it() {
    let mut server = NatsServer::start();
    let command = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    let first = server.pid();
    assert_eq!(command(first).trim(), "nats-server");
    server.restart();
    assert_ne!(server.pid(), first);
    assert_eq!(command(server.pid()).trim(), "nats-server");
}

/// A server that logs more than a pipe holds goes on serving: the kit
/// reads its log once it started. A connection that sends garbage is told
/// so, logged (a line of ≈150 bytes) and closed; a server blocked on a full
/// pipe would leave the 1 000th open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kits_server_keeps_serving_after_logging_a_lot() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let server = NatsServer::start();
    for n in 0..1_000 {
        let mut garbage = tokio::net::TcpStream::connect(("127.0.0.1", server.port()))
            .await
            .unwrap();
        garbage
            .write_all(b"GARBAGE garbage garbage\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), garbage.read_to_end(&mut answer))
            .await
            .unwrap_or_else(|_| panic!("connection {n} was not closed"))
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_messages_with_duplicates_have_one_effect_each() {
    let server = NatsServer::start();
    let context = context(&server).await;
    let mut pull = orders(&context, Duration::from_secs(30)).await;
    let ids = with_duplicates(8_000, 2_000);
    assert_eq!(ids.len(), 10_000);
    publish(&context, &ids).await;

    let consumer = Consumer::new(Idempotency::memory(), "billing").concurrency(64);
    let effects = Arc::new(Effects::default());
    let js = JetStream::new(context.clone()).key(MessageKey::Header("Event-Id".into()));
    let running = {
        let (consumer, pull, effects) = (consumer.clone(), pull.clone(), effects.clone());
        tokio::spawn(async move {
            js.consume(&consumer, &pull, |delivery| {
                let effects = effects.clone();
                async move {
                    effects.apply(&delivery);
                    Ok::<_, String>(())
                }
            })
            .await
        })
    };
    drained(&mut pull, Duration::from_secs(120)).await;
    running.abort();

    let runs = effects.runs();
    assert_eq!(runs.len(), 8_000);
    assert!(runs.values().all(|&n| n == 1), "a side effect ran twice");
    let stats = consumer.stats();
    println!("{stats:?}");
    assert_eq!(
        (stats.delivered, stats.ran, stats.replayed),
        (10_000, 8_000, 2_000)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_while_the_handler_runs_waits_and_runs_nothing() {
    let server = NatsServer::start();
    let context = context(&server).await;
    let mut pull = orders(&context, Duration::from_secs(1)).await;
    publish(&context, &[1]).await;

    // No heartbeat: the ack deadline (1 s) passes while the handler runs (2.5 s).
    let consumer = Consumer::new(Idempotency::memory(), "billing").heartbeat(None);
    let effects = Arc::new(Effects::default());
    let running = {
        let (consumer, pull, effects) = (consumer.clone(), pull.clone(), effects.clone());
        let js = JetStream::new(context.clone()).key(MessageKey::Header("Event-Id".into()));
        tokio::spawn(async move {
            js.consume(&consumer, &pull, |delivery| {
                let effects = effects.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(2_500)).await;
                    effects.apply(&delivery);
                    Ok::<_, String>(())
                }
            })
            .await
        })
    };
    drained(&mut pull, Duration::from_secs(20)).await;
    running.abort();

    let stats = consumer.stats();
    println!("{stats:?}");
    assert_eq!(effects.runs()["1"], 1, "one execution");
    assert!(
        stats.delivered >= 2,
        "the message was redelivered while it ran: {stats:?}"
    );
    assert_eq!(stats.ran, 1);
    assert_eq!(stats.replayed, stats.delivered - 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_keep_a_slow_handlers_message_from_redelivery() {
    let server = NatsServer::start();
    let context = context(&server).await;
    let mut pull = orders(&context, Duration::from_secs(1)).await;
    publish(&context, &[1]).await;

    let consumer =
        Consumer::new(Idempotency::memory(), "billing").heartbeat(Some(Duration::from_millis(300)));
    let running = {
        let (consumer, pull) = (consumer.clone(), pull.clone());
        let js = JetStream::new(context.clone()).key(MessageKey::Header("Event-Id".into()));
        tokio::spawn(async move {
            js.consume(&consumer, &pull, |_| async {
                tokio::time::sleep(Duration::from_millis(2_500)).await;
                Ok::<_, String>(())
            })
            .await
        })
    };
    drained(&mut pull, Duration::from_secs(20)).await;
    running.abort();
    let stats = consumer.stats();
    assert_eq!((stats.delivered, stats.ran), (1, 1), "{stats:?}");
}

/// Messages waiting for a slot are not pulled ahead of it: with one slot,
/// an ack wait of 1 s and handlers of 150 ms, 30 messages (4.5 s of work)
/// are each delivered once, in the stream's order. Pulled 200 at a time,
/// those behind the first few sat in the client past their ack wait and
/// came again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_pulled_no_further_ahead_than_the_slots() {
    let server = NatsServer::start();
    let context = context(&server).await;
    let mut pull = orders(&context, Duration::from_secs(1)).await;
    let ids: Vec<u64> = (0..30).collect();
    publish(&context, &ids).await;

    let consumer = Consumer::new(Idempotency::memory(), "billing").concurrency(1);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let running = {
        let (consumer, pull, seen) = (consumer.clone(), pull.clone(), seen.clone());
        let js = JetStream::new(context.clone()).key(MessageKey::Header("Event-Id".into()));
        tokio::spawn(async move {
            js.consume(&consumer, &pull, |delivery| {
                let seen = seen.clone();
                async move {
                    seen.lock()
                        .unwrap()
                        .push((delivery.id().to_owned(), delivery.delivery_count()));
                    tokio::time::sleep(Duration::from_millis(150)).await;
                    Ok::<_, String>(())
                }
            })
            .await
        })
    };
    drained(&mut pull, Duration::from_secs(30)).await;
    running.abort();
    let seen = seen.lock().unwrap().clone();
    let expected: Vec<(String, u32)> = ids.iter().map(|id| (id.to_string(), 1)).collect();
    assert_eq!(
        seen, expected,
        "each message once, in order, on its first delivery"
    );
    assert_eq!(consumer.stats().delivered, 30, "{:?}", consumer.stats());
}

/// `consume_until` stops cleanly: once its shutdown completes it takes no
/// new message, lets the handlers under way finish, acknowledges their
/// messages and returns `Ok`; what it did not start runs once on the next
/// `consume`, and nothing runs twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_until_finishes_the_handlers_under_way_and_stops() {
    let server = NatsServer::start();
    let context = context(&server).await;
    let mut pull = orders(&context, Duration::from_secs(30)).await;
    let ids: Vec<u64> = (0..8).collect();
    publish(&context, &ids).await;

    let idem = Idempotency::memory();
    let consumer = Consumer::new(idem, "billing").concurrency(2);
    let js = JetStream::new(context.clone()).key(MessageKey::Header("Event-Id".into()));
    let effects = Arc::new(Effects::default());
    let under_way = Arc::new(tokio::sync::Semaphore::new(0));
    let handler = {
        let (effects, under_way) = (effects.clone(), under_way.clone());
        move |delivery: Delivery| {
            let (effects, under_way) = (effects.clone(), under_way.clone());
            async move {
                under_way.add_permits(1);
                tokio::time::sleep(Duration::from_millis(800)).await;
                effects.apply(&delivery);
                Ok::<_, String>(())
            }
        }
    };
    // Stops once both slots' handlers are under way.
    let (stop, stopping) = tokio::sync::oneshot::channel::<()>();
    let stopper = tokio::spawn(async move {
        let _both = under_way.acquire_many(2).await.unwrap();
        let _ = stop.send(());
        Instant::now()
    });
    js.consume_until(
        &consumer,
        &pull,
        async {
            let _ = stopping.await;
        },
        handler.clone(),
    )
    .await
    .expect("a clean stop");
    let stopped_at = stopper.await.unwrap();
    assert!(
        stopped_at.elapsed() >= Duration::from_millis(500),
        "it waited for the handlers under way"
    );
    let finished = effects.runs();
    assert_eq!(
        finished.len(),
        2,
        "the two under way finished: {finished:?}"
    );
    // Their acks were sent (not awaited): the server counts them shortly.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let info = pull.info().await.unwrap();
        let left = info.num_ack_pending + info.num_pending as usize;
        if left == 6 {
            break;
        }
        assert!(Instant::now() < deadline, "{info:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The next consume runs the rest, once each, the first two not again
    // (the six pulled but not started come back after their ack wait: a
    // short one here).
    let mut pull = context
        .get_stream("ORDERS")
        .await
        .unwrap()
        .create_consumer(pull::Config {
            durable_name: Some("billing".into()),
            ack_wait: Duration::from_secs(1),
            ..Default::default()
        })
        .await
        .unwrap();
    let running = {
        let (consumer, pull) = (consumer.clone(), pull.clone());
        tokio::spawn(async move { js.consume(&consumer, &pull, handler).await })
    };
    drained(&mut pull, Duration::from_secs(30)).await;
    running.abort();
    let runs = effects.runs();
    assert_eq!(runs.len(), 8, "{runs:?}");
    assert!(runs.values().all(|&n| n == 1), "{runs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_messages_are_redelivered_then_dead_lettered() {
    let server = NatsServer::start();
    let context = context(&server).await;
    let mut pull = orders(&context, Duration::from_secs(30)).await;
    let dead = context
        .create_stream(stream::Config {
            name: "DEAD".into(),
            subjects: vec!["dead.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    publish(&context, &[1, 2]).await;
    context
        .publish("orders.new", "no id".into())
        .await
        .unwrap()
        .await
        .unwrap();

    let consumer = Consumer::new(Idempotency::memory(), "billing")
        .max_deliveries(3)
        .backoff(Duration::from_millis(50), Duration::from_millis(200));
    let effects = Arc::new(Effects::default());
    let running = {
        let (consumer, pull, effects) = (consumer.clone(), pull.clone(), effects.clone());
        let js = JetStream::new(context.clone())
            .key(MessageKey::Header("Event-Id".into()))
            .dead_letter("dead.orders");
        tokio::spawn(async move {
            js.consume(&consumer, &pull, |delivery| {
                let effects = effects.clone();
                async move {
                    effects.apply(&delivery);
                    if delivery.id() == "2" {
                        Err("card declined by the bank")
                    } else {
                        Ok(())
                    }
                }
            })
            .await
        })
    };
    drained(&mut pull, Duration::from_secs(20)).await;
    running.abort();

    assert_eq!(effects.runs()["1"], 1);
    assert_eq!(
        effects.runs()["2"],
        3,
        "errors are retried up to max_deliveries"
    );
    let stats = consumer.stats();
    assert_eq!(
        (stats.failed, stats.naked, stats.dead_lettered),
        (3, 2, 2),
        "{stats:?}"
    );

    let mut letters = dead
        .create_consumer(pull::Config::default())
        .await
        .unwrap()
        .fetch()
        .max_messages(10)
        .expires(Duration::from_secs(1))
        .messages()
        .await
        .unwrap();
    let mut reasons = Vec::new();
    while let Some(letter) = letters.next().await {
        let letter = letter.unwrap();
        let headers = letter.headers.clone().unwrap();
        assert_eq!(
            headers.get("Idem-Original-Subject").unwrap().as_str(),
            "orders.new"
        );
        reasons.push(
            headers
                .get("Idem-Dead-Letter-Reason")
                .unwrap()
                .as_str()
                .to_owned(),
        );
    }
    reasons.sort();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons[0].contains("card declined") && reasons[0].contains("delivery 3"),
        "{reasons:?}"
    );
    assert!(reasons[1].contains("no `Event-Id` header"), "{reasons:?}");
}

/// A consumer process (`idem-nats-consumer`) whose stdout lines are kept.
struct Process {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Process {
    fn start(
        nats: &NatsServer,
        redis: &RedisServer,
        effects: &Path,
        freeze_after: Option<u64>,
    ) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_idem-nats-consumer"));
        command
            .args([&nats.url(), "ORDERS", "billing", &redis.url()])
            .arg(effects)
            .args(freeze_after.map(|n| n.to_string()))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = command.spawn().unwrap();
        idem_test::process::watch(child.id());
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().unwrap();
        let kept = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                kept.lock().unwrap().push(line);
            }
        });
        Self { child, lines }
    }

    async fn wait_for(&self, line: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.lines.lock().unwrap().iter().any(|l| l == line) {
            assert!(
                Instant::now() < deadline,
                "the consumer did not print `{line}` within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `(ran, replayed, delivered)` as last printed.
    fn stats(&self) -> (u64, u64, u64) {
        let lines = self.lines.lock().unwrap();
        let last = lines
            .iter()
            .rev()
            .find(|l| l.starts_with("stats "))
            .expect("a stats line");
        let n: Vec<u64> = last
            .split_whitespace()
            .skip(1)
            .map(|n| n.parse().unwrap())
            .collect();
        (n[0], n[1], n[2])
    }

    fn kill(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

fn effects_in(path: &Path) -> HashMap<String, u32> {
    let mut runs = HashMap::new();
    for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
        *runs.entry(line.to_owned()).or_default() += 1;
    }
    runs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_killed_mid_batch_replays_what_it_recorded() {
    let (nats, redis) = (NatsServer::start(), RedisServer::start());
    let context = context(&nats).await;
    let mut pull = orders(&context, Duration::from_secs(2)).await;
    let dir = tempfile::tempdir().unwrap();
    let effects = dir.path().join("effects");
    let ids = with_duplicates(1_600, 400);
    publish(&context, &ids).await;

    // Killed with SIGKILL mid-batch, its in-flight messages claimed.
    let mut first = Process::start(&nats, &redis, &effects, Some(600));
    first.wait_for("frozen", Duration::from_secs(60)).await;
    let (ran_before, _, _) = first.stats();
    first.kill();
    let before = effects_in(&effects);
    assert!(before.len() >= 600 && before.values().all(|&n| n == 1));

    // Restarted; the publisher also retries 200 orders that already ran.
    let second = Process::start(&nats, &redis, &effects, None);
    let retried: Vec<u64> = before
        .keys()
        .take(200)
        .map(|id| id.parse().unwrap())
        .collect();
    publish(&context, &retried).await;
    drained(&mut pull, Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // a last stats line

    let after = effects_in(&effects);
    let distinct: HashSet<_> = ids.iter().collect();
    assert_eq!(after.len(), distinct.len(), "every order ran");
    let twice: Vec<_> = after.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "side effects ran twice: {twice:?}");
    let (ran, replayed, delivered) = second.stats();
    println!(
        "killed after {ran_before} effects; the restarted consumer ran {ran}, replayed {replayed} of {delivered}"
    );
    assert_eq!(ran as usize, distinct.len() - before.len());
    assert!(
        replayed >= 200,
        "the retried orders were replayed: {replayed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumer_processes_on_one_durable_consumer_run_each_message_once() {
    let (nats, redis) = (NatsServer::start(), RedisServer::start());
    let context = context(&nats).await;
    let mut pull = orders(&context, Duration::from_secs(2)).await;
    let dir = tempfile::tempdir().unwrap();
    let effects = dir.path().join("effects");

    let a = Process::start(&nats, &redis, &effects, None);
    let b = Process::start(&nats, &redis, &effects, None);
    let ids = with_duplicates(1_600, 400);
    publish(&context, &ids).await;
    drained(&mut pull, Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let runs = effects_in(&effects);
    assert_eq!(runs.len(), 1_600);
    assert!(
        runs.values().all(|&n| n == 1),
        "a side effect ran twice across the processes"
    );
    let (a, b) = (a.stats(), b.stats());
    println!("process a: {a:?}, process b: {b:?} (ran, replayed, delivered)");
    assert_eq!(a.0 + b.0, 1_600);
    assert!(a.2 > 0 && b.2 > 0, "both processes consumed");
    assert!(a.2 + b.2 >= 2_000);
}

/// A `DEAD` stream capturing `dead.>`.
async fn dead_letters(context: &jetstream::Context) -> stream::Stream {
    context
        .create_stream(stream::Config {
            name: "DEAD".into(),
            subjects: vec!["dead.>".into()],
            ..Default::default()
        })
        .await
        .unwrap()
}

/// Every message of `stream` (at most 100), read with a fresh consumer.
async fn letters(stream: &stream::Stream) -> Vec<jetstream::Message> {
    let mut messages = stream
        .create_consumer(pull::Config::default())
        .await
        .unwrap()
        .fetch()
        .max_messages(100)
        .expires(Duration::from_secs(1))
        .messages()
        .await
        .unwrap();
    let mut letters = Vec::new();
    while let Some(letter) = messages.next().await {
        letters.push(letter.unwrap());
    }
    letters
}

fn reason(letter: &jetstream::Message) -> String {
    letter
        .headers
        .as_ref()
        .and_then(|headers| headers.get("Idem-Dead-Letter-Reason"))
        .expect("a dead-letter reason")
        .as_str()
        .to_owned()
}

/// Runs `consume` in a task with a handler that records each run and fails
/// (`Err` or a panic) as `fail` says for the delivery.
fn consuming(
    js: JetStream,
    consumer: &Consumer,
    pull: &PullConsumer,
    effects: &Arc<Effects>,
    fail: fn(&Delivery) -> Result<(), String>,
) -> tokio::task::JoinHandle<Result<(), ConsumeError>> {
    let (consumer, pull, effects) = (consumer.clone(), pull.clone(), effects.clone());
    tokio::spawn(async move {
        js.consume(&consumer, &pull, |delivery| {
            let effects = effects.clone();
            async move {
                effects.apply(&delivery);
                fail(&delivery)
            }
        })
        .await
    })
}

/// Polls `done` every 50 ms until it holds, for at most `within`.
async fn eventually(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_line_error_is_dead_lettered_as_one_line_and_consumption_goes_on() {
    let server = NatsServer::start();
    let context = context(&server).await;
    let mut pull = orders(&context, Duration::from_secs(30)).await;
    let dead = dead_letters(&context).await;
    publish(&context, &[1, 2, 3]).await;

    let consumer = Consumer::new(Idempotency::memory(), "billing").max_deliveries(1);
    let effects = Arc::new(Effects::default());
    let js = JetStream::new(context.clone())
        .key(MessageKey::Header("Event-Id".into()))
        .dead_letter("dead.orders");
    let running = consuming(js, &consumer, &pull, &effects, |delivery| {
        if delivery.id() == "1" {
            Err(format!("line one\nline two\r\n\u{0}{}", "x".repeat(20_000)))
        } else {
            Ok(())
        }
    });
    drained(&mut pull, Duration::from_secs(30)).await;
    assert!(!running.is_finished(), "consume ended: {running:?}");
    running.abort();

    let runs = effects.runs();
    assert_eq!((runs["1"], runs["2"], runs["3"]), (1, 1, 1));
    let letters = letters(&dead).await;
    assert_eq!(letters.len(), 1);
    let reason = reason(&letters[0]);
    assert!(
        reason.starts_with("the handler failed on delivery 1: line one\\nline two\\r\\n\\u{0}xxx"),
        "{reason}"
    );
    assert!(reason.len() <= idem_core::consumer::MAX_REASON_LEN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_fails_its_message_and_consumption_goes_on() {
    let server = NatsServer::start();
    let context = context(&server).await;
    let mut pull = orders(&context, Duration::from_secs(30)).await;
    let dead = dead_letters(&context).await;
    publish(&context, &[1, 2, 3]).await;

    let consumer = Consumer::new(Idempotency::memory(), "billing")
        .max_deliveries(3)
        .backoff(Duration::from_millis(50), Duration::from_millis(200));
    let effects = Arc::new(Effects::default());
    let js = JetStream::new(context.clone())
        .key(MessageKey::Header("Event-Id".into()))
        .dead_letter("dead.orders");
    let running = consuming(js, &consumer, &pull, &effects, |delivery| {
        assert_ne!(delivery.id(), "2", "a bug in the handler");
        Ok(())
    });
    drained(&mut pull, Duration::from_secs(30)).await;
    assert!(!running.is_finished(), "consume ended: {running:?}");
    running.abort();

    let runs = effects.runs();
    assert_eq!(
        (runs["1"], runs["2"], runs["3"]),
        (1, 3, 1),
        "the panicking message ran on each delivery, up to max_deliveries"
    );
    let stats = consumer.stats();
    assert_eq!(
        (stats.panicked, stats.naked, stats.dead_lettered),
        (3, 2, 1),
        "{stats:?}"
    );
    let letters = letters(&dead).await;
    assert_eq!(letters.len(), 1);
    assert!(
        reason(&letters[0]).contains(
            "the handler panicked: assertion `left != right` failed: a bug in the handler"
        ),
        "{}",
        reason(&letters[0])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_streams_message_is_not_taken_for_an_old_one() {
    let server = NatsServer::start();
    let context = context(&server).await;
    let consumer = Consumer::new(Idempotency::memory(), "billing");
    let effects = Arc::new(Effects::default());
    for incarnation in 1..=2 {
        if incarnation == 2 {
            context.delete_stream("ORDERS").await.unwrap();
        }
        let mut pull = orders(&context, Duration::from_secs(30)).await;
        publish(&context, &[incarnation]).await;
        let js = JetStream::new(context.clone()).key(MessageKey::StreamSequence);
        let running = consuming(js, &consumer, &pull, &effects, |_| Ok(()));
        drained(&mut pull, Duration::from_secs(30)).await;
        running.abort();
    }
    let runs = effects.runs();
    assert_eq!(runs.len(), 2, "two messages at sequence 1: {runs:?}");
    assert!(runs.values().all(|&n| n == 1));
    assert!(
        runs.keys().all(|id| id.starts_with("ORDERS:1:")),
        "{runs:?}"
    );
    let stats = consumer.stats();
    assert_eq!((stats.ran, stats.replayed), (2, 0), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_that_cannot_be_published_is_retried_without_the_handler() {
    let server = NatsServer::start();
    let context = context(&server).await;
    let mut pull = orders(&context, Duration::from_secs(30)).await;
    publish(&context, &[1]).await;

    // No stream captures `dead.>` yet: the dead letter cannot be published.
    let consumer = Consumer::new(Idempotency::memory(), "billing")
        .max_deliveries(2)
        .dead_letter_attempts(100)
        .backoff(Duration::from_millis(100), Duration::from_millis(100));
    let effects = Arc::new(Effects::default());
    let js = JetStream::new(context.clone())
        .key(MessageKey::Header("Event-Id".into()))
        .dead_letter("dead.orders");
    let running = consuming(js, &consumer, &pull, &effects, |_| {
        Err("card declined".to_owned())
    });
    eventually("two dead letters failed", Duration::from_secs(30), || {
        consumer.stats().dead_letters_failed >= 2
    })
    .await;
    let dead = dead_letters(&context).await;
    drained(&mut pull, Duration::from_secs(30)).await;
    assert!(!running.is_finished(), "consume ended: {running:?}");
    running.abort();

    assert_eq!(
        effects.runs()["1"],
        2,
        "the handler ran max_deliveries times"
    );
    let letters = letters(&dead).await;
    assert_eq!(letters.len(), 1);
    assert!(reason(&letters[0]).contains("delivery 2: card declined"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_published_twice_is_stored_once() {
    let server = NatsServer::start();
    let context = context(&server).await;
    let pull = orders(&context, Duration::from_secs(30)).await;
    let dead = dead_letters(&context).await;
    publish(&context, &[1]).await;

    let js = JetStream::new(context.clone())
        .key(MessageKey::Header("Event-Id".into()))
        .dead_letter("dead.orders");
    let message = pull
        .fetch()
        .max_messages(1)
        .messages()
        .await
        .unwrap()
        .next()
        .await
        .unwrap()
        .unwrap();
    let message = js.message(message);
    // As after a `+TERM` that failed: the redelivery dead-letters it again.
    message.dead_letter("card declined").await.unwrap();
    message.dead_letter("card declined").await.unwrap();
    let letters = letters(&dead).await;
    assert_eq!(letters.len(), 1, "the second publish was a duplicate");
    let id = letters[0]
        .headers
        .as_ref()
        .unwrap()
        .get("Nats-Msg-Id")
        .unwrap();
    assert!(
        id.as_str().starts_with("idem-dead-letter:ORDERS:1:"),
        "{id}"
    );
}

/// A dead letter carries none of the message's directives to the server:
/// its `Nats-Msg-Id`, and a publisher's `Nats-Expected-Stream` that the
/// dead-letter stream would refuse, are kept as `Idem-Original-…`; and two
/// consumers of one stream that dead-letter one message keep a dead letter
/// each (their ids differ by consumer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_keep_the_messages_directives_under_other_names() {
    let server = NatsServer::start();
    let context = context(&server).await;
    let billing = orders(&context, Duration::from_secs(30)).await;
    let shipping = context
        .get_stream("ORDERS")
        .await
        .unwrap()
        .create_consumer(pull::Config {
            durable_name: Some("shipping".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let dead = dead_letters(&context).await;
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", "order-17");
    headers.insert("Nats-Expected-Stream", "ORDERS");
    headers.insert("Event-Id", "17");
    context
        .publish_with_headers("orders.new", headers, "order 17".into())
        .await
        .unwrap()
        .await
        .unwrap();

    let mut running = Vec::new();
    let mut consumers = Vec::new();
    for pull in [billing.clone(), shipping.clone()] {
        let consumer =
            Consumer::new(Idempotency::memory(), pull.cached_info().name.clone()).max_deliveries(1);
        consumers.push(consumer.clone());
        let js = JetStream::new(context.clone()).dead_letter("dead.orders");
        running.push(tokio::spawn(async move {
            js.consume(&consumer, &pull, |_| async {
                Err::<(), _>("card declined")
            })
            .await
        }));
    }
    for mut pull in [billing, shipping] {
        drained(&mut pull, Duration::from_secs(20)).await;
    }
    for task in running {
        assert!(!task.is_finished(), "consume ended: {task:?}");
        task.abort();
    }
    for consumer in &consumers {
        let stats = consumer.stats();
        assert_eq!(
            (stats.ran, stats.dead_lettered, stats.dead_letters_failed),
            (1, 1, 0),
            "{}: {stats:?}",
            consumer.name()
        );
    }

    let mut dead_lettered_by: Vec<String> = letters(&dead)
        .await
        .iter()
        .map(|letter| {
            let headers = letter.headers.as_ref().unwrap();
            let header = |name: &str| headers.get(name).map(|value| value.as_str().to_owned());
            assert_eq!(header("Idem-Original-Nats-Msg-Id").unwrap(), "order-17");
            assert_eq!(
                header("Idem-Original-Nats-Expected-Stream").unwrap(),
                "ORDERS"
            );
            assert_eq!(header("Nats-Expected-Stream"), None);
            assert_eq!(header("Event-Id").unwrap(), "17", "other headers are kept");
            assert_eq!(header("Idem-Original-Subject").unwrap(), "orders.new");
            assert_eq!(header("Idem-Stream-Sequence").unwrap(), "1");
            let consumer = header("Idem-Consumer").unwrap();
            let id = header("Nats-Msg-Id").unwrap();
            assert!(
                id.starts_with("idem-dead-letter:ORDERS:1:")
                    && id.ends_with(&format!(":{consumer}")),
                "{id}"
            );
            consumer
        })
        .collect();
    dead_lettered_by.sort();
    assert_eq!(dead_lettered_by, ["billing", "shipping"]);
}

/// The README's way back for a dead letter: sent back as it says (its
/// payload, to its original subject, with its original id), it is
/// dead-lettered again without running while its failure is remembered,
/// and runs again once its key is forgotten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_sent_back_runs_again_once_its_key_is_forgotten() {
    let server = NatsServer::start();
    let context = context(&server).await;
    let window = Duration::from_secs(1);
    let stream = context
        .create_stream(stream::Config {
            name: "ORDERS".into(),
            subjects: vec!["orders.>".into()],
            duplicate_window: window,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut pull = stream
        .create_consumer(pull::Config {
            durable_name: Some("billing".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let dead = dead_letters(&context).await;
    let idem = Idempotency::memory();
    let consumer = Consumer::new(idem.clone(), "billing").max_deliveries(1);
    let runs = Arc::new(Mutex::new(0_u32));
    let running = {
        let (consumer, pull, runs) = (consumer.clone(), pull.clone(), runs.clone());
        let js = JetStream::new(context.clone()).dead_letter("dead.orders");
        tokio::spawn(async move {
            js.consume(&consumer, &pull, |_| {
                let runs = runs.clone();
                async move {
                    let mut runs = runs.lock().unwrap();
                    *runs += 1;
                    // The bank declines the first run; the fix is deployed after.
                    if *runs == 1 {
                        Err("card declined")
                    } else {
                        Ok(())
                    }
                }
            })
            .await
        })
    };
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", "order-17");
    context
        .publish_with_headers("orders.new", headers, "order 17".into())
        .await
        .unwrap()
        .await
        .unwrap();
    drained(&mut pull, Duration::from_secs(20)).await;
    let letter = letters(&dead).await.remove(0);

    let send_back = |letter: &jetstream::Message| {
        let headers = letter.headers.as_ref().unwrap();
        let mut back = HeaderMap::new();
        back.insert(
            "Nats-Msg-Id",
            headers.get("Idem-Original-Nats-Msg-Id").unwrap().clone(),
        );
        let subject = headers.get("Idem-Original-Subject").unwrap().to_string();
        (subject, back, letter.payload.clone())
    };
    // Past the source stream's duplicate window, which would drop it.
    tokio::time::sleep(window + Duration::from_millis(200)).await;
    let (subject, headers, payload) = send_back(&letter);
    context
        .publish_with_headers(subject.clone(), headers.clone(), payload.clone())
        .await
        .unwrap()
        .await
        .unwrap();
    drained(&mut pull, Duration::from_secs(20)).await;
    assert_eq!(*runs.lock().unwrap(), 1, "its failure is remembered");
    assert_eq!(letters(&dead).await.len(), 2, "dead-lettered again");

    let key = idem_core::Key::new("billing", "order-17").unwrap();
    assert!(idem.forget(key).await.unwrap());
    tokio::time::sleep(window + Duration::from_millis(200)).await;
    context
        .publish_with_headers(subject, headers, payload)
        .await
        .unwrap()
        .await
        .unwrap();
    drained(&mut pull, Duration::from_secs(20)).await;
    running.abort();
    assert_eq!(*runs.lock().unwrap(), 2, "it ran again, and succeeded");
    assert_eq!(letters(&dead).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_refuses_a_max_deliver_below_max_deliveries() {
    let server = NatsServer::start();
    let context = context(&server).await;
    let stream = orders_stream(&context).await;
    let pull = stream
        .create_consumer(pull::Config {
            durable_name: Some("billing".into()),
            max_deliver: 3,
            ..Default::default()
        })
        .await
        .unwrap();
    let js = JetStream::new(context.clone());
    let handler = |_: Delivery| async { Ok::<_, String>(()) };

    // Bounded: a check that no longer refuses would consume for ever.
    let error = tokio::time::timeout(
        Duration::from_secs(30),
        js.consume(
            &Consumer::new(Idempotency::memory(), "billing"),
            &pull,
            handler,
        ),
    )
    .await
    .expect("consume refused at start, not kept running")
    .unwrap_err();
    assert!(
        matches!(
            error,
            ConsumeError::MaxDeliver {
                max_deliver: 3,
                max_deliveries: 5
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("max_deliver (3)"), "{error}");

    // Within the server's limit, it starts.
    let fits = Consumer::new(Idempotency::memory(), "billing").max_deliveries(3);
    let running = tokio::time::timeout(
        Duration::from_millis(500),
        js.consume(&fits, &pull, handler),
    );
    assert!(running.await.is_err(), "consume started and kept running");
}

#[tokio::test]
async fn consume_refuses_an_ack_policy_other_than_explicit() {
    let server = NatsServer::start();
    let context = context(&server).await;
    let stream = orders_stream(&context).await;
    let js = JetStream::new(context.clone());
    let handler = |_: Delivery| async { Ok::<_, String>(()) };
    for (name, policy) in [
        ("all", jetstream::consumer::AckPolicy::All),
        ("none", jetstream::consumer::AckPolicy::None),
    ] {
        let pull = stream
            .create_consumer(pull::Config {
                durable_name: Some(name.into()),
                ack_policy: policy,
                ..Default::default()
            })
            .await
            .unwrap();
        // Bounded: a check that no longer refuses would consume for ever.
        let error = tokio::time::timeout(
            Duration::from_secs(30),
            js.consume(&Consumer::new(Idempotency::memory(), name), &pull, handler),
        )
        .await
        .expect("consume refused at start, not kept running")
        .unwrap_err();
        assert!(
            matches!(error, ConsumeError::AckPolicy(p) if p == policy),
            "{error}"
        );
        assert!(error.to_string().contains("AckPolicy::Explicit"), "{error}");
    }
}

/// A message the server drops at its `max_deliver` while idem naks it (the
/// store down) is logged as dropped, naming it: no dead letter tells of it.
#[tokio::test(flavor = "current_thread")]
async fn a_message_naked_on_the_servers_last_delivery_is_logged() {
    let logs = idem_test::logs::capture();
    let server = NatsServer::start();
    let context = context(&server).await;
    let stream = orders_stream(&context).await;
    let mut pull = stream
        .create_consumer(pull::Config {
            durable_name: Some("billing".into()),
            max_deliver: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    publish(&context, &[1]).await;
    let consumer = Consumer::new(Idempotency::new(idem_test::faults::Down), "billing")
        .max_deliveries(2)
        .backoff(Duration::from_millis(50), Duration::from_millis(50));
    let js = JetStream::new(context.clone()).key(MessageKey::Header("Event-Id".into()));
    let reading = pull.clone();
    let consuming = js.consume(&consumer, &reading, |_| async { Ok::<_, String>(()) });
    tokio::select! {
        stopped = consuming => panic!("consume stopped: {stopped:?}"),
        () = drained(&mut pull, Duration::from_secs(20)) => {}
    }
    let logged = logs.text();
    let dropped: Vec<&str> = logged
        .lines()
        .filter(|line| line.contains("the server drops it without a dead letter"))
        .collect();
    assert_eq!(dropped.len(), 1, "{logged}");
    let key = idem_core::Key::new("billing", "1").unwrap();
    assert!(
        dropped[0].contains("ERROR")
            && dropped[0].contains("stream_sequence=1")
            && dropped[0].contains(&format!("key={key}")),
        "{}",
        dropped[0]
    );
    assert_eq!(consumer.stats().naked, 2);
}

/// A memory store that claims to answer within 1 s, as a network store does.
struct Remote(idem_core::MemoryStore);

impl idem_core::store::Store for Remote {
    fn begin(
        &self,
        key: idem_core::Key,
        fingerprint: idem_core::Fingerprint,
        token: idem_core::store::Token,
        lease: Duration,
    ) -> idem_core::store::StoreFuture<'_, idem_core::store::Begin> {
        self.0.begin(key, fingerprint, token, lease)
    }
    fn complete(
        &self,
        key: idem_core::Key,
        token: idem_core::store::Token,
        record: idem_core::store::Record,
        ttl: Duration,
    ) -> idem_core::store::StoreFuture<'_, idem_core::store::Completion> {
        self.0.complete(key, token, record, ttl)
    }
    fn release(
        &self,
        key: idem_core::Key,
        token: idem_core::store::Token,
    ) -> idem_core::store::StoreFuture<'_, ()> {
        self.0.release(key, token)
    }
    fn renew(
        &self,
        key: idem_core::Key,
        token: idem_core::store::Token,
        lease: Duration,
    ) -> idem_core::store::StoreFuture<'_, bool> {
        self.0.renew(key, token, lease)
    }
    fn limits(&self) -> idem_core::store::Limits {
        idem_core::store::Limits::with_response_timeout(Duration::from_secs(1))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_refuses_settings_that_cannot_work_at_start() {
    let server = NatsServer::start();
    let context = context(&server).await;
    let pull = orders(&context, Duration::from_secs(30)).await;
    publish(&context, &[1]).await;
    let short = idem_core::Settings::builder()
        .lease(Duration::from_secs(2))
        .build()
        .unwrap();
    let consumer = Consumer::new(
        Idempotency::new(Remote(idem_core::MemoryStore::new())),
        "billing",
    )
    .settings(short);
    let effects = Arc::new(Effects::default());
    let js = JetStream::new(context.clone()).key(MessageKey::Header("Event-Id".into()));
    let ended = tokio::time::timeout(
        Duration::from_secs(30),
        consuming(js, &consumer, &pull, &effects, |_| Ok(())),
    )
    .await
    .expect("consume returned at start")
    .unwrap();
    let error = ended.unwrap_err();
    assert!(matches!(error, ConsumeError::Settings(_)), "{error}");
    assert!(error.to_string().contains("lease"), "{error}");
    assert_eq!(consumer.stats().delivered, 0);

    let bad_header = JetStream::new(context.clone()).key(MessageKey::Header("Event Id".into()));
    let refused = consuming(
        bad_header,
        &Consumer::new(Idempotency::memory(), "billing"),
        &pull,
        &effects,
        |_| Ok(()),
    );
    let error = tokio::time::timeout(Duration::from_secs(30), refused)
        .await
        .expect("consume refused at start, not kept running")
        .unwrap()
        .unwrap_err();
    assert!(matches!(error, ConsumeError::KeyHeader(_)), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_does_not_end_consume() {
    let mut server = NatsServer::start();
    let context = context(&server).await;
    // A short ack wait: the server killed may not have kept message 1's ack,
    // and redelivers it (a replay) after the ack wait.
    let mut pull = orders(&context, Duration::from_secs(2)).await;
    publish(&context, &[1]).await;

    let consumer =
        Consumer::new(Idempotency::memory(), "billing").heartbeat(Some(Duration::from_millis(500)));
    let effects = Arc::new(Effects::default());
    // Two missed idle heartbeats (1 s) end the pull with `MissingHeartbeat`.
    let js = JetStream::new(context.clone())
        .key(MessageKey::Header("Event-Id".into()))
        .idle_heartbeat(Duration::from_millis(500));
    let running = consuming(js, &consumer, &pull, &effects, |_| Ok(()));
    drained(&mut pull, Duration::from_secs(30)).await;

    server.stop();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        !running.is_finished(),
        "consume ended in the outage: {running:?}"
    );
    server.restart();
    // Published once the restarted server's JetStream takes it.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut headers = HeaderMap::new();
        headers.insert("Event-Id", "2");
        let published = async {
            context
                .publish_with_headers("orders.new", headers, "order 2".into())
                .await?
                .await?;
            Ok::<_, async_nats::Error>(())
        };
        match published.await {
            Ok(()) => break,
            Err(error) => assert!(Instant::now() < deadline, "cannot publish: {error}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drained(&mut pull, Duration::from_secs(60)).await;
    assert!(!running.is_finished(), "consume ended: {running:?}");
    running.abort();

    let runs = effects.runs();
    assert_eq!((runs["1"], runs["2"]), (1, 1), "{runs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_ends_with_an_error_when_the_connection_fails_for_good() {
    let mut server = NatsServer::start();
    let client = async_nats::ConnectOptions::new()
        .max_reconnects(Some(2))
        .connect(server.url())
        .await
        .unwrap();
    let context = jetstream::new(client);
    let pull = orders(&context, Duration::from_secs(30)).await;
    let consumer = Consumer::new(Idempotency::memory(), "billing");
    let js = JetStream::new(context.clone()).idle_heartbeat(Duration::from_millis(500));
    let running = consuming(js, &consumer, &pull, &Arc::default(), |_| Ok(()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.stop();
    let ended = tokio::time::timeout(Duration::from_secs(60), running)
        .await
        .expect("consume ended once the client gave up")
        .unwrap();
    let error = ended.unwrap_err();
    assert!(matches!(error, ConsumeError::Broker(_)), "{error}");
}

/// A consumer's handler may use steps: a delivery whose handler failed
/// after its charge step is redelivered, and the handler resumes after the
/// step, so the charge is made once per message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_message_resumes_after_its_journaled_steps() {
    let server = NatsServer::start();
    let context = context(&server).await;
    let mut pull = orders(&context, Duration::from_secs(30)).await;
    publish(&context, &[1, 2]).await;

    let consumer = Consumer::new(Idempotency::memory(), "billing")
        .max_deliveries(3)
        .backoff(Duration::from_millis(50), Duration::from_millis(200));
    let js = JetStream::new(context.clone()).key(MessageKey::Header("Event-Id".into()));
    let charges: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let runs: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let running = {
        let (consumer, pull, charges, runs) = (
            consumer.clone(),
            pull.clone(),
            charges.clone(),
            runs.clone(),
        );
        tokio::spawn(async move {
            js.consume(&consumer, &pull, |delivery| {
                let (charges, runs) = (charges.clone(), runs.clone());
                async move {
                    let id = delivery.id().to_owned();
                    let run = {
                        let mut runs = runs.lock().unwrap();
                        let run = runs.entry(id.clone()).or_default();
                        *run += 1;
                        *run
                    };
                    idem_core::step("charge", async {
                        *charges.lock().unwrap().entry(id.clone()).or_default() += 1;
                        Ok::<_, String>(())
                    })
                    .await?;
                    if id == "1" && run == 1 {
                        return Err("the mailer timed out".to_owned());
                    }
                    Ok(())
                }
            })
            .await
        })
    };
    drained(&mut pull, Duration::from_secs(30)).await;
    running.abort();
    let runs = runs.lock().unwrap().clone();
    let charges = charges.lock().unwrap().clone();
    assert_eq!((runs["1"], runs["2"]), (2, 1), "message 1 was redelivered");
    assert_eq!((charges["1"], charges["2"]), (1, 1), "each charged once");
}
