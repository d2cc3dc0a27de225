//! The conformance suite on the embedded memory store, plus what only the
//! memory store promises: bounded size and background reclaiming.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use idem_core::store::{Begin, Completion, Record, Store, StoreErrorKind, StoreFuture, Token};
use idem_core::{Error, Fingerprint, Idempotency, Key, MemoryStore, OnConflict, Settings};
use idem_test::conformance::{Backend, Caller, Failure, Runs, Timing, fresh};
use idem_test::faults::Down;

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
    idem_test::conformance_suite!(super::Memory);
}

#[tokio::test(start_paused = true)]
async fn expired_records_are_reclaimed_without_callers() {
    let store = MemoryStore::builder()
        .sweep_interval(Duration::from_secs(1))
        .build();
    let idem = Idempotency::new(store.clone());
    let settings = Settings::builder()
        .ttl(Duration::from_secs(10))
        .lease(Duration::from_secs(3))
        .build()
        .unwrap();
    for i in 0..100 {
        let key = Key::new("reclaim", &i).unwrap();
        let fp = Fingerprint::of(&i).unwrap();
        idem.run(&settings, key, fp, async { Ok::<_, Failure>(i) })
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

    let result = Idempotency::new(store.clone())
        .run(
            &Settings::DEFAULT,
            Key::new("cap", &3).unwrap(),
            fp,
            async { Ok::<_, Failure>(()) },
        )
        .await;
    match result {
        Err(Failure::Idem(e)) => assert_eq!(e.http_status(), 503),
        other => panic!("expected a store error, got {other:?}"),
    }
}

/// A full store reclaims expired records before it refuses a new key, with
/// no sweeper to do it.
#[tokio::test(start_paused = true)]
async fn a_full_store_reclaims_expired_records_before_refusing() {
    let store = MemoryStore::builder()
        .max_records(2)
        .sweep_interval(Duration::from_secs(3600))
        .build();
    let fp = Fingerprint::of(&()).unwrap();
    let lease = Duration::from_secs(1);
    for i in 0..2 {
        let key = Key::new("reclaim-when-full", &i).unwrap();
        assert_eq!(
            store.begin(key, fp, Token::random(), lease).await.unwrap(),
            Begin::Claimed
        );
    }
    let third = Key::new("reclaim-when-full", &2).unwrap();
    let full = store
        .begin(third, fp, Token::random(), lease)
        .await
        .unwrap_err();
    assert_eq!(full.kind(), StoreErrorKind::Full, "the claims are live");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(store.len(), 2, "no sweeper ran");
    assert_eq!(
        store
            .begin(third, fp, Token::random(), lease)
            .await
            .unwrap(),
        Begin::Claimed,
        "the expired claims were reclaimed to make room"
    );
    assert_eq!(store.len(), 1);
}

/// The byte cap counts results: a store whose results fill its bytes refuses
/// new keys, and takes them again once those results expire.
#[tokio::test(start_paused = true)]
async fn a_byte_cap_bounds_results() {
    let store = MemoryStore::builder().max_bytes(16 * 1024).build();
    let idem = Idempotency::new(store.clone());
    let settings = Settings::builder()
        .ttl(Duration::from_secs(10))
        .lease(Duration::from_secs(1))
        .build()
        .unwrap();
    let big = "x".repeat(4096);
    let mut refused = None;
    for i in 0..10 {
        let key = Key::new("bytes", &i).unwrap();
        let result = idem
            .run(&settings, key, Fingerprint::of(&i).unwrap(), async {
                Ok::<_, Failure>(big.clone())
            })
            .await;
        if let Err(Failure::Idem(Error::Store(e))) = result {
            assert_eq!(e.kind(), StoreErrorKind::Full);
            assert!(e.to_string().contains("max_bytes"), "{e}");
            refused = Some(i);
            break;
        }
    }
    let refused = refused.expect("16 KiB do not hold ten 4 KiB results");
    assert!((2..=4).contains(&refused), "refused the {refused}th");
    assert!(store.bytes() <= 16 * 1024 + 4096);
    tokio::time::sleep(Duration::from_secs(11)).await;
    let key = Key::new("bytes", &99).unwrap();
    let result = idem
        .run(&settings, key, Fingerprint::of(&99).unwrap(), async {
            Ok::<_, Failure>(1)
        })
        .await;
    assert_eq!(result.unwrap(), 1, "expired results made room");
}

/// The sweeper visits one shard at a time and yields in between, so that it
/// never holds every shard's lock for a whole scan.
#[tokio::test(start_paused = true)]
async fn the_sweeper_reclaims_one_shard_at_a_time() {
    let store = MemoryStore::builder()
        .sweep_interval(Duration::from_secs(1))
        .build();
    let fp = Fingerprint::of(&()).unwrap();
    let n = 64 * 200;
    for i in 0..n {
        let key = Key::new("sweep-shards", &i).unwrap();
        store
            .begin(key, fp, Token::random(), Duration::from_millis(100))
            .await
            .unwrap();
    }
    // The sweeper's first tick passes at once; let it finish and park on its
    // next one, then move the clock past the leases and that tick.
    for _ in 0..2 * 64 {
        tokio::task::yield_now().await;
    }
    assert_eq!(store.len(), n, "nothing had expired yet");
    tokio::time::advance(Duration::from_millis(1100)).await;
    tokio::task::yield_now().await;
    tokio::task::yield_now().await;
    let left = store.len();
    assert!(left < n, "the sweeper started");
    assert!(
        left > n / 2,
        "after one shard the sweeper yielded to other tasks: {left} of {n} left"
    );
    for _ in 0..2 * 64 {
        tokio::task::yield_now().await;
    }
    assert_eq!(store.len(), 0, "and went on to the other shards");
}

/// A store asked for the longest durations saturates instead of
/// overflowing its clock.
#[tokio::test]
async fn the_longest_durations_do_not_overflow() {
    let store = MemoryStore::new();
    let (key, fp) = fresh("max-durations");
    let token = Token::random();
    assert_eq!(
        store.begin(key, fp, token, Duration::MAX).await.unwrap(),
        Begin::Claimed
    );
    assert!(store.renew(key, token, Duration::MAX).await.unwrap());
    let record = Record::new(idem_core::store::Outcome::Ok, &b"1"[..]);
    assert_eq!(
        store
            .complete(key, token, record, Duration::MAX)
            .await
            .unwrap(),
        Completion::Stored
    );
}

#[tokio::test]
async fn clones_share_records() {
    let store = MemoryStore::new();
    let clone = store.clone();
    let (key, fp) = fresh("clones");
    Idempotency::new(store)
        .run(&Settings::DEFAULT, key, fp, async { Ok::<_, Failure>(1) })
        .await
        .unwrap();
    assert_eq!(clone.len(), 1);
}

#[tokio::test]
async fn a_failing_store_fails_closed() {
    let runs = Runs::default();
    let (key, fp) = fresh("down");
    let idem = Idempotency::new(Down);
    for on_conflict in [OnConflict::Wait, OnConflict::Reject] {
        let settings = Settings::builder()
            .on_conflict(on_conflict)
            .build()
            .unwrap();
        let result = idem
            .run(&settings, key, fp, async { Ok::<_, Failure>(runs.mark()) })
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
    let idem = Idempotency::new(Down);
    let calls = (0..50).map(|_| {
        let (idem, runs) = (idem.clone(), runs.clone());
        async move {
            idem.run(&Settings::DEFAULT, key, fp, async move {
                Ok::<_, Failure>(runs.mark())
            })
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
async fn the_default_handle_is_an_in_process_memory_store() {
    let (key, fp) = fresh("default");
    let caller = Caller::new(
        idem_core::default_handle(),
        Timing {
            lease: Duration::from_secs(3),
            ttl: Duration::from_secs(60),
        },
    );
    let first = caller
        .run(key, fp, async { Ok::<_, Failure>(5) })
        .await
        .unwrap();
    let again = caller
        .run(key, fp, async { Ok::<_, Failure>(6) })
        .await
        .unwrap();
    assert_eq!((first, again), (5, 5));
    let replacement = Idempotency::connect("memory://").await.unwrap();
    let refused = idem_core::set_default(replacement).expect_err("fixed once used");
    assert!(
        refused.to_string().contains("already set or used"),
        "{refused}"
    );
}

/// Counts `begin`s, the round trips a claim or replay costs.
struct Counting(MemoryStore, Arc<AtomicUsize>);

impl Store for Counting {
    fn begin(
        &self,
        key: Key,
        fp: Fingerprint,
        token: Token,
        lease: Duration,
    ) -> StoreFuture<'_, Begin> {
        self.1.fetch_add(1, Ordering::SeqCst);
        self.0.begin(key, fp, token, lease)
    }

    fn complete(
        &self,
        key: Key,
        token: Token,
        record: Record,
        ttl: Duration,
    ) -> StoreFuture<'_, Completion> {
        self.0.complete(key, token, record, ttl)
    }

    fn release(&self, key: Key, token: Token) -> StoreFuture<'_, ()> {
        self.0.release(key, token)
    }

    fn renew(&self, key: Key, token: Token, lease: Duration) -> StoreFuture<'_, bool> {
        self.0.renew(key, token, lease)
    }

    fn watch(&self, key: Key) -> Option<idem_core::store::Watch> {
        self.0.watch(key)
    }
}

/// A handle owns its flights: 100 concurrent callers on one handle cost one
/// `begin`; on two handles (two "processes") the second handle's callers
/// reach the store on their own, and the body still runs once.
#[tokio::test(start_paused = true)]
async fn handles_own_their_flights() {
    let begins = Arc::new(AtomicUsize::new(0));
    let store: Arc<dyn Store> = Arc::new(Counting(MemoryStore::new(), Arc::clone(&begins)));
    let timing = Memory.timing();
    let storm = |handles: Vec<Idempotency>, runs: Runs| async move {
        let (key, fp) = fresh("own-flights");
        let mut callers = tokio::task::JoinSet::new();
        for i in 0..100 {
            let (caller, runs) = (
                Caller::new(&handles[i % handles.len()], timing),
                runs.clone(),
            );
            callers.spawn(async move {
                caller
                    .run(key, fp, async move {
                        runs.mark();
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Ok::<_, Failure>(7_u8)
                    })
                    .await
            });
        }
        assert!(
            callers
                .join_all()
                .await
                .into_iter()
                .all(|r| r.unwrap() == 7)
        );
    };

    let runs = Runs::default();
    storm(
        vec![Idempotency::from_arc(Arc::clone(&store))],
        runs.clone(),
    )
    .await;
    assert_eq!(runs.count(), 1);
    assert_eq!(begins.swap(0, Ordering::SeqCst), 1, "one handle: one begin");

    let runs = Runs::default();
    let two = vec![
        Idempotency::from_arc(Arc::clone(&store)),
        Idempotency::from_arc(Arc::clone(&store)),
    ];
    storm(two, runs.clone()).await;
    assert_eq!(runs.count(), 1, "the store still runs the key once");
    assert!(
        begins.load(Ordering::SeqCst) >= 3,
        "the second handle claims, waits and replays on its own: {begins:?}"
    );
}

/// The sweeper runs on the runtime of the store's first call. When that
/// runtime is kept but no longer driven (a start-up `current_thread`
/// runtime), calls on another runtime reclaim expired records in its place.
#[test]
fn a_runtime_no_longer_driven_does_not_stop_reclamation() {
    let store = MemoryStore::builder()
        .sweep_interval(Duration::from_millis(50))
        .build();
    let fp = Fingerprint::of(&()).unwrap();
    let startup = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    startup.block_on(async {
        let key = Key::new("two-runtimes", &"start-up").unwrap();
        store
            .begin(key, fp, Token::random(), Duration::from_millis(100))
            .await
            .unwrap();
    });
    let main = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    main.block_on(async {
        for i in 0..100 {
            let key = Key::new("two-runtimes", &i).unwrap();
            store
                .begin(key, fp, Token::random(), Duration::from_millis(100))
                .await
                .unwrap();
        }
        assert_eq!(store.len(), 101);
        tokio::time::sleep(Duration::from_millis(400)).await;
        let key = Key::new("two-runtimes", &"later").unwrap();
        store
            .begin(key, fp, Token::random(), Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(store.len(), 1, "the expired claims were reclaimed");
    });
    drop(startup);
}
