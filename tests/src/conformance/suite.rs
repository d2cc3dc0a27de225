//! The suite's tests. Each is written once, inside `suite!`, which defines it
//! as a public function and lists it in
//! [`conformance_suite!`](crate::conformance_suite): a test cannot exist
//! without running.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use idem_core::store::{
    Begin, Completion, Inspection, JournaledStep, Outcome, Record, Store, StoreError,
    StoreErrorKind, Token,
};
use idem_core::{Error, Fingerprint, Idempotency};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::oneshot;
use tokio::task::JoinSet;

use super::{Backend, Cached, Caller, Failure, Runs, Stalled, Timing, fresh, other_fingerprint};
use crate::faults::{Fault, Flaky, Op};

/// Defines each test as `pub async fn name<B: Backend>(backend: &B)` and
/// exports `conformance_suite!`, which writes one `#[test]` per test. `$d`
/// is a `$`, so that the inner macro can have metavariables of its own.
macro_rules! suite {
    ($d:tt $(
        $(#[doc = $doc:literal])*
        $runtime:ident fn $name:ident($backend:ident) $body:block
    )*) => {
        $(
            $(#[doc = $doc])*
            pub async fn $name<B: Backend>($backend: &B) $body
        )*

        /// Writes one `#[test]` per conformance behaviour for the backend
        /// `$backend` (an expression evaluated in each test, whose type
        /// implements [`Backend`](crate::conformance::Backend)).
        ///
        /// ```ignore
        /// mod conformance {
        ///     idem_test::conformance_suite!(super::MyBackend);
        /// }
        /// ```
        #[macro_export]
        macro_rules! conformance_suite {
            ($d backend:expr) => {
                $(
                    #[test]
                    fn $name() {
                        let backend = $d backend;
                        $d crate::conformance::check_behaviour(
                            &backend,
                            $d crate::conformance::Runtime::$runtime,
                            stringify!($name),
                            concat!($($doc, "\n"),*),
                            $d crate::conformance::$name(&backend),
                        );
                    }
                )*
            };
        }
    };
}

/// An optional operation's answer, or `None` when the store does not
/// support it (the trait's default).
fn supported<T>(answer: Result<T, StoreError>) -> Option<T> {
    match answer {
        Err(error) if error.kind() == StoreErrorKind::Unsupported => None,
        answer => Some(answer.unwrap()),
    }
}

fn handle(store: &Arc<dyn Store>) -> Idempotency {
    Idempotency::from_arc(Arc::clone(store))
}

/// A store whose `complete` fails as injected: the call is still recorded
/// once, and every retry replays.
async fn a_failed_complete_is_retried<B: Backend>(backend: &B, flaky: Arc<Flaky>) {
    let timing = backend.timing();
    let (key, fp) = fresh("complete-retried");
    let runs = Runs::default();
    let caller = Caller::new(&Idempotency::from_arc(flaky.clone()), timing);
    let first = caller
        .run(key, fp, async {
            Ok::<_, Failure>(format!("charge {}", runs.mark()))
        })
        .await;
    assert_eq!(first.expect("its caller gets the result"), "charge 1");
    assert!(flaky.struck(Op::Complete) >= 1);
    // Past the lease: had the record been lost, the claim would have lapsed.
    tokio::time::sleep(timing.lease + timing.lease / 2).await;
    for idem in [
        caller.clone(),
        Caller::new(&Idempotency::from_arc(flaky.clone()), timing).reject(),
    ] {
        let retry = idem
            .run(key, fp, async {
                Ok::<_, Failure>(format!("charge {}", runs.mark()))
            })
            .await;
        assert_eq!(retry.expect("a replay"), "charge 1");
    }
    assert_eq!(runs.count(), 1, "the body ran once");
}

async fn replays_exactly<T>(idem: &Caller, value: T, other: T)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug + Clone,
{
    let (key, fp) = fresh(std::any::type_name::<T>());
    let first = idem
        .run(key, fp, async { Ok::<_, Failure>(value.clone()) })
        .await
        .expect("first");
    let replay = idem
        .run(key, fp, async { Ok::<_, Failure>(other) })
        .await
        .expect("replay");
    assert_eq!(first, value);
    assert_eq!(
        replay,
        value,
        "{} replays as returned",
        std::any::type_name::<T>()
    );
}

suite! { $

/// 1000 concurrent same-key calls on one handle: the body runs once and
/// every caller gets the identical result.
MultiThread fn thousand_concurrent_callers_share_one_run(backend) {
    let store = backend.store().await;
    let caller = Caller::new(&handle(&store), backend.timing()).wait_timeout(Duration::from_secs(30));
    let (key, fp) = fresh("storm");
    let runs = Runs::default();
    let mut callers = JoinSet::new();
    for _ in 0..1000 {
        let (caller, runs) = (caller.clone(), runs.clone());
        callers.spawn(async move {
            caller
                .run(key, fp, async move {
                    runs.mark();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Ok::<_, Failure>(Token::random().to_string())
                })
                .await
        });
    }
    let results: Vec<String> = callers
        .join_all()
        .await
        .into_iter()
        .map(|r| r.expect("every caller gets the result"))
        .collect();
    assert_eq!(runs.count(), 1, "the body ran once");
    assert_eq!(results.len(), 1000);
    assert!(results.iter().all(|r| *r == results[0]), "identical results");
}

/// `on_conflict = reject`: exactly one call runs; the others get `InProgress`
/// with a `retry_after` no longer than the lease.
CurrentThread fn reject_lets_exactly_one_run(backend) {
    let store = backend.store().await;
    let timing = backend.timing();
    let caller = Caller::new(&handle(&store), timing).reject();
    let (key, fp) = fresh("reject");
    let runs = Runs::default();
    let (go, gate) = oneshot::channel::<()>();
    let holder = {
        let runs = runs.clone();
        caller
            .hold(key, fp, async move {
                runs.mark();
                let _ = gate.await;
                Ok(7_u32)
            })
            .await
    };
    for _ in 0..20 {
        let refused = caller
            .run(key, fp, async { Ok::<_, Failure>(runs.mark() as u32) })
            .await;
        match refused {
            Err(Failure::Idem(Error::InProgress { retry_after })) => {
                assert!(retry_after <= timing.lease, "{retry_after:?}");
            }
            other => panic!("expected InProgress, got {other:?}"),
        }
    }
    go.send(()).expect("the holder waits");
    assert_eq!(holder.await.expect("holder").expect("holder's result"), 7);
    let replay = caller.run(key, fp, async { Ok::<_, Failure>(0_u32) }).await;
    assert_eq!(replay.expect("a replay"), 7);
    assert_eq!(runs.count(), 1);
}

/// A completed key reused with other arguments is refused; an identical retry
/// still replays (the fingerprint survives completion).
CurrentThread fn reused_key_with_other_arguments_is_refused(backend) {
    let store = backend.store().await;
    let caller = Caller::new(&handle(&store), backend.timing());
    let (key, fp) = fresh("reuse");
    let runs = Runs::default();
    let body = || async { Ok::<_, Failure>(format!("run {}", runs.mark())) };
    let first = caller.run(key, fp, body()).await.expect("first");
    let reused = caller.run(key, other_fingerprint(), body()).await;
    assert!(matches!(reused, Err(Failure::Idem(Error::KeyReused))), "{reused:?}");
    let retry = caller.run(key, fp, body()).await.expect("retry");
    assert_eq!(first, retry);
    assert_eq!(runs.count(), 1);
}

/// A key reused with other arguments while the first call runs is refused at
/// once, not made to wait, in the same process and in another.
CurrentThread fn concurrent_reuse_with_other_arguments_is_refused(backend) {
    let store = backend.store().await;
    let timing = backend.timing();
    let here = handle(&store);
    let (key, fp) = fresh("reuse-in-flight");
    let (go, gate) = oneshot::channel::<()>();
    let holder = Caller::new(&here, timing)
        .hold(key, fp, async move {
            let _ = gate.await;
            Ok(1_u8)
        })
        .await;
    for idem in [here.clone(), handle(&store)] {
        let reused = Caller::new(&idem, timing)
            .run(key, other_fingerprint(), async { Ok::<_, Failure>(2_u8) })
            .await;
        assert!(matches!(reused, Err(Failure::Idem(Error::KeyReused))), "{reused:?}");
    }
    go.send(()).expect("the holder waits");
    assert_eq!(holder.await.expect("holder").expect("result"), 1);
}

/// By default an `Err` releases the claim: a retry runs the body again.
CurrentThread fn errors_are_not_cached_by_default(backend) {
    let store = backend.store().await;
    let caller = Caller::new(&handle(&store), backend.timing());
    let (key, fp) = fresh("errors-released");
    let runs = Runs::default();
    let failed: Result<u32, _> = caller
        .run(key, fp, async { Err(Failure::Body(runs.mark() as u32)) })
        .await;
    assert!(matches!(failed, Err(Failure::Body(1))), "{failed:?}");
    let retried = caller
        .run(key, fp, async { Ok::<_, Failure>(runs.mark() as u32) })
        .await;
    assert_eq!(retried.expect("the retry runs"), 2);
}

/// With errors cached, a retry replays the `Err`.
CurrentThread fn errors_are_cached_when_asked(backend) {
    let store = backend.store().await;
    let caller = Caller::new(&handle(&store), backend.timing());
    let (key, fp) = fresh("errors-cached");
    let runs = Runs::default();
    for _ in 0..3 {
        let result: Result<u32, Cached> = caller
            .run_caching_errors(key, fp, |_| true, async {
                Err(Cached::Declined(runs.mark() as u32))
            })
            .await;
        assert_eq!(result, Err(Cached::Declined(1)));
    }
    assert_eq!(runs.count(), 1);
}

/// The caching predicate decides which errors are stored.
CurrentThread fn error_predicate_picks_what_is_cached(backend) {
    let store = backend.store().await;
    let caller = Caller::new(&handle(&store), backend.timing());
    let (key, fp) = fresh("errors-predicate");
    let runs = Runs::default();
    let permanent = |e: &Cached| matches!(e, Cached::Declined(_));
    let run = |outcome: Result<u32, Cached>| {
        let (runs, caller) = (runs.clone(), caller.clone());
        async move {
            caller
                .run_caching_errors(key, fp, permanent, async move {
                    runs.mark();
                    outcome
                })
                .await
        }
    };
    assert_eq!(run(Err(Cached::Transient)).await, Err(Cached::Transient));
    assert_eq!(run(Err(Cached::Declined(9))).await, Err(Cached::Declined(9)));
    assert_eq!(run(Ok(1)).await, Err(Cached::Declined(9)));
    assert_eq!(runs.count(), 2, "the transient error was retried, the decline replayed");
}

/// Raw protocol: a holder whose lease lapsed is fenced. A second token takes
/// over; the stale `complete` is `Lost` and does not overwrite the newer
/// record.
CurrentThread fn stale_holder_is_fenced_in_the_store(backend) {
    let store = backend.store().await;
    let Timing { lease, ttl } = backend.timing();
    let (key, fp) = fresh("fencing");
    let (stale, fresh_token, reader) = (Token::random(), Token::random(), Token::random());
    let stale_record = Record::new(Outcome::Ok, &b"\"stale\""[..]);
    let newer_record = Record::new(Outcome::Ok, &b"\"newer\""[..]);

    assert_eq!(store.begin(key, fp, stale, lease).await.unwrap(), Begin::Claimed);
    tokio::time::sleep(lease + lease / 2).await;
    assert_eq!(store.begin(key, fp, fresh_token, lease).await.unwrap(), Begin::Claimed);
    assert!(!store.renew(key, stale, lease).await.unwrap(), "stale renew refused");
    store.release(key, stale).await.unwrap();
    assert_eq!(
        store.complete(key, stale, stale_record, ttl).await.unwrap(),
        Completion::Lost
    );
    assert_eq!(
        store.complete(key, fresh_token, newer_record.clone(), ttl).await.unwrap(),
        Completion::Stored
    );
    assert_eq!(
        store.begin(key, fp, reader, lease).await.unwrap(),
        Begin::Completed(newer_record)
    );
}

/// Through the engine: a holder that stalls past its lease without renewing
/// loses the key to a caller in another process, and its late result is not
/// stored.
CurrentThread fn stalled_holder_loses_to_a_takeover(backend) {
    let store = backend.store().await;
    let timing = backend.timing();
    let (key, fp) = fresh("takeover");
    let stalled = Idempotency::new(Stalled(Arc::clone(&store)));
    let holder = Caller::new(&stalled, timing)
        .hold(key, fp, async move {
            tokio::time::sleep(timing.lease * 3).await;
            Ok("stale".to_owned())
        })
        .await;
    tokio::time::sleep(timing.lease + timing.lease / 2).await;
    let taken = Caller::new(&handle(&store), timing)
        .reject()
        .run(key, fp, async { Ok::<_, Failure>("newer".to_owned()) })
        .await;
    assert_eq!(taken.expect("the takeover runs"), "newer");
    // The stale holder finishes: its own caller gets its result, the store
    // keeps the newer one.
    assert_eq!(holder.await.expect("holder").expect("result"), "stale");
    let replay = Caller::new(&handle(&store), timing)
        .run(key, fp, async { Ok::<_, Failure>("third".to_owned()) })
        .await;
    assert_eq!(replay.expect("replay"), "newer");
}

/// Each protocol operation, repeated with the same token, is harmless.
CurrentThread fn store_operations_are_safe_to_repeat(backend) {
    let store = backend.store().await;
    let Timing { lease, ttl } = backend.timing();
    let (key, fp) = fresh("repeat");
    let token = Token::random();
    let record = Record::new(Outcome::Ok, &b"[]"[..]);
    assert_eq!(store.begin(key, fp, token, lease).await.unwrap(), Begin::Claimed);
    assert_eq!(store.begin(key, fp, token, lease).await.unwrap(), Begin::Claimed);
    assert!(store.renew(key, token, lease).await.unwrap());
    assert!(store.renew(key, token, lease).await.unwrap());
    for _ in 0..2 {
        assert_eq!(
            store.complete(key, token, record.clone(), ttl).await.unwrap(),
            Completion::Stored
        );
    }
    assert!(!store.renew(key, token, lease).await.unwrap(), "completed, not renewable");
    store.release(key, token).await.unwrap();
    assert_eq!(
        store.begin(key, fp, Token::random(), lease).await.unwrap(),
        Begin::Completed(record),
        "release does not touch a completed record"
    );

    let (key, fp) = fresh("repeat-release");
    assert_eq!(store.begin(key, fp, token, lease).await.unwrap(), Begin::Claimed);
    store.release(key, Token::random()).await.unwrap();
    assert!(
        matches!(
            store.begin(key, fp, Token::random(), lease).await.unwrap(),
            Begin::InProgress { .. }
        ),
        "a stranger's release does nothing"
    );
    store.release(key, token).await.unwrap();
    store.release(key, token).await.unwrap();
    assert_eq!(store.begin(key, fp, Token::random(), lease).await.unwrap(), Begin::Claimed);
}

/// `begin` on a held key reports the holder's remaining lease, or a mismatch
/// for other arguments.
CurrentThread fn in_progress_reports_what_is_left_of_the_lease(backend) {
    let store = backend.store().await;
    let Timing { lease, .. } = backend.timing();
    let (key, fp) = fresh("retry-after");
    assert_eq!(store.begin(key, fp, Token::random(), lease).await.unwrap(), Begin::Claimed);
    tokio::time::sleep(lease / 4).await;
    match store.begin(key, fp, Token::random(), lease).await.unwrap() {
        Begin::InProgress { retry_after } => {
            assert!(retry_after <= lease - lease / 4, "{retry_after:?}");
            assert!(retry_after > Duration::ZERO);
        }
        other => panic!("expected InProgress, got {other:?}"),
    }
    assert_eq!(
        store.begin(key, other_fingerprint(), Token::random(), lease).await.unwrap(),
        Begin::Mismatch
    );
}

/// After its TTL a completed key runs again.
CurrentThread fn completed_records_expire_after_their_ttl(backend) {
    let store = backend.store().await;
    let timing = backend.timing();
    let caller = Caller::new(&handle(&store), timing);
    let (key, fp) = fresh("ttl");
    let runs = Runs::default();
    let run = || async {
        caller.run(key, fp, async { Ok::<_, Failure>(runs.mark()) }).await
    };
    // The record is younger than this, from its first run on.
    let written = tokio::time::Instant::now();
    assert_eq!(run().await.unwrap(), 1);
    // Late in the TTL, not only halfway: a record kept for most of it is
    // not kept for it.
    tokio::time::sleep(timing.ttl.mul_f64(0.85)).await;
    let replayed = run().await.unwrap();
    // A machine that overslept past the TTL cannot tell: the record may be
    // gone, rightly.
    if written.elapsed() < timing.ttl {
        assert_eq!(replayed, 1, "still within the TTL");
    }
    tokio::time::sleep(timing.ttl.mul_f64(0.65)).await;
    assert_eq!(run().await.unwrap(), 2, "the TTL ran out");
}

/// Claims sent at once from many processes (store clients that share no
/// handle, so nothing coalesces them before the store): exactly one is
/// granted, and one body runs for many handles' calls.
MultiThread fn concurrent_claims_from_many_processes_grant_one(backend) {
    let store = backend.store().await;
    let timing = backend.timing();
    let (key, fp) = fresh("claim-race");
    let gate = Arc::new(tokio::sync::Barrier::new(64));
    let mut claims = JoinSet::new();
    for _ in 0..64 {
        let (store, gate) = (Arc::clone(&store), Arc::clone(&gate));
        claims.spawn(async move {
            gate.wait().await;
            store.begin(key, fp, Token::random(), timing.lease).await
        });
    }
    let answers = claims.join_all().await;
    let granted = answers
        .iter()
        .filter(|answer| matches!(answer, Ok(Begin::Claimed)))
        .count();
    assert_eq!(granted, 1, "one claim granted: {answers:?}");
    assert!(
        answers
            .iter()
            .all(|answer| matches!(answer, Ok(Begin::Claimed | Begin::InProgress { .. }))),
        "the others find it in progress: {answers:?}"
    );

    let (key, fp) = fresh("handle-race");
    let runs = Runs::default();
    let gate = Arc::new(tokio::sync::Barrier::new(16));
    let mut calls = JoinSet::new();
    for _ in 0..16 {
        let caller = Caller::new(&handle(&store), timing).wait_timeout(Duration::from_secs(30));
        let (runs, gate) = (runs.clone(), Arc::clone(&gate));
        calls.spawn(async move {
            gate.wait().await;
            caller
                .run(key, fp, async move {
                    runs.mark();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Ok::<_, Failure>(Token::random().to_string())
                })
                .await
        });
    }
    let results: Vec<String> = calls
        .join_all()
        .await
        .into_iter()
        .map(|r| r.expect("every call gets the result"))
        .collect();
    assert_eq!(runs.count(), 1, "one body ran for sixteen handles");
    assert!(results.iter().all(|r| *r == results[0]), "identical results");
}

/// A record keeps its type tag, byte for byte as [`Record::encode`] gives
/// it: a store that dropped it would hand a result to a call of another
/// type to decode as its own.
CurrentThread fn records_keep_their_type_tag(backend) {
    let store = backend.store().await;
    let Timing { lease, ttl } = backend.timing();
    let (key, fp) = fresh("type-tag");
    let token = Token::random();
    let record = Record::new(Outcome::Ok, &br#"{"amount":5}"#[..]).with_type_tag(0x0123_4567_89ab_cdef);
    assert_eq!(store.begin(key, fp, token, lease).await.unwrap(), Begin::Claimed);
    assert_eq!(
        store.complete(key, token, record.clone(), ttl).await.unwrap(),
        Completion::Stored
    );
    match store.begin(key, fp, Token::random(), lease).await.unwrap() {
        Begin::Completed(kept) => {
            assert_eq!(kept.type_tag(), Some(0x0123_4567_89ab_cdef), "the tag is kept");
            assert_eq!(kept.encode(), record.encode(), "kept as encoded");
        }
        other => panic!("expected the completed record, got {other:?}"),
    }
}

/// A store's [`watch`](Store::watch), when it offers one, wakes a waiter in
/// another process as soon as the holder's record is stored: a waiter
/// that trusts a wake-up that never comes waits out the lease.
CurrentThread fn a_watch_wakes_a_waiter_elsewhere_soon(backend) {
    let store = backend.store().await;
    let timing = backend.timing();
    let (key, fp) = fresh("watch-wakes");
    if store.watch(key).is_none() {
        // No wake-ups: waiters poll, as the waiting tests check.
        return;
    }
    let returned = Arc::new(std::sync::Mutex::new(None));
    let holder = {
        let returned = Arc::clone(&returned);
        Caller::new(&handle(&store), timing)
            .hold(key, fp, async move {
                tokio::time::sleep(timing.lease / 4).await;
                *returned.lock().unwrap() = Some(tokio::time::Instant::now());
                Ok("holder's".to_owned())
            })
            .await
    };
    let waited = Caller::new(&handle(&store), timing)
        .run(key, fp, async { Ok::<_, Failure>("waiter's".to_owned()) })
        .await;
    let answered = tokio::time::Instant::now();
    assert_eq!(waited.expect("the holder's result"), "holder's");
    assert_eq!(holder.await.expect("holder").expect("result"), "holder's");
    let returned = returned.lock().unwrap().expect("the holder's body returned");
    let late = answered.duration_since(returned);
    assert!(
        late < timing.lease / 4,
        "the waiter was answered {late:?} after the holder's body returned (lease {:?})",
        timing.lease
    );
}

/// `()`, `None`, `0`, `""`, `[]`, `false` and `0.0` replay exactly.
CurrentThread fn falsy_results_replay_exactly(backend) {
    let store = backend.store().await;
    let caller = Caller::new(&handle(&store), backend.timing());
    replays_exactly(&caller, (), ()).await;
    replays_exactly(&caller, None, Some(1_u8)).await;
    replays_exactly(&caller, 0_i64, 1).await;
    replays_exactly(&caller, String::new(), "x".to_owned()).await;
    replays_exactly(&caller, Vec::<u8>::new(), vec![1]).await;
    replays_exactly(&caller, false, true).await;
    replays_exactly(&caller, 0.0_f64, 1.0).await;
}

/// A stored result that no longer decodes as `T` is `Error::Decode`, never a
/// panic, and the body does not run.
CurrentThread fn undecodable_record_is_a_decode_error(backend) {
    let store = backend.store().await;
    let caller = Caller::new(&handle(&store), backend.timing());
    let (key, fp) = fresh("decode");
    let stored = caller
        .run(key, fp, async { Ok::<_, Failure>("not a number".to_owned()) })
        .await;
    assert_eq!(stored.unwrap(), "not a number");
    let runs = Runs::default();
    let changed: Result<u64, _> = caller.run(key, fp, async { Ok(runs.mark() as u64) }).await;
    assert!(matches!(changed, Err(Failure::Idem(Error::Decode(_)))), "{changed:?}");
    assert_eq!(runs.count(), 0);
}

/// A caller dropped mid-body leaves its claim: others see `InProgress` until
/// the lease lapses, then one of them runs.
CurrentThread fn dropped_caller_leaves_claim_to_lapse(backend) {
    let store = backend.store().await;
    let timing = backend.timing();
    let caller = Caller::new(&handle(&store), timing);
    let (key, fp) = fresh("dropped");
    let runs = Runs::default();
    let doomed = {
        let runs = runs.clone();
        caller
            .hold(key, fp, async move {
                runs.mark();
                std::future::pending::<Result<u32, Failure>>().await
            })
            .await
    };
    doomed.abort();
    assert!(doomed.await.unwrap_err().is_cancelled());

    let refused = caller
        .clone()
        .reject()
        .run(key, fp, async { Ok::<_, Failure>(0_u32) })
        .await;
    assert!(matches!(refused, Err(Failure::Idem(Error::InProgress { .. }))), "{refused:?}");
    // A waiter outlasts the abandoned lease, then runs the body itself.
    let waited = caller
        .clone()
        .wait_timeout(timing.lease * 3)
        .run(key, fp, async { Ok::<_, Failure>(runs.mark() as u32) })
        .await;
    assert_eq!(waited.expect("runs after the lease lapsed"), 2);
}

/// A body that runs for several leases keeps its claim through renewal.
CurrentThread fn renewal_keeps_a_long_call_claimed(backend) {
    let store = backend.store().await;
    let timing = backend.timing();
    let (key, fp) = fresh("renewal");
    let runs = Runs::default();
    let holder = {
        let runs = runs.clone();
        Caller::new(&handle(&store), timing)
            .hold(key, fp, async move {
                runs.mark();
                tokio::time::sleep(timing.lease * 3).await;
                Ok(runs.count())
            })
            .await
    };
    let elsewhere = Caller::new(&handle(&store), timing).reject();
    for _ in 0..4 {
        tokio::time::sleep(timing.lease / 2).await;
        let refused = elsewhere
            .run(key, fp, async { Ok::<_, Failure>(runs.mark()) })
            .await;
        assert!(matches!(refused, Err(Failure::Idem(Error::InProgress { .. }))), "{refused:?}");
    }
    assert_eq!(holder.await.expect("holder").expect("result"), 1);
    assert_eq!(runs.count(), 1);
}

/// A waiter gives up with `InProgress` after its wait timeout, in the same
/// process and in another.
CurrentThread fn waiting_gives_up_after_wait_timeout(backend) {
    let store = backend.store().await;
    let timing = backend.timing();
    let here = handle(&store);
    let (key, fp) = fresh("wait-timeout");
    let (go, gate) = oneshot::channel::<()>();
    let holder = Caller::new(&here, timing)
        .hold(key, fp, async move {
            let _ = gate.await;
            Ok(1_u8)
        })
        .await;
    for idem in [here.clone(), handle(&store)] {
        let gave_up = Caller::new(&idem, timing)
            .wait_timeout(timing.lease / 4)
            .run(key, fp, async { Ok::<_, Failure>(2_u8) })
            .await;
        match gave_up {
            Err(Failure::Idem(Error::InProgress { retry_after })) => {
                assert!(retry_after <= timing.lease, "{retry_after:?}");
            }
            other => panic!("expected InProgress, got {other:?}"),
        }
    }
    go.send(()).expect("the holder waits");
    assert_eq!(holder.await.expect("holder").expect("result"), 1);
}

/// A waiter in another process (another handle: no in-process coalescing)
/// gets the holder's result through the store once it completes.
CurrentThread fn waiter_elsewhere_gets_the_holders_result(backend) {
    let store = backend.store().await;
    let timing = backend.timing();
    let (key, fp) = fresh("wait-elsewhere");
    let runs = Runs::default();
    let holder = {
        let runs = runs.clone();
        Caller::new(&handle(&store), timing)
            .hold(key, fp, async move {
                runs.mark();
                tokio::time::sleep(timing.lease / 2).await;
                Ok("holder's".to_owned())
            })
            .await
    };
    let waited = Caller::new(&handle(&store), timing)
        .run(key, fp, async { Ok::<_, Failure>(format!("waiter's {}", runs.mark())) })
        .await;
    assert_eq!(waited.expect("the holder's result"), "holder's");
    assert_eq!(holder.await.expect("holder").expect("result"), "holder's");
    assert_eq!(runs.count(), 1);
}

/// Map arguments fingerprint by content: a retry whose `HashMap` was built in
/// another order replays instead of being refused.
CurrentThread fn map_arguments_fingerprint_by_content(backend) {
    let store = backend.store().await;
    let caller = Caller::new(&handle(&store), backend.timing());
    let (key, _) = fresh("map-args");
    let forward: HashMap<String, u32> = (0..50).map(|i| (format!("item-{i}"), i)).collect();
    let backward: HashMap<String, u32> = (0..50).rev().map(|i| (format!("item-{i}"), i)).collect();
    let runs = Runs::default();
    for args in [&forward, &backward] {
        let fp = Fingerprint::of(&(args,)).expect("a fingerprint");
        let result = caller.run(key, fp, async { Ok::<_, Failure>(runs.mark()) }).await;
        assert_eq!(result.expect("ran or replayed"), 1);
    }
}

/// A `complete` whose answer is lost (it landed, the caller saw a timeout)
/// is retried: retries replay and the body ran once.
CurrentThread fn a_complete_whose_answer_is_lost_is_retried(backend) {
    let flaky = Arc::new(Flaky::new(backend.store().await));
    flaky.inject(Op::Complete, Fault::AnswerLost);
    a_failed_complete_is_retried(backend, flaky).await;
}

/// A `complete` that never reached the store is retried: retries replay and
/// the body ran once.
CurrentThread fn a_complete_that_times_out_is_retried(backend) {
    let flaky = Arc::new(Flaky::new(backend.store().await));
    flaky.inject(Op::Complete, Fault::Refused);
    flaky.inject(Op::Complete, Fault::Refused);
    a_failed_complete_is_retried(backend, flaky).await;
}

/// A `release` that fails once is retried, so a retry of the failed call
/// runs at once instead of waiting out the lease.
CurrentThread fn a_release_that_fails_is_retried(backend) {
    let flaky = Arc::new(Flaky::new(backend.store().await));
    flaky.inject(Op::Release, Fault::Refused);
    let caller = Caller::new(&Idempotency::from_arc(flaky.clone()), backend.timing()).reject();
    let (key, fp) = fresh("release-retried");
    let runs = Runs::default();
    let failed: Result<u32, _> = caller
        .run(key, fp, async { Err(Failure::Body(runs.mark() as u32)) })
        .await;
    assert!(matches!(failed, Err(Failure::Body(1))), "{failed:?}");
    assert_eq!(flaky.struck(Op::Release), 1);
    // A client's retry comes a moment later; without retried releases the key
    // would stay locked for the whole lease.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let retried = caller
        .run(key, fp, async { Ok::<_, Failure>(runs.mark() as u32) })
        .await;
    assert_eq!(retried.expect("the retry runs at once"), 2);
}

/// A `begin` whose answer is lost may have left a claim nobody owns; it is
/// cleared, so the caller's retry runs at once instead of waiting out the
/// lease.
CurrentThread fn a_begin_whose_answer_is_lost_does_not_lock_the_key(backend) {
    let flaky = Arc::new(Flaky::new(backend.store().await));
    flaky.inject(Op::Begin, Fault::AnswerLost);
    let caller = Caller::new(&Idempotency::from_arc(flaky.clone()), backend.timing()).reject();
    let (key, fp) = fresh("begin-lost");
    let runs = Runs::default();
    let failed = caller.run(key, fp, async { Ok::<_, Failure>(runs.mark()) }).await;
    match failed {
        Err(Failure::Idem(Error::Store(e))) => assert_eq!(e.kind(), StoreErrorKind::Timeout, "{e}"),
        other => panic!("expected a store error, got {other:?}"),
    }
    assert_eq!(runs.count(), 0, "the body did not run unguarded");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let retried = caller.run(key, fp, async { Ok::<_, Failure>(runs.mark()) }).await;
    assert_eq!(retried.expect("the retry runs at once"), 1);
}

/// Renewals that fail are retried at once: two failures in a row do not let
/// another process take over while the body still runs.
CurrentThread fn a_renewal_that_fails_is_retried_at_once(backend) {
    let store = backend.store().await;
    let timing = backend.timing();
    let flaky = Arc::new(Flaky::new(Arc::clone(&store)));
    flaky.inject(Op::Renew, Fault::Refused);
    flaky.inject(Op::Renew, Fault::Refused);
    let (key, fp) = fresh("renew-retried");
    let runs = Runs::default();
    let holder = {
        let runs = runs.clone();
        Caller::new(&Idempotency::from_arc(flaky.clone()), timing)
            .hold(key, fp, async move {
                runs.mark();
                tokio::time::sleep(timing.lease * 2).await;
                Ok(runs.count())
            })
            .await
    };
    let elsewhere = Caller::new(&handle(&store), timing).reject();
    // Without prompt retries the lease would lapse after one lease: probe
    // until one and a half, well before the body ends at two.
    for _ in 0..6 {
        tokio::time::sleep(timing.lease / 4).await;
        let refused = elsewhere.run(key, fp, async { Ok::<_, Failure>(runs.mark()) }).await;
        assert!(matches!(refused, Err(Failure::Idem(Error::InProgress { .. }))), "{refused:?}");
    }
    assert_eq!(holder.await.expect("holder").expect("result"), 1);
    assert_eq!(flaky.struck(Op::Renew), 2);
    assert_eq!(runs.count(), 1, "nobody took over");
}

/// A result that does not serialize is recorded as such: its own caller gets
/// it, retries get `NotReplayable`, and the body does not run again.
CurrentThread fn an_unserializable_result_is_recorded_not_run_again(backend) {
    let store = backend.store().await;
    let caller = Caller::new(&handle(&store), backend.timing());
    let (key, fp) = fresh("unserializable");
    let runs = Runs::default();
    // JSON keys are strings: a map keyed by tuples does not serialize.
    let value = || HashMap::from([((1_u8, 2_u8), runs.mark() as u8)]);
    let first = caller.run(key, fp, async { Ok::<_, Failure>(value()) }).await;
    assert_eq!(first.expect("its own caller gets the result"), HashMap::from([((1, 2), 1)]));
    for idem in [caller.clone(), Caller::new(&handle(&store), backend.timing())] {
        let retry = idem.run(key, fp, async { Ok::<_, Failure>(value()) }).await;
        match retry {
            Err(Failure::Idem(error @ Error::NotReplayable { .. })) => {
                assert_eq!(error.http_status(), 500);
                assert!(error.to_string().contains("key must be a string"), "{error}");
            }
            other => panic!("expected NotReplayable, got {other:?}"),
        }
    }
    assert_eq!(runs.count(), 1, "the body ran once");
}

/// A result whose `Serialize` panics is a result that does not serialize:
/// its own caller gets it, the claim is settled as having run, retries get
/// `NotReplayable` at once (they neither wait out a lease nor run the body
/// again).
CurrentThread fn a_result_whose_serialize_panics_is_recorded_not_run_again(backend) {
    #[derive(Debug, PartialEq, serde::Deserialize)]
    struct Fragile(u8);
    impl Serialize for Fragile {
        fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            panic!("Fragile does not serialize");
        }
    }
    let store = backend.store().await;
    let caller = Caller::new(&handle(&store), backend.timing());
    let (key, fp) = fresh("serialize-panics");
    let runs = Runs::default();
    let body = || async { Ok::<_, Failure>(Fragile(runs.mark() as u8)) };
    assert_eq!(caller.run(key, fp, body()).await.expect("its caller gets it"), Fragile(1));
    for idem in [caller.clone(), Caller::new(&handle(&store), backend.timing())] {
        let started = std::time::Instant::now();
        let retry = idem.run(key, fp, body()).await;
        assert!(
            matches!(&retry, Err(Failure::Idem(Error::NotReplayable { .. }))),
            "{retry:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5), "answered at once");
    }
    assert_eq!(runs.count(), 1, "the body ran once");
}

/// With errors cached, an `Err` that does not serialize comes back to its
/// caller as itself, not as an encoding error; it is recorded like an
/// unserializable result.
CurrentThread fn an_unserializable_cached_error_comes_back_as_itself(backend) {
    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    enum Odd {
        Detail(HashMap<(u8, u8), u8>),
        Idem(String),
    }
    impl From<Error> for Odd {
        fn from(error: Error) -> Self {
            Self::Idem(error.to_string())
        }
    }
    let store = backend.store().await;
    let caller = Caller::new(&handle(&store), backend.timing());
    let (key, fp) = fresh("unserializable-error");
    let runs = Runs::default();
    let odd = || Odd::Detail(HashMap::from([((1, 1), runs.mark() as u8)]));
    let first: Result<u8, Odd> = caller.run_caching_errors(key, fp, |_| true, async { Err(odd()) }).await;
    assert_eq!(first, Err(Odd::Detail(HashMap::from([((1, 1), 1)]))));
    let retry: Result<u8, Odd> = caller.run_caching_errors(key, fp, |_| true, async { Err(odd()) }).await;
    assert!(matches!(&retry, Err(Odd::Idem(m)) if m.contains("could not be stored")), "{retry:?}");
    assert_eq!(runs.count(), 1);
}

/// Callers that joined a failing attempt get its outcome at once instead of
/// each running the body in turn; a later retry runs it again.
CurrentThread fn waiters_share_a_failed_attempt(backend) {
    let store = backend.store().await;
    let caller = Caller::new(&handle(&store), backend.timing());
    let (key, fp) = fresh("shared-failure");
    let runs = Runs::default();
    let mut waiters = JoinSet::new();
    for _ in 0..10 {
        let (caller, runs) = (caller.clone(), runs.clone());
        waiters.spawn(async move {
            caller
                .run(key, fp, async move {
                    runs.mark();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Err::<u8, _>(Failure::Body(7))
                })
                .await
        });
    }
    let outcomes = waiters.join_all().await;
    assert_eq!(runs.count(), 1, "one attempt for ten concurrent callers");
    let (leader, followers): (Vec<_>, Vec<_>) = outcomes
        .iter()
        .partition(|outcome| matches!(outcome, Err(Failure::Body(7))));
    assert_eq!(leader.len(), 1, "{outcomes:?}");
    for follower in followers {
        match follower {
            Err(Failure::Idem(error @ Error::AttemptFailed)) => assert_eq!(error.http_status(), 503),
            other => panic!("expected AttemptFailed, got {other:?}"),
        }
    }
    let later = caller.run(key, fp, async { Ok::<_, Failure>(runs.mark()) }).await;
    assert_eq!(later.expect("a later retry runs again"), 2);
}

/// Set arguments fingerprint by content: equal `HashSet`s (alone, in a
/// struct, in a `Vec`) built in other orders replay, while a `Vec`'s order
/// still counts.
CurrentThread fn set_arguments_fingerprint_by_content(backend) {
    #[derive(Serialize)]
    struct Order<'a> {
        tags: &'a HashSet<String>,
        lines: Vec<&'a HashSet<String>>,
    }
    let store = backend.store().await;
    let caller = Caller::new(&handle(&store), backend.timing());
    let (key, _) = fresh("set-args");
    let forward: HashSet<String> = (0..64).map(|i| format!("tag-{i}")).collect();
    let mut backward = HashSet::with_capacity(1);
    for i in (0..64).rev() {
        backward.insert(format!("tag-{i}"));
    }
    assert_ne!(
        forward.iter().collect::<Vec<_>>(),
        backward.iter().collect::<Vec<_>>(),
        "the two sets iterate in different orders"
    );
    let runs = Runs::default();
    for set in [&forward, &backward] {
        let fp = Fingerprint::of(&(set, Order { tags: set, lines: vec![set, set] })).expect("a fingerprint");
        let result = caller.run(key, fp, async { Ok::<_, Failure>(runs.mark()) }).await;
        assert_eq!(result.expect("ran or replayed"), 1);
    }
    let sorted: BTreeSet<&String> = forward.iter().collect();
    let ascending: Vec<&String> = sorted.iter().copied().collect();
    let descending: Vec<&String> = sorted.iter().rev().copied().collect();
    assert_ne!(
        Fingerprint::of(&ascending).unwrap(),
        Fingerprint::of(&descending).unwrap(),
        "a Vec's order counts"
    );
}


/// `inspect` tells an absent key, a claim in progress and a completed record
/// apart, with their fingerprints and expiries, without decoding the result.
/// A store without it answers `Unsupported` (the trait's default).
CurrentThread fn inspect_tells_what_a_key_holds(backend) {
    let store = backend.store().await;
    let Timing { lease, ttl } = backend.timing();
    let (key, fp) = fresh("inspect");
    match store.inspect(key).await {
        Err(error) if error.kind() == StoreErrorKind::Unsupported => return,
        inspected => assert_eq!(inspected.unwrap(), Inspection::Absent, "a new key is absent"),
    }
    let token = Token::random();
    assert_eq!(store.begin(key, fp, token, lease).await.unwrap(), Begin::Claimed);
    tokio::time::sleep(lease / 4).await;
    match store.inspect(key).await.unwrap() {
        Inspection::InProgress { fingerprint, expires_in, held_for } => {
            assert_eq!(fingerprint, fp);
            assert!(expires_in > Duration::ZERO && expires_in <= lease - lease / 4 + Duration::from_millis(5), "{expires_in:?}");
            if let Some(held_for) = held_for {
                assert!(held_for + Duration::from_millis(5) >= lease / 4 && held_for <= lease, "{held_for:?}");
            }
        }
        other => panic!("expected a claim in progress, got {other:?}"),
    }
    let record = Record::new(Outcome::Ok, b"\"done\"".to_vec());
    assert_eq!(store.complete(key, token, record, ttl).await.unwrap(), Completion::Stored);
    match handle(&store).inspect(key).await.unwrap() {
        Inspection::Completed { outcome, fingerprint, stored_at, expires_in, size } => {
            assert_eq!((outcome, fingerprint, size), (Outcome::Ok, fp, 6));
            assert!(expires_in > ttl / 2 && expires_in <= ttl, "{expires_in:?}");
            if let Some(stored_at) = stored_at {
                let skew = match std::time::SystemTime::now().duration_since(stored_at) {
                    Ok(ago) => ago,
                    Err(ahead) => ahead.duration(),
                };
                assert!(skew < Duration::from_secs(60), "stored {skew:?} away from now");
            }
        }
        other => panic!("expected a completed record, got {other:?}"),
    }
}

/// `forget` deletes a completed record (the next call runs again) and a
/// claim (the next caller claims at once; the old holder finds it lost).
/// A store without it answers `Unsupported` (the trait's default).
CurrentThread fn forget_deletes_records_and_claims(backend) {
    let store = backend.store().await;
    let timing = backend.timing();
    let idem = handle(&store);
    let caller = Caller::new(&idem, timing);
    let (key, fp) = fresh("forget");
    let runs = Runs::default();
    let run = || async { caller.run(key, fp, async { Ok::<_, Failure>(runs.mark()) }).await };
    assert_eq!(run().await.unwrap(), 1);
    assert_eq!(run().await.unwrap(), 1, "replayed");
    match idem.forget(key).await {
        Err(Error::Store(error)) if error.kind() == StoreErrorKind::Unsupported => return,
        forgotten => assert!(forgotten.unwrap(), "there was a record"),
    }
    // `inspect` is optional on its own.
    match idem.inspect(key).await {
        Err(Error::Store(error)) if error.kind() == StoreErrorKind::Unsupported => {}
        inspected => assert_eq!(inspected.unwrap(), Inspection::Absent),
    }
    assert!(!idem.forget(key).await.unwrap(), "nothing left to forget");
    assert_eq!(run().await.unwrap(), 2, "a forgotten key runs again");

    let (claimed, fp) = fresh("forget-claim");
    let holder = Token::random();
    assert_eq!(store.begin(claimed, fp, holder, timing.lease).await.unwrap(), Begin::Claimed);
    assert!(store.forget(claimed).await.unwrap(), "there was a claim");
    assert_eq!(store.begin(claimed, fp, Token::random(), timing.lease).await.unwrap(), Begin::Claimed);
    let record = Record::new(Outcome::Ok, b"1".to_vec());
    assert_eq!(
        store.complete(claimed, holder, record, timing.ttl).await.unwrap(),
        Completion::Lost,
        "the forgotten holder is fenced"
    );
}

/// Claims made more than an age ago are listed however often renewed;
/// younger claims and completed records are not. A store without the
/// listing answers `Unsupported` (the trait's default).
CurrentThread fn old_claims_are_listed(backend) {
    let store = backend.store().await;
    let Timing { lease, ttl } = backend.timing();
    if let Err(error) = store.claims_older_than(Duration::ZERO, 1).await
        && error.kind() == StoreErrorKind::Unsupported
    {
        return;
    }
    let (key, fp) = fresh("old-claims");
    let token = Token::random();
    assert_eq!(store.begin(key, fp, token, lease).await.unwrap(), Begin::Claimed);
    tokio::time::sleep(lease / 2).await;
    assert!(store.renew(key, token, lease).await.unwrap());
    let listed = |claims: Vec<idem_core::HeldClaim>| claims.into_iter().find(|claim| claim.key == key);
    let old = listed(store.claims_older_than(lease / 4, 100_000).await.unwrap())
        .expect("a claim held for half a lease is older than a quarter");
    assert_eq!(old.fingerprint, fp);
    assert!(old.held_for + Duration::from_millis(5) >= lease / 2, "{:?}", old.held_for);
    assert!(old.expires_in > lease / 2, "renewed: {:?}", old.expires_in);
    assert!(listed(store.claims_older_than(lease * 100, 100_000).await.unwrap()).is_none());
    let record = Record::new(Outcome::Ok, b"1".to_vec());
    assert_eq!(store.complete(key, token, record, ttl).await.unwrap(), Completion::Stored);
    assert!(listed(store.claims_older_than(Duration::ZERO, 100_000).await.unwrap()).is_none());
}

/// A step journal: appended only by the live claim's holder, in order, a
/// name's first value kept; it outlives a released claim so that the next
/// holder resumes from it, refuses a holder whose lease lapsed, and is
/// deleted by `forget`. A store without journals answers `Unsupported` to
/// both operations.
CurrentThread fn step_journal_is_fenced_and_outlives_a_release(backend) {
    let store = backend.store().await;
    let Timing { lease, ttl } = backend.timing();
    let (key, fp) = fresh("steps");
    let step = |name: &str, value: &str| JournaledStep::new(name.to_owned(), value.as_bytes().to_vec());
    let first = Token::random();
    assert_eq!(store.begin(key, fp, first, lease).await.unwrap(), Begin::Claimed);
    let append = |token: Token, name: &'static str, value: &'static str| {
        let store = &store;
        async move {
            store
                .append_step(key, token, name.to_owned(), value.as_bytes().to_vec(), ttl)
                .await
        }
    };
    match store.steps(key).await {
        Err(error) if error.kind() == StoreErrorKind::Unsupported => {
            let appended = append(first, "a", "1").await;
            assert_eq!(appended.unwrap_err().kind(), StoreErrorKind::Unsupported);
            return;
        }
        steps => assert_eq!(steps.unwrap(), vec![], "a new key has no journal"),
    }
    assert!(append(first, "a", "1").await.unwrap());
    assert!(append(first, "b", "2").await.unwrap());
    assert!(append(first, "a", "other").await.unwrap(), "a repeated append is harmless");
    assert!(!append(Token::random(), "x", "3").await.unwrap(), "not the holder");
    assert_eq!(store.steps(key).await.unwrap(), vec![step("a", "1"), step("b", "2")]);

    store.release(key, first).await.unwrap();
    assert!(!append(first, "c", "3").await.unwrap(), "released");
    assert_eq!(store.steps(key).await.unwrap().len(), 2, "the journal outlives the release");

    let second = Token::random();
    assert_eq!(store.begin(key, fp, second, lease).await.unwrap(), Begin::Claimed);
    assert!(append(second, "c", "3").await.unwrap());
    tokio::time::sleep(lease + lease / 2).await;
    let third = Token::random();
    assert_eq!(store.begin(key, fp, third, lease).await.unwrap(), Begin::Claimed);
    assert!(!append(second, "d", "4").await.unwrap(), "the lapsed holder is fenced");
    assert!(append(third, "d", "5").await.unwrap());
    assert_eq!(
        store.steps(key).await.unwrap(),
        vec![step("a", "1"), step("b", "2"), step("c", "3"), step("d", "5")]
    );

    // `forget` is optional on its own.
    if let Some(forgotten) = supported(store.forget(key).await) {
        assert!(forgotten);
        assert_eq!(store.steps(key).await.unwrap(), vec![], "forget deletes the journal");
    }
}



/// A journal expires with its call: after the call's record and journal
/// expired, the key has no journal, and a name the old journal had,
/// appended again by a new claim, is listed in the order of the new
/// appends, after the entries appended before it, not in its old place.
CurrentThread fn an_expired_journal_starts_afresh_in_append_order(backend) {
    let store = backend.store().await;
    let Timing { lease, ttl } = backend.timing();
    let (key, fp) = fresh("expired-journal");
    let step = |name: &str, value: &str| JournaledStep::new(name.to_owned(), value.as_bytes().to_vec());
    let first = Token::random();
    assert_eq!(store.begin(key, fp, first, lease).await.unwrap(), Begin::Claimed);
    match store.append_step(key, first, "b".to_owned(), b"old".to_vec(), lease).await {
        Err(error) if error.kind() == StoreErrorKind::Unsupported => return,
        appended => assert!(appended.unwrap()),
    }
    let record = Record::new(Outcome::Ok, b"1".to_vec());
    assert_eq!(store.complete(key, first, record, lease).await.unwrap(), Completion::Stored);
    tokio::time::sleep(lease + lease / 2).await;
    assert_eq!(store.steps(key).await.unwrap(), vec![], "expired with its call");

    let second = Token::random();
    assert_eq!(store.begin(key, fp, second, lease).await.unwrap(), Begin::Claimed);
    for (name, value) in [("a", "1"), ("b", "2")] {
        let appended = store.append_step(key, second, name.to_owned(), value.as_bytes().to_vec(), ttl);
        assert!(appended.await.unwrap(), "{name}");
    }
    assert_eq!(store.steps(key).await.unwrap(), vec![step("a", "1"), step("b", "2")]);
}

/// Fencing epochs: given only to the live claim's holder, each larger than
/// every one given for the key before (to any claim), so that the claim
/// that takes over a lapsed one is given larger epochs than the stale
/// holder ever had; refused to a stale holder, a stranger and a completed
/// call; still increasing after `forget`. A store without epochs answers
/// `Unsupported`.
CurrentThread fn fencing_epochs_increase_with_every_claim(backend) {
    let store = backend.store().await;
    let Timing { lease, ttl } = backend.timing();
    let (key, fp) = fresh("epochs");
    let first = Token::random();
    assert_eq!(store.begin(key, fp, first, lease).await.unwrap(), Begin::Claimed);
    let one = match store.epoch(key, first, ttl).await {
        Err(error) if error.kind() == StoreErrorKind::Unsupported => return,
        epoch => epoch.unwrap().expect("the holder is given an epoch"),
    };
    let two = store.epoch(key, first, ttl).await.unwrap().expect("and again");
    assert!(two > one, "{two} > {one}");
    assert_eq!(store.epoch(key, Token::random(), ttl).await.unwrap(), None, "a stranger");

    tokio::time::sleep(lease + lease / 2).await;
    let second = Token::random();
    assert_eq!(store.begin(key, fp, second, lease).await.unwrap(), Begin::Claimed);
    assert_eq!(store.epoch(key, first, ttl).await.unwrap(), None, "the lapsed holder");
    let three = store.epoch(key, second, ttl).await.unwrap().expect("the new holder");
    assert!(three > two, "the claim that took over: {three} > {two}");

    store.release(key, second).await.unwrap();
    let third = Token::random();
    assert_eq!(store.begin(key, fp, third, lease).await.unwrap(), Begin::Claimed);
    let four = store.epoch(key, third, ttl).await.unwrap().expect("after a release");
    assert!(four > three, "{four} > {three}");
    let record = Record::new(Outcome::Ok, &b"1"[..]);
    assert_eq!(store.complete(key, third, record, ttl).await.unwrap(), Completion::Stored);
    assert_eq!(store.epoch(key, third, ttl).await.unwrap(), None, "a completed call");

    // `forget` is optional on its own.
    let Some(forgotten) = supported(store.forget(key).await) else {
        return;
    };
    assert!(forgotten);
    let fourth = Token::random();
    assert_eq!(store.begin(key, fp, fourth, lease).await.unwrap(), Begin::Claimed);
    let five = store.epoch(key, fourth, ttl).await.unwrap().expect("after forget");
    assert!(five > four, "{five} > {four}");
}

}
