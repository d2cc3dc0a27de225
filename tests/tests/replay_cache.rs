//! `ReplayCache`: hot replays answered in process, and everything else left
//! to the store. The store behind it is the memory store wrapped in the
//! kit's `Flaky`, which counts the `begin`s that reach it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use idem_core::store::{ReplayCache, Store};
use idem_core::{Error, Fingerprint, Idempotency, Key, MemoryStore, OnConflict, Settings};
use idem_test::conformance::{Backend, Failure, Timing};
use idem_test::faults::{Fault, Flaky, Op};

const CACHE_TTL: Duration = Duration::from_secs(5);

struct Fixture {
    idem: Idempotency,
    flaky: Arc<Flaky>,
    cache: Arc<ReplayCache<Arc<Flaky>>>,
    runs: Arc<AtomicUsize>,
}

fn fixture(capacity: usize, ttl: Duration) -> Fixture {
    fixture_with(ReplayCache::new, capacity, ttl)
}

fn fixture_with(
    cache: impl FnOnce(Arc<Flaky>, usize, Duration) -> ReplayCache<Arc<Flaky>>,
    capacity: usize,
    ttl: Duration,
) -> Fixture {
    let flaky = Arc::new(Flaky::new(Arc::new(MemoryStore::new())));
    let cache = Arc::new(cache(flaky.clone(), capacity, ttl));
    Fixture {
        idem: Idempotency::new(cache.clone()),
        flaky,
        cache,
        runs: Arc::default(),
    }
}

fn settings() -> Settings {
    Settings::builder()
        .ttl(Duration::from_secs(60))
        .lease(Duration::from_secs(3))
        .build()
        .unwrap()
}

fn key(name: &str) -> Key {
    Key::new("replay-cache", name).unwrap()
}

impl Fixture {
    /// Calls `key` with argument `arg`; the body answers its run's number.
    async fn call(&self, settings: &Settings, key: Key, arg: u32) -> Result<usize, Failure> {
        let runs = self.runs.clone();
        self.idem
            .run(settings, key, Fingerprint::of(&arg).unwrap(), async move {
                Ok::<_, Failure>(runs.fetch_add(1, Ordering::SeqCst) + 1)
            })
            .await
    }

    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }
}

#[tokio::test(start_paused = true)]
async fn hot_replays_are_answered_without_the_store() {
    let f = fixture(100, CACHE_TTL);
    let k = key("hot");
    assert_eq!(f.call(&settings(), k, 1).await.unwrap(), 1);
    assert_eq!(f.flaky.begins(k), 1);
    assert!(f.cache.is_empty(), "a call that ran is not cached");
    for _ in 0..5 {
        assert_eq!(f.call(&settings(), k, 1).await.unwrap(), 1);
    }
    assert_eq!(f.runs(), 1);
    assert_eq!(
        f.flaky.begins(k),
        2,
        "the first replay reads the store, the next four the cache"
    );
    assert_eq!(f.cache.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn other_arguments_are_refused_from_the_cache() {
    let f = fixture(100, CACHE_TTL);
    let k = key("reused");
    f.call(&settings(), k, 1).await.unwrap();
    f.call(&settings(), k, 1).await.unwrap();
    let begins = f.flaky.begins(k);
    let refused = f.call(&settings(), k, 2).await.unwrap_err();
    assert!(
        matches!(refused, Failure::Idem(Error::KeyReused)),
        "{refused:?}"
    );
    assert_eq!(f.flaky.begins(k), begins, "answered from the cache");
    assert_eq!(f.runs(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_key_forgotten_through_the_handle_runs_again() {
    let f = fixture(100, CACHE_TTL);
    let k = key("forgotten");
    f.call(&settings(), k, 1).await.unwrap();
    f.call(&settings(), k, 1).await.unwrap();
    assert_eq!(f.cache.len(), 1);
    assert!(f.idem.forget(k).await.unwrap());
    assert!(f.cache.is_empty());
    assert_eq!(f.call(&settings(), k, 1).await.unwrap(), 2, "ran again");
    assert_eq!(f.call(&settings(), k, 1).await.unwrap(), 2, "and replays");
}

/// A replay that read the record from the store before a forget landed
/// must not keep it in the cache after the forget.
#[tokio::test(start_paused = true)]
async fn a_replay_read_before_a_forget_is_not_kept_after_it() {
    let f = Arc::new(fixture(100, CACHE_TTL));
    let k = key("forget-race");
    f.call(&settings(), k, 1).await.unwrap();
    // The next begin reads the record at once, and its answer comes 1 s later.
    f.flaky
        .inject(Op::Begin, Fault::Delayed(Duration::from_secs(1)));
    let replay = tokio::spawn({
        let f = f.clone();
        async move { f.call(&settings(), k, 1).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(f.idem.forget(k).await.unwrap());
    assert_eq!(replay.await.unwrap().unwrap(), 1, "the replay read before");
    assert!(f.cache.is_empty(), "kept a record forgotten meanwhile");
    assert_eq!(f.call(&settings(), k, 1).await.unwrap(), 2);
}

/// A forget cut off after it landed in the store (its caller timed out)
/// still drops what a replay racing it kept.
#[tokio::test(start_paused = true)]
async fn a_forget_cut_off_still_drops_what_a_racing_replay_kept() {
    let f = Arc::new(fixture(100, CACHE_TTL));
    let k = key("forget-cut-off");
    f.call(&settings(), k, 1).await.unwrap();
    // The forget lands at 1 s and would be answered at 2 s; its caller
    // gives up at 1.5 s.
    f.flaky
        .inject(Op::Forget, Fault::Slow(Duration::from_secs(1)));
    let forget = tokio::spawn({
        let f = f.clone();
        async move { tokio::time::timeout(Duration::from_millis(1500), f.idem.forget(k)).await }
    });
    // A replay that reads the store at 0.5 s, before the forget lands, and
    // hears back at 2.5 s.
    tokio::time::sleep(Duration::from_millis(500)).await;
    f.flaky
        .inject(Op::Begin, Fault::Delayed(Duration::from_secs(2)));
    let replay = tokio::spawn({
        let f = f.clone();
        async move { f.call(&settings(), k, 1).await }
    });
    assert!(
        forget.await.unwrap().is_err(),
        "the forget's caller gave up"
    );
    assert_eq!(replay.await.unwrap().unwrap(), 1, "the replay read before");
    assert!(f.cache.is_empty(), "kept a record forgotten meanwhile");
    assert_eq!(f.call(&settings(), k, 1).await.unwrap(), 2);
}

/// Any ttl, `Duration::MAX` too, keeps records without overflowing.
#[tokio::test(start_paused = true)]
async fn a_ttl_of_any_length_keeps_records() {
    let f = fixture(8, Duration::MAX);
    let k = key("forever");
    for _ in 0..3 {
        f.call(&settings(), k, 1).await.unwrap();
    }
    assert_eq!(f.flaky.begins(k), 2);
}

/// A record's time in the cache counts from when its replay asked the
/// store, not from when the answer came.
#[tokio::test(start_paused = true)]
async fn a_records_ttl_counts_from_when_its_replay_asked() {
    let f = fixture(100, CACHE_TTL);
    let k = key("slow-answer");
    f.call(&settings(), k, 1).await.unwrap();
    f.flaky
        .inject(Op::Begin, Fault::Delayed(Duration::from_secs(2)));
    f.call(&settings(), k, 1).await.unwrap();
    tokio::time::sleep(CACHE_TTL - Duration::from_secs(2)).await;
    f.call(&settings(), k, 1).await.unwrap();
    assert_eq!(
        f.flaky.begins(k),
        3,
        "aged out a ttl after it was asked for"
    );
}

/// An answer that comes back after its ttl has run out is not kept: in a
/// full cache it would push out a live record.
#[tokio::test(start_paused = true)]
async fn an_answer_later_than_the_ttl_is_not_kept() {
    let f = Arc::new(fixture(1, CACHE_TTL));
    let (late, live) = (key("late"), key("live"));
    for k in [late, live] {
        f.call(&settings(), k, 1).await.unwrap();
    }
    f.flaky.inject(
        Op::Begin,
        Fault::Delayed(CACHE_TTL + Duration::from_secs(1)),
    );
    let slow = tokio::spawn({
        let f = Arc::clone(&f);
        async move { f.call(&settings(), late, 1).await }
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    f.call(&settings(), live, 1).await.unwrap();
    assert_eq!(
        slow.await.unwrap().unwrap(),
        1,
        "the late answer is replayed"
    );
    f.call(&settings(), live, 1).await.unwrap();
    assert_eq!(f.flaky.begins(live), 2, "the live record was kept");
    assert_eq!(f.cache.len(), 1);
}

/// Records that aged out are dropped as others are kept after them, not
/// held until their shard fills.
#[tokio::test(start_paused = true)]
async fn records_that_aged_out_are_dropped_as_others_are_kept() {
    let f = fixture(8, CACHE_TTL);
    for i in 0..4 {
        let k = key(&format!("aging-{i}"));
        f.call(&settings(), k, 1).await.unwrap();
        f.call(&settings(), k, 1).await.unwrap();
    }
    assert_eq!(f.cache.len(), 4);
    tokio::time::sleep(CACHE_TTL).await;
    let k = key("fresh");
    f.call(&settings(), k, 1).await.unwrap();
    f.call(&settings(), k, 1).await.unwrap();
    assert_eq!(f.cache.len(), 1, "only the fresh record is held");
}

#[tokio::test(start_paused = true)]
async fn records_leave_the_cache_after_its_ttl() {
    let f = fixture(100, CACHE_TTL);
    let k = key("ttl");
    f.call(&settings(), k, 1).await.unwrap();
    f.call(&settings(), k, 1).await.unwrap();
    tokio::time::sleep(CACHE_TTL - Duration::from_millis(1)).await;
    f.call(&settings(), k, 1).await.unwrap();
    assert_eq!(f.flaky.begins(k), 2, "still cached");
    tokio::time::sleep(Duration::from_millis(1)).await;
    f.call(&settings(), k, 1).await.unwrap();
    assert_eq!(f.flaky.begins(k), 3, "read the store again after the ttl");
    assert_eq!(f.runs(), 1);
}

/// The documented window: within the cache's ttl, a record that expired in
/// the store is still replayed, and other arguments still refused.
#[tokio::test(start_paused = true)]
async fn within_its_ttl_the_cache_replays_a_record_the_store_let_expire() {
    let f = fixture(100, CACHE_TTL);
    let k = key("expired");
    let short = Settings::builder()
        .ttl(Duration::from_secs(1))
        .lease(Duration::from_millis(500))
        .build()
        .unwrap();
    f.call(&short, k, 1).await.unwrap();
    f.call(&short, k, 1).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(f.call(&short, k, 1).await.unwrap(), 1, "from the cache");
    assert!(matches!(
        f.call(&short, k, 2).await,
        Err(Failure::Idem(Error::KeyReused))
    ));
    tokio::time::sleep(CACHE_TTL).await;
    assert_eq!(f.call(&short, k, 2).await.unwrap(), 2, "runs once gone");
}

#[tokio::test(start_paused = true)]
async fn the_cache_holds_at_most_its_capacity_dropping_the_least_used() {
    let f = fixture(2, CACHE_TTL);
    let [a, b, c] = [key("a"), key("b"), key("c")];
    for k in [a, b, c] {
        f.call(&settings(), k, 1).await.unwrap();
        f.call(&settings(), k, 1).await.unwrap();
    }
    assert_eq!(f.cache.len(), 2);
    for k in [b, c] {
        f.call(&settings(), k, 1).await.unwrap();
        assert_eq!(f.flaky.begins(k), 2, "kept");
    }
    f.call(&settings(), a, 1).await.unwrap();
    assert_eq!(f.flaky.begins(a), 3, "the least recently used was dropped");

    // A large cache shards its records, and still holds no more than asked.
    let f = fixture(100, CACHE_TTL);
    for i in 0..300 {
        let k = key(&format!("many-{i}"));
        f.call(&settings(), k, 1).await.unwrap();
        f.call(&settings(), k, 1).await.unwrap();
    }
    assert!(f.cache.len() <= 100, "{} records kept", f.cache.len());
    assert!(f.cache.len() >= 50, "{} records kept", f.cache.len());
}

#[tokio::test(start_paused = true)]
async fn records_larger_than_the_limit_are_always_read_from_the_store() {
    let f = fixture_with(
        |store, capacity, ttl| ReplayCache::new(store, capacity, ttl).max_record_size(64),
        100,
        CACHE_TTL,
    );
    let (small, large) = (key("small"), key("large"));
    let settings = settings();
    for _ in 0..3 {
        f.idem
            .run(&settings, small, Fingerprint::of(&1).unwrap(), async {
                Ok::<_, Failure>("x".repeat(10))
            })
            .await
            .unwrap();
        f.idem
            .run(&settings, large, Fingerprint::of(&1).unwrap(), async {
                Ok::<_, Failure>("x".repeat(100))
            })
            .await
            .unwrap();
    }
    assert_eq!(f.flaky.begins(small), 2, "kept");
    assert_eq!(f.flaky.begins(large), 3, "never kept");
    assert_eq!(f.cache.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_cache_of_zero_capacity_or_ttl_keeps_nothing() {
    for f in [fixture(0, CACHE_TTL), fixture(100, Duration::ZERO)] {
        let k = key("nothing");
        for _ in 0..3 {
            f.call(&settings(), k, 1).await.unwrap();
        }
        assert!(f.cache.is_empty());
        assert_eq!(f.flaky.begins(k), 3);
    }
}

#[tokio::test(start_paused = true)]
async fn claims_in_progress_and_store_failures_are_not_cached() {
    let f = Arc::new(fixture(100, CACHE_TTL));
    let k = key("in-progress");
    let reject = Settings::builder()
        .on_conflict(OnConflict::Reject)
        .build()
        .unwrap();
    let (started, wait) = tokio::sync::oneshot::channel();
    let holder = tokio::spawn({
        let f = f.clone();
        async move {
            f.idem
                .run(&settings(), k, Fingerprint::of(&1).unwrap(), async move {
                    let _ = started.send(());
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    Ok::<_, Failure>(7_usize)
                })
                .await
        }
    });
    wait.await.unwrap();
    // Another process's caller of the same key is refused while it runs.
    let other = Idempotency::new(f.cache.clone());
    let refused = other
        .run(&reject, k, Fingerprint::of(&1).unwrap(), async {
            Ok::<_, Failure>(0_usize)
        })
        .await;
    assert!(
        matches!(refused, Err(Failure::Idem(Error::InProgress { .. }))),
        "{refused:?}"
    );
    assert!(f.cache.is_empty());
    assert_eq!(holder.await.unwrap().unwrap(), 7);

    // A replay whose store fails is not cached either.
    f.flaky.inject(Op::Begin, Fault::Refused);
    assert!(f.call(&settings(), k, 1).await.is_err());
    assert!(f.cache.is_empty());
    assert_eq!(f.call(&settings(), k, 1).await.unwrap(), 7);
    assert_eq!(f.cache.len(), 1);
}

/// The conformance suite, through a cache whose records live a
/// millisecond: what it keeps it answers only within one instant of the
/// paused clock, and every expiry and forget the suite waits out still
/// reaches the store.
struct Cached;

impl Backend for Cached {
    async fn store(&self) -> Arc<dyn Store> {
        Arc::new(ReplayCache::new(
            MemoryStore::new(),
            1_000,
            Duration::from_millis(1),
        ))
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
    idem_test::conformance_suite!(super::Cached);
}
