//! Items only the `#[idempotent]` expansion uses. Not public API: they change
//! without notice.
//!
//! The traits here exist for their diagnostics: each carries a
//! `#[diagnostic::on_unimplemented]` message in the attribute's terms, and the
//! expansion spans its use at the user's token (the return type, an argument,
//! the `key` expression), so a type error lands where it was made.

use std::future::Future;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::Error;
pub use crate::handle::default_handle;
use crate::handle::{AsIdempotency, Idempotency};
use crate::key::{Fingerprint, Fingerprinter, Key, KeyHasher};
pub use crate::settings::{ConfigError, OnConflict, Settings};

/// The handle `store = …` names.
pub fn handle<H: AsIdempotency + ?Sized>(handle: &H) -> &Idempotency {
    handle.as_idempotency()
}

/// The operation name of a function, from the type name of an item nested in
/// it: `crate::module::Type::method::__idem_operation` gives
/// `crate::module::Type::method`, so that two methods of one name in one
/// module (on two types) never share records.
#[must_use]
pub fn operation_name(nested: &'static str) -> &'static str {
    let mut name = nested.strip_suffix("::__idem_operation").unwrap_or(nested);
    while let Some(outer) = name.strip_suffix("::{{closure}}") {
        name = outer;
    }
    name
}

/// A call's key and fingerprint, or why they could not be computed.
pub type Prepared = Result<(Key, Fingerprint), Error>;

/// Gathers a call's key and fingerprint from its parts.
pub struct Call {
    key: KeyHasher,
    arguments: Fingerprinter,
}

impl Call {
    /// Starts a call of the operation `name`.
    #[must_use]
    pub fn new(name: &str) -> Self {
        Self {
            key: KeyHasher::new(name),
            arguments: Fingerprinter::new(),
        }
    }

    /// Adds an argument to the fingerprint.
    pub fn argument<A: Argument + ?Sized>(&mut self, argument: &A) {
        self.arguments.argument(argument);
    }

    /// Sets the scope.
    pub fn scope<S: ScopeValue + ?Sized>(&mut self, scope: &S) {
        self.key.scope(scope);
    }

    /// Sets the key value.
    pub fn key<K: KeyValue + ?Sized>(&mut self, key: &K) {
        self.key.value(key);
    }

    /// The key and fingerprint. Without a `key` value the key is the
    /// arguments' fingerprint; without fingerprint checks the fingerprint is
    /// [`Fingerprint::UNCHECKED`].
    pub fn finish(self, keyed: bool, checked: bool) -> Prepared {
        let fingerprint = self.arguments.finish()?;
        let mut key = self.key;
        if !keyed {
            key.value(&fingerprint);
        }
        let checked = if checked {
            fingerprint
        } else {
            Fingerprint::UNCHECKED
        };
        Ok((key.finish()?, checked))
    }
}

/// A value hashed into the stored key.
#[diagnostic::on_unimplemented(
    message = "the `key` of an `#[idempotent]` fn must implement `serde::Serialize`; `{Self}` does not",
    label = "this key is hashed into the stored key",
    note = "use a `String`, an integer, a `Uuid` or a tuple of them, or derive `serde::Serialize`"
)]
pub trait KeyValue: Serialize {}
#[diagnostic::do_not_recommend]
impl<T: Serialize + ?Sized> KeyValue for T {}

/// A value that scopes the stored key.
#[diagnostic::on_unimplemented(
    message = "the `scope` of an `#[idempotent]` fn must implement `serde::Serialize`; `{Self}` does not",
    label = "this scope is hashed into the stored key",
    note = "use a tenant or user id: a `String`, an integer or a `Uuid`"
)]
pub trait ScopeValue: Serialize {}
#[diagnostic::do_not_recommend]
impl<T: Serialize + ?Sized> ScopeValue for T {}

/// An argument that takes part in the fingerprint.
#[diagnostic::on_unimplemented(
    message = "this argument is part of the `#[idempotent]` fingerprint, but `{Self}` does not implement `serde::Serialize`",
    label = "not `Serialize`",
    note = "derive `serde::Serialize` for it, or leave it out of the fingerprint with `skip(name)` (for handles, pools and clients)"
)]
pub trait Argument: Serialize {}
#[diagnostic::do_not_recommend]
impl<T: Serialize + ?Sized> Argument for T {}

/// The return type of an `#[idempotent]` fn.
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
    /// The value as a `Result`.
    fn into_result(self) -> Result<Self::Ok, Self::Err>;
    /// The value from a `Result`.
    fn from_result(result: Result<Self::Ok, Self::Err>) -> Self;
}

impl<T, E> Returns for Result<T, E> {
    type Ok = T;
    type Err = E;

    fn into_result(self) -> Self {
        self
    }

    fn from_result(result: Self) -> Self {
        result
    }
}

/// The `Ok` type of an `#[idempotent]` fn.
///
/// It has no supertraits on purpose: a failed bound is then reported as this
/// trait, with this message, and not again as a bare `Serialize` bound.
#[diagnostic::on_unimplemented(
    message = "the `Ok` type `{Self}` of an `#[idempotent]` fn must implement `Serialize` and `DeserializeOwned`",
    label = "the result is stored and replayed to retries",
    note = "derive them: `#[derive(serde::Serialize, serde::Deserialize)]`"
)]
pub trait StoredValue: Sized {
    /// Serializes the value.
    ///
    /// # Errors
    /// The serializer's.
    fn serialize_stored<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error>;
    /// Deserializes a value.
    ///
    /// # Errors
    /// The deserializer's.
    fn deserialize_stored<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error>;
}

#[diagnostic::do_not_recommend]
impl<T: Serialize + DeserializeOwned> StoredValue for T {
    fn serialize_stored<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.serialize(serializer)
    }

    fn deserialize_stored<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        T::deserialize(deserializer)
    }
}

/// The error type of an `#[idempotent]` fn.
#[diagnostic::on_unimplemented(
    message = "the error type `{Self}` of an `#[idempotent]` fn must implement `From<idem_core::Error>`",
    label = "idem reports its own failures (key reused, in progress, store down) through this type",
    note = "add `impl From<idem_core::Error> for {Self}`, e.g. a variant `Idem(#[from] idem_core::Error)` with thiserror"
)]
pub trait IdemError: Sized {
    /// Converts idem's error.
    fn from_idem(error: Error) -> Self;
}

#[diagnostic::do_not_recommend]
impl<E: From<Error>> IdemError for E {
    fn from_idem(error: Error) -> Self {
        error.into()
    }
}

/// The error type of an `#[idempotent]` fn that caches errors.
#[diagnostic::on_unimplemented(
    message = "`cache_errors` stores the error type `{Self}`, so it must implement `Serialize` and `DeserializeOwned`",
    label = "cached errors are stored and replayed to retries",
    note = "derive them: `#[derive(serde::Serialize, serde::Deserialize)]`, or drop `cache_errors`"
)]
pub trait CachedError: Sized {
    /// Serializes the error.
    ///
    /// # Errors
    /// The serializer's.
    fn serialize_cached<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error>;
    /// Deserializes an error.
    ///
    /// # Errors
    /// The deserializer's.
    fn deserialize_cached<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error>;
}

#[diagnostic::do_not_recommend]
impl<E: Serialize + DeserializeOwned> CachedError for E {
    fn serialize_cached<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.serialize(serializer)
    }

    fn deserialize_cached<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        E::deserialize(deserializer)
    }
}

/// An `Ok` value on its way to or from the store.
struct Stored<T>(T);

impl<T: StoredValue> Serialize for Stored<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize_stored(serializer)
    }
}

impl<'de, T: StoredValue> Deserialize<'de> for Stored<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        T::deserialize_stored(deserializer).map(Self)
    }
}

/// An `Err` value, converted from idem's errors and, when cached, stored.
struct Failure<E>(E);

impl<E: IdemError> From<Error> for Failure<E> {
    fn from(error: Error) -> Self {
        Self(E::from_idem(error))
    }
}

impl<E: CachedError> Serialize for Failure<E> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize_cached(serializer)
    }
}

impl<'de, E: CachedError> Deserialize<'de> for Failure<E> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        E::deserialize_cached(deserializer).map(Self)
    }
}

fn wrap<T, E>(result: Result<T, E>) -> Result<Stored<T>, Failure<E>> {
    result.map(Stored).map_err(Failure)
}

fn unwrap<R: Returns>(result: Result<Stored<R::Ok>, Failure<R::Err>>) -> R {
    R::from_result(result.map(|ok| ok.0).map_err(|err| err.0))
}

/// Runs an `#[idempotent]` fn's body; `Err` results release the claim.
pub async fn run<R, F>(
    idem: &Idempotency,
    settings: Result<Settings, ConfigError>,
    prepared: Prepared,
    body: F,
) -> R
where
    R: Returns,
    R::Ok: StoredValue,
    R::Err: IdemError,
    F: Future<Output = R>,
{
    let (settings, key, fingerprint) = match ready(settings, prepared) {
        Ok(ready) => ready,
        Err(error) => return R::from_result(Err(R::Err::from_idem(error))),
    };
    let body = async { wrap(body.await.into_result()) };
    unwrap(idem.run(&settings, key, fingerprint, body).await)
}

/// Runs an `#[idempotent]` fn's body; `Err` results that `cache` accepts are
/// stored.
pub async fn run_caching_errors<R, F, P>(
    idem: &Idempotency,
    settings: Result<Settings, ConfigError>,
    prepared: Prepared,
    cache: P,
    body: F,
) -> R
where
    R: Returns,
    R::Ok: StoredValue,
    R::Err: IdemError + CachedError,
    F: Future<Output = R>,
    P: FnOnce(&R::Err) -> bool,
{
    let (settings, key, fingerprint) = match ready(settings, prepared) {
        Ok(ready) => ready,
        Err(error) => return R::from_result(Err(R::Err::from_idem(error))),
    };
    let body = async { wrap(body.await.into_result()) };
    let cache = move |failure: &Failure<R::Err>| cache(&failure.0);
    unwrap(
        idem.run_caching_errors(&settings, key, fingerprint, cache, body)
            .await,
    )
}

fn ready(
    settings: Result<Settings, ConfigError>,
    prepared: Prepared,
) -> Result<(Settings, Key, Fingerprint), Error> {
    let settings = settings?;
    let (key, fingerprint) = prepared?;
    Ok((settings, key, fingerprint))
}

/// The predicate of `cache_errors = true`.
#[must_use]
pub fn cache_all<E>(_: &E) -> bool {
    true
}

/// Milliseconds, as the expansion writes checked duration literals.
#[must_use]
pub const fn millis(millis: u64) -> std::time::Duration {
    std::time::Duration::from_millis(millis)
}

#[cfg(test)]
mod tests {
    #[test]
    fn operation_names_drop_the_nested_item_and_closures() {
        assert_eq!(
            super::operation_name("app::Mailer::handle::__idem_operation"),
            "app::Mailer::handle"
        );
        assert_eq!(
            super::operation_name("<app::A as app::T>::f::{{closure}}::__idem_operation"),
            "<app::A as app::T>::f"
        );
    }
}
