//! The consumer core under the checker: an in-memory broker, driven by a
//! seed, that delivers duplicates, reorders deliveries, redelivers after a
//! `Nak`, loses acknowledgements (so an acknowledged message comes again)
//! and dead letters (a dead letter that could not be published: the
//! message comes again), and hands deliveries to one to three consumers
//! (processes) on one store at once; handlers that fail or panic on their
//! first deliveries, some with a failure too long for a record (the store
//! keeps only that the handler failed).
//!
//! Checked: per message id, the handler's effect is done at most once; a
//! replayed delivery is handed the value of the run that did it; every
//! message ends acknowledged (after exactly one effect) or dead-lettered
//! (after `max_deliveries` failed deliveries, with no effect).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use idem_core::Idempotency;
use idem_core::consumer::{Consumer, Delivery, Disposition, Handled};
use idem_core::store::Store;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tokio::time::Instant;

/// What one seed's broker run did.
#[derive(Debug, Clone, Copy, Default)]
pub struct BrokerReport {
    /// Messages published.
    pub messages: usize,
    /// Deliveries handed to consumers.
    pub deliveries: usize,
    /// Acknowledgements the broker lost.
    pub acks_lost: usize,
    /// Messages dead-lettered.
    pub dead_lettered: usize,
    /// Dead letters that could not be published (the message came again).
    pub dead_letters_lost: usize,
}

/// How one message's handler behaves on its deliveries.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// It fails (an `Err`) on this many deliveries first.
    fails: u32,
    /// The first of them panics instead.
    panics: bool,
    /// Its failures' text is longer than a record may be.
    long: bool,
}

/// The longest record the checker's consumers keep: a failure's text of
/// [`LONG_FAILURE`] bytes is not kept, only that the handler failed.
const MAX_RECORD: usize = 512;

/// The length of a long failure's text.
const LONG_FAILURE: usize = 2 * MAX_RECORD;

/// A delivery waiting in the broker.
#[derive(Debug, Clone)]
struct Pending {
    id: String,
    deliveries: u32,
    at: Instant,
}

#[derive(Default)]
struct Effects {
    /// Per id, the runs whose handler succeeded.
    done: HashMap<String, Vec<u64>>,
    /// Per id, how many times its handler ran.
    ran: HashMap<String, u32>,
    next_run: u64,
}

/// Runs the broker workload of `seed` against `store` and checks it.
///
/// # Errors
/// What broke, with the seed.
pub async fn check_broker_seed(store: Arc<dyn Store>, seed: u64) -> Result<BrokerReport, String> {
    super::run::quiet_body_panics();
    let mut rng = StdRng::seed_from_u64(seed);
    let messages = rng.random_range(3..=12);
    let max_deliveries = rng.random_range(2..=4);
    let consumers: Vec<Consumer> = (0..rng.random_range(1..=3))
        .map(|_| {
            Consumer::new(
                Idempotency::from_arc(Arc::clone(&store)).max_record_bytes(MAX_RECORD),
                "checker.broker",
            )
            .max_deliveries(max_deliveries)
            .backoff(Duration::from_millis(10), Duration::from_millis(100))
        })
        .collect();
    let plans: BTreeMap<String, Plan> = (0..messages)
        .map(|m| {
            let fails = if rng.random_bool(0.3) {
                rng.random_range(1..=max_deliveries + 1)
            } else {
                0
            };
            (
                format!("{seed}-{m}"),
                Plan {
                    fails,
                    panics: fails > 0 && rng.random_bool(0.3),
                    long: fails > 0 && rng.random_bool(0.3),
                },
            )
        })
        .collect();
    let start = Instant::now();
    // Each message once, some twice (a publisher's retry), at random times.
    let mut queue: Vec<Pending> = Vec::new();
    for id in plans.keys() {
        for _ in 0..if rng.random_bool(0.3) { 2 } else { 1 } {
            queue.push(Pending {
                id: id.clone(),
                deliveries: 1,
                at: start + Duration::from_millis(rng.random_range(0..50)),
            });
        }
    }
    let effects = Arc::new(Mutex::new(Effects::default()));
    let mut report = BrokerReport {
        messages,
        ..BrokerReport::default()
    };
    let mut acked: HashSet<String> = HashSet::new();
    let mut dead: HashSet<String> = HashSet::new();
    let mut replays: Vec<(String, u64)> = Vec::new();
    let mut rounds = 0;
    while !queue.is_empty() {
        rounds += 1;
        if rounds > 1000 {
            return Err(format!("seed {seed}: the broker never drained: {queue:?}"));
        }
        let now = Instant::now();
        let Some(next) = queue.iter().map(|p| p.at).min() else {
            break;
        };
        if next > now {
            tokio::time::sleep_until(next).await;
        }
        // Up to one delivery per consumer at once, picked in any order.
        let now = Instant::now();
        let mut batch = Vec::new();
        for consumer in &consumers {
            let ready: Vec<usize> = (0..queue.len()).filter(|&i| queue[i].at <= now).collect();
            if ready.is_empty() {
                break;
            }
            let pick = ready[rng.random_range(0..ready.len())];
            batch.push((consumer, queue.swap_remove(pick)));
        }
        report.deliveries += batch.len();
        let handled =
            futures_util::future::join_all(batch.into_iter().map(|(consumer, pending)| {
                let effects = Arc::clone(&effects);
                let plan = plans[&pending.id];
                async move {
                    let delivery =
                        Delivery::new(pending.id.clone(), Bytes::from(pending.id.clone()))
                            .deliveries(pending.deliveries);
                    let outcome = consumer
                        .process(delivery, |delivery| async move {
                            let (run, attempt) = {
                                let mut effects =
                                    effects.lock().unwrap_or_else(PoisonError::into_inner);
                                effects.next_run += 1;
                                let run = effects.next_run;
                                let attempt =
                                    effects.ran.entry(delivery.id().to_owned()).or_default();
                                *attempt += 1;
                                (run, *attempt)
                            };
                            tokio::task::yield_now().await;
                            if attempt <= plan.fails {
                                assert!(
                                    !(plan.panics && attempt == 1),
                                    "{}: the handler panics (injected by the checker)",
                                    super::invariants::BODY_PANIC
                                );
                                let padding = if plan.long { LONG_FAILURE } else { 0 };
                                return Err(format!(
                                    "failure {attempt} (injected){}",
                                    "!".repeat(padding)
                                ));
                            }
                            effects
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .done
                                .entry(delivery.id().to_owned())
                                .or_default()
                                .push(run);
                            Ok::<_, String>(run)
                        })
                        .await;
                    (pending, outcome)
                }
            }))
            .await;
        for (pending, outcome) in handled {
            if let Handled::Replayed(run) = &outcome.handled {
                replays.push((pending.id.clone(), *run));
            }
            let again = |delay: Duration| Pending {
                id: pending.id.clone(),
                deliveries: pending.deliveries + 1,
                at: Instant::now() + delay,
            };
            match outcome.disposition {
                Disposition::Ack if rng.random_bool(0.15) => {
                    // The acknowledgement is lost: the broker delivers again.
                    report.acks_lost += 1;
                    queue.push(again(Duration::from_millis(30)));
                }
                Disposition::Ack => {
                    acked.insert(pending.id.clone());
                }
                Disposition::Nak { delay } => queue.push(again(delay)),
                Disposition::DeadLetter { .. } if rng.random_bool(0.15) => {
                    // Its dead letter could not be published: the message
                    // comes again, and must be dead-lettered again.
                    report.dead_letters_lost += 1;
                    queue.push(again(Duration::from_millis(30)));
                }
                Disposition::DeadLetter { .. } => {
                    dead.insert(pending.id.clone());
                }
            }
        }
    }
    report.dead_lettered = dead.len();
    let effects = effects.lock().unwrap_or_else(PoisonError::into_inner);
    for id in plans.keys() {
        let done = effects.done.get(id).map_or(&[][..], Vec::as_slice);
        if done.len() > 1 {
            return Err(format!(
                "seed {seed}: message {id}'s handler succeeded {} times (runs {done:?})",
                done.len()
            ));
        }
        match (done.first(), acked.contains(id), dead.contains(id)) {
            (Some(_), true, false) | (None, false, true) => {}
            (done, acked, dead) => {
                return Err(format!(
                    "seed {seed}: message {id} ended with effect {done:?}, acknowledged {acked}, \
                     dead-lettered {dead} ({:?}, max_deliveries {max_deliveries})",
                    plans[id]
                ));
            }
        }
    }
    for (id, run) in replays {
        if effects.done.get(&id).and_then(|done| done.first()) != Some(&run) {
            return Err(format!(
                "seed {seed}: a delivery of {id} was replayed run {run}, not the run that did it"
            ));
        }
    }
    Ok(report)
}
