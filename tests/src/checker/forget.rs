//! Forgets among calls: an operator's [`Idempotency::forget`] while callers
//! run and replay the same key, on one or two handles (processes) of one
//! store whose answers are delayed at random.
//!
//! The promise checked is the one `forget` makes: a call made after a
//! forget returned runs the body again, or replays a result stored after
//! the forget, and never replays a result that a caller was answered
//! before the forget began (that record was stored then, and the forget
//! deleted it). Calls made before a forget returned may answer either, and
//! so may a call of another handle that joined a call of its own handle
//! made before the forget returned (and so perhaps reading the store
//! before the delete): same-key calls on one handle share one call, and
//! that handle could not tell of the forget. The
//! store's faults only delay answers, so every result a caller was
//! answered was stored before its answer; a forget that fails is not
//! counted.
//!
//! A store proves itself with [`check_forget_seeds`], on the
//! [`Backend`] of its conformance suite.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use idem_core::store::{Store, Token};
use idem_core::{Error, Fingerprint, Idempotency, Key, Settings};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tokio::task::JoinSet;

use super::{Broken, Violation};
use crate::conformance::Backend;
use crate::faults::{Fault, Flaky, Op, Schedule};

/// What a seed's run of the forget scenario did.
#[derive(Debug, Clone)]
pub struct ForgetReport {
    /// The seed.
    pub seed: u64,
    /// Calls made.
    pub calls: usize,
    /// Forgets that returned `Ok`.
    pub forgets: usize,
    /// Bodies run.
    pub runs: u64,
    /// Calls made after a forget returned that replayed a result stored
    /// after it (allowed; counted to show the check had cases).
    pub replayed_after: usize,
}

/// One call's plan and what it got.
#[derive(Debug, Clone)]
struct Called {
    handle: usize,
    arrives: Duration,
    body: Duration,
    /// When it was made, in the run's order of events.
    made: u64,
    /// When it was answered, and the run whose result it got.
    answered: Option<(u64, u64)>,
    /// The run of its own body, if it ran.
    ran: Option<u64>,
}

/// One forget's plan and when it began and returned.
#[derive(Debug, Clone)]
struct Forgot {
    handle: usize,
    at: Duration,
    began: u64,
    returned: Option<u64>,
}

/// Runs the forget scenario of `seed` on `store`, with leases of `lease`.
///
/// # Errors
/// A call made after a forget returned that answered a result a caller
/// had been answered before that forget began.
pub async fn check_forget_seed(
    store: Arc<dyn Store>,
    seed: u64,
    lease: Duration,
) -> Result<ForgetReport, Violation> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x464F_5247_4554_0000);
    let delay = lease / 8;
    let flaky: Arc<dyn Store> = Arc::new(Flaky::scheduled(
        store,
        seed,
        Schedule {
            rate: 0.3,
            faults: vec![
                (Op::Begin, Fault::Delayed(delay)),
                (Op::Complete, Fault::Delayed(delay)),
            ],
        },
    ));
    let handles: Vec<Idempotency> = (0..rng.random_range(1..=2))
        .map(|_| Idempotency::from_arc(Arc::clone(&flaky)))
        .collect();
    let window = lease * 2;
    let calls: Vec<Called> = (0..rng.random_range(8..=20))
        .map(|_| Called {
            handle: rng.random_range(0..handles.len()),
            arrives: window.mul_f64(rng.random()),
            body: (lease / 4).mul_f64(rng.random()),
            made: 0,
            answered: None,
            ran: None,
        })
        .collect();
    let forgets: Vec<Forgot> = (0..rng.random_range(1..=3))
        .map(|_| Forgot {
            handle: rng.random_range(0..handles.len()),
            at: window.mul_f64(rng.random()),
            began: 0,
            returned: None,
        })
        .collect();
    let settings = Settings::builder()
        .lease(lease)
        .ttl(lease * 100)
        .wait_timeout(lease * 8)
        .build()
        .expect("valid settings");
    // A key of this run's own: a store may still hold an earlier run's
    // records of the same seed.
    let key = Key::new("checker.forget", &format!("{seed}-{}", Token::random())).expect("a key");
    let fingerprint = Fingerprint::of(&seed).expect("a fingerprint");
    let clock = Arc::new(AtomicU64::new(0));
    let tick = {
        let clock = Arc::clone(&clock);
        move || clock.fetch_add(1, Ordering::SeqCst)
    };
    let runs = Arc::new(AtomicU64::new(0));
    let calls = Arc::new(Mutex::new(calls));
    let forgets = Arc::new(Mutex::new(forgets));
    let start = tokio::time::Instant::now();
    let mut tasks = JoinSet::new();
    let planned = lock(&calls).clone();
    for (i, plan) in planned.into_iter().enumerate() {
        let (idem, settings, runs, calls, tick) = (
            handles[plan.handle].clone(),
            settings,
            Arc::clone(&runs),
            Arc::clone(&calls),
            tick.clone(),
        );
        tasks.spawn(async move {
            tokio::time::sleep_until(start + plan.arrives).await;
            lock(&calls)[i].made = tick();
            let body = {
                let calls = Arc::clone(&calls);
                async move {
                    let run = runs.fetch_add(1, Ordering::SeqCst);
                    lock(&calls)[i].ran = Some(run);
                    tokio::time::sleep(plan.body).await;
                    Ok::<u64, Error>(run)
                }
            };
            let answer = idem.run(&settings, key, fingerprint, body).await;
            let answered = tick();
            if let Ok(run) = answer {
                lock(&calls)[i].answered = Some((answered, run));
            }
        });
    }
    let planned = lock(&forgets).clone();
    for (i, plan) in planned.into_iter().enumerate() {
        let (idem, forgets, tick) = (
            handles[plan.handle].clone(),
            Arc::clone(&forgets),
            tick.clone(),
        );
        tasks.spawn(async move {
            tokio::time::sleep_until(start + plan.at).await;
            lock(&forgets)[i].began = tick();
            if idem.forget(key).await.is_ok() {
                lock(&forgets)[i].returned = Some(tick());
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("a call or forget of the forget scenario");
    }
    let calls = lock(&calls).clone();
    let forgets = lock(&forgets).clone();
    for forget in &forgets {
        let Some(returned) = forget.returned else {
            continue;
        };
        let earlier: Vec<u64> = calls
            .iter()
            .filter_map(|c| c.answered)
            .filter(|&(at, _)| at < forget.began)
            .map(|(_, run)| run)
            .collect();
        for (i, call) in calls.iter().enumerate() {
            // Another process's call may have joined a call of its own
            // process made before the forget returned (whose read may
            // predate the delete), and share that call's result: that
            // process could not tell.
            let joined_one_under_way = |run: u64| {
                call.handle != forget.handle
                    && calls.iter().any(|other| {
                        other.handle == call.handle
                            && other.made < returned
                            && matches!(other.answered, Some((at, r)) if r == run && at > call.made)
                    })
            };
            match call.answered {
                Some((_, run))
                    if call.made > returned
                        && earlier.contains(&run)
                        && !joined_one_under_way(run) =>
                {
                    return Err(Violation {
                        seed,
                        broken: Broken {
                            invariant: "no replay of a forgotten result",
                            detail: format!(
                                "call {i} (handle {}) was made after a forget on handle {} \
                                 returned, and answered run {run}'s result, which a caller \
                                 had been answered before that forget began",
                                call.handle, forget.handle
                            ),
                        },
                        workload: format!("calls: {calls:#?}\nforgets: {forgets:#?}"),
                        history: ordered(&calls, &forgets),
                    });
                }
                _ => {}
            }
        }
    }
    let first_returned = forgets.iter().filter_map(|f| f.returned).min();
    let replayed_after = calls
        .iter()
        .filter(|c| first_returned.is_some_and(|r| c.made > r))
        .filter(|c| matches!(c.answered, Some((_, run)) if c.ran != Some(run)))
        .count();
    Ok(ForgetReport {
        seed,
        calls: calls.len(),
        forgets: forgets.iter().filter(|f| f.returned.is_some()).count(),
        runs: runs.load(Ordering::SeqCst),
        replayed_after,
    })
}

/// Checks the forget scenario of `seeds` on `backend`, all at once on one
/// runtime (paused when the backend follows tokio's clock), and panics with
/// the first violation.
pub fn check_forget_seeds<B: Backend>(backend: &B, seeds: &[u64]) -> Vec<ForgetReport> {
    let lease = backend.timing().lease;
    super::on_backend(backend, seeds, |store, seed| {
        check_forget_seed(store, seed, lease)
    })
}

/// The run's events in the order they happened, one a line.
fn ordered(calls: &[Called], forgets: &[Forgot]) -> String {
    let mut events: Vec<(u64, String)> = Vec::new();
    for (i, call) in calls.iter().enumerate() {
        events.push((
            call.made,
            format!("call {i} made on handle {}", call.handle),
        ));
        if let Some((at, run)) = call.answered {
            events.push((at, format!("call {i} answered run {run}'s result")));
        }
    }
    for (i, forget) in forgets.iter().enumerate() {
        events.push((
            forget.began,
            format!("forget {i} begins on handle {}", forget.handle),
        ));
        if let Some(at) = forget.returned {
            events.push((at, format!("forget {i} returns")));
        }
    }
    events.sort();
    events
        .into_iter()
        .map(|(at, what)| format!("  {at:>4}  {what}\n"))
        .collect()
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
