//! Make async functions safe to retry.
//!
//! Networks fail, clients retry, queues redeliver. `idem` runs an async
//! function at most once per idempotency key and hands every retry the
//! first call's result:
//!
//! 1. derive the call's [`Key`] (and the [`Fingerprint`] of its arguments),
//! 2. claim the key atomically in a [store](store::Store),
//! 3. run the body once and store its result, serialized with `serde_json`,
//! 4. replay that result to every retry, across tasks, processes and machines.
//!
//! # Quickstart
//!
//! ```
//! use idem_core::idempotent;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct ChargeRequest { idempotency_key: String, amount_cents: u64 }
//!
//! #[derive(Debug, PartialEq, Serialize, Deserialize)]
//! struct Receipt { charge_id: u64 }
//!
//! #[derive(Debug)]
//! enum PaymentError { Idem(idem_core::Error) }
//! impl From<idem_core::Error> for PaymentError {
//!     fn from(e: idem_core::Error) -> Self { Self::Idem(e) }
//! }
//!
//! #[idempotent(key = req.idempotency_key, ttl = "24h")]
//! async fn charge(req: ChargeRequest) -> Result<Receipt, PaymentError> {
//!     Ok(Receipt { charge_id: 4711 }) // runs once per key
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), PaymentError> {
//! let req = || ChargeRequest { idempotency_key: "order-17".into(), amount_cents: 100 };
//! let first = charge(req()).await?;
//! let retry = charge(req()).await?; // replayed, not charged again
//! assert_eq!(first, retry);
//! # Ok(())
//! # }
//! ```
//!
//! The attribute ([`idempotent`], feature `macros`, on by default) expands to
//! a call of an [`Idempotency`] handle, which code without the attribute
//! (closures, keys computed at run time) calls itself:
//!
//! ```
//! use idem_core::{Fingerprint, Idempotency, Key, Settings};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), idem_core::Error> {
//! let idem = Idempotency::memory(); // once, at start-up
//! let key = Key::new("emails.send", &"welcome-42")?;
//! let fingerprint = Fingerprint::of(&("ada@example.com",))?;
//! let mut sent = 0;
//! for _attempt in 0..3 {
//!     let id: u64 = idem
//!         .run(&Settings::default(), key, fingerprint, async {
//!             sent += 1;
//!             Ok::<_, idem_core::Error>(42)
//!         })
//!         .await?;
//!     assert_eq!(id, 42);
//! }
//! assert_eq!(sent, 1, "three attempts, one email");
//! # Ok(())
//! # }
//! ```
//!
//! # Handles and stores
//!
//! An [`Idempotency`] handle is made once per store, at start-up, and kept;
//! it owns the store and the calls in flight on it (callers of one key share
//! one claim). Stores, by URL:
//!
//! | URL | backend | Cargo feature |
//! |---|---|---|
//! | `memory://` | [`MemoryStore`], in-process (the default) | always |
//! | `redis://host:port/db` | a Redis node | `redis` |
//! | `redis+cluster://h1:p1,h2:p2` | a Redis Cluster | `redis` |
//! | `postgres://user@host/db` | a PostgreSQL table, and a transactional mode | `postgres` |
//!
//! [`Idempotency::connect`] opens one by URL; [`set_default`] makes a handle
//! the one every `#[idempotent]` fn without `store = …` uses. With the
//! `tower` feature, `http::IdempotencyLayer` makes any tower HTTP service
//! idempotent (with `axum`, `http` also extracts the `Idempotency-Key` header
//! and turns [`Error`]s into responses). With `client`, `client` retries
//! requests safely: one key per operation, jittered backoff, a retry budget
//! and circuit breakers. With `consumer` (and `nats` for JetStream),
//! `consumer` processes each broker message once per message id. Backend
//! authors find the store protocol in [`store`].
//!
//! # Errors
//!
//! idem fails closed: when the store cannot say whether a call already ran,
//! the body does not run and the caller gets [`Error::Store`]. Each [`Error`]
//! maps to the HTTP status of the IETF Idempotency-Key draft
//! ([`Error::http_status`]).

#![cfg_attr(docsrs, feature(doc_cfg))]

mod canonical;
mod codec;
mod engine;
mod error;
#[cfg(any(feature = "tower", feature = "postgres"))]
mod finish;
mod flight;
mod handle;
mod key;
pub mod observe;
mod reentry;
mod replayable;
pub mod requirements;
mod settings;
mod steps;
pub mod store;

#[cfg(feature = "client")]
#[cfg_attr(docsrs, doc(cfg(feature = "client")))]
pub mod client;
#[cfg(feature = "consumer")]
#[cfg_attr(docsrs, doc(cfg(feature = "consumer")))]
pub mod consumer;
#[cfg(feature = "tower")]
#[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
pub mod http;

#[doc(hidden)]
pub mod __private;

/// The runtime's root under a name the `#[idempotent]` expansion imports:
/// a `crate = "…"` that does not lead here is one error naming it.
#[doc(hidden)]
pub use crate as idem_runtime;

#[cfg(feature = "macros")]
mod attribute;
#[cfg(feature = "macros")]
#[cfg_attr(docsrs, doc(cfg(feature = "macros")))]
pub use attribute::idempotent;

pub use error::Error;
pub use handle::{
    AsIdempotency, DEFAULT_MAX_RECORD_BYTES, Idempotency, SetDefaultError, default_handle,
    set_default,
};
pub use key::{Fingerprint, Key};
pub use replayable::Replayable;
pub use settings::{
    ConfigError, DEFAULT_LEASE, DEFAULT_TTL, Isolation, MAX_DURATION, MIN_LEASE, OnConflict,
    Settings, SettingsBuilder,
};
pub use steps::{MAX_STEP_NAME_LEN, Step, derive_step_key, epoch, mark_final, step, step_key};
pub use store::connect::connect;
pub use store::memory::MemoryStore;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use store::postgres::PostgresStore;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use store::redis::RedisStore;
/// What users match on: the store failure inside [`Error::Store`] and its
/// kind, and the stored outcome an [`Inspection::Completed`] reports.
pub use store::{
    HeldClaim, Inspection, JournaledStep, Outcome, ReplayCache, StoreError, StoreErrorKind,
};
