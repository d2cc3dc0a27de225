//! A JetStream consumer whose messages' side effects happen once, however
//! often NATS delivers them.
//!
//! It publishes 20 orders to a stream of its own, 5 of them twice (a
//! publisher that retried), and consumes them with idem's `Consumer`:
//! a welcome email per order. On the way, the first acknowledgement of
//! three orders is lost (they come back after the 1 s ack deadline), one
//! order's handler fails once (nak'ed, redelivered, run again) and one is
//! slow enough that NATS redelivers it while it runs (the redelivery waits
//! and replays). Every delivery is printed; the program exits non-zero if an
//! email went out other than once.
//!
//! Run it against a NATS server with JetStream (`nats-server -js`):
//!
//!     cargo run -p examples --features nats --example consumer
//!
//! `NATS_URL` names the server (default `nats://127.0.0.1:4222`).

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer::pull, stream};
use futures_util::StreamExt as _;
use idem_core::Idempotency;
use idem_core::consumer::jetstream::{JetStream, JetStreamMessage, MessageKey};
use idem_core::consumer::{AckError, Consumer, Delivery, Disposition, Handled, Message};

const ORDERS: u64 = 20;
const RETRIED: [u64; 5] = [2, 5, 8, 13, 17];
const ACK_LOST: [u64; 3] = [3, 9, 15];
const FAILS_ONCE: u64 = 6;
const SLOW: u64 = 11;

/// A JetStream message whose first acknowledgement the network loses for
/// the orders in `ACK_LOST`: a `Message` adapter wrapping another.
struct LossyAcks {
    message: JetStreamMessage,
    lose: bool,
}

impl Message for LossyAcks {
    fn delivery(&self) -> Result<Delivery, String> {
        self.message.delivery()
    }
    async fn ack(&self) -> Result<(), AckError> {
        if self.lose {
            return Ok(()); // sent, never arrived: NATS redelivers after the ack wait
        }
        self.message.ack().await
    }
    async fn nak(&self, delay: Duration) -> Result<(), AckError> {
        self.message.nak(delay).await
    }
    async fn dead_letter(&self, reason: &str) -> Result<(), AckError> {
        self.message.dead_letter(reason).await
    }
    async fn terminate(&self) -> Result<(), AckError> {
        self.message.terminate().await
    }
    async fn in_progress(&self) -> Result<(), AckError> {
        self.message.in_progress().await
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    let Ok(client) = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(2))
        .connect(&url)
        .await
    else {
        eprintln!(
            "no NATS server at {url}. Start one with JetStream (`nats-server -js`, \
             `apt-get install nats-server`), or set NATS_URL."
        );
        return ExitCode::from(2);
    };
    match run(jetstream::new(client)).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("the example failed: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(
    context: jetstream::Context,
) -> Result<bool, Box<dyn std::error::Error + Send + Sync>> {
    // A stream of its own, so that nothing else on the server is touched.
    let name = format!("IDEM_EXAMPLE_{}", std::process::id());
    let subject = format!("idem-example.{}.orders", std::process::id());
    let stream = context
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            ..Default::default()
        })
        .await?;
    let pull = stream
        .create_consumer(pull::Config {
            durable_name: Some("welcome-emails".into()),
            ack_wait: Duration::from_secs(1),
            ..Default::default()
        })
        .await?;

    for id in (1..=ORDERS).chain(RETRIED) {
        let mut headers = HeaderMap::new();
        headers.insert("Event-Id", format!("order-{id}").as_str());
        let payload = format!("customer{id}@example.com").into();
        context
            .publish_with_headers(subject.clone(), headers, payload)
            .await?
            .await?;
    }
    println!("published {ORDERS} orders, {} of them twice", RETRIED.len());

    let sent: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let failed_once = Arc::new(AtomicBool::new(false));
    let handler = |order: Delivery| {
        let (sent, failed_once) = (sent.clone(), failed_once.clone());
        async move {
            if order.id() == format!("order-{SLOW}") {
                tokio::time::sleep(Duration::from_millis(2_500)).await; // past the ack deadline
            }
            if order.id() == format!("order-{FAILS_ONCE}")
                && !failed_once.swap(true, Ordering::SeqCst)
            {
                return Err("the mail server timed out");
            }
            *sent
                .lock()
                .unwrap()
                .entry(order.id().to_owned())
                .or_default() += 1;
            Ok(format!(
                "welcome email to {}",
                String::from_utf8_lossy(order.payload())
            ))
        }
    };

    // No heartbeats, so that the slow order's deadline passes while it runs.
    let consumer = Consumer::new(Idempotency::memory(), "welcome-emails")
        .heartbeat(None)
        .backoff(Duration::from_millis(200), Duration::from_secs(1));
    let js = JetStream::new(context.clone()).key(MessageKey::Header("Event-Id".into()));
    let lost = Mutex::new(Vec::new());
    let messages = pull.messages().await?;
    let consuming = messages.for_each_concurrent(8, |message| {
        let (consumer, js, lost) = (&consumer, &js, &lost);
        async move {
            let Ok(message) = message else { return };
            let message = js.message(message);
            let id = message
                .delivery()
                .map(|d| d.id().to_owned())
                .unwrap_or_default();
            let lose = ACK_LOST.iter().any(|n| id == format!("order-{n}")) && {
                let mut lost = lost.lock().unwrap();
                !lost.contains(&id) && {
                    lost.push(id.clone());
                    true
                }
            };
            let count = message.delivery().map(|d| d.delivery_count()).unwrap_or(1);
            let message = LossyAcks { message, lose };
            match consumer.handle(&message, handler).await {
                Ok(outcome) => {
                    let handled = match &outcome.handled {
                        Handled::Ran(email) => format!("ran: {email}"),
                        Handled::Replayed(_) => "replayed: no email".to_owned(),
                        Handled::Failed(error) => format!("failed: {error}"),
                        Handled::FailedBefore(reason) => format!("failed before: {reason}"),
                        Handled::NotRun(error) => format!("not run: {error}"),
                        _ => "handled".to_owned(),
                    };
                    let told = match &outcome.disposition {
                        Disposition::Ack if lose => "ack (lost on the way)".to_owned(),
                        Disposition::Ack => "ack".to_owned(),
                        Disposition::Nak { delay } => format!("nak, again in {delay:?}"),
                        Disposition::DeadLetter { reason } => format!("dead letter: {reason}"),
                    };
                    println!("{id:>8}, delivery {count}: {handled} → {told}");
                }
                Err(error) => println!("{id:>8}, delivery {count}: could not settle: {error}"),
            }
        }
    });
    // Until every order is acknowledged (or a minute passes).
    let done = async {
        let mut pull = pull.clone();
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let info = pull.info().await?;
            if info.num_pending == 0 && info.num_ack_pending == 0 {
                return Ok::<_, Box<dyn std::error::Error + Send + Sync>>(());
            }
        }
    };
    tokio::select! {
        () = consuming => {}
        finished = tokio::time::timeout(Duration::from_secs(60), done) => finished??,
    }
    context.delete_stream(&name).await?;

    let stats = consumer.stats();
    let sent = sent.lock().unwrap();
    println!(
        "{} deliveries of {} messages: {} handler runs ({} failed), {} replays",
        stats.delivered,
        ORDERS as usize + RETRIED.len(),
        stats.ran,
        stats.failed,
        stats.replayed
    );
    println!(
        "emails sent: {} for {} orders",
        sent.values().sum::<u32>(),
        sent.len()
    );
    let once = sent.len() as u64 == ORDERS && sent.values().all(|&n| n == 1);
    if once {
        println!("every order had its email exactly once");
    } else {
        println!("broken: emails not sent exactly once: {sent:?}");
    }
    Ok(once)
}
