//! A store wrapper that injects the faults a network causes: an operation
//! that never reaches the store, and one that does but whose answer is lost;
//! and a store that is down altogether.
//!
//! ```
//! use std::sync::Arc;
//! use idem_test::faults::{Fault, Flaky, Op};
//!
//! let flaky = Arc::new(Flaky::new(Arc::new(idem_core::MemoryStore::new())));
//! // The next `complete` is carried out, but its caller sees a timeout.
//! flaky.inject(Op::Complete, Fault::AnswerLost);
//! ```

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use idem_core::store::{
    Begin, Completion, Limits, Record, Store, StoreError, StoreErrorKind, StoreFuture, Token, Watch,
};
use idem_core::{Fingerprint, Key};

/// A store operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// [`Store::begin`].
    Begin,
    /// [`Store::complete`].
    Complete,
    /// [`Store::release`].
    Release,
    /// [`Store::renew`].
    Renew,
}

/// What goes wrong with one operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The operation never reaches the store; its caller gets a timeout.
    Refused,
    /// The operation is carried out, but its answer is lost; its caller gets
    /// a timeout.
    AnswerLost,
}

/// A store whose next operations fail as injected, then behave.
pub struct Flaky {
    inner: Arc<dyn Store>,
    faults: Mutex<HashMap<Op, VecDeque<Fault>>>,
    injected: Mutex<HashMap<Op, usize>>,
}

impl Flaky {
    /// Wraps `inner`, with no faults yet.
    pub fn new(inner: Arc<dyn Store>) -> Self {
        Self {
            inner,
            faults: Mutex::default(),
            injected: Mutex::default(),
        }
    }

    /// Makes the next `op` not yet faulted fail with `fault`.
    pub fn inject(&self, op: Op, fault: Fault) {
        self.faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(op)
            .or_default()
            .push_back(fault);
    }

    /// How many faults of `op` have struck so far.
    pub fn struck(&self, op: Op) -> usize {
        self.injected
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&op)
            .copied()
            .unwrap_or(0)
    }

    fn next_fault(&self, op: Op) -> Option<Fault> {
        let fault = self
            .faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(&op)?
            .pop_front()?;
        *self
            .injected
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(op)
            .or_default() += 1;
        Some(fault)
    }

    /// Runs `call` (which reaches the store; some stores act as soon as it
    /// is made) unless the next fault of `op` refuses it.
    fn faulty<'a, T: Send + 'a>(
        &'a self,
        op: Op,
        call: impl FnOnce() -> StoreFuture<'a, T>,
    ) -> StoreFuture<'a, T> {
        match self.next_fault(op) {
            None => call(),
            Some(Fault::Refused) => Box::pin(std::future::ready(Err(timeout(op)))),
            Some(Fault::AnswerLost) => {
                let real = call();
                Box::pin(async move {
                    let _ = real.await;
                    Err(timeout(op))
                })
            }
        }
    }
}

fn timeout(op: Op) -> StoreError {
    StoreError::new(
        StoreErrorKind::Timeout,
        format!("{op:?} timed out (injected fault)"),
    )
}

impl Store for Flaky {
    fn begin(
        &self,
        key: Key,
        fingerprint: Fingerprint,
        token: Token,
        lease: Duration,
    ) -> StoreFuture<'_, Begin> {
        self.faulty(Op::Begin, || {
            self.inner.begin(key, fingerprint, token, lease)
        })
    }

    fn complete(
        &self,
        key: Key,
        token: Token,
        record: Record,
        ttl: Duration,
    ) -> StoreFuture<'_, Completion> {
        self.faulty(Op::Complete, || {
            self.inner.complete(key, token, record, ttl)
        })
    }

    fn release(&self, key: Key, token: Token) -> StoreFuture<'_, ()> {
        self.faulty(Op::Release, || self.inner.release(key, token))
    }

    fn renew(&self, key: Key, token: Token, lease: Duration) -> StoreFuture<'_, bool> {
        self.faulty(Op::Renew, || self.inner.renew(key, token, lease))
    }

    fn watch(&self, key: Key) -> Option<Watch> {
        self.inner.watch(key)
    }

    fn limits(&self) -> Limits {
        self.inner.limits()
    }
}

/// A store that is down: every operation fails with
/// [`StoreErrorKind::Unavailable`], as an unreachable backend's do. Its
/// message names an internal address, so that a test can check it is never
/// shown to a client.
///
/// ```
/// use idem_core::{Fingerprint, Idempotency, Key, Settings};
/// use idem_test::faults::Down;
///
/// # block_on(async {
/// let idem = Idempotency::new(Down);
/// let (key, fp) = (Key::new("down", &1).unwrap(), Fingerprint::of(&1).unwrap());
/// let outcome: Result<u32, idem_core::Error> =
///     idem.run(&Settings::default(), key, fp, async { unreachable!("fails closed") }).await;
/// assert!(matches!(outcome, Err(idem_core::Error::Store(_))));
/// # });
/// # fn block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct Down;

impl Down {
    /// The error of every operation.
    pub fn error() -> StoreError {
        StoreError::new(
            StoreErrorKind::Unavailable,
            "connection refused to 10.0.0.9:6379",
        )
    }
}

impl Store for Down {
    fn begin(&self, _: Key, _: Fingerprint, _: Token, _: Duration) -> StoreFuture<'_, Begin> {
        Box::pin(std::future::ready(Err(Self::error())))
    }

    fn complete(&self, _: Key, _: Token, _: Record, _: Duration) -> StoreFuture<'_, Completion> {
        Box::pin(std::future::ready(Err(Self::error())))
    }

    fn release(&self, _: Key, _: Token) -> StoreFuture<'_, ()> {
        Box::pin(std::future::ready(Err(Self::error())))
    }

    fn renew(&self, _: Key, _: Token, _: Duration) -> StoreFuture<'_, bool> {
        Box::pin(std::future::ready(Err(Self::error())))
    }
}
