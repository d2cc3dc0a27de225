//! The metrics of a scripted run (feature `metrics`), captured by a test
//! recorder: 1 run, 3 replays, 1 conflict, 1 key reuse; and of calls
//! refused before they have a key, and of takeovers a body learns of.

use std::sync::Arc;
use std::time::Duration;

use idem_core::store::Store;
use idem_core::{
    Error, Fingerprint, Idempotency, Key, MemoryStore, OnConflict, Settings, idempotent,
};
use idem_test::faults::Flaky;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};

async fn charge(
    idem: &Idempotency,
    settings: &Settings,
    amount: u64,
    sleep: u64,
) -> Result<u64, idem_core::Error> {
    let key = Key::new("orders.charge", &"order-17").unwrap();
    idem.run(
        settings,
        key,
        Fingerprint::of(&amount).unwrap(),
        async move {
            tokio::time::sleep(Duration::from_millis(sleep)).await;
            Ok(amount)
        },
    )
    .await
}

#[test]
fn metrics_count_a_scripted_run() {
    let snapshot = recorded(|| async {
        let idem = Idempotency::memory();
        let reject = Settings::builder()
            .on_conflict(OnConflict::Reject)
            .build()
            .unwrap();
        // 1 run, with 1 conflict while it runs.
        let (ran, conflict) = tokio::join!(charge(&idem, &reject, 100, 500), async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            charge(&idem, &reject, 100, 0).await
        });
        ran.unwrap();
        conflict.unwrap_err();
        // 3 replays, 1 key reuse.
        for _ in 0..3 {
            charge(&idem, &reject, 100, 0).await.unwrap();
        }
        charge(&idem, &reject, 999, 0).await.unwrap_err();
    })
    .into_hashmap();
    let counter = |outcome: &str| {
        snapshot
            .iter()
            .find(|(key, _)| {
                key.key().name() == "idem_calls_total"
                    && key
                        .key()
                        .labels()
                        .any(|l| l.key() == "outcome" && l.value() == outcome)
                    && key
                        .key()
                        .labels()
                        .any(|l| l.key() == "operation" && l.value() == "metrics::charge")
            })
            .map(|(_, (_, _, value))| match value {
                DebugValue::Counter(n) => *n,
                other => panic!("not a counter: {other:?}"),
            })
            .unwrap_or(0)
    };
    assert_eq!(counter("ran"), 1);
    assert_eq!(counter("replayed"), 3);
    assert_eq!(counter("in_progress"), 1);
    assert_eq!(counter("key_reused"), 1);
    let body = snapshot
        .iter()
        .find(|(key, _)| key.key().name() == "idem_body_seconds")
        .map(|(_, (unit, _, value))| (*unit, value))
        .unwrap();
    assert_eq!(body.0, Some(metrics::Unit::Seconds));
    assert!(
        matches!(body.1, DebugValue::Histogram(samples) if samples.len() == 1 && samples[0].into_inner() >= 0.5)
    );
}

/// What the metrics recorded while `script` ran on a paused
/// current-thread runtime, under a recorder of its own.
fn recorded<F: std::future::Future<Output = ()>>(
    script: impl FnOnce() -> F,
) -> metrics_util::debugging::Snapshot {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        idem_core::observe::describe_metrics();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap()
            .block_on(script());
    });
    snapshotter.snapshot()
}

/// The value of counter `name` with exactly these labels, or 0.
fn counted(snapshot: &Counted, name: &str, labels: &[(&str, &str)]) -> u64 {
    snapshot
        .iter()
        .find(|(key, _, _, _)| {
            key.key().name() == name
                && key.key().labels().count() == labels.len()
                && labels.iter().all(|(label, value)| {
                    key.key()
                        .labels()
                        .any(|l| l.key() == *label && l.value() == *value)
                })
        })
        .map(|(_, _, _, value)| match value {
            DebugValue::Counter(n) => *n,
            other => panic!("not a counter: {other:?}"),
        })
        .unwrap_or(0)
}

/// What a recorder counted, as a list.
type Counted = Vec<(
    metrics_util::CompositeKey,
    Option<metrics::Unit>,
    Option<metrics::SharedString>,
    DebugValue,
)>;

/// A value that does not serialize.
struct Unserializable;

impl serde::Serialize for Unserializable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("no"))
    }
}

static IDEM: std::sync::LazyLock<Idempotency> = std::sync::LazyLock::new(Idempotency::memory);

#[idempotent(key = order, store = IDEM)]
async fn with_odd_arguments(order: u64, note: Unserializable) -> Result<u64, Error> {
    let _ = note;
    Ok(order)
}

#[idempotent(key = note, fingerprint = false, store = IDEM)]
async fn with_an_odd_key(note: Unserializable) -> Result<u64, Error> {
    let _ = note;
    Ok(1)
}

/// Calls refused before they had a key (their key or arguments do not
/// serialize) are `config_error`s, counted under their operation; a body
/// that learns at its fencing epoch that its claim was taken over, and
/// fails, is `not_stored` and counted in `idem_claims_lost_total`.
#[test]
fn refused_calls_and_takeovers_a_body_learns_of_are_counted() {
    let snapshot = recorded(|| async {
        let odd = with_odd_arguments(7, Unserializable).await;
        assert!(matches!(odd, Err(Error::Encode { .. })), "{odd:?}");
        let odd = with_an_odd_key(Unserializable).await;
        assert!(matches!(odd, Err(Error::Encode { .. })), "{odd:?}");

        let memory: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let flaky = Arc::new(Flaky::new(Arc::clone(&memory)));
        let stalled = Idempotency::from_arc(flaky.clone());
        let other = Idempotency::from_arc(memory);
        let key = Key::new("metrics.fenced", &"order-17").unwrap();
        let fp = Fingerprint::of(&17).unwrap();
        let settings = Settings::builder()
            .lease(Duration::from_millis(100))
            .build()
            .unwrap();
        flaky.stall(key, tokio::time::Instant::now() + Duration::from_secs(5));
        let (fenced, took_over) = tokio::join!(
            stalled.run(&settings, key, fp, async {
                tokio::time::sleep(Duration::from_secs(1)).await;
                idem_core::epoch().await
            }),
            async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                other
                    .run(&settings, key, fp, async { Ok::<u64, Error>(2) })
                    .await
            }
        );
        assert!(matches!(fenced, Err(Error::ClaimLost)), "{fenced:?}");
        assert_eq!(took_over.unwrap(), 2);
    })
    .into_vec();
    for operation in ["metrics::with_odd_arguments", "metrics::with_an_odd_key"] {
        let labels = [("operation", operation), ("outcome", "config_error")];
        assert_eq!(
            counted(&snapshot, "idem_calls_total", &labels),
            1,
            "{operation}"
        );
    }
    // `run` is labelled with its caller's function.
    let here = "metrics::refused_calls_and_takeovers_a_body_learns_of_are_counted";
    let fenced = |outcome| [("operation", here), ("outcome", outcome)];
    assert_eq!(
        counted(&snapshot, "idem_calls_total", &fenced("not_stored")),
        1
    );
    assert_eq!(counted(&snapshot, "idem_calls_total", &fenced("ran")), 1);
    assert_eq!(
        counted(&snapshot, "idem_claims_lost_total", &[("operation", here)]),
        1
    );
}
