//! Items only the `#[idempotent]` expansion uses. Not public API: they change
//! without notice.
//!
//! The expansion checks each requirement on the user's types through the
//! traits of [`requirements`](crate::requirements), at the user's tokens;
//! what those checks produce (codecs, conversions) is passed here as plain
//! values, so that nothing here bounds the user's types a second time.

use std::future::Future;

pub use crate::codec::{Codec, Parts};
use crate::error::Error;
use crate::handle::Idempotency;
pub use crate::handle::default_handle;
use crate::key::{Fingerprint, Fingerprinter, Key, KeyHasher};
use crate::observe::Operation;
pub use crate::settings::{ConfigError, OnConflict, Settings};

/// A call's operation name, and its key and fingerprint or why they could
/// not be computed.
pub struct Prepared {
    name: &'static str,
    parts: Result<(Key, Fingerprint), Error>,
}

/// Gathers a call's key and fingerprint from its parts.
pub struct Call {
    name: &'static str,
    key: KeyHasher,
    arguments: Fingerprinter,
}

impl Call {
    /// Starts a call of the operation `name`.
    #[must_use]
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            key: KeyHasher::new(name),
            arguments: Fingerprinter::new(),
        }
    }

    /// Adds an argument to the fingerprint.
    pub fn argument<A: serde::Serialize + ?Sized>(&mut self, argument: &A) {
        self.arguments.argument(argument);
    }

    /// Sets the scope.
    pub fn scope<S: serde::Serialize + ?Sized>(&mut self, scope: &S) {
        self.key.scope(scope);
    }

    /// Sets the key value.
    pub fn key<K: serde::Serialize + ?Sized>(&mut self, key: &K) {
        self.key.value(key);
    }

    /// Starts a tuple key value, given element by element.
    pub fn key_tuple(&mut self) {
        self.key.value_tuple();
    }

    /// Adds the next element of a tuple key value.
    pub fn key_element<K: serde::Serialize + ?Sized>(&mut self, element: &K) {
        self.key.value_element(element);
    }

    /// Closes a tuple key value.
    pub fn key_tuple_end(&mut self) {
        self.key.value_tuple_end();
    }

    /// The key and fingerprint. Without a `key` value the key is the
    /// arguments' fingerprint; without fingerprint checks the fingerprint is
    /// [`Fingerprint::UNCHECKED`].
    pub fn finish(self, keyed: bool, checked: bool) -> Prepared {
        let (key, arguments) = (self.key, self.arguments);
        let parts = (|| {
            let fingerprint = arguments.finish()?;
            let mut key = key;
            if !keyed {
                key.value(&fingerprint);
            }
            let checked = if checked {
                fingerprint
            } else {
                Fingerprint::UNCHECKED
            };
            Ok((key.finish()?, checked))
        })();
        Prepared {
            name: self.name,
            parts,
        }
    }
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

/// How a return type `R` is a `Result<T, E>`: identity for `Result` and its
/// aliases.
pub struct Shape<R, T, E> {
    /// `R` as a `Result`.
    pub into_result: fn(R) -> Result<T, E>,
    /// A `Result` as `R`.
    pub from_result: fn(Result<T, E>) -> R,
}

/// Runs an `#[idempotent]` fn's body; `Err` results release the claim.
#[allow(clippy::too_many_arguments)]
pub async fn run<R, T, E, F>(
    idem: &Idempotency,
    settings: Result<Settings, ConfigError>,
    prepared: Prepared,
    shape: Shape<R, T, E>,
    ok: Codec<T>,
    from_idem: fn(Error) -> E,
    body: F,
) -> R
where
    F: Future<Output = R>,
{
    let codec = Parts {
        ok,
        from_idem,
        cache: None::<(Codec<E>, Option<fn(&E) -> bool>)>,
    };
    execute(idem, settings, prepared, shape, codec, body).await
}

/// Runs an `#[idempotent]` fn's body; `Err` results that `cache` accepts are
/// stored with `cached`.
#[allow(clippy::too_many_arguments)]
pub async fn run_caching_errors<R, T, E, F, P>(
    idem: &Idempotency,
    settings: Result<Settings, ConfigError>,
    prepared: Prepared,
    shape: Shape<R, T, E>,
    ok: Codec<T>,
    from_idem: fn(Error) -> E,
    cached: Codec<E>,
    cache: P,
    body: F,
) -> R
where
    F: Future<Output = R>,
    P: FnOnce(&E) -> bool,
{
    let codec = Parts {
        ok,
        from_idem,
        cache: Some((cached, Some(cache))),
    };
    execute(idem, settings, prepared, shape, codec, body).await
}

async fn execute<R, T, E, F, P>(
    idem: &Idempotency,
    settings: Result<Settings, ConfigError>,
    prepared: Prepared,
    shape: Shape<R, T, E>,
    codec: Parts<T, E, P>,
    body: F,
) -> R
where
    F: Future<Output = R>,
    P: FnOnce(&E) -> bool,
{
    let name = prepared.name;
    let (settings, key, fingerprint) = match ready(settings, prepared) {
        Ok(ready) => ready,
        Err(error) => return (shape.from_result)(Err((codec.from_idem)(error))),
    };
    let body = async { (shape.into_result)(body.await) };
    let operation = Operation::from(name);
    (shape.from_result)(
        idem.execute(&settings, operation, key, fingerprint, body, codec)
            .await,
    )
}

/// The codec of an `#[idempotent]` fn, from its checks.
#[must_use]
pub fn codec<T, E, P>(
    ok: Codec<T>,
    from_idem: fn(Error) -> E,
    cache: Option<(Codec<E>, P)>,
) -> Parts<T, E, P> {
    Parts {
        ok,
        from_idem,
        cache: cache.map(|(codec, keep)| (codec, Some(keep))),
    }
}

#[cfg(feature = "postgres")]
pub use crate::store::postgres::transaction::{Claim, Opened};

/// Opens a transactional `#[idempotent]` call: replayed or refused, or
/// claimed in a new transaction.
#[cfg(feature = "postgres")]
pub async fn transaction_open<'s, T, E, P>(
    store: &'s crate::PostgresStore,
    settings: Result<Settings, ConfigError>,
    prepared: Prepared,
    codec: &mut Parts<T, E, P>,
) -> Opened<'s, T, E>
where
    P: FnOnce(&E) -> bool,
{
    use crate::codec::ResultCodec as _;
    let operation = Operation::from(prepared.name);
    let (settings, key, fingerprint) = match ready(settings, prepared) {
        Ok(ready) => ready,
        Err(error) => return Opened::Done(Err(codec.idem_error(error))),
    };
    let savepoint = codec.cache.is_some();
    store
        .open(&settings, operation, key, fingerprint, codec, savepoint)
        .await
}

/// A transactional `#[idempotent]` fn's body, run in its call's span.
#[cfg(feature = "postgres")]
pub fn in_span<F: Future>(span: tracing::Span, body: F) -> tracing::instrument::Instrumented<F> {
    tracing::Instrument::instrument(body, span)
}

/// Records a transactional call's result and commits, or rolls back.
#[cfg(feature = "postgres")]
pub async fn transaction_finish<T, E, P>(
    claim: Box<Claim<'_>>,
    result: Result<T, E>,
    codec: Parts<T, E, P>,
) -> Result<T, E>
where
    P: FnOnce(&E) -> bool,
{
    (*claim).finish(result, codec).await
}

fn ready(
    settings: Result<Settings, ConfigError>,
    prepared: Prepared,
) -> Result<(Settings, Key, Fingerprint), Error> {
    let settings = settings?;
    let (key, fingerprint) = prepared.parts?;
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
