//! What `#[idempotent]` requires of a function's types.
//!
//! Each trait here is implemented for every type that fits, and nothing
//! needs to implement or name them. They exist for their error messages: the
//! attribute checks each requirement once, at the token where the type or
//! expression was written, so a type that does not fit is reported there,
//! once, in the attribute's words:
//!
//! | trait | required of | because |
//! |---|---|---|
//! | [`StoredValue`] | the `Ok` type `T` | it is stored, and decoded for replays: `Serialize + DeserializeOwned` |
//! | [`FromIdemError`] | the error type `E` | idem reports its own failures through it: `From<idem_core::Error>` |
//! | [`CachedError`] | `E`, with `cache_errors` | stored errors are replayed: `Serialize + DeserializeOwned` |
//! | [`CachePredicate`] | `cache_errors = path` | it picks the errors to store: `Fn(&E) -> bool` |
//! | [`Argument`] | each fingerprinted argument | it is hashed: `Serialize` |
//! | [`GenericArgument`] | a fingerprinted argument of a generic type | it is hashed with its type: `Serialize` |
//! | [`KeyValue`], [`ScopeValue`] | `key = …`, `scope = …` | they are hashed: `Serialize` |
//! | [`Returns`] | the return type | it is a `Result<T, E>` |
//! | [`DurationValue`] | `ttl = expr`, `lease = expr`, `wait_timeout = expr` | it is a `std::time::Duration` |
//! | [`AsIdempotency`](crate::AsIdempotency) | `store = …` | it names a handle |
//! | `TransactionalStore` | `store = …` with `transaction = tx` | it names a `PostgresStore` (feature `postgres`) |
//! | [`PostgresFeature`] | `transaction = tx` | the transactional mode needs the `postgres` feature |
//! | [`TransactionParameter`] | the parameter `transaction = tx` names | it is `&mut sqlx::PgConnection` |

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::__private::{Call, Shape};
use crate::codec::Codec;
use crate::error::Error;

/// An argument that takes part in the fingerprint: `Serialize`.
#[diagnostic::on_unimplemented(
    message = "this argument is part of the `#[idempotent]` fingerprint, but `{Self}` does not implement `serde::Serialize`",
    label = "not `Serialize`",
    note = "derive `serde::Serialize` for it, or leave it out of the fingerprint with `skip(name)` (for handles, pools and clients)"
)]
pub trait Argument {
    #[doc(hidden)]
    fn fingerprint(&self, call: &mut Call);
}

#[diagnostic::do_not_recommend]
impl<T: Serialize + ?Sized> Argument for T {
    fn fingerprint(&self, call: &mut Call) {
        call.argument(self);
    }
}

/// An argument of a generic type (a type parameter of the fn, or an `impl
/// Trait`) that takes part in the fingerprint: `Serialize`, or leave it out
/// with `skip(name)`. Its fingerprint covers its type too (its name without
/// module paths), so that two instances of a generic fn pinned to one `name`
/// do not take each other's equal-looking arguments for the same call.
#[diagnostic::on_unimplemented(
    message = "this argument is part of the `#[idempotent]` fingerprint, but `{Self}` does not implement `serde::Serialize`",
    label = "not `Serialize`",
    note = "add `serde::Serialize` to its bounds, or leave it out of the fingerprint with `skip(name)` (for closures, handles, pools and clients)"
)]
pub trait GenericArgument {
    #[doc(hidden)]
    fn fingerprint(&self, call: &mut Call);
}

#[diagnostic::do_not_recommend]
impl<T: Serialize + ?Sized> GenericArgument for T {
    fn fingerprint(&self, call: &mut Call) {
        call.typed_argument(self);
    }
}

/// Fingerprints an argument of a generic type: see [`GenericArgument`].
///
/// Checked through a trait of idem's rather than `Serialize` itself, so that
/// an unfit type parameter is reported in the attribute's words, not in
/// those of the crate that defines `Serialize` (whose path rustc prints as
/// serde's internal one).
pub fn serialize_or_skip<A: GenericArgument + ?Sized>(argument: &A, call: &mut Call) {
    argument.fingerprint(call);
}

/// The value of `key = …`: `Serialize`.
#[diagnostic::on_unimplemented(
    message = "the `key` of an `#[idempotent]` fn must implement `serde::Serialize`; `{Self}` does not",
    label = "this key is hashed into the stored key",
    note = "use a `String`, an integer, a `Uuid` or a tuple of them, or derive `serde::Serialize`"
)]
pub trait KeyValue {
    #[doc(hidden)]
    fn key(&self, call: &mut Call);
    #[doc(hidden)]
    fn key_element(&self, call: &mut Call);
    /// A key that is also a fingerprinted argument, checked once, here.
    #[doc(hidden)]
    fn erased(&self) -> &dyn Hashed
    where
        Self: Sized;
}

#[diagnostic::do_not_recommend]
impl<T: Serialize + ?Sized> KeyValue for T {
    fn key(&self, call: &mut Call) {
        call.key(self);
    }

    fn key_element(&self, call: &mut Call) {
        call.key_element(self);
    }

    fn erased(&self) -> &dyn Hashed
    where
        Self: Sized,
    {
        self
    }
}

/// A value checked once (as a `key` or `scope` that is also a fingerprinted
/// argument) and hashed through this as each of its uses.
#[doc(hidden)]
pub trait Hashed {
    #[doc(hidden)]
    fn argument(&self, call: &mut Call);
    #[doc(hidden)]
    fn typed_argument(&self, call: &mut Call);
    #[doc(hidden)]
    fn key(&self, call: &mut Call);
    #[doc(hidden)]
    fn key_element(&self, call: &mut Call);
    #[doc(hidden)]
    fn scope(&self, call: &mut Call);
}

impl<T: Serialize> Hashed for T {
    fn argument(&self, call: &mut Call) {
        call.argument(self);
    }

    fn typed_argument(&self, call: &mut Call) {
        call.typed_argument(self);
    }

    fn key(&self, call: &mut Call) {
        call.key(self);
    }

    fn key_element(&self, call: &mut Call) {
        call.key_element(self);
    }

    fn scope(&self, call: &mut Call) {
        call.scope(self);
    }
}

/// The value of `scope = …`: `Serialize`.
#[diagnostic::on_unimplemented(
    message = "the `scope` of an `#[idempotent]` fn must implement `serde::Serialize`; `{Self}` does not",
    label = "this scope is hashed into the stored key",
    note = "use a tenant or user id: a `String`, an integer or a `Uuid`"
)]
pub trait ScopeValue {
    #[doc(hidden)]
    fn scope(&self, call: &mut Call);
    /// A scope that is also a fingerprinted argument, checked once, here.
    #[doc(hidden)]
    fn erased(&self) -> &dyn Hashed
    where
        Self: Sized;
}

#[diagnostic::do_not_recommend]
impl<T: Serialize + ?Sized> ScopeValue for T {
    fn scope(&self, call: &mut Call) {
        call.scope(self);
    }

    fn erased(&self) -> &dyn Hashed
    where
        Self: Sized,
    {
        self
    }
}

/// The `Ok` type of an `#[idempotent]` fn: `Serialize + DeserializeOwned`.
#[diagnostic::on_unimplemented(
    message = "the `Ok` type `{Self}` of an `#[idempotent]` fn must implement `Serialize` and `DeserializeOwned`",
    label = "the result is stored and replayed to retries",
    note = "derive them: `#[derive(serde::Serialize, serde::Deserialize)]`"
)]
pub trait StoredValue: Sized {
    #[doc(hidden)]
    fn codec() -> Codec<Self>;
}

#[diagnostic::do_not_recommend]
impl<T: Serialize + DeserializeOwned> StoredValue for T {
    fn codec() -> Codec<Self> {
        Codec::serde()
    }
}

/// The error type of an `#[idempotent]` fn: `From<idem_core::Error>`.
///
/// `String`, `std::io::Error`, `Box<dyn std::error::Error + Send + Sync>`
/// and `anyhow::Error` have it already; a type of your own gets it from a
/// variant such as `Idem(#[from] idem_core::Error)` (thiserror).
#[diagnostic::on_unimplemented(
    message = "the error type `{Self}` of an `#[idempotent]` fn must implement `From<idem_core::Error>`",
    label = "idem reports its own failures (key reused, in progress, store down) through this type",
    note = "give your error type a variant `Idem(#[from] idem_core::Error)` (thiserror) or an `impl From<idem_core::Error>`; another crate's error type cannot have that impl, so wrap it in an error type of your own, or return `String`, `std::io::Error` or `Box<dyn std::error::Error + Send + Sync>`, which have it"
)]
pub trait FromIdemError: Sized {
    #[doc(hidden)]
    fn converter() -> fn(Error) -> Self;
}

#[diagnostic::do_not_recommend]
impl<E: From<Error>> FromIdemError for E {
    fn converter() -> fn(Error) -> Self {
        E::from
    }
}

/// The error type of an `#[idempotent]` fn that caches errors:
/// `Serialize + DeserializeOwned`.
#[diagnostic::on_unimplemented(
    message = "`cache_errors` stores the error type `{Self}`, so it must implement `Serialize` and `DeserializeOwned`",
    label = "cached errors are stored and replayed to retries",
    note = "derive them: `#[derive(serde::Serialize, serde::Deserialize)]`, or drop `cache_errors`"
)]
pub trait CachedError: Sized {
    #[doc(hidden)]
    fn codec() -> Codec<Self>;
}

#[diagnostic::do_not_recommend]
impl<E: Serialize + DeserializeOwned> CachedError for E {
    fn codec() -> Codec<Self> {
        Codec::serde()
    }
}

/// The predicate of `cache_errors = path`: a `fn(&E) -> bool`.
#[diagnostic::on_unimplemented(
    message = "`cache_errors = …` takes a `fn(&{E}) -> bool` that picks the errors to store",
    label = "not a `fn(&{E}) -> bool`",
    note = "take the error by reference and answer a `bool`, e.g. `fn is_permanent(error: &{E}) -> bool`, and name it: `cache_errors = is_permanent`"
)]
pub trait CachePredicate<E> {
    #[doc(hidden)]
    fn caches(&self, error: &E) -> bool;
}

#[diagnostic::do_not_recommend]
impl<E, F: Fn(&E) -> bool> CachePredicate<E> for F {
    fn caches(&self, error: &E) -> bool {
        self(error)
    }
}

/// `predicate`, a closure over the `cache_errors = …` of a fn that returns
/// an alias of `Result`, typed by the error type its return type was
/// checked as: so that a predicate of another type is one error, at its
/// token.
pub fn error_predicate<R, T, E, F: Fn(&E) -> bool>(
    _shape: &crate::__private::Shape<R, T, E>,
    predicate: F,
) -> F {
    predicate
}

/// Whether `predicate` (of `cache_errors = …`) stores `error`, for the
/// error's own type (given first, so that it is the type the predicate is
/// checked against).
pub fn caches<E, P: CachePredicate<E>>(error: &E, predicate: &P) -> bool {
    predicate.caches(error)
}

/// The value of `ttl = …`, `lease = …` or `wait_timeout = …` given as an
/// expression: a `std::time::Duration`.
#[diagnostic::on_unimplemented(
    message = "a duration argument of `#[idempotent]` takes a `std::time::Duration`, not `{Self}`",
    label = "not a `Duration`",
    note = "write a literal such as `\"24h\"`, or a `Duration` such as `Duration::from_secs(…)`"
)]
pub trait DurationValue {
    #[doc(hidden)]
    fn duration(self) -> std::time::Duration;
}

impl DurationValue for std::time::Duration {
    fn duration(self) -> std::time::Duration {
        self
    }
}

/// The store of `#[idempotent(transaction = tx)]`: a
/// [`PostgresStore`](crate::PostgresStore), or a reference or `Arc` of one.
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
#[diagnostic::on_unimplemented(
    message = "`transaction = …` runs on a `PostgresStore`, so `store = …` must name one, not `{Self}`",
    label = "not a `PostgresStore`",
    note = "keep the `PostgresStore` the service's handle was made from, e.g. `store = self.pg` with `pg: PostgresStore`"
)]
pub trait TransactionalStore {
    #[doc(hidden)]
    fn postgres(&self) -> &crate::PostgresStore;
}

#[cfg(feature = "postgres")]
impl TransactionalStore for crate::PostgresStore {
    fn postgres(&self) -> &crate::PostgresStore {
        self
    }
}

#[cfg(feature = "postgres")]
#[diagnostic::do_not_recommend]
impl<S: TransactionalStore + ?Sized> TransactionalStore for &S {
    fn postgres(&self) -> &crate::PostgresStore {
        (**self).postgres()
    }
}

#[cfg(feature = "postgres")]
#[diagnostic::do_not_recommend]
impl<S: TransactionalStore + ?Sized> TransactionalStore for std::sync::Arc<S> {
    fn postgres(&self) -> &crate::PostgresStore {
        (**self).postgres()
    }
}

/// `#[idempotent(transaction = tx)]` needs the `postgres` feature.
#[diagnostic::on_unimplemented(
    message = "`transaction = …` needs the `postgres` feature of idem-core",
    label = "the transactional mode runs on PostgreSQL",
    note = "enable it in Cargo.toml: `idem-core = {{ version = \"0.1\", features = [\"postgres\"] }}`"
)]
pub trait PostgresFeature {
    #[doc(hidden)]
    fn enabled() {}
}

/// The transactional mode, as `transaction = …` asks for it.
#[doc(hidden)]
pub struct TransactionalMode;

#[cfg(feature = "postgres")]
impl PostgresFeature for TransactionalMode {}

/// The connection a transactional body gets: `sqlx::PgConnection` (with the
/// `postgres` feature).
#[cfg(feature = "postgres")]
#[doc(hidden)]
pub type Connection = sqlx::PgConnection;
#[cfg(not(feature = "postgres"))]
#[doc(hidden)]
pub type Connection = crate::__private::NoConnection;

/// The parameter that `transaction = tx` names: `&mut sqlx::PgConnection`.
#[diagnostic::on_unimplemented(
    message = "the parameter named by `transaction = …` must be `&mut sqlx::PgConnection`, not `{Self}`",
    label = "idem hands the body its transaction's connection here",
    note = "declare it as `tx: &mut sqlx::PgConnection` and run the body's queries on `&mut *tx`; idem opens, commits and rolls back the transaction itself"
)]
pub trait TransactionParameter<'c>: Sized {
    #[doc(hidden)]
    fn from_connection(connection: &'c mut Connection) -> Self;
}

#[cfg(feature = "postgres")]
#[diagnostic::do_not_recommend]
impl<'c> TransactionParameter<'c> for &'c mut sqlx::PgConnection {
    fn from_connection(connection: &'c mut Connection) -> Self {
        connection
    }
}

#[cfg(not(feature = "postgres"))]
#[diagnostic::do_not_recommend]
impl<T> TransactionParameter<'_> for T {
    fn from_connection(connection: &mut Connection) -> Self {
        match *connection {}
    }
}

/// Without the `postgres` feature any store passes this check: the one error
/// is the missing feature ([`PostgresFeature`]).
#[cfg(not(feature = "postgres"))]
#[doc(hidden)]
pub trait TransactionalStore {
    #[doc(hidden)]
    fn postgres(&self) -> &crate::__private::NoPostgres;
}

#[cfg(not(feature = "postgres"))]
impl<T: ?Sized> TransactionalStore for T {
    fn postgres(&self) -> &crate::__private::NoPostgres {
        unreachable!("`transaction = …` does not compile without the `postgres` feature")
    }
}

/// The return type of an `#[idempotent]` fn: a `Result<T, E>`, or an alias
/// of one.
#[diagnostic::on_unimplemented(
    message = "an `#[idempotent]` fn must return `Result<T, E>`, not `{Self}`",
    label = "not a `Result`",
    note = "idem stores the `Ok` value for retries, and reports its own failures through `E: From<idem_core::Error>`"
)]
pub trait Returns: Sized {
    /// `T`.
    type Ok;
    /// `E`.
    type Err;
    #[doc(hidden)]
    fn shape() -> Shape<Self, Self::Ok, Self::Err>;
}

impl<T, E> Returns for Result<T, E> {
    type Ok = T;
    type Err = E;

    fn shape() -> Shape<Self, T, E> {
        Shape {
            into_result: |result| result,
            from_result: |result| result,
        }
    }
}
