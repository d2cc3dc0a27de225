//! The embedded, in-process store: the default backend.
//!
//! Records live in [`SHARDS`] hash maps, each behind its own lock and
//! picked by the key's digest, so that concurrent callers on different keys
//! rarely share a lock. Time is tokio's clock, so a paused test clock drives
//! leases and TTLs. Expired claims and records are reclaimed shard by shard,
//! by a sweeper task (spawned on the first call made inside a tokio runtime;
//! when that runtime is no longer driven, calls sweep in its place)
//! that visits only shards holding something expired, and by a store that is
//! full before it refuses a new key. Callers waiting on a claim are woken in
//! process when it ends.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{
    Begin, Completion, HeldClaim, Inspection, JournaledStep, Record, Store, StoreFuture, Token,
    Watch,
};
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
    /// The last fencing epoch handed out, for any key: one counter for the
    /// whole store keeps every key's epochs increasing.
    last_epoch: AtomicU64,
    /// When expired entries were last reclaimed, in µs since the epoch: by
    /// the sweeper's passes, or by a call that found the sweeper not driven.
    swept_at: AtomicU64,
}

struct Shard {
    table: RwLock<Table>,
    /// The earliest deadline in the shard, in µs since the epoch: a shard
    /// whose earliest deadline is in the future holds nothing to reclaim.
    next_expiry: AtomicU64,
}

#[derive(Default)]
struct Table {
    slots: HashMap<Key, Slot, DigestHasher>,
    /// Who waits for a claim to end, by key: rare, so kept beside the slots
    /// rather than in each.
    watchers: HashMap<Key, Arc<Notify>, DigestHasher>,
    /// The step journals of multi-step calls, by key: kept apart from the
    /// slots because a journal outlives a released claim.
    journals: HashMap<Key, Journal, DigestHasher>,
}

/// One call's journal of completed steps.
struct Journal {
    /// When the journal expires, in µs since the store's epoch.
    deadline: u64,
    steps: Vec<JournaledStep>,
}

impl Journal {
    /// What one step counts against the byte cap.
    fn cost(step: &JournaledStep) -> usize {
        size_of::<JournaledStep>() + step.name.len() + step.value.len()
    }
}

impl Table {
    /// Wakes whoever watches `key`'s claim; called as the claim ends.
    fn wake(&mut self, key: &Key) {
        if !self.watchers.is_empty()
            && let Some(notify) = self.watchers.remove(key)
        {
            notify.notify_waiters();
        }
    }
}

/// One key's claim or record, in as few bytes as it can be: a deadline and
/// one allocation (at the workload of the benchmark, a completed record with
/// a 109-byte result takes under 300 bytes of memory, the table's share
/// included).
struct Slot {
    /// The lease's or the TTL's end, in µs since the store's epoch.
    deadline: u64,
    /// When the claim was made (then when the record was stored), the
    /// holder's token, the call's fingerprint and, once the call completed,
    /// its encoded [`Record`].
    data: Box<[u8]>,
}

/// Where a slot's data keeps each part.
const SINCE_AT: std::ops::Range<usize> = 0..8;
const TOKEN_AT: std::ops::Range<usize> = 8..24;
const FINGERPRINT_AT: std::ops::Range<usize> = 24..56;
const RECORD_AT: usize = 56;

impl Slot {
    fn claim(token: Token, fingerprint: Fingerprint, deadline: u64, since: u64) -> Self {
        let mut data = Vec::with_capacity(RECORD_AT);
        data.extend_from_slice(&since.to_le_bytes());
        data.extend_from_slice(&token.as_u128().to_le_bytes());
        data.extend_from_slice(fingerprint.digest());
        Self {
            deadline,
            data: data.into_boxed_slice(),
        }
    }

    /// When the claim was made, or the record stored, in µs since the epoch.
    fn since(&self) -> u64 {
        let mut bytes = [0; 8];
        bytes.copy_from_slice(&self.data[SINCE_AT]);
        u64::from_le_bytes(bytes)
    }

    fn token(&self) -> Token {
        let mut bytes = [0; 16];
        bytes.copy_from_slice(&self.data[TOKEN_AT]);
        Token::from_u128(u128::from_le_bytes(bytes))
    }

    fn fingerprint(&self) -> Fingerprint {
        let mut digest = [0; 32];
        digest.copy_from_slice(&self.data[FINGERPRINT_AT]);
        Fingerprint::from_digest(digest)
    }

    fn holds(&self, fingerprint: Fingerprint) -> bool {
        self.data[FINGERPRINT_AT] == fingerprint.digest()[..]
    }

    fn is_completed(&self) -> bool {
        self.data.len() > RECORD_AT
    }

    /// The completed record, read back from its bytes.
    fn record(&self) -> Option<Record> {
        if !self.is_completed() {
            return None;
        }
        // A record this store encoded always decodes.
        Record::decode(Bytes::copy_from_slice(&self.data[RECORD_AT..])).ok()
    }

    fn complete(&mut self, record: &Record, deadline: u64, since: u64) {
        let encoded = record.encode();
        let mut data = Vec::with_capacity(RECORD_AT + encoded.len());
        data.extend_from_slice(&since.to_le_bytes());
        data.extend_from_slice(&self.data[TOKEN_AT.start..RECORD_AT]);
        data.extend_from_slice(&encoded);
        self.data = data.into_boxed_slice();
        self.deadline = deadline;
    }

    fn is_live(&self, now: u64) -> bool {
        self.deadline > now
    }

    /// What the slot counts against the byte cap.
    fn bytes(&self) -> usize {
        ENTRY_BYTES + self.data.len()
    }
}

/// `duration` in µs, as far as idem ever looks ahead at most.
fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.min(MAX_DURATION).as_micros()).unwrap_or(u64::MAX)
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

    /// Sweeps here, in the call, when no sweep has happened for two sweep
    /// intervals: the sweeper runs on the runtime of the store's first call,
    /// which may be kept but no longer driven (a start-up `current_thread`
    /// runtime), and reclamation must not stop with it.
    fn sweep_if_stalled(&self) {
        let inner = &self.inner;
        let now = Instant::now();
        let at = inner.micros(now);
        let last = inner.swept_at.load(Ordering::Relaxed);
        if at.saturating_sub(last) <= micros(inner.sweep_interval).saturating_mul(2) {
            return;
        }
        // One caller sweeps; the others go on.
        if inner
            .swept_at
            .compare_exchange(last, at, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            for shard in inner.shards.iter() {
                inner.sweep_shard(shard, now);
            }
        }
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
                        table: RwLock::default(),
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
                last_epoch: AtomicU64::new(0),
                swept_at: AtomicU64::new(0),
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
            let now = Instant::now();
            inner.sweep_shard(&inner.shards[index], now);
            inner
                .swept_at
                .fetch_max(inner.micros(now), Ordering::Relaxed);
            drop(inner);
            tokio::task::yield_now().await;
        }
    }
}

impl Inner {
    fn shard(&self, key: &Key) -> &Shard {
        &self.shards[usize::from(key.digest()[31]) % SHARDS]
    }

    /// `at` in µs since the store's epoch.
    fn micros(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_micros()).unwrap_or(u64::MAX)
    }

    /// `now + duration`, in µs since the epoch.
    fn deadline(now: u64, duration: Duration) -> u64 {
        now.saturating_add(micros(duration))
    }

    fn write<'a>(&self, shard: &'a Shard) -> RwLockWriteGuard<'a, Table> {
        shard.table.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn read<'a>(&self, shard: &'a Shard) -> RwLockReadGuard<'a, Table> {
        shard.table.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Notes that `shard` holds something that expires at `at` (µs).
    fn expires(shard: &Shard, at: u64) {
        shard.next_expiry.fetch_min(at, Ordering::Relaxed);
    }

    /// Reclaims the expired entries of `shard`, if it may hold any.
    fn sweep_shard(&self, shard: &Shard, now: Instant) {
        let now = self.micros(now);
        if shard.next_expiry.load(Ordering::Relaxed) > now {
            return;
        }
        let mut table = self.write(shard);
        let Table {
            slots,
            watchers,
            journals,
        } = &mut *table;
        let mut next = u64::MAX;
        journals.retain(|_, journal| {
            if journal.deadline > now {
                next = next.min(journal.deadline);
                return true;
            }
            let bytes: usize = journal.steps.iter().map(Journal::cost).sum();
            self.bytes.fetch_sub(bytes, Ordering::Relaxed);
            false
        });
        slots.retain(|key, slot| {
            if slot.is_live(now) {
                next = next.min(slot.deadline);
                return true;
            }
            if let Some(notify) = watchers.remove(key) {
                notify.notify_waiters();
            }
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
        let now = self.micros(Instant::now());
        // Replays are the common case: answer them under a shared lock.
        {
            let table = self.read(shard);
            if let Some(slot) = table.slots.get(&key)
                && slot.is_completed()
                && slot.is_live(now)
            {
                if !slot.holds(fingerprint) {
                    return Ok(Begin::Mismatch);
                }
                if let Some(record) = slot.record() {
                    return Ok(Begin::Completed(record));
                }
            }
        }
        let claim = || Slot::claim(token, fingerprint, Self::deadline(now, lease), now);
        for attempt in 0..2 {
            {
                let mut table = self.write(shard);
                if let Some(slot) = table.slots.get_mut(&key) {
                    let begin = if slot.is_live(now) {
                        Self::begin_on_live(slot, fingerprint, token, lease, now)
                    } else {
                        self.bytes.fetch_sub(slot.bytes(), Ordering::Relaxed);
                        *slot = claim();
                        self.bytes.fetch_add(slot.bytes(), Ordering::Relaxed);
                        Begin::Claimed
                    };
                    Self::expires(shard, slot.deadline);
                    if begin == Begin::Claimed {
                        // A lapsed claim was replaced: its watchers retry.
                        table.wake(&key);
                    }
                    return Ok(begin);
                }
                if self.try_reserve(ENTRY_BYTES + RECORD_AT) {
                    let slot = claim();
                    Self::expires(shard, slot.deadline);
                    table.slots.insert(key, slot);
                    return Ok(Begin::Claimed);
                }
            }
            // Full: reclaim what has expired everywhere, then try once more.
            if attempt == 0 {
                for shard in self.shards.iter() {
                    self.sweep_shard(shard, Instant::now());
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
        now: u64,
    ) -> Begin {
        if !slot.holds(fingerprint) {
            return Begin::Mismatch;
        }
        if let Some(record) = slot.record() {
            return Begin::Completed(record);
        }
        if slot.token() == token {
            slot.deadline = Self::deadline(now, lease);
            return Begin::Claimed;
        }
        Begin::InProgress {
            retry_after: Duration::from_micros(slot.deadline - now),
        }
    }

    fn complete(&self, key: Key, token: Token, record: Record, ttl: Duration) -> Completion {
        let shard = self.shard(&key);
        let now = self.micros(Instant::now());
        let mut table = self.write(shard);
        let Some(slot) = table.slots.get_mut(&key) else {
            return Completion::Lost;
        };
        if slot.token() != token || !slot.is_live(now) {
            return Completion::Lost;
        }
        if !slot.is_completed() {
            let before = slot.bytes();
            slot.complete(&record, Self::deadline(now, ttl), now);
            self.bytes
                .fetch_add(slot.bytes() - before, Ordering::Relaxed);
            Self::expires(shard, slot.deadline);
            table.wake(&key);
        }
        Completion::Stored
    }

    fn release(&self, key: Key, token: Token) {
        let mut table = self.write(self.shard(&key));
        let ours = table
            .slots
            .get(&key)
            .is_some_and(|slot| slot.token() == token && !slot.is_completed());
        if ours && let Some(slot) = table.slots.remove(&key) {
            table.wake(&key);
            self.len.fetch_sub(1, Ordering::Relaxed);
            self.bytes.fetch_sub(slot.bytes(), Ordering::Relaxed);
        }
    }

    fn renew(&self, key: Key, token: Token, lease: Duration) -> bool {
        let shard = self.shard(&key);
        let now = self.micros(Instant::now());
        let mut table = self.write(shard);
        match table.slots.get_mut(&key) {
            Some(slot) if slot.token() == token && slot.is_live(now) && !slot.is_completed() => {
                slot.deadline = Self::deadline(now, lease);
                true
            }
            _ => false,
        }
    }

    fn inspect(&self, key: Key) -> Inspection {
        let now = self.micros(Instant::now());
        let table = self.read(self.shard(&key));
        let Some(slot) = table.slots.get(&key).filter(|slot| slot.is_live(now)) else {
            return Inspection::Absent;
        };
        let expires_in = Duration::from_micros(slot.deadline - now);
        let age = Duration::from_micros(now.saturating_sub(slot.since()));
        match slot.record() {
            None => Inspection::InProgress {
                fingerprint: slot.fingerprint(),
                expires_in,
                held_for: Some(age),
            },
            Some(record) => Inspection::Completed {
                outcome: record.outcome(),
                fingerprint: slot.fingerprint(),
                stored_at: SystemTime::now().checked_sub(age),
                expires_in,
                size: record.payload().len(),
            },
        }
    }

    fn append_step(
        &self,
        key: Key,
        token: Token,
        step: JournaledStep,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let shard = self.shard(&key);
        let now = self.micros(Instant::now());
        let mut table = self.write(shard);
        let ours = table
            .slots
            .get(&key)
            .is_some_and(|slot| slot.token() == token && slot.is_live(now) && !slot.is_completed());
        if !ours {
            return Ok(false);
        }
        let deadline = Self::deadline(now, ttl);
        let journal = table.journals.entry(key).or_insert(Journal {
            deadline,
            steps: Vec::new(),
        });
        if journal.deadline <= now {
            // Expired and not yet swept: a new attempt starts afresh, as on
            // the stores whose journals expire on their own.
            let bytes: usize = journal.steps.iter().map(Journal::cost).sum();
            self.bytes.fetch_sub(bytes, Ordering::Relaxed);
            journal.steps.clear();
        }
        journal.deadline = journal.deadline.max(deadline);
        Self::expires(shard, journal.deadline);
        if journal.steps.iter().any(|done| done.name == step.name) {
            return Ok(true);
        }
        let cost = Journal::cost(&step);
        if self.bytes.fetch_add(cost, Ordering::Relaxed) + cost > self.max_bytes {
            self.bytes.fetch_sub(cost, Ordering::Relaxed);
            return Err(self.full());
        }
        journal.steps.push(step);
        Ok(true)
    }

    fn epoch(&self, key: Key, token: Token) -> Option<u64> {
        let now = self.micros(Instant::now());
        let table = self.read(self.shard(&key));
        let ours = table
            .slots
            .get(&key)
            .is_some_and(|slot| slot.token() == token && slot.is_live(now) && !slot.is_completed());
        // Under the key's lock, so that no claim taking over can have been
        // handed a smaller one.
        ours.then(|| self.last_epoch.fetch_add(1, Ordering::Relaxed) + 1)
    }

    fn steps(&self, key: Key) -> Vec<JournaledStep> {
        let now = self.micros(Instant::now());
        let table = self.read(self.shard(&key));
        table
            .journals
            .get(&key)
            .filter(|journal| journal.deadline > now)
            .map(|journal| journal.steps.clone())
            .unwrap_or_default()
    }

    fn forget(&self, key: Key) -> bool {
        let now = self.micros(Instant::now());
        let mut table = self.write(self.shard(&key));
        if let Some(journal) = table.journals.remove(&key) {
            let bytes: usize = journal.steps.iter().map(Journal::cost).sum();
            self.bytes.fetch_sub(bytes, Ordering::Relaxed);
        }
        let Some(slot) = table.slots.remove(&key) else {
            return false;
        };
        table.wake(&key);
        self.len.fetch_sub(1, Ordering::Relaxed);
        self.bytes.fetch_sub(slot.bytes(), Ordering::Relaxed);
        slot.is_live(now)
    }

    fn claims_older_than(&self, age: Duration, limit: usize) -> Vec<HeldClaim> {
        let now = self.micros(Instant::now());
        let age = micros(age);
        let mut claims = Vec::new();
        for shard in self.shards.iter() {
            let table = self.read(shard);
            for (key, slot) in &table.slots {
                if claims.len() == limit {
                    return claims;
                }
                let held = now.saturating_sub(slot.since());
                if !slot.is_completed() && slot.is_live(now) && held > age {
                    claims.push(HeldClaim::new(
                        *key,
                        slot.fingerprint(),
                        Duration::from_micros(held),
                        Duration::from_micros(slot.deadline - now),
                    ));
                }
            }
        }
        claims
    }

    fn watch(&self, key: Key) -> Watch {
        let now = self.micros(Instant::now());
        let mut table = self.write(self.shard(&key));
        let claimed = table
            .slots
            .get(&key)
            .is_some_and(|slot| slot.is_live(now) && !slot.is_completed());
        if !claimed {
            return Box::pin(std::future::ready(()));
        }
        let notify = table.watchers.entry(key).or_default().clone();
        let mut notified = Box::pin(notify.notified_owned());
        // Registered while the shard is locked: no wake-up can slip between
        // this check and the wait.
        notified.as_mut().enable();
        notified
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
        self.sweep_if_stalled();
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

    fn append_step(
        &self,
        key: Key,
        token: Token,
        name: String,
        value: Vec<u8>,
        ttl: Duration,
    ) -> StoreFuture<'_, bool> {
        let answer = self
            .inner
            .append_step(key, token, JournaledStep::new(name, value), ttl);
        Box::pin(std::future::ready(answer))
    }

    fn steps(&self, key: Key) -> StoreFuture<'_, Vec<JournaledStep>> {
        Box::pin(std::future::ready(Ok(self.inner.steps(key))))
    }

    fn epoch(&self, key: Key, token: Token, ttl: Duration) -> StoreFuture<'_, Option<u64>> {
        let _ = ttl;
        Box::pin(std::future::ready(Ok(self.inner.epoch(key, token))))
    }

    fn claims_older_than(&self, age: Duration, limit: usize) -> StoreFuture<'_, Vec<HeldClaim>> {
        Box::pin(std::future::ready(Ok(self
            .inner
            .claims_older_than(age, limit))))
    }
}
