//! The embedded, in-process store: the default backend.
//!
//! Records live in [`SHARDS`] hash maps, each behind its own lock and
//! picked by the key's digest, so that concurrent callers on different keys
//! rarely share a lock. Time is tokio's clock, so a paused test clock drives
//! leases and TTLs. Expired claims and records are reclaimed shard by shard,
//! by a sweeper task (spawned on the first call made inside a tokio runtime)
//! that visits only shards holding something expired, and by a store that is
//! full before it refuses a new key. Callers waiting on a claim are woken in
//! process when it ends.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockWriteGuard, Weak};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio::time::Instant;

use super::{Begin, Completion, HeldClaim, Inspection, Record, Store, StoreFuture, Token, Watch};
use crate::error::{StoreError, StoreErrorKind};
use crate::key::{DigestHasher, Fingerprint, Key};
use crate::settings::MAX_DURATION;

/// The default cap on claims and records a [`MemoryStore`] holds.
pub const DEFAULT_MAX_RECORDS: usize = 1_000_000;

/// The default cap on the bytes a [`MemoryStore`]'s claims and records take:
/// 1 GiB.
pub const DEFAULT_MAX_BYTES: usize = 1 << 30;

/// The default time between two sweeps for expired records.
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// How many independently locked maps the records are spread over.
pub const SHARDS: usize = 64;

/// What one entry costs beyond its payload, as the byte cap counts it: the
/// key and slot in a hash table at a typical load.
const ENTRY_BYTES: usize = 2 * (size_of::<Key>() + size_of::<Slot>());

/// An in-process [`Store`]: claims and records kept in this process's memory.
///
/// It is the store of the default handle, which `#[idempotent]` uses when
/// no `store = …` is given and [`set_default`](crate::set_default) was not
/// called. It deduplicates calls within one process only; services with more
/// than one process need a shared store such as Redis.
///
/// Memory is bounded, by a number of records
/// ([`max_records`](MemoryStoreBuilder::max_records)) and of bytes
/// ([`max_bytes`](MemoryStoreBuilder::max_bytes)). Expired records are
/// reclaimed in the background, and at once when the store is full. A new key
/// beyond either cap, once nothing expired is left to reclaim, is refused
/// with [`StoreErrorKind::Full`]: the call fails closed. A live record is
/// never evicted early, which would let its call run twice. A client that
/// fills the store with unique keys does so for every client until its
/// records expire; give clients of different trust different stores.
///
/// Clones share the same records.
///
/// ```
/// use std::time::Duration;
/// use idem_core::{Idempotency, Key, Fingerprint, MemoryStore, Settings};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), idem_core::Error> {
/// let store = MemoryStore::builder().max_records(10_000).max_bytes(64 << 20).build();
/// let idem = Idempotency::new(store.clone());
/// let settings = Settings::builder().ttl(Duration::from_secs(120)).build()?;
/// let key = Key::new("greet", &"req-1")?;
/// let fp = Fingerprint::of(&"world")?;
/// let first: Result<String, idem_core::Error> =
///     idem.run(&settings, key, fp, async { Ok("hello world".to_string()) }).await;
/// let replay: Result<String, idem_core::Error> =
///     idem.run(&settings, key, fp, async { unreachable!("replayed") }).await;
/// assert_eq!(first?, replay?);
/// assert_eq!(store.len(), 1);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

/// Configures a [`MemoryStore`]; made by [`MemoryStore::builder`].
#[derive(Debug, Clone)]
pub struct MemoryStoreBuilder {
    max_records: usize,
    max_bytes: usize,
    sweep_interval: Duration,
}

struct Inner {
    shards: Box<[Shard]>,
    /// When the store was made: deadlines count from it.
    epoch: Instant,
    len: AtomicUsize,
    bytes: AtomicUsize,
    max_records: usize,
    max_bytes: usize,
    sweep_interval: Duration,
    sweeper_running: AtomicBool,
}

struct Shard {
    slots: RwLock<HashMap<Key, Slot, DigestHasher>>,
    /// The earliest deadline in the shard, in ms since the epoch: a shard
    /// whose earliest deadline is in the future holds nothing to reclaim.
    next_expiry: AtomicU64,
}

struct Slot {
    token: Token,
    fingerprint: Fingerprint,
    /// The lease's or the TTL's end.
    deadline: Instant,
    /// When the claim was made, then when the record was stored.
    since: Instant,
    state: State,
}

enum State {
    Claimed {
        /// Present once somebody watches the claim.
        woken: Option<Arc<Notify>>,
    },
    Completed(Record),
}

impl Slot {
    fn is_live(&self, now: Instant) -> bool {
        self.deadline > now
    }

    /// What the slot counts against the byte cap.
    fn bytes(&self) -> usize {
        ENTRY_BYTES
            + match &self.state {
                State::Claimed { .. } => 0,
                State::Completed(record) => record.payload().len(),
            }
    }

    /// Wakes whoever watches this slot's claim; called as the claim ends.
    fn wake(&mut self) {
        if let State::Claimed { woken } = &mut self.state
            && let Some(notify) = woken.take()
        {
            notify.notify_waiters();
        }
    }
}

/// `now + duration`, or as far as idem ever looks ahead.
fn deadline(now: Instant, duration: Duration) -> Instant {
    now.checked_add(duration.min(MAX_DURATION))
        .unwrap_or(now + MAX_DURATION)
}

impl MemoryStore {
    /// A store with the default settings.
    #[must_use]
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// Starts configuring a store.
    #[must_use]
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder {
            max_records: DEFAULT_MAX_RECORDS,
            max_bytes: DEFAULT_MAX_BYTES,
            sweep_interval: DEFAULT_SWEEP_INTERVAL,
        }
    }

    /// How many claims and records the store holds, expired ones not yet
    /// reclaimed included.
    #[must_use]
    pub fn len(&self) -> usize {
        self.inner.len.load(Ordering::Relaxed)
    }

    /// Whether the store holds nothing.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many bytes the store's claims and records take, as the byte cap
    /// counts them.
    #[must_use]
    pub fn bytes(&self) -> usize {
        self.inner.bytes.load(Ordering::Relaxed)
    }

    /// Reclaims every expired claim and record now, waking their watchers.
    /// The background sweeper does this; tests and shutdown code may too.
    pub fn sweep(&self) {
        for shard in self.inner.shards.iter() {
            self.inner.sweep_shard(shard, Instant::now());
        }
    }

    fn ensure_sweeper(&self) {
        if self.inner.sweeper_running.load(Ordering::Acquire) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.inner.sweeper_running.swap(true, Ordering::AcqRel) {
            return;
        }
        let store = Arc::downgrade(&self.inner);
        runtime.spawn(sweep_forever(store, self.inner.sweep_interval));
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("len", &self.len())
            .field("bytes", &self.bytes())
            .field("max_records", &self.inner.max_records)
            .field("max_bytes", &self.inner.max_bytes)
            .field("sweep_interval", &self.inner.sweep_interval)
            .finish_non_exhaustive()
    }
}

impl MemoryStoreBuilder {
    /// The most claims and records the store holds; a new key beyond it is
    /// refused with [`StoreErrorKind::Full`] once nothing expired is left to
    /// reclaim. Default [`DEFAULT_MAX_RECORDS`].
    #[must_use]
    pub fn max_records(mut self, max_records: usize) -> Self {
        self.max_records = max_records;
        self
    }

    /// The most bytes the store's claims and records take, keys and
    /// bookkeeping included; a new key beyond it is refused like one beyond
    /// [`max_records`](Self::max_records). A result that completes a claim is
    /// always stored, so the cap may be passed by the results of calls in
    /// flight. Default [`DEFAULT_MAX_BYTES`].
    #[must_use]
    pub fn max_bytes(mut self, max_bytes: usize) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// How often expired records are reclaimed. Default
    /// [`DEFAULT_SWEEP_INTERVAL`]; zero is taken as one millisecond.
    #[must_use]
    pub fn sweep_interval(mut self, interval: Duration) -> Self {
        self.sweep_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Builds the store.
    #[must_use]
    pub fn build(self) -> MemoryStore {
        MemoryStore {
            inner: Arc::new(Inner {
                shards: (0..SHARDS)
                    .map(|_| Shard {
                        slots: RwLock::default(),
                        next_expiry: AtomicU64::new(u64::MAX),
                    })
                    .collect(),
                epoch: Instant::now(),
                len: AtomicUsize::new(0),
                bytes: AtomicUsize::new(0),
                max_records: self.max_records,
                max_bytes: self.max_bytes,
                sweep_interval: self.sweep_interval,
                sweeper_running: AtomicBool::new(false),
            }),
        }
    }
}

/// Lets the next call restart the sweeper when this one ends, e.g. because its
/// runtime shut down.
struct SweeperFlag(Weak<Inner>);

impl Drop for SweeperFlag {
    fn drop(&mut self) {
        if let Some(inner) = self.0.upgrade() {
            inner.sweeper_running.store(false, Ordering::Release);
        }
    }
}

/// Visits one shard at a time, yielding in between, so that no sweep holds
/// more than one shard's lock.
async fn sweep_forever(store: Weak<Inner>, every: Duration) {
    let _flag = SweeperFlag(store.clone());
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        for index in 0..SHARDS {
            let Some(inner) = store.upgrade() else {
                return;
            };
            inner.sweep_shard(&inner.shards[index], Instant::now());
            drop(inner);
            tokio::task::yield_now().await;
        }
    }
}

impl Inner {
    fn shard(&self, key: &Key) -> &Shard {
        &self.shards[usize::from(key.digest()[31]) % SHARDS]
    }

    fn millis(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    fn write<'a>(
        &self,
        shard: &'a Shard,
    ) -> RwLockWriteGuard<'a, HashMap<Key, Slot, DigestHasher>> {
        shard.slots.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Notes that `shard` holds something that expires at `at`.
    fn expires(&self, shard: &Shard, at: Instant) {
        shard
            .next_expiry
            .fetch_min(self.millis(at), Ordering::Relaxed);
    }

    /// Reclaims the expired entries of `shard`, if it may hold any.
    fn sweep_shard(&self, shard: &Shard, now: Instant) {
        if shard.next_expiry.load(Ordering::Relaxed) > self.millis(now) {
            return;
        }
        let mut slots = self.write(shard);
        let mut next = u64::MAX;
        slots.retain(|_, slot| {
            if slot.is_live(now) {
                next = next.min(self.millis(slot.deadline));
                return true;
            }
            slot.wake();
            self.len.fetch_sub(1, Ordering::Relaxed);
            self.bytes.fetch_sub(slot.bytes(), Ordering::Relaxed);
            false
        });
        shard.next_expiry.store(next, Ordering::Relaxed);
    }

    /// Counts one more entry of `bytes`, or answers that the store is full.
    fn try_reserve(&self, bytes: usize) -> bool {
        if self.len.fetch_add(1, Ordering::Relaxed) >= self.max_records {
            self.len.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        if self.bytes.fetch_add(bytes, Ordering::Relaxed) + bytes > self.max_bytes {
            self.bytes.fetch_sub(bytes, Ordering::Relaxed);
            self.len.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    fn full(&self) -> StoreError {
        StoreError::new(
            StoreErrorKind::Full,
            format!(
                "the memory store holds its maximum of {} records or {} bytes of live claims \
                 and results; raise max_records or max_bytes, or shorten the TTL",
                self.max_records, self.max_bytes
            ),
        )
    }

    fn begin(
        &self,
        key: Key,
        fingerprint: Fingerprint,
        token: Token,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        let shard = self.shard(&key);
        let now = Instant::now();
        // Replays are the common case: answer them under a shared lock.
        {
            let slots = shard.slots.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(slot) = slots.get(&key)
                && let State::Completed(record) = &slot.state
                && slot.is_live(now)
            {
                return Ok(if slot.fingerprint == fingerprint {
                    Begin::Completed(record.clone())
                } else {
                    Begin::Mismatch
                });
            }
        }
        let claim = || Slot {
            token,
            fingerprint,
            deadline: deadline(now, lease),
            since: now,
            state: State::Claimed { woken: None },
        };
        for attempt in 0..2 {
            {
                let mut slots = self.write(shard);
                if let Some(slot) = slots.get_mut(&key) {
                    let begin = if slot.is_live(now) {
                        Self::begin_on_live(slot, fingerprint, token, lease, now)
                    } else {
                        slot.wake();
                        self.bytes.fetch_sub(slot.bytes(), Ordering::Relaxed);
                        *slot = claim();
                        self.bytes.fetch_add(slot.bytes(), Ordering::Relaxed);
                        Begin::Claimed
                    };
                    self.expires(shard, slot.deadline);
                    return Ok(begin);
                }
                if self.try_reserve(ENTRY_BYTES) {
                    let slot = claim();
                    self.expires(shard, slot.deadline);
                    slots.insert(key, slot);
                    return Ok(Begin::Claimed);
                }
            }
            // Full: reclaim what has expired everywhere, then try once more.
            if attempt == 0 {
                for shard in self.shards.iter() {
                    self.sweep_shard(shard, now);
                }
            }
        }
        Err(self.full())
    }

    /// `begin` on a live claim or record.
    fn begin_on_live(
        slot: &mut Slot,
        fingerprint: Fingerprint,
        token: Token,
        lease: Duration,
        now: Instant,
    ) -> Begin {
        if slot.fingerprint != fingerprint {
            return Begin::Mismatch;
        }
        match &slot.state {
            State::Completed(record) => Begin::Completed(record.clone()),
            State::Claimed { .. } if slot.token == token => {
                slot.deadline = deadline(now, lease);
                Begin::Claimed
            }
            State::Claimed { .. } => Begin::InProgress {
                retry_after: slot.deadline - now,
            },
        }
    }

    fn complete(&self, key: Key, token: Token, record: Record, ttl: Duration) -> Completion {
        let shard = self.shard(&key);
        let now = Instant::now();
        let mut slots = self.write(shard);
        let Some(slot) = slots.get_mut(&key) else {
            return Completion::Lost;
        };
        if slot.token != token || !slot.is_live(now) {
            return Completion::Lost;
        }
        if let State::Claimed { .. } = slot.state {
            slot.wake();
            self.bytes
                .fetch_add(record.payload().len(), Ordering::Relaxed);
            slot.state = State::Completed(record);
            slot.deadline = deadline(now, ttl);
            slot.since = now;
            self.expires(shard, slot.deadline);
        }
        Completion::Stored
    }

    fn release(&self, key: Key, token: Token) {
        let shard = self.shard(&key);
        let mut slots = self.write(shard);
        let ours = slots
            .get(&key)
            .is_some_and(|slot| slot.token == token && matches!(slot.state, State::Claimed { .. }));
        if ours && let Some(mut slot) = slots.remove(&key) {
            slot.wake();
            self.len.fetch_sub(1, Ordering::Relaxed);
            self.bytes.fetch_sub(slot.bytes(), Ordering::Relaxed);
        }
    }

    fn renew(&self, key: Key, token: Token, lease: Duration) -> bool {
        let shard = self.shard(&key);
        let now = Instant::now();
        let mut slots = self.write(shard);
        match slots.get_mut(&key) {
            Some(slot)
                if slot.token == token
                    && slot.is_live(now)
                    && matches!(slot.state, State::Claimed { .. }) =>
            {
                slot.deadline = deadline(now, lease);
                true
            }
            _ => false,
        }
    }

    fn inspect(&self, key: Key) -> Inspection {
        let now = Instant::now();
        let slots = self
            .shard(&key)
            .slots
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        match slots.get(&key) {
            Some(slot) if slot.is_live(now) => match &slot.state {
                State::Claimed { .. } => Inspection::InProgress {
                    fingerprint: slot.fingerprint,
                    expires_in: slot.deadline - now,
                    held_for: Some(now - slot.since),
                },
                State::Completed(record) => Inspection::Completed {
                    outcome: record.outcome(),
                    fingerprint: slot.fingerprint,
                    stored_at: SystemTime::now().checked_sub(now - slot.since),
                    expires_in: slot.deadline - now,
                    size: record.payload().len(),
                },
            },
            _ => Inspection::Absent,
        }
    }

    fn forget(&self, key: Key) -> bool {
        let now = Instant::now();
        let mut slots = self.write(self.shard(&key));
        let Some(mut slot) = slots.remove(&key) else {
            return false;
        };
        slot.wake();
        self.len.fetch_sub(1, Ordering::Relaxed);
        self.bytes.fetch_sub(slot.bytes(), Ordering::Relaxed);
        slot.is_live(now)
    }

    fn claims_older_than(&self, age: Duration, limit: usize) -> Vec<HeldClaim> {
        let now = Instant::now();
        let mut claims = Vec::new();
        for shard in self.shards.iter() {
            let slots = shard.slots.read().unwrap_or_else(PoisonError::into_inner);
            for (key, slot) in slots.iter() {
                if claims.len() == limit {
                    return claims;
                }
                if matches!(slot.state, State::Claimed { .. })
                    && slot.is_live(now)
                    && now - slot.since > age
                {
                    claims.push(HeldClaim::new(
                        *key,
                        slot.fingerprint,
                        now - slot.since,
                        slot.deadline - now,
                    ));
                }
            }
        }
        claims
    }

    fn watch(&self, key: Key) -> Watch {
        let now = Instant::now();
        let mut slots = self.write(self.shard(&key));
        match slots.get_mut(&key) {
            Some(slot) if slot.is_live(now) => match &mut slot.state {
                State::Claimed { woken } => {
                    let notify = woken.get_or_insert_with(Arc::default).clone();
                    let mut notified = Box::pin(notify.notified_owned());
                    // Registered while the shard is locked: no wake-up can
                    // slip between this check and the wait.
                    notified.as_mut().enable();
                    notified
                }
                State::Completed(_) => Box::pin(std::future::ready(())),
            },
            _ => Box::pin(std::future::ready(())),
        }
    }
}

impl Store for MemoryStore {
    fn begin(
        &self,
        key: Key,
        fingerprint: Fingerprint,
        token: Token,
        lease: Duration,
    ) -> StoreFuture<'_, Begin> {
        self.ensure_sweeper();
        let answer = self.inner.begin(key, fingerprint, token, lease);
        Box::pin(std::future::ready(answer))
    }

    fn complete(
        &self,
        key: Key,
        token: Token,
        record: Record,
        ttl: Duration,
    ) -> StoreFuture<'_, Completion> {
        let answer = self.inner.complete(key, token, record, ttl);
        Box::pin(std::future::ready(Ok(answer)))
    }

    fn release(&self, key: Key, token: Token) -> StoreFuture<'_, ()> {
        self.inner.release(key, token);
        Box::pin(std::future::ready(Ok(())))
    }

    fn renew(&self, key: Key, token: Token, lease: Duration) -> StoreFuture<'_, bool> {
        let answer = self.inner.renew(key, token, lease);
        Box::pin(std::future::ready(Ok(answer)))
    }

    fn watch(&self, key: Key) -> Option<Watch> {
        Some(self.inner.watch(key))
    }

    fn inspect(&self, key: Key) -> StoreFuture<'_, Inspection> {
        Box::pin(std::future::ready(Ok(self.inner.inspect(key))))
    }

    fn forget(&self, key: Key) -> StoreFuture<'_, bool> {
        Box::pin(std::future::ready(Ok(self.inner.forget(key))))
    }

    fn claims_older_than(&self, age: Duration, limit: usize) -> StoreFuture<'_, Vec<HeldClaim>> {
        Box::pin(std::future::ready(Ok(self
            .inner
            .claims_older_than(age, limit))))
    }
}
