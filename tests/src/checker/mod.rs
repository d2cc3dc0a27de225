//! The exactly-once checker: random histories under injected faults,
//! checked against idem's promises.
//!
//! From a seed, [`Workload::generate`] draws callers × keys × arrival
//! times; bodies that take random time (on some keys as one to three
//! journaled steps, some with undos, on some run together so that they
//! complete out of their start order), return `Ok` or `Err`, panic, pause
//! their holder past its lease or are cancelled by their caller; settings
//! from their valid ranges (`wait` or `reject`, leases, wait timeouts,
//! `cache_errors`, TTLs that expire within the run); arguments equal but
//! built in different orders (a map and a set), and some calls that reuse
//! their key with other arguments; last, one call of each key, one after
//! another, so that replays of several keys follow each other; calls through
//! [`Idempotency::run`](idem_core::Idempotency::run), through an
//! `#[idempotent]` method, as requests through the HTTP layer (feature
//! `http`), and as requests served by hyper in process, over HTTP/1.1 or h2,
//! to an axum handler that calls the method (feature `axum`: the client
//! hangs up by closing its connection or resetting its stream, and a
//! body's panic breaks the request), on one or two handles (processes).
//! The store is
//! wrapped in [`Flaky`](crate::faults::Flaky) with a schedule drawn from the
//! same seed: answers delayed or lost, operations refused or landing late,
//! results refused as a full store refuses them.
//!
//! Every body start and end, every caller's answer, the outcome idem told
//! for each call (its `idem.call` event) and every fault go into a
//! [`History`], checked against these invariants:
//!
//! 1. **At most one run per key**: per key, at most one body's effect is
//!    done (an `Ok`, or a cached `Err`), except in a window the README's
//!    "Not promised" list names, and then the history shows it: a holder
//!    paused past its lease, a record that expired, a caller that dropped
//!    its call mid-body (not one dropped once its body returned `Ok`, whose
//!    outcome idem records in the background, unless its key's steps have
//!    undos), or a result not stored after store faults.
//!    **At most one effect per step**: per key and step, the step's work
//!    runs once (later runs replay it), except across a pause past the
//!    lease, an expiry of the journal, or a run cut short between the
//!    effect and its journal entry. **Undos**: a step's undo runs only
//!    after the step did, at most once, with the same exceptions, and the
//!    last completed step is undone first (a step journaled before another
//!    was done is undone after it, whether the compensation runs in the
//!    attempt that ran them or in a later one that replays them); a run
//!    that only finished a compensation answers the stored failure. **Steps
//!    replay to their own arguments**: a step's journaled value is replayed
//!    only to calls of the arguments of the call that did it.
//! 2. **Answers are the first stored result**: a caller whose body ran gets
//!    its own result; every other `Ok` (or cached `Err`) is the first stored
//!    result of its key, of a call with the same arguments: never another
//!    key's, one of other arguments, a failed run's or a later one.
//! 3. **Nothing stays claimed, no wait overruns**: past the lease after the
//!    last call, no key is still claimed; no call waits past its
//!    `wait_timeout` plus a stated slack (a `reject` call, past the slack);
//!    waiters send at most one claim per 10 ms they wait.
//! 4. **Panics and outcomes**: no panic escapes idem but the body's own;
//!    a key whose calls all pass equal arguments is never `KeyReused`;
//!    every call, cancelled ones included, ends with exactly one outcome,
//!    the one its answer implies.
//!
//! The first violation is reported with its seed and the history.
//!
//! Forgets have a scenario of their own ([`check_forget_seed`]): an
//! operator's `forget` among calls of one key, checked against what
//! `forget` promises (no call made after it returned replays a result
//! answered before it began).
//!
//! A store proves itself with [`exactly_once_suite!`](crate::exactly_once_suite),
//! on the same [`Backend`] as the conformance suite:
//!
//! ```ignore
//! idem_test::exactly_once_suite!(MyBackend);
//! ```
//!
//! It runs the fixed seeds [`FIXED_SEEDS`] plus fresh ones (printed), and an
//! ignored soak test: `IDEM_CHECKER_MINUTES=30 cargo test … exactly_once_soak
//! -- --ignored --nocapture` (or `IDEM_CHECKER_SEEDS=N`).

#[cfg(feature = "consumer")]
mod broker;
#[cfg(feature = "client")]
mod client;
mod forget;
#[cfg(feature = "axum")]
mod handler_edge;
mod history;
#[cfg(feature = "http")]
mod http_edge;
mod invariants;
pub(crate) mod outcomes;
mod run;
#[cfg(feature = "postgres")]
mod transactional;
mod workload;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use idem_core::store::Store;

#[cfg(feature = "consumer")]
pub use broker::{BrokerReport, check_broker_seed};
#[cfg(feature = "client")]
pub use client::{ClientReport, check_client_seed};
#[cfg(feature = "postgres")]
pub use transactional::{TransactionalReport, check_transactional_seed};

pub use forget::{ForgetReport, check_forget_seed, check_forget_seeds};
pub use history::{Answer, Event, History};
pub use invariants::Broken;
pub use run::{CallError, Value};
pub use workload::{Body, CallPlan, Ends, KeyPlan, Via, Workload};

use crate::conformance::Backend;
pub use crate::faults::Schedule;

/// The seeds every run checks, on every backend.
pub const FIXED_SEEDS: [u64; 8] = [1, 2, 3, 5, 8, 13, 21, 34];

/// How the checker runs on a backend.
#[derive(Debug, Clone)]
pub struct Options {
    /// The shortest lease drawn (leases go up to twice as long).
    pub lease: Duration,
    /// How much a wait may overrun its timeout.
    pub slack: Duration,
    /// The share of store operations faulted.
    pub fault_rate: f64,
    /// Whether the store follows tokio's paused clock, where no renewal is
    /// ever late: then a result idem says it lost must be explained by
    /// repeated store faults.
    pub strict: bool,
    /// The faults drawn; `None` for every kind
    /// ([`Schedule::every_kind`]), delays up to a sixth of the lease.
    pub schedule: Option<Schedule>,
}

impl Options {
    /// Options for `backend`: its lease; on a real clock a second of slack
    /// more for a loaded machine; 8% of operations faulted, or the share
    /// `IDEM_CHECKER_FAULT_RATE` says.
    pub fn for_backend<B: Backend>(backend: &B) -> Self {
        let lease = backend.timing().lease;
        let extra = if backend.follows_tokio_clock() {
            Duration::ZERO
        } else {
            Duration::from_secs(1)
        };
        let fault_rate = std::env::var("IDEM_CHECKER_FAULT_RATE")
            .ok()
            .and_then(|r| r.parse().ok())
            .unwrap_or(0.08);
        Self {
            lease,
            slack: lease + extra,
            fault_rate,
            strict: backend.follows_tokio_clock(),
            schedule: None,
        }
    }
}

/// What a seed's run did.
#[derive(Debug, Clone)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// Calls made.
    pub calls: usize,
    /// Bodies run.
    pub runs: u64,
    /// Faults that struck.
    pub faults: usize,
    /// Step effects done (replayed steps not counted).
    pub steps: usize,
    /// Steps undone by compensations.
    pub undos: usize,
    /// Requests over HTTP that a body's panic broke (answered `reset`).
    pub resets: usize,
    /// Whether idem's told outcomes were captured and checked. The checker
    /// captures them with a process-wide `tracing` subscriber, which it
    /// installs on first use; in a test process that already set a global
    /// subscriber of its own, they cannot be: the outcome check (the last
    /// of invariant 4) is skipped, and on a backend with a real clock two
    /// runs of a key are excused (nothing tells whether a record was lost).
    /// [`exactly_once_suite!`](crate::exactly_once_suite) fails then; keep
    /// the checker's tests in a test binary without one.
    pub outcomes_checked: bool,
}

/// A broken invariant, with its seed and history.
#[derive(Debug, Clone)]
pub struct Violation {
    /// The seed that shows it.
    pub seed: u64,
    /// The invariant and what broke it.
    pub broken: Broken,
    /// The workload (keys' settings, calls' plans).
    pub workload: String,
    /// The history, one event a line.
    pub history: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The run's fault rate, when it was not the default, replays too.
        let rate = std::env::var("IDEM_CHECKER_FAULT_RATE")
            .map(|rate| format!(" IDEM_CHECKER_FAULT_RATE={rate}"))
            .unwrap_or_default();
        write!(
            f,
            "exactly-once checker: invariant \"{}\" broken with seed {}: {}\n\
             replay it with IDEM_CHECKER_SEED={}{rate}\nworkload:\n{}\nhistory:\n{}",
            self.broken.invariant,
            self.seed,
            self.broken.detail,
            self.seed,
            self.workload,
            self.history
        )
    }
}

impl std::error::Error for Violation {}

/// Runs the workload of `seed` on `store` and checks its history.
///
/// # Errors
/// The first invariant its history breaks.
pub async fn check_seed(
    store: Arc<dyn Store>,
    seed: u64,
    options: &Options,
) -> Result<Report, Violation> {
    let workload = Workload::generate(seed, options.lease);
    let captured = outcomes::install();
    let schedule = options
        .schedule
        .clone()
        .unwrap_or_else(|| Schedule::every_kind(options.fault_rate, options.lease / 6));
    // On tokio's paused clock nothing lands late but what the faults say.
    let grace = if options.strict {
        Duration::ZERO
    } else {
        options.slack
    };
    let ran = run::run(store, &workload, schedule, captured, grace).await;
    let events = ran.history.events();
    let mut verdict =
        invariants::check(&workload, &events, options.slack, captured, options.strict);
    if verdict.is_ok() && !ran.still_claimed.is_empty() {
        verdict = Err(Broken {
            invariant: "nothing stays claimed past its lease",
            detail: format!(
                "keys {:?} were still claimed {:?} after the last call ended",
                ran.still_claimed,
                workload.longest_lease() * 2 + grace
            ),
        });
    }
    match verdict {
        Ok(()) => Ok(Report {
            seed,
            calls: workload.calls.len(),
            runs: ran.runs,
            faults: ran.faults,
            steps: events
                .iter()
                .filter(|(_, e)| matches!(e, history::Event::StepDone { .. }))
                .count(),
            undos: events
                .iter()
                .filter(|(_, e)| matches!(e, history::Event::StepUndone { .. }))
                .count(),
            resets: events
                .iter()
                .filter(|(_, e)| {
                    matches!(e, history::Event::Answered { answer: Answer::Idem(kind), .. } if kind == "reset")
                })
                .count(),
            outcomes_checked: captured,
        }),
        Err(broken) => Err(Violation {
            seed,
            broken,
            workload: describe(&workload),
            history: ran.history.to_string(),
        }),
    }
}

fn describe(workload: &Workload) -> String {
    let mut out = String::new();
    for (k, key) in workload.keys.iter().enumerate() {
        out.push_str(&format!("  key {k}: {key:?}\n"));
    }
    for call in &workload.calls {
        out.push_str(&format!(
            "  call {} on key {} via {:?}, handle {}, at {:?}: {:?}, {:?}, wait {:?}, cancel after {:?}\n",
            call.id,
            call.key,
            call.via,
            call.handle,
            call.arrives,
            call.body,
            call.settings.on_conflict(),
            call.settings.wait_timeout(),
            call.cancel_after
        ));
    }
    out
}

/// Checks `seeds` on `backend`, all at once on one runtime (paused when the
/// backend follows tokio's clock), and panics with the first violation.
pub fn check_seeds<B: Backend>(backend: &B, seeds: &[u64]) -> Vec<Report> {
    check_seeds_with(backend, seeds, &Options::for_backend(backend))
}

/// [`check_seeds`] with `options` of one's own, e.g. a [`Schedule`] of one
/// fault.
pub fn check_seeds_with<B: Backend>(backend: &B, seeds: &[u64], options: &Options) -> Vec<Report> {
    on_backend(backend, seeds, |store, seed| {
        let options = options.clone();
        async move { check_seed(store, seed, &options).await }
    })
}

/// Runs `check` on a store of `backend` for each of `seeds`, all at once on
/// one runtime (paused when the backend follows tokio's clock); answers
/// the reports in the seeds' order, or panics with the first violation.
pub(crate) fn on_backend<B, R, F, Fut>(backend: &B, seeds: &[u64], check: F) -> Vec<R>
where
    B: Backend,
    R: Send + 'static,
    F: Fn(Arc<dyn Store>, u64) -> Fut,
    Fut: Future<Output = Result<R, Violation>> + Send + 'static,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(backend.follows_tokio_clock())
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for &seed in seeds {
            let checking = check(backend.store().await, seed);
            set.spawn(async move { (seed, checking.await) });
        }
        let mut reports = Vec::new();
        while let Some(done) = set.join_next().await {
            match done.expect("a checker task") {
                (seed, Ok(report)) => reports.push((seed, report)),
                (_, Err(violation)) => panic!("{violation}"),
            }
        }
        reports.sort_by_key(|(seed, _)| *seed);
        reports.into_iter().map(|(_, report)| report).collect()
    })
}

/// The seeds of one CI run: `IDEM_CHECKER_SEED` alone when set (to replay
/// one), else [`FIXED_SEEDS`] and `fresh` random ones, printed.
#[must_use]
pub fn ci_seeds(fresh: usize) -> Vec<u64> {
    if let Ok(seed) = std::env::var("IDEM_CHECKER_SEED") {
        let seed = seed
            .parse()
            .unwrap_or_else(|_| panic!("IDEM_CHECKER_SEED={seed} is not a seed (a number)"));
        return vec![seed];
    }
    let mut seeds = FIXED_SEEDS.to_vec();
    let fresh: Vec<u64> = (0..fresh).map(|_| rand::random::<u32>().into()).collect();
    println!("exactly-once checker: fresh seeds {fresh:?}");
    seeds.extend(fresh);
    seeds
}

/// Checks random seeds on `backend` in batches of `batch`, for
/// `IDEM_CHECKER_MINUTES` minutes (default 1) or `IDEM_CHECKER_SEEDS` seeds,
/// printing each batch; panics with the first violation. With
/// `IDEM_CHECKER_SEED` set, it checks that seed alone, again and again.
pub fn soak<B: Backend>(backend: &B, batch: usize) {
    let (mut runs, mut faults) = (0_u64, 0_usize);
    let (mut steps, mut undos) = (0_usize, 0_usize);
    soak_seeds(batch, |seeds| {
        for report in check_seeds(backend, seeds) {
            runs += report.runs;
            faults += report.faults;
            steps += report.steps;
            undos += report.undos;
        }
        format!(
            "{runs} bodies run, {steps} steps done, {undos} undone, {faults} faults, no violation"
        )
    });
}

/// Hands `check` batches of `batch` random seeds for `IDEM_CHECKER_MINUTES`
/// minutes (default 1) or `IDEM_CHECKER_SEEDS` seeds, and prints the seeds
/// checked and what `check` says of them after each batch: the loop of
/// [`soak`], for checks of one's own (the consumer core's, the client's).
/// With `IDEM_CHECKER_SEED` set, every seed checked is that one: a soak
/// then replays one seed as often as it runs, for a violation that
/// depends on a race and shows in some replays only.
pub fn soak_seeds(batch: usize, mut check: impl FnMut(&[u64]) -> String) {
    let replayed: Option<u64> = std::env::var("IDEM_CHECKER_SEED").ok().map(|seed| {
        seed.parse()
            .unwrap_or_else(|_| panic!("IDEM_CHECKER_SEED={seed} is not a seed (a number)"))
    });
    let minutes: f64 = std::env::var("IDEM_CHECKER_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(1.0);
    let limit: Option<usize> = std::env::var("IDEM_CHECKER_SEEDS")
        .ok()
        .and_then(|n| n.parse().ok());
    let until = std::time::Instant::now() + Duration::from_secs_f64(minutes * 60.0);
    let mut checked = 0_usize;
    loop {
        let done = limit.map_or(std::time::Instant::now() >= until, |n| checked >= n);
        if done {
            break;
        }
        let n = limit.map_or(batch, |n| batch.min(n - checked));
        let seeds: Vec<u64> = (0..n)
            .map(|_| replayed.unwrap_or_else(|| rand::random::<u32>().into()))
            .collect();
        let said = check(&seeds);
        checked += n;
        println!("exactly-once soak: {checked} seeds, {said}");
    }
}

/// Writes the exactly-once checker's tests for a [`Backend`]: one that
/// checks the [`FIXED_SEEDS`] and a few fresh seeds (printed), and an
/// ignored soak (`IDEM_CHECKER_MINUTES`, `IDEM_CHECKER_SEEDS`). Put it in a
/// test binary that sets no global `tracing` subscriber of its own: the
/// checker needs idem's told outcomes (see [`Report::outcomes_checked`]),
/// and its test fails, saying so, when it could not capture them.
///
/// ```ignore
/// idem_test::exactly_once_suite!(MyBackend);
/// ```
#[macro_export]
macro_rules! exactly_once_suite {
    ($backend:expr) => {
        #[test]
        fn exactly_once_checker() {
            let backend = $backend;
            for report in $crate::checker::check_seeds(&backend, &$crate::checker::ci_seeds(4)) {
                println!("{report:?}");
                assert!(
                    report.outcomes_checked,
                    "the exactly-once checker could not capture idem's told outcomes: this test \
                     binary set a global `tracing` subscriber of its own; without them it cannot \
                     tell a lost record from a second run. Move the checker's test to a binary \
                     without one."
                );
            }
        }

        #[test]
        #[ignore = "a soak: IDEM_CHECKER_MINUTES=30 (or IDEM_CHECKER_SEEDS=N) cargo test … -- --ignored"]
        fn exactly_once_soak() {
            $crate::checker::soak(&$backend, 16);
        }
    };
}
