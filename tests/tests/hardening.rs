//! The engine under the faults of its hardening, each on tokio's paused clock:
//! a result the store refuses or that is too large, renewals whose answers
//! are slow, an outage of the store for most of a lease, a holder whose
//! remaining lease reads as nearly over, a panicking body, and what the
//! metrics say of a cancelled call and of a result that was not stored.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use idem_core::store::{
    Begin, Completion, Inspection, Limits, Record, Store, StoreError, StoreErrorKind, StoreFuture,
    Token,
};
use idem_core::{Error, Fingerprint, Idempotency, Key, MemoryStore, OnConflict, Settings};
use idem_test::faults::{Fault, Flaky, Op};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tokio::time::Instant;

fn paused<F: std::future::Future<Output = ()>>(test: F) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("a runtime")
        .block_on(test);
}

fn settings(lease: u64) -> Settings {
    Settings::builder()
        .lease(Duration::from_secs(lease))
        .ttl(Duration::from_secs(3600))
        .build()
        .expect("valid settings")
}

/// [`settings`] whose duplicates wait up to `wait` seconds.
fn waiting(lease: u64, wait: u64) -> Settings {
    Settings::builder()
        .lease(Duration::from_secs(lease))
        .ttl(Duration::from_secs(3600))
        .wait_timeout(Duration::from_secs(wait))
        .build()
        .expect("valid settings")
}

fn key(name: &str) -> (Key, Fingerprint) {
    (
        Key::new(name, &1).expect("a key"),
        Fingerprint::of(&1).expect("a fingerprint"),
    )
}

/// A `complete` the store refuses as full (a Redis at `maxmemory`
/// answers `OOM`) records that the call ran, so that the retry does not run
/// the body again.
#[test]
fn a_result_the_store_refuses_is_recorded_not_run_again() {
    paused(async {
        let flaky = Arc::new(Flaky::new(Arc::new(MemoryStore::new())));
        let idem = Idempotency::from_arc(flaky.clone());
        let (key, fp) = key("hardening.refused");
        let runs = AtomicUsize::new(0);
        let big = "x".repeat(100_000);
        flaky.inject(Op::Complete, Fault::Full);
        let first: Result<String, Error> = idem
            .run(&settings(3), key, fp, async {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok(big.clone())
            })
            .await;
        assert_eq!(first.expect("its own caller gets it"), big);
        // Past the lease: a claim left to lapse would let the retry run.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let retry: Result<String, Error> = idem
            .run(&settings(3), key, fp, async {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok(String::new())
            })
            .await;
        assert!(
            matches!(retry, Err(Error::NotReplayable { .. })),
            "{retry:?}"
        );
        assert_eq!(runs.load(Ordering::SeqCst), 1, "the body ran once");
    });
}

/// Found by the exactly-once checker (seed 2409355654 at a fault
/// rate of 0.3): a `complete` that times out is retried in the background,
/// and a retry the store refuses as full must record the call as run too.
#[test]
fn a_result_refused_on_a_retry_is_recorded_not_run_again() {
    paused(async {
        let flaky = Arc::new(Flaky::new(Arc::new(MemoryStore::new())));
        let idem = Idempotency::from_arc(flaky.clone());
        let (key, fp) = key("hardening.refused-on-retry");
        let runs = AtomicUsize::new(0);
        flaky.inject(Op::Complete, Fault::Refused);
        flaky.inject(Op::Complete, Fault::Full);
        let body = || async { Ok::<_, Error>(runs.fetch_add(1, Ordering::SeqCst) + 1) };
        assert_eq!(
            idem.run(&settings(3), key, fp, body()).await.expect("ran"),
            1
        );
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(flaky.struck(Op::Complete), 2, "both faults struck");
        let retry = idem.run(&settings(3), key, fp, body()).await;
        assert!(
            matches!(retry, Err(Error::NotReplayable { .. })),
            "{retry:?}"
        );
        assert_eq!(runs.load(Ordering::SeqCst), 1, "the body ran once");
    });
}

/// Found by the exactly-once checker (seed 1768315527 at a fault rate of
/// 0.3): a result over the maximum record size is recorded as a few bytes;
/// when the store refuses even those once, the write is retried while the
/// lease allows, instead of leaving the claim to lapse.
#[test]
fn a_full_store_refusing_the_compact_record_once_is_retried() {
    paused(async {
        let flaky = Arc::new(Flaky::new(Arc::new(MemoryStore::new())));
        let idem = Idempotency::from_arc(flaky.clone()).max_record_bytes(64);
        let (key, fp) = key("hardening.compact-refused");
        let runs = AtomicUsize::new(0);
        flaky.inject(Op::Complete, Fault::Full);
        let body = || async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Error>("z".repeat(1000))
        };
        assert!(idem.run(&settings(3), key, fp, body()).await.is_ok());
        tokio::time::sleep(Duration::from_secs(10)).await;
        let retry = idem.run(&settings(3), key, fp, body()).await;
        assert!(
            matches!(retry, Err(Error::NotReplayable { .. })),
            "{retry:?}"
        );
        assert_eq!(runs.load(Ordering::SeqCst), 1, "the body ran once");
    });
}

/// A result over the handle's maximum record size is not written; the
/// call is recorded as run, in a few bytes.
#[test]
fn a_result_over_the_maximum_record_size_is_recorded_not_run_again() {
    paused(async {
        let idem = Idempotency::memory().max_record_bytes(64);
        let (key, fp) = key("hardening.too-large");
        let runs = AtomicUsize::new(0);
        let big = "y".repeat(1000);
        for _ in 0..2 {
            let answer: Result<String, Error> = idem
                .run(&settings(3), key, fp, async {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok(big.clone())
                })
                .await;
            match answer {
                Ok(value) => assert_eq!(value, big, "only the first call's own caller"),
                Err(error) => assert!(matches!(error, Error::NotReplayable { .. }), "{error:?}"),
            }
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        match idem.inspect(key).await.expect("inspect") {
            Inspection::Completed { size, .. } => assert!(size < 200, "{size} bytes stored"),
            other => panic!("{other:?}"),
        }
    });
}

/// A memory store whose renewals follow a script: how long each takes to
/// reach the store and to answer, and whether it times out; it notes every
/// renewal that reached the store after the claim had lapsed.
struct SlowRenewals {
    inner: MemoryStore,
    /// Per renewal: (delay before it reaches the store, delay of its answer,
    /// times out instead of answering). Later renewals behave.
    script: std::sync::Mutex<Vec<(u64, u64, bool)>>,
    landed_late: AtomicUsize,
}

impl Store for SlowRenewals {
    fn begin(&self, k: Key, f: Fingerprint, t: Token, l: Duration) -> StoreFuture<'_, Begin> {
        self.inner.begin(k, f, t, l)
    }
    fn complete(&self, k: Key, t: Token, r: Record, ttl: Duration) -> StoreFuture<'_, Completion> {
        self.inner.complete(k, t, r, ttl)
    }
    fn release(&self, k: Key, t: Token) -> StoreFuture<'_, ()> {
        self.inner.release(k, t)
    }
    fn renew(&self, key: Key, token: Token, lease: Duration) -> StoreFuture<'_, bool> {
        let step = {
            let mut script = self.script.lock().unwrap();
            (!script.is_empty()).then(|| script.remove(0))
        };
        let (reach, answer, times_out) = step.unwrap_or((0, 0, false));
        Box::pin(async move {
            if times_out {
                tokio::time::sleep(Duration::from_secs(1)).await;
                return Err(StoreError::new(StoreErrorKind::Timeout, "renew timed out"));
            }
            tokio::time::sleep(Duration::from_millis(reach)).await;
            if !matches!(
                self.inner.inspect(key).await?,
                Inspection::InProgress { .. }
            ) {
                self.landed_late.fetch_add(1, Ordering::SeqCst);
            }
            let renewed = self.inner.renew(key, token, lease).await;
            tokio::time::sleep(Duration::from_millis(answer)).await;
            renewed
        })
    }
    fn inspect(&self, key: Key) -> StoreFuture<'_, Inspection> {
        self.inner.inspect(key)
    }
    fn limits(&self) -> Limits {
        Limits::with_response_timeout(Duration::from_secs(1))
    }
}

/// Lease 3 s, response timeout 1 s. Renewal #1 is applied at 1.0 s
/// and answered at 1.6 s; #2 times out; its retry takes 0.5 s to reach the
/// store. Reckoned from the answer, #2 is sent at 2.6 s and its retry lands
/// after the claim lapsed at 4.0 s; reckoned from the send, it lands in time.
#[test]
fn renewals_are_reckoned_from_when_they_were_sent() {
    paused(async {
        let store = Arc::new(SlowRenewals {
            inner: MemoryStore::new(),
            script: std::sync::Mutex::new(vec![(0, 600, false), (0, 0, true), (500, 0, false)]),
            landed_late: AtomicUsize::new(0),
        });
        let idem = Idempotency::from_arc(store.clone());
        let (key, fp) = key("hardening.renew-sent");
        let runs = AtomicUsize::new(0);
        let body = || async {
            let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::time::sleep(Duration::from_secs(6)).await;
            Ok::<_, Error>(run)
        };
        let first = idem.run(&settings(3), key, fp, body()).await;
        assert_eq!(first.expect("ran"), 1);
        assert_eq!(
            store.landed_late.load(Ordering::SeqCst),
            0,
            "a renewal landed after the lease"
        );
        let retry = idem.run(&settings(3), key, fp, body()).await;
        assert_eq!(retry.expect("replayed"), 1, "the result was stored");
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    });
}

/// Found by the exactly-once checker on Redis (seed 586385471 at a fault
/// rate of 0.2): a holder paused past its lease is taken over; the rival's
/// result is stored and the holder's is not. A caller that waited on the
/// stale holder in its process must get the stored result, not the stale
/// one, which nobody else ever sees.
#[test]
fn followers_of_a_stale_holder_get_the_stored_result() {
    paused(async {
        let flaky = Arc::new(Flaky::new(Arc::new(MemoryStore::new())));
        let (key, _) = key("hardening.stale-followers");
        flaky.stall(key, Instant::now() + Duration::from_secs(10));
        a_stale_holders_follower_gets_the_rivals_result(&flaky, key, || {}).await;
    });
}

/// A holder whose body runs 5 s on a 3 s lease that `flaky` does not keep,
/// a caller that joins it in its process at 0.1 s, and a rival in another
/// process that takes the lapsed claim at 3.5 s and stores 2; `then` runs
/// after the rival. The holder gets its own 1, the follower the stored 2.
async fn a_stale_holders_follower_gets_the_rivals_result(
    flaky: &Arc<Flaky>,
    key: Key,
    then: impl FnOnce(),
) {
    let holder = Idempotency::from_arc(flaky.clone());
    let rival = Idempotency::from_arc(flaky.clone());
    let fp = Fingerprint::of(&1).expect("a fingerprint");
    let wait = waiting(3, 20);
    let held = tokio::spawn({
        let holder = holder.clone();
        async move {
            holder
                .run(&wait, key, fp, async {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    Ok::<u32, Error>(1)
                })
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let follower = tokio::spawn(async move {
        holder
            .run(&wait, key, fp, async { Ok::<u32, Error>(99) })
            .await
    });
    tokio::time::sleep(Duration::from_millis(3400)).await;
    let rivalled = rival
        .run(&settings(3), key, fp, async { Ok::<u32, Error>(2) })
        .await;
    assert_eq!(rivalled.expect("the rival takes over the lapsed claim"), 2);
    then();
    assert_eq!(held.await.unwrap().expect("its own result"), 1);
    assert_eq!(
        follower.await.unwrap().expect("a result"),
        2,
        "the stored one"
    );
}

/// A caller that drops its call while the body's result is being recorded
/// (a timeout around the call, a client that left) does not throw a known
/// result away: it is recorded in the background, and a caller that waited
/// for the call replays it instead of running the body again once the
/// claim lapses.
#[test]
fn a_call_dropped_while_its_result_is_recorded_still_records_it() {
    paused(async {
        let flaky = Arc::new(Flaky::new(Arc::new(MemoryStore::new())));
        let idem = Idempotency::from_arc(flaky.clone());
        let (key, fp) = key("hardening.dropped-recording");
        let wait = waiting(3, 20);
        // The record reaches the store only after a second: long after the
        // caller has gone.
        flaky.inject(Op::Complete, Fault::Slow(Duration::from_secs(1)));
        let runs = Arc::new(AtomicUsize::new(0));
        let body = |runs: Arc<AtomicUsize>, value: u32| async move {
            runs.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(10)).await;
            Ok::<u32, Error>(value)
        };
        let dropped = tokio::spawn({
            let (idem, body) = (idem.clone(), body(runs.clone(), 1));
            async move { idem.run(&wait, key, fp, body).await }
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
        let waiter = tokio::spawn({
            let (idem, body) = (idem.clone(), body(runs.clone(), 99));
            async move { idem.run(&wait, key, fp, body).await }
        });
        tokio::time::sleep(Duration::from_millis(45)).await;
        dropped.abort();
        assert!(dropped.await.unwrap_err().is_cancelled());
        assert_eq!(
            waiter.await.unwrap().expect("a result"),
            1,
            "the dropped call's"
        );
        assert_eq!(runs.load(Ordering::SeqCst), 1, "the body ran once");
        let again = idem.run(&wait, key, fp, body(runs.clone(), 7)).await;
        assert_eq!(again.unwrap(), 1);
    });
}

/// A call dropped while its `begin` is on its way (a timeout around the
/// call) clears the claim that `begin` made: the retry claims at once
/// instead of finding the key locked for a lease by nobody.
#[test]
fn a_call_dropped_during_its_begin_does_not_lock_the_key() {
    paused(async {
        let flaky = Arc::new(Flaky::new(Arc::new(MemoryStore::new())));
        let idem = Idempotency::from_arc(flaky.clone());
        let (key, fp) = key("hardening.dropped-begin");
        let reject = Settings::builder()
            .lease(Duration::from_secs(30))
            .ttl(Duration::from_secs(3600))
            .on_conflict(OnConflict::Reject)
            .build()
            .unwrap();
        // The claim is made at once; its answer takes a second.
        flaky.inject(Op::Begin, Fault::Delayed(Duration::from_secs(1)));
        let runs = Arc::new(AtomicUsize::new(0));
        let body = |runs: Arc<AtomicUsize>| async move {
            Ok::<_, Error>(runs.fetch_add(1, Ordering::SeqCst) + 1)
        };
        let dropped = tokio::time::timeout(
            Duration::from_millis(100),
            idem.run(&reject, key, fp, body(runs.clone())),
        )
        .await;
        assert!(dropped.is_err(), "the caller gave up");
        tokio::time::sleep(Duration::from_millis(10)).await;
        let retried = idem.run(&reject, key, fp, body(runs.clone())).await;
        assert_eq!(retried.expect("the key is free"), 1);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    });
}

/// A call dropped by a panic that is not its own (another future of its
/// task panicked) was cancelled, not failed: the callers that waited for it
/// are not told its attempt failed, and one of them runs once its claim
/// lapses.
#[test]
fn a_call_dropped_by_another_futures_panic_is_cancelled_not_failed() {
    paused(async {
        let idem = Idempotency::memory();
        let (key, fp) = key("hardening.dropped-by-panic");
        let wait = waiting(3, 20);
        let panicking = tokio::spawn({
            let idem = idem.clone();
            async move {
                let held = idem.run(&wait, key, fp, async {
                    std::future::pending::<()>().await;
                    Ok::<u32, Error>(1)
                });
                let other = async {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    panic!("another future of the task");
                };
                let _ = tokio::join!(held, other);
            }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let waiter = tokio::spawn({
            let idem = idem.clone();
            async move {
                idem.run(&wait, key, fp, async { Ok::<u32, Error>(2) })
                    .await
            }
        });
        assert!(panicking.await.unwrap_err().is_panic());
        assert_eq!(waiter.await.unwrap().expect("not AttemptFailed"), 2);
    });
}

/// A call dropped while it writes the few bytes saying it ran (the store
/// having refused its result as full) goes on writing those few bytes in
/// the background, not the result the store refused.
#[test]
fn a_call_dropped_after_a_full_refusal_records_only_that_it_ran() {
    paused(async {
        let flaky = Arc::new(Flaky::new(Arc::new(MemoryStore::new())));
        let idem = Idempotency::from_arc(flaky.clone());
        let (key, fp) = key("hardening.dropped-after-full");
        flaky.inject(Op::Complete, Fault::Full);
        flaky.inject(Op::Complete, Fault::Slow(Duration::from_secs(1)));
        let dropped = tokio::time::timeout(
            Duration::from_millis(50),
            idem.run(&settings(3), key, fp, async { Ok::<u32, Error>(1) }),
        )
        .await;
        assert!(dropped.is_err(), "the caller gave up");
        let retried = idem
            .run(&settings(3), key, fp, async { Ok::<u32, Error>(2) })
            .await;
        assert!(
            matches!(retried, Err(Error::NotReplayable { .. })),
            "{retried:?}"
        );
    });
}

/// The same on the path that waits for its record (a consumer acknowledges
/// a message only once its outcome is recorded): a retry of the record
/// refused as full, then dropped, goes on with the few bytes only.
#[cfg(feature = "consumer")]
#[test]
fn a_consumer_dropped_after_a_full_refusal_records_only_that_it_ran() {
    use idem_core::consumer::{Consumer, Delivery, Handled};
    paused(async {
        let flaky = Arc::new(Flaky::new(Arc::new(MemoryStore::new())));
        let consumer = Consumer::new(Idempotency::from_arc(flaky.clone()), "orders");
        let delivery = || Delivery::new("m1", bytes::Bytes::from_static(b"abc"));
        // The record times out unapplied; its retry is refused as full;
        // the few bytes are slow to land.
        flaky.inject(Op::Complete, Fault::Refused);
        flaky.inject(Op::Complete, Fault::Full);
        flaky.inject(Op::Complete, Fault::Slow(Duration::from_secs(1)));
        let handler = |d: Delivery| async move { Ok::<_, String>(d.payload().len()) };
        let dropped = tokio::time::timeout(
            Duration::from_millis(200),
            consumer.process(delivery(), handler),
        )
        .await;
        assert!(dropped.is_err(), "the consumer was stopped");
        tokio::time::sleep(Duration::from_secs(5)).await;
        let again = consumer.process(delivery().deliveries(2), handler).await;
        assert!(
            matches!(again.handled, Handled::NotRun(Error::NotReplayable { .. })),
            "{again:?}"
        );
    });
}

/// A holder whose renewals fail past its lease, and whose record's answer
/// is lost, does not hand the callers that waited on it in its process its
/// own result: another call may have taken the key and stored its own,
/// which they replay.
#[test]
fn followers_of_a_holder_past_its_lease_whose_record_is_unconfirmed_get_the_stored_result() {
    paused(async {
        let flaky = Arc::new(Flaky::new(Arc::new(RenewalsDownUntil {
            inner: MemoryStore::new(),
            until: Instant::now() + Duration::from_secs(10),
        })));
        let (key, _) = key("hardening.unconfirmed-followers");
        // The holder's record is answered with a timeout (the store found
        // the claim the rival's).
        a_stale_holders_follower_gets_the_rivals_result(&flaky, key, || {
            flaky.inject(Op::Complete, Fault::AnswerLost);
        })
        .await;
    });
}

/// A memory store that cannot be reached for renewals until a moment.
struct RenewalsDownUntil {
    inner: MemoryStore,
    until: Instant,
}

impl Store for RenewalsDownUntil {
    fn begin(&self, k: Key, f: Fingerprint, t: Token, l: Duration) -> StoreFuture<'_, Begin> {
        self.inner.begin(k, f, t, l)
    }
    fn complete(&self, k: Key, t: Token, r: Record, ttl: Duration) -> StoreFuture<'_, Completion> {
        self.inner.complete(k, t, r, ttl)
    }
    fn release(&self, k: Key, t: Token) -> StoreFuture<'_, ()> {
        self.inner.release(k, t)
    }
    fn renew(&self, key: Key, token: Token, lease: Duration) -> StoreFuture<'_, bool> {
        if Instant::now() < self.until {
            return Box::pin(std::future::ready(Err(StoreError::new(
                StoreErrorKind::Unavailable,
                "connection refused",
            ))));
        }
        self.inner.renew(key, token, lease)
    }
}

/// Renewals fail from 1 s to 2.8 s of a 3 s lease; the store is back
/// before the lease ends, so the claim must hold: a rival at 3.5 s is
/// refused and the holder's result is stored.
#[test]
fn renewal_keeps_trying_while_the_lease_allows() {
    paused(async {
        let store = Arc::new(RenewalsDownUntil {
            inner: MemoryStore::new(),
            until: Instant::now() + Duration::from_millis(2800),
        });
        let holder = Idempotency::from_arc(store.clone());
        let rival = Idempotency::from_arc(store.clone());
        let (key, fp) = key("hardening.renew-outage");
        let runs = Arc::new(AtomicUsize::new(0));
        let body = |runs: Arc<AtomicUsize>| async move {
            let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::time::sleep(Duration::from_secs(6)).await;
            Ok::<_, Error>(run)
        };
        let held = tokio::spawn({
            let body = body(runs.clone());
            async move { holder.run(&settings(3), key, fp, body).await }
        });
        tokio::time::sleep(Duration::from_millis(3500)).await;
        let reject = Settings::builder()
            .lease(Duration::from_secs(3))
            .ttl(Duration::from_secs(3600))
            .on_conflict(OnConflict::Reject)
            .build()
            .unwrap();
        let rivalled = rival.run(&reject, key, fp, body(runs.clone())).await;
        assert!(
            matches!(rivalled, Err(Error::InProgress { .. })),
            "{rivalled:?}"
        );
        assert_eq!(held.await.unwrap().expect("ran"), 1);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    });
}

/// A memory store whose renewals land, but whose answers are lost (a
/// timeout) until a moment.
struct RenewalAnswersLostUntil {
    inner: MemoryStore,
    until: Instant,
}

impl Store for RenewalAnswersLostUntil {
    fn begin(&self, k: Key, f: Fingerprint, t: Token, l: Duration) -> StoreFuture<'_, Begin> {
        self.inner.begin(k, f, t, l)
    }
    fn complete(&self, k: Key, t: Token, r: Record, ttl: Duration) -> StoreFuture<'_, Completion> {
        self.inner.complete(k, t, r, ttl)
    }
    fn release(&self, k: Key, t: Token) -> StoreFuture<'_, ()> {
        self.inner.release(k, t)
    }
    fn renew(&self, key: Key, token: Token, lease: Duration) -> StoreFuture<'_, bool> {
        let applied = self.inner.renew(key, token, lease);
        if Instant::now() >= self.until {
            return applied;
        }
        Box::pin(async move {
            applied.await?;
            Err(StoreError::new(StoreErrorKind::Timeout, "no answer"))
        })
    }
}

/// Renewals whose answers are lost past the holder's lease (they landed:
/// the store still holds the claim) are tried on: once the store answers
/// again, the claim is renewed, so a rival that comes when the last landed
/// renewal would have run out is refused, and the body runs once.
#[test]
fn renewal_tries_on_past_the_lease_while_the_call_runs() {
    // (lease, answers lost until, the body's time, the rival comes at), in
    // ms: a lease of seconds, and one shorter than the pause between
    // renewals past a long lease, which must still be renewed within it.
    for (lease, lost_until, took, rival_at) in [(3000, 4500, 8000, 6500), (600, 1500, 3000, 2200)] {
        let ms = Duration::from_millis;
        paused(async move {
            let store = Arc::new(RenewalAnswersLostUntil {
                inner: MemoryStore::new(),
                until: Instant::now() + ms(lost_until),
            });
            let holder = Idempotency::from_arc(store.clone());
            let rival = Idempotency::from_arc(store.clone());
            let (key, fp) = key("hardening.renew-past-lease");
            let runs = Arc::new(AtomicUsize::new(0));
            let body = |runs: Arc<AtomicUsize>| async move {
                let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::time::sleep(ms(took)).await;
                Ok::<_, Error>(run)
            };
            let settings = move |on_conflict| {
                Settings::builder()
                    .lease(ms(lease))
                    .ttl(Duration::from_secs(3600))
                    .on_conflict(on_conflict)
                    .build()
                    .unwrap()
            };
            let held = tokio::spawn({
                let body = body(runs.clone());
                async move { holder.run(&settings(OnConflict::Wait), key, fp, body).await }
            });
            tokio::time::sleep(ms(rival_at)).await;
            let rivalled = rival
                .run(&settings(OnConflict::Reject), key, fp, body(runs.clone()))
                .await;
            assert!(
                matches!(rivalled, Err(Error::InProgress { .. })),
                "lease {lease} ms: {rivalled:?}"
            );
            assert_eq!(held.await.unwrap().expect("ran"), 1);
            assert_eq!(runs.load(Ordering::SeqCst), 1);
            let replayed = rival
                .run(&settings(OnConflict::Wait), key, fp, body(runs.clone()))
                .await;
            assert_eq!(replayed.unwrap(), 1, "its result was stored");
        });
    }
}

/// A memory store whose `begin` always finds the key held by a holder whose
/// lease reads as about to end (its clock lags), and counts the polls.
#[derive(Default)]
struct LaggingHolder {
    begins: AtomicUsize,
    /// When each `begin` came.
    at: std::sync::Mutex<Vec<tokio::time::Instant>>,
}

impl Store for LaggingHolder {
    fn begin(&self, _: Key, _: Fingerprint, _: Token, _: Duration) -> StoreFuture<'_, Begin> {
        self.begins.fetch_add(1, Ordering::SeqCst);
        self.at.lock().unwrap().push(tokio::time::Instant::now());
        Box::pin(std::future::ready(Ok(Begin::InProgress {
            retry_after: Duration::from_millis(1),
        })))
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

/// A waiter of 2 s polls at most every 10 ms, however short the
/// holder's remaining lease reads: no two polls closer than that, but for
/// a last look at the wait's deadline.
#[test]
fn waiters_never_poll_faster_than_a_floor() {
    paused(async {
        let store = Arc::new(LaggingHolder::default());
        let idem = Idempotency::from_arc(store.clone());
        let (key, fp) = key("hardening.poll-floor");
        let start = tokio::time::Instant::now();
        let wait = Settings::builder()
            .lease(Duration::from_secs(3))
            .ttl(Duration::from_secs(3600))
            .wait_timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        let answer: Result<u32, Error> = idem.run(&wait, key, fp, async { Ok(1) }).await;
        assert!(
            matches!(answer, Err(Error::InProgress { .. })),
            "{answer:?}"
        );
        let polls = store.begins.load(Ordering::SeqCst);
        assert!(polls <= 2000 / 10 + 2, "{polls} polls in 2 s");
        let at = store.at.lock().unwrap().clone();
        let (last, earlier) = at.split_last().unwrap();
        assert_eq!(
            *last - start,
            Duration::from_secs(2),
            "a last look at the deadline"
        );
        for pair in earlier.windows(2) {
            assert!(
                pair[1] - pair[0] >= Duration::from_millis(10),
                "polls {:?} apart",
                pair[1] - pair[0]
            );
        }
    });
}

/// A panicking body releases its claim at once (it failed), instead of
/// holding the key for its lease; a caller waiting for it gets
/// `AttemptFailed`, as for an `Err`; the panic goes on to its caller.
#[test]
fn a_panicking_body_releases_its_claim() {
    paused(async {
        let idem = Idempotency::memory();
        let (key, fp) = key("hardening.panic");
        let holder = tokio::spawn({
            let idem = idem.clone();
            async move {
                idem.run(&settings(30), key, fp, async {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    if key != Key::new("never", &0).unwrap() {
                        panic!("the body's own panic");
                    }
                    Ok::<u32, Error>(0)
                })
                .await
            }
        });
        // The holder has claimed the key and is in its body.
        tokio::time::sleep(Duration::from_millis(1)).await;
        let waiter: Result<u32, Error> = idem.run(&settings(30), key, fp, async { Ok(1) }).await;
        assert!(matches!(waiter, Err(Error::AttemptFailed)), "{waiter:?}");
        let panicked = holder.await;
        assert!(
            panicked.unwrap_err().is_panic(),
            "the body's panic reaches its caller"
        );
        assert_eq!(idem.inspect(key).await.unwrap(), Inspection::Absent);
        let reject = Settings::builder()
            .lease(Duration::from_secs(30))
            .on_conflict(OnConflict::Reject)
            .build()
            .unwrap();
        let retry: Result<u32, Error> = idem.run(&reject, key, fp, async { Ok(7) }).await;
        assert_eq!(retry.expect("the retry runs at once"), 7);
    });
}

fn outcome_count(snapshot: &[(String, u64)], outcome: &str) -> u64 {
    snapshot
        .iter()
        .filter(|(o, _)| o == outcome)
        .map(|(_, n)| *n)
        .sum()
}

/// Runs `script` under a metrics recorder and answers `idem_calls_total` by
/// outcome.
fn counted<F: std::future::Future<Output = ()>>(script: F) -> Vec<(String, u64)> {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || paused(script));
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| key.key().name() == "idem_calls_total")
        .filter_map(|(key, _, _, value)| {
            let outcome = key
                .key()
                .labels()
                .find(|l| l.key() == "outcome")
                .map(|l| l.value().to_owned())?;
            match value {
                DebugValue::Counter(n) => Some((outcome, n)),
                _ => None,
            }
        })
        .collect()
}

/// A call dropped after idem found what it would answer (here, that its
/// key's journal is another call's, so `KeyReused`) but before it returned
/// (its claim's release was slow) is counted as `cancelled`: its caller got
/// nothing.
#[test]
fn a_call_dropped_before_it_answers_is_counted_as_cancelled() {
    let counts = counted(async {
        let flaky = Arc::new(Flaky::new(Arc::new(MemoryStore::new())));
        let idem = Idempotency::from_arc(flaky.clone());
        let (key, _) = key("hardening.cancelled-while-releasing");
        let settings = settings(30);
        // Another call's journal under the key: a step done, then a
        // failure that released the claim.
        let other = idem
            .run(&settings, key, Fingerprint::of(&"other").unwrap(), async {
                idem_core::step("reserve", async { Ok::<_, Error>(1_u32) }).await?;
                Err::<u32, Error>(Error::AttemptFailed)
            })
            .await;
        assert!(other.is_err());
        flaky.inject(Op::Release, Fault::Delayed(Duration::from_secs(5)));
        let call = idem.run(&settings, key, Fingerprint::of(&"this").unwrap(), async {
            idem_core::step("reserve", async { Ok::<_, Error>(2_u32) }).await
        });
        assert!(
            tokio::time::timeout(Duration::from_secs(1), call)
                .await
                .is_err(),
            "cut off while its claim is released"
        );
        assert_eq!(flaky.struck(Op::Release), 1);
    });
    assert_eq!(outcome_count(&counts, "cancelled"), 1, "{counts:?}");
    assert_eq!(outcome_count(&counts, "key_reused"), 0, "{counts:?}");
}

/// A call whose caller drops it mid-body is counted as `cancelled`.
#[test]
fn a_cancelled_call_is_counted_as_cancelled() {
    let counts = counted(async {
        let idem = Idempotency::memory();
        let (key, fp) = key("hardening.cancelled");
        let settings = settings(30);
        let call = idem.run(&settings, key, fp, async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok::<u32, Error>(1)
        });
        assert!(
            tokio::time::timeout(Duration::from_secs(1), call)
                .await
                .is_err()
        );
    });
    assert_eq!(outcome_count(&counts, "cancelled"), 1, "{counts:?}");
    assert_eq!(counts.iter().map(|(_, n)| n).sum::<u64>(), 1, "{counts:?}");
}

/// A body whose claim was forgotten mid-run ran, but its result was
/// not stored: it is counted as `not_stored`, not `ran`.
#[test]
fn a_result_not_stored_is_not_counted_as_ran() {
    let counts = counted(async {
        let idem = Idempotency::memory();
        let (key, fp) = key("hardening.not-stored");
        let operator = idem.clone();
        let answer = idem
            .run(&settings(30), key, fp, async {
                assert!(operator.forget(key).await.unwrap());
                Ok::<u32, Error>(1)
            })
            .await;
        assert_eq!(answer.expect("its caller still gets it"), 1);
    });
    assert_eq!(outcome_count(&counts, "not_stored"), 1, "{counts:?}");
    assert_eq!(outcome_count(&counts, "ran"), 0, "{counts:?}");
}

/// The `not_stored` outcome says a retry runs the body again, so its event
/// carries `record_lost = true` and the key's digest, like every event
/// that says a result may be not recorded.
#[tokio::test(flavor = "current_thread")]
async fn a_result_not_stored_is_told_with_record_lost_and_the_key() {
    let capture = idem_test::logs::capture();
    let idem = Idempotency::memory();
    let (key, fp) = key("hardening.not-stored-told");
    let operator = idem.clone();
    idem.run(&settings(30), key, fp, async {
        assert!(operator.forget(key).await.unwrap());
        Ok::<u32, Error>(1)
    })
    .await
    .unwrap();
    let text = capture.text();
    let told = text
        .lines()
        .find(|line| {
            line.contains(r#"outcome="not_stored""#) && line.contains("a retry runs it again")
        })
        .unwrap_or_else(|| panic!("no not_stored event: {text}"));
    assert!(
        told.contains("record_lost=true") && told.contains(&format!("key={key}")),
        "{told}"
    );
}

/// A renewal that reaches the store after the body's record (whose answer
/// is slow) finds no claim to renew: that is not a lost claim, and nothing
/// says a result was lost.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_renewal_after_the_record_landed_does_not_say_the_claim_was_lost() {
    let capture = idem_test::logs::capture();
    let flaky = Arc::new(Flaky::new(Arc::new(MemoryStore::new())));
    let idem = Idempotency::from_arc(flaky.clone());
    let (key, fp) = key("hardening.renewal-after-record");
    // The record lands at once; its answer comes after the next renewal.
    flaky.inject(Op::Complete, Fault::Delayed(Duration::from_millis(500)));
    let answer = idem
        .run(&settings(3), key, fp, async {
            tokio::time::sleep(Duration::from_millis(900)).await;
            Ok::<u32, Error>(1)
        })
        .await;
    assert_eq!(answer.unwrap(), 1);
    let text = capture.text();
    assert!(!text.contains("record_lost"), "{text}");
    let replayed = idem
        .run(&settings(3), key, fp, async { Ok::<u32, Error>(2) })
        .await;
    assert_eq!(replayed.unwrap(), 1);
}

/// A record retried in the background on a runtime that then stops (a
/// service shutting down, a `block_on` that ended) says so: the retry
/// after the lease will run the body again.
#[test]
fn a_runtime_stopped_before_a_retried_record_says_the_record_was_lost() {
    let capture = idem_test::logs::capture();
    let flaky = Arc::new(Flaky::new(Arc::new(MemoryStore::new())));
    let idem = Idempotency::from_arc(flaky.clone());
    let (key, fp) = key("hardening.runtime-stopped");
    // The record never reaches the store; its retry waits in a task.
    flaky.inject(Op::Complete, Fault::Refused);
    flaky.inject(Op::Complete, Fault::Refused);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    let answer = runtime.block_on(idem.run(&settings(3), key, fp, async { Ok::<u32, Error>(1) }));
    assert_eq!(answer.unwrap(), 1);
    assert!(!capture.text().contains("the runtime stopped"), "not yet");
    drop(runtime);
    let text = capture.text();
    let told = text
        .lines()
        .find(|line| line.contains("the runtime stopped before the outcome"))
        .unwrap_or_else(|| panic!("nothing told: {text}"));
    assert!(
        told.contains("record_lost=true") && told.contains(&format!("key={key}")),
        "{told}"
    );
}

/// The memory store, but its journal cannot be read.
struct UnreadableJournal(MemoryStore);

impl Store for UnreadableJournal {
    fn begin(
        &self,
        key: Key,
        fingerprint: Fingerprint,
        token: Token,
        lease: Duration,
    ) -> StoreFuture<'_, Begin> {
        self.0.begin(key, fingerprint, token, lease)
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

    fn steps(&self, _: Key) -> StoreFuture<'_, Vec<idem_core::store::JournaledStep>> {
        Box::pin(async { Err(idem_test::faults::Down::error()) })
    }
}

/// A stored failure is a failure for good, whose compensations must run
/// first: when the journal that says which cannot be read, the failure is
/// not recorded, and the call says so (`not_stored`, counted in
/// `idem_records_lost_total`), not `failed`; its retry runs it again.
#[test]
fn a_failure_for_good_left_unrecorded_is_counted_as_not_stored() {
    let runs = Arc::new(AtomicUsize::new(0));
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        paused(async {
            let idem = Idempotency::new(UnreadableJournal(MemoryStore::new()));
            let (key, fp) = key("hardening.unreadable-journal");
            for _ in 0..2 {
                let runs = Arc::clone(&runs);
                let failed: Result<u32, String> = idem
                    .run_caching_errors(&settings(30), key, fp, |_: &String| true, async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        Err("declined".to_owned())
                    })
                    .await;
                assert_eq!(failed, Err("declined".to_owned()));
            }
        });
    });
    assert_eq!(runs.load(Ordering::SeqCst), 2, "not recorded: run again");
    let snapshot = snapshotter.snapshot().into_vec();
    let counter = |name: &str, outcome: Option<&str>| -> u64 {
        snapshot
            .iter()
            .filter(|(key, ..)| key.key().name() == name)
            .filter(|(key, ..)| {
                outcome.is_none_or(|o| {
                    key.key()
                        .labels()
                        .any(|l| l.key() == "outcome" && l.value() == o)
                })
            })
            .map(|(_, _, _, value)| match value {
                DebugValue::Counter(n) => *n,
                _ => 0,
            })
            .sum()
    };
    assert_eq!(counter("idem_calls_total", Some("not_stored")), 2);
    assert_eq!(counter("idem_calls_total", Some("failed")), 0);
    assert_eq!(counter("idem_records_lost_total", None), 2);
}

/// Calls of one key on a handle of a memory store whose faults a test
/// injects; each body answers its run's number, from 0.
struct Forgetting {
    flaky: Arc<Flaky>,
    idem: Idempotency,
    key: Key,
    fp: Fingerprint,
    runs: Arc<AtomicUsize>,
}

impl Forgetting {
    fn new(name: &str) -> Self {
        let flaky = Arc::new(Flaky::new(Arc::new(MemoryStore::new())));
        let (key, fp) = key(name);
        Self {
            idem: Idempotency::from_arc(flaky.clone()),
            flaky,
            key,
            fp,
            runs: Arc::default(),
        }
    }

    fn call(&self) -> impl Future<Output = Result<usize, Error>> + Send + 'static {
        let (idem, runs, key, fp) = (self.idem.clone(), self.runs.clone(), self.key, self.fp);
        async move {
            idem.run(&settings(30), key, fp, async move {
                Ok::<usize, Error>(runs.fetch_add(1, Ordering::SeqCst))
            })
            .await
        }
    }
}

/// A call made after `forget` returned runs its body again, even while a
/// call of the same handle that read the record before the forget is still
/// on its way back: the later call does not join it and replay what was
/// forgotten.
#[test]
fn a_call_after_forget_does_not_join_a_call_that_read_the_record_before_it() {
    paused(async {
        let f = Forgetting::new("hardening.forget-in-flight");
        assert_eq!(f.call().await.unwrap(), 0);
        // The next begin reads the record at once, and its answer comes
        // back a second later.
        f.flaky
            .inject(Op::Begin, Fault::Delayed(Duration::from_secs(1)));
        let before = tokio::spawn(f.call());
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(f.idem.forget(f.key).await.unwrap());
        assert_eq!(
            f.call().await.unwrap(),
            1,
            "ran again, not the forgotten result"
        );
        assert_eq!(
            before.await.unwrap().unwrap(),
            0,
            "the call made before the forget replays what it read"
        );
        assert_eq!(f.runs.load(Ordering::SeqCst), 2);
    });
}

/// A forget cut off by its caller after the store deleted the record still
/// keeps later calls of the handle from joining a call that read the record
/// before it.
#[test]
fn a_forget_cut_off_after_its_delete_still_lets_no_call_join_an_older_read() {
    paused(async {
        let f = Forgetting::new("hardening.forget-cut-off");
        assert_eq!(f.call().await.unwrap(), 0);
        f.flaky
            .inject(Op::Begin, Fault::Delayed(Duration::from_secs(1)));
        let before = tokio::spawn(f.call());
        tokio::time::sleep(Duration::from_millis(10)).await;
        // The delete is carried out at once; its answer comes late, and the
        // operator's timeout cuts the forget off.
        f.flaky
            .inject(Op::Forget, Fault::Delayed(Duration::from_millis(500)));
        let cut = tokio::time::timeout(Duration::from_millis(100), f.idem.forget(f.key)).await;
        assert!(cut.is_err(), "the forget was cut off");
        assert_eq!(
            f.call().await.unwrap(),
            1,
            "ran again, not the forgotten result"
        );
        assert_eq!(before.await.unwrap().unwrap(), 0);
    });
}
