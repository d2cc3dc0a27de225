//! The consumer on a real `nats-server` with JetStream (started by the
//! harness on a free port): duplicates, redelivery while a handler runs,
//! dead letters, a consumer process killed with `kill -9` mid-batch, and two
//! consumer processes on one durable consumer with a Redis store.

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
use idem_core::consumer::jetstream::{JetStream, MessageKey};
use idem_core::consumer::{Consumer, Delivery};
use idem_test::nats_server::NatsServer;
use idem_test::redis_server::RedisServer;
use tokio::time::Instant;

async fn context(server: &NatsServer) -> jetstream::Context {
    jetstream::new(async_nats::connect(server.url()).await.unwrap())
}

/// The `ORDERS` stream on `orders.>`, and a durable pull consumer on it.
async fn orders(context: &jetstream::Context, ack_wait: Duration) -> PullConsumer {
    let stream = context
        .create_stream(stream::Config {
            name: "ORDERS".into(),
            subjects: vec!["orders.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    stream
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
        let info = pull.info().await.unwrap();
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not drained within {within:?}: {} pending, {} unacknowledged",
            info.num_pending,
            info.num_ack_pending
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
