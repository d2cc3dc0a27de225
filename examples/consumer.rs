//! An at-least-once queue that redelivers messages, and a handler that makes
//! each message's side effect happen once.
//!
//! The queue loses acknowledgements and its workers crash between handling a
//! message and acknowledging it, so messages come back, some several times.
//! The handler is `#[idempotent(key = msg.id, ttl = "7d")]`: a redelivered
//! message replays its first outcome instead of sending a second email. The
//! program exits non-zero if any message's email went out other than once.
//!
//! Run it with `cargo run -p examples --example consumer`.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};

use idem_core::idempotent;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Message {
    id: u64,
    email: String,
}

#[derive(Debug)]
struct HandleError(idem_core::Error);

impl std::fmt::Display for HandleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl From<idem_core::Error> for HandleError {
    fn from(error: idem_core::Error) -> Self {
        Self(error)
    }
}

/// The side effect: emails sent, per message.
#[derive(Default)]
struct Mailer {
    sent: Mutex<HashMap<u64, u32>>,
}

impl Mailer {
    #[idempotent(key = msg.id, ttl = "7d", name = "mailer.welcome")]
    async fn handle(&self, msg: Message) -> Result<String, HandleError> {
        let mut sent = self.sent.lock().unwrap_or_else(PoisonError::into_inner);
        *sent.entry(msg.id).or_default() += 1;
        Ok(format!("welcome email to {}", msg.email))
    }
}

enum Fate {
    Acked,
    AckLost,
    CrashedBeforeAck,
}

#[tokio::main]
async fn main() -> ExitCode {
    const MESSAGES: u64 = 200;
    let mailer = Arc::new(Mailer::default());
    let (queue, mut deliveries) = mpsc::unbounded_channel::<Message>();
    for id in 1..=MESSAGES {
        queue
            .send(Message {
                id,
                email: format!("user{id}@example.com"),
            })
            .expect("the queue is open");
    }

    // Seeded, so every run tells the same story.
    let mut dice = StdRng::seed_from_u64(7);
    let mut outstanding = MESSAGES;
    let (mut deliveries_made, mut lost_acks, mut crashes) = (0, 0, 0);
    while outstanding > 0 {
        let msg = deliveries
            .recv()
            .await
            .expect("undelivered messages remain");
        deliveries_made += 1;
        let fate = if dice.random_bool(0.25) {
            Fate::AckLost
        } else if dice.random_bool(0.15) {
            Fate::CrashedBeforeAck
        } else {
            Fate::Acked
        };
        // Each delivery runs on a worker task; a crash aborts it after the
        // handler's side effect and before the acknowledgement.
        let worker = {
            let (mailer, msg) = (Arc::clone(&mailer), msg.clone());
            tokio::spawn(async move { mailer.handle(msg).await })
        };
        let outcome = worker.await.expect("the worker ran");
        match (fate, outcome) {
            (Fate::Acked, Ok(_)) => outstanding -= 1,
            (Fate::AckLost, Ok(_)) => {
                lost_acks += 1;
                queue.send(msg).expect("redelivered");
            }
            (Fate::CrashedBeforeAck, Ok(_)) => {
                crashes += 1;
                queue.send(msg).expect("redelivered");
            }
            (_, Err(error)) => {
                eprintln!("message {} failed: {error}; redelivering", msg.id);
                queue.send(msg).expect("redelivered");
            }
        }
    }

    let sent = mailer.sent.lock().unwrap_or_else(PoisonError::into_inner);
    let twice: Vec<_> = sent.iter().filter(|(_, n)| **n != 1).collect();
    println!(
        "{MESSAGES} messages, {deliveries_made} deliveries ({lost_acks} lost acks, {crashes} crashes before an ack)"
    );
    println!(
        "emails sent: {} for {} messages",
        sent.values().sum::<u32>(),
        sent.len()
    );
    if twice.is_empty() && sent.len() as u64 == MESSAGES {
        println!("every message had its effect exactly once");
        ExitCode::SUCCESS
    } else {
        println!("broken: messages not sent exactly once: {twice:?}");
        ExitCode::FAILURE
    }
}
