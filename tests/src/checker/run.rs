//! Runs a workload against a store through faults, recording its history.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use idem_core::store::{Inspection, Store, Token};
use idem_core::{Error, Fingerprint, Idempotency, Key, OnConflict, Settings, idempotent};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tracing::Instrument as _;

use super::history::{Answer, Event, History};
use super::invariants::BODY_PANIC;
use super::workload::{Body, CallPlan, Ends, Via, Workload};
use crate::faults::{Flaky, Schedule};

/// What bodies return: their run's number, padded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Value {
    /// The run.
    pub run: u64,
    /// Padding, to make some records large.
    pub padding: String,
}

/// What calls fail with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CallError {
    /// idem failed, by kind.
    Idem(String),
    /// The body of run `.0` failed.
    Body(u64),
}

impl From<Error> for CallError {
    fn from(error: Error) -> Self {
        let kind = match error {
            Error::InProgress { .. } => "in_progress",
            Error::KeyReused => "key_reused",
            Error::Store(_) => "store",
            Error::Decode(_) => "decode",
            Error::NotReplayable { .. } => "not_replayable",
            Error::AttemptFailed => "attempt_failed",
            Error::StepLost { .. } => "step_lost",
            Error::Config(_) | Error::Encode { .. } | Error::InvalidKey { .. } => "config",
            _ => "other",
        };
        Self::Idem(kind.to_owned())
    }
}

/// What a run needs to know of its calls.
pub(crate) struct Ctx {
    history: Arc<History>,
    flaky: Arc<Flaky>,
    keys: Vec<Key>,
    pub(crate) scope: String,
    runs: AtomicU64,
}

/// The largest record the second handle stores, so that padded results
/// are recorded as run but not replayable there.
const SMALL_RECORDS: usize = 2048;

/// Calls through the attribute.
#[derive(Clone)]
pub(crate) struct Attributed {
    pub(crate) idem: Idempotency,
}

impl Attributed {
    /// Calls the method `plan`'s conflict setting names, for `key`.
    pub(crate) async fn call(
        &self,
        ctx: &Ctx,
        key: usize,
        plan: &CallPlan,
        args: Arguments,
    ) -> Result<Value, CallError> {
        let (scope, settings) = (ctx.scope.as_str(), plan.settings);
        match settings.on_conflict() {
            OnConflict::Reject => {
                self.rejecting(scope, key, settings, args, ctx, plan.id, plan.body)
                    .await
            }
            _ => {
                self.waiting(scope, key, settings, args, ctx, plan.id, plan.body)
                    .await
            }
        }
    }

    #[idempotent(
        name = "idem.checker",
        key = key,
        scope = scope,
        store = self.idem,
        ttl = settings.ttl(),
        lease = settings.lease(),
        wait_timeout = settings.wait_timeout(),
        skip(scope, key, settings, ctx, call, body)
    )]
    #[allow(clippy::too_many_arguments)]
    async fn waiting(
        &self,
        scope: &str,
        key: usize,
        settings: Settings,
        args: Arguments,
        ctx: &Ctx,
        call: usize,
        body: Body,
    ) -> Result<Value, CallError> {
        let _ = &args;
        run_body(ctx, call, key, body).await
    }

    #[idempotent(
        name = "idem.checker",
        key = key,
        scope = scope,
        store = self.idem,
        ttl = settings.ttl(),
        lease = settings.lease(),
        on_conflict = reject,
        skip(scope, key, settings, ctx, call, body)
    )]
    #[allow(clippy::too_many_arguments)]
    async fn rejecting(
        &self,
        scope: &str,
        key: usize,
        settings: Settings,
        args: Arguments,
        ctx: &Ctx,
        call: usize,
        body: Body,
    ) -> Result<Value, CallError> {
        let _ = &args;
        run_body(ctx, call, key, body).await
    }
}

pub(crate) async fn run_body(
    ctx: &Ctx,
    call: usize,
    key: usize,
    body: Body,
) -> Result<Value, CallError> {
    let run = ctx.runs.fetch_add(1, Ordering::SeqCst) + 1;
    ctx.history.push(Event::BodyStarted { call, key, run });
    if let Some(stall) = body.stall {
        ctx.flaky.stall(ctx.keys[key], Instant::now() + stall);
        ctx.history.push(Event::Stalled { key, for_: stall });
        tokio::time::sleep(stall).await;
    }
    if body.steps == 0 {
        tokio::time::sleep(body.took).await;
    }
    let one_step = |step: u8| async move {
        if step >= body.steps {
            return Ok(());
        }
        let name = format!("s{step}");
        // Run together, steps take times of their own, varying with the
        // run, so that they complete in an order other than their start's.
        let share = body.took / u32::from(body.steps);
        let took = if body.concurrent {
            share * (1 + u32::try_from((run + 2 * u64::from(step)) % 3).unwrap_or(0))
        } else {
            share
        };
        let ran = std::sync::atomic::AtomicBool::new(false);
        let work = idem_core::step(&name, async {
            tokio::time::sleep(took).await;
            ctx.history.push(Event::StepDone { key, step, run });
            ran.store(true, Ordering::SeqCst);
            Ok::<_, CallError>(run)
        });
        let done = if body.compensate {
            let history = Arc::clone(&ctx.history);
            work.compensate(move |_done_by: u64| async move {
                history.push(Event::StepUndone { key, step, by: run });
                Ok::<_, String>(())
            })
            .await
        } else {
            work.await
        };
        if done.is_ok() && ran.load(Ordering::SeqCst) {
            ctx.history.push(Event::StepJournaled { key, step, run });
        }
        if ran.load(Ordering::SeqCst) && done.as_ref().err().is_some_and(is_store_error) {
            ctx.history.push(Event::StepUnjournaled { key, step, run });
        }
        if let Ok(from) = done
            && from != run
        {
            ctx.history.push(Event::StepReplayed {
                key,
                step,
                run,
                from,
            });
        }
        done.map(|_| ())
    };
    let done = if body.concurrent {
        // At most three steps (`Workload::generate`); those past the
        // body's count return at once.
        let (a, b, c) = tokio::join!(one_step(0), one_step(1), one_step(2));
        let store_errors_only = [&a, &b, &c]
            .into_iter()
            .all(|done| done.as_ref().err().is_none_or(is_store_error));
        (a.and(b).and(c), store_errors_only)
    } else {
        let mut done = Ok(());
        for step in 0..body.steps {
            done = one_step(step).await;
            if done.is_err() {
                break;
            }
        }
        let store_errors_only = done.as_ref().err().is_none_or(is_store_error);
        (done, store_errors_only)
    };
    let (done, store_errors_only) = done;
    if let Err(error) = done {
        // A body that was to fail anyway fails as planned when its steps'
        // journal writes failed (store errors, and no lost claim): with its
        // error kept, the call fails for good beside a step whose append
        // went unanswered.
        let planned = matches!(body.ends, Ends::Err) && store_errors_only;
        if !planned {
            // The claim was lost, or the journal could not be written.
            ctx.history.push(Event::BodyEnded { run, how: "lost" });
            return Err(error);
        }
    }
    match body.ends {
        Ends::Ok => {
            ctx.history.push(Event::BodyEnded { run, how: "ok" });
            Ok(Value {
                run,
                padding: "p".repeat(body.padding),
            })
        }
        Ends::Err => {
            ctx.history.push(Event::BodyEnded { run, how: "err" });
            Err(CallError::Body(run))
        }
        Ends::Panics => {
            ctx.history.push(Event::BodyEnded { run, how: "panic" });
            panic!("{BODY_PANIC}: run {run}");
        }
    }
}

/// Whether a step failed because its journal could not be written.
fn is_store_error(error: &CallError) -> bool {
    matches!(error, CallError::Idem(kind) if kind == "store")
}

/// A call's arguments: a map and a set, whose iteration orders differ
/// between instances.
pub(crate) type Arguments = (HashMap<String, u64>, HashSet<u64>);

/// The arguments `which` of `key`'s calls: equal for equal `which`, built
/// in an order of their own each time (a `HashMap`'s and a `HashSet`'s
/// order differ between instances).
fn arguments(key: usize, which: u8) -> Arguments {
    let mut map: HashMap<String, u64> = HashMap::new();
    let k = u64::try_from(key).unwrap_or(u64::MAX);
    for (name, value) in [
        ("amount", 100 + k + 1000 * u64::from(which)),
        ("currency", 978),
        ("customer", 7),
        ("items", 3),
    ] {
        map.insert(name.to_owned(), value);
    }
    let set: HashSet<u64> = [k, 11, 23, 42, 97].into_iter().collect();
    (map, set)
}

async fn one_call(
    ctx: &Arc<Ctx>,
    idem: &Idempotency,
    attributed: &Attributed,
    plan: &CallPlan,
    cache_errors: bool,
) -> Result<Value, CallError> {
    let args = arguments(plan.key, plan.arguments);
    match plan.via {
        #[cfg(feature = "http")]
        Via::Http => super::http_edge::call(ctx, idem, plan, cache_errors).await,
        #[cfg(feature = "axum")]
        Via::Handler { h2, spawned } => {
            super::handler_edge::call(ctx, attributed, plan, &args, h2, spawned).await
        }
        Via::Attribute => attributed.call(ctx, plan.key, plan, args).await,
        #[cfg(not(feature = "http"))]
        Via::Http => unreachable!("calls are drawn over HTTP only with the `http` feature"),
        #[cfg(not(feature = "axum"))]
        Via::Handler { .. } => {
            unreachable!("calls are drawn to handlers only with the `axum` feature")
        }
        Via::Run => {
            let key = ctx.keys[plan.key];
            let fingerprint = Fingerprint::of(&(&args,))?;
            let body = run_body(ctx, plan.id, plan.key, plan.body);
            if cache_errors {
                idem.run_caching_errors(
                    &plan.settings,
                    key,
                    fingerprint,
                    |e: &CallError| matches!(e, CallError::Body(_)),
                    body,
                )
                .await
            } else {
                idem.run(&plan.settings, key, fingerprint, body).await
            }
        }
    }
}

/// The operation name of the HTTP layer's calls.
pub(crate) const HTTP_NAME: &str = "idem.checker.http";

/// Polls `future`, catching a panic in it.
pub(crate) async fn caught<F: Future>(future: F) -> std::thread::Result<F::Output> {
    let mut future = pin!(future);
    std::future::poll_fn(|cx| {
        match std::panic::catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(cx))) {
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(panic) => Poll::Ready(Err(panic)),
        }
    })
    .await
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// Silences the panics the checker's bodies are told to raise; other panics
/// are printed as before.
pub(crate) fn quiet_body_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !panic_message(info.payload()).starts_with(BODY_PANIC) {
                previous(info);
            }
        }));
    });
}

/// What a run left: its history, and whether some key stayed claimed.
pub(crate) struct Ran {
    pub(crate) history: Arc<History>,
    pub(crate) still_claimed: Vec<usize>,
    pub(crate) runs: u64,
    pub(crate) faults: usize,
}

static RUNS: AtomicU64 = AtomicU64::new(1);

/// Runs `workload` on `store`, faulted as `schedule` says, and records its
/// history; answers whether outcomes were captured. A key still claimed
/// past every lease is looked at again for `grace`.
pub(crate) async fn run(
    store: Arc<dyn Store>,
    workload: &Workload,
    schedule: Schedule,
    outcomes: bool,
    grace: Duration,
) -> Ran {
    quiet_body_panics();
    let checker_run = RUNS.fetch_add(1, Ordering::Relaxed);
    let flaky = Arc::new(Flaky::scheduled(store, workload.seed, schedule));
    let history = Arc::new(History::default());
    let scope = format!("seed-{}-{}", workload.seed, Token::random());
    let keys: Vec<Key> = (0..workload.keys.len())
        .map(|k| {
            if workload.keys[k].http {
                // As the layer derives it from the request's key and scope.
                Key::scoped(HTTP_NAME, &scope, k.to_string().as_str())
            } else {
                Key::scoped("idem.checker", &scope, &k)
            }
            .expect("a key")
        })
        .collect();
    let ctx = Arc::new(Ctx {
        history: history.clone(),
        flaky: flaky.clone(),
        keys: keys.clone(),
        scope,
        runs: AtomicU64::new(0),
    });
    let handles: Vec<Idempotency> = (0..workload.handles)
        .map(|h| {
            let idem = Idempotency::from_arc(flaky.clone());
            if h == 1 {
                idem.max_record_bytes(SMALL_RECORDS)
            } else {
                idem
            }
        })
        .collect();
    history.start();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for plan in workload.calls.clone() {
        let ctx = ctx.clone();
        let idem = handles[plan.handle].clone();
        let cache_errors = workload.keys[plan.key].cache_errors;
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(start + plan.arrives).await;
            ctx.history.push(Event::Called {
                call: plan.id,
                key: plan.key,
            });
            let began = Instant::now();
            let attributed = Attributed { idem: idem.clone() };
            let span = tracing::info_span!(
                super::outcomes::CALL_SPAN,
                checker_run,
                checker_call = u64::try_from(plan.id).unwrap_or(u64::MAX)
            );
            let call =
                caught(one_call(&ctx, &idem, &attributed, &plan, cache_errors)).instrument(span);
            let result = match plan.cancel_after {
                Some(after) => tokio::time::timeout(after, call).await.ok(),
                None => Some(call.await),
            };
            let answer = match result {
                None => Answer::Cancelled,
                Some(Err(panic)) => Answer::Panicked(panic_message(&*panic)),
                Some(Ok(Ok(value))) => Answer::Ok { run: value.run },
                Some(Ok(Err(CallError::Body(run)))) => Answer::BodyErr { run },
                Some(Ok(Err(CallError::Idem(kind)))) => Answer::Idem(kind),
            };
            ctx.history.push(Event::Answered {
                call: plan.id,
                answer,
                took: began.elapsed(),
            });
        }));
    }
    for task in tasks {
        if let Err(error) = task.await {
            history.push(Event::Answered {
                call: usize::MAX,
                answer: Answer::Panicked(format!("the checker's own task failed: {error}")),
                took: Duration::ZERO,
            });
        }
    }
    // A call over HTTP whose client hung up may run on to its end (and a
    // waiting one run its body after the wait): wait until each told its
    // outcome, or, without outcomes, as long as its body could take.
    let ran_on: Vec<&CallPlan> = workload
        .calls
        .iter()
        .filter(|call| call.via.over_http() && call.cancel_after.is_some())
        .collect();
    let longest = ran_on
        .iter()
        .map(|call| call.body.took + call.body.stall.unwrap_or_default())
        .max()
        .unwrap_or_default();
    if outcomes {
        // Bounded: a call dropped before its request reached idem tells
        // nothing.
        let until = Instant::now() + workload.longest_lease() * 4 + longest;
        while Instant::now() < until {
            let told = super::outcomes::told(checker_run);
            if ran_on.iter().all(|call| told.contains(&call.id)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    } else {
        tokio::time::sleep(longest).await;
    }
    // Past every lease (and the background retries of recordings): no key
    // may stay claimed.
    tokio::time::sleep(workload.longest_lease() * 2).await;
    // On a real network the store's client may hold a dropped call's claim
    // and send it late (following redirections, retrying `TRYAGAIN`): its
    // lease runs from when it lands. Such a claim is given `grace` more.
    let grace_until = Instant::now() + grace;
    let mut still_claimed = Vec::new();
    loop {
        still_claimed.clear();
        for (k, key) in keys.iter().enumerate() {
            if let Ok(Inspection::InProgress { .. }) = flaky.inspect(*key).await {
                still_claimed.push(k);
            }
        }
        if still_claimed.is_empty() || Instant::now() >= grace_until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if outcomes {
        for (call, outcome) in super::outcomes::take(checker_run) {
            history.push(Event::Outcome { call, outcome });
        }
    }
    for (k, key) in keys.iter().enumerate() {
        // Stores that keep no journal answer `Unsupported`: nothing to say.
        let steps = match flaky.steps(*key).await {
            Ok(steps) => Some(steps),
            Err(error) if error.kind() == idem_core::StoreErrorKind::Unsupported => None,
            Err(error) => panic!("the checker could not read key {k}'s journal: {error}"),
        };
        if let Some(steps) = steps {
            let completed = matches!(flaky.inspect(*key).await, Ok(Inspection::Completed { .. }));
            history.push(Event::JournalAtEnd {
                key: k,
                entries: steps
                    .into_iter()
                    .map(|step| step.name.trim_start_matches('\u{1}').to_owned())
                    .collect(),
                completed,
            });
        }
        history.push(Event::Begins {
            key: k,
            begins: flaky.begins(*key),
        });
        if outcomes && super::outcomes::record_lost(*key) {
            history.push(Event::RecordLost { key: k });
        }
    }
    let struck = flaky.struck_log();
    for struck in &struck {
        let key = keys.iter().position(|k| *k == struck.key);
        history.push_at(
            struck.at,
            Event::Fault {
                key,
                struck: *struck,
            },
        );
    }
    Ran {
        history,
        still_claimed,
        runs: ctx.runs.load(Ordering::SeqCst),
        faults: struck.len(),
    }
}
