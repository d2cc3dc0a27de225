//! The embedded, in-process store: the default backend.
//!
//! Records live in a [`DashMap`], sharded so that concurrent callers on
//! different keys rarely share a lock. Time is tokio's clock, so a paused test
//! clock drives leases and TTLs. Expired claims and records are reclaimed by a
//! sweeper task, spawned on the first call made inside a tokio runtime, that
//! visits the map every [`sweep_interval`](MemoryStoreBuilder::sweep_interval);
//! callers waiting on a claim are woken in process when it ends.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{Begin, Completion, Record, Store, StoreFuture, Token, Watch};
use crate::error::{StoreError, StoreErrorKind};
use crate::key::{Fingerprint, Key};

/// The default cap on records a [`MemoryStore`] holds.
pub const DEFAULT_MAX_RECORDS: usize = 1_000_000;

/// The default time between two sweeps for expired records.
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// An in-process [`Store`]: claims and records kept in this process's memory.
///
/// It is the store of the default handle, which `#[idempotent]` uses when
/// no `store = …` is given and [`set_default`](crate::set_default) was not
/// called. It deduplicates calls within one process only; services with more
/// than one process need a shared store such as Redis.
///
/// Memory is bounded: expired records are reclaimed in the background, and a
/// new key beyond [`max_records`](MemoryStoreBuilder::max_records) live records
/// is refused with [`StoreErrorKind::Full`] (an existing record is never
/// evicted early, which would let its call run twice).
///
/// Clones share the same records.
///
/// ```
/// use std::time::Duration;
/// use idem_core::{Idempotency, Key, Fingerprint, MemoryStore, Settings};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), idem_core::Error> {
/// let store = MemoryStore::builder().max_records(10_000).build();
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
    sweep_interval: Duration,
}

struct Inner {
    slots: DashMap<Key, Slot>,
    len: AtomicUsize,
    max_records: usize,
    sweep_interval: Duration,
    sweeper_running: AtomicBool,
}

enum Slot {
    Claimed {
        token: Token,
        fingerprint: Fingerprint,
        lease_until: Instant,
        /// Present once somebody watches the claim.
        woken: Option<Arc<Notify>>,
    },
    Completed {
        token: Token,
        fingerprint: Fingerprint,
        record: Record,
        expires_at: Instant,
    },
}

impl Slot {
    fn claim(token: Token, fingerprint: Fingerprint, lease_until: Instant) -> Self {
        Self::Claimed {
            token,
            fingerprint,
            lease_until,
            woken: None,
        }
    }

    fn deadline(&self) -> Instant {
        match self {
            Self::Claimed { lease_until, .. } => *lease_until,
            Self::Completed { expires_at, .. } => *expires_at,
        }
    }

    fn is_live(&self, now: Instant) -> bool {
        self.deadline() > now
    }

    /// Wakes whoever watches this slot's claim; called as the claim ends.
    fn wake(&mut self) {
        if let Self::Claimed { woken, .. } = self
            && let Some(notify) = woken.take()
        {
            notify.notify_waiters();
        }
    }
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
            sweep_interval: DEFAULT_SWEEP_INTERVAL,
        }
    }

    /// How many claims and records the store holds, expired ones not yet
    /// swept included.
    #[must_use]
    pub fn len(&self) -> usize {
        self.inner.len.load(Ordering::Relaxed)
    }

    /// Whether the store holds nothing.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes every expired claim and record now, waking their watchers.
    /// The background sweeper calls this; tests and shutdown code may too.
    pub fn sweep(&self) {
        self.inner.sweep();
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
            .field("max_records", &self.inner.max_records)
            .field("sweep_interval", &self.inner.sweep_interval)
            .finish_non_exhaustive()
    }
}

impl MemoryStoreBuilder {
    /// The most live claims and records the store holds; a new key beyond it
    /// is refused with [`StoreErrorKind::Full`]. Default
    /// [`DEFAULT_MAX_RECORDS`].
    #[must_use]
    pub fn max_records(mut self, max_records: usize) -> Self {
        self.max_records = max_records;
        self
    }

    /// How often expired records are reclaimed. Default
    /// [`DEFAULT_SWEEP_INTERVAL`].
    ///
    /// # Panics
    /// If `interval` is zero.
    #[must_use]
    pub fn sweep_interval(mut self, interval: Duration) -> Self {
        assert!(!interval.is_zero(), "sweep_interval must be positive");
        self.sweep_interval = interval;
        self
    }

    /// Builds the store.
    #[must_use]
    pub fn build(self) -> MemoryStore {
        MemoryStore {
            inner: Arc::new(Inner {
                slots: DashMap::new(),
                len: AtomicUsize::new(0),
                max_records: self.max_records,
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

async fn sweep_forever(store: Weak<Inner>, every: Duration) {
    let _flag = SweeperFlag(store.clone());
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match store.upgrade() {
            Some(inner) => inner.sweep(),
            None => return,
        }
    }
}

impl Inner {
    fn sweep(&self) {
        let now = Instant::now();
        self.slots.retain(|_, slot| {
            if slot.is_live(now) {
                return true;
            }
            slot.wake();
            self.len.fetch_sub(1, Ordering::Relaxed);
            false
        });
    }

    /// Makes room for one more slot, or refuses.
    fn reserve(&self) -> Result<(), StoreError> {
        if self.len.fetch_add(1, Ordering::Relaxed) >= self.max_records {
            self.len.fetch_sub(1, Ordering::Relaxed);
            return Err(StoreError::new(
                StoreErrorKind::Full,
                format!(
                    "the memory store holds its maximum of {} records; raise max_records or \
                     shorten the TTL",
                    self.max_records
                ),
            ));
        }
        Ok(())
    }

    fn begin(
        &self,
        key: Key,
        fingerprint: Fingerprint,
        token: Token,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        let now = Instant::now();
        // Replays are the common case: answer them under a shared lock.
        if let Some(slot) = self.slots.get(&key)
            && let Slot::Completed {
                fingerprint: stored,
                record,
                expires_at,
                ..
            } = &*slot
            && *expires_at > now
        {
            return Ok(if *stored == fingerprint {
                Begin::Completed(record.clone())
            } else {
                Begin::Mismatch
            });
        }
        let claim = Slot::claim(token, fingerprint, now + lease);
        match self.slots.entry(key) {
            Entry::Vacant(vacant) => {
                self.reserve()?;
                vacant.insert(claim);
                Ok(Begin::Claimed)
            }
            Entry::Occupied(mut occupied) => {
                let slot = occupied.get_mut();
                if !slot.is_live(now) {
                    slot.wake();
                    *slot = claim;
                    return Ok(Begin::Claimed);
                }
                Ok(match slot {
                    Slot::Claimed {
                        fingerprint: stored,
                        ..
                    }
                    | Slot::Completed {
                        fingerprint: stored,
                        ..
                    } if *stored != fingerprint => Begin::Mismatch,
                    Slot::Completed { record, .. } => Begin::Completed(record.clone()),
                    Slot::Claimed {
                        token: holder,
                        lease_until,
                        ..
                    } if *holder == token => {
                        *lease_until = now + lease;
                        Begin::Claimed
                    }
                    Slot::Claimed { lease_until, .. } => Begin::InProgress {
                        retry_after: *lease_until - now,
                    },
                })
            }
        }
    }

    fn complete(&self, key: Key, token: Token, record: Record, ttl: Duration) -> Completion {
        let now = Instant::now();
        let Some(mut slot) = self.slots.get_mut(&key) else {
            return Completion::Lost;
        };
        match &*slot {
            Slot::Claimed {
                token: holder,
                fingerprint,
                lease_until,
                ..
            } if *holder == token && *lease_until > now => {
                let fingerprint = *fingerprint;
                slot.wake();
                *slot = Slot::Completed {
                    token,
                    fingerprint,
                    record,
                    expires_at: now + ttl,
                };
                Completion::Stored
            }
            Slot::Completed { token: holder, .. } if *holder == token => Completion::Stored,
            _ => Completion::Lost,
        }
    }

    fn release(&self, key: Key, token: Token) {
        let removed = self.slots.remove_if_mut(&key, |_, slot| {
            let ours = matches!(slot, Slot::Claimed { token: holder, .. } if *holder == token);
            if ours {
                slot.wake();
            }
            ours
        });
        if removed.is_some() {
            self.len.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn renew(&self, key: Key, token: Token, lease: Duration) -> bool {
        let now = Instant::now();
        let Some(mut slot) = self.slots.get_mut(&key) else {
            return false;
        };
        match &mut *slot {
            Slot::Claimed {
                token: holder,
                lease_until,
                ..
            } if *holder == token && *lease_until > now => {
                *lease_until = now + lease;
                true
            }
            _ => false,
        }
    }

    fn watch(&self, key: Key) -> Watch {
        let now = Instant::now();
        let Some(mut slot) = self.slots.get_mut(&key) else {
            return Box::pin(std::future::ready(()));
        };
        match &mut *slot {
            Slot::Claimed {
                lease_until, woken, ..
            } if *lease_until > now => {
                let notify = woken.get_or_insert_with(Arc::default).clone();
                let mut notified = Box::pin(notify.notified_owned());
                // Registered while the shard is locked: no wake-up can slip
                // between this check and the wait.
                notified.as_mut().enable();
                drop(slot);
                notified
            }
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
}
