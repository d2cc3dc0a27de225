//! The store conformance suite: the behaviour every backend must show, run
//! through the engine and through the raw store protocol.
//!
//! A backend implements [`Backend`] and instantiates the suite with
//! [`conformance_suite!`](crate::conformance_suite), which writes one `#[test]`
//! per behaviour, so the memory store, a Redis node and a Redis Cluster cannot
//! drift apart.

use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use idem_core::{
    Begin, Completion, Error, Fingerprint, Idempotency, Key, OnConflict, Outcome, Record, Store,
    StoreFuture, Token, Watch,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

/// A store backend under test.
pub trait Backend: Sync {
    /// A store handle for one test. Handles may share a server: every test
    /// uses operation names of its own.
    fn store(&self) -> impl Future<Output = Arc<dyn Store>> + Send;

    /// The lease and TTL the suite uses: short enough to wait out.
    fn timing(&self) -> Timing;

    /// Whether the backend follows tokio's clock, so tests may pause it.
    fn follows_tokio_clock(&self) -> bool;
}

/// Lease and TTL for a backend's tests.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// The claims' lease.
    pub lease: Duration,
    /// The records' TTL.
    pub ttl: Duration,
}

/// Runs one suite test on a runtime fit for `backend`: a paused current-thread
/// runtime when the backend follows tokio's clock, a real-time one otherwise,
/// and a two-worker runtime when `multi_thread`.
pub fn block_on<B: Backend, F: Future<Output = ()>>(backend: &B, multi_thread: bool, test: F) {
    let runtime = if multi_thread {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(backend.follows_tokio_clock())
            .build()
    };
    runtime.expect("a tokio runtime").block_on(test);
}

/// Writes one `#[test]` per conformance behaviour for the backend `$backend`
/// (an expression evaluated in each test).
#[macro_export]
macro_rules! conformance_suite {
    ($backend:expr) => {
        $crate::conformance_suite!(@tests $backend;
            current_thread:
                reject_lets_exactly_one_run,
                reused_key_with_other_arguments_is_refused,
                concurrent_reuse_with_other_arguments_is_refused,
                errors_are_not_cached_by_default,
                errors_are_cached_when_asked,
                error_predicate_picks_what_is_cached,
                stale_holder_is_fenced_in_the_store,
                stalled_holder_loses_to_a_takeover,
                store_operations_are_safe_to_repeat,
                in_progress_reports_what_is_left_of_the_lease,
                completed_records_expire_after_their_ttl,
                falsy_results_replay_exactly,
                undecodable_record_is_a_decode_error,
                dropped_caller_leaves_claim_to_lapse,
                renewal_keeps_a_long_call_claimed,
                waiting_gives_up_after_wait_timeout,
                waiter_elsewhere_gets_the_holders_result,
                map_arguments_fingerprint_by_content;
            multi_thread:
                thousand_concurrent_callers_share_one_run
        );
    };
    (@tests $backend:expr; current_thread: $($single:ident),*; multi_thread: $($multi:ident),*) => {
        $(
            #[test]
            fn $single() {
                let backend = $backend;
                $crate::conformance::block_on(
                    &backend,
                    false,
                    $crate::conformance::$single(&backend),
                );
            }
        )*
        $(
            #[test]
            fn $multi() {
                let backend = $backend;
                $crate::conformance::block_on(
                    &backend,
                    true,
                    $crate::conformance::$multi(&backend),
                );
            }
        )*
    };
}

/// The error of bodies whose errors are not cached.
#[derive(Debug)]
pub enum Failure {
    /// idem refused or failed.
    Idem(Error),
    /// The body failed.
    Body(u32),
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        Self::Idem(error)
    }
}

/// The error of bodies whose errors may be cached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cached {
    /// idem refused or failed (its message).
    Idem(String),
    /// A permanent failure, worth caching.
    Declined(u32),
    /// A passing failure, worth retrying.
    Transient,
}

impl From<Error> for Cached {
    fn from(error: Error) -> Self {
        Self::Idem(error.to_string())
    }
}

/// A key and fingerprint of their own for one test.
pub fn fresh(test: &str) -> (Key, Fingerprint) {
    let name = format!("conformance.{test}.{}", Token::random());
    (
        Key::new(&name, "key").expect("a key"),
        Fingerprint::of(&(test, 1)).expect("a fingerprint"),
    )
}

/// A fingerprint other than [`fresh`]'s.
pub fn other_fingerprint() -> Fingerprint {
    Fingerprint::of(&"other arguments").expect("a fingerprint")
}

/// Counts how often bodies ran.
#[derive(Debug, Clone, Default)]
pub struct Runs(Arc<AtomicUsize>);

impl Runs {
    /// Marks one run and returns its ordinal, from 1.
    pub fn mark(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// How many runs there were.
    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// A view of a store that does not coalesce with other views of it, as if it
/// were in another process.
pub struct Elsewhere(pub Arc<dyn Store>);

/// A view of a store whose lease renewals silently do nothing, as if the
/// holder stalled (a GC pause, a frozen VM) and could not renew.
pub struct Stalled(pub Arc<dyn Store>);

macro_rules! delegate {
    ($wrapper:ident, renew($self:ident, $key:ident, $token:ident, $lease:ident) => $renew:expr) => {
        impl Store for $wrapper {
            fn begin(
                &self,
                key: Key,
                fingerprint: Fingerprint,
                token: Token,
                lease: Duration,
            ) -> StoreFuture<'_, Begin> {
                self.0.begin(key, fingerprint, token, lease)
            }

            fn complete(
                &self,
                key: Key,
                token: Token,
                record: Record,
                ttl: Duration,
            ) -> StoreFuture<'_, Completion> {
                self.0.complete(key, token, record, ttl)
            }

            fn release(&self, key: Key, token: Token) -> StoreFuture<'_, ()> {
                self.0.release(key, token)
            }

            fn renew(&$self, $key: Key, $token: Token, $lease: Duration) -> StoreFuture<'_, bool> {
                $renew
            }

            fn watch(&self, key: Key) -> Option<Watch> {
                self.0.watch(key)
            }
        }
    };
}
delegate!(Elsewhere, renew(self, key, token, lease) => self.0.renew(key, token, lease));
delegate!(Stalled, renew(self, key, token, lease) => {
    let _ = (key, token, lease);
    Box::pin(std::future::ready(Ok(true)))
});

fn idem(store: &Arc<dyn Store>, timing: Timing) -> Idempotency<Arc<dyn Store>> {
    Idempotency::new(Arc::clone(store))
        .lease(timing.lease)
        .ttl(timing.ttl)
}

/// Starts `idem.run(key, fingerprint, body)` on a task of its own and returns
/// once the body runs, that is, once the key is claimed.
async fn hold<T, B>(
    idem: Idempotency<Arc<dyn Store>>,
    key: Key,
    fingerprint: Fingerprint,
    body: B,
) -> JoinHandle<Result<T, Failure>>
where
    T: Serialize + DeserializeOwned + Send + 'static,
    B: Future<Output = Result<T, Failure>> + Send + 'static,
{
    let (tell, began) = oneshot::channel();
    let holder = tokio::spawn(async move {
        idem.run(key, fingerprint, async move {
            let _ = tell.send(());
            body.await
        })
        .await
    });
    began.await.expect("the body started");
    holder
}

/// 1000 concurrent same-key calls: the body runs once and every caller gets
/// the identical result.
pub async fn thousand_concurrent_callers_share_one_run<B: Backend>(backend: &B) {
    let store = backend.store().await;
    let timing = backend.timing();
    let (key, fp) = fresh("storm");
    let runs = Runs::default();
    let mut callers = JoinSet::new();
    for _ in 0..1000 {
        let (store, runs) = (Arc::clone(&store), runs.clone());
        callers.spawn(async move {
            idem(&store, timing)
                .wait_timeout(Duration::from_secs(30))
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
    assert!(
        results.iter().all(|r| *r == results[0]),
        "identical results"
    );
}

/// `on_conflict = reject`: exactly one call runs; the others get `InProgress`
/// with a `retry_after` no longer than the lease.
pub async fn reject_lets_exactly_one_run<B: Backend>(backend: &B) {
    let store = backend.store().await;
    let timing = backend.timing();
    let (key, fp) = fresh("reject");
    let runs = Runs::default();
    let (go, gate) = oneshot::channel::<()>();
    let holder = {
        let runs = runs.clone();
        let reject = idem(&store, timing).on_conflict(OnConflict::Reject);
        hold(reject, key, fp, async move {
            runs.mark();
            let _ = gate.await;
            Ok(7_u32)
        })
        .await
    };
    for _ in 0..20 {
        let refused = idem(&store, timing)
            .on_conflict(OnConflict::Reject)
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
    let replay = idem(&store, timing)
        .on_conflict(OnConflict::Reject)
        .run(key, fp, async { Ok::<_, Failure>(0_u32) })
        .await;
    assert_eq!(replay.expect("a replay"), 7);
    assert_eq!(runs.count(), 1);
}

/// A completed key reused with other arguments is refused; an identical retry
/// still replays (the fingerprint survives completion).
pub async fn reused_key_with_other_arguments_is_refused<B: Backend>(backend: &B) {
    let store = backend.store().await;
    let timing = backend.timing();
    let (key, fp) = fresh("reuse");
    let runs = Runs::default();
    let body = || async { Ok::<_, Failure>(format!("run {}", runs.mark())) };
    let first = idem(&store, timing)
        .run(key, fp, body())
        .await
        .expect("first");
    let reused = idem(&store, timing)
        .run(key, other_fingerprint(), body())
        .await;
    assert!(
        matches!(reused, Err(Failure::Idem(Error::KeyReused))),
        "{reused:?}"
    );
    let retry = idem(&store, timing)
        .run(key, fp, body())
        .await
        .expect("retry");
    assert_eq!(first, retry);
    assert_eq!(runs.count(), 1);
}

/// A key reused with other arguments while the first call runs is refused at
/// once, not made to wait.
pub async fn concurrent_reuse_with_other_arguments_is_refused<B: Backend>(backend: &B) {
    let store = backend.store().await;
    let timing = backend.timing();
    let (key, fp) = fresh("reuse-in-flight");
    let (go, gate) = oneshot::channel::<()>();
    let holder = hold(idem(&store, timing), key, fp, async move {
        let _ = gate.await;
        Ok(1_u8)
    })
    .await;
    for store in [Arc::clone(&store), Arc::new(Elsewhere(Arc::clone(&store)))] {
        let reused = idem(&store, timing)
            .run(key, other_fingerprint(), async { Ok::<_, Failure>(2_u8) })
            .await;
        assert!(
            matches!(reused, Err(Failure::Idem(Error::KeyReused))),
            "{reused:?}"
        );
    }
    go.send(()).expect("the holder waits");
    assert_eq!(holder.await.expect("holder").expect("result"), 1);
}

/// By default an `Err` releases the claim: a retry runs the body again.
pub async fn errors_are_not_cached_by_default<B: Backend>(backend: &B) {
    let store = backend.store().await;
    let timing = backend.timing();
    let (key, fp) = fresh("errors-released");
    let runs = Runs::default();
    let failed: Result<u32, _> = idem(&store, timing)
        .run(key, fp, async { Err(Failure::Body(runs.mark() as u32)) })
        .await;
    assert!(matches!(failed, Err(Failure::Body(1))), "{failed:?}");
    let retried = idem(&store, timing)
        .run(key, fp, async { Ok::<_, Failure>(runs.mark() as u32) })
        .await;
    assert_eq!(retried.expect("the retry runs"), 2);
}

/// With errors cached, a retry replays the `Err`.
pub async fn errors_are_cached_when_asked<B: Backend>(backend: &B) {
    let store = backend.store().await;
    let timing = backend.timing();
    let (key, fp) = fresh("errors-cached");
    let runs = Runs::default();
    for _ in 0..3 {
        let result: Result<u32, Cached> = idem(&store, timing)
            .run_caching_errors(key, fp, |_| true, async {
                Err(Cached::Declined(runs.mark() as u32))
            })
            .await;
        assert_eq!(result, Err(Cached::Declined(1)));
    }
    assert_eq!(runs.count(), 1);
}

/// The caching predicate decides which errors are stored.
pub async fn error_predicate_picks_what_is_cached<B: Backend>(backend: &B) {
    let store = backend.store().await;
    let timing = backend.timing();
    let (key, fp) = fresh("errors-predicate");
    let runs = Runs::default();
    let permanent = |e: &Cached| matches!(e, Cached::Declined(_));
    let run = |outcome: Result<u32, Cached>| {
        let runs = runs.clone();
        let store = Arc::clone(&store);
        async move {
            idem(&store, timing)
                .run_caching_errors(key, fp, permanent, async move {
                    runs.mark();
                    outcome
                })
                .await
        }
    };
    assert_eq!(run(Err(Cached::Transient)).await, Err(Cached::Transient));
    assert_eq!(
        run(Err(Cached::Declined(9))).await,
        Err(Cached::Declined(9))
    );
    assert_eq!(run(Ok(1)).await, Err(Cached::Declined(9)));
    assert_eq!(
        runs.count(),
        2,
        "the transient error was retried, the decline replayed"
    );
}

/// Raw protocol: a holder whose lease lapsed is fenced. A second token takes
/// over; the stale `complete` is `Lost` and does not overwrite the newer
/// record.
pub async fn stale_holder_is_fenced_in_the_store<B: Backend>(backend: &B) {
    let store = backend.store().await;
    let Timing { lease, ttl } = backend.timing();
    let (key, fp) = fresh("fencing");
    let (stale, fresh_token, reader) = (Token::random(), Token::random(), Token::random());
    let stale_record = Record::new(Outcome::Ok, &b"\"stale\""[..]);
    let newer_record = Record::new(Outcome::Ok, &b"\"newer\""[..]);

    assert_eq!(
        store.begin(key, fp, stale, lease).await.unwrap(),
        Begin::Claimed
    );
    tokio::time::sleep(lease + lease / 2).await;
    assert_eq!(
        store.begin(key, fp, fresh_token, lease).await.unwrap(),
        Begin::Claimed
    );
    assert!(
        !store.renew(key, stale, lease).await.unwrap(),
        "stale renew refused"
    );
    store.release(key, stale).await.unwrap();
    assert_eq!(
        store.complete(key, stale, stale_record, ttl).await.unwrap(),
        Completion::Lost
    );
    assert_eq!(
        store
            .complete(key, fresh_token, newer_record.clone(), ttl)
            .await
            .unwrap(),
        Completion::Stored
    );
    assert_eq!(
        store.begin(key, fp, reader, lease).await.unwrap(),
        Begin::Completed(newer_record)
    );
}

/// Through the engine: a holder that stalls past its lease without renewing
/// loses the key to a second caller, and its late result is not stored.
pub async fn stalled_holder_loses_to_a_takeover<B: Backend>(backend: &B) {
    let store = backend.store().await;
    let timing = backend.timing();
    let (key, fp) = fresh("takeover");
    let stalled: Arc<dyn Store> = Arc::new(Stalled(Arc::clone(&store)));
    let holder = hold(idem(&stalled, timing), key, fp, async move {
        tokio::time::sleep(timing.lease * 3).await;
        Ok("stale".to_owned())
    })
    .await;
    tokio::time::sleep(timing.lease + timing.lease / 2).await;
    let other: Arc<dyn Store> = Arc::new(Elsewhere(Arc::clone(&store)));
    let taken = idem(&other, timing)
        .on_conflict(OnConflict::Reject)
        .run(key, fp, async { Ok::<_, Failure>("newer".to_owned()) })
        .await;
    assert_eq!(taken.expect("the takeover runs"), "newer");
    // The stale holder finishes: its own caller gets its result, the store
    // keeps the newer one.
    assert_eq!(holder.await.expect("holder").expect("result"), "stale");
    let replay = idem(&store, timing)
        .run(key, fp, async { Ok::<_, Failure>("third".to_owned()) })
        .await;
    assert_eq!(replay.expect("replay"), "newer");
}

/// Each protocol operation, repeated with the same token, is harmless.
pub async fn store_operations_are_safe_to_repeat<B: Backend>(backend: &B) {
    let store = backend.store().await;
    let Timing { lease, ttl } = backend.timing();
    let (key, fp) = fresh("repeat");
    let token = Token::random();
    let record = Record::new(Outcome::Ok, &b"[]"[..]);
    assert_eq!(
        store.begin(key, fp, token, lease).await.unwrap(),
        Begin::Claimed
    );
    assert_eq!(
        store.begin(key, fp, token, lease).await.unwrap(),
        Begin::Claimed
    );
    assert!(store.renew(key, token, lease).await.unwrap());
    assert!(store.renew(key, token, lease).await.unwrap());
    for _ in 0..2 {
        assert_eq!(
            store
                .complete(key, token, record.clone(), ttl)
                .await
                .unwrap(),
            Completion::Stored
        );
    }
    assert!(
        !store.renew(key, token, lease).await.unwrap(),
        "completed, not renewable"
    );
    store.release(key, token).await.unwrap();
    assert_eq!(
        store.begin(key, fp, Token::random(), lease).await.unwrap(),
        Begin::Completed(record),
        "release does not touch a completed record"
    );

    let (key, fp) = fresh("repeat-release");
    assert_eq!(
        store.begin(key, fp, token, lease).await.unwrap(),
        Begin::Claimed
    );
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
    assert_eq!(
        store.begin(key, fp, Token::random(), lease).await.unwrap(),
        Begin::Claimed
    );
}

/// `begin` on a held key reports the holder's remaining lease, or a mismatch
/// for other arguments.
pub async fn in_progress_reports_what_is_left_of_the_lease<B: Backend>(backend: &B) {
    let store = backend.store().await;
    let Timing { lease, .. } = backend.timing();
    let (key, fp) = fresh("retry-after");
    assert_eq!(
        store.begin(key, fp, Token::random(), lease).await.unwrap(),
        Begin::Claimed
    );
    tokio::time::sleep(lease / 4).await;
    match store.begin(key, fp, Token::random(), lease).await.unwrap() {
        Begin::InProgress { retry_after } => {
            assert!(retry_after <= lease - lease / 4, "{retry_after:?}");
            assert!(retry_after > Duration::ZERO);
        }
        other => panic!("expected InProgress, got {other:?}"),
    }
    assert_eq!(
        store
            .begin(key, other_fingerprint(), Token::random(), lease)
            .await
            .unwrap(),
        Begin::Mismatch
    );
}

/// After its TTL a completed key runs again.
pub async fn completed_records_expire_after_their_ttl<B: Backend>(backend: &B) {
    let store = backend.store().await;
    let timing = backend.timing();
    let (key, fp) = fresh("ttl");
    let runs = Runs::default();
    let run = || async {
        idem(&store, timing)
            .run(key, fp, async { Ok::<_, Failure>(runs.mark()) })
            .await
    };
    assert_eq!(run().await.unwrap(), 1);
    tokio::time::sleep(timing.ttl / 2).await;
    assert_eq!(run().await.unwrap(), 1, "still within the TTL");
    tokio::time::sleep(timing.ttl).await;
    assert_eq!(run().await.unwrap(), 2, "the TTL ran out");
}

async fn replays_exactly<T>(store: &Arc<dyn Store>, timing: Timing, value: T, other: T)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug + Clone,
{
    let (key, fp) = fresh(std::any::type_name::<T>());
    let first = idem(store, timing)
        .run(key, fp, async { Ok::<_, Failure>(value.clone()) })
        .await
        .expect("first");
    let replay = idem(store, timing)
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

/// `()`, `None`, `0`, `""`, `[]`, `false` and `0.0` replay exactly.
pub async fn falsy_results_replay_exactly<B: Backend>(backend: &B) {
    let store = backend.store().await;
    let t = backend.timing();
    replays_exactly(&store, t, (), ()).await;
    replays_exactly(&store, t, None, Some(1_u8)).await;
    replays_exactly(&store, t, 0_i64, 1).await;
    replays_exactly(&store, t, String::new(), "x".to_owned()).await;
    replays_exactly(&store, t, Vec::<u8>::new(), vec![1]).await;
    replays_exactly(&store, t, false, true).await;
    replays_exactly(&store, t, 0.0_f64, 1.0).await;
}

/// A stored result that no longer decodes as `T` is `Error::Decode`, never a
/// panic, and the body does not run.
pub async fn undecodable_record_is_a_decode_error<B: Backend>(backend: &B) {
    let store = backend.store().await;
    let timing = backend.timing();
    let (key, fp) = fresh("decode");
    let stored = idem(&store, timing)
        .run(key, fp, async {
            Ok::<_, Failure>("not a number".to_owned())
        })
        .await;
    assert_eq!(stored.unwrap(), "not a number");
    let runs = Runs::default();
    let changed: Result<u64, _> = idem(&store, timing)
        .run(key, fp, async { Ok(runs.mark() as u64) })
        .await;
    assert!(
        matches!(changed, Err(Failure::Idem(Error::Decode(_)))),
        "{changed:?}"
    );
    assert_eq!(runs.count(), 0);
}

/// A caller dropped mid-body leaves its claim: others see `InProgress` until
/// the lease lapses, then one of them runs.
pub async fn dropped_caller_leaves_claim_to_lapse<B: Backend>(backend: &B) {
    let store = backend.store().await;
    let timing = backend.timing();
    let (key, fp) = fresh("dropped");
    let runs = Runs::default();
    let doomed = {
        let runs = runs.clone();
        hold(idem(&store, timing), key, fp, async move {
            runs.mark();
            std::future::pending::<Result<u32, Failure>>().await
        })
        .await
    };
    doomed.abort();
    assert!(doomed.await.unwrap_err().is_cancelled());

    let refused = idem(&store, timing)
        .on_conflict(OnConflict::Reject)
        .run(key, fp, async { Ok::<_, Failure>(0_u32) })
        .await;
    assert!(
        matches!(refused, Err(Failure::Idem(Error::InProgress { .. }))),
        "{refused:?}"
    );
    // A waiter outlasts the abandoned lease, then runs the body itself.
    let waited = idem(&store, timing)
        .wait_timeout(timing.lease * 3)
        .run(key, fp, async { Ok::<_, Failure>(runs.mark() as u32) })
        .await;
    assert_eq!(waited.expect("runs after the lease lapsed"), 2);
}

/// A body that runs for several leases keeps its claim through renewal.
pub async fn renewal_keeps_a_long_call_claimed<B: Backend>(backend: &B) {
    let store = backend.store().await;
    let timing = backend.timing();
    let (key, fp) = fresh("renewal");
    let runs = Runs::default();
    let holder = {
        let runs = runs.clone();
        hold(idem(&store, timing), key, fp, async move {
            runs.mark();
            tokio::time::sleep(timing.lease * 3).await;
            Ok(runs.count())
        })
        .await
    };
    let other: Arc<dyn Store> = Arc::new(Elsewhere(Arc::clone(&store)));
    for _ in 0..4 {
        tokio::time::sleep(timing.lease / 2).await;
        let refused = idem(&other, timing)
            .on_conflict(OnConflict::Reject)
            .run(key, fp, async { Ok::<_, Failure>(runs.mark()) })
            .await;
        assert!(
            matches!(refused, Err(Failure::Idem(Error::InProgress { .. }))),
            "{refused:?}"
        );
    }
    assert_eq!(holder.await.expect("holder").expect("result"), 1);
    assert_eq!(runs.count(), 1);
}

/// A waiter gives up with `InProgress` after its wait timeout.
pub async fn waiting_gives_up_after_wait_timeout<B: Backend>(backend: &B) {
    let store = backend.store().await;
    let timing = backend.timing();
    let (key, fp) = fresh("wait-timeout");
    let (go, gate) = oneshot::channel::<()>();
    let holder = hold(idem(&store, timing), key, fp, async move {
        let _ = gate.await;
        Ok(1_u8)
    })
    .await;
    for store in [Arc::clone(&store), Arc::new(Elsewhere(Arc::clone(&store)))] {
        let gave_up = idem(&store, timing)
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

/// A waiter in another process (no in-process coalescing) gets the holder's
/// result through the store once it completes.
pub async fn waiter_elsewhere_gets_the_holders_result<B: Backend>(backend: &B) {
    let store = backend.store().await;
    let timing = backend.timing();
    let (key, fp) = fresh("wait-elsewhere");
    let runs = Runs::default();
    let holder = {
        let runs = runs.clone();
        hold(idem(&store, timing), key, fp, async move {
            runs.mark();
            tokio::time::sleep(timing.lease / 2).await;
            Ok("holder's".to_owned())
        })
        .await
    };
    let other: Arc<dyn Store> = Arc::new(Elsewhere(Arc::clone(&store)));
    let waited = idem(&other, timing)
        .run(key, fp, async {
            Ok::<_, Failure>(format!("waiter's {}", runs.mark()))
        })
        .await;
    assert_eq!(waited.expect("the holder's result"), "holder's");
    assert_eq!(holder.await.expect("holder").expect("result"), "holder's");
    assert_eq!(runs.count(), 1);
}

/// Map arguments fingerprint by content: a retry whose `HashMap` was built in
/// another order replays instead of being refused.
pub async fn map_arguments_fingerprint_by_content<B: Backend>(backend: &B) {
    use std::collections::HashMap;
    let store = backend.store().await;
    let timing = backend.timing();
    let (key, _) = fresh("map-args");
    let forward: HashMap<String, u32> = (0..50).map(|i| (format!("item-{i}"), i)).collect();
    let backward: HashMap<String, u32> = (0..50).rev().map(|i| (format!("item-{i}"), i)).collect();
    let runs = Runs::default();
    for args in [&forward, &backward] {
        let fp = Fingerprint::of(&(args,)).expect("a fingerprint");
        let result = idem(&store, timing)
            .run(key, fp, async { Ok::<_, Failure>(runs.mark()) })
            .await;
        assert_eq!(result.expect("ran or replayed"), 1);
    }
}
