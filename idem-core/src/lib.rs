//! Make async functions safe to retry.
//!
//! Networks fail, clients retry, queues redeliver. `idem` runs an async
//! function at most once per idempotency key and hands every retry the
//! first call's result:
//!
//! 1. derive the call's [`Key`] (and the [`Fingerprint`] of its arguments),
//! 2. claim the key atomically in a [`Store`],
//! 3. run the body once and store its result, serialized with `serde_json`,
//! 4. replay that result to every retry, across tasks, processes and machines.
//!
//! The [`Idempotency`] engine does the work; the `#[idempotent]` attribute
//! (feature `macros`, on by default) writes the call for you.
//!
//! # Quickstart without the attribute
//!
//! ```
//! use idem_core::{Fingerprint, Idempotency, Key};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), idem_core::Error> {
//! let idem = Idempotency::new(idem_core::default_store());
//! let key = Key::new("emails.send", &"welcome-42")?;
//! let fingerprint = Fingerprint::of(&("ada@example.com",))?;
//! let mut sent = 0;
//! for _attempt in 0..3 {
//!     let id: u64 = idem
//!         .run(key, fingerprint, async {
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
//! # Stores
//!
//! | URL | backend | Cargo feature |
//! |---|---|---|
//! | `memory://` | [`MemoryStore`], in-process (the default) | always |
//! | `redis://host:port/db` | a Redis node | `redis` |
//! | `redis+cluster://h1:p1,h2:p2` | a Redis Cluster | `redis` |
//!
//! [`connect`] opens one by URL; [`set_default_store`] makes it the store of
//! every call that names none.
//!
//! # Errors
//!
//! idem fails closed: when the store cannot say whether a call already ran,
//! the body does not run and the caller gets [`Error::Store`]. Each [`Error`]
//! maps to the HTTP status of the IETF Idempotency-Key draft
//! ([`Error::http_status`]).

mod engine;
mod error;
mod flight;
mod key;
pub mod store;

#[doc(hidden)]
pub mod __private;

#[cfg(feature = "macros")]
mod attribute;
#[cfg(feature = "macros")]
pub use attribute::idempotent;

pub use engine::{DEFAULT_LEASE, DEFAULT_TTL, Idempotency, OnConflict};
pub use error::{Error, Source, StoreError, StoreErrorKind};
pub use key::{Fingerprint, Key};
pub use store::memory::MemoryStore;
pub use store::{
    Begin, Completion, Outcome, Record, Store, StoreFuture, Token, Watch, connect, default_store,
    set_default_store,
};
