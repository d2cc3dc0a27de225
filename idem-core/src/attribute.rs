//! The `#[idempotent]` attribute's documentation, on its re-export.

/// Makes an `async fn` safe to retry.
///
/// The attribute rewrites the function to derive its key, claim the key
/// atomically in a store, run the body once, store the result (serialized
/// with `serde_json`) and hand every retry the same result. It expands to a
/// call of an [`Idempotency`](crate::Idempotency) handle, which code without
/// the attribute can call itself.
///
/// ```
/// use idem_core::idempotent;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct ChargeRequest { idempotency_key: String, customer: u64, amount_cents: u64 }
///
/// #[derive(Debug, PartialEq, Serialize, Deserialize)]
/// struct Receipt { charge_id: u64 }
///
/// #[derive(Debug)]
/// enum PaymentError { Idem(idem_core::Error) }
/// impl From<idem_core::Error> for PaymentError {
///     fn from(e: idem_core::Error) -> Self { Self::Idem(e) }
/// }
///
/// struct Payments { idem: idem_core::Idempotency }
///
/// impl Payments {
///     #[idempotent(key = req.idempotency_key, scope = req.customer, ttl = "24h", store = self.idem)]
///     async fn charge(&self, req: ChargeRequest) -> Result<Receipt, PaymentError> {
///         Ok(Receipt { charge_id: 4711 })
///     }
/// }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), PaymentError> {
/// let payments = Payments { idem: idem_core::Idempotency::memory() };
/// let req = || ChargeRequest { idempotency_key: "order-17".into(), customer: 7, amount_cents: 100 };
/// assert_eq!(payments.charge(req()).await?, payments.charge(req()).await?);
/// # Ok(())
/// # }
/// ```
///
/// # Requirements
///
/// The function is `async` (or an `#[async_trait]` method) and returns
/// `Result<T, E>` (a type alias of `Result` works) with
/// `T: Serialize + DeserializeOwned` and `E: From<idem_core::Error>`, plus
/// `E: Serialize + DeserializeOwned` when errors are cached. The arguments
/// that take part in the fingerprint implement `Serialize`. Each of these is
/// checked at compile time and reported at the offending token.
///
/// # Arguments
///
/// | argument | meaning | default |
/// |---|---|---|
/// | `key = EXPR` | the idempotency key: any `Serialize` value, evaluated by reference before the body runs | the fingerprint of the arguments (content-based dedup) |
/// | `scope = EXPR` | a tenant or user: equal keys in different scopes never meet | none |
/// | `ttl = "24h"` or `ttl = EXPR` | how long a completed result is kept (`90s`, `15m`, `24h`, `7d`, `1h30m`, `500ms` with a shorter `lease`); a literal, or `Duration::from_secs(N)`, `from_millis(N)`, `ZERO` or `MAX`, is checked at compile time; any other expression must be a `Duration`, checked at run time | `24h` |
/// | `lease = "30s"` | how long an in-progress claim holds before another caller may take over; renewed while the body runs; shorter than `ttl`, at least `10ms` | `60s` |
/// | `on_conflict = wait` or `reject` | another call holds the key: wait for its result, or fail at once with `Error::InProgress` | `wait` |
/// | `wait_timeout = "10s"` | the longest a waiting call waits (only with `wait`) | the lease |
/// | `cache_errors = true` or `= path` | also store `Err` results: all, or those a `fn(&E) -> bool` accepts | `false` |
/// | `skip(arg, …)` | arguments left out of the fingerprint (handles, pools, clients); `self` always is | none |
/// | `fingerprint = false` | do not check that a reused key comes with the same arguments (a pinned generic impl's instances are still told apart) | checked |
/// | `name = "payments.charge"` | the operation's stable name in the key; pin it to survive moving code (functions pinned to one name share records; idem warns once when it sees that) | the function instance's path, `Self` type and generic arguments included, e.g. `shop::Payments::charge`, `shop::Repo<shop::Invoice>::create` |
/// | `store = EXPR` | the long-lived [`Idempotency`](crate::Idempotency) handle to run against (or a reference, `Arc` or `LazyLock` of one), never one built per call; with `transaction`, the `PostgresStore` | [`default_handle()`](crate::default_handle) |
/// | `transaction = tx` | (feature `postgres`) the body's `tx: &mut sqlx::PgConnection` parameter: idem opens the transaction on `store`'s pool, claims the key in it, and commits the result with the body's writes; `tx` leaves the signature | none |
/// | `isolation = serializable` | (with `transaction`) the level idem opens the transaction at: `read_committed`, `repeatable_read` or `serializable` ([`Isolation`](crate::Isolation)) | the database's |
/// | `crate = "path"` | where the `idem_core` crate is, for crates that re-export it | `::idem_core` |
///
/// ## `key` and `scope`
///
/// Any `Serialize` expression over the arguments, evaluated by reference
/// before the body runs: a field, a `Uuid`, a tuple.
///
/// ```
/// # use idem_core::idempotent;
/// # #[derive(Debug)] struct Error;
/// # impl From<idem_core::Error> for Error { fn from(_: idem_core::Error) -> Self { Error } }
/// #[idempotent(key = (order_id, attempt), scope = tenant)]
/// async fn ship(tenant: &str, order_id: u64, attempt: u32) -> Result<u64, Error> {
///     Ok(order_id)
/// }
/// ```
///
/// Without `key`, the arguments themselves are the key: equal calls are one
/// call.
///
/// ```
/// # use idem_core::idempotent;
/// # #[derive(Debug)] struct Error;
/// # impl From<idem_core::Error> for Error { fn from(_: idem_core::Error) -> Self { Error } }
/// #[idempotent(ttl = "1h")]
/// async fn send_welcome_email(user_id: u64) -> Result<(), Error> {
///     Ok(())
/// }
/// ```
///
/// ## `ttl`, `lease` and `wait_timeout`
///
/// ```
/// # use idem_core::idempotent;
/// # use std::time::Duration;
/// # #[derive(Debug)] struct Error;
/// # impl From<idem_core::Error> for Error { fn from(_: idem_core::Error) -> Self { Error } }
/// # fn retention() -> Duration { Duration::from_secs(3600) }
/// #[idempotent(key = id, ttl = "7d", lease = "30s", wait_timeout = "10s")]
/// async fn import(id: u64) -> Result<u32, Error> { Ok(1) }
///
/// #[idempotent(key = id, ttl = retention())]
/// async fn export(id: u64) -> Result<u32, Error> { Ok(1) }
/// ```
///
/// ## `on_conflict`
///
/// `reject` answers a concurrent duplicate with
/// [`Error::InProgress { retry_after }`](crate::Error::InProgress) (HTTP 409)
/// instead of making it wait.
///
/// ```
/// # use idem_core::idempotent;
/// # #[derive(Debug)] struct Error;
/// # impl From<idem_core::Error> for Error { fn from(_: idem_core::Error) -> Self { Error } }
/// #[idempotent(key = id, on_conflict = reject)]
/// async fn transfer(id: String) -> Result<u64, Error> { Ok(1) }
/// ```
///
/// ## `cache_errors`
///
/// ```
/// # use idem_core::idempotent;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Serialize, Deserialize)]
/// enum PaymentError { Declined, Timeout, Idem(String) }
/// impl From<idem_core::Error> for PaymentError {
///     fn from(e: idem_core::Error) -> Self { Self::Idem(e.to_string()) }
/// }
/// impl PaymentError {
///     fn is_permanent(&self) -> bool { matches!(self, Self::Declined) }
/// }
///
/// // A decline is final and replays; a timeout is retried.
/// #[idempotent(key = id, cache_errors = PaymentError::is_permanent)]
/// async fn charge(id: String) -> Result<u64, PaymentError> { Err(PaymentError::Declined) }
/// ```
///
/// ## `skip`, `fingerprint` and `name`
///
/// By default an operation is named after the function *instance*: its
/// path with the `Self` type and every generic argument, as
/// [`core::any::type_name`] prints them. `shop::EmailConsumer::handle` and
/// `shop::SmsConsumer::handle` never share records, nor do
/// `shop::Notifier<shop::Email>::notify` and `shop::Notifier<shop::Sms>::notify`,
/// `<shop::Card as shop::Ledger>::record` and `<shop::Cash as
/// shop::Ledger>::record` (a trait's default method), or `shop::publish<shop::Shipped>`
/// and `shop::publish<shop::Cancelled>`. A closure type is printed as the
/// path of the function it is written in and `{{closure}}`, so the
/// instances of a fn that takes `impl Fn` are operations of their own per
/// function that passes a closure, but closures passed from one function
/// share one operation: calls that pass them there need keys of their
/// own.
///
/// That name is part of every stored key. Unchanged code keeps it across
/// rebuilds; what changes it, so that a retry arriving across the deploy
/// runs again, is moving or renaming the function, its impl type or a type
/// in its generic arguments, and a compiler that prints type names
/// differently (rustc has printed them alike for years, but does not
/// promise it). Pin `name` for operations whose records must survive such
/// changes. Every instance of one generic function shares its pinned name.
/// Functions pinned to one name share records, which can be meant (a
/// variant that waits and one that rejects, of one operation); idem logs one
/// warning naming both functions the first time the second one runs, so
/// that a copied attribute does not share records unseen.
///
/// The fingerprint of an argument whose type is a type parameter (or an
/// `impl Trait`) covers its type as well (its name without module paths), so
/// that the instances of a generic fn pinned to one name never take each
/// other's equal-looking arguments (`Shipped { order: 7 }` and `Cancelled
/// { order: 7 }`) for the same call. The attribute cannot see an impl's
/// type parameters: a fn pinned to a name whose instance has generic
/// arguments besides its own, in its `Self` type or its trait
/// (`impl<T> Notifier<T>`, `impl<C> Channeled<C> for Courier`; lifetimes
/// aside), has that instance in its fingerprint instead, so that
/// `Notifier<Email>` and `Notifier<Sms>` never take each other's calls (the
/// same key is [`Error::KeyReused`](crate::Error::KeyReused); with
/// `fingerprint = false` too, whose calls then check their `Self` type or
/// trait alone, so that fns of one impl pinned to one name still share).
/// The fn's own generic arguments, an `impl Trait` argument's type
/// included, are not its instance's: a skipped `&impl Gateway` leaves one
/// operation for every gateway type. A trait's
/// default method pinned to a name is one operation for every implementor
/// whose type has no generic arguments. Every other pinned fn's key and
/// fingerprint are [`Key::scoped(name, scope, key)`](crate::Key::scoped)
/// (or [`Key::new`](crate::Key::new) without a scope) and
/// [`Fingerprint::of(&(arg, …))`](crate::Fingerprint::of) of its
/// fingerprinted arguments, so a call through
/// [`Idempotency::run`](crate::Idempotency::run) with those is the same call.
///
/// Whatever gets a record under a key, it is never decoded as a type of
/// another name: each record carries a tag of its value's type name (module
/// paths left out, so moving a type keeps it; renaming it does not), and a
/// record of another type answers [`Error::Decode`](crate::Error::Decode).
/// Two types of one name in two modules (`v1::Receipt`, `v2::Receipt`) are
/// one type to the tag: a fn whose result changes shape under one name
/// decodes records as serde reads them (a missing field with
/// `#[serde(default)]` is filled in). Records written by idem versions
/// without tags are read untagged.
///
/// Two fns named alike by default (one name in two blocks of one scope, as
/// `{ fn handle … }` twice, or `const _: () = { … }` blocks a macro writes)
/// would share records: the second to run in a process is refused with
/// [`Error::Config`](crate::Error::Config) (its setting `"name"`), before
/// its body runs, until each has a `name` of its own.
///
/// The fingerprint covers the arguments as they are bound: a destructured
/// argument's bindings (`Transfer { id, amount }: Transfer`), not the
/// parts it leaves out (`..`, `_`), and not an argument bound to `_`.
///
/// A call made from inside the body that holds its own key (on the same
/// handle, directly or through functions it awaits) would wait for itself;
/// it fails at once with [`Error::Reentered`](crate::Error::Reentered). A
/// task the body spawns is not part of the call: a call of the key there
/// waits for the body as any other caller does (and a body that awaits
/// that task waits until `wait_timeout`).
///
/// ```
/// # use idem_core::idempotent;
/// # #[derive(Debug)] struct Error;
/// # impl From<idem_core::Error> for Error { fn from(_: idem_core::Error) -> Self { Error } }
/// # struct Pool;
/// #[idempotent(key = id, skip(pool), name = "orders.create")]
/// async fn create(pool: &Pool, id: u64, items: Vec<String>) -> Result<u64, Error> { Ok(id) }
///
/// #[idempotent(key = id, fingerprint = false)]
/// async fn touch(id: u64, now: u64) -> Result<(), Error> { Ok(()) }
/// ```
///
/// ## `store` and `crate`
///
/// ```
/// # use idem_core::idempotent;
/// # #[derive(Debug)] struct Error;
/// # impl From<idem_core::Error> for Error { fn from(_: idem_core::Error) -> Self { Error } }
/// // Built once, at start-up: it owns the store and the calls in flight.
/// struct Service { idem: idem_core::Idempotency }
///
/// impl Service {
///     #[idempotent(key = id, store = self.idem)]
///     async fn handle(&self, id: u64) -> Result<u64, Error> { Ok(id) }
/// }
///
/// mod reexported { pub(crate) use ::idem_core as idem; }
///
/// #[idempotent(key = id, crate = "reexported::idem")]
/// async fn elsewhere(id: u64) -> Result<u64, Error> { Ok(id) }
/// ```
#[doc(inline)]
pub use idem_macros::idempotent;
