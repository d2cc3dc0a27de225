//! The store protocol, for backend authors: four atomic operations every
//! backend implements, and the types they exchange.
//!
//! Users pick a store ([`MemoryStore`](crate::MemoryStore), a Redis store,
//! or one by URL with [`connect`](crate::connect)) and hand it to an
//! [`Idempotency`](crate::Idempotency) handle; they need nothing else from
//! this module. This module is for those who write a store.
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
use std::time::Duration;

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

pub use crate::error::{StoreError, StoreErrorKind};
pub(crate) use connect::connect;
pub use record::{Outcome, Record};

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
    /// The claim is no longer ours: its lease lapsed, and the key was taken
    /// over or reclaimed. Nothing was written.
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
        }
    )*};
}
forward_store!(&S, Arc<S>, Box<S>);
