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
}

#[derive(Default)]
struct Broker {
    told: Mutex<Vec<(String, Told)>>,
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
        self.tell(Told::DeadLetter(reason.to_owned()));
        Ok(())
    }

    async fn in_progress(&self) -> Result<(), AckError> {
        self.tell(Told::InProgress);
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
