//! One consumer process of the JetStream tests: pulls from a durable
//! consumer, keys messages by their `Event-Id` header on a shared store, and
//! applies each message's side effect by appending its id to a file (one
//! `write` with `O_APPEND`, so lines from several processes never mix). It
//! prints its counts every 100 ms as `stats RAN REPLAYED DELIVERED`.
//!
//! With `FREEZE_AFTER`, once that many side effects happened, handlers that
//! start from then on block before their side effect; when every side effect
//! made is also recorded and acknowledged, the process prints `frozen`, so
//! that a test can kill it (`kill -9`) mid-batch knowing no message is
//! between its side effect and its record.
//!
//! Usage: `idem-nats-consumer NATS_URL STREAM DURABLE STORE_URL EFFECTS_FILE [FREEZE_AFTER]`

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use futures_util::StreamExt as _;
use idem_core::consumer::jetstream::{JetStream, MessageKey};
use idem_core::consumer::{Consumer, Delivery};
use idem_core::{Idempotency, Settings};

#[derive(Default)]
struct Gate {
    frozen: bool,
    effects: u64,
    /// Handlers past the gate whose message is not yet settled.
    passed: u64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (nats_url, stream, durable, store_url, effects_path) = match args.as_slice() {
        [a, b, c, d, e, ..] => (a, b, c, d, e),
        _ => return Err("usage: idem-nats-consumer NATS_URL STREAM DURABLE STORE_URL EFFECTS_FILE [FREEZE_AFTER]".into()),
    };
    let freeze_after: Option<u64> = args.get(5).map(|n| n.parse()).transpose()?;

    let context = jetstream::new(async_nats::connect(nats_url).await?);
    let pull: jetstream::consumer::PullConsumer = context
        .get_stream(stream)
        .await?
        .get_consumer(durable)
        .await?;
    let idem = Idempotency::connect(store_url).await?;
    let settings = Settings::builder()
        .lease(Duration::from_secs(3))
        .wait_timeout(Duration::from_secs(20))
        .build()?;
    let consumer = Consumer::new(idem, "billing")
        .settings(settings)
        .heartbeat(Some(Duration::from_millis(500)));
    let js = JetStream::new(context).key(MessageKey::Header("Event-Id".into()));
    let effects = Arc::new(Mutex::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(effects_path)?,
    ));
    let gate = Arc::new(Mutex::new(Gate::default()));

    let reporter = consumer.clone();
    tokio::spawn(async move {
        loop {
            let stats = reporter.stats();
            println!("stats {} {} {}", stats.ran, stats.replayed, stats.delivered);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });

    let handler = |delivery: Delivery, passed: Arc<AtomicBool>| {
        let (effects, gate) = (effects.clone(), gate.clone());
        async move {
            tokio::time::sleep(Duration::from_millis(1)).await; // the work before the effect
            let pass = {
                let mut gate = gate.lock().unwrap();
                if !gate.frozen {
                    gate.passed += 1;
                    passed.store(true, Ordering::SeqCst);
                }
                !gate.frozen
            };
            if !pass {
                std::future::pending::<()>().await;
            }
            let line = format!("{}\n", delivery.id());
            effects.lock().unwrap().write_all(line.as_bytes())?;
            let mut gate = gate.lock().unwrap();
            gate.effects += 1;
            if freeze_after.is_some_and(|n| gate.effects >= n) {
                gate.frozen = true;
            }
            Ok::<_, std::io::Error>(())
        }
    };

    let messages = pull.messages().await?;
    messages
        .for_each_concurrent(16, |message| {
            let (js, consumer, gate) = (&js, &consumer, gate.clone());
            async move {
                let Ok(message) = message else { return };
                let message = js.message(message);
                let passed = Arc::new(AtomicBool::new(false));
                let flag = passed.clone();
                let _ = consumer.handle(&message, |d| handler(d, flag)).await;
                let mut gate = gate.lock().unwrap();
                if passed.load(Ordering::SeqCst) {
                    gate.passed -= 1;
                }
                if gate.frozen && gate.passed == 0 {
                    println!("frozen");
                }
            }
        })
        .await;
    Ok(())
}
