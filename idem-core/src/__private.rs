//! Items only the `#[idempotent]` expansion uses. Not public API: they change
//! without notice.
//!
//! The expansion checks each requirement on the user's types through the
//! traits of [`requirements`](crate::requirements), at the user's tokens;
//! what those checks produce (codecs, conversions) is passed here as plain
//! values, so that nothing here bounds the user's types a second time.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{LazyLock, Mutex, OnceLock, PoisonError, RwLock};

pub use crate::codec::{Codec, Parts};
use crate::error::Error;
use crate::handle::Idempotency;
pub use crate::handle::default_handle;
use crate::key::{Fingerprint, Fingerprinter, Key, KeyHasher};
use crate::observe::{self, Operation};
pub use crate::settings::{ConfigError, Isolation, OnConflict, Settings};

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
    /// What a pinned fn's generic instance is, when it is in the
    /// fingerprint (see [`generic_instance`](Self::generic_instance)): its
    /// `Self` type or trait, with their generic arguments.
    instance: Option<&'static str>,
    /// Why the call may not run whatever its parts.
    refused: Option<ConfigError>,
}

impl Call {
    /// Starts a call of the operation `name`.
    #[must_use]
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            key: KeyHasher::new(name),
            arguments: Fingerprinter::new(),
            instance: None,
            refused: None,
        }
    }

    /// Starts a call of the fn written at `site`, named by default after
    /// its instance (`closure`, the type name of a closure in its body; see
    /// [`operation_name`]). Refused when another fn of this process has
    /// that name: two fns of one name in two blocks of one scope (`{ fn
    /// handle … }`, `const _: () = { … }`) print alike, and would share
    /// records.
    #[must_use]
    pub fn at(site: &'static Site, closure: &'static str) -> Self {
        let name = operation_name(closure);
        let mut call = Self::new(name);
        call.refused = site.check(name).err();
        call
    }

    /// Starts a call of a function whose `name = "…"` is pinned (reported
    /// once when another function pinned it first).
    #[must_use]
    pub fn pinned(pin: &'static Pinned) -> Self {
        pin.check();
        Self::new(pin.name)
    }

    /// Adds an argument to the fingerprint.
    pub fn argument<A: serde::Serialize + ?Sized>(&mut self, argument: &A) {
        self.arguments.argument(argument);
    }

    /// For a fn pinned to a name, whose instance `site` names (the type
    /// name of a closure in its body; `own_generics` when the fn has type
    /// or const parameters of its own): when the instance has generic
    /// arguments besides the fn's own (its `Self` type's or its trait's,
    /// lifetimes aside), adds the instance's tag to the fingerprint, so that
    /// the instances of a generic impl, which share the pinned name and
    /// whose type parameters the attribute cannot see, never take each
    /// other's calls (with `fingerprint = false` too: the instance's `Self`
    /// type or trait is then the whole fingerprint, so that fns of one impl
    /// pinned to one name, a waiting and a rejecting variant, share records
    /// as every fns pinned to one name do). Every other fn keeps the fingerprint that
    /// [`Fingerprint::of`](crate::Fingerprint::of) its arguments makes.
    pub fn generic_instance(&mut self, site: &'static str, own_generics: bool) {
        if !site.contains('<') {
            return;
        }
        let instance = instance_path(operation_name(site), own_generics);
        if has_generic_arguments(instance) {
            self.arguments
                .argument(&crate::codec::remembered_tag(instance));
            // Without the fn's own name: `a::Gen<u8>::get` is `a::Gen<u8>`.
            self.instance = Some(
                instance
                    .rsplit_once("::")
                    .map_or(instance, |(owner, _)| owner),
            );
        }
    }

    /// Adds an argument of a generic type to the fingerprint, with its
    /// type's tag: equal values of two types fingerprint apart.
    pub fn typed_argument<A: serde::Serialize + ?Sized>(&mut self, argument: &A) {
        self.arguments.argument(&crate::codec::type_tag::<A>());
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
    /// [`Fingerprint::UNCHECKED`], or, for a pinned fn's generic instance,
    /// its `Self` type's or trait's tag.
    pub fn finish(self, keyed: bool, checked: bool) -> Prepared {
        let (key, arguments, instance) = (self.key, self.arguments, self.instance);
        let refused = self.refused;
        let parts = (|| {
            if let Some(refused) = refused {
                return Err(Error::Config(refused));
            }
            let fingerprint = arguments.finish()?;
            let mut key = key;
            if !keyed {
                key.value(&fingerprint);
            }
            let checked = match instance {
                _ if checked => fingerprint,
                // Unchecked arguments, but never another instance's call.
                Some(owner) => Fingerprint::of(&crate::codec::remembered_tag(owner))?,
                None => Fingerprint::UNCHECKED,
            };
            Ok((key.finish()?, checked))
        })();
        Prepared {
            name: self.name,
            parts,
        }
    }
}

/// A function's pinned `name = "…"`, with the place it was written: the
/// first call of each such function registers it, and a second function
/// with the same name is reported (one warning naming both), since
/// functions of one name share records. Sharing can be meant (two variants
/// of one operation, say one that waits and one that rejects); records of
/// another type are refused by their type tag either way.
pub struct Pinned {
    name: &'static str,
    site: &'static str,
    checked: OnceLock<()>,
}

/// Pinned names registered in this process, with the function each belongs to.
static PINNED: LazyLock<Mutex<HashMap<&'static str, &'static str>>> = LazyLock::new(Mutex::default);

impl Pinned {
    /// The pinned `name` of the function at `site`.
    #[must_use]
    pub const fn new(name: &'static str, site: &'static str) -> Self {
        Self {
            name,
            site,
            checked: OnceLock::new(),
        }
    }

    /// Registers the name, once; answers the function that pinned it first
    /// when that is another one.
    fn check(&self) -> Option<&'static str> {
        let mut shared = None;
        self.checked.get_or_init(|| {
            let mut pinned = PINNED.lock().unwrap_or_else(PoisonError::into_inner);
            let first = *pinned.entry(self.name).or_insert(self.site);
            if first != self.site {
                tracing::warn!(
                    target: "idem",
                    name = self.name,
                    first,
                    second = self.site,
                    "two functions pin one operation name, so they share records: give each its \
                     own `name` unless that is meant"
                );
                shared = Some(first);
            }
        });
        shared
    }
}

/// A fn named by default: a `static` in its expansion, whose address is
/// the fn's identity (one per fn written, whatever macro wrote it; one for
/// every instance of a generic fn), with the place it is written (its
/// module, file, line and column) and its package's version, to tell.
/// Two sites that give one name are two fns whose names print alike.
pub struct Site {
    at: &'static str,
    version: Option<&'static str>,
    /// The name this site first registered, so that a fn that always has
    /// one name (every fn without type parameters) looks it up once.
    first: OnceLock<&'static str>,
}

/// Default names registered in this process, with the site each belongs to.
static DEFAULT_NAMES: LazyLock<RwLock<HashMap<&'static str, &'static Site>>> =
    LazyLock::new(RwLock::default);

impl Site {
    /// The fn written at `at`, in a package of `version` (when cargo
    /// built it).
    #[must_use]
    pub const fn new(at: &'static str, version: Option<&'static str>) -> Self {
        Self {
            at,
            version,
            first: OnceLock::new(),
        }
    }

    /// Registers `name` as this site's, or answers why it may not be. Two
    /// versions of one package in a binary (whose fns print alike, without
    /// their versions) are one operation, as they are across a deploy.
    fn check(&'static self, name: &'static str) -> Result<(), ConfigError> {
        if self.first.get() == Some(&name) {
            return Ok(());
        }
        let known = DEFAULT_NAMES
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .copied();
        let first = match known {
            Some(first) => first,
            None => *DEFAULT_NAMES
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(name)
                .or_insert(self),
        };
        let another_version = first.version.is_some() && first.version != self.version;
        if !std::ptr::eq(first, self) && !another_version {
            return Err(ConfigError::shared_default_name(name, first.at, self.at));
        }
        let _ = self.first.set(name);
        Ok(())
    }
}

/// The operation name of a function instance, from the type name of a
/// closure in its body: `shop::Repo<shop::Invoice>::create::{{closure}}`
/// (and, in an `async fn`, one `{{closure}}` more for its body) gives
/// `shop::Repo<shop::Invoice>::create`. The name keeps the `Self` type and
/// every generic argument, so two instances that may run different code or
/// return different types never share records, and two methods of one name
/// on two types never meet.
#[must_use]
pub fn operation_name(closure: &'static str) -> &'static str {
    let mut name = closure;
    while let Some(outer) = name.strip_suffix("::{{closure}}") {
        name = outer;
    }
    name
}

/// `path` (a fn instance's, as [`operation_name`] gives it) without the
/// fn's own generic arguments, when it has some: `a::Gen<u8>::get<a::B>`
/// is `a::Gen<u8>::get`.
fn instance_path(path: &'static str, own_generics: bool) -> &'static str {
    if !own_generics || !path.ends_with('>') {
        return path;
    }
    let bytes = path.as_bytes();
    let mut depth = 0_usize;
    for at in (0..bytes.len()).rev() {
        match bytes[at] {
            b'>' if at == 0 || bytes[at - 1] != b'-' => depth += 1,
            b'<' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return &path[..at];
                }
            }
            _ => {}
        }
    }
    path
}

/// Whether a type name has a generic argument list with an argument that
/// is not a lifetime: `a::Gen<u8>` and `<a::Svc as a::Handle<a::Email>>`
/// have, `a::Lt<'_>` and `<a::Card as a::Ledger>` have not (the brackets
/// of a qualified path are not a generic list).
fn has_generic_arguments(name: &str) -> bool {
    // Per open bracket: whether it opens a generic list, and whether its
    // current argument has started, as a lifetime or not.
    let mut open: Vec<(bool, Option<bool>)> = Vec::new();
    let mut previous = ' ';
    for c in name.chars() {
        match c {
            '<' => open.push((previous.is_alphanumeric() || previous == '_', None)),
            '>' if previous != '-' => {
                if let Some((true, Some(false))) = open.pop() {
                    return true;
                }
            }
            ',' => {
                if let Some((generic, argument)) = open.last_mut() {
                    if *generic && *argument == Some(false) {
                        return true;
                    }
                    *argument = None;
                }
            }
            c if !c.is_whitespace() => {
                if let Some((_, argument @ None)) = open.last_mut() {
                    *argument = Some(c == '\'');
                }
            }
            _ => {}
        }
        previous = c;
    }
    false
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
///
/// Not an `async fn`: it only builds the codec, and a layer of its own would
/// keep another copy of the body's future in the caller's.
#[allow(clippy::too_many_arguments)]
pub fn run<R, T, E, F>(
    idem: &Idempotency,
    settings: Result<Settings, ConfigError>,
    prepared: Prepared,
    shape: Shape<R, T, E>,
    ok: Codec<T>,
    from_idem: fn(Error) -> E,
    body: F,
) -> impl Future<Output = R>
where
    F: Future<Output = R>,
{
    let codec = Parts {
        ok,
        from_idem,
        cache: None::<(Codec<E>, Option<fn(&E) -> bool>)>,
    };
    execute(idem, settings, prepared, shape, codec, body)
}

/// Runs an `#[idempotent]` fn's body; `Err` results that `cache` accepts are
/// stored with `cached`. Not an `async fn`, as [`run`] is not.
#[allow(clippy::too_many_arguments)]
pub fn run_caching_errors<R, T, E, F, P>(
    idem: &Idempotency,
    settings: Result<Settings, ConfigError>,
    prepared: Prepared,
    shape: Shape<R, T, E>,
    ok: Codec<T>,
    from_idem: fn(Error) -> E,
    cached: Codec<E>,
    cache: P,
    body: F,
) -> impl Future<Output = R>
where
    F: Future<Output = R>,
    P: FnOnce(&E) -> bool,
{
    let codec = Parts {
        ok,
        from_idem,
        cache: Some((cached, Some(cache))),
    };
    execute(idem, settings, prepared, shape, codec, body)
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
    let operation = Operation::from(prepared.name);
    let (settings, key, fingerprint) = match ready(settings, prepared) {
        Ok(ready) => ready,
        Err(error) => {
            observe::Call::refused(operation, &error);
            return (shape.from_result)(Err((codec.from_idem)(error)));
        }
    };
    let body = async { (shape.into_result)(body.await) };
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
        Err(error) => {
            observe::Call::refused(operation, &error);
            return Opened::Done(Err(codec.idem_error(error)));
        }
    };
    let savepoint = codec.cache.is_some();
    store
        .open(&settings, operation, key, fingerprint, codec, savepoint)
        .await
}

/// Runs a transactional `#[idempotent]` fn's body on the claim's
/// connection, in the call's span.
#[cfg(feature = "postgres")]
pub async fn transaction_body<R>(
    claim: &mut Claim<'_>,
    body: impl AsyncFnOnce(&mut sqlx::PgConnection) -> R,
) -> R {
    let holding = claim.holding();
    crate::engine::caught(holding.run(body(claim.connection())))
        .await
        .unwrap_or_else(|panic| claim.panicked(panic))
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

/// Without the `postgres` feature, `transaction = tx` expands against these
/// stand-ins, so that the one error a user sees is the missing feature
/// (`requirements::PostgresFeature`), not a cascade of unresolved items.
#[cfg(not(feature = "postgres"))]
mod without_postgres {
    use std::convert::Infallible;
    use std::marker::PhantomData;

    use super::{ConfigError, Parts, Prepared, Settings};

    /// What `store = …` names in a transactional call without the feature.
    #[derive(Clone)]
    pub struct NoPostgres(Infallible);

    /// The connection a transactional body would get without the feature.
    pub enum NoConnection {}

    /// How a transactional call opened (never, without the feature).
    pub enum Opened<'s, T, E> {
        /// Decided without the body.
        Done(Result<T, E>),
        /// Claimed.
        Claimed(Box<Claim<'s>>),
    }

    /// A claim (never held, without the feature).
    pub struct Claim<'s>(Infallible, PhantomData<&'s ()>);

    impl Claim<'_> {
        /// The transaction's connection.
        pub fn connection(&mut self) -> &mut NoConnection {
            match self.0 {}
        }

        /// The call's span.
        pub fn span(&self) -> tracing::Span {
            match self.0 {}
        }
    }

    /// Opens a transactional call (never, without the feature).
    pub async fn transaction_open<'s, T, E, P>(
        store: &'s NoPostgres,
        _: Result<Settings, ConfigError>,
        _: Prepared,
        _: &mut Parts<T, E, P>,
    ) -> Opened<'s, T, E> {
        match store.0 {}
    }

    /// Runs a transactional body (never, without the feature).
    pub async fn transaction_body<R>(
        claim: &mut Claim<'_>,
        _: impl AsyncFnOnce(&mut NoConnection) -> R,
    ) -> R {
        match claim.0 {}
    }

    /// Records a transactional call's result (never, without the feature).
    pub async fn transaction_finish<T, E, P>(
        claim: Box<Claim<'_>>,
        _: Result<T, E>,
        _: Parts<T, E, P>,
    ) -> Result<T, E> {
        match claim.0 {}
    }
}

#[cfg(not(feature = "postgres"))]
pub use without_postgres::*;

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
    use super::{has_generic_arguments, instance_path};

    #[test]
    fn instances_with_generic_arguments_besides_the_fns_own_are_told() {
        for (path, own, generic) in [
            ("shop::charge", false, false),
            ("shop::Payments::charge", false, false),
            ("shop::Repo<shop::Invoice>::create", false, true),
            ("shop::Gen<u8>::get<shop::B>", true, true),
            ("shop::publish<shop::Shipped>", true, false),
            ("shop::Plain::get<shop::B, 3>", true, false),
            ("shop::Lt<'_>::go", false, false),
            ("shop::Lt<'_, '_>::go", false, false),
            ("shop::Lt<'_, u8>::go", false, true),
            ("<shop::Card as shop::Ledger>::record", false, false),
            ("<shop::Gen<u8> as shop::Ledger>::record", false, true),
            (
                "<shop::Svc as shop::Handle<shop::Email>>::handle",
                false,
                true,
            ),
            ("<shop::Lt<'_> as shop::Ledger>::record", false, false),
            ("shop::Callbacks<fn() -> u8>::run", false, true),
            ("shop::Wrap<shop::Inner<'_>>::go", false, true),
        ] {
            assert_eq!(
                has_generic_arguments(instance_path(path, own)),
                generic,
                "{path}"
            );
        }
        assert_eq!(
            instance_path("shop::Gen<u8>::get<shop::B<'_>>", true),
            "shop::Gen<u8>::get"
        );
    }

    #[test]
    fn a_name_pinned_by_two_functions_is_reported_once() {
        static FIRST: super::Pinned = super::Pinned::new("tests.pinned", "shop::a (a.rs:1)");
        static AGAIN: super::Pinned = super::Pinned::new("tests.pinned", "shop::a (a.rs:1)");
        static SECOND: super::Pinned = super::Pinned::new("tests.pinned", "shop::b (b.rs:9)");
        assert_eq!(FIRST.check(), None);
        assert_eq!(
            AGAIN.check(),
            None,
            "one function, two statics (a generic's instances)"
        );
        assert_eq!(SECOND.check(), Some("shop::a (a.rs:1)"));
        assert_eq!(SECOND.check(), None, "reported once");
    }

    #[test]
    fn operation_names_drop_the_closures() {
        assert_eq!(
            super::operation_name("app::Mailer::handle::{{closure}}::{{closure}}"),
            "app::Mailer::handle"
        );
        assert_eq!(
            super::operation_name("<app::A as app::T>::f::{{closure}}"),
            "<app::A as app::T>::f"
        );
        assert_eq!(
            super::operation_name("app::Repo<app::Invoice>::create::{{closure}}"),
            "app::Repo<app::Invoice>::create"
        );
    }
}
