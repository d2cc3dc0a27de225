//! `#[idempotent]` on every kind of function it supports: each case compiles
//! and behaves (runs once, replays, refuses).

#![deny(unfulfilled_lint_expectations)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use idem_core::{Idempotency, idempotent};
use serde::{Deserialize, Serialize};

#[derive(Debug)]
enum AppError {
    Idem(idem_core::Error),
    Parse(#[allow(dead_code)] std::num::ParseIntError),
    Declined,
}

impl From<idem_core::Error> for AppError {
    fn from(error: idem_core::Error) -> Self {
        Self::Idem(error)
    }
}

impl From<std::num::ParseIntError> for AppError {
    fn from(error: std::num::ParseIntError) -> Self {
        Self::Parse(error)
    }
}

type AppResult<T> = Result<T, AppError>;

static FREE_RUNS: AtomicU32 = AtomicU32::new(0);

/// A free function with a key.
#[idempotent(key = id, name = "tests.free")]
async fn free(id: &str, amount: u64) -> Result<u64, AppError> {
    FREE_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(amount * 2)
}

#[tokio::test]
async fn free_functions_run_once_and_check_arguments() {
    let id = "free-1";
    assert_eq!(free(id, 21).await.unwrap(), 42);
    assert_eq!(free(id, 21).await.unwrap(), 42);
    assert_eq!(FREE_RUNS.load(Ordering::SeqCst), 1);
    assert!(matches!(
        free(id, 22).await,
        Err(AppError::Idem(idem_core::Error::KeyReused))
    ));
}

#[derive(Default)]
struct Service {
    idem: Idempotency,
    runs: AtomicU32,
    calls_made: u32,
}

impl Service {
    #[idempotent(key = key, store = self.idem)]
    async fn by_ref(&self, key: u64) -> AppResult<u32> {
        Ok(self.runs.fetch_add(1, Ordering::SeqCst) + 1)
    }

    #[idempotent(key = key, store = self.idem)]
    async fn by_mut(&mut self, key: u64) -> AppResult<u32> {
        self.calls_made += 1;
        Ok(self.calls_made)
    }

    #[idempotent(key = key, store = self.idem)]
    async fn by_arc(self: Arc<Self>, key: u64) -> AppResult<u32> {
        Ok(self.runs.fetch_add(1, Ordering::SeqCst) + 100)
    }
}

#[tokio::test]
async fn methods_on_ref_mut_and_arc_self() {
    let mut service = Service::default();
    assert_eq!(service.by_ref(1).await.unwrap(), 1);
    assert_eq!(service.by_ref(1).await.unwrap(), 1);
    assert_eq!(service.by_mut(2).await.unwrap(), 1);
    assert_eq!(service.by_mut(2).await.unwrap(), 1);
    assert_eq!(service.calls_made, 1);
    let service = Arc::new(service);
    assert_eq!(Arc::clone(&service).by_arc(3).await.unwrap(), 101);
    assert_eq!(Arc::clone(&service).by_arc(3).await.unwrap(), 101);
    assert_eq!(service.runs.load(Ordering::SeqCst), 2);
}

/// A generic function with bounds and a `where` clause; no `key`, so the
/// arguments are the key.
#[idempotent(ttl = "1h", lease = "10s")]
async fn generic<T, U>(value: T, extra: U) -> Result<Vec<T>, AppError>
where
    T: Serialize + serde::de::DeserializeOwned + Clone + Send,
    U: Serialize + std::fmt::Debug,
{
    let _ = format!("{extra:?}");
    Ok(vec![value.clone(), value])
}

#[tokio::test]
async fn generic_functions_key_by_content() {
    let a = generic("x".to_owned(), 1_u8).await.unwrap();
    let b = generic("x".to_owned(), 1_u8).await.unwrap();
    assert_eq!(a, b);
    assert_eq!(generic(5_u32, ()).await.unwrap(), vec![5, 5]);
}

static BORROWED_RUNS: AtomicU32 = AtomicU32::new(0);

/// Borrowed arguments with lifetimes.
#[idempotent(key = (id, part))]
async fn borrowed<'a, T: Serialize + Sync>(
    id: &'a str,
    part: &T,
    words: &[&'a str],
) -> AppResult<usize> {
    BORROWED_RUNS.fetch_add(1, Ordering::SeqCst);
    let _ = part;
    Ok(id.len() + words.len())
}

#[tokio::test]
async fn borrowed_arguments_and_tuple_keys() {
    let words = vec!["a", "b"];
    assert_eq!(borrowed("key", &1_u8, &words).await.unwrap(), 5);
    assert_eq!(borrowed("key", &1_u8, &words).await.unwrap(), 5);
    assert_eq!(borrowed("key", &2_u8, &words).await.unwrap(), 5);
    assert_eq!(
        BORROWED_RUNS.load(Ordering::SeqCst),
        2,
        "the tuple key differs"
    );
}

static SKIPPED_RUNS: AtomicU32 = AtomicU32::new(0);

/// An `impl Trait` argument, skipped, and a destructured argument.
#[idempotent(key = order, skip(log))]
async fn with_impl_trait(
    order: u64,
    log: impl Fn(&str) + Send + Sync,
    (a, b): (u32, u32),
) -> AppResult<u32> {
    log("running");
    SKIPPED_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(a + b)
}

#[tokio::test]
async fn impl_trait_arguments_are_skipped_and_patterns_fingerprinted() {
    assert_eq!(with_impl_trait(9, |_| {}, (1, 2)).await.unwrap(), 3);
    assert_eq!(with_impl_trait(9, |_| {}, (1, 2)).await.unwrap(), 3);
    assert_eq!(SKIPPED_RUNS.load(Ordering::SeqCst), 1);
    assert!(matches!(
        with_impl_trait(9, |_| {}, (1, 3)).await,
        Err(AppError::Idem(idem_core::Error::KeyReused))
    ));
}

static EARLY_RUNS: AtomicU32 = AtomicU32::new(0);

/// `?` with a `From` conversion, and an early `return`.
#[idempotent(key = input)]
async fn parse(input: String) -> AppResult<u32> {
    #![allow(clippy::needless_return)]
    EARLY_RUNS.fetch_add(1, Ordering::SeqCst);
    if input == "zero" {
        return Ok(0);
    }
    let n: u32 = input.parse()?;
    if n == 13 {
        return Err(AppError::Declined);
    }
    Ok(n + 1)
}

#[tokio::test]
async fn question_mark_and_early_return() {
    assert_eq!(parse("zero".to_owned()).await.unwrap(), 0);
    assert_eq!(parse("41".to_owned()).await.unwrap(), 42);
    assert!(matches!(
        parse("x".to_owned()).await,
        Err(AppError::Parse(_))
    ));
    assert!(matches!(
        parse("13".to_owned()).await,
        Err(AppError::Declined)
    ));
    let before = EARLY_RUNS.load(Ordering::SeqCst);
    assert_eq!(parse("41".to_owned()).await.unwrap(), 42, "replayed");
    assert!(matches!(
        parse("x".to_owned()).await,
        Err(AppError::Parse(_))
    ));
    assert_eq!(
        EARLY_RUNS.load(Ordering::SeqCst),
        before + 1,
        "only the uncached error ran again"
    );
}

trait Ledger {
    async fn record(&self, entry: u64) -> AppResult<u64>;
}

#[async_trait::async_trait]
trait BoxedLedger {
    async fn record(&self, entry: u64, memo: String) -> AppResult<u64>;
}

#[derive(Default)]
struct Books {
    idem: Idempotency,
    runs: AtomicU32,
}

impl Ledger for Books {
    /// Doc comments and other attributes are kept.
    #[idempotent(key = entry, store = self.idem)]
    #[allow(clippy::unused_async)]
    async fn record(&self, entry: u64) -> AppResult<u64> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        Ok(entry * 10)
    }
}

#[async_trait::async_trait]
impl BoxedLedger for Books {
    #[idempotent(key = entry, name = "books.boxed", store = self.idem)]
    async fn record(&self, entry: u64, memo: String) -> AppResult<u64> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        Ok(entry * 100 + memo.len() as u64)
    }
}

#[tokio::test]
async fn trait_impls_native_and_async_trait() {
    let books = Books::default();
    assert_eq!(Ledger::record(&books, 1).await.unwrap(), 10);
    assert_eq!(Ledger::record(&books, 1).await.unwrap(), 10);
    assert_eq!(
        BoxedLedger::record(&books, 1, "ab".into()).await.unwrap(),
        102
    );
    assert_eq!(
        BoxedLedger::record(&books, 1, "ab".into()).await.unwrap(),
        102
    );
    assert_eq!(books.runs.load(Ordering::SeqCst), 2);
    assert!(matches!(
        BoxedLedger::record(&books, 1, "abc".into()).await,
        Err(AppError::Idem(idem_core::Error::KeyReused))
    ));
    let boxed: Box<dyn BoxedLedger + Send + Sync> = Box::new(books);
    assert_eq!(boxed.record(1, "ab".into()).await.unwrap(), 102);
}

#[async_trait::async_trait]
trait Transfers {
    async fn transfer(&self, order: (u64, u64)) -> AppResult<u64>;
    async fn annotate(&self, order: (u64, String)) -> AppResult<String>;
}

#[async_trait::async_trait]
impl Transfers for Books {
    /// The key names a binding of a destructured argument.
    #[idempotent(key = id, store = self.idem)]
    async fn transfer(&self, (id, amount): (u64, u64)) -> AppResult<u64> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        Ok(id * 1000 + amount)
    }

    /// The pattern says how it binds: `mut` and `ref`.
    #[idempotent(key = id, scope = note, store = self.idem)]
    async fn annotate(&self, (mut id, ref note): (u64, String)) -> AppResult<String> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        id += 1;
        Ok(format!("{note}{id}"))
    }
}

#[tokio::test]
async fn an_async_trait_key_names_a_destructured_binding() {
    let books = Books::default();
    assert_eq!(books.transfer((7, 5)).await.unwrap(), 7005);
    assert_eq!(books.transfer((7, 5)).await.unwrap(), 7005);
    assert_eq!(books.runs.load(Ordering::SeqCst), 1);
    assert!(matches!(
        books.transfer((7, 6)).await,
        Err(AppError::Idem(idem_core::Error::KeyReused))
    ));
    assert_eq!(books.transfer((8, 6)).await.unwrap(), 8006);
    assert_eq!(books.runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_async_trait_key_names_a_binding_of_a_mut_or_ref_pattern() {
    let books = Books::default();
    assert_eq!(books.annotate((7, "a".into())).await.unwrap(), "a8");
    assert_eq!(books.annotate((7, "a".into())).await.unwrap(), "a8");
    assert_eq!(books.runs.load(Ordering::SeqCst), 1);
    // The scope is the `ref` binding: another note is another key.
    assert_eq!(books.annotate((7, "b".into())).await.unwrap(), "b8");
    // The key is the `mut` binding as called, before the body adds to it.
    assert_eq!(books.annotate((8, "a".into())).await.unwrap(), "a9");
    assert_eq!(books.runs.load(Ordering::SeqCst), 3);
}

static SCOPED_RUNS: AtomicU32 = AtomicU32::new(0);

#[idempotent(key = key, scope = tenant)]
async fn scoped(tenant: u32, key: &str) -> AppResult<u32> {
    Ok(SCOPED_RUNS.fetch_add(1, Ordering::SeqCst))
}

#[tokio::test]
async fn scopes_separate_equal_keys() {
    let a = scoped(1, "same").await.unwrap();
    let b = scoped(2, "same").await.unwrap();
    assert_ne!(a, b);
    assert_eq!(scoped(1, "same").await.unwrap(), a);
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum Cacheable {
    Declined(u32),
    Busy,
    Idem(String),
}

impl From<idem_core::Error> for Cacheable {
    fn from(error: idem_core::Error) -> Self {
        Self::Idem(error.to_string())
    }
}

fn permanent(error: &Cacheable) -> bool {
    matches!(error, Cacheable::Declined(_))
}

static CACHED_RUNS: AtomicU32 = AtomicU32::new(0);

#[idempotent(key = key, cache_errors = permanent)]
async fn declines(key: &str) -> Result<(), Cacheable> {
    let run = CACHED_RUNS.fetch_add(1, Ordering::SeqCst);
    Err(if key == "busy" {
        Cacheable::Busy
    } else {
        Cacheable::Declined(run)
    })
}

#[idempotent(key = key, cache_errors = true)]
async fn all_errors(key: &str) -> Result<u8, Cacheable> {
    Err(Cacheable::Declined(u32::from(key.len() as u8)))
}

#[tokio::test]
async fn cached_errors_replay() {
    let first = declines("card").await.unwrap_err();
    assert_eq!(declines("card").await.unwrap_err(), first);
    let runs = CACHED_RUNS.load(Ordering::SeqCst);
    assert_eq!(declines("busy").await.unwrap_err(), Cacheable::Busy);
    assert_eq!(declines("busy").await.unwrap_err(), Cacheable::Busy);
    assert_eq!(
        CACHED_RUNS.load(Ordering::SeqCst),
        runs + 2,
        "Busy is not cached"
    );
    assert_eq!(all_errors("xy").await, Err(Cacheable::Declined(2)));
}

/// Reject instead of waiting, with a `Duration` expression for the TTL.
#[idempotent(key = key, on_conflict = reject, ttl = Duration::from_secs(30), lease = "5s", store = idem, skip(idem, gate))]
async fn rejecting(idem: &Idempotency, key: u8, gate: Arc<tokio::sync::Notify>) -> AppResult<u8> {
    gate.notified().await;
    Ok(key)
}

#[tokio::test]
async fn on_conflict_reject_refuses_concurrent_duplicates() {
    let store = idem_core::MemoryStore::new();
    let idem = Idempotency::new(store.clone());
    let gate = Arc::new(tokio::sync::Notify::new());
    let holder = {
        let (idem, gate) = (idem.clone(), Arc::clone(&gate));
        tokio::spawn(async move { rejecting(&idem, 1, gate).await })
    };
    tokio::task::yield_now().await;
    while store.is_empty() {
        tokio::task::yield_now().await;
    }
    match rejecting(&idem, 1, Arc::clone(&gate)).await {
        Err(AppError::Idem(idem_core::Error::InProgress { retry_after })) => {
            assert!(retry_after <= Duration::from_secs(5));
        }
        other => panic!("expected InProgress, got {other:?}"),
    }
    gate.notify_waiters();
    assert_eq!(holder.await.unwrap().unwrap(), 1);
}

#[idempotent(key = id, fingerprint = false, wait_timeout = "2s", skip(note))]
async fn unchecked(id: u64, note: String, amount: HashMap<String, u32>) -> AppResult<usize> {
    Ok(note.len() + amount.len())
}

#[tokio::test]
async fn fingerprint_false_replays_for_other_arguments() {
    let first = unchecked(1, "abc".into(), HashMap::new()).await.unwrap();
    let other: HashMap<String, u32> = [("a".to_owned(), 1)].into();
    assert_eq!(unchecked(1, "x".into(), other).await.unwrap(), first);
}

#[idempotent(key = key, store = idem, skip(idem))]
async fn with_shared_handle(idem: Arc<Idempotency>, key: u8) -> AppResult<u8> {
    Ok(key)
}

#[tokio::test]
async fn the_returned_future_is_send() {
    let idem = Arc::new(Idempotency::memory());
    let handle = tokio::spawn(with_shared_handle(Arc::clone(&idem), 7));
    assert_eq!(handle.await.unwrap().unwrap(), 7);
    let books = Arc::new(Books::default());
    let handle = tokio::spawn(async move { Ledger::record(&*books, 2).await });
    assert_eq!(handle.await.unwrap().unwrap(), 20);
}

mod reexport {
    pub(super) mod runtime {
        pub(crate) use idem_core as idem;
    }

    #[super::idempotent(key = key, crate = "crate::reexport::runtime::idem")]
    pub(super) async fn through_reexport(key: u8) -> Result<u8, super::AppError> {
        Ok(key)
    }
}

#[tokio::test]
async fn crate_points_at_a_reexport() {
    assert_eq!(reexport::through_reexport(3).await.unwrap(), 3);
}

/// An unused annotated function still gets `dead_code` (the expectation
/// would be unfulfilled, and denied, otherwise).
#[expect(dead_code)]
#[idempotent(key = key)]
async fn never_called(key: u8) -> AppResult<u8> {
    Ok(key)
}

mod consumers {
    //! Two types with a `handle` method in one module.

    use std::sync::atomic::{AtomicU32, Ordering};

    use idem_core::idempotent;

    use super::AppResult;

    pub(super) static EMAILS: AtomicU32 = AtomicU32::new(0);
    pub(super) static TEXTS: AtomicU32 = AtomicU32::new(0);

    pub(super) struct EmailConsumer;
    pub(super) struct SmsConsumer;

    impl EmailConsumer {
        #[idempotent(key = id)]
        pub(super) async fn handle(&self, id: u64) -> AppResult<String> {
            EMAILS.fetch_add(1, Ordering::SeqCst);
            Ok(format!("email {id}"))
        }
    }

    impl SmsConsumer {
        #[idempotent(key = id)]
        pub(super) async fn handle(&self, id: u64) -> AppResult<String> {
            TEXTS.fetch_add(1, Ordering::SeqCst);
            Ok(format!("sms {id}"))
        }
    }
}

/// Same-named methods of two types in one module never share records.
#[tokio::test]
async fn same_named_methods_of_two_types_do_not_meet() {
    use consumers::{EMAILS, EmailConsumer, SmsConsumer, TEXTS};
    assert_eq!(EmailConsumer.handle(7).await.unwrap(), "email 7");
    assert_eq!(SmsConsumer.handle(7).await.unwrap(), "sms 7");
    assert_eq!(SmsConsumer.handle(7).await.unwrap(), "sms 7", "replayed");
    assert_eq!(EMAILS.load(Ordering::SeqCst), 1);
    assert_eq!(TEXTS.load(Ordering::SeqCst), 1);
}

/// The default operation names, as they are stored: a compiler that printed
/// paths differently would change every default key, and fail this test.
#[test]
fn default_operation_names_are_the_functions_paths() {
    fn name_in<F>(_: &F) -> &'static str {
        idem_core::__private::operation_name(std::any::type_name::<F>())
    }
    let site = || ();
    assert_eq!(
        name_in(&site),
        "attribute::default_operation_names_are_the_functions_paths"
    );
}

mod names {
    use idem_core::{Idempotency, Key, idempotent, store::Inspection};

    pub(super) struct Repo<T>(
        pub(super) Idempotency,
        pub(super) std::marker::PhantomData<T>,
    );

    impl<T: Default + serde::Serialize + serde::de::DeserializeOwned> Repo<T> {
        #[idempotent(key = id, store = self.0)]
        pub(super) async fn create(&self, id: u64) -> Result<T, String> {
            Ok(T::default())
        }
    }

    #[idempotent(key = id, store = idem, skip(idem, value))]
    pub(super) async fn publish<V: serde::Serialize>(
        idem: &Idempotency,
        id: u64,
        value: V,
    ) -> Result<u32, String> {
        let _ = value;
        Ok(1)
    }

    /// The stored key of each shape, from the name the docs give for it.
    #[tokio::test]
    async fn default_names_carry_the_self_type_and_generic_arguments() {
        let idem = Idempotency::memory();
        let repo = Repo::<u32>(idem.clone(), std::marker::PhantomData);
        repo.create(7).await.unwrap();
        publish(&idem, 7, "x").await.unwrap();
        for name in [
            "attribute::names::Repo<u32>::create",
            "attribute::names::publish<&str>",
        ] {
            let key = Key::new(name, &7u64).unwrap();
            let found = idem.inspect(key).await.unwrap();
            assert!(
                matches!(found, Inspection::Completed { .. }),
                "{name}: {found:?}"
            );
        }
    }
}

static SET_RUNS: AtomicU32 = AtomicU32::new(0);

/// Without `key`, the arguments are the key: equal sets built in other orders
/// are one call.
#[idempotent]
async fn tag(tags: std::collections::HashSet<String>, order: Vec<u32>) -> AppResult<u32> {
    Ok(SET_RUNS.fetch_add(1, Ordering::SeqCst) + order.len() as u32)
}

#[tokio::test]
async fn equal_set_arguments_are_one_call() {
    let forward: std::collections::HashSet<String> = (0..50).map(|i| format!("t{i}")).collect();
    let mut backward = std::collections::HashSet::with_capacity(1);
    for i in (0..50).rev() {
        backward.insert(format!("t{i}"));
    }
    let first = tag(forward.clone(), vec![1, 2]).await.unwrap();
    assert_eq!(tag(backward, vec![1, 2]).await.unwrap(), first);
    assert_eq!(SET_RUNS.load(Ordering::SeqCst), 1);
    tag(forward, vec![2, 1]).await.unwrap();
    assert_eq!(SET_RUNS.load(Ordering::SeqCst), 2, "a Vec's order counts");
}

fn forever() -> Duration {
    Duration::MAX
}

#[idempotent(key = id, ttl = forever())]
async fn kept_forever(id: u8) -> AppResult<u8> {
    Ok(id)
}

fn seconds(n: u64) -> Duration {
    Duration::from_secs(n)
}

#[idempotent(key = id, ttl = seconds(0))]
async fn kept_never(id: u8) -> AppResult<u8> {
    Ok(id)
}

#[idempotent(key = id, ttl = seconds(30), lease = seconds(60))]
async fn lease_outlives_ttl(id: u8) -> AppResult<u8> {
    Ok(id)
}

/// Durations given as expressions the macro cannot read are checked by the
/// runtime with the rules literals (and `Duration::from_secs(30)`) are
/// checked with at compile time: an error naming the argument, never a
/// panic, and the body does not run.
#[tokio::test]
async fn duration_expressions_break_rules_with_errors_not_panics() {
    for (result, setting) in [
        (kept_forever(1).await, "ttl"),
        (kept_never(1).await, "ttl"),
        (lease_outlives_ttl(1).await, "lease"),
    ] {
        match result {
            Err(AppError::Idem(idem_core::Error::Config(error))) => {
                assert_eq!(error.setting(), setting, "{error}");
                assert!(
                    error.to_string().contains(&format!("`{setting}`")),
                    "{error}"
                );
            }
            other => panic!("expected a config error, got {other:?}"),
        }
    }
}

#[idempotent(key = key)]
async fn with_string_error(key: u8, amount: u32) -> Result<u32, String> {
    Ok(amount)
}

#[idempotent(key = key)]
async fn with_io_error(key: u8, amount: u32) -> std::io::Result<u32> {
    Ok(amount)
}

/// `String` and `std::io::Error` carry idem's own errors, so functions that
/// return them need no error type of their own.
#[tokio::test]
async fn string_and_io_errors_receive_idems_errors() {
    assert_eq!(with_string_error(1, 10).await, Ok(10));
    let reused = with_string_error(1, 11).await.unwrap_err();
    assert!(
        reused.contains("already used with different arguments"),
        "{reused}"
    );
    assert_eq!(with_io_error(1, 10).await.unwrap(), 10);
    let reused = with_io_error(1, 11).await.unwrap_err();
    assert_eq!(reused.kind(), std::io::ErrorKind::InvalidInput);
    let inner = reused.into_inner().unwrap();
    assert!(inner.downcast_ref::<idem_core::Error>().is_some());
}

static CFG_RUNS: AtomicU32 = AtomicU32::new(0);

/// A parameter compiled out by `cfg` is not fingerprinted: the function
/// compiles and keys by the rest.
#[idempotent]
async fn configured(id: u32, #[cfg(any())] trace: String) -> AppResult<u32> {
    Ok(CFG_RUNS.fetch_add(1, Ordering::SeqCst) + id)
}

#[tokio::test]
async fn parameters_compiled_out_are_not_fingerprinted() {
    assert_eq!(configured(5).await.unwrap(), 5);
    assert_eq!(configured(5).await.unwrap(), 5);
    assert_eq!(CFG_RUNS.load(Ordering::SeqCst), 1);
}
