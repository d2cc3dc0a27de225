//! The conformance suite on the embedded memory store, plus what only the
//! memory store promises: bounded size and background reclaiming.

use std::sync::Arc;
use std::time::Duration;

use idem_core::{
    Begin, Completion, Error, Fingerprint, Idempotency, Key, MemoryStore, Record, Store,
    StoreError, StoreErrorKind, StoreFuture, Token,
};
use tests::conformance::{Backend, Failure, Runs, Timing, fresh};

struct Memory;

impl Backend for Memory {
    async fn store(&self) -> Arc<dyn Store> {
        Arc::new(MemoryStore::new())
    }

    fn timing(&self) -> Timing {
        Timing {
            lease: Duration::from_secs(3),
            ttl: Duration::from_secs(60),
        }
    }

    fn follows_tokio_clock(&self) -> bool {
        true
    }
}

mod conformance {
    tests::conformance_suite!(super::Memory);
}

#[tokio::test(start_paused = true)]
async fn expired_records_are_reclaimed_without_callers() {
    let store = MemoryStore::builder()
        .sweep_interval(Duration::from_secs(1))
        .build();
    let idem = Idempotency::new(&store).ttl(Duration::from_secs(10));
    for i in 0..100 {
        let key = Key::new("reclaim", &i).unwrap();
        let fp = Fingerprint::of(&i).unwrap();
        idem.run(key, fp, async { Ok::<_, Failure>(i) })
            .await
            .unwrap();
    }
    assert_eq!(store.len(), 100);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(store.len(), 100, "still live");
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(store.len(), 0, "the sweeper reclaimed every expired record");
}

#[tokio::test(start_paused = true)]
async fn a_lapsed_claim_is_reclaimed_and_its_watchers_woken() {
    let store = MemoryStore::new();
    let (key, fp) = fresh("lapsed");
    let lease = Duration::from_secs(2);
    assert_eq!(
        store.begin(key, fp, Token::random(), lease).await.unwrap(),
        Begin::Claimed
    );
    let watch = store.watch(key).expect("the memory store watches");
    tokio::time::timeout(Duration::from_secs(5), watch)
        .await
        .expect("woken when the sweeper removed the lapsed claim");
    assert!(store.is_empty());
}

#[tokio::test]
async fn a_full_store_refuses_new_keys_and_keeps_old_ones() {
    let store = MemoryStore::builder().max_records(2).build();
    let lease = Duration::from_secs(30);
    let fp = Fingerprint::of(&()).unwrap();
    for i in 0..2 {
        let key = Key::new("cap", &i).unwrap();
        assert_eq!(
            store.begin(key, fp, Token::random(), lease).await.unwrap(),
            Begin::Claimed
        );
    }
    let err = store
        .begin(Key::new("cap", &2).unwrap(), fp, Token::random(), lease)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Full);
    assert!(err.to_string().contains("max_records"), "{err}");
    assert_eq!(store.len(), 2);

    let result = Idempotency::new(&store)
        .run(Key::new("cap", &3).unwrap(), fp, async {
            Ok::<_, Failure>(())
        })
        .await;
    match result {
        Err(Failure::Idem(e)) => assert_eq!(e.http_status(), 503),
        other => panic!("expected a store error, got {other:?}"),
    }
}

#[tokio::test]
async fn clones_share_records_and_coalesce() {
    let store = MemoryStore::new();
    let clone = store.clone();
    assert_eq!(store.instance_id(), clone.instance_id());
    assert_eq!(store.instance_id(), Store::instance_id(&&store));
    let arc: Arc<dyn Store> = Arc::new(store.clone());
    assert_eq!(store.instance_id(), arc.instance_id());
    let (key, fp) = fresh("clones");
    Idempotency::new(&store)
        .run(key, fp, async { Ok::<_, Failure>(1) })
        .await
        .unwrap();
    assert_eq!(clone.len(), 1);
}

/// A store whose every operation fails, as an unreachable backend does.
struct Down;

fn outage() -> StoreError {
    StoreError::new(StoreErrorKind::Unavailable, "connection refused")
}

impl Store for Down {
    fn begin(&self, _: Key, _: Fingerprint, _: Token, _: Duration) -> StoreFuture<'_, Begin> {
        Box::pin(async { Err(outage()) })
    }

    fn complete(&self, _: Key, _: Token, _: Record, _: Duration) -> StoreFuture<'_, Completion> {
        Box::pin(async { Err(outage()) })
    }

    fn release(&self, _: Key, _: Token) -> StoreFuture<'_, ()> {
        Box::pin(async { Err(outage()) })
    }

    fn renew(&self, _: Key, _: Token, _: Duration) -> StoreFuture<'_, bool> {
        Box::pin(async { Err(outage()) })
    }
}

#[tokio::test]
async fn a_failing_store_fails_closed() {
    let runs = Runs::default();
    let (key, fp) = fresh("down");
    for on_conflict in [idem_core::OnConflict::Wait, idem_core::OnConflict::Reject] {
        let result = Idempotency::new(Down)
            .on_conflict(on_conflict)
            .run(key, fp, async { Ok::<_, Failure>(runs.mark()) })
            .await;
        match result {
            Err(Failure::Idem(Error::Store(e))) => {
                assert_eq!(e.kind(), StoreErrorKind::Unavailable);
            }
            other => panic!("expected Error::Store, got {other:?}"),
        }
    }
    assert_eq!(runs.count(), 0, "the body never ran unguarded");
}

#[tokio::test]
async fn a_storm_on_a_failing_store_shares_the_failure() {
    let runs = Runs::default();
    let (key, fp) = fresh("down-storm");
    let store = Arc::new(Down);
    let calls = (0..50).map(|_| {
        let (store, runs) = (Arc::clone(&store), runs.clone());
        async move {
            Idempotency::new(store)
                .run(key, fp, async move { Ok::<_, Failure>(runs.mark()) })
                .await
        }
    });
    for result in futures_join_all(calls).await {
        assert!(matches!(result, Err(Failure::Idem(Error::Store(_)))));
    }
    assert_eq!(runs.count(), 0);
}

async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send,
{
    let mut set = tokio::task::JoinSet::new();
    for f in futures {
        set.spawn(f);
    }
    set.join_all().await
}

#[tokio::test]
async fn the_default_store_is_an_in_process_memory_store() {
    let store = idem_core::default_store();
    let (key, fp) = fresh("default");
    let first = Idempotency::new(store)
        .run(key, fp, async { Ok::<_, Failure>(5) })
        .await
        .unwrap();
    let again = Idempotency::new(idem_core::default_store())
        .run(key, fp, async { Ok::<_, Failure>(6) })
        .await
        .unwrap();
    assert_eq!((first, again), (5, 5));
    let replacement = idem_core::connect("memory://").await.unwrap();
    assert!(
        idem_core::set_default_store(replacement).is_err(),
        "the default store is fixed once used"
    );
}
