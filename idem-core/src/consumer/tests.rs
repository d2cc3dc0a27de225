//! The broker-neutral core against an in-memory broker that implements
//! [`Message`]: what an adapter for another broker looks like.

use std::collections::HashMap;
use std::sync::Mutex;

use super::*;
use crate::OnConflict;
use crate::store::{
    Begin, Completion, Record, Store, StoreError, StoreErrorKind, StoreFuture, Token,
};

/// What the broker was told about each delivery.
#[derive(Debug, Clone, PartialEq)]
enum Told {
    Ack,
    Nak(Duration),
    DeadLetter(String),
    InProgress,
    Terminate,
}

#[derive(Default)]
struct Broker {
    told: Mutex<Vec<(String, Told)>>,
    /// How many dead letters to refuse (a dead-letter target missing).
    refuse_dead_letters: std::sync::atomic::AtomicU32,
    /// Whether heartbeats never get an answer (a broker reconnecting).
    stall_heartbeats: AtomicBool,
}

impl Broker {
    fn told(&self) -> Vec<(String, Told)> {
        self.told.lock().unwrap().clone()
    }
}

/// One delivery of an in-memory broker.
struct Incoming {
    broker: Arc<Broker>,
    id: Option<&'static str>,
    payload: &'static [u8],
    deliveries: u32,
}

impl Incoming {
    fn tell(&self, told: Told) {
        let id = self.id.unwrap_or("-").to_owned();
        self.broker.told.lock().unwrap().push((id, told));
    }
}

impl Message for Incoming {
    fn delivery(&self) -> Result<Delivery, String> {
        let id = self.id.ok_or("no `Message-Id` header")?;
        Ok(Delivery::new(id, Bytes::from_static(self.payload)).deliveries(self.deliveries))
    }

    async fn ack(&self) -> Result<(), AckError> {
        self.tell(Told::Ack);
        Ok(())
    }

    async fn nak(&self, delay: Duration) -> Result<(), AckError> {
        self.tell(Told::Nak(delay));
        Ok(())
    }

    async fn dead_letter(&self, reason: &str) -> Result<(), AckError> {
        let refuse = &self.broker.refuse_dead_letters;
        if refuse
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err("no stream captures the dead-letter subject".into());
        }
        self.tell(Told::DeadLetter(reason.to_owned()));
        Ok(())
    }

    async fn terminate(&self) -> Result<(), AckError> {
        self.tell(Told::Terminate);
        Ok(())
    }

    async fn in_progress(&self) -> Result<(), AckError> {
        self.tell(Told::InProgress);
        if self.broker.stall_heartbeats.load(Ordering::Relaxed) {
            std::future::pending::<()>().await;
        }
        Ok(())
    }
}

fn message(
    broker: &Arc<Broker>,
    id: &'static str,
    payload: &'static [u8],
    deliveries: u32,
) -> Incoming {
    Incoming {
        broker: broker.clone(),
        id: Some(id),
        payload,
        deliveries,
    }
}

/// A side effect that counts runs per message id.
#[derive(Default)]
struct Effects(Mutex<HashMap<String, u32>>);

impl Effects {
    async fn apply(&self, delivery: Delivery) -> Result<usize, String> {
        *self
            .0
            .lock()
            .unwrap()
            .entry(delivery.id().to_owned())
            .or_default() += 1;
        if delivery.payload().as_ref() == b"poison" {
            return Err("cannot parse the payload".to_owned());
        }
        Ok(delivery.payload().len())
    }

    fn runs(&self, id: &str) -> u32 {
        self.0.lock().unwrap().get(id).copied().unwrap_or(0)
    }
}

#[tokio::test]
async fn a_redelivery_is_replayed_and_acknowledged() {
    let (broker, effects) = (Arc::new(Broker::default()), Effects::default());
    let consumer = Consumer::new(Idempotency::memory(), "orders");
    let handler = |d| effects.apply(d);

    let first = consumer
        .handle(&message(&broker, "m1", b"abc", 1), handler)
        .await
        .unwrap();
    let again = consumer
        .handle(&message(&broker, "m1", b"abc", 2), handler)
        .await
        .unwrap();

    assert!(matches!(first.handled, Handled::Ran(3)));
    assert!(matches!(again.handled, Handled::Replayed(3)));
    assert_eq!(effects.runs("m1"), 1);
    assert_eq!(
        broker.told(),
        [("m1".into(), Told::Ack), ("m1".into(), Told::Ack)]
    );
    let stats = consumer.stats();
    assert_eq!((stats.delivered, stats.ran, stats.replayed), (2, 1, 1));
}

#[tokio::test]
async fn handler_errors_are_naked_with_backoff_then_dead_lettered() {
    let (broker, effects) = (Arc::new(Broker::default()), Effects::default());
    let consumer = Consumer::new(Idempotency::memory(), "orders")
        .max_deliveries(3)
        .backoff(Duration::from_secs(1), Duration::from_secs(60));
    for delivery in 1..=3 {
        let outcome = consumer
            .handle(&message(&broker, "bad", b"poison", delivery), |d| {
                effects.apply(d)
            })
            .await
            .unwrap();
        assert!(
            matches!(&outcome.handled, Handled::Failed(error) if error == "cannot parse the payload")
        );
    }
    assert_eq!(
        effects.runs("bad"),
        3,
        "errors are not stored: each delivery runs again"
    );
    let told: Vec<_> = broker.told().into_iter().map(|(_, told)| told).collect();
    assert_eq!(
        told[..2],
        [
            Told::Nak(Duration::from_secs(1)),
            Told::Nak(Duration::from_secs(2))
        ]
    );
    assert!(
        matches!(&told[2], Told::DeadLetter(reason) if reason.contains("delivery 3") && reason.contains("cannot parse")),
        "{told:?}"
    );
    assert_eq!(consumer.stats().dead_lettered, 1);
}

#[tokio::test]
async fn an_id_reused_with_another_payload_or_missing_is_dead_lettered() {
    let (broker, effects) = (Arc::new(Broker::default()), Effects::default());
    let consumer = Consumer::new(Idempotency::memory(), "orders");
    consumer
        .handle(&message(&broker, "m1", b"abc", 1), |d| effects.apply(d))
        .await
        .unwrap();
    let reused = consumer
        .handle(&message(&broker, "m1", b"xyz", 1), |d| effects.apply(d))
        .await
        .unwrap();
    assert!(matches!(reused.handled, Handled::NotRun(Error::KeyReused)));
    assert!(matches!(reused.disposition, Disposition::DeadLetter { .. }));

    let anonymous = Incoming {
        broker: broker.clone(),
        id: None,
        payload: b"abc",
        deliveries: 1,
    };
    let outcome = consumer
        .handle(&anonymous, |d| effects.apply(d))
        .await
        .unwrap();
    assert!(matches!(
        outcome.disposition,
        Disposition::DeadLetter { .. }
    ));
    assert!(
        matches!(&broker.told()[2].1, Told::DeadLetter(reason) if reason.contains("no `Message-Id`"))
    );
    assert_eq!(effects.runs("m1"), 1);
}

/// A store that cannot be reached.
struct Down;

fn down<T>() -> StoreFuture<'static, T> {
    Box::pin(async {
        Err(StoreError::new(
            StoreErrorKind::Unavailable,
            "connection refused",
        ))
    })
}

impl Store for Down {
    fn begin(&self, _: Key, _: Fingerprint, _: Token, _: Duration) -> StoreFuture<'_, Begin> {
        down()
    }
    fn complete(&self, _: Key, _: Token, _: Record, _: Duration) -> StoreFuture<'_, Completion> {
        down()
    }
    fn release(&self, _: Key, _: Token) -> StoreFuture<'_, ()> {
        down()
    }
    fn renew(&self, _: Key, _: Token, _: Duration) -> StoreFuture<'_, bool> {
        down()
    }
}

#[tokio::test]
async fn a_store_that_is_down_naks_and_runs_nothing() {
    let (broker, effects) = (Arc::new(Broker::default()), Effects::default());
    let consumer = Consumer::new(Idempotency::new(Down), "orders").max_deliveries(1);
    let outcome = consumer
        .handle(&message(&broker, "m1", b"abc", 7), |d| effects.apply(d))
        .await
        .unwrap();
    assert!(matches!(outcome.handled, Handled::NotRun(Error::Store(_))));
    assert!(
        matches!(outcome.disposition, Disposition::Nak { .. }),
        "never dead-lettered for an outage"
    );
    assert_eq!(effects.runs("m1"), 0);
}

/// `max_deliveries` numbers deliveries as the broker does: those nak'ed
/// while the store was down count, so the first handler failure after an
/// outage that took four deliveries is the fifth delivery's, and final.
#[tokio::test]
async fn deliveries_during_an_outage_count_toward_max_deliveries() {
    let (broker, effects) = (Arc::new(Broker::default()), Effects::default());
    let down = Consumer::new(Idempotency::new(Down), "orders");
    for delivery in 1..=4 {
        let outcome = down
            .handle(&message(&broker, "bad", b"poison", delivery), |d| {
                effects.apply(d)
            })
            .await
            .unwrap();
        assert!(matches!(outcome.disposition, Disposition::Nak { .. }));
    }
    assert_eq!(effects.runs("bad"), 0);
    let back = Consumer::new(Idempotency::memory(), "orders");
    let outcome = back
        .handle(&message(&broker, "bad", b"poison", 5), |d| effects.apply(d))
        .await
        .unwrap();
    assert_eq!(effects.runs("bad"), 1);
    assert!(
        matches!(&outcome.disposition, Disposition::DeadLetter { reason } if reason.contains("delivery 5")),
        "{outcome:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_redelivery_during_the_first_waits_for_it_or_is_naked() {
    let (broker, effects) = (Arc::new(Broker::default()), Effects::default());
    let slow = |d: Delivery| {
        let effects = &effects;
        async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            effects.apply(d).await
        }
    };
    let consumer = Consumer::new(Idempotency::memory(), "orders").heartbeat(None);
    let first = message(&broker, "m1", b"abc", 1);
    let second = message(&broker, "m1", b"abc", 2);
    let (a, b) = tokio::join!(consumer.handle(&first, slow), async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        consumer.handle(&second, slow).await
    });
    assert!(matches!(a.unwrap().handled, Handled::Ran(3)));
    assert!(
        matches!(b.unwrap().handled, Handled::Replayed(3)),
        "the redelivery waited"
    );
    assert_eq!(effects.runs("m1"), 1);

    let settings = Settings::builder()
        .on_conflict(OnConflict::Reject)
        .build()
        .unwrap();
    let rejecting = Consumer::new(Idempotency::memory(), "orders")
        .settings(settings)
        .heartbeat(None);
    let first = message(&broker, "m2", b"abc", 1);
    let second = message(&broker, "m2", b"abc", 2);
    let (a, b) = tokio::join!(rejecting.handle(&first, slow), async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        rejecting.handle(&second, slow).await
    });
    assert!(matches!(a.unwrap().handled, Handled::Ran(3)));
    let b = b.unwrap();
    assert!(matches!(
        b.handled,
        Handled::NotRun(Error::InProgress { .. })
    ));
    assert!(
        matches!(b.disposition, Disposition::Nak { delay } if delay > Duration::ZERO && delay <= Settings::DEFAULT.lease()),
        "{b:?}"
    );
    assert_eq!(effects.runs("m2"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_slow_handler_sends_heartbeats() {
    let broker = Arc::new(Broker::default());
    let consumer =
        Consumer::new(Idempotency::memory(), "orders").heartbeat(Some(Duration::from_secs(10)));
    consumer
        .handle(&message(&broker, "m1", b"abc", 1), |_| async {
            tokio::time::sleep(Duration::from_secs(35)).await;
            Ok::<_, String>(())
        })
        .await
        .unwrap();
    let told: Vec<_> = broker.told().into_iter().map(|(_, told)| told).collect();
    assert_eq!(
        told,
        [
            Told::InProgress,
            Told::InProgress,
            Told::InProgress,
            Told::Ack
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_heartbeat_past_the_clocks_range_never_beats() {
    let broker = Arc::new(Broker::default());
    let consumer = Consumer::new(Idempotency::memory(), "orders").heartbeat(Some(Duration::MAX));
    let outcome = consumer
        .handle(&message(&broker, "m1", b"abc", 1), |_| async {
            tokio::time::sleep(Duration::from_secs(35)).await;
            Ok::<_, String>(7)
        })
        .await
        .unwrap();
    assert!(matches!(outcome.handled, Handled::Ran(7)), "{outcome:?}");
    let told: Vec<_> = broker.told().into_iter().map(|(_, told)| told).collect();
    assert_eq!(told, [Told::Ack]);
}

#[tokio::test]
async fn run_processes_a_stream_with_duplicates_once_per_id() {
    let (broker, effects) = (Arc::new(Broker::default()), Effects::default());
    let consumer = Consumer::new(Idempotency::memory(), "orders").concurrency(8);
    const IDS: [&str; 5] = ["a", "b", "c", "d", "e"];
    let messages: Vec<Result<Incoming, std::io::Error>> = (0..100)
        .map(|i| Ok(message(&broker, IDS[i % IDS.len()], b"abc", 1)))
        .collect();

    consumer
        .run(futures_util::stream::iter(messages), |d| effects.apply(d))
        .await
        .unwrap();

    for id in IDS {
        assert_eq!(effects.runs(id), 1, "{id}");
    }
    let stats = consumer.stats();
    assert_eq!((stats.delivered, stats.ran, stats.replayed), (100, 5, 95));
    assert!(broker.told().iter().all(|(_, told)| *told == Told::Ack));
}

#[tokio::test]
async fn run_stops_at_the_streams_first_error() {
    let broker = Arc::new(Broker::default());
    let consumer = Consumer::new(Idempotency::memory(), "orders");
    let messages = vec![
        Ok(message(&broker, "a", b"abc", 1)),
        Err(std::io::Error::other("connection lost")),
        Ok(message(&broker, "b", b"abc", 1)),
    ];
    let error = consumer
        .run(futures_util::stream::iter(messages), |_| async {
            Ok::<_, String>(())
        })
        .await
        .unwrap_err();
    assert_eq!(error.to_string(), "connection lost");
    assert_eq!(consumer.stats().delivered, 1);
}

#[test]
fn header_text_escapes_control_characters_and_cuts_long_text() {
    assert_eq!(header_text("plain text"), "plain text");
    assert_eq!(
        header_text("line 1\nline 2\r\n\tend\u{7}"),
        "line 1\\nline 2\\r\\n\\tend\\u{7}"
    );
    let safe = header_text(&format!("a\\b\n{}", "x".repeat(5_000)));
    assert_eq!(header_text(&safe), safe, "idempotent");
    let fits = "y".repeat(MAX_REASON_LEN);
    assert_eq!(header_text(&fits), fits, "not cut when it fits");
    let long = header_text(&"é".repeat(5_000));
    assert!(long.len() <= MAX_REASON_LEN, "{}", long.len());
    assert!(long.ends_with('…'));
    let long_lines = header_text(&"x\n".repeat(5_000));
    assert!(long_lines.len() <= MAX_REASON_LEN);
    assert!(!long_lines.chars().any(char::is_control));
}

#[tokio::test]
async fn a_multi_line_error_reaches_the_dead_letter_as_one_safe_line() {
    let broker = Arc::new(Broker::default());
    let consumer = Consumer::new(Idempotency::memory(), "orders").max_deliveries(1);
    let error = format!("line one\nline two\r\n{}", "x".repeat(10_000));
    let outcome = consumer
        .handle(&message(&broker, "m1", b"abc", 1), |_| async {
            Err::<(), _>(error.clone())
        })
        .await
        .unwrap();
    assert!(matches!(
        outcome.disposition,
        Disposition::DeadLetter { .. }
    ));
    let told = broker.told();
    let Told::DeadLetter(reason) = &told[0].1 else {
        panic!("{told:?}")
    };
    assert!(reason.contains("line one\\nline two\\r\\n"), "{reason}");
    assert!(reason.len() <= MAX_REASON_LEN);
    assert!(!reason.chars().any(char::is_control));
}

#[tokio::test]
async fn a_panicking_handler_fails_its_delivery_and_the_run_goes_on() {
    let (broker, effects) = (Arc::new(Broker::default()), Effects::default());
    let settings = Settings::builder()
        .on_conflict(OnConflict::Reject)
        .build()
        .unwrap();
    let consumer = Consumer::new(Idempotency::memory(), "orders")
        .settings(settings)
        .max_deliveries(2)
        .backoff(Duration::from_secs(1), Duration::from_secs(60))
        .concurrency(4);
    let handler = |d: Delivery| {
        let effects = &effects;
        async move {
            let len = effects.apply(d.clone()).await?;
            if d.payload().as_ref() == b"boom" {
                panic!("index out of bounds\nat line 2");
            }
            Ok::<_, String>(len)
        }
    };
    let messages: Vec<Result<Incoming, std::io::Error>> = vec![
        Ok(message(&broker, "a", b"abc", 1)),
        Ok(message(&broker, "bad", b"boom", 1)),
        Ok(message(&broker, "b", b"abcd", 1)),
    ];
    consumer
        .run(futures_util::stream::iter(messages), handler)
        .await
        .unwrap();
    let mut told = broker.told();
    told.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        told,
        [
            ("a".into(), Told::Ack),
            ("b".into(), Told::Ack),
            ("bad".into(), Told::Nak(Duration::from_secs(1))),
        ]
    );

    // Its claim was released at once: the redelivery runs (and panics) again
    // instead of finding the key in progress, and is dead-lettered.
    let outcome = consumer
        .handle(&message(&broker, "bad", b"boom", 2), handler)
        .await
        .unwrap();
    assert!(
        matches!(&outcome.handled, Handled::Failed(e) if e.contains("the handler panicked: index out of bounds")),
        "{outcome:?}"
    );
    assert!(
        matches!(&broker.told()[3].1, Told::DeadLetter(reason) if reason.contains("panicked") && !reason.contains('\n')),
        "{:?}",
        broker.told()
    );
    assert_eq!(effects.runs("bad"), 2);
    let stats = consumer.stats();
    assert_eq!((stats.panicked, stats.failed, stats.ran), (2, 2, 4));
}

#[tokio::test]
async fn a_dead_letter_that_cannot_be_published_is_retried_without_the_handler() {
    let (broker, effects) = (Arc::new(Broker::default()), Effects::default());
    let consumer = Consumer::new(Idempotency::memory(), "orders")
        .max_deliveries(2)
        .dead_letter_attempts(3)
        .backoff(Duration::from_secs(1), Duration::from_secs(60));
    broker.refuse_dead_letters.store(2, Ordering::Relaxed);
    let mut outcomes = Vec::new();
    for delivery in 1..=4 {
        outcomes.push(
            consumer
                .handle(&message(&broker, "bad", b"poison", delivery), |d| {
                    effects.apply(d)
                })
                .await
                .unwrap(),
        );
    }
    assert_eq!(
        effects.runs("bad"),
        2,
        "the handler ran max_deliveries times"
    );
    assert!(matches!(outcomes[2].handled, Handled::FailedBefore(_)));
    let told: Vec<_> = broker.told().into_iter().map(|(_, told)| told).collect();
    assert_eq!(told.len(), 4, "{told:?}");
    assert_eq!(
        told[..3],
        [
            Told::Nak(Duration::from_secs(1)),
            Told::Nak(Duration::from_secs(2)),
            Told::Nak(Duration::from_secs(4)),
        ]
    );
    assert!(
        matches!(&told[3], Told::DeadLetter(reason) if reason.contains("delivery 2") && reason.contains("cannot parse")),
        "{told:?}"
    );
    // The counts say what the broker was told: three naks (one after the
    // handler's first failure, two after dead letters it refused), one
    // dead letter published.
    let stats = consumer.stats();
    assert_eq!(
        (stats.naked, stats.dead_lettered, stats.dead_letters_failed),
        (3, 1, 2),
        "{stats:?}"
    );
}

#[tokio::test]
async fn a_final_failure_too_large_to_keep_is_still_dead_lettered_on_redelivery() {
    // The failure's reason is larger than a record may be, or than a full
    // store takes: the store keeps only that the handler failed.
    let bounded = Idempotency::memory().max_record_bytes(100);
    let full = Idempotency::new(Cramped(crate::MemoryStore::new()));
    for idem in [bounded, full] {
        let broker = Arc::new(Broker::default());
        let runs = std::sync::atomic::AtomicU32::new(0);
        let failing = |_| async {
            runs.fetch_add(1, Ordering::Relaxed);
            Err::<usize, _>(format!("cannot parse the payload: {}", "x".repeat(200)))
        };
        let consumer = Consumer::new(idem, "orders").max_deliveries(1);
        broker.refuse_dead_letters.store(1, Ordering::Relaxed);
        let first = consumer
            .handle(&message(&broker, "bad", b"poison", 1), failing)
            .await
            .unwrap();
        assert!(matches!(first.handled, Handled::Failed(_)), "{first:?}");
        let second = consumer
            .handle(&message(&broker, "bad", b"poison", 2), failing)
            .await
            .unwrap();
        assert!(
            matches!(&second.handled, Handled::FailedBefore(reason) if reason.contains("failed for good")),
            "{second:?}"
        );
        let told: Vec<_> = broker.told().into_iter().map(|(_, told)| told).collect();
        // Never acknowledged as if it had succeeded: its dead letter,
        // refused once, goes out on the redelivery.
        assert!(
            matches!(&told[..], [Told::Nak(_), Told::DeadLetter(reason)] if reason.contains("not kept")),
            "{told:?}"
        );
        assert_eq!(runs.load(Ordering::Relaxed), 1);
    }
}

/// A memory store that refuses, as full, any record over 100 bytes.
struct Cramped(crate::MemoryStore);

impl Store for Cramped {
    fn begin(&self, k: Key, f: Fingerprint, t: Token, l: Duration) -> StoreFuture<'_, Begin> {
        self.0.begin(k, f, t, l)
    }
    fn complete(&self, k: Key, t: Token, r: Record, l: Duration) -> StoreFuture<'_, Completion> {
        if r.payload().len() > 100 {
            return Box::pin(async { Err(StoreError::new(StoreErrorKind::Full, "out of memory")) });
        }
        self.0.complete(k, t, r, l)
    }
    fn release(&self, k: Key, t: Token) -> StoreFuture<'_, ()> {
        self.0.release(k, t)
    }
    fn renew(&self, k: Key, t: Token, l: Duration) -> StoreFuture<'_, bool> {
        self.0.renew(k, t, l)
    }
}

/// A user's type with the name of the consumer's own failure type: their
/// records' type tags are alike.
mod user {
    #[derive(Debug, serde::Serialize, serde::Deserialize)]
    pub(super) struct Failure {
        note: String,
    }
}

/// A handler whose value's type has the name of the consumer's own failure
/// type: a failure too large to keep is still told from a value.
#[tokio::test]
async fn an_unkept_failure_is_told_from_a_value_of_any_type_name() {
    let broker = Arc::new(Broker::default());
    let consumer =
        Consumer::new(Idempotency::memory().max_record_bytes(32), "orders").max_deliveries(1);
    broker.refuse_dead_letters.store(1, Ordering::Relaxed);
    for delivery in 1..=2 {
        consumer
            .handle(&message(&broker, "bad", b"poison", delivery), |_| async {
                Err::<user::Failure, _>("cannot parse the payload".to_owned())
            })
            .await
            .unwrap();
    }
    let told: Vec<_> = broker.told().into_iter().map(|(_, told)| told).collect();
    assert!(
        matches!(&told[..], [Told::Nak(_), Told::DeadLetter(_)]),
        "{told:?}"
    );
}

#[tokio::test]
async fn a_dead_letter_that_keeps_failing_ends_in_a_termination() {
    let (broker, effects) = (Arc::new(Broker::default()), Effects::default());
    let consumer = Consumer::new(Idempotency::memory(), "orders")
        .max_deliveries(1)
        .dead_letter_attempts(2);
    broker
        .refuse_dead_letters
        .store(u32::MAX, Ordering::Relaxed);
    for delivery in 1..=2 {
        consumer
            .handle(&message(&broker, "bad", b"poison", delivery), |d| {
                effects.apply(d)
            })
            .await
            .unwrap();
    }
    let told: Vec<_> = broker.told().into_iter().map(|(_, told)| told).collect();
    assert!(
        matches!(told[..], [Told::Nak(_), Told::Terminate]),
        "{told:?}"
    );
    assert_eq!(effects.runs("bad"), 1);
    // Nothing was dead-lettered: one nak, then a termination without one.
    let stats = consumer.stats();
    assert_eq!(
        (stats.naked, stats.dead_lettered, stats.dead_letters_failed),
        (1, 0, 2),
        "{stats:?}"
    );

    // A message without an id has one attempt: one whose dead letter is
    // refused is terminated, not dead-lettered; one that gets through is
    // dead-lettered.
    let consumer = Consumer::new(Idempotency::memory(), "orders");
    let no_id = |deliveries| Incoming {
        broker: broker.clone(),
        id: None,
        payload: b"{}",
        deliveries,
    };
    consumer
        .handle(&no_id(1), |d| effects.apply(d))
        .await
        .unwrap();
    broker.refuse_dead_letters.store(0, Ordering::Relaxed);
    consumer
        .handle(&no_id(2), |d| effects.apply(d))
        .await
        .unwrap();
    let stats = consumer.stats();
    assert_eq!(
        (
            stats.delivered,
            stats.naked,
            stats.dead_lettered,
            stats.dead_letters_failed
        ),
        (2, 0, 1, 1),
        "{stats:?}"
    );
}

/// A memory store whose `complete` never answers in time.
struct Unrecording(crate::MemoryStore);

impl Store for Unrecording {
    fn begin(&self, k: Key, f: Fingerprint, t: Token, l: Duration) -> StoreFuture<'_, Begin> {
        self.0.begin(k, f, t, l)
    }
    fn complete(&self, _: Key, _: Token, _: Record, _: Duration) -> StoreFuture<'_, Completion> {
        Box::pin(async {
            Err(StoreError::new(
                StoreErrorKind::Timeout,
                "no answer within 1 s",
            ))
        })
    }
    fn release(&self, k: Key, t: Token) -> StoreFuture<'_, ()> {
        self.0.release(k, t)
    }
    fn renew(&self, k: Key, t: Token, l: Duration) -> StoreFuture<'_, bool> {
        self.0.renew(k, t, l)
    }
    fn inspect(&self, k: Key) -> StoreFuture<'_, crate::store::Inspection> {
        self.0.inspect(k)
    }
}

/// A consumer whose store never keeps a record, with a 3 s lease.
fn unrecording_consumer() -> Consumer {
    let settings = Settings::builder()
        .lease(Duration::from_secs(3))
        .build()
        .unwrap();
    Consumer::new(
        Idempotency::new(Unrecording(crate::MemoryStore::new())),
        "orders",
    )
    .settings(settings)
    .heartbeat(None)
}

#[tokio::test(start_paused = true)]
async fn a_message_whose_outcome_was_not_recorded_is_naked() {
    let (broker, effects) = (Arc::new(Broker::default()), Effects::default());
    let consumer = unrecording_consumer();
    let outcome = consumer
        .handle(&message(&broker, "m1", b"abc", 1), |d| effects.apply(d))
        .await
        .unwrap();
    assert!(matches!(outcome.handled, Handled::Ran(3)));
    assert_eq!(
        broker.told(),
        [("m1".into(), Told::Nak(Duration::from_secs(1)))]
    );
    let stats = consumer.stats();
    assert_eq!((stats.unrecorded, stats.naked), (1, 1));
}

#[test]
fn settings_that_cannot_work_with_the_store_fail_the_check() {
    struct Slow(crate::MemoryStore);
    impl Store for Slow {
        fn begin(&self, k: Key, f: Fingerprint, t: Token, l: Duration) -> StoreFuture<'_, Begin> {
            self.0.begin(k, f, t, l)
        }
        fn complete(
            &self,
            k: Key,
            t: Token,
            r: Record,
            ttl: Duration,
        ) -> StoreFuture<'_, Completion> {
            self.0.complete(k, t, r, ttl)
        }
        fn release(&self, k: Key, t: Token) -> StoreFuture<'_, ()> {
            self.0.release(k, t)
        }
        fn renew(&self, k: Key, t: Token, l: Duration) -> StoreFuture<'_, bool> {
            self.0.renew(k, t, l)
        }
        fn limits(&self) -> crate::store::Limits {
            crate::store::Limits::with_response_timeout(Duration::from_secs(1))
        }
    }
    let short = Settings::builder()
        .lease(Duration::from_secs(2))
        .build()
        .unwrap();
    let idem = Idempotency::new(Slow(crate::MemoryStore::new()));
    let consumer = Consumer::new(idem.clone(), "orders").settings(short);
    assert!(
        matches!(consumer.check(), Err(Error::Config(_))),
        "{:?}",
        consumer.check()
    );
    assert!(Consumer::new(idem, "orders").check().is_ok());
}

/// A memory store as a store written before `inspect` sees it.
struct Uninspectable(crate::MemoryStore);

impl Store for Uninspectable {
    fn begin(&self, k: Key, f: Fingerprint, t: Token, l: Duration) -> StoreFuture<'_, Begin> {
        self.0.begin(k, f, t, l)
    }
    fn complete(&self, k: Key, t: Token, r: Record, ttl: Duration) -> StoreFuture<'_, Completion> {
        self.0.complete(k, t, r, ttl)
    }
    fn release(&self, k: Key, t: Token) -> StoreFuture<'_, ()> {
        self.0.release(k, t)
    }
    fn renew(&self, k: Key, t: Token, l: Duration) -> StoreFuture<'_, bool> {
        self.0.renew(k, t, l)
    }
}

#[tokio::test]
async fn a_store_that_cannot_inspect_still_gets_its_messages_acknowledged() {
    let (broker, effects) = (Arc::new(Broker::default()), Effects::default());
    let idem = Idempotency::new(Uninspectable(crate::MemoryStore::new()));
    let consumer = Consumer::new(idem, "orders");
    for delivery in 1..=2 {
        consumer
            .handle(&message(&broker, "m1", b"abc", delivery), |d| {
                effects.apply(d)
            })
            .await
            .unwrap();
    }
    assert_eq!(
        broker.told(),
        [("m1".into(), Told::Ack), ("m1".into(), Told::Ack)]
    );
    assert_eq!(effects.runs("m1"), 1);
    assert_eq!(consumer.stats().unrecorded, 0);
}

/// A memory store that counts the operations it is asked for.
#[derive(Default)]
struct Counting(crate::MemoryStore, std::sync::atomic::AtomicU32);

impl Counting {
    fn count(&self) {
        self.1.fetch_add(1, Ordering::Relaxed);
    }
}

impl Store for Counting {
    fn begin(&self, k: Key, f: Fingerprint, t: Token, l: Duration) -> StoreFuture<'_, Begin> {
        self.count();
        self.0.begin(k, f, t, l)
    }
    fn complete(&self, k: Key, t: Token, r: Record, ttl: Duration) -> StoreFuture<'_, Completion> {
        self.count();
        self.0.complete(k, t, r, ttl)
    }
    fn release(&self, k: Key, t: Token) -> StoreFuture<'_, ()> {
        self.count();
        self.0.release(k, t)
    }
    fn renew(&self, k: Key, t: Token, l: Duration) -> StoreFuture<'_, bool> {
        self.count();
        self.0.renew(k, t, l)
    }
    fn inspect(&self, k: Key) -> StoreFuture<'_, crate::store::Inspection> {
        self.count();
        self.0.inspect(k)
    }
}

#[tokio::test]
async fn a_message_costs_the_store_a_claim_and_a_record_and_a_redelivery_one_claim() {
    let (broker, effects) = (Arc::new(Broker::default()), Effects::default());
    let store = Arc::new(Counting::default());
    let consumer = Consumer::new(Idempotency::new(Arc::clone(&store)), "orders").heartbeat(None);
    for (delivery, operations) in [(1, 2), (2, 3)] {
        consumer
            .handle(&message(&broker, "m1", b"abc", delivery), |d| {
                effects.apply(d)
            })
            .await
            .unwrap();
        // The first delivery: begin and complete; the second: a begin that
        // replays.
        assert_eq!(store.1.load(Ordering::Relaxed), operations);
    }
    assert_eq!(
        broker.told(),
        [("m1".into(), Told::Ack), ("m1".into(), Told::Ack)]
    );
    assert_eq!(effects.runs("m1"), 1);
}

/// A redelivery that joins the first delivery's call in this process is
/// not acknowledged on that call's landing when the store did not confirm
/// its record: like the first delivery, it is nak'ed, since its outcome was
/// never recorded.
#[tokio::test(start_paused = true)]
async fn a_redelivery_joining_an_unrecorded_call_is_not_acknowledged() {
    let (broker, effects) = (Arc::new(Broker::default()), Effects::default());
    let consumer = unrecording_consumer();
    let slow = |d: Delivery| {
        let effects = &effects;
        async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            effects.apply(d).await
        }
    };
    let first = message(&broker, "m1", b"abc", 1);
    let second = message(&broker, "m1", b"abc", 2);
    let (a, b) = tokio::join!(consumer.handle(&first, slow), async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        consumer.handle(&second, slow).await
    });
    let (a, b) = (a.unwrap(), b.unwrap());
    assert!(matches!(a.disposition, Disposition::Nak { .. }), "{a:?}");
    assert_eq!(effects.runs("m1"), 1);
    assert!(
        !broker.told().iter().any(|(_, told)| *told == Told::Ack),
        "acked although the store never confirmed the outcome: {:?} / second {b:?}",
        broker.told()
    );
}

/// A failure the handler marked final is final on its first delivery:
/// dead-lettered at once, and its redeliveries dead-lettered again without
/// running the handler (not acknowledged as "ran before").
#[tokio::test]
async fn a_failure_marked_final_is_dead_lettered_at_once() {
    let broker = Arc::new(Broker::default());
    let consumer = Consumer::new(Idempotency::memory(), "orders");
    let runs = std::sync::atomic::AtomicU32::new(0);
    let handler = |_: Delivery| async {
        runs.fetch_add(1, Ordering::SeqCst);
        crate::mark_final().unwrap();
        Err::<(), _>("the card was declined")
    };
    for delivery in 1..=2 {
        let outcome = consumer
            .handle(&message(&broker, "m1", b"abc", delivery), handler)
            .await
            .unwrap();
        assert!(
            matches!(&outcome.disposition, Disposition::DeadLetter { reason } if reason.contains("marked final") && reason.contains("declined")),
            "{:?}",
            outcome.disposition
        );
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let told: Vec<_> = broker.told().into_iter().map(|(_, told)| told).collect();
    assert!(
        told.iter().all(|told| matches!(told, Told::DeadLetter(_))),
        "{told:?}"
    );
}

/// A failure for good whose record the store did not confirm is nak'ed, as
/// an unrecorded success is: dead-lettering it would leave a redelivery
/// (a dead letter that could not be published, one sent back) nothing to
/// find, and it would run the handler again.
#[tokio::test(start_paused = true)]
async fn a_final_failure_not_recorded_is_naked() {
    let broker = Arc::new(Broker::default());
    let consumer = unrecording_consumer().max_deliveries(1);
    let outcome = consumer
        .handle(&message(&broker, "m1", b"poison", 1), |d| async move {
            Err::<(), _>(format!("cannot parse {} bytes", d.payload().len()))
        })
        .await
        .unwrap();
    assert!(matches!(outcome.handled, Handled::Failed(_)));
    assert_eq!(
        broker.told(),
        [("m1".into(), Told::Nak(Duration::from_secs(1)))]
    );
    let stats = consumer.stats();
    assert_eq!((stats.unrecorded, stats.dead_lettered), (1, 0));
}

/// A final failure's text of any length is recorded as its dead letter
/// tells it (one line of at most `MAX_REASON_LEN` bytes), so a handle
/// whose records are small still keeps it: a redelivery is dead-lettered
/// again, not acknowledged as a record that cannot be replayed.
#[tokio::test]
async fn a_final_failure_of_any_length_is_dead_lettered_again() {
    let broker = Arc::new(Broker::default());
    let consumer =
        Consumer::new(Idempotency::memory().max_record_bytes(2048), "orders").max_deliveries(1);
    let runs = std::sync::atomic::AtomicU32::new(0);
    let handler = |_: Delivery| async {
        runs.fetch_add(1, Ordering::SeqCst);
        Err::<(), _>("x".repeat(64 * 1024))
    };
    for delivery in 1..=2 {
        consumer
            .handle(&message(&broker, "m1", b"abc", delivery), handler)
            .await
            .unwrap();
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let told: Vec<_> = broker.told().into_iter().map(|(_, told)| told).collect();
    assert!(
        matches!(&told[..], [Told::DeadLetter(first), Told::DeadLetter(again)] if first.len() <= MAX_REASON_LEN + 4 && again.len() <= MAX_REASON_LEN + 4),
        "{told:?}"
    );
}

/// A failure for good whose step's undo failed is not recorded (the next
/// attempt finishes the undoing): the message is nak'ed, not dead-lettered
/// and terminated, and its next delivery undoes the step without running
/// the handler's failed work again.
#[tokio::test(start_paused = true)]
async fn a_last_delivery_left_undoing_is_naked_and_the_next_finishes_it() {
    let broker = Arc::new(Broker::default());
    let consumer = Consumer::new(Idempotency::memory(), "orders")
        .max_deliveries(1)
        .heartbeat(None);
    let undos = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let handler = |_: Delivery| {
        let undos = Arc::clone(&undos);
        async move {
            crate::step("reserve", async { Ok::<_, Error>(7_u32) })
                .compensate(move |_: u32| async move {
                    // The first undo fails; the next succeeds.
                    if undos.fetch_add(1, Ordering::SeqCst) == 0 {
                        Err("the warehouse is down")
                    } else {
                        Ok(())
                    }
                })
                .await
                .map_err(|e| e.to_string())?;
            Err::<(), String>("the card was declined".to_owned())
        }
    };
    let first = consumer
        .handle(&message(&broker, "m1", b"abc", 1), handler)
        .await
        .unwrap();
    assert!(
        matches!(first.disposition, Disposition::Nak { .. }),
        "{:?}",
        first.disposition
    );
    let second = consumer
        .handle(&message(&broker, "m1", b"abc", 2), handler)
        .await
        .unwrap();
    assert!(
        matches!(&second.disposition, Disposition::DeadLetter { reason } if reason.contains("declined")),
        "{:?}",
        second.disposition
    );
    assert_eq!(undos.load(Ordering::SeqCst), 2);
}

/// A handler that never returns fails its delivery at the consumer's
/// `handler_timeout`, and the messages behind it are consumed: with
/// `concurrency(1)` it would otherwise hold the only slot for good.
#[tokio::test(start_paused = true)]
async fn a_handler_that_never_returns_fails_at_its_timeout_and_the_run_goes_on() {
    let (broker, effects) = (Arc::new(Broker::default()), Effects::default());
    let consumer = Consumer::new(Idempotency::memory(), "orders")
        .concurrency(1)
        .max_deliveries(2)
        .handler_timeout(Some(Duration::from_secs(60)));
    let handler = |d: Delivery| {
        let effects = &effects;
        async move {
            let len = effects.apply(d.clone()).await?;
            if d.payload().as_ref() == b"hang" {
                std::future::pending::<()>().await;
            }
            Ok::<_, String>(len)
        }
    };
    let messages: Vec<Result<Incoming, std::io::Error>> = vec![
        Ok(message(&broker, "stuck", b"hang", 1)),
        Ok(message(&broker, "next", b"abc", 1)),
    ];
    let started = tokio::time::Instant::now();
    consumer
        .run(futures_util::stream::iter(messages), handler)
        .await
        .unwrap();
    assert_eq!(started.elapsed(), Duration::from_secs(60));
    let told: Vec<_> = broker
        .told()
        .into_iter()
        .filter(|(_, told)| *told != Told::InProgress)
        .collect();
    assert_eq!(
        told,
        [
            ("stuck".into(), Told::Nak(Duration::from_secs(1))),
            ("next".into(), Told::Ack),
        ]
    );
    // Its claim was released: the last delivery runs it again, and fails
    // for good.
    let outcome = consumer
        .handle(&message(&broker, "stuck", b"hang", 2), handler)
        .await
        .unwrap();
    assert!(
        matches!(&outcome.handled, Handled::Failed(e) if e.contains("did not finish within its handler_timeout (60s)")),
        "{outcome:?}"
    );
    assert!(matches!(
        outcome.disposition,
        Disposition::DeadLetter { .. }
    ));
    assert_eq!(effects.runs("stuck"), 2);
}

/// An error whose `Display` panics fails its delivery like any error: it is
/// nak'ed, then dead-lettered, and the run goes on.
#[tokio::test]
async fn an_error_whose_display_panics_is_settled_like_any_failure() {
    struct Garbled;
    impl fmt::Display for Garbled {
        fn fmt(&self, _: &mut fmt::Formatter<'_>) -> fmt::Result {
            panic!("garbled error text")
        }
    }
    let broker = Arc::new(Broker::default());
    let consumer = Consumer::new(Idempotency::memory(), "orders").max_deliveries(2);
    let handler = |_: Delivery| async { Err::<(), _>(Garbled) };
    let messages: Vec<Result<Incoming, std::io::Error>> =
        vec![Ok(message(&broker, "m", b"abc", 1))];
    consumer
        .run(futures_util::stream::iter(messages), handler)
        .await
        .unwrap();
    assert_eq!(
        broker.told(),
        [("m".into(), Told::Nak(Duration::from_secs(1)))]
    );
    let outcome = consumer
        .handle(&message(&broker, "m", b"abc", 2), handler)
        .await
        .unwrap();
    assert!(
        matches!(&outcome.handled, Handled::Failed(e) if e.contains("its error's Display panicked: garbled error text")),
        "{outcome:?}"
    );
    assert!(
        matches!(&broker.told()[1].1, Told::DeadLetter(_)),
        "{:?}",
        broker.told()
    );
    assert_eq!(consumer.stats().failed, 2);
}

/// A heartbeat the broker does not answer (a reconnect) does not hold up
/// the handler or the message's settlement.
#[tokio::test(start_paused = true)]
async fn a_heartbeat_without_an_answer_does_not_hold_up_the_message() {
    let broker = Arc::new(Broker::default());
    broker.stall_heartbeats.store(true, Ordering::Relaxed);
    let consumer =
        Consumer::new(Idempotency::memory(), "orders").heartbeat(Some(Duration::from_secs(10)));
    let outcome = consumer
        .handle(&message(&broker, "m1", b"abc", 1), |_| async {
            tokio::time::sleep(Duration::from_secs(35)).await;
            Ok::<_, String>(())
        })
        .await
        .unwrap();
    assert!(matches!(outcome.handled, Handled::Ran(())), "{outcome:?}");
    assert_eq!(
        broker.told(),
        [("m1".into(), Told::InProgress), ("m1".into(), Told::Ack)]
    );
}
