//! A store wrapper that injects the faults a network, a full store or a
//! paused process cause: an operation that never reaches the store, one
//! that does but whose answer is lost, is slow or lands late, a write a full
//! store refuses, renewals of a holder paused past its lease; and a store
//! that is down altogether.
//!
//! Faults are injected one by one ([`Flaky::inject`]) or drawn on a seeded
//! schedule ([`Flaky::scheduled`]), and every fault that struck is logged
//! ([`Flaky::struck_log`]), for the exactly-once checker's histories.
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

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tokio::time::Instant;

use idem_core::store::{
    Begin, Completion, HeldClaim, Inspection, JournaledStep, Limits, Record, Store, StoreError,
    StoreErrorKind, StoreFuture, Token, Watch,
};
use idem_core::{Fingerprint, Key};

/// A store operation that [`Flaky`] can fault: the four of the protocol,
/// `forget`, and a step's append to the journal. Reading the journal
/// (`steps`), `epoch` and the operators' `inspect` and `claims_older_than`
/// always go to the inner store unfaulted.
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
    /// [`Store::forget`]: faulted when injected, or by a [`Schedule`]
    /// that lists it ([`Schedule::every_kind`] does not).
    Forget,
    /// [`Store::append_step`]: a step's result (or a compensation's mark)
    /// written to the journal.
    AppendStep,
}

/// What goes wrong with one operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The operation never reaches the store; its caller gets a timeout.
    Refused,
    /// The operation is carried out, but its answer is lost; its caller gets
    /// a timeout.
    AnswerLost,
    /// The operation is carried out at once; its answer arrives after the
    /// delay.
    Delayed(Duration),
    /// Its caller gets a timeout at once; the operation reaches the store
    /// after the delay, in the background (a command stuck in a network
    /// buffer).
    LandsLate(Duration),
    /// The operation is refused as a full store refuses a write (a Redis at
    /// `maxmemory` answers `OOM`): [`StoreErrorKind::Full`], nothing applied.
    Full,
    /// The operation reaches the store after the delay, and its answer
    /// takes as long again to come back, as over a slow network: a caller
    /// cut off after it landed never hears that it did.
    Slow(Duration),
    /// A renewal that never reaches the store, while its caller is told it
    /// did, as a holder paused past its lease (a GC pause, a frozen VM)
    /// experiences it: see [`Flaky::stall`] for all of a key's renewals
    /// until a time. Injected on another operation, it changes nothing.
    Stalled,
    /// For this long, every `begin` that finds the key held answers that
    /// the holder's lease ends in a millisecond, as a holder whose clock
    /// lags makes it look: a waiter that trusts it polls in a busy loop.
    /// Injected on another operation than [`Op::Begin`], it changes
    /// nothing.
    ClockLag(Duration),
}

/// One fault that struck: when, which operation, on which key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Struck {
    /// When the operation was made.
    pub at: Instant,
    /// The operation.
    pub op: Op,
    /// Its key.
    pub key: Key,
    /// What went wrong.
    pub fault: Fault,
}

/// Which faults a seeded schedule draws, and how often.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// The chance that an operation is faulted, from 0 to 1.
    pub rate: f64,
    /// The faults drawn, with the operations each may strike.
    pub faults: Vec<(Op, Fault)>,
}

impl Schedule {
    /// The faults of the checker's default schedule: on `begin`,
    /// `complete`, `release`, `renew` and a step's `append_step`,
    /// [`Fault::Refused`], [`Fault::AnswerLost`], [`Fault::Delayed`] and
    /// [`Fault::LandsLate`];
    /// [`Fault::Full`] and [`Fault::Slow`] on `complete`s (the writes that
    /// carry a result: a slow one is where a caller that gives up while
    /// its outcome is recorded cuts in); [`Fault::ClockLag`] on `begin`s.
    /// `rate` of the operations are faulted, with delays up to `delay`.
    /// [`Fault::Stalled`] (which the checker's bodies cause with
    /// [`Flaky::stall`]) is not drawn, nor are faults of `forget`.
    #[must_use]
    pub fn every_kind(rate: f64, delay: Duration) -> Self {
        let mut faults = Vec::new();
        for op in [
            Op::Begin,
            Op::Complete,
            Op::Release,
            Op::Renew,
            Op::AppendStep,
        ] {
            faults.extend([
                (op, Fault::Refused),
                (op, Fault::AnswerLost),
                (op, Fault::Delayed(delay)),
                (op, Fault::LandsLate(delay)),
            ]);
        }
        faults.push((Op::Complete, Fault::Full));
        faults.push((Op::Begin, Fault::ClockLag(delay * 10)));
        faults.push((Op::Complete, Fault::Slow(delay)));
        Self { rate, faults }
    }
}

/// A store whose next operations fail as injected (or as a seeded schedule
/// draws), then behave.
pub struct Flaky {
    inner: Arc<dyn Store>,
    faults: Mutex<HashMap<Op, VecDeque<Fault>>>,
    injected: Mutex<HashMap<Op, usize>>,
    schedule: Option<(Mutex<StdRng>, Schedule)>,
    stalls: Mutex<HashMap<Key, Instant>>,
    log: Mutex<Vec<Struck>>,
    begins: Mutex<HashMap<Key, usize>>,
    lags: Mutex<HashMap<Key, Instant>>,
}

impl Flaky {
    /// Wraps `inner`, with no faults yet.
    pub fn new(inner: Arc<dyn Store>) -> Self {
        Self {
            inner,
            faults: Mutex::default(),
            injected: Mutex::default(),
            schedule: None,
            stalls: Mutex::default(),
            log: Mutex::default(),
            begins: Mutex::default(),
            lags: Mutex::default(),
        }
    }

    /// Wraps `inner`, faulting operations as `schedule` draws them from a
    /// random generator seeded with `seed` (after any injected ones).
    pub fn scheduled(inner: Arc<dyn Store>, seed: u64, schedule: Schedule) -> Self {
        Self {
            schedule: Some((Mutex::new(StdRng::seed_from_u64(seed)), schedule)),
            ..Self::new(inner)
        }
    }

    /// Pauses the holder of `key` until `until`, as far as the store can
    /// tell: its renewals before then never arrive, though the holder is
    /// told they did ([`Fault::Stalled`]).
    pub fn stall(&self, key: Key, until: Instant) {
        lock(&self.stalls).insert(key, until);
    }

    /// How many `begin`s were made on `key`, faulted or not.
    pub fn begins(&self, key: Key) -> usize {
        lock(&self.begins).get(&key).copied().unwrap_or(0)
    }

    /// Every fault that struck so far, in order.
    pub fn struck_log(&self) -> Vec<Struck> {
        lock(&self.log).clone()
    }

    /// Makes the next `op` not yet faulted fail with `fault`.
    pub fn inject(&self, op: Op, fault: Fault) {
        lock(&self.faults).entry(op).or_default().push_back(fault);
    }

    /// How many faults of `op` have struck so far.
    pub fn struck(&self, op: Op) -> usize {
        lock(&self.injected).get(&op).copied().unwrap_or(0)
    }

    fn next_fault(&self, op: Op, key: Key) -> Option<Fault> {
        let injected = lock(&self.faults)
            .get_mut(&op)
            .and_then(VecDeque::pop_front);
        let fault = match injected {
            Some(fault) => Some(fault),
            None if op == Op::Renew
                && lock(&self.stalls)
                    .get(&key)
                    .is_some_and(|until| Instant::now() < *until) =>
            {
                Some(Fault::Stalled)
            }
            None => self.schedule.as_ref().and_then(|(rng, schedule)| {
                let mut rng = lock(rng);
                let candidates: Vec<Fault> = schedule
                    .faults
                    .iter()
                    .filter(|(on, _)| *on == op)
                    .map(|(_, fault)| *fault)
                    .collect();
                if candidates.is_empty() || !rng.random_bool(schedule.rate.clamp(0.0, 1.0)) {
                    return None;
                }
                Some(candidates[rng.random_range(0..candidates.len())])
            }),
        }?;
        *lock(&self.injected).entry(op).or_default() += 1;
        lock(&self.log).push(Struck {
            at: Instant::now(),
            op,
            key,
            fault,
        });
        Some(fault)
    }

    /// Runs `call` (which reaches the store; some stores act as soon as it
    /// is made) unless the next fault of `op` refuses it.
    fn faulty<'a, T: Send + 'static>(
        &'a self,
        op: Op,
        key: Key,
        call: impl FnOnce(&dyn Store) -> StoreFuture<'_, T> + Send + 'static,
    ) -> StoreFuture<'a, T> {
        let fault = self.next_fault(op, key);
        self.apply(fault, op, call)
    }

    /// Runs `call` as `fault` (if any) has it.
    /// A `begin` (`call`, whose answer's [`Begin`] `begun` picks out),
    /// counted and faulted as [`Op::Begin`]; while a lagging holder's clock
    /// window lasts, a held key's remaining lease reads as a millisecond.
    fn faulted_begin<T: Send + 'static>(
        &self,
        key: Key,
        begun: fn(&mut T) -> &mut Begin,
        call: impl FnOnce(&dyn Store) -> StoreFuture<'_, T> + Send + 'static,
    ) -> StoreFuture<'_, T> {
        *lock(&self.begins).entry(key).or_default() += 1;
        let fault = self.next_fault(Op::Begin, key);
        let begin = self.apply(fault, Op::Begin, call);
        if let Some(Fault::ClockLag(window)) = fault {
            lock(&self.lags).insert(key, Instant::now() + window);
        }
        let lags = lock(&self.lags)
            .get(&key)
            .is_some_and(|until| Instant::now() < *until);
        if !lags {
            return begin;
        }
        Box::pin(async move {
            let mut answer = begin.await?;
            let held = begun(&mut answer);
            if let Begin::InProgress { .. } = held {
                *held = Begin::InProgress {
                    retry_after: Duration::from_millis(1),
                };
            }
            Ok(answer)
        })
    }

    fn apply<'a, T: Send + 'static>(
        &'a self,
        fault: Option<Fault>,
        op: Op,
        call: impl FnOnce(&dyn Store) -> StoreFuture<'_, T> + Send + 'static,
    ) -> StoreFuture<'a, T> {
        match fault {
            None => call(&*self.inner),
            Some(Fault::Refused) => Box::pin(std::future::ready(Err(timeout(op)))),
            Some(Fault::Full) => Box::pin(std::future::ready(Err(StoreError::new(
                StoreErrorKind::Full,
                format!("{op:?} refused: the store is full (injected fault)"),
            )))),
            Some(Fault::AnswerLost) => {
                let real = call(&*self.inner);
                Box::pin(async move {
                    let _ = real.await;
                    Err(timeout(op))
                })
            }
            Some(Fault::Delayed(delay)) => {
                let real = call(&*self.inner);
                Box::pin(async move {
                    let answer = real.await;
                    tokio::time::sleep(delay).await;
                    answer
                })
            }
            Some(Fault::Slow(delay)) => {
                let inner = Arc::clone(&self.inner);
                Box::pin(async move {
                    tokio::time::sleep(delay).await;
                    let answer = call(&*inner).await;
                    tokio::time::sleep(delay).await;
                    answer
                })
            }
            Some(Fault::LandsLate(delay)) => {
                let inner = Arc::clone(&self.inner);
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    runtime.spawn(async move {
                        tokio::time::sleep(delay).await;
                        let _ = call(&*inner).await;
                    });
                }
                Box::pin(std::future::ready(Err(timeout(op))))
            }
            // Only renewals stall (`renew` answers them itself), and only
            // begins lag; on other operations both change nothing.
            Some(Fault::Stalled | Fault::ClockLag(_)) => call(&*self.inner),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
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
        self.faulted_begin(
            key,
            |begun| begun,
            move |store| store.begin(key, fingerprint, token, lease),
        )
    }

    /// Faulted as [`begin`](Store::begin) is (one operation, [`Op::Begin`]),
    /// so that a store's own way of reading the journal with the claim (one
    /// Redis pipeline) runs under the faults too.
    fn begin_with_steps(
        &self,
        key: Key,
        fingerprint: Fingerprint,
        token: Token,
        lease: Duration,
    ) -> StoreFuture<'_, (Begin, Option<Vec<JournaledStep>>)> {
        self.faulted_begin(
            key,
            |(begun, _)| begun,
            move |store| store.begin_with_steps(key, fingerprint, token, lease),
        )
    }

    fn complete(
        &self,
        key: Key,
        token: Token,
        record: Record,
        ttl: Duration,
    ) -> StoreFuture<'_, Completion> {
        self.faulty(Op::Complete, key, move |store| {
            store.complete(key, token, record, ttl)
        })
    }

    fn release(&self, key: Key, token: Token) -> StoreFuture<'_, ()> {
        self.faulty(Op::Release, key, move |store| store.release(key, token))
    }

    fn renew(&self, key: Key, token: Token, lease: Duration) -> StoreFuture<'_, bool> {
        let stalled = lock(&self.stalls)
            .get(&key)
            .is_some_and(|until| Instant::now() < *until);
        if stalled
            && lock(&self.faults)
                .get(&Op::Renew)
                .is_none_or(VecDeque::is_empty)
        {
            let _ = self.next_fault(Op::Renew, key);
            return Box::pin(std::future::ready(Ok(true)));
        }
        let fault = self.next_fault(Op::Renew, key);
        if fault == Some(Fault::Stalled) {
            // Told it renewed; the store never heard of it.
            return Box::pin(std::future::ready(Ok(true)));
        }
        self.apply(fault, Op::Renew, move |store| {
            store.renew(key, token, lease)
        })
    }

    fn watch(&self, key: Key) -> Option<Watch> {
        self.inner.watch(key)
    }

    fn limits(&self) -> Limits {
        self.inner.limits()
    }

    fn inspect(&self, key: Key) -> StoreFuture<'_, Inspection> {
        self.inner.inspect(key)
    }

    fn forget(&self, key: Key) -> StoreFuture<'_, bool> {
        self.faulty(Op::Forget, key, move |store| store.forget(key))
    }

    fn claims_older_than(&self, age: Duration, limit: usize) -> StoreFuture<'_, Vec<HeldClaim>> {
        self.inner.claims_older_than(age, limit)
    }

    fn append_step(
        &self,
        key: Key,
        token: Token,
        name: String,
        value: Vec<u8>,
        ttl: Duration,
    ) -> StoreFuture<'_, bool> {
        self.faulty(Op::AppendStep, key, move |store| {
            store.append_step(key, token, name, value, ttl)
        })
    }

    fn steps(&self, key: Key) -> StoreFuture<'_, Vec<JournaledStep>> {
        self.inner.steps(key)
    }

    fn epoch(&self, key: Key, token: Token, ttl: Duration) -> StoreFuture<'_, Option<u64>> {
        self.inner.epoch(key, token, ttl)
    }
}

/// A store that is down: every operation fails with
/// [`StoreErrorKind::Unavailable`], as an unreachable backend's do (the
/// optional ones too: journals, epochs, `inspect`, `forget`,
/// `claims_older_than`), and it has no wake-ups. Its
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

    fn inspect(&self, _: Key) -> StoreFuture<'_, Inspection> {
        Box::pin(std::future::ready(Err(Self::error())))
    }

    fn append_step(
        &self,
        _: Key,
        _: Token,
        _: String,
        _: Vec<u8>,
        _: Duration,
    ) -> StoreFuture<'_, bool> {
        Box::pin(std::future::ready(Err(Self::error())))
    }

    fn steps(&self, _: Key) -> StoreFuture<'_, Vec<JournaledStep>> {
        Box::pin(std::future::ready(Err(Self::error())))
    }

    fn epoch(&self, _: Key, _: Token, _: Duration) -> StoreFuture<'_, Option<u64>> {
        Box::pin(std::future::ready(Err(Self::error())))
    }

    fn forget(&self, _: Key) -> StoreFuture<'_, bool> {
        Box::pin(std::future::ready(Err(Self::error())))
    }

    fn claims_older_than(&self, _: Duration, _: usize) -> StoreFuture<'_, Vec<HeldClaim>> {
        Box::pin(std::future::ready(Err(Self::error())))
    }
}
