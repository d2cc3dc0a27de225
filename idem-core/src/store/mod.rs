//! The store protocol, for backend authors: four atomic operations every
//! backend implements, and the types they exchange.
//!
//! Users pick a store ([`MemoryStore`](crate::MemoryStore), a Redis store,
//! or one by URL with [`connect`](crate::connect)) and hand it to an
//! [`Idempotency`](crate::Idempotency) handle; from this module they may
//! want only [`ReplayCache`], which answers hot replays in process in front
//! of any store. The rest is for those who write a store.
//!
//! A store keeps, per [`Key`], either an *in-progress claim*
//! (the holder's [`Token`], the call's [`Fingerprint`]
//! and a lease deadline) or a *completed record* (the fingerprint and the
//! serialized [`Record`], kept for a TTL).
//!
//! | operation | does | answers |
//! |---|---|---|
//! | [`begin`](Store::begin) | absent or expired: write an in-progress claim | [`Begin`] |
//! | [`complete`](Store::complete) | only while the claim is ours: store the record | [`Completion`] |
//! | [`release`](Store::release) | only while the claim is ours: delete it | |
//! | [`renew`](Store::renew) | only while the claim is ours: extend its lease | `bool` |
//!
//! For multi-step calls (see [`step`](crate::step)), two more keep a
//! call's *journal*: [`append_step`](Store::append_step) adds a named
//! step's serialized result, only while the claim is ours, and
//! [`steps`](Store::steps) reads what the journal holds. A journal outlives
//! a released claim (a retry resumes from it) and expires a TTL after its
//! last entry. A store without them answers
//! [`StoreErrorKind::Unsupported`] (the default), and calls that use steps
//! fail on it with that error before the first step runs.
//!
//! For operators, three more: [`inspect`](Store::inspect) says what a key
//! holds without decoding its result, [`forget`](Store::forget) deletes it
//! whatever it holds, and [`claims_older_than`](Store::claims_older_than)
//! lists claims held for longer than an age. A store that cannot do them
//! answers [`StoreErrorKind::Unsupported`] (the default).
//!
//! Each operation is atomic and, on a networked backend, one round trip.
//! Repeating an operation with the same token is harmless: a `begin` by the
//! current holder claims again, a `complete` of a record already completed by
//! that token answers [`Completion::Stored`], a second `release` does
//! nothing. The engine relies on this to retry operations whose outcome it
//! could not see (a timeout).
//!
//! In-process coalescing (callers of one key in one process sharing one
//! claim) is not a store's concern: the [`Idempotency`](crate::Idempotency)
//! handle does it. A store that can tell when a claim ends offers
//! [`watch`](Store::watch), so that waiting callers wake at once instead of
//! polling.
//!
//! # Implementing a store
//!
//! Implement [`Store`] on your backend, following the table above; map the
//! backend's failures to a [`StoreError`] of the right [`StoreErrorKind`]
//! (an outage is [`Unavailable`](StoreErrorKind::Unavailable) or
//! [`Timeout`](StoreErrorKind::Timeout), so that callers fail closed);
//! keep [`Record`]s as the bytes [`Record::encode`] gives. Then prove the
//! store with the same conformance suite the built-in stores pass, from the
//! `idem-test` crate, in one line of a test file:
//!
//! ```ignore
//! idem_test::conformance_suite!(MyBackend);
//! ```
//!
//! where `MyBackend` implements `idem_test::conformance::Backend` (it opens
//! a store and says what lease and TTL the suite may wait out).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::key::{Fingerprint, Key};

pub(crate) mod connect;
pub mod memory;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod postgres;
mod record;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;
mod replay_cache;

pub use crate::error::{StoreError, StoreErrorKind};
pub(crate) use connect::connect;
pub(crate) use record::unkept_err_tag;
pub use record::{Outcome, Record};
pub use replay_cache::ReplayCache;

/// The future a [`Store`] operation returns.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A future that resolves when an in-progress claim may have ended; see
/// [`Store::watch`].
pub type Watch = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Identifies one claim: only the holder of the token may complete, release or
/// renew it. Fresh tokens are random 128-bit values.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token(u128);

impl Token {
    /// A fresh random token.
    #[must_use]
    pub fn random() -> Self {
        Self(rand::random())
    }

    /// A token from its numeric value, e.g. one a store kept.
    #[must_use]
    pub const fn from_u128(value: u128) -> Self {
        Self(value)
    }

    /// The token's numeric value.
    #[must_use]
    pub const fn as_u128(self) -> u128 {
        self.0
    }
}

impl std::fmt::Display for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token({self})")
    }
}

/// What [`Store::begin`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Begin {
    /// The key was free (absent, or its lease or TTL had run out) and is now
    /// claimed with the caller's token; or the caller already held it.
    Claimed,
    /// A call with the same fingerprint completed; here is its record.
    Completed(Record),
    /// Another token holds a live claim with the same fingerprint.
    InProgress {
        /// What is left of the holder's lease.
        retry_after: Duration,
    },
    /// The key is held or completed with a different fingerprint.
    Mismatch,
}

/// What [`Store::complete`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Completion {
    /// The record is stored (now, or by an earlier attempt with this token).
    Stored,
    /// The claim is no longer ours: its lease lapsed, whether or not
    /// another caller has taken the key since. Nothing was written.
    Lost,
}

/// What a store promises about its own timing, for the engine to check
/// settings against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Limits {
    /// The longest one operation may take before it fails with
    /// [`StoreErrorKind::Timeout`]; `None` for a store that answers in
    /// process. A lease must be at least three times as long, so that a
    /// renewal that times out can be retried before the lease lapses.
    pub response_timeout: Option<Duration>,
}

impl Limits {
    /// Limits of a store whose operations time out after `response_timeout`.
    #[must_use]
    pub const fn with_response_timeout(response_timeout: Duration) -> Self {
        Self {
            response_timeout: Some(response_timeout),
        }
    }
}

/// A backend that keeps idempotency claims and records.
///
/// The trait is object-safe: `Arc<dyn Store>` is a store, and so are `&S`,
/// `Arc<S>` and `Box<S>` for any store `S`. See the [module docs](self) for the
/// protocol each operation follows; [`memory::MemoryStore`] is the reference
/// implementation.
pub trait Store: Send + Sync {
    /// Claims `key` for `token` unless a live claim or record exists.
    ///
    /// A live claim or record whose fingerprint differs from `fingerprint`
    /// answers [`Begin::Mismatch`]. A claim is written with a lease of `lease`.
    fn begin(
        &self,
        key: Key,
        fingerprint: Fingerprint,
        token: Token,
        lease: Duration,
    ) -> StoreFuture<'_, Begin>;

    /// Stores `record` for `ttl` if `token` still holds a live claim on `key`.
    fn complete(
        &self,
        key: Key,
        token: Token,
        record: Record,
        ttl: Duration,
    ) -> StoreFuture<'_, Completion>;

    /// Deletes the claim on `key` if `token` holds it; otherwise does nothing.
    fn release(&self, key: Key, token: Token) -> StoreFuture<'_, ()>;

    /// Extends the claim on `key` to `lease` from now if `token` still holds
    /// it; answers whether it did.
    fn renew(&self, key: Key, token: Token, lease: Duration) -> StoreFuture<'_, bool>;

    /// A future that resolves when the claim on `key` is completed, released
    /// or replaced, if this store can tell; `None` makes waiting callers poll
    /// [`begin`](Store::begin) with backoff instead.
    ///
    /// An implementation must register interest *before* it returns, so that a
    /// change after [`begin`](Store::begin) answered `InProgress` is never
    /// missed, and must resolve at once if the key is no longer in progress.
    fn watch(&self, key: Key) -> Option<Watch> {
        let _ = key;
        None
    }

    /// What this store promises about its timing. By default nothing: a
    /// store that answers in process.
    fn limits(&self) -> Limits {
        Limits::default()
    }

    /// What `key` holds now: nothing, a claim in progress or a completed
    /// record, without decoding the record's payload. Expired entries are
    /// absent. By default [`StoreErrorKind::Unsupported`].
    fn inspect(&self, key: Key) -> StoreFuture<'_, Inspection> {
        let _ = key;
        unsupported("inspect")
    }

    /// Adds step `name`'s serialized result `value` to `key`'s journal if
    /// `token` still holds a live claim on `key`, and keeps the journal for
    /// at least `ttl` from now; answers whether the claim was still ours.
    ///
    /// A name already in the journal keeps its first value (the call
    /// repeated an append whose answer it did not see). The journal
    /// survives a [`release`](Store::release) of the claim, so that the
    /// next claim resumes from it, and is deleted by
    /// [`forget`](Store::forget). By default
    /// [`StoreErrorKind::Unsupported`].
    fn append_step(
        &self,
        key: Key,
        token: Token,
        name: String,
        value: Vec<u8>,
        ttl: Duration,
    ) -> StoreFuture<'_, bool> {
        let _ = (key, token, name, value, ttl);
        unsupported("append_step")
    }

    /// The steps journaled under `key`, in the order they were appended;
    /// empty when there are none or the journal expired. By default
    /// [`StoreErrorKind::Unsupported`].
    fn steps(&self, key: Key) -> StoreFuture<'_, Vec<JournaledStep>> {
        let _ = key;
        unsupported("steps")
    }

    /// [`begin`](Store::begin), and when it claims, the steps journaled
    /// under `key` too ([`steps`](Store::steps)), for a call whose body
    /// runs steps ([`SettingsBuilder::expect_steps`](crate::SettingsBuilder::expect_steps)).
    /// The steps are `None` when they were not read (journals unsupported,
    /// or their read failed): the call then reads them at its first step.
    ///
    /// By default `begin`, then `steps` once claimed: two round trips. A
    /// store that can read both in one overrides it (the Redis store sends
    /// them as one pipeline to a node; on a cluster it claims, then reads,
    /// since a pipeline redirected mid-migration fails).
    fn begin_with_steps(
        &self,
        key: Key,
        fingerprint: Fingerprint,
        token: Token,
        lease: Duration,
    ) -> StoreFuture<'_, (Begin, Option<Vec<JournaledStep>>)> {
        Box::pin(begin_then_read_steps(self, key, fingerprint, token, lease))
    }

    /// A fencing epoch for `token`'s claim on `key`, if `token` still holds
    /// a live claim on `key` (`None` otherwise): a number greater than every
    /// epoch handed out for `key` before, to any claim. Epochs need not be
    /// consecutive; a store that persists keeps them increasing across its
    /// restarts, and keeps what it needs for that for at least `ttl`.
    ///
    /// A resource written by the call's body compares it with the highest
    /// epoch it has seen and refuses smaller ones, so that a holder whose
    /// lease lapsed while it stalled cannot overwrite the work of the claim
    /// that took over (see [`epoch`](crate::epoch)): the holder that took
    /// over asked later, and a holder that lost its claim is answered
    /// `None`. By default [`StoreErrorKind::Unsupported`].
    fn epoch(&self, key: Key, token: Token, ttl: Duration) -> StoreFuture<'_, Option<u64>> {
        let _ = (key, token, ttl);
        unsupported("epoch")
    }

    /// Deletes whatever `key` holds, claim or record, whoever holds it;
    /// answers whether there was anything. A holder whose claim is forgotten
    /// finds it lost when it renews or completes. By default
    /// [`StoreErrorKind::Unsupported`].
    fn forget(&self, key: Key) -> StoreFuture<'_, bool> {
        let _ = key;
        unsupported("forget")
    }

    /// Up to `limit` claims in progress that were made more than `age` ago
    /// (however often renewed since): calls that may be stuck. By default
    /// [`StoreErrorKind::Unsupported`].
    fn claims_older_than(&self, age: Duration, limit: usize) -> StoreFuture<'_, Vec<HeldClaim>> {
        let _ = (age, limit);
        unsupported("claims_older_than")
    }
}

fn unsupported<T>(operation: &'static str) -> StoreFuture<'static, T> {
    Box::pin(async move {
        Err(StoreError::new(
            StoreErrorKind::Unsupported,
            format!("this store does not support `{operation}`"),
        ))
    })
}

/// What a key holds, as [`Store::inspect`] and
/// [`Idempotency::inspect`](crate::Idempotency::inspect) answer.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Inspection {
    /// Nothing: never claimed, released, forgotten or expired.
    Absent,
    /// A call holds the key and has not finished.
    InProgress {
        /// The call's fingerprint; [`Fingerprint::UNCHECKED`] for a
        /// transactional claim on PostgreSQL (`transaction = tx`), whose
        /// fingerprint is in a row its holder has not committed.
        fingerprint: Fingerprint,
        /// When the claim lapses unless renewed; zero for a transactional
        /// claim on PostgreSQL, which is not a lease: it lasts as long as
        /// its holder's transaction (which the server ends once it has
        /// idled for the call's lease).
        expires_in: Duration,
        /// How long ago the claim was made, when the store knows.
        held_for: Option<Duration>,
    },
    /// The call finished; its record is kept.
    Completed {
        /// What the record holds: an `Ok`, a cached `Err`, or a result that
        /// could not be stored.
        outcome: Outcome,
        /// The call's fingerprint.
        fingerprint: Fingerprint,
        /// When the record was stored, when the store knows.
        stored_at: Option<SystemTime>,
        /// When the record expires.
        expires_in: Duration,
        /// The payload's size in bytes.
        size: usize,
    },
}

/// [`Store::begin`], then, once claimed, [`Store::steps`]: two round trips,
/// the steps `None` when their read failed. What
/// [`Store::begin_with_steps`] does by default, and a store that overrides
/// it falls back to where one round trip would not do.
pub(crate) async fn begin_then_read_steps<S: Store + ?Sized>(
    store: &S,
    key: Key,
    fingerprint: Fingerprint,
    token: Token,
    lease: Duration,
) -> Result<(Begin, Option<Vec<JournaledStep>>), StoreError> {
    let begun = store.begin(key, fingerprint, token, lease).await?;
    let steps = match begun {
        Begin::Claimed => store.steps(key).await.ok(),
        _ => None,
    };
    Ok((begun, steps))
}

/// One completed step of a multi-step call, as [`Store::steps`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct JournaledStep {
    /// The step's name, unique within its call.
    pub name: String,
    /// The step's result, serialized as JSON.
    pub value: Vec<u8>,
}

impl JournaledStep {
    /// A journaled step.
    #[must_use]
    pub const fn new(name: String, value: Vec<u8>) -> Self {
        Self { name, value }
    }
}

/// A claim in progress, as [`Store::claims_older_than`] lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct HeldClaim {
    /// The claimed key.
    pub key: Key,
    /// The call's fingerprint.
    pub fingerprint: Fingerprint,
    /// How long ago the claim was made.
    pub held_for: Duration,
    /// When the claim lapses unless renewed.
    pub expires_in: Duration,
}

impl HeldClaim {
    /// A listed claim.
    #[must_use]
    pub const fn new(
        key: Key,
        fingerprint: Fingerprint,
        held_for: Duration,
        expires_in: Duration,
    ) -> Self {
        Self {
            key,
            fingerprint,
            held_for,
            expires_in,
        }
    }
}

macro_rules! forward_store {
    ($($ty:ty),*) => {$(
        impl<S: Store + ?Sized> Store for $ty {
            fn begin(
                &self,
                key: Key,
                fingerprint: Fingerprint,
                token: Token,
                lease: Duration,
            ) -> StoreFuture<'_, Begin> {
                (**self).begin(key, fingerprint, token, lease)
            }

            fn complete(
                &self,
                key: Key,
                token: Token,
                record: Record,
                ttl: Duration,
            ) -> StoreFuture<'_, Completion> {
                (**self).complete(key, token, record, ttl)
            }

            fn release(&self, key: Key, token: Token) -> StoreFuture<'_, ()> {
                (**self).release(key, token)
            }

            fn renew(&self, key: Key, token: Token, lease: Duration) -> StoreFuture<'_, bool> {
                (**self).renew(key, token, lease)
            }

            fn watch(&self, key: Key) -> Option<Watch> {
                (**self).watch(key)
            }

            fn limits(&self) -> Limits {
                (**self).limits()
            }

            fn inspect(&self, key: Key) -> StoreFuture<'_, Inspection> {
                (**self).inspect(key)
            }

            fn forget(&self, key: Key) -> StoreFuture<'_, bool> {
                (**self).forget(key)
            }

            fn append_step(
                &self,
                key: Key,
                token: Token,
                name: String,
                value: Vec<u8>,
                ttl: Duration,
            ) -> StoreFuture<'_, bool> {
                (**self).append_step(key, token, name, value, ttl)
            }

            fn steps(&self, key: Key) -> StoreFuture<'_, Vec<JournaledStep>> {
                (**self).steps(key)
            }

            fn begin_with_steps(
                &self,
                key: Key,
                fingerprint: Fingerprint,
                token: Token,
                lease: Duration,
            ) -> StoreFuture<'_, (Begin, Option<Vec<JournaledStep>>)> {
                (**self).begin_with_steps(key, fingerprint, token, lease)
            }

            fn epoch(&self, key: Key, token: Token, ttl: Duration) -> StoreFuture<'_, Option<u64>> {
                (**self).epoch(key, token, ttl)
            }

            fn claims_older_than(&self, age: Duration, limit: usize) -> StoreFuture<'_, Vec<HeldClaim>> {
                (**self).claims_older_than(age, limit)
            }
        }
    )*};
}
forward_store!(&S, Arc<S>, Box<S>);
