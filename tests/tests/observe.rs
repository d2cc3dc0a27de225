//! What idem tells about each call through `tracing`: the `idem.call`
//! span's fields for every outcome and the events' levels, captured by a
//! test subscriber. (The scenarios run one after another in one test:
//! `tracing` caches which callsites are enabled process-wide, and
//! subscribers set per thread in concurrent tests can race that cache.)

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_core::store::{
    Begin, Completion, Record, Store, StoreError, StoreErrorKind, StoreFuture, Token,
};
use idem_core::{Fingerprint, Idempotency, Key, OnConflict, Settings, idempotent};
use idem_test::faults::Down;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record as SpanRecord};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt as _};
use tracing_subscriber::registry::LookupSpan;

type FieldMap = HashMap<String, String>;

/// Every `idem.call` span's fields when it closed, and every event's level
/// and fields.
#[derive(Clone, Default)]
struct Captured {
    spans: Arc<Mutex<Vec<FieldMap>>>,
    events: Arc<Mutex<Vec<(Level, FieldMap)>>>,
}

struct Fields(HashMap<String, String>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> tracing_subscriber::Layer<S> for Captured {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Fields(HashMap::new());
        attrs.record(&mut fields);
        fields
            .0
            .insert("name".into(), attrs.metadata().name().into());
        let parent = ctx.span(id).and_then(|span| span.parent());
        fields.0.insert(
            "parent".into(),
            parent
                .map(|parent| parent.name().to_owned())
                .unwrap_or_default(),
        );
        ctx.span(id).unwrap().extensions_mut().insert(fields);
    }

    fn on_record(&self, id: &Id, values: &SpanRecord<'_>, ctx: Context<'_, S>) {
        let span = ctx.span(id).unwrap();
        let mut extensions = span.extensions_mut();
        values.record(extensions.get_mut::<Fields>().unwrap());
    }

    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let mut fields = Fields(HashMap::new());
        event.record(&mut fields);
        self.events
            .lock()
            .unwrap()
            .push((*event.metadata().level(), fields.0));
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let span = ctx.span(&id).unwrap();
        let fields = span.extensions_mut().remove::<Fields>().unwrap().0;
        if fields["name"] == "idem.call" {
            self.spans.lock().unwrap().push(fields);
        }
    }
}

/// Runs `script` on a current-thread runtime under the capturing subscriber.
fn traced<F: std::future::Future<Output = ()>>(script: impl FnOnce() -> F) -> Captured {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::registry().with(captured.clone());
    tracing::subscriber::with_default(subscriber, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap()
            .block_on(script());
    });
    captured
}

impl Captured {
    fn spans(&self) -> Vec<HashMap<String, String>> {
        self.spans.lock().unwrap().clone()
    }

    fn outcomes(&self) -> Vec<String> {
        self.spans()
            .iter()
            .map(|span| span["outcome"].clone())
            .collect()
    }

    /// The level of the event that told `outcome`.
    fn level_of(&self, outcome: &str) -> Level {
        self.events
            .lock()
            .unwrap()
            .iter()
            .find(|(_, fields)| fields.get("outcome").is_some_and(|o| o == outcome))
            .unwrap()
            .0
    }
}

fn key() -> Key {
    Key::new("orders.charge", &"order-17").unwrap()
}

fn args(amount: u64) -> Fingerprint {
    Fingerprint::of(&amount).unwrap()
}

async fn charge(
    idem: &Idempotency,
    settings: &Settings,
    amount: u64,
    sleep: u64,
) -> Result<u64, idem_core::Error> {
    idem.run(settings, key(), args(amount), async move {
        tokio::time::sleep(Duration::from_millis(sleep)).await;
        Ok(amount)
    })
    .await
}

fn each_outcome_is_a_span_with_safe_fields() {
    let captured = traced(|| async {
        let idem = Idempotency::memory();
        let settings = Settings::default();
        charge(&idem, &settings, 100, 20).await.unwrap(); // ran
        charge(&idem, &settings, 100, 0).await.unwrap(); // replayed
        charge(&idem, &settings, 999, 0).await.unwrap_err(); // key_reused
    });
    let spans = captured.spans();
    assert_eq!(captured.outcomes(), ["ran", "replayed", "key_reused"]);
    let ran = &spans[0];
    assert_eq!(ran["operation"], "observe::charge");
    assert_eq!(ran["key"], key().short().to_string());
    assert_eq!(ran["attempts"], "1");
    assert_eq!(ran["body_ms"], "20.0");
    assert!(!spans[1].contains_key("body_ms"), "a replay runs no body");
    let everything = format!("{spans:?} {:?}", captured.events.lock().unwrap());
    assert!(
        !everything.contains("order-17"),
        "the raw key never appears"
    );

    assert_eq!(captured.level_of("replayed"), Level::DEBUG);
    assert_eq!(captured.level_of("key_reused"), Level::INFO);
}

async fn shipped(order: u64) -> Result<u64, idem_core::Error> {
    Ok(order)
}

/// `run`'s operation is the fn its body was written in, also boxed or
/// instrumented; an `async fn`'s future passed as it is names that fn; a
/// body whose type names no fn is named by the call's file and line.
fn runs_are_named_by_their_bodies() {
    let line = std::sync::Mutex::new(0);
    let captured = traced(|| async {
        let idem = Idempotency::memory();
        let settings = Settings::default();
        let run = |n: u64| (Key::new("named", &n).unwrap(), args(n));
        let (k, f) = run(1);
        idem.run(&settings, k, f, async { Ok::<_, idem_core::Error>(1_u64) })
            .await
            .unwrap();
        let (k, f) = run(2);
        idem.run(
            &settings,
            k,
            f,
            Box::pin(async { Ok::<_, idem_core::Error>(2_u64) }),
        )
        .await
        .unwrap();
        let (k, f) = run(3);
        idem.run(
            &settings,
            k,
            f,
            tracing::Instrument::instrument(
                async { Ok::<_, idem_core::Error>(3_u64) },
                tracing::info_span!("work"),
            ),
        )
        .await
        .unwrap();
        let (k, f) = run(4);
        idem.run(&settings, k, f, shipped(4)).await.unwrap();
        let (k, f) = run(5);
        *line.lock().unwrap() = line!() + 1;
        idem.run(
            &settings,
            k,
            f,
            std::future::ready(Ok::<_, idem_core::Error>(5_u64)),
        )
        .await
        .unwrap();
    });
    let operations: Vec<String> = captured
        .spans()
        .iter()
        .map(|span| span["operation"].clone())
        .collect();
    let here = "observe::runs_are_named_by_their_bodies";
    assert_eq!(
        operations,
        [
            here.to_owned(),
            here.to_owned(),
            here.to_owned(),
            "observe::shipped".to_owned(),
            format!("{}:{}", file!(), line.lock().unwrap()),
        ]
    );
}

fn waits_rejections_and_failures_are_told_apart() {
    let captured = traced(|| async {
        let idem = Idempotency::memory();
        let settings = Settings::default();
        let reject = Settings::builder()
            .on_conflict(OnConflict::Reject)
            .build()
            .unwrap();
        // A holder, a waiter, and a caller that rejects.
        let (a, b, c) = tokio::join!(
            charge(&idem, &settings, 100, 1_000),
            async {
                tokio::time::sleep(Duration::from_millis(10)).await;
                charge(&idem, &settings, 100, 0).await
            },
            async {
                tokio::time::sleep(Duration::from_millis(10)).await;
                charge(&idem, &reject, 100, 0).await
            }
        );
        a.unwrap();
        b.unwrap();
        c.unwrap_err();
        // A body that fails.
        let failing = Key::new("orders.refund", &1).unwrap();
        let _ = idem
            .run(&settings, failing, args(1), async {
                Err::<u64, _>(idem_core::Error::AttemptFailed)
            })
            .await;
    });
    let spans = captured.spans();
    let by_outcome: HashMap<_, _> = spans
        .iter()
        .map(|span| (span["outcome"].as_str(), span))
        .collect();
    assert_eq!(by_outcome.len(), 4, "{:?}", captured.outcomes());
    let waited = by_outcome["waited"];
    assert_eq!(
        waited["attempts"], "0",
        "it waited on the holder in this process"
    );
    let wait_ms: f64 = waited["wait_ms"].parse().unwrap();
    assert!((980.0..=1000.0).contains(&wait_ms), "{wait_ms}");
    assert!(by_outcome.contains_key("in_progress"));
    assert!(by_outcome.contains_key("failed"));
    assert_eq!(by_outcome["ran"]["body_ms"], "1000.0");
}

#[idempotent(key = order, name = "orders.ship", store = IDEM)]
async fn ship(order: u64) -> Result<String, idem_core::Error> {
    Ok(format!("shipped {order}"))
}

static IDEM: std::sync::LazyLock<Idempotency> = std::sync::LazyLock::new(Idempotency::memory);

/// A store whose every record reads as corrupt (as a Redis key of another
/// type, or an envelope that does not parse, does).
struct Garbled;

impl Store for Garbled {
    fn begin(&self, _: Key, _: Fingerprint, _: Token, _: Duration) -> StoreFuture<'_, Begin> {
        Box::pin(std::future::ready(Err(StoreError::new(
            StoreErrorKind::Corrupt,
            "a record that does not parse",
        ))))
    }
    fn complete(&self, _: Key, _: Token, _: Record, _: Duration) -> StoreFuture<'_, Completion> {
        Box::pin(std::future::ready(Ok(Completion::Lost)))
    }
    fn release(&self, _: Key, _: Token) -> StoreFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }
    fn renew(&self, _: Key, _: Token, _: Duration) -> StoreFuture<'_, bool> {
        Box::pin(std::future::ready(Ok(false)))
    }
}

fn store_and_decode_errors_warn_and_the_attribute_names_its_operation() {
    let captured = traced(|| async {
        let down = Idempotency::new(Down);
        charge(&down, &Settings::default(), 1, 0).await.unwrap_err();
        let idem = Idempotency::memory();
        charge(&idem, &Settings::default(), 100, 0).await.unwrap();
        let as_text: Result<String, idem_core::Error> = idem
            .run(&Settings::default(), key(), args(100), async {
                Ok("never".to_owned())
            })
            .await;
        as_text.unwrap_err();
        ship(7).await.unwrap();
        // A record the store cannot read is a record that cannot be
        // replayed, not a store that cannot be reached.
        let garbled = Idempotency::new(Garbled);
        let error = charge(&garbled, &Settings::default(), 1, 0)
            .await
            .unwrap_err();
        assert_eq!(error.http_status(), 500);
    });
    assert_eq!(
        captured.outcomes(),
        ["store_error", "ran", "decode_error", "ran", "decode_error"]
    );
    assert_eq!(captured.spans()[3]["operation"], "orders.ship");
    // What failed is in the span, for the outcomes an operator acts on.
    let errors: Vec<_> = captured
        .spans()
        .iter()
        .map(|span| span.get("error").cloned().unwrap_or_default())
        .collect();
    assert!(
        errors[0].contains("connection refused to 10.0.0.9:6379"),
        "{errors:?}"
    );
    assert!(errors[1].is_empty() && errors[3].is_empty(), "{errors:?}");
    assert!(!errors[2].is_empty() && !errors[4].is_empty(), "{errors:?}");
    assert_eq!(captured.level_of("store_error"), Level::WARN);
    assert_eq!(captured.level_of("decode_error"), Level::ERROR);
    let levels: Vec<_> = captured
        .events
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, fields)| fields.get("outcome").map(String::as_str) == Some("decode_error"))
        .map(|(level, _)| *level)
        .collect();
    assert_eq!(levels, [Level::ERROR, Level::ERROR]);
}

/// An argument that does not serialize.
struct Unserializable;

impl serde::Serialize for Unserializable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("no"))
    }
}

#[idempotent(key = order, name = "orders.note", store = IDEM)]
async fn note(order: u64, text: Unserializable) -> Result<u64, idem_core::Error> {
    let _ = text;
    Ok(order)
}

/// A call refused before it has a key (its arguments do not serialize) is
/// told as `config_error`, at `ERROR`, in an `idem.call` span of its
/// operation that has no key.
fn calls_refused_before_their_key_are_config_errors() {
    let captured = traced(|| async {
        note(7, Unserializable).await.unwrap_err();
    });
    assert_eq!(captured.outcomes(), ["config_error"]);
    assert_eq!(captured.spans()[0]["operation"], "orders.note");
    assert!(
        captured.spans()[0]["error"].contains("serialize"),
        "the rule broken: {:?}",
        captured.spans()
    );
    assert!(
        !captured.spans()[0].contains_key("key"),
        "{:?}",
        captured.spans()
    );
    assert_eq!(captured.level_of("config_error"), Level::ERROR);
}

/// A message whose dead letter is always refused.
#[cfg(feature = "consumer")]
struct Undeliverable(u32);

#[cfg(feature = "consumer")]
impl idem_core::consumer::Message for Undeliverable {
    fn delivery(&self) -> Result<idem_core::consumer::Delivery, String> {
        Ok(
            idem_core::consumer::Delivery::new("order-7", bytes::Bytes::from_static(b"{}"))
                .deliveries(self.0),
        )
    }
    async fn ack(&self) -> Result<(), idem_core::consumer::AckError> {
        Ok(())
    }
    async fn nak(&self, _: Duration) -> Result<(), idem_core::consumer::AckError> {
        Ok(())
    }
    async fn dead_letter(&self, _: &str) -> Result<(), idem_core::consumer::AckError> {
        Err("no stream captures the dead-letter subject".into())
    }
    async fn terminate(&self) -> Result<(), idem_core::consumer::AckError> {
        Ok(())
    }
    async fn in_progress(&self) -> Result<(), idem_core::consumer::AckError> {
        Ok(())
    }
}

/// A message dead-lettered, and then terminated without its dead letter,
/// is named in each error event by its key, as its call's span names it,
/// and its reason is one escaped line.
#[cfg(feature = "consumer")]
fn dead_letters_that_fail_name_their_message() {
    let captured = traced(|| async {
        let consumer = idem_core::consumer::Consumer::new(Idempotency::memory(), "orders")
            .max_deliveries(1)
            .dead_letter_attempts(1);
        let failing = |_| async { Err::<(), _>("cannot parse\nthe payload") };
        consumer.handle(&Undeliverable(1), failing).await.unwrap();
    });
    let key = Key::new("orders", "order-7").unwrap().to_string();
    let events = captured.events.lock().unwrap().clone();
    for message in [
        "idem: dead-lettering a message",
        "idem: could not publish a dead letter on its last attempt; terminating the message without one",
    ] {
        let (level, fields) = events
            .iter()
            .find(|(_, fields)| fields.get("message").is_some_and(|m| m == message))
            .unwrap_or_else(|| panic!("no event {message:?} in {events:?}"));
        assert_eq!(*level, Level::ERROR);
        assert_eq!(fields.get("key"), Some(&key), "{fields:?}");
        // The handler's text, as one escaped line.
        assert!(
            fields
                .get("reason")
                .is_some_and(|reason| reason.contains("cannot parse\\nthe payload")),
            "{fields:?}"
        );
    }
}

/// A memory store whose `complete` never answers in time.
#[cfg(feature = "consumer")]
struct Unconfirming(idem_core::MemoryStore);

#[cfg(feature = "consumer")]
impl Store for Unconfirming {
    fn begin(&self, k: Key, f: Fingerprint, t: Token, l: Duration) -> StoreFuture<'_, Begin> {
        self.0.begin(k, f, t, l)
    }
    fn complete(&self, _: Key, _: Token, _: Record, _: Duration) -> StoreFuture<'_, Completion> {
        Box::pin(std::future::ready(Err(StoreError::new(
            StoreErrorKind::Timeout,
            "no answer within 1 s",
        ))))
    }
    fn release(&self, k: Key, t: Token) -> StoreFuture<'_, ()> {
        self.0.release(k, t)
    }
    fn renew(&self, k: Key, t: Token, l: Duration) -> StoreFuture<'_, bool> {
        self.0.renew(k, t, l)
    }
}

/// A message whose handler ran but whose outcome the store never confirmed
/// (the consumer naks it) is `not_stored`, not `ran`.
#[cfg(feature = "consumer")]
fn a_message_whose_outcome_was_not_confirmed_is_not_stored() {
    let captured = traced(|| async {
        let settings = Settings::builder()
            .lease(Duration::from_secs(3))
            .build()
            .unwrap();
        let idem = Idempotency::new(Unconfirming(idem_core::MemoryStore::new()));
        let consumer = idem_core::consumer::Consumer::new(idem, "orders")
            .settings(settings)
            .heartbeat(None);
        let outcome = consumer
            .handle(&Undeliverable(1), |_| async { Ok::<_, String>(7) })
            .await
            .unwrap();
        assert!(
            matches!(
                outcome.disposition,
                idem_core::consumer::Disposition::Nak { .. }
            ),
            "{outcome:?}"
        );
    });
    assert_eq!(
        captured.outcomes(),
        ["not_stored"],
        "{:?}",
        captured.spans()
    );
}

#[test]
fn spans_and_events_tell_each_outcome() {
    each_outcome_is_a_span_with_safe_fields();
    runs_are_named_by_their_bodies();
    waits_rejections_and_failures_are_told_apart();
    store_and_decode_errors_warn_and_the_attribute_names_its_operation();
    calls_refused_before_their_key_are_config_errors();
    #[cfg(feature = "consumer")]
    dead_letters_that_fail_name_their_message();
    #[cfg(feature = "consumer")]
    a_message_whose_outcome_was_not_confirmed_is_not_stored();
    #[cfg(feature = "axum")]
    only_internal_http_errors_are_logged_again_at_error();
}

/// An idem error answered over HTTP (axum's `IntoResponse`) is logged again
/// at `ERROR` only when it is internal (a misconfigured store, a step named
/// twice: the body's own error, which its call tells at `DEBUG`); a store
/// that is down was told at `WARN` by its call already.
#[cfg(feature = "axum")]
fn only_internal_http_errors_are_logged_again_at_error() {
    use axum::response::IntoResponse as _;
    let captured = traced(|| async {
        let internal = idem_core::Error::Store(StoreError::new(StoreErrorKind::Config, "no table"));
        assert_eq!(internal.into_response().status(), 500);
        let down = idem_core::Error::Store(StoreError::new(StoreErrorKind::Unavailable, "refused"));
        assert_eq!(down.into_response().status(), 503);
    });
    let events = captured.events.lock().unwrap().clone();
    let told: Vec<(Level, String)> = events
        .iter()
        .filter(|(_, fields)| {
            fields
                .get("message")
                .is_some_and(|m| m == "an idempotent request failed")
        })
        .map(|(level, fields)| (*level, fields["error"].clone()))
        .collect();
    assert_eq!(told.len(), 2, "{told:?}");
    assert_eq!(told[0].0, Level::ERROR, "{told:?}");
    assert!(told[0].1.contains("no table"), "{told:?}");
    assert_eq!(told[1].0, Level::DEBUG, "{told:?}");
}

/// The HTTP layer runs each call on a task of its own (so that a client
/// hanging up does not cancel it); the call's span stays inside the
/// request's span all the same, where a trace layer or an operator looks.
#[cfg(feature = "http")]
#[test]
fn the_layers_call_span_is_inside_the_requests() {
    use tower_layer::Layer as _;
    use tower_service::Service as _;
    use tracing::Instrument as _;

    let captured = traced(|| async {
        let app = axum::Router::new().route("/orders", axum::routing::post(|| async { "made" }));
        let mut service =
            idem_core::http::IdempotencyLayer::unscoped(Idempotency::memory()).layer(app);
        let request = axum::http::Request::post("/orders")
            .header("idempotency-key", "order-1")
            .body(axum::body::Body::from("{}"))
            .unwrap();
        async {
            std::future::poll_fn(|cx| {
                tower_service::Service::<axum::http::Request<axum::body::Body>>::poll_ready(
                    &mut service,
                    cx,
                )
            })
            .await
            .unwrap();
            let response = service.call(request).await.unwrap();
            assert_eq!(response.status(), 200);
        }
        .instrument(tracing::info_span!("request"))
        .await;
    });
    let spans = captured.spans();
    assert_eq!(spans.len(), 1, "{spans:?}");
    assert_eq!(spans[0]["parent"], "request");
}
