//! An in-process cache of completed records in front of a store, for hot
//! replays.

use std::future::ready;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hashlink::LruCache;
use tokio::time::Instant;

use super::{
    Begin, Completion, HeldClaim, Inspection, JournaledStep, Limits, Record, Store, StoreFuture,
    Token, Watch,
};
use crate::key::{Fingerprint, Key};

/// A longer ttl counts as this long.
const LONGEST_TTL: Duration = Duration::from_secs(365 * 24 * 60 * 60);
/// Records larger than this are not kept, unless set otherwise.
const MAX_RECORD_SIZE: usize = 64 * 1024;
/// Below this many records one shard is enough.
const SHARDED_FROM: usize = 64;
/// Shards of a larger cache, each behind its own lock.
const SHARDS: usize = 16;

/// A store that answers repeated replays of a completed call from memory,
/// without a round trip.
///
/// `ReplayCache` wraps any [`Store`]. When the store answers a
/// [`begin`](Store::begin) with a completed record, the cache keeps that
/// record, with its key and fingerprint, for `ttl`; until then a `begin` of
/// the same key is answered from memory: the record for the same
/// fingerprint, [`Begin::Mismatch`] for another. The first replay of a key
/// in a process still goes to the store, and so does every claim, lease and
/// record of a call that runs. Every other operation goes to the store.
///
/// ```
/// use std::time::Duration;
/// use idem_core::Idempotency;
/// use idem_core::store::{ReplayCache, Store};
///
/// /// A handle on `store` (a Redis or PostgreSQL store, say) whose
/// /// replays are answered in process for 5 s after the store handed them
/// /// out, up to 10 000 records.
/// fn with_hot_replays(store: impl Store + 'static) -> Idempotency {
///     Idempotency::new(ReplayCache::new(store, 10_000, Duration::from_secs(5)))
/// }
/// # let _ = with_hot_replays(idem_core::MemoryStore::new());
/// ```
///
/// # What it changes
///
/// A completed record never changes in the store until it expires or is
/// forgotten, so answering it from memory gives the same answer, with two
/// exceptions, both bounded by the cache's `ttl` (measured from when the
/// replay that read the record asked the store for it):
///
/// - **A record that expired in the store** is still replayed from the
///   cache, and a call of the same key with other arguments is still
///   refused with [`Error::KeyReused`](crate::Error::KeyReused), where the
///   store would have let a new call run.
/// - **A record forgotten by another process** (or directly in the store) is
///   still replayed by this one. [`forget`](Store::forget) through this
///   cache, as [`Idempotency::forget`](crate::Idempotency::forget) does,
///   drops the cache's copy too, in this process, also one kept by a
///   replay that read the store while the forget was on its way; but a
///   forget that failed (a timeout) and lands later, after a replay read the
///   record again, leaves that copy: repeat a forget that failed.
///
/// Keep `ttl` well under the calls' TTL and as short as the replays you
/// want to spare a round trip (a client's retry burst is seconds).
/// [`inspect`](Store::inspect) and the other operators' operations always
/// read the store.
///
/// The cache holds at most `capacity` records, each costing its key,
/// fingerprint, payload and ≈100 bytes. From 64 records on it is split into
/// 16 shards of keys, each with a sixteenth of the capacity (rounded down:
/// a `capacity` of 100 holds at most 96) and its own lock, and a full
/// shard drops its least recently used record, so a record may be dropped
/// while other shards have room. Records
/// whose payload is larger than 64 KiB are not kept (see
/// [`max_record_size`](Self::max_record_size)), so the cache's memory is
/// bounded by `capacity` × (64 KiB + ≈170 bytes). A record that aged out
/// is dropped when it is next looked up, pushed out, or found at its
/// shard's least recently used end as another record is kept. A `capacity` or `ttl` of zero caches nothing; a `ttl` over a year
/// counts as a year. A replay answered from the cache is told and
/// counted as any replay (`replayed`).
pub struct ReplayCache<S> {
    inner: S,
    shards: Box<[Mutex<LruCache<Key, Kept>>]>,
    ttl: Duration,
    max_record_size: usize,
    /// Raised by every `forget`: a record the store handed out before a
    /// forget is not kept after it.
    forgets: AtomicU64,
}

/// A record the store handed out, until `until`.
struct Kept {
    fingerprint: Fingerprint,
    record: Record,
    until: Instant,
}

impl<S: Store> ReplayCache<S> {
    /// Caches up to `capacity` completed records of `inner`, each for `ttl`
    /// from when the replay that read it asked `inner`.
    #[must_use]
    pub fn new(inner: S, capacity: usize, ttl: Duration) -> Self {
        let shards = if capacity >= SHARDED_FROM { SHARDS } else { 1 };
        let per_shard = capacity / shards;
        Self {
            inner,
            shards: (0..shards)
                .map(|_| Mutex::new(LruCache::new(per_shard)))
                .collect(),
            ttl: if per_shard == 0 {
                Duration::ZERO
            } else {
                ttl.min(LONGEST_TTL)
            },
            max_record_size: MAX_RECORD_SIZE,
            forgets: AtomicU64::new(0),
        }
    }

    /// Keeps only records whose payload is at most `bytes` long (64 KiB
    /// unless set): larger ones are always read from the store.
    #[must_use]
    pub fn max_record_size(mut self, bytes: usize) -> Self {
        self.max_record_size = bytes;
        self
    }

    /// The store behind the cache.
    #[must_use]
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// How many records the cache holds now, expired ones included until
    /// they are next looked up or pushed out.
    #[must_use]
    pub fn len(&self) -> usize {
        self.shards.iter().map(|shard| lock(shard).len()).sum()
    }

    /// Whether the cache holds no record.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard(&self, key: &Key) -> &Mutex<LruCache<Key, Kept>> {
        // A key is a SHA-256 digest: any of its bytes spreads keys evenly.
        &self.shards[usize::from(key.digest()[31]) % self.shards.len()]
    }

    /// The answer the cache holds for `key` and `fingerprint`, if any.
    fn answer(&self, key: Key, fingerprint: Fingerprint) -> Option<Begin> {
        if self.ttl.is_zero() {
            return None;
        }
        let mut shard = lock(self.shard(&key));
        let kept = shard.get(&key)?;
        if kept.until <= Instant::now() {
            shard.remove(&key);
            return None;
        }
        Some(if kept.fingerprint == fingerprint {
            Begin::Completed(kept.record.clone())
        } else {
            Begin::Mismatch
        })
    }

    /// Keeps `record`, handed out by the store for `key` when asked at
    /// `asked`, unless a forget began since `forgets` was read; drops the
    /// records that aged out before it.
    fn keep(
        &self,
        key: Key,
        fingerprint: Fingerprint,
        record: &Record,
        asked: Instant,
        forgets: u64,
    ) {
        let now = Instant::now();
        // An answer that came back after its ttl had run out is not kept: it
        // would push out a live record and never be replayed.
        if asked + self.ttl <= now || record.payload().len() > self.max_record_size {
            return;
        }
        let mut shard = lock(self.shard(&key));
        while shard
            .iter()
            .next()
            .is_some_and(|(_, kept)| kept.until <= now)
        {
            shard.remove_lru();
        }
        if self.forgets.load(Ordering::Acquire) == forgets {
            shard.insert(
                key,
                Kept {
                    fingerprint,
                    record: record.clone(),
                    until: asked + self.ttl,
                },
            );
        }
    }

    fn drop_kept(&self, key: Key) {
        self.forgets.fetch_add(1, Ordering::AcqRel);
        lock(self.shard(&key)).remove(&key);
    }
}

/// Drops the cache's copy of `key` when dropped.
struct DropKeptOnDrop<'a, S: Store> {
    cache: &'a ReplayCache<S>,
    key: Key,
}

impl<S: Store> Drop for DropKeptOnDrop<'_, S> {
    fn drop(&mut self) {
        self.cache.drop_kept(self.key);
    }
}

/// A poisoned shard holds whole entries only (no operation panics midway),
/// so its contents stay usable.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<S> std::fmt::Debug for ReplayCache<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayCache")
            .field("shards", &self.shards.len())
            .field("ttl", &self.ttl)
            .field("max_record_size", &self.max_record_size)
            .finish_non_exhaustive()
    }
}

impl<S: Store> Store for ReplayCache<S> {
    fn begin(
        &self,
        key: Key,
        fingerprint: Fingerprint,
        token: Token,
        lease: Duration,
    ) -> StoreFuture<'_, Begin> {
        if let Some(answer) = self.answer(key, fingerprint) {
            return Box::pin(ready(Ok(answer)));
        }
        let forgets = self.forgets.load(Ordering::Acquire);
        let asked = Instant::now();
        Box::pin(async move {
            let begun = self.inner.begin(key, fingerprint, token, lease).await?;
            if let Begin::Completed(record) = &begun {
                self.keep(key, fingerprint, record, asked, forgets);
            }
            Ok(begun)
        })
    }

    fn begin_with_steps(
        &self,
        key: Key,
        fingerprint: Fingerprint,
        token: Token,
        lease: Duration,
    ) -> StoreFuture<'_, (Begin, Option<Vec<JournaledStep>>)> {
        if let Some(answer) = self.answer(key, fingerprint) {
            return Box::pin(ready(Ok((answer, None))));
        }
        let forgets = self.forgets.load(Ordering::Acquire);
        let asked = Instant::now();
        Box::pin(async move {
            let (begun, steps) = self
                .inner
                .begin_with_steps(key, fingerprint, token, lease)
                .await?;
            if let Begin::Completed(record) = &begun {
                self.keep(key, fingerprint, record, asked, forgets);
            }
            Ok((begun, steps))
        })
    }

    fn complete(
        &self,
        key: Key,
        token: Token,
        record: Record,
        ttl: Duration,
    ) -> StoreFuture<'_, Completion> {
        self.inner.complete(key, token, record, ttl)
    }

    fn release(&self, key: Key, token: Token) -> StoreFuture<'_, ()> {
        self.inner.release(key, token)
    }

    fn renew(&self, key: Key, token: Token, lease: Duration) -> StoreFuture<'_, bool> {
        self.inner.renew(key, token, lease)
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

    fn append_step(
        &self,
        key: Key,
        token: Token,
        name: String,
        value: Vec<u8>,
        ttl: Duration,
    ) -> StoreFuture<'_, bool> {
        self.inner.append_step(key, token, name, value, ttl)
    }

    fn steps(&self, key: Key) -> StoreFuture<'_, Vec<JournaledStep>> {
        self.inner.steps(key)
    }

    fn epoch(&self, key: Key, token: Token, ttl: Duration) -> StoreFuture<'_, Option<u64>> {
        self.inner.epoch(key, token, ttl)
    }

    fn forget(&self, key: Key) -> StoreFuture<'_, bool> {
        self.drop_kept(key);
        Box::pin(async move {
            // A replay that read the store before the forget landed may keep
            // the record while it goes on: once it ended, answered or cut
            // off, what was kept meanwhile is dropped too.
            let _after = DropKeptOnDrop { cache: self, key };
            self.inner.forget(key).await
        })
    }

    fn claims_older_than(&self, age: Duration, limit: usize) -> StoreFuture<'_, Vec<HeldClaim>> {
        self.inner.claims_older_than(age, limit)
    }
}
