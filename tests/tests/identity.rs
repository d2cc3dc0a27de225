//! What makes two calls "the same": the default operation name tells every
//! function instance apart (the `Self` type and the generic arguments), a
//! record is never decoded as another type, a name pinned by two functions
//! is refused, and a call that re-enters its own key fails at once. Every
//! case runs on the memory store and on a Redis node.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use idem_core::{Error, Fingerprint, Idempotency, Key, Settings, idempotent};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A fresh key value per test run, so that runs against a shared Redis never
/// meet.
fn fresh(label: &str) -> String {
    format!("{label}-{}", rand_suffix())
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    hasher.finish()
}

// --- a generic fn deduplicated by content --------------------------------

trait Event: Serialize {
    const NAME: &'static str;
}

#[derive(Serialize)]
struct OrderShipped {
    order_id: u64,
}

#[derive(Serialize)]
struct OrderCancelled {
    order_id: u64,
}

impl Event for OrderShipped {
    const NAME: &'static str = "OrderShipped";
}

impl Event for OrderCancelled {
    const NAME: &'static str = "OrderCancelled";
}

#[idempotent(store = idem, skip(idem, published))]
async fn publish<E: Event>(
    idem: &Idempotency,
    published: &AtomicU32,
    event: E,
) -> Result<String, Error> {
    let _ = &event;
    published.fetch_add(1, Ordering::SeqCst);
    Ok(E::NAME.to_owned())
}

async fn generic_fns_by_content_are_told_apart(idem: &Idempotency) {
    let published = AtomicU32::new(0);
    let order_id = rand_suffix();
    let shipped = publish(idem, &published, OrderShipped { order_id }).await;
    let cancelled = publish(idem, &published, OrderCancelled { order_id }).await;
    assert_eq!(shipped.unwrap(), "OrderShipped");
    assert_eq!(
        cancelled.unwrap(),
        "OrderCancelled",
        "the cancellation is published"
    );
    assert_eq!(published.load(Ordering::SeqCst), 2);
    // Each instance still deduplicates its own retries.
    let again = publish(idem, &published, OrderShipped { order_id }).await;
    assert_eq!(again.unwrap(), "OrderShipped");
    assert_eq!(published.load(Ordering::SeqCst), 2);
}

/// Pinned to one name, the instances share it: the argument's type is part
/// of the fingerprint (and so of a content key), so a cancellation is still
/// not taken for a shipment.
#[idempotent(name = "tests.identity.publish_pinned", store = idem, skip(idem, published))]
async fn publish_pinned<E: Event>(
    idem: &Idempotency,
    published: &AtomicU32,
    event: E,
) -> Result<String, Error> {
    let _ = &event;
    published.fetch_add(1, Ordering::SeqCst);
    Ok(E::NAME.to_owned())
}

async fn pinned_generic_fns_by_content_are_told_apart(idem: &Idempotency) {
    let published = AtomicU32::new(0);
    let order_id = rand_suffix();
    let shipped = publish_pinned(idem, &published, OrderShipped { order_id }).await;
    let cancelled = publish_pinned(idem, &published, OrderCancelled { order_id }).await;
    assert_eq!(shipped.unwrap(), "OrderShipped");
    assert_eq!(cancelled.unwrap(), "OrderCancelled");
    assert_eq!(published.load(Ordering::SeqCst), 2);
}

// --- a generic fn with a key ------------------------------------------------

#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
struct Invoice {
    invoice_no: u64,
    lines: Vec<String>,
}

#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
struct Refund {
    invoice_no: u64,
    lines: Vec<String>,
}

trait Document: Default + Serialize + DeserializeOwned {
    fn numbered(no: u64) -> Self;
}

impl Document for Invoice {
    fn numbered(no: u64) -> Self {
        Self {
            invoice_no: no,
            lines: vec!["invoice".into()],
        }
    }
}

impl Document for Refund {
    fn numbered(no: u64) -> Self {
        Self {
            invoice_no: no,
            lines: vec!["refund".into()],
        }
    }
}

#[idempotent(key = id, store = idem, skip(idem, created))]
async fn create<T: Document>(
    idem: &Idempotency,
    created: &AtomicU32,
    id: &str,
) -> Result<T, Error> {
    created.fetch_add(1, Ordering::SeqCst);
    Ok(T::numbered(7))
}

async fn generic_fns_with_a_key_are_told_apart(idem: &Idempotency) {
    let created = AtomicU32::new(0);
    let id = fresh("create");
    let invoice: Invoice = create(idem, &created, &id).await.unwrap();
    let refund: Refund = create(idem, &created, &id).await.unwrap();
    assert_eq!(invoice, Invoice::numbered(7));
    assert_eq!(
        refund,
        Refund::numbered(7),
        "not the invoice decoded as a refund"
    );
    assert_eq!(created.load(Ordering::SeqCst), 2);
}

// --- methods of a generic impl ----------------------------------------------

trait Channel {
    const NAME: &'static str;
}

#[derive(Serialize)]
struct Email;
#[derive(Serialize)]
struct Sms;

impl Channel for Email {
    const NAME: &'static str = "email";
}

impl Channel for Sms {
    const NAME: &'static str = "sms";
}

struct Notifier<C> {
    idem: Idempotency,
    sent: AtomicU32,
    channel: PhantomData<C>,
}

impl<C: Channel> Notifier<C> {
    fn new(idem: &Idempotency) -> Self {
        Self {
            idem: idem.clone(),
            sent: AtomicU32::new(0),
            channel: PhantomData,
        }
    }

    #[idempotent(key = order, store = self.idem)]
    async fn notify(&self, order: &str) -> Result<String, Error> {
        self.sent.fetch_add(1, Ordering::SeqCst);
        Ok(format!("{} for {order}", C::NAME))
    }

    /// An associated fn that names neither `self` nor `Self`: still told
    /// apart by the impl's generic argument.
    #[idempotent(key = order, store = idem, skip(idem, sent))]
    async fn announce(idem: &Idempotency, sent: &AtomicU32, order: &str) -> Result<String, Error> {
        sent.fetch_add(1, Ordering::SeqCst);
        Ok(format!("{} announces {order}", C::NAME))
    }
}

async fn methods_of_a_generic_impl_are_told_apart(idem: &Idempotency) {
    let order = fresh("notify");
    let (email, sms) = (Notifier::<Email>::new(idem), Notifier::<Sms>::new(idem));
    assert_eq!(
        email.notify(&order).await.unwrap(),
        format!("email for {order}")
    );
    assert_eq!(
        sms.notify(&order).await.unwrap(),
        format!("sms for {order}")
    );
    assert_eq!(
        email.notify(&order).await.unwrap(),
        format!("email for {order}")
    );
    assert_eq!(email.sent.load(Ordering::SeqCst), 1);
    assert_eq!(sms.sent.load(Ordering::SeqCst), 1, "the SMS is sent");

    let sent = AtomicU32::new(0);
    let by_email = Notifier::<Email>::announce(idem, &sent, &order).await;
    let by_sms = Notifier::<Sms>::announce(idem, &sent, &order).await;
    assert_eq!(by_email.unwrap(), format!("email announces {order}"));
    assert_eq!(by_sms.unwrap(), format!("sms announces {order}"));
    assert_eq!(sent.load(Ordering::SeqCst), 2);
}

// --- a generic impl's method pinned to one name ------------------------------

/// A publisher per event type, its method pinned to one name: every
/// instance shares the operation, and the attribute cannot see the impl's
/// `E`, so under a pinned name every argument is fingerprinted with its
/// type.
struct Publisher<E> {
    idem: Idempotency,
    published: AtomicU32,
    event: PhantomData<E>,
}

impl<E: Event + Send + Sync> Publisher<E> {
    fn new(idem: &Idempotency) -> Self {
        Self {
            idem: idem.clone(),
            published: AtomicU32::new(0),
            event: PhantomData,
        }
    }

    #[idempotent(name = "tests.identity.publisher", store = self.idem)]
    async fn publish(&self, event: E) -> Result<String, Error> {
        let _ = &event;
        self.published.fetch_add(1, Ordering::SeqCst);
        Ok(E::NAME.to_owned())
    }

    #[idempotent(name = "tests.identity.publisher_keyed", key = id, store = self.idem)]
    async fn publish_keyed(&self, id: &str, event: E) -> Result<String, Error> {
        let _ = &event;
        self.published.fetch_add(1, Ordering::SeqCst);
        Ok(E::NAME.to_owned())
    }
}

async fn instances_pinned_to_one_name_tell_argument_types_apart(idem: &Idempotency) {
    let order_id = rand_suffix();
    let (shipped, cancelled) = (
        Publisher::<OrderShipped>::new(idem),
        Publisher::<OrderCancelled>::new(idem),
    );
    let first = shipped.publish(OrderShipped { order_id }).await;
    let second = cancelled.publish(OrderCancelled { order_id }).await;
    assert_eq!(first.unwrap(), "OrderShipped");
    assert_eq!(second.unwrap(), "OrderCancelled", "not the shipment's");
    assert_eq!(cancelled.published.load(Ordering::SeqCst), 1);
    let again = shipped.publish(OrderShipped { order_id }).await;
    assert_eq!(again.unwrap(), "OrderShipped");
    assert_eq!(shipped.published.load(Ordering::SeqCst), 1, "replayed");

    // With a key: the same key and an equal-looking event of the other
    // type is the key reused, not a replay.
    let id = fresh("pinned-keyed");
    let first = shipped.publish_keyed(&id, OrderShipped { order_id }).await;
    assert_eq!(first.unwrap(), "OrderShipped");
    let reused = cancelled
        .publish_keyed(&id, OrderCancelled { order_id })
        .await;
    assert!(matches!(reused, Err(Error::KeyReused)), "{reused:?}");
}

// --- a pinned fn with an `impl Trait` argument --------------------------------

trait Gateway: Sync {
    fn fee(&self) -> u64;
}

struct LiveGateway;
struct SandboxGateway;

impl Gateway for LiveGateway {
    fn fee(&self) -> u64 {
        1
    }
}

impl Gateway for SandboxGateway {
    fn fee(&self) -> u64 {
        2
    }
}

#[idempotent(name = "tests.identity.settle", key = id, store = idem, skip(idem, gateway))]
async fn settle(
    idem: &Idempotency,
    gateway: &impl Gateway,
    id: &str,
    amount: u64,
) -> Result<u64, Error> {
    Ok(amount + gateway.fee())
}

/// An `impl Trait` argument is a type parameter of the fn's own: skipped,
/// it leaves a pinned fn's calls what `run` with its key and its other
/// arguments makes, whichever type is passed (a handle, a client).
async fn a_pinned_fn_with_a_skipped_impl_trait_argument_is_one_operation(idem: &Idempotency) {
    let id = fresh("impl-trait");
    assert_eq!(settle(idem, &LiveGateway, &id, 5).await.unwrap(), 6);
    let other_gateway = settle(idem, &SandboxGateway, &id, 5).await;
    assert_eq!(other_gateway.unwrap(), 6, "replays for another gateway");
    let key = Key::new("tests.identity.settle", &id.as_str()).unwrap();
    let fingerprint = Fingerprint::of(&(&id.as_str(), &5_u64)).unwrap();
    let replayed = idem
        .run(&Settings::default(), key, fingerprint, async {
            Ok::<u64, Error>(0)
        })
        .await;
    assert_eq!(replayed.unwrap(), 6, "run replays the attribute's call");
}

// --- a pinned fn and `Idempotency::run` ---------------------------------------

struct Payments {
    idem: Idempotency,
    charged: AtomicU32,
}

impl Payments {
    #[idempotent(name = "tests.identity.charge", key = id, scope = customer, store = self.idem, skip(customer))]
    async fn charge(&self, customer: &str, id: &str, amount: u64) -> Result<u64, Error> {
        self.charged.fetch_add(1, Ordering::SeqCst);
        Ok(amount)
    }
}

/// A pinned fn's key and fingerprint are `Key::scoped(name, scope, key)` and
/// `Fingerprint::of` its fingerprinted arguments: a call through `run` with
/// them is the same call, both ways.
async fn a_pinned_fn_is_the_same_call_as_run_with_its_key(idem: &Idempotency) {
    let payments = Payments {
        idem: idem.clone(),
        charged: AtomicU32::new(0),
    };
    let (customer, id) = ("cus_1", fresh("pinned-as-run"));
    assert_eq!(payments.charge(customer, &id, 500).await.unwrap(), 500);
    let key = Key::scoped("tests.identity.charge", &customer, &id.as_str()).unwrap();
    let fingerprint = Fingerprint::of(&(&id.as_str(), &500_u64)).unwrap();
    let replayed = idem
        .run(&Settings::default(), key, fingerprint, async {
            Ok::<u64, Error>(0)
        })
        .await;
    assert_eq!(replayed.unwrap(), 500, "run replays the attribute's call");
    let other = Fingerprint::of(&(&id.as_str(), &600_u64)).unwrap();
    let reused = idem
        .run(&Settings::default(), key, other, async {
            Ok::<u64, Error>(0)
        })
        .await;
    assert!(matches!(reused, Err(Error::KeyReused)), "{reused:?}");

    let id = fresh("run-as-pinned");
    let key = Key::scoped("tests.identity.charge", &customer, &id.as_str()).unwrap();
    let fingerprint = Fingerprint::of(&(&id.as_str(), &700_u64)).unwrap();
    let ran = idem
        .run(&Settings::default(), key, fingerprint, async {
            Ok::<u64, Error>(7)
        })
        .await;
    assert_eq!(ran.unwrap(), 7);
    assert_eq!(payments.charge(customer, &id, 700).await.unwrap(), 7);
    assert_eq!(payments.charged.load(Ordering::SeqCst), 1);
}

// --- pinned instances of generic impls the attribute cannot see --------------

trait Channeled<C> {
    async fn deliver(&self, order: &str, channel: C) -> Result<String, Error>;
}

/// One service implementing a generic trait for two channels, its method
/// pinned to one name: the impl's `C` is in the trait, not in `Self`.
struct Courier {
    idem: Idempotency,
    delivered: AtomicU32,
}

impl<C: Channel + Serialize + Send + Sync> Channeled<C> for Courier {
    #[idempotent(name = "tests.identity.deliver", key = order, store = self.idem)]
    async fn deliver(&self, order: &str, channel: C) -> Result<String, Error> {
        let _ = &channel;
        self.delivered.fetch_add(1, Ordering::SeqCst);
        Ok(C::NAME.to_owned())
    }
}

impl<C: Channel> Notifier<C> {
    /// Pinned, its arguments unchecked: the instance is checked all the
    /// same.
    #[idempotent(name = "tests.identity.remind", key = order, store = idem, skip(idem), fingerprint = false)]
    async fn remind(idem: &Idempotency, order: &str, note: &str) -> Result<String, Error> {
        let _ = note;
        Ok(format!("{} reminds {order}", C::NAME))
    }

    /// The same operation, for callers that do not wait.
    #[idempotent(name = "tests.identity.remind", key = order, store = idem, skip(idem), fingerprint = false, on_conflict = reject)]
    async fn remind_now(idem: &Idempotency, order: &str, note: &str) -> Result<String, Error> {
        let _ = note;
        Ok(format!("{} reminds {order} now", C::NAME))
    }

    /// An associated fn, no `self`, pinned to one name in a generic impl.
    #[idempotent(name = "tests.identity.broadcast", key = order, store = idem, skip(idem, sent))]
    async fn broadcast(idem: &Idempotency, sent: &AtomicU32, order: &str) -> Result<String, Error> {
        sent.fetch_add(1, Ordering::SeqCst);
        Ok(format!("{} broadcasts {order}", C::NAME))
    }
}

/// A service whose type has a lifetime and nothing else generic: its pinned
/// method is the same call as `run` with `Key::new` and `Fingerprint::of`.
struct Borrowed<'a> {
    idem: &'a Idempotency,
}

impl<'a> Borrowed<'a> {
    #[idempotent(name = "tests.identity.borrowed", key = id, store = self.idem)]
    async fn go(&self, id: &'a str, n: u8) -> Result<u8, Error> {
        Ok(n)
    }
}

async fn pinned_instances_of_generic_impls_are_told_apart(idem: &Idempotency) {
    let courier = Courier {
        idem: idem.clone(),
        delivered: AtomicU32::new(0),
    };
    let order = fresh("deliver");
    let by_email = <Courier as Channeled<Email>>::deliver(&courier, &order, Email).await;
    assert_eq!(by_email.unwrap(), "email");
    let by_sms = <Courier as Channeled<Sms>>::deliver(&courier, &order, Sms).await;
    assert!(matches!(by_sms, Err(Error::KeyReused)), "{by_sms:?}");
    let again = <Courier as Channeled<Email>>::deliver(&courier, &order, Email).await;
    assert_eq!(again.unwrap(), "email");
    assert_eq!(courier.delivered.load(Ordering::SeqCst), 1);

    let sent = AtomicU32::new(0);
    let order = fresh("broadcast");
    let by_email = Notifier::<Email>::broadcast(idem, &sent, &order).await;
    assert_eq!(by_email.unwrap(), format!("email broadcasts {order}"));
    let by_sms = Notifier::<Sms>::broadcast(idem, &sent, &order).await;
    assert!(matches!(by_sms, Err(Error::KeyReused)), "{by_sms:?}");
    assert_eq!(sent.load(Ordering::SeqCst), 1);

    // `fingerprint = false`: other arguments replay, another instance never.
    let order = fresh("remind");
    let by_email = Notifier::<Email>::remind(idem, &order, "first").await;
    assert_eq!(by_email.unwrap(), format!("email reminds {order}"));
    let again = Notifier::<Email>::remind(idem, &order, "second").await;
    assert_eq!(again.unwrap(), format!("email reminds {order}"));
    let by_sms = Notifier::<Sms>::remind(idem, &order, "first").await;
    assert!(matches!(by_sms, Err(Error::KeyReused)), "{by_sms:?}");
    // A second fn of the impl pinned to that name shares its records.
    let now = Notifier::<Email>::remind_now(idem, &order, "third").await;
    assert_eq!(now.unwrap(), format!("email reminds {order}"));
    let now_by_sms = Notifier::<Sms>::remind_now(idem, &order, "first").await;
    assert!(
        matches!(now_by_sms, Err(Error::KeyReused)),
        "{now_by_sms:?}"
    );

    let id = fresh("borrowed");
    assert_eq!(Borrowed { idem }.go(&id, 3).await.unwrap(), 3);
    let key = Key::new("tests.identity.borrowed", &id.as_str()).unwrap();
    let fingerprint = Fingerprint::of(&(&id.as_str(), &3_u8)).unwrap();
    let replayed = idem
        .run(&Settings::default(), key, fingerprint, async {
            Ok::<u8, Error>(0)
        })
        .await;
    assert_eq!(replayed.unwrap(), 3, "the same call as `run`'s");
}

// --- trait default methods ----------------------------------------------------

trait Ledger {
    const KIND: &'static str;
    fn idem(&self) -> &Idempotency;
    fn recorded(&self) -> &AtomicU32;

    #[idempotent(key = (entry, amount), store = self.idem())]
    async fn record(&self, entry: &str, amount: u64) -> Result<String, Error> {
        self.recorded().fetch_add(1, Ordering::SeqCst);
        Ok(format!("{} {amount}", Self::KIND))
    }
}

struct CashLedger(Idempotency, AtomicU32);
struct CardLedger(Idempotency, AtomicU32);

impl Ledger for CashLedger {
    const KIND: &'static str = "cash";
    fn idem(&self) -> &Idempotency {
        &self.0
    }
    fn recorded(&self) -> &AtomicU32 {
        &self.1
    }
}

impl Ledger for CardLedger {
    const KIND: &'static str = "card";
    fn idem(&self) -> &Idempotency {
        &self.0
    }
    fn recorded(&self) -> &AtomicU32 {
        &self.1
    }
}

async fn trait_default_methods_are_told_apart_by_implementor(idem: &Idempotency) {
    let entry = fresh("ledger");
    let cash = CashLedger(idem.clone(), AtomicU32::new(0));
    let card = CardLedger(idem.clone(), AtomicU32::new(0));
    assert_eq!(cash.record(&entry, 5).await.unwrap(), "cash 5");
    assert_eq!(card.record(&entry, 5).await.unwrap(), "card 5");
    assert_eq!(card.record(&entry, 5).await.unwrap(), "card 5");
    assert_eq!(cash.1.load(Ordering::SeqCst), 1);
    assert_eq!(card.1.load(Ordering::SeqCst), 1);
}

// --- a pinned generic: one name, records checked by type ----------------------

#[idempotent(key = id, name = "tests.identity.pinned_document", store = idem, skip(idem, created))]
async fn pinned_document<T: Document>(
    idem: &Idempotency,
    created: &AtomicU32,
    id: &str,
) -> Result<T, Error> {
    created.fetch_add(1, Ordering::SeqCst);
    Ok(T::numbered(9))
}

async fn a_record_is_never_decoded_as_another_type(idem: &Idempotency) {
    // Pinned on purpose: every instance of `pinned_document` shares one
    // name, so an invoice's record is under the refund's key. It is
    // refused, never returned as a `Refund`.
    let created = AtomicU32::new(0);
    let id = fresh("pinned");
    let invoice: Invoice = pinned_document(idem, &created, &id).await.unwrap();
    assert_eq!(invoice, Invoice::numbered(9));
    let refund: Result<Refund, Error> = pinned_document(idem, &created, &id).await;
    match refund {
        Err(Error::Decode(reason)) => {
            let reason = reason.to_string();
            assert!(reason.contains("another result type"), "{reason}");
            assert!(reason.contains("Refund"), "{reason}");
        }
        other => panic!("expected a refused record, got {other:?}"),
    }
    assert_eq!(created.load(Ordering::SeqCst), 1, "the refund did not run");

    // The plain API: one key, two result types.
    let settings = Settings::default();
    let key = Key::new("tests.identity.plain", &fresh("plain")).unwrap();
    let fingerprint = Fingerprint::of(&()).unwrap();
    let first: Result<u32, Error> = idem.run(&settings, key, fingerprint, async { Ok(5) }).await;
    assert_eq!(first.unwrap(), 5);
    let second: Result<String, Error> = idem
        .run(&settings, key, fingerprint, async { Ok("x".to_owned()) })
        .await;
    assert!(matches!(second, Err(Error::Decode(_))), "{second:?}");
}

// --- a name pinned by two functions --------------------------------------------

#[idempotent(key = id, name = "tests.identity.pinned_twice", store = idem, skip(idem))]
async fn pinned_first(idem: &Idempotency, id: &str) -> Result<u32, Error> {
    Ok(1)
}

#[idempotent(key = id, name = "tests.identity.pinned_twice", store = idem, skip(idem))]
async fn pinned_second(idem: &Idempotency, id: &str) -> Result<u32, Error> {
    Ok(2)
}

#[tokio::test(flavor = "current_thread")]
async fn a_name_pinned_by_two_functions_is_reported_and_shared() {
    let warnings = idem_test::logs::capture();
    let idem = Idempotency::memory();
    let id = fresh("twice");
    assert_eq!(pinned_first(&idem, &id).await.unwrap(), 1);
    // Same name, types and arguments: the second function replays the
    // first's record, and idem says once that the two share records.
    assert_eq!(pinned_second(&idem, &id).await.unwrap(), 1);
    assert_eq!(pinned_second(&idem, &fresh("twice")).await.unwrap(), 2);
    let logged = warnings.text();
    assert_eq!(logged.matches("share records").count(), 1, "{logged}");
    assert!(
        logged.contains("pinned_first") && logged.contains("pinned_second"),
        "{logged}"
    );
}

// --- re-entry ---------------------------------------------------------------

struct Ledgers {
    idem: Idempotency,
    runs: AtomicU32,
}

impl Ledgers {
    #[idempotent(key = id, store = self.idem, lease = "30s")]
    async fn settle(&self, id: &str, depth: u32) -> Result<u32, Error> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        if depth > 0 {
            // The same key, from inside its own body.
            return Box::pin(self.via(id, depth - 1)).await;
        }
        Ok(0)
    }

    async fn via(&self, id: &str, depth: u32) -> Result<u32, Error> {
        self.settle(id, depth).await
    }

    #[idempotent(key = id, store = self.idem)]
    async fn outer(&self, id: &str) -> Result<u32, Error> {
        // Another key on the same handle is no re-entry.
        Box::pin(self.settle(&format!("{id}-inner"), 0)).await
    }
}

async fn a_call_that_reenters_its_key_fails_at_once(idem: &Idempotency) {
    let ledgers = Ledgers {
        idem: idem.clone(),
        runs: AtomicU32::new(0),
    };
    let id = fresh("reenter");
    let answer = tokio::time::timeout(Duration::from_secs(20), ledgers.settle(&id, 1))
        .await
        .expect("re-entry fails at once, without waiting for the lease");
    match answer {
        Err(Error::Reentered { operation }) => {
            assert!(operation.contains("Ledgers::settle"), "{operation}");
        }
        other => panic!("expected Reentered, got {other:?}"),
    }
    assert_eq!(
        ledgers.runs.load(Ordering::SeqCst),
        1,
        "the inner call ran nothing"
    );
    // The failed outer call released its key: a retry that does not re-enter runs.
    assert_eq!(ledgers.settle(&id, 0).await.unwrap(), 0);
    assert_eq!(ledgers.outer(&fresh("outer")).await.unwrap(), 0);
}

/// A call's future joins the claims of the task that first polls it, not
/// of the one that made it: made before an outer call and awaited in its
/// body, it sees the outer key (a re-entry, refused at once); made in a
/// body and awaited after that call ended, it does not (a replay).
#[tokio::test]
async fn a_future_joins_the_claims_where_it_is_awaited() {
    let idem = Idempotency::memory();
    let settings = Settings::builder()
        .wait_timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let (outer, inner) = (
        Key::new("tests.identity.outer", &fresh("made-before")).unwrap(),
        Key::new("tests.identity.inner", &fresh("made-before")).unwrap(),
    );
    let fp = Fingerprint::of(&1).unwrap();
    let made_before = idem.run(&settings, inner, fp, async {
        idem.run(&settings, outer, fp, async { Ok::<u64, Error>(7) })
            .await
    });
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        idem.run(&settings, outer, fp, made_before),
    )
    .await
    .expect("refused at once, not after the wait");
    assert!(matches!(answer, Err(Error::Reentered { .. })), "{answer:?}");

    let (outer, inner) = (
        Key::new("tests.identity.outer", &fresh("awaited-after")).unwrap(),
        Key::new("tests.identity.inner", &fresh("awaited-after")).unwrap(),
    );
    let later = std::sync::Mutex::new(None);
    let first = idem
        .run(&settings, outer, fp, async {
            *later.lock().unwrap() = Some(idem.run(&settings, inner, fp, async {
                idem.run(&settings, outer, fp, async { Ok::<u64, Error>(99) })
                    .await
            }));
            Ok::<u64, Error>(5)
        })
        .await
        .unwrap();
    let later = later.lock().unwrap().take().unwrap();
    assert_eq!(
        (first, later.await.unwrap()),
        (5, 5),
        "the outer call replays"
    );
}

// --- one name in two blocks of one scope ----------------------------------

/// Two fns of one name in two blocks of one scope print alike
/// (`identity::two_blocks::handle`), as do two in `const _` blocks (the
/// shape derive-style macros write): the second to run is refused, with
/// the advice to pin names, instead of replaying the first's records.
async fn fns_of_one_name_in_two_blocks_are_refused(idem: &Idempotency) {
    static RUNS: AtomicU32 = AtomicU32::new(0);
    async fn two_blocks(
        idem: &Idempotency,
        id: &str,
    ) -> (Result<String, Error>, Result<String, Error>) {
        let email = {
            #[idempotent(key = id, store = idem, skip(idem))]
            async fn handle(idem: &Idempotency, id: &str) -> Result<String, Error> {
                RUNS.fetch_add(1, Ordering::SeqCst);
                Ok(format!("email {id}"))
            }
            handle(idem, id).await
        };
        let sms = {
            #[idempotent(key = id, store = idem, skip(idem))]
            async fn handle(idem: &Idempotency, id: &str) -> Result<String, Error> {
                RUNS.fetch_add(1, Ordering::SeqCst);
                Ok(format!("sms {id}"))
            }
            handle(idem, id).await
        };
        (email, sms)
    }
    let before = RUNS.load(Ordering::SeqCst);
    let id = fresh("blocks");
    let (email, sms) = two_blocks(idem, &id).await;
    assert_eq!(email.unwrap(), format!("email {id}"));
    match sms {
        Err(Error::Config(error)) => {
            assert_eq!(error.setting(), "name");
            let text = error.to_string();
            assert!(
                text.contains("::handle` by default") && text.contains("name = "),
                "{text}"
            );
        }
        other => panic!("the second fn replayed or ran: {other:?}"),
    }
    assert_eq!(RUNS.load(Ordering::SeqCst) - before, 1);
    // With names of their own, both run.
    let pinned = {
        #[idempotent(key = id, name = "identity.blocks.email", store = idem, skip(idem))]
        async fn handle(idem: &Idempotency, id: &str) -> Result<String, Error> {
            Ok(format!("email {id}"))
        }
        handle(idem, &id).await.unwrap()
    };
    let other = {
        #[idempotent(key = id, name = "identity.blocks.sms", store = idem, skip(idem))]
        async fn handle(idem: &Idempotency, id: &str) -> Result<String, Error> {
            Ok(format!("sms {id}"))
        }
        handle(idem, &id).await.unwrap()
    };
    assert_eq!(
        (pinned, other),
        (format!("email {id}"), format!("sms {id}"))
    );
}

static NOTIFIED: AtomicU32 = AtomicU32::new(0);

struct Mailer;
struct Texter;

/// One macro call writes a `notify` in a `const _` block per sender, as
/// derive-style macros do: every `notify` prints as
/// `identity::_::notify`, and all are written "at" the macro call.
macro_rules! senders {
    ($($sender:ident => $label:literal),*) => {$(
        const _: () = {
            #[idempotent(key = id, store = idem, skip(idem))]
            async fn notify(idem: &Idempotency, id: &str) -> Result<String, Error> {
                NOTIFIED.fetch_add(1, Ordering::SeqCst);
                Ok(format!("{} {id}", $label))
            }

            impl $sender {
                async fn send(&self, idem: &Idempotency, id: &str) -> Result<String, Error> {
                    notify(idem, id).await
                }
            }
        };
    )*};
}

senders!(Mailer => "email", Texter => "sms");

async fn fns_of_one_name_written_by_one_macro_call_are_refused(idem: &Idempotency) {
    let before = NOTIFIED.load(Ordering::SeqCst);
    let id = fresh("senders");
    assert_eq!(Mailer.send(idem, &id).await.unwrap(), format!("email {id}"));
    match Texter.send(idem, &id).await {
        Err(Error::Config(error)) => {
            assert_eq!(error.setting(), "name");
            assert!(error.to_string().contains("by one macro call"), "{error}");
        }
        other => panic!("the second sender replayed or ran: {other:?}"),
    }
    assert_eq!(NOTIFIED.load(Ordering::SeqCst) - before, 1);
}

// --- the runs ---------------------------------------------------------------

async fn every_case(idem: &Idempotency) {
    generic_fns_by_content_are_told_apart(idem).await;
    pinned_generic_fns_by_content_are_told_apart(idem).await;
    generic_fns_with_a_key_are_told_apart(idem).await;
    methods_of_a_generic_impl_are_told_apart(idem).await;
    instances_pinned_to_one_name_tell_argument_types_apart(idem).await;
    a_pinned_fn_is_the_same_call_as_run_with_its_key(idem).await;
    a_pinned_fn_with_a_skipped_impl_trait_argument_is_one_operation(idem).await;
    pinned_instances_of_generic_impls_are_told_apart(idem).await;
    trait_default_methods_are_told_apart_by_implementor(idem).await;
    a_record_is_never_decoded_as_another_type(idem).await;
    a_call_that_reenters_its_key_fails_at_once(idem).await;
    fns_of_one_name_in_two_blocks_are_refused(idem).await;
    fns_of_one_name_written_by_one_macro_call_are_refused(idem).await;
}

#[tokio::test]
async fn instances_are_told_apart_on_the_memory_store() {
    every_case(&Idempotency::memory()).await;
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn instances_are_told_apart_on_redis() {
    let url = idem_test::redis_server::shared_node().url();
    let store = idem_core::RedisStore::node(&url)
        .response_timeout(idem_test::redis_server::RESPONSE_TIMEOUT)
        .connect()
        .await
        .unwrap();
    every_case(&Idempotency::new(store)).await;
}

/// A stored value that does not decode as the call's type is never quoted
/// in the error or the logs: serde's message would carry it (a secret, a
/// card number).
#[tokio::test(flavor = "current_thread")]
async fn a_decode_error_never_carries_the_stored_value() {
    use idem_core::store::{Outcome, Record, Store as _, Token};
    let logs = idem_test::logs::capture();
    let store = idem_core::MemoryStore::new();
    let key = Key::new("tests.identity.decode", &fresh("decode")).unwrap();
    let fingerprint = Fingerprint::of(&()).unwrap();
    let token = Token::random();
    store
        .begin(key, fingerprint, token, Duration::from_secs(60))
        .await
        .unwrap();
    // An untagged record (as an older idem wrote), holding a string.
    let record = Record::new(Outcome::Ok, &b"\"card 4242 4242\""[..]);
    store
        .complete(key, token, record, Duration::from_secs(60))
        .await
        .unwrap();
    let idem = Idempotency::new(store);
    let answer: Result<u32, Error> = idem
        .run(&Settings::default(), key, fingerprint, async { Ok(1) })
        .await;
    let error = answer.unwrap_err();
    assert!(matches!(error, Error::Decode(_)), "{error:?}");
    // The value's text (digits alone could be a timestamp's).
    assert!(!error.to_string().contains("4242 4242"), "{error}");
    let logged = logs.text();
    assert!(logged.contains("decode"), "the outcome is logged: {logged}");
    assert!(!logged.contains("4242 4242"), "{logged}");
}
