//! The store conformance suite: the behaviour every backend must show, run
//! through [`Idempotency`] handles and through the raw store protocol.
//!
//! A backend implements [`Backend`] and instantiates the suite with
//! [`conformance_suite!`](crate::conformance_suite), which writes one
//! `#[test]` per behaviour. The memory store, a Redis node and a Redis
//! Cluster run the same suite, and so can a store outside this repository.
//!
//! Each test uses keys of its own, so tests may share one server. Two
//! handles on one store stand for two processes: they share records but not
//! in-process coalescing.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use idem_core::store::{Begin, Completion, Record, Store, StoreFuture, Token, Watch};
use idem_core::{Error, Fingerprint, Idempotency, Key, OnConflict, Settings};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

mod suite;

pub use suite::*;

/// A store backend under test.
pub trait Backend: Sync {
    /// A store for one test. Stores may share a server: every test uses keys
    /// of its own.
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

/// The runtime a suite test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// One thread; its clock is paused when the backend follows tokio's
    /// clock, so leases and TTLs pass in no time.
    CurrentThread,
    /// Two worker threads on real time, for tests of concurrency.
    MultiThread,
}

/// Runs one suite test on the runtime it asks for; when it fails, prints
/// the behaviour it checks (`behaviour`, the test's docs) before the
/// failed assertion, so that a store's author reads what the store did
/// not do, not only which line of the suite failed.
pub fn check_behaviour<B: Backend, F: Future<Output = ()>>(
    backend: &B,
    runtime: Runtime,
    name: &str,
    behaviour: &str,
    test: F,
) {
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        block_on(backend, runtime, test);
    }));
    if let Err(panic) = ran {
        let behaviour: Vec<&str> = behaviour.lines().map(str::trim).collect();
        eprintln!(
            "\nthe store does not show the behaviour `{name}` checks:\n  {}\n",
            behaviour.join("\n  ")
        );
        std::panic::resume_unwind(panic);
    }
}

/// Runs one suite test on the runtime it asks for.
pub fn block_on<B: Backend, F: Future<Output = ()>>(backend: &B, runtime: Runtime, test: F) {
    let runtime = match runtime {
        Runtime::MultiThread => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build(),
        Runtime::CurrentThread => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(backend.follows_tokio_clock())
            .build(),
    };
    runtime.expect("a tokio runtime").block_on(test);
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

/// Calls on one handle with the suite's settings; a fluent way to vary them
/// per call.
#[derive(Clone)]
pub struct Caller {
    idem: Idempotency,
    settings: idem_core::SettingsBuilder,
}

impl Caller {
    /// Calls on `idem` with the lease and TTL of `timing`.
    pub fn new(idem: &Idempotency, timing: Timing) -> Self {
        Self {
            idem: idem.clone(),
            settings: Settings::builder().lease(timing.lease).ttl(timing.ttl),
        }
    }

    /// Fail at once with `InProgress` instead of waiting.
    #[must_use]
    pub fn reject(mut self) -> Self {
        self.settings = self.settings.on_conflict(OnConflict::Reject);
        self
    }

    /// Wait at most `wait` for another call's result.
    #[must_use]
    pub fn wait_timeout(mut self, wait: Duration) -> Self {
        self.settings = self.settings.wait_timeout(wait);
        self
    }

    fn settings(&self) -> Settings {
        self.settings
            .build()
            .expect("the suite's settings are valid")
    }

    /// [`Idempotency::run`] with these settings.
    pub async fn run<T, E, F>(&self, key: Key, fingerprint: Fingerprint, body: F) -> Result<T, E>
    where
        F: Future<Output = Result<T, E>>,
        T: Serialize + DeserializeOwned,
        E: From<Error>,
    {
        self.idem
            .run(&self.settings(), key, fingerprint, body)
            .await
    }

    /// [`Idempotency::run_caching_errors`] with these settings.
    pub async fn run_caching_errors<T, E, F, P>(
        &self,
        key: Key,
        fingerprint: Fingerprint,
        cache: P,
        body: F,
    ) -> Result<T, E>
    where
        F: Future<Output = Result<T, E>>,
        T: Serialize + DeserializeOwned,
        E: From<Error> + Serialize + DeserializeOwned,
        P: FnOnce(&E) -> bool,
    {
        self.idem
            .run_caching_errors(&self.settings(), key, fingerprint, cache, body)
            .await
    }

    /// Starts `run(key, fingerprint, body)` on a task of its own and returns
    /// once the body runs, that is, once the key is claimed.
    pub async fn hold<T, B>(
        &self,
        key: Key,
        fingerprint: Fingerprint,
        body: B,
    ) -> JoinHandle<Result<T, Failure>>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        B: Future<Output = Result<T, Failure>> + Send + 'static,
    {
        let (tell, began) = oneshot::channel();
        let caller = self.clone();
        let holder = tokio::spawn(async move {
            caller
                .run(key, fingerprint, async move {
                    let _ = tell.send(());
                    body.await
                })
                .await
        });
        began.await.expect("the body started");
        holder
    }
}

/// A store whose lease renewals silently do nothing, as if the holder stalled
/// (a GC pause, a frozen VM) and could not renew.
pub struct Stalled(pub Arc<dyn Store>);

impl Store for Stalled {
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

    fn renew(&self, _: Key, _: Token, _: Duration) -> StoreFuture<'_, bool> {
        Box::pin(std::future::ready(Ok(true)))
    }

    fn watch(&self, key: Key) -> Option<Watch> {
        self.0.watch(key)
    }
}
