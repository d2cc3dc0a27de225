//! The metrics of a scripted run (feature `metrics`), captured by a test
//! recorder: 1 run, 3 replays, 1 conflict, 1 key reuse.

use std::time::Duration;

use idem_core::{Fingerprint, Idempotency, Key, OnConflict, Settings};
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
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        idem_core::observe::describe_metrics();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap()
            .block_on(async {
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
            });
    });

    let snapshot = snapshotter.snapshot().into_hashmap();
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
