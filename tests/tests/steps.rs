//! Multi-step calls: a call whose body fails after step k (an `Err`, a
//! panic, a dropped future) resumes at step k + 1 when it runs again, on
//! every store that keeps journals; each step's side effect happens once
//! and its derived key is the same on every attempt.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt as _;
use idem_core::store::{Inspection, Store};
use idem_core::{
    Error, Fingerprint, Idempotency, Key, MemoryStore, Settings, derive_step_key, step, step_key,
};

const STEPS: usize = 4;

/// How the first attempt fails after a step.
#[derive(Clone, Copy, Debug)]
enum Failure {
    /// The body returns an `Err`: the claim is released.
    Err,
    /// The body panics: the claim is released.
    Panic,
    /// The caller drops the call's future: the claim lapses with its lease.
    Dropped,
}

/// Side effects counted per step, and the derived keys each step saw.
#[derive(Default)]
struct Effects {
    runs: [AtomicU32; STEPS],
    keys: Mutex<Vec<(usize, String)>>,
}

fn settings() -> Settings {
    Settings::builder()
        .lease(Duration::from_secs(2))
        .ttl(Duration::from_secs(120))
        .wait_timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// One attempt of an N-step call: runs every step, then fails as `fail`
/// says after step `after` if given.
async fn attempt(
    idem: &Idempotency,
    key: Key,
    effects: &Effects,
    fail: Option<(usize, Failure)>,
) -> Result<Vec<u32>, Error> {
    idem.run(&settings(), key, Fingerprint::of(&"cart")?, async {
        let mut results = Vec::new();
        for i in 0..STEPS {
            let value = step(&format!("step-{i}"), async {
                let derived = step_key(&format!("step-{i}")).expect("inside a call");
                effects.keys.lock().unwrap().push((i, derived));
                effects.runs[i].fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(u32::try_from(i).unwrap() * 10)
            })
            .await?;
            results.push(value);
            match fail {
                Some((after, Failure::Err)) if after == i => return Err(Error::AttemptFailed),
                Some((after, Failure::Panic)) if after == i => panic!("injected after step {i}"),
                Some((after, Failure::Dropped)) if after == i => {
                    std::future::pending::<()>().await;
                }
                _ => {}
            }
        }
        Ok(results)
    })
    .await
}

/// For every step k and every failure: the first attempt fails after step
/// k, the retry runs steps k + 1.. only and returns every step's result,
/// and a third call replays the record without running anything.
async fn resumes_after_each_step(store: Arc<dyn Store>, failure: Failure) {
    let idem = Idempotency::from_arc(store);
    for k in 0..STEPS {
        let key = Key::new(
            "checkout",
            &format!("{failure:?}-{k}-{}", rand::random::<u64>()),
        )
        .unwrap();
        let effects = Effects::default();
        let first = AssertUnwindSafe(attempt(&idem, key, &effects, Some((k, failure))));
        match failure {
            Failure::Err => assert!(matches!(first.await, Err(Error::AttemptFailed))),
            Failure::Panic => assert!(first.catch_unwind().await.is_err(), "the body panicked"),
            Failure::Dropped => {
                let dropped = tokio::time::timeout(Duration::from_millis(300), first).await;
                assert!(dropped.is_err(), "the first attempt hangs after step {k}");
            }
        }
        for i in 0..STEPS {
            let expected = u32::from(i <= k);
            assert_eq!(
                effects.runs[i].load(Ordering::SeqCst),
                expected,
                "first attempt, step {i}"
            );
        }

        let retry = attempt(&idem, key, &effects, None).await.unwrap();
        assert_eq!(retry, vec![0, 10, 20, 30], "journaled results replay");
        for i in 0..STEPS {
            assert_eq!(
                effects.runs[i].load(Ordering::SeqCst),
                1,
                "{failure:?} after step {k}: step {i} ran once"
            );
        }
        let replay = attempt(&idem, key, &effects, Some((0, Failure::Err)))
            .await
            .unwrap();
        assert_eq!(replay, retry, "the completed call replays");
        let keys = effects.keys.lock().unwrap();
        assert_eq!(keys.len(), STEPS);
        for (i, derived) in keys.iter() {
            assert_eq!(*derived, derive_step_key(key, &format!("step-{i}")));
        }
    }
}

/// A key reused with other arguments after an attempt that journaled
/// steps and failed (so no record holds the key) is `KeyReused`, as over a
/// record: the journal's values are of the other arguments' call, and are
/// neither replayed to this one nor run again for it. Calls with the first
/// arguments still resume the journal.
async fn other_arguments_do_not_resume_a_journal(store: Arc<dyn Store>) {
    let idem = Idempotency::from_arc(store);
    for expect_steps in [false, true] {
        let key = Key::new("charge", &rand::random::<u64>()).unwrap();
        let settings = Settings::builder()
            .lease(Duration::from_secs(2))
            .expect_steps(expect_steps)
            .build()
            .unwrap();
        let charged = Mutex::new(Vec::new());
        let attempt = |amount: u32, fail: bool| {
            let (settings, charged) = (&settings, &charged);
            let idem = &idem;
            async move {
                idem.run(settings, key, Fingerprint::of(&amount)?, async move {
                    let charge = step("charge", async {
                        charged.lock().unwrap().push(amount);
                        Ok::<_, Error>(amount)
                    })
                    .await?;
                    if fail {
                        return Err(Error::AttemptFailed);
                    }
                    Ok(charge)
                })
                .await
            }
        };
        assert!(matches!(
            attempt(100, true).await,
            Err(Error::AttemptFailed)
        ));
        let reused = attempt(200, false).await;
        assert!(
            matches!(reused, Err(Error::KeyReused)),
            "expect_steps {expect_steps}: {reused:?}"
        );
        assert_eq!(
            *charged.lock().unwrap(),
            vec![100],
            "the step ran for 100 only"
        );
        assert_eq!(
            attempt(100, false).await.unwrap(),
            100,
            "the first arguments resume"
        );
        assert_eq!(*charged.lock().unwrap(), vec![100]);
        assert!(matches!(attempt(200, false).await, Err(Error::KeyReused)));
    }
}

/// A call that charged, failed for good and could not refund yet (its
/// undo failed): a call of the same key with other arguments that fails
/// for good before its first step (a cached `Err`, or a failure marked
/// final) finds the journal another call's as it looks for compensations
/// to finish. It is `KeyReused`, stores nothing and compensates nothing,
/// and the first arguments' retry finishes the refund.
async fn other_arguments_leave_a_compensation_to_its_call(store: Arc<dyn Store>) {
    let idem = Idempotency::from_arc(store);
    let key = Key::new("refund", &rand::random::<u64>()).unwrap();
    let log = Log::default();
    let undo_fails = Arc::new(AtomicU32::new(1));
    let settings = settings();
    let charge_then_decline = || {
        let (idem, settings) = (&idem, &settings);
        let (log, refunds) = (Arc::clone(&log), Arc::clone(&log));
        let undo_fails = Arc::clone(&undo_fails);
        async move {
            idem.run_caching_errors(
                settings,
                key,
                Fingerprint::of(&100).unwrap(),
                |_: &String| true,
                async move {
                    step("charge", async {
                        note(&log, "charge 100");
                        Ok::<_, String>(100)
                    })
                    .compensate(move |charged: u32| async move {
                        if undo_fails
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                            .is_ok()
                        {
                            note(&refunds, "refund failed");
                            return Err("the gateway is down".to_owned());
                        }
                        note(&refunds, &format!("refund {charged}"));
                        Ok::<_, String>(())
                    })
                    .await?;
                    Err::<u32, _>("declined".to_owned())
                },
            )
            .await
        }
    };
    assert_eq!(charge_then_decline().await, Err("declined".to_owned()));
    assert_eq!(entries(&log), ["charge 100", "refund failed"]);

    // Its error would be cached: it is idem's `KeyReused` instead (as a
    // `String`, the body's error type).
    let cached: Result<u32, String> = idem
        .run_caching_errors(
            &settings,
            key,
            Fingerprint::of(&200).unwrap(),
            |_: &String| true,
            async { Err("bad input for 200".to_owned()) },
        )
        .await;
    assert_eq!(cached, Err(Error::KeyReused.to_string()));
    let marked: Result<u32, Error> = idem
        .run(&settings, key, Fingerprint::of(&200).unwrap(), async {
            idem_core::mark_final()?;
            Err(Error::AttemptFailed)
        })
        .await;
    assert!(matches!(marked, Err(Error::KeyReused)), "{marked:?}");
    assert_eq!(
        entries(&log),
        ["charge 100", "refund failed"],
        "nothing undone"
    );

    assert_eq!(charge_then_decline().await, Err("declined".to_owned()));
    assert_eq!(entries(&log), ["charge 100", "refund failed", "refund 100"]);
}

/// Callers in this process that joined a call of other arguments than the
/// journal's (the same arguments as that call) are `KeyReused` with it.
async fn followers_of_a_call_of_other_arguments_are_told_key_reused(store: Arc<dyn Store>) {
    let idem = Idempotency::from_arc(store);
    let key = Key::new("followers", &rand::random::<u64>()).unwrap();
    let first: Result<u32, Error> = idem
        .run(&settings(), key, Fingerprint::of(&100).unwrap(), async {
            step("charge", async { Ok::<_, Error>(100) }).await?;
            Err(Error::AttemptFailed)
        })
        .await;
    assert!(matches!(first, Err(Error::AttemptFailed)));
    let other = |pause: Duration| {
        let idem = idem.clone();
        async move {
            idem.run(
                &settings(),
                key,
                Fingerprint::of(&200).unwrap(),
                async move {
                    tokio::time::sleep(pause).await;
                    step("charge", async { Ok::<_, Error>(200) }).await
                },
            )
            .await
        }
    };
    let leader = tokio::spawn(other(Duration::from_millis(300)));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let followers: Vec<_> = (0..3)
        .map(|_| tokio::spawn(other(Duration::ZERO)))
        .collect();
    assert!(matches!(leader.await.unwrap(), Err(Error::KeyReused)));
    for follower in followers {
        let answer = follower.await.unwrap();
        assert!(matches!(answer, Err(Error::KeyReused)), "{answer:?}");
    }
}

/// A name used twice in one attempt fails, and the second work does not run.
async fn repeated_names_fail(store: Arc<dyn Store>) {
    let idem = Idempotency::from_arc(store);
    let key = Key::new("repeat", &rand::random::<u64>()).unwrap();
    let runs = AtomicU32::new(0);
    let result: Result<(), Error> = idem
        .run(&settings(), key, Fingerprint::of(&()).unwrap(), async {
            for _ in 0..2 {
                step("same", async {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Error>(())
                })
                .await?;
            }
            Ok(())
        })
        .await;
    assert!(
        matches!(result, Err(Error::StepRepeated { ref name }) if name == "same"),
        "{result:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A step that fails is not journaled: it runs again on the next attempt.
async fn failed_steps_run_again(store: Arc<dyn Store>) {
    let idem = Idempotency::from_arc(store);
    let key = Key::new("flaky", &rand::random::<u64>()).unwrap();
    let runs = AtomicU32::new(0);
    for attempt in 0..2 {
        let result: Result<u32, Error> = idem
            .run(&settings(), key, Fingerprint::of(&()).unwrap(), async {
                step("flaky", async {
                    let n = runs.fetch_add(1, Ordering::SeqCst);
                    if attempt == 0 {
                        Err(Error::AttemptFailed)
                    } else {
                        Ok(n)
                    }
                })
                .await
            })
            .await;
        assert_eq!(result.is_ok(), attempt == 1);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// A holder whose claim is gone (here forgotten by an operator) cannot
/// journal its step: the call stops with `StepLost`.
async fn a_lost_claim_stops_the_call(store: Arc<dyn Store>) {
    let idem = Idempotency::from_arc(Arc::clone(&store));
    let key = Key::new("lost", &rand::random::<u64>()).unwrap();
    let result: Result<(), Error> = idem
        .run(&settings(), key, Fingerprint::of(&()).unwrap(), async {
            step("before", async { Ok::<_, Error>(()) }).await?;
            store.forget(key).await?;
            step("after", async { Ok::<_, Error>(()) }).await
        })
        .await;
    assert!(
        matches!(result, Err(Error::StepLost { ref name }) if name == "after"),
        "{result:?}"
    );
    assert!(
        store.steps(key).await.unwrap().is_empty(),
        "forget deletes the journal"
    );
}

/// The body's fencing epoch: the same throughout an attempt, larger on the
/// next attempt of the call, refused once the claim is lost and outside a
/// call.
async fn epochs_fence_each_attempt(store: Arc<dyn Store>) {
    use std::sync::atomic::AtomicU64;
    let idem = Idempotency::from_arc(Arc::clone(&store));
    let key = Key::new("epochs", &rand::random::<u64>()).unwrap();
    let fp = Fingerprint::of(&()).unwrap();
    let seen = AtomicU64::new(0);
    let first: Result<(), Error> = idem
        .run(&settings(), key, fp, async {
            let epoch = idem_core::epoch().await?;
            assert_eq!(idem_core::epoch().await?, epoch, "one epoch per attempt");
            seen.store(epoch, Ordering::SeqCst);
            Err(Error::AttemptFailed)
        })
        .await;
    assert!(matches!(first, Err(Error::AttemptFailed)), "{first:?}");
    let second: u64 = idem
        .run(&settings(), key, fp, async { idem_core::epoch().await })
        .await
        .unwrap();
    assert!(
        second > seen.load(Ordering::SeqCst),
        "the next attempt's is larger"
    );

    let lost = Key::new("epochs-lost", &rand::random::<u64>()).unwrap();
    let result: Result<u64, Error> = idem
        .run(&settings(), lost, fp, async {
            store.forget(lost).await?;
            idem_core::epoch().await
        })
        .await;
    assert!(matches!(result, Err(Error::ClaimLost)), "{result:?}");
    assert!(matches!(
        idem_core::epoch().await,
        Err(Error::OutsideCall { what: "epoch" })
    ));
}

/// What happened, in order, across attempts of a compensated call.
type Log = Arc<Mutex<Vec<String>>>;

fn note(log: &Log, entry: &str) {
    log.lock().unwrap().push(entry.to_owned());
}

/// Step `charge` (30), noted as `charge` when its work runs; its undo is
/// noted as `refund 30`.
fn charge(log: Log) -> idem_core::Step<impl Future<Output = Result<u32, String>>> {
    let undo_log = Arc::clone(&log);
    step("charge", async move {
        note(&log, "charge");
        Ok::<_, String>(30)
    })
    .compensate(move |amount: u32| async move {
        note(&undo_log, &format!("refund {amount}"));
        Ok::<_, String>(())
    })
}

fn entries(log: &Log) -> Vec<String> {
    log.lock().unwrap().clone()
}

/// An attempt of a three-step call: reserve and charge (each with its
/// undo), then a shipping step that fails with a cached "out of stock".
/// `undo_fails` makes the charge's undo fail this many times first.
async fn compensated_attempt(
    idem: &Idempotency,
    key: Key,
    log: &Log,
    undo_fails: Arc<AtomicU32>,
) -> Result<u32, String> {
    let fp = Fingerprint::of(&"order").unwrap();
    idem.run_caching_errors(&settings(), key, fp, |_: &String| true, async {
        let reserved = step("reserve", async {
            note(log, "reserve");
            Ok::<_, String>(2)
        })
        .compensate({
            let log = Arc::clone(log);
            move |items: u32| async move {
                note(&log, &format!("release {items}"));
                Ok::<_, String>(())
            }
        })
        .await?;
        let charged = step("charge", async {
            note(log, "charge");
            Ok::<_, String>(30)
        })
        .compensate({
            let log = Arc::clone(log);
            move |amount: u32| async move {
                if undo_fails
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
                {
                    note(&log, "refund failed");
                    return Err("the gateway is down".to_owned());
                }
                note(&log, &format!("refund {amount}"));
                Ok::<_, String>(())
            }
        })
        .await?;
        step("ship", async {
            note(log, "ship");
            Err::<u32, _>("out of stock".to_owned())
        })
        .await?;
        Ok(reserved + charged)
    })
    .await
}

/// A call that fails for good (its `Err` is cached) undoes its completed
/// steps, last first, each once; its retry replays the failure and runs
/// nothing.
async fn a_final_failure_compensates_completed_steps(store: Arc<dyn Store>) {
    let idem = Idempotency::from_arc(store);
    let key = Key::new("compensated", &rand::random::<u64>()).unwrap();
    let log = Log::default();
    let never = Arc::new(AtomicU32::new(0));
    let first = compensated_attempt(&idem, key, &log, never.clone()).await;
    assert_eq!(first, Err("out of stock".to_owned()));
    assert_eq!(
        entries(&log),
        ["reserve", "charge", "ship", "refund 30", "release 2"]
    );
    let retry = compensated_attempt(&idem, key, &log, never).await;
    assert_eq!(retry, Err("out of stock".to_owned()), "the failure replays");
    assert_eq!(entries(&log).len(), 5, "nothing ran again");
    assert_eq!(
        idem.steps_done(key).await.unwrap(),
        ["reserve", "charge", "final", "undo:charge", "undo:reserve"]
    );
}

/// An undo that fails stops the compensation and releases the claim; the
/// next attempt replays the steps (running none), finishes the undos not
/// yet done, and answers the failure recorded when the call failed for
/// good.
async fn a_failed_compensation_is_finished_by_the_next_attempt(store: Arc<dyn Store>) {
    let idem = Idempotency::from_arc(store);
    let key = Key::new("compensation-retried", &rand::random::<u64>()).unwrap();
    let log = Log::default();
    let fails_once = Arc::new(AtomicU32::new(1));
    let first = compensated_attempt(&idem, key, &log, fails_once.clone()).await;
    assert_eq!(first, Err("out of stock".to_owned()));
    assert_eq!(
        entries(&log),
        ["reserve", "charge", "ship", "refund failed"]
    );
    let second = compensated_attempt(&idem, key, &log, fails_once.clone()).await;
    assert_eq!(
        second,
        Err("out of stock".to_owned()),
        "the recorded failure"
    );
    assert_eq!(
        entries(&log),
        [
            "reserve",
            "charge",
            "ship",
            "refund failed",
            "refund 30",
            "release 2"
        ],
        "no step ran again; the undos not done ran once"
    );
    let third = compensated_attempt(&idem, key, &log, fails_once).await;
    assert_eq!(third, Err("out of stock".to_owned()));
    assert_eq!(entries(&log).len(), 6, "and the failure is recorded");
}

/// A call dropped while it undoes its steps (as a crash would stop it)
/// finishes the compensation on its next attempt, once its lease lapsed.
async fn a_compensation_cut_short_is_finished_after_the_lease(store: Arc<dyn Store>) {
    let idem = Idempotency::from_arc(store);
    let key = Key::new("compensation-dropped", &rand::random::<u64>()).unwrap();
    let fp = Fingerprint::of(&"order").unwrap();
    let log = Log::default();
    let attempt = |hang: bool| {
        let log = Arc::clone(&log);
        let idem = idem.clone();
        async move {
            idem.run_caching_errors(&settings(), key, fp, |_: &String| true, async {
                step("charge", async {
                    note(&log, "charge");
                    Ok::<_, String>(30)
                })
                .compensate({
                    let log = Arc::clone(&log);
                    move |amount: u32| async move {
                        if hang {
                            std::future::pending::<()>().await;
                        }
                        note(&log, &format!("refund {amount}"));
                        Ok::<_, String>(())
                    }
                })
                .await?;
                Err::<u32, _>("declined later".to_owned())
            })
            .await
        }
    };
    let cut = tokio::time::timeout(Duration::from_millis(300), attempt(true)).await;
    assert!(cut.is_err(), "dropped mid-compensation");
    tokio::time::sleep(settings().lease() + Duration::from_millis(500)).await;
    assert_eq!(attempt(false).await, Err("declined later".to_owned()));
    assert_eq!(entries(&log), ["charge", "refund 30"]);
}

/// A failure the body marks final is compensated though the error is not
/// stored; the call then records that it failed for good, so its retry
/// gets `NotReplayable` and runs nothing.
async fn a_failure_marked_final_is_compensated(store: Arc<dyn Store>) {
    let idem = Idempotency::from_arc(store);
    let key = Key::new("marked-final", &rand::random::<u64>()).unwrap();
    let fp = Fingerprint::of(&()).unwrap();
    let log = Log::default();
    let attempt = || async {
        idem.run(&settings(), key, fp, async {
            step("charge", async {
                note(&log, "charge");
                Ok::<_, Error>(30)
            })
            .compensate({
                let log = Arc::clone(&log);
                move |amount: u32| async move {
                    note(&log, &format!("refund {amount}"));
                    Ok::<_, Error>(())
                }
            })
            .await?;
            idem_core::mark_final()?;
            Err::<u32, _>(Error::AttemptFailed)
        })
        .await
    };
    assert!(matches!(attempt().await, Err(Error::AttemptFailed)));
    assert_eq!(entries(&log), ["charge", "refund 30"]);
    let retry = attempt().await;
    assert!(
        matches!(retry, Err(Error::NotReplayable { .. })),
        "{retry:?}"
    );
    assert_eq!(entries(&log).len(), 2, "nothing ran again");
}

/// Runs `idem-steps-crash` on `store_url` for `order` in `mode`; answers
/// its first line when it waits to be killed (then kills it with
/// SIGKILL), or its whole output when it ends.
#[cfg(feature = "redis")]
fn crash_process(
    store_url: &str,
    order: &str,
    counter_url: &str,
    mode: &str,
    killed: bool,
) -> String {
    use std::io::BufRead as _;
    use std::process::{Command, Stdio};
    let binary = env!("CARGO_BIN_EXE_idem-steps-crash");
    let mut child = Command::new(binary)
        .args([store_url, order, counter_url, mode])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if killed {
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        return line.trim().to_owned();
    }
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// A process killed with `kill -9` after step k: a new process running the
/// call resumes at step k + 1, each step's effect counted once, and sees
/// the same derived keys.
#[cfg(feature = "redis")]
fn killed_processes_resume(store_url: &str) {
    let counter = idem_test::redis_server::RedisServer::start();
    for k in 0..STEPS {
        let order = format!("order-{k}-{}", rand::random::<u64>());
        let said = crash_process(store_url, &order, &counter.url(), &k.to_string(), true);
        assert_eq!(said, format!("after {k}"));
        let count = |i: usize| counter.cli(&["GET", &format!("{order}:step-{i}")]);
        for i in 0..STEPS {
            let expected = if i <= k { "1" } else { "" };
            assert_eq!(count(i).trim(), expected, "killed after step {k}: step {i}");
        }

        let retry = crash_process(store_url, &order, &counter.url(), "none", false);
        let key = Key::new("steps-crash", &order).unwrap();
        let expected: Vec<String> = (0..STEPS)
            .map(|i| derive_step_key(key, &format!("step-{i}")))
            .collect();
        assert_eq!(retry, expected.join(","));
        for i in 0..STEPS {
            assert_eq!(count(i).trim(), "1", "after the retry: step {i} ran once");
        }
    }
}

/// A call that failed for good, its process killed with `kill -9` while
/// undoing step k (the undos of the later steps done): the next process
/// finishes the compensation, undoing steps k down to 0, each once, runs
/// no step again, and answers the failure; a third replays it.
#[cfg(feature = "redis")]
fn killed_compensations_finish(store_url: &str) {
    let counter = idem_test::redis_server::RedisServer::start();
    for k in 0..STEPS {
        let order = format!("undo-{k}-{}", rand::random::<u64>());
        let said = crash_process(
            store_url,
            &order,
            &counter.url(),
            &format!("undo-{k}"),
            true,
        );
        assert_eq!(said, format!("undoing {k}"));
        let count = |what: &str, i: usize| counter.cli(&["GET", &format!("{order}:{what}-{i}")]);
        for i in 0..STEPS {
            let expected = if i > k { "1" } else { "" };
            assert_eq!(
                count("undo", i).trim(),
                expected,
                "killed undoing {k}: undo {i}"
            );
        }
        // The next process waits for the killed one's lease to lapse.
        let next = crash_process(store_url, &order, &counter.url(), "none", false);
        assert_eq!(next, "failed: out of stock", "the failure recorded then");
        let replay = crash_process(store_url, &order, &counter.url(), "none", false);
        assert_eq!(replay, "failed: out of stock");
        for i in 0..STEPS {
            assert_eq!(count("step", i).trim(), "1", "step {i} ran once");
            assert_eq!(count("undo", i).trim(), "1", "step {i} was undone once");
        }
    }
}

/// A name of `len` random letters (which PostgreSQL cannot compress).
fn random_name(len: usize) -> String {
    (0..len)
        .map(|_| char::from(b'a' + rand::random::<u8>() % 26))
        .collect()
}

/// Names that start with U+0001 (idem's own journal entries), contain
/// U+0000 (which PostgreSQL's text cannot keep) or are longer than 1 KiB
/// (which PostgreSQL's index of names cannot hold) are refused before the
/// work runs, on every store alike, on every attempt; a name of 1 KiB is
/// journaled once.
async fn reserved_step_names_are_refused(store: Arc<dyn Store>) {
    let idem = Idempotency::from_arc(store);
    let longest = random_name(idem_core::MAX_STEP_NAME_LEN);
    let key = Key::new("longest-name", &rand::random::<u64>()).unwrap();
    let ran = AtomicU32::new(0);
    for _ in 0..2 {
        let result: Result<(), Error> = idem
            .run(&settings(), key, Fingerprint::of(&()).unwrap(), async {
                step(&longest, async {
                    ran.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Error>(())
                })
                .await?;
                Err(Error::AttemptFailed)
            })
            .await;
        assert!(matches!(result, Err(Error::AttemptFailed)), "{result:?}");
    }
    assert_eq!(
        ran.load(Ordering::SeqCst),
        1,
        "a name of 1 KiB is journaled"
    );
    let too_long = random_name(idem_core::MAX_STEP_NAME_LEN + 1);
    for name in ["\u{1}final", "charge\0eu", "\0", too_long.as_str()] {
        let key = Key::new("reserved", &rand::random::<u64>()).unwrap();
        let ran = AtomicU32::new(0);
        for _ in 0..2 {
            let result: Result<(), Error> = idem
                .run(&settings(), key, Fingerprint::of(&()).unwrap(), async {
                    step(name, async {
                        ran.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, Error>(())
                    })
                    .await
                })
                .await;
            assert!(
                matches!(&result, Err(Error::InvalidStepName { name: n }) if n == name),
                "{name:?}: {result:?}"
            );
        }
        assert_eq!(ran.load(Ordering::SeqCst), 0, "{name:?}");
    }
}

/// `forget` of a key that holds a journal alone (its call failed and
/// released its claim) deletes the journal and answers `false`, as of a
/// key that holds nothing; the next call starts afresh.
async fn forgetting_a_journal_alone_answers_false(store: Arc<dyn Store>) {
    let idem = Idempotency::from_arc(store);
    let key = Key::new("journal-alone", &rand::random::<u64>()).unwrap();
    let ran = AtomicU32::new(0);
    let attempt = |fail: bool| {
        let (idem, ran) = (&idem, &ran);
        async move {
            idem.run(
                &settings(),
                key,
                Fingerprint::of(&()).unwrap(),
                async move {
                    step("reserve", async {
                        ran.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, Error>(1)
                    })
                    .await?;
                    if fail {
                        return Err(Error::AttemptFailed);
                    }
                    Ok(2)
                },
            )
            .await
        }
    };
    assert!(attempt(true).await.is_err());
    assert_eq!(idem.steps_done(key).await.unwrap(), ["reserve"]);
    assert!(
        !idem.forget(key).await.unwrap(),
        "a journal alone answers false"
    );
    assert!(
        idem.steps_done(key).await.unwrap().is_empty(),
        "the journal is gone"
    );
    assert_eq!(attempt(false).await.unwrap(), 2);
    assert_eq!(ran.load(Ordering::SeqCst), 2, "the step ran afresh");
}

/// A compensation left unfinished (its undo failed) and an attempt whose
/// body returns `Ok` before reaching its steps: a call that expects steps
/// read the journal with its claim, so that attempt answers the failure
/// recorded when the call failed for good and stores nothing, and the next
/// attempt that reaches the step finishes the compensation.
async fn an_attempt_returning_before_its_steps_does_not_end_a_compensation(store: Arc<dyn Store>) {
    let idem = Idempotency::from_arc(store);
    let key = Key::new("returns-early", &rand::random::<u64>()).unwrap();
    let log = Log::default();
    let undo_fails = Arc::new(AtomicU32::new(1));
    let expecting = Settings::builder()
        .lease(Duration::from_secs(2))
        .ttl(Duration::from_secs(120))
        .expect_steps(true)
        .build()
        .unwrap();
    let attempt = |early: bool| {
        let (log, undo_fails) = (Arc::clone(&log), Arc::clone(&undo_fails));
        let fp = Fingerprint::of(&"order").unwrap();
        idem.run_caching_errors(&expecting, key, fp, |_: &String| true, async move {
            if early {
                return Ok(0);
            }
            let undo_log = Arc::clone(&log);
            step("charge", async {
                note(&log, "charge");
                Ok::<_, String>(30)
            })
            .compensate(move |amount: u32| async move {
                if undo_fails
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
                {
                    return Err("the gateway is down".to_owned());
                }
                note(&undo_log, &format!("refund {amount}"));
                Ok::<_, String>(())
            })
            .await?;
            Err("declined".to_owned())
        })
    };
    assert_eq!(attempt(false).await, Err("declined".to_owned()));
    assert_eq!(attempt(true).await, Err("declined".to_owned()), "early");
    assert_eq!(entries(&log), ["charge"], "nothing undone yet");
    assert_eq!(attempt(false).await, Err("declined".to_owned()));
    assert_eq!(entries(&log), ["charge", "refund 30"]);
    assert_eq!(attempt(true).await, Err("declined".to_owned()), "stored");
    assert_eq!(
        idem.steps_done(key).await.unwrap(),
        ["charge", "final", "undo:charge"]
    );
}

/// A result that fails to serialize, with a message of this many bytes
/// (the default: a short one).
#[derive(Debug, Default)]
struct Unserializable(usize);

impl serde::Serialize for Unserializable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        let message = "a receipt without its currency";
        Err(serde::ser::Error::custom(if self.0 > message.len() {
            "x".repeat(self.0)
        } else {
            message.to_owned()
        }))
    }
}

impl<'de> serde::Deserialize<'de> for Unserializable {
    fn deserialize<D: serde::Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        Ok(Self(0))
    }
}

/// A step whose result does not serialize ran all the same: its first
/// attempt fails with `Encode`, and every later attempt with
/// `NotReplayable`, without running its work again; the steps before it
/// replay.
async fn a_step_whose_result_does_not_serialize_runs_once(store: Arc<dyn Store>) {
    let idem = Idempotency::from_arc(store);
    let key = Key::new("unserializable", &rand::random::<u64>()).unwrap();
    let (reserved, charged) = (AtomicU32::new(0), AtomicU32::new(0));
    let mut answers = Vec::new();
    for _ in 0..3 {
        let result: Result<(), Error> = idem
            .run(&settings(), key, Fingerprint::of(&()).unwrap(), async {
                step("reserve", async {
                    Ok::<_, Error>(reserved.fetch_add(1, Ordering::SeqCst))
                })
                .await?;
                step("charge", async {
                    charged.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Error>(Unserializable::default())
                })
                .await?;
                Ok(())
            })
            .await;
        answers.push(result);
    }
    assert_eq!(charged.load(Ordering::SeqCst), 1, "the charge ran once");
    assert_eq!(
        reserved.load(Ordering::SeqCst),
        1,
        "the reservation replays"
    );
    assert!(
        matches!(answers[0], Err(Error::Encode { .. })),
        "{:?}",
        answers[0]
    );
    for later in &answers[1..] {
        let Err(Error::NotReplayable { reason }) = later else {
            panic!("{later:?}");
        };
        assert!(reason.contains("charge"), "{reason}");
        assert!(reason.contains("without its currency"), "{reason}");
    }
    assert_eq!(idem.steps_done(key).await.unwrap(), ["reserve", "charge"]);
}

/// A serializer's message of any length, on a store with little room: the
/// journal keeps enough to say the step ran, and the step runs once.
#[tokio::test]
async fn a_long_serialization_error_still_journals_that_the_step_ran() {
    let idem = Idempotency::new(MemoryStore::builder().max_bytes(4096).build());
    let key = Key::new("unserializable", &rand::random::<u64>()).unwrap();
    let charged = AtomicU32::new(0);
    for attempt in 0..3 {
        let result: Result<(), Error> = idem
            .run(&settings(), key, Fingerprint::of(&()).unwrap(), async {
                step("charge", async {
                    charged.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Error>(Unserializable(10_000))
                })
                .await
                .map(|_| ())
            })
            .await;
        match (attempt, result) {
            (0, Err(Error::Encode { .. })) => {}
            (1.., Err(Error::NotReplayable { reason })) => {
                assert!(reason.len() < 1024, "{} bytes", reason.len());
            }
            (_, other) => panic!("attempt {attempt}: {other:?}"),
        }
    }
    assert_eq!(charged.load(Ordering::SeqCst), 1);
}

/// A key used again after its TTL, while the old journal's rows may still
/// be in the store (before a purge): a step journaled again under a name
/// the old journal had takes its place after the steps journaled before it,
/// so a later attempt that replays them undoes it first.
async fn a_journal_reused_after_its_ttl_keeps_the_completion_order(store: Arc<dyn Store>) {
    let idem = Idempotency::from_arc(store);
    let key = Key::new("reused", &rand::random::<u64>()).unwrap();
    let fp = Fingerprint::of(&"order").unwrap();
    let short = Settings::builder()
        .lease(Duration::from_secs(2))
        .ttl(Duration::from_secs(3))
        .build()
        .unwrap();
    let first: Result<(), String> = idem
        .run(&short, key, fp, async {
            step("b", async { Ok::<_, String>(()) }).await
        })
        .await;
    first.unwrap();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let log = Log::default();
    for for_good in [false, true] {
        let log = Arc::clone(&log);
        let result: Result<(), String> = idem
            .run_caching_errors(
                &settings(),
                key,
                fp,
                |e: &String| e == "final",
                async move {
                    for name in ["a", "b"] {
                        let (log, undo_log) = (Arc::clone(&log), Arc::clone(&log));
                        step(name, async move {
                            note(&log, name);
                            Ok::<_, String>(())
                        })
                        .compensate(move |()| async move {
                            note(&undo_log, &format!("undo {name}"));
                            Ok::<_, String>(())
                        })
                        .await?;
                    }
                    Err(if for_good { "final" } else { "transient" }.to_owned())
                },
            )
            .await;
        assert!(result.is_err());
    }
    assert_eq!(entries(&log), ["a", "b", "undo b", "undo a"]);
}

/// Steps run together (`join!`) complete in their own order; the call's
/// compensation undoes the last completed first, whether it runs in the
/// attempt that ran them or in a later one that replays them (and so
/// resolves them in the order the body polls them).
async fn concurrent_steps_are_undone_last_completed_first(store: Arc<dyn Store>) {
    let idem = Idempotency::from_arc(store);
    for failing_attempt in [0, 1] {
        let key = Key::new("concurrent-undo", &rand::random::<u64>()).unwrap();
        let log = Log::default();
        for attempt in 0..=failing_attempt {
            let for_good = attempt == failing_attempt;
            let fp = Fingerprint::of(&"order").unwrap();
            let result: Result<(), String> = idem
                .run_caching_errors(&settings(), key, fp, |e: &String| e == "final", async {
                    let timed = |name: &'static str, after: u64| {
                        let (log, undo_log) = (Arc::clone(&log), Arc::clone(&log));
                        step(name, async move {
                            tokio::time::sleep(Duration::from_millis(after)).await;
                            note(&log, name);
                            Ok::<_, String>(())
                        })
                        .compensate(move |()| async move {
                            note(&undo_log, &format!("undo {name}"));
                            Ok::<_, String>(())
                        })
                        .into_future()
                    };
                    // Polled slow first, completed fast first.
                    let (slow, fast) = tokio::join!(timed("slow", 150), timed("fast", 5));
                    slow?;
                    fast?;
                    Err(if for_good { "final" } else { "transient" }.to_owned())
                })
                .await;
            let expected = if for_good { "final" } else { "transient" };
            assert_eq!(result, Err(expected.to_owned()));
        }
        assert_eq!(
            entries(&log),
            ["fast", "slow", "undo slow", "undo fast"],
            "failing for good in attempt {failing_attempt}"
        );
    }
}

/// A call that fails for good before reaching a step journaled (with an
/// undo) by an earlier attempt cannot undo that step yet: its outcome is
/// not recorded, and the next attempt that reaches the step finishes the
/// compensation and answers the failure recorded first.
async fn a_step_not_reached_is_undone_by_a_later_attempt(store: Arc<dyn Store>) {
    let idem = Idempotency::from_arc(store);
    let key = Key::new("not-reached", &rand::random::<u64>()).unwrap();
    let fp = Fingerprint::of(&()).unwrap();
    let log = Log::default();
    // `stop_after`: the body returns `failure` after this many steps.
    let attempt = |stop_after: usize, failure: &'static str| {
        let (idem, log) = (idem.clone(), Arc::clone(&log));
        async move {
            let is_final = |e: &String| e.starts_with("final");
            idem.run_caching_errors(&settings(), key, fp, is_final, async {
                for (i, name) in ["a", "b"].into_iter().enumerate() {
                    if i == stop_after {
                        return Err::<(), _>(failure.to_owned());
                    }
                    step(name, async {
                        note(&log, name);
                        Ok::<_, String>(())
                    })
                    .compensate({
                        let log = Arc::clone(&log);
                        move |()| async move {
                            note(&log, &format!("undo {name}"));
                            Ok::<_, String>(())
                        }
                    })
                    .await?;
                }
                Err(failure.to_owned())
            })
            .await
        }
    };
    assert_eq!(attempt(2, "transient").await, Err("transient".to_owned()));
    assert_eq!(
        attempt(1, "final: declined").await,
        Err("final: declined".to_owned())
    );
    assert_eq!(
        entries(&log),
        ["a", "b", "undo a"],
        "b's undo is not known to an attempt that stopped before b"
    );
    assert_eq!(
        attempt(2, "something else").await,
        Err("final: declined".to_owned()),
        "the failure recorded first"
    );
    assert_eq!(entries(&log), ["a", "b", "undo a", "undo b"]);
    assert_eq!(
        attempt(2, "again").await,
        Err("final: declined".to_owned()),
        "and now stored"
    );
    assert_eq!(entries(&log).len(), 4);
}

/// A stored failure too large to keep whole is still a failure for good:
/// its steps are undone. An undo runs in the call's scope: it can read the
/// call's fencing epoch.
async fn a_failure_too_large_to_keep_is_compensated(store: Arc<dyn Store>) {
    let idem = Idempotency::from_arc(store).max_record_bytes(64);
    let key = Key::new("too-large", &rand::random::<u64>()).unwrap();
    let fp = Fingerprint::of(&()).unwrap();
    let log = Log::default();
    let result: Result<(), String> = idem
        .run_caching_errors(&settings(), key, fp, |_: &String| true, async {
            step("charge", async {
                note(&log, "charge");
                Ok::<_, String>(())
            })
            .compensate({
                let log = Arc::clone(&log);
                move |()| async move {
                    let epoch = idem_core::epoch().await.map_err(|e| e.to_string())?;
                    note(&log, &format!("refund at epoch {}", epoch > 0));
                    Ok::<_, String>(())
                }
            })
            .await?;
            Err("x".repeat(1000))
        })
        .await;
    assert_eq!(
        result.map_err(|e| e.len()),
        Err(1000),
        "its own caller gets it"
    );
    assert_eq!(entries(&log), ["charge", "refund at epoch true"]);
}

/// A holder paused past its lease, whose call another holder took over
/// and completed, undoes nothing when its own body then fails for good: its
/// claim is lost, the completed call keeps its effects, and later calls
/// replay its result.
async fn a_stalled_holder_undoes_nothing_another_completed(store: Arc<dyn Store>) {
    let flaky = Arc::new(idem_test::faults::Flaky::new(store));
    // Two processes: the frozen one, and the one that takes over.
    let (frozen, other) = (
        Idempotency::from_arc(flaky.clone()),
        Idempotency::from_arc(flaky.clone()),
    );
    let key = Key::new("stalled-holder", &rand::random::<u64>()).unwrap();
    let fp = Fingerprint::of(&"order").unwrap();
    let log = Log::default();
    let lease = settings().lease();
    let (completed, resume) = tokio::sync::oneshot::channel::<()>();
    let attempt = |idem: &Idempotency, stall: Option<tokio::sync::oneshot::Receiver<()>>| {
        let (log, idem, flaky) = (Arc::clone(&log), idem.clone(), Arc::clone(&flaky));
        async move {
            idem.run_caching_errors(&settings(), key, fp, |_: &String| true, async {
                let amount = charge(Arc::clone(&log)).await?;
                let Some(resume) = stall else {
                    return Ok(amount);
                };
                // Frozen: no renewal reaches the store until another
                // holder took the call over and completed it.
                flaky.stall(key, tokio::time::Instant::now() + lease * 10);
                let _ = resume.await;
                Err("declined after a pause".to_owned())
            })
            .await
        }
    };
    let stalled = tokio::spawn(attempt(&frozen, Some(resume)));
    tokio::time::sleep(lease + Duration::from_millis(700)).await;
    assert_eq!(
        attempt(&other, None).await,
        Ok(30),
        "the next holder replays the step"
    );
    assert!(
        completed.send(()).is_ok(),
        "the frozen holder was still paused when the other completed"
    );
    let _ = stalled.await.unwrap();
    assert_eq!(
        attempt(&frozen, None).await,
        Ok(30),
        "the completed call's result stands"
    );
    assert_eq!(entries(&log), ["charge"], "nothing was undone");
}

/// A holder paused past its lease while it finishes an earlier attempt's
/// compensation undoes nothing that the holder which took over undid: its
/// undos wait for a write fenced by its claim, which the store refuses.
async fn a_stalled_holder_finishing_a_compensation_undoes_nothing_twice(store: Arc<dyn Store>) {
    let flaky = Arc::new(idem_test::faults::Flaky::new(store));
    let (frozen, other) = (
        Idempotency::from_arc(flaky.clone()),
        Idempotency::from_arc(flaky.clone()),
    );
    let key = Key::new("stalled-compensation", &rand::random::<u64>()).unwrap();
    let fp = Fingerprint::of(&"order").unwrap();
    let log = Log::default();
    let refunds = Arc::new(AtomicU32::new(0));
    let lease = settings().lease();
    let attempt = |idem: &Idempotency, stall: Option<tokio::sync::oneshot::Receiver<()>>| {
        let (log, idem, flaky, refunds) = (
            Arc::clone(&log),
            idem.clone(),
            Arc::clone(&flaky),
            Arc::clone(&refunds),
        );
        async move {
            idem.run_caching_errors(&settings(), key, fp, |_: &String| true, async {
                step("charge", async {
                    note(&log, "charge");
                    Ok::<_, String>(30)
                })
                .compensate({
                    let log = Arc::clone(&log);
                    move |amount: u32| async move {
                        // The refund service is down for the first try.
                        if refunds.fetch_add(1, Ordering::SeqCst) == 0 {
                            return Err("the refund service is down".to_owned());
                        }
                        note(&log, &format!("refund {amount}"));
                        Ok::<_, String>(())
                    }
                })
                .await?;
                if let Some(resume) = stall {
                    // Frozen until another holder took the call over; its
                    // body then returns `Ok`, which is not the call's
                    // answer: the call failed for good.
                    flaky.stall(key, tokio::time::Instant::now() + lease * 10);
                    let _ = resume.await;
                    return Ok(30);
                }
                Err::<u32, _>("declined".to_owned())
            })
            .await
        }
    };
    // The call fails for good; its refund fails, so it is left unfinished.
    assert!(attempt(&frozen, None).await.is_err());
    assert_eq!(entries(&log), ["charge"]);
    // The next attempt, which would finish it, pauses past its lease.
    let (completed, resume) = tokio::sync::oneshot::channel::<()>();
    let stalled = tokio::spawn(attempt(&frozen, Some(resume)));
    tokio::time::sleep(lease + Duration::from_millis(700)).await;
    assert_eq!(
        attempt(&other, None).await,
        Err("declined".to_owned()),
        "the holder that took over finishes the compensation"
    );
    assert_eq!(entries(&log), ["charge", "refund 30"]);
    assert!(
        completed.send(()).is_ok(),
        "the paused holder was still paused when the other finished"
    );
    assert_eq!(
        stalled.await.unwrap(),
        Err("declined".to_owned()),
        "the paused holder's caller gets the recorded failure, not its body's result"
    );
    assert_eq!(
        attempt(&frozen, None).await,
        Err("declined".to_owned()),
        "the failure stands"
    );
    assert_eq!(entries(&log), ["charge", "refund 30"], "refunded once");
}

/// A step with a compensation whose append landed but whose answer was
/// lost fails the body; when that failure is kept, the step is undone
/// before it is final, though the attempt never heard the step was
/// journaled: the next attempt replays it and runs its compensation.
async fn a_step_whose_append_went_unanswered_is_still_undone(store: Arc<dyn Store>) {
    use idem_test::faults::{Fault, Flaky, Op};
    let flaky = Arc::new(Flaky::new(store));
    let idem = Idempotency::from_arc(flaky.clone());
    let key = Key::new("unanswered-append", &rand::random::<u64>()).unwrap();
    let fp = Fingerprint::of(&"order").unwrap();
    let log = Log::default();
    let settings = settings();
    let attempt = || {
        let log = Arc::clone(&log);
        idem.run_caching_errors(&settings, key, fp, |_: &String| true, async move {
            charge(Arc::clone(&log)).await?;
            Ok::<u32, String>(1)
        })
    };
    flaky.inject(Op::AppendStep, Fault::AnswerLost);
    let logs = idem_test::logs::capture();
    let first = attempt().await;
    assert!(first.is_err(), "the step's lost answer fails the body");
    assert_eq!(flaky.struck(Op::AppendStep), 1);
    // Its work ran: an operator is told it may run again.
    let told = logs.text();
    assert!(
        told.lines()
            .any(|line| line.contains("could not journal that a step ran")
                && line.contains("record_lost=true")
                && line.contains("WARN")),
        "{told}"
    );
    drop(logs);
    let second = attempt().await;
    assert_eq!(second, first, "the kept failure, once compensated");
    assert_eq!(entries(&log), ["charge", "refund 30"]);
    assert_eq!(attempt().await, first, "replayed");
    assert_eq!(entries(&log), ["charge", "refund 30"], "refunded once");
    assert_eq!(
        idem.steps_done(key).await.unwrap(),
        ["charge", "final", "undo:charge"]
    );
}

/// A step with a compensation dropped while its append was on its way (a
/// step run beside it failed, and `try_join!` dropped it) may be journaled
/// all the same: the failure waits for its compensation.
async fn a_step_dropped_during_its_append_is_still_undone(store: Arc<dyn Store>) {
    use idem_test::faults::{Fault, Flaky, Op};
    let flaky = Arc::new(Flaky::new(store));
    let idem = Idempotency::from_arc(flaky.clone());
    let key = Key::new("dropped-append", &rand::random::<u64>()).unwrap();
    let fp = Fingerprint::of(&"order").unwrap();
    let log = Log::default();
    let settings = settings();
    let attempt = || {
        let log = Arc::clone(&log);
        idem.run_caching_errors(&settings, key, fp, |_: &String| true, async move {
            let reserve = step("reserve", async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Err::<u32, _>("out of stock".to_owned())
            });
            let (_, charged) = tokio::try_join!(reserve.into_future(), charge(log).into_future())?;
            Ok::<u32, String>(charged)
        })
    };
    // The charge's append lands; its answer comes after the call gave up.
    flaky.inject(Op::AppendStep, Fault::Delayed(Duration::from_secs(1)));
    let failed = Err("out of stock".to_owned());
    assert_eq!(attempt().await, failed);
    assert_eq!(attempt().await, failed, "the failure, once compensated");
    assert_eq!(entries(&log), ["charge", "refund 30"]);
    assert_eq!(attempt().await, failed, "replayed");
    assert_eq!(entries(&log), ["charge", "refund 30"], "refunded once");
}

/// Steps run together with `try_join!`: one fails for good (its error is
/// kept) after the other completed, and the completed one's undo fails
/// once. The next attempt finishes the compensation: the step that must
/// not run fails only after the one beside it replayed and gave its undo.
async fn a_compensation_of_steps_run_together_finishes(store: Arc<dyn Store>) {
    let idem = Idempotency::from_arc(store);
    let key = Key::new("together", &rand::random::<u64>()).unwrap();
    let fp = Fingerprint::of(&"order").unwrap();
    let log = Log::default();
    let refunds = Arc::new(AtomicU32::new(0));
    let settings = settings();
    let attempt = || {
        let (log, refunds) = (Arc::clone(&log), Arc::clone(&refunds));
        idem.run_caching_errors(&settings, key, fp, |_: &String| true, async move {
            let reserve = step("reserve", async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Err::<u32, _>("out of stock".to_owned())
            });
            let charge = step("charge", async {
                note(&log, "charge");
                Ok::<_, String>(30)
            })
            .compensate({
                let log = Arc::clone(&log);
                move |amount: u32| async move {
                    if refunds.fetch_add(1, Ordering::SeqCst) == 0 {
                        return Err("the refund service is down".to_owned());
                    }
                    note(&log, &format!("refund {amount}"));
                    Ok::<_, String>(())
                }
            });
            let (_, charged) = tokio::try_join!(reserve.into_future(), charge.into_future())?;
            Ok::<u32, String>(charged)
        })
    };
    let failed = Err("out of stock".to_owned());
    assert_eq!(attempt().await, failed);
    assert_eq!(entries(&log), ["charge"], "the refund failed");
    assert_eq!(attempt().await, failed, "the failure, once compensated");
    assert_eq!(entries(&log), ["charge", "refund 30"]);
    assert_eq!(attempt().await, failed, "replayed");
    assert_eq!(entries(&log), ["charge", "refund 30"], "refunded once");
}

/// The journal entries that say a call failed for good and that an undo
/// ran are tried again while the claim holds: a store that refuses one
/// once, or loses its answer, neither leaves the failure unrecorded nor
/// makes the next attempt undo again.
async fn a_journal_entry_of_a_compensation_is_tried_again(store: Arc<dyn Store>) {
    use idem_test::faults::{Fault, Flaky, Op};
    let flaky = Arc::new(Flaky::new(store));
    let idem = Idempotency::from_arc(flaky.clone());
    let key = Key::new("compensation-entries", &rand::random::<u64>()).unwrap();
    let fp = Fingerprint::of(&"order").unwrap();
    let log = Log::default();
    let settings = settings();
    let attempt = || {
        let (log, flaky) = (Arc::clone(&log), Arc::clone(&flaky));
        idem.run_caching_errors(&settings, key, fp, |_: &String| true, async move {
            step("charge", async {
                note(&log, "charge");
                Ok::<_, String>(30)
            })
            .compensate({
                let (log, flaky) = (Arc::clone(&log), Arc::clone(&flaky));
                move |amount: u32| async move {
                    note(&log, &format!("refund {amount}"));
                    // The entry that says it ran: written, answer lost.
                    flaky.inject(Op::AppendStep, Fault::AnswerLost);
                    Ok::<_, String>(())
                }
            })
            .await?;
            // The entry that says the call failed for good: refused twice.
            flaky.inject(Op::AppendStep, Fault::Refused);
            flaky.inject(Op::AppendStep, Fault::Refused);
            Err::<u32, _>("declined".to_owned())
        })
    };
    let failed = Err("declined".to_owned());
    assert_eq!(attempt().await, failed);
    assert_eq!(flaky.struck(Op::AppendStep), 3);
    assert_eq!(
        entries(&log),
        ["charge", "refund 30"],
        "compensated at once"
    );
    assert_eq!(attempt().await, failed, "replayed");
    assert_eq!(entries(&log), ["charge", "refund 30"], "refunded once");
    assert_eq!(
        idem.steps_done(key).await.unwrap(),
        ["charge", "final", "undo:charge"]
    );
}

/// A store that keeps refusing a compensation's journal entry does not
/// hold the call: the entry is tried a few times, then the compensation is
/// left to the next attempt, which finishes it.
async fn a_journal_entry_the_store_keeps_refusing_is_left_to_the_next_attempt(
    store: Arc<dyn Store>,
) {
    use idem_test::faults::{Fault, Flaky, Op};
    let flaky = Arc::new(Flaky::new(store));
    let idem = Idempotency::from_arc(flaky.clone());
    let key = Key::new("refused-entries", &rand::random::<u64>()).unwrap();
    let fp = Fingerprint::of(&"order").unwrap();
    let log = Log::default();
    let settings = settings();
    let refusals = Arc::new(AtomicU32::new(5));
    let attempt = || {
        let (log, flaky, refusals) = (Arc::clone(&log), Arc::clone(&flaky), Arc::clone(&refusals));
        idem.run_caching_errors(&settings, key, fp, |_: &String| true, async move {
            charge(Arc::clone(&log)).await?;
            // The entry that says the call failed for good, refused on
            // every try of the first attempt.
            for _ in 0..refusals.swap(0, Ordering::SeqCst) {
                flaky.inject(Op::AppendStep, Fault::Refused);
            }
            Err::<u32, _>("declined".to_owned())
        })
    };
    let failed = Err("declined".to_owned());
    let first = tokio::time::timeout(settings.lease(), attempt())
        .await
        .expect("answered within a lease, not held by the retries");
    assert_eq!(first, failed);
    assert_eq!(flaky.struck(Op::AppendStep), 5, "tried five times");
    assert_eq!(entries(&log), ["charge"], "nothing undone yet");
    assert_eq!(attempt().await, failed);
    assert_eq!(
        entries(&log),
        ["charge", "refund 30"],
        "undone by the next attempt"
    );
    assert_eq!(attempt().await, failed, "replayed");
    assert_eq!(entries(&log), ["charge", "refund 30"]);
}

/// A step future polled once (its journal read begun) and then left
/// unpolled does not hold up the body's other steps: the read runs on its
/// own, and they share it.
async fn a_step_left_unpolled_while_it_reads_the_journal_holds_up_no_other(store: Arc<dyn Store>) {
    let idem = Idempotency::from_arc(store);
    let key = Key::new("unpolled-step", &rand::random::<u64>()).unwrap();
    let fp = Fingerprint::of(&"order").unwrap();
    let settings = settings();
    let run = idem.run(&settings, key, fp, async {
        let first = step("quote", async { Ok::<_, Error>(1_u32) });
        let mut first = std::pin::pin!(first.into_future());
        // Polled once, then set aside unfinished.
        let _ = tokio::time::timeout(Duration::ZERO, &mut first).await;
        step("charge", async { Ok::<_, Error>(2_u32) }).await
    });
    let answered = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the second step is not held up by the first");
    assert_eq!(answered.unwrap(), 2);
}

/// A step whose append failed (its work done, its entry never written),
/// in a call that goes on to fail for good, is journaled before the
/// failure is: when the compensation stops early (a later step's undo
/// fails), the attempt that finishes it undoes that step too. Written
/// after the steps that completed after it, it is undone before them by
/// an attempt that resumes the compensation (the journal's order).
async fn a_step_whose_append_failed_is_undone_when_the_compensation_resumes(store: Arc<dyn Store>) {
    use idem_test::faults::{Fault, Flaky, Op};
    let flaky = Arc::new(Flaky::new(store));
    let idem = Idempotency::from_arc(flaky.clone());
    let key = Key::new("unjournaled-step", &rand::random::<u64>()).unwrap();
    let fp = Fingerprint::of(&"order").unwrap();
    let log = Log::default();
    let releases = Arc::new(AtomicU32::new(0));
    let settings = settings();
    let attempt = || {
        let (log, releases) = (Arc::clone(&log), Arc::clone(&releases));
        idem.run_caching_errors(&settings, key, fp, |_: &String| true, async move {
            let charged = charge(Arc::clone(&log)).await;
            step("reserve", async {
                note(&log, "reserve");
                Ok::<_, String>(1)
            })
            .compensate({
                let log = Arc::clone(&log);
                move |_: u32| async move {
                    // The warehouse is down for the first try.
                    if releases.fetch_add(1, Ordering::SeqCst) == 0 {
                        return Err("the warehouse is down".to_owned());
                    }
                    note(&log, "release");
                    Ok::<_, String>(())
                }
            })
            .await?;
            charged?;
            Err::<u32, _>("declined".to_owned())
        })
    };
    // The charge's append never reaches the store; its work was done.
    flaky.inject(Op::AppendStep, Fault::Refused);
    let first = attempt().await;
    assert!(first.is_err());
    assert_eq!(entries(&log), ["charge", "reserve"], "the release failed");
    let second = attempt().await;
    assert_eq!(second, first, "the failure, once compensated");
    assert_eq!(entries(&log), ["charge", "reserve", "refund 30", "release"]);
    assert_eq!(attempt().await, first, "replayed");
    assert_eq!(entries(&log), ["charge", "reserve", "refund 30", "release"]);
}

/// A step with an undo whose result serializes but does not deserialize
/// (`f64::NAN` is written as `null`) is journaled, and its undo cannot be
/// bound: the step fails with `Decode`, and a call that then fails for good
/// is not recorded as final with that step left undone; it stays
/// unfinished, its claim released, as for a step whose undo is not known.
async fn a_step_whose_result_does_not_decode_leaves_its_compensation_unfinished(
    store: Arc<dyn Store>,
) {
    let idem = Idempotency::from_arc(store);
    let key = Key::new("undecodable-step", &rand::random::<u64>()).unwrap();
    let fp = Fingerprint::of(&"order").unwrap();
    let log = Log::default();
    let settings = settings();
    let attempt = || {
        let log = Arc::clone(&log);
        idem.run_caching_errors(&settings, key, fp, |_: &String| true, async move {
            step("measure", async {
                note(&log, "measure");
                Ok::<_, String>(f64::NAN)
            })
            .compensate({
                let log = Arc::clone(&log);
                move |_: f64| async move {
                    note(&log, "unmeasure");
                    Ok::<_, String>(())
                }
            })
            .await?;
            Ok::<u32, String>(1)
        })
    };
    for _ in 0..2 {
        let failed = attempt().await.unwrap_err();
        assert!(
            failed.contains("decode") || failed.contains("deserializ"),
            "{failed}"
        );
        assert!(
            matches!(idem.inspect(key).await.unwrap(), Inspection::Absent),
            "not recorded as final"
        );
    }
    assert_eq!(entries(&log), ["measure"], "ran once, never undone");
    assert_eq!(idem.steps_done(key).await.unwrap(), ["measure", "final"]);
}

/// A store that counts how its journal is read.
struct Counting {
    inner: Arc<dyn Store>,
    reads: AtomicU32,
    claims_with_steps: AtomicU32,
}

impl Store for Counting {
    fn begin(
        &self,
        key: Key,
        fingerprint: Fingerprint,
        token: idem_core::store::Token,
        lease: Duration,
    ) -> idem_core::store::StoreFuture<'_, idem_core::store::Begin> {
        self.inner.begin(key, fingerprint, token, lease)
    }

    fn begin_with_steps(
        &self,
        key: Key,
        fingerprint: Fingerprint,
        token: idem_core::store::Token,
        lease: Duration,
    ) -> idem_core::store::StoreFuture<
        '_,
        (
            idem_core::store::Begin,
            Option<Vec<idem_core::store::JournaledStep>>,
        ),
    > {
        self.claims_with_steps.fetch_add(1, Ordering::SeqCst);
        self.inner.begin_with_steps(key, fingerprint, token, lease)
    }

    fn complete(
        &self,
        key: Key,
        token: idem_core::store::Token,
        record: idem_core::store::Record,
        ttl: Duration,
    ) -> idem_core::store::StoreFuture<'_, idem_core::store::Completion> {
        self.inner.complete(key, token, record, ttl)
    }

    fn release(
        &self,
        key: Key,
        token: idem_core::store::Token,
    ) -> idem_core::store::StoreFuture<'_, ()> {
        self.inner.release(key, token)
    }

    fn renew(
        &self,
        key: Key,
        token: idem_core::store::Token,
        lease: Duration,
    ) -> idem_core::store::StoreFuture<'_, bool> {
        self.inner.renew(key, token, lease)
    }

    fn append_step(
        &self,
        key: Key,
        token: idem_core::store::Token,
        name: String,
        value: Vec<u8>,
        ttl: Duration,
    ) -> idem_core::store::StoreFuture<'_, bool> {
        self.inner.append_step(key, token, name, value, ttl)
    }

    fn steps(
        &self,
        key: Key,
    ) -> idem_core::store::StoreFuture<'_, Vec<idem_core::store::JournaledStep>> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.steps(key)
    }
}

/// A call whose settings expect steps reads its journal with its claim:
/// its steps never read it again, and a step an earlier attempt journaled
/// is replayed from that read. Without the setting, the first step reads
/// it.
async fn a_call_expecting_steps_reads_its_journal_with_its_claim(store: Arc<dyn Store>) {
    let counting = Arc::new(Counting {
        inner: store,
        reads: AtomicU32::new(0),
        claims_with_steps: AtomicU32::new(0),
    });
    let idem = Idempotency::from_arc(counting.clone());
    let fp = Fingerprint::of(&"order").unwrap();
    let runs = AtomicU32::new(0);
    let attempt = |settings: Settings, key: Key, fail: bool| {
        let (idem, runs) = (idem.clone(), &runs);
        async move {
            idem.run(&settings, key, fp, async {
                let first = step("reserve", async {
                    Ok::<_, Error>(runs.fetch_add(1, Ordering::SeqCst))
                })
                .await?;
                if fail {
                    return Err(Error::AttemptFailed);
                }
                let second = step("charge", async { Ok::<_, Error>(7_u32) }).await?;
                Ok((first, second))
            })
            .await
        }
    };
    let expecting = Settings::builder()
        .lease(settings().lease())
        .ttl(settings().ttl())
        .expect_steps(true)
        .build()
        .unwrap();
    assert!(expecting.expects_steps() && !settings().expects_steps());
    let key = Key::new("read-with-claim", &rand::random::<u64>()).unwrap();
    let failed = attempt(expecting, key, true).await;
    assert!(matches!(failed, Err(Error::AttemptFailed)), "{failed:?}");
    let resumed = attempt(expecting, key, false).await.unwrap();
    assert_eq!(resumed, (0, 7), "the journaled step replayed from the read");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(counting.claims_with_steps.load(Ordering::SeqCst), 2);
    assert_eq!(
        counting.reads.load(Ordering::SeqCst),
        0,
        "no read of its own"
    );

    let lazy = Key::new("read-at-the-step", &rand::random::<u64>()).unwrap();
    attempt(settings(), lazy, false).await.unwrap();
    assert_eq!(counting.claims_with_steps.load(Ordering::SeqCst), 2);
    assert_eq!(
        counting.reads.load(Ordering::SeqCst),
        1,
        "read at the first step"
    );
}

/// One test per case, each running the function of its name on the store.
macro_rules! store_cases {
    ($store:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $case() {
                super::$case($store).await;
            }
        )*
    };
}

macro_rules! step_tests {
    ($store:expr) => {
        #[tokio::test]
        async fn resumes_after_an_err() {
            super::resumes_after_each_step($store, super::Failure::Err).await;
        }

        #[tokio::test]
        async fn resumes_after_a_panic() {
            super::resumes_after_each_step($store, super::Failure::Panic).await;
        }

        #[tokio::test]
        async fn resumes_after_a_dropped_future() {
            super::resumes_after_each_step($store, super::Failure::Dropped).await;
        }

        #[tokio::test]
        async fn other_arguments_do_not_resume_a_journal() {
            super::other_arguments_do_not_resume_a_journal($store).await;
            super::followers_of_a_call_of_other_arguments_are_told_key_reused($store).await;
        }

        store_cases!(
            $store;
            repeated_names_fail,
            other_arguments_leave_a_compensation_to_its_call,
            failed_steps_run_again,
            a_lost_claim_stops_the_call,
            epochs_fence_each_attempt,
            a_final_failure_compensates_completed_steps,
            a_failed_compensation_is_finished_by_the_next_attempt,
            a_compensation_cut_short_is_finished_after_the_lease,
            a_failure_marked_final_is_compensated,
            reserved_step_names_are_refused,
            forgetting_a_journal_alone_answers_false,
            a_step_whose_result_does_not_serialize_runs_once,
            an_attempt_returning_before_its_steps_does_not_end_a_compensation,
            a_journal_reused_after_its_ttl_keeps_the_completion_order,
            concurrent_steps_are_undone_last_completed_first,
            a_step_not_reached_is_undone_by_a_later_attempt,
            a_stalled_holder_undoes_nothing_another_completed,
            a_stalled_holder_finishing_a_compensation_undoes_nothing_twice,
            a_step_whose_append_went_unanswered_is_still_undone,
            a_step_dropped_during_its_append_is_still_undone,
            a_compensation_of_steps_run_together_finishes,
            a_journal_entry_of_a_compensation_is_tried_again,
            a_journal_entry_the_store_keeps_refusing_is_left_to_the_next_attempt,
            a_step_left_unpolled_while_it_reads_the_journal_holds_up_no_other,
            a_step_whose_append_failed_is_undone_when_the_compensation_resumes,
            a_step_whose_result_does_not_decode_leaves_its_compensation_unfinished,
            a_call_expecting_steps_reads_its_journal_with_its_claim,
            a_failure_too_large_to_keep_is_compensated,
        );
    };
}

mod memory {
    use super::*;
    use idem_core::idempotent;

    struct Shop {
        idem: Idempotency,
        reserved: AtomicU32,
        charged: AtomicU32,
        fail: std::sync::atomic::AtomicBool,
    }

    impl Shop {
        /// Reserves, charges, then fails while `self.fail` says so.
        #[idempotent(key = order, store = self.idem)]
        async fn checkout(&self, order: u64) -> Result<String, Error> {
            step("reserve", async {
                Ok::<_, Error>(self.reserved.fetch_add(1, Ordering::SeqCst))
            })
            .await?;
            let charge = step("charge", async {
                self.charged.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(step_key("charge").expect("inside a call"))
            })
            .await?;
            if self.fail.load(Ordering::SeqCst) {
                return Err(Error::AttemptFailed);
            }
            Ok(charge)
        }
    }

    /// The attribute reads the journal with the claim for a body that
    /// calls `step`, and not for one that does not.
    #[tokio::test]
    async fn the_attribute_expects_steps_of_a_body_that_calls_step() {
        struct Counted(Idempotency);
        impl Counted {
            #[idempotent(key = order, store = self.0)]
            async fn with_steps(&self, order: u64) -> Result<u64, Error> {
                idem_core::step("reserve", async { Ok::<_, Error>(order) }).await
            }

            #[idempotent(key = order, store = self.0)]
            async fn without(&self, order: u64) -> Result<u64, Error> {
                Ok(order)
            }
        }
        let counting = Arc::new(super::Counting {
            inner: Arc::new(MemoryStore::new()),
            reads: AtomicU32::new(0),
            claims_with_steps: AtomicU32::new(0),
        });
        let counted = Counted(Idempotency::from_arc(counting.clone()));
        assert_eq!(counted.without(1).await.unwrap(), 1);
        assert_eq!(counting.claims_with_steps.load(Ordering::SeqCst), 0);
        assert_eq!(counted.with_steps(2).await.unwrap(), 2);
        assert_eq!(counting.claims_with_steps.load(Ordering::SeqCst), 1);
        assert_eq!(counting.reads.load(Ordering::SeqCst), 0);
    }

    /// Steps work in an `#[idempotent]` function as in `Idempotency::run`.
    #[tokio::test]
    async fn steps_resume_in_an_annotated_function() {
        let shop = Shop {
            idem: Idempotency::new(MemoryStore::new()),
            reserved: AtomicU32::new(0),
            charged: AtomicU32::new(0),
            fail: std::sync::atomic::AtomicBool::new(true),
        };
        assert!(matches!(shop.checkout(7).await, Err(Error::AttemptFailed)));
        shop.fail.store(false, Ordering::SeqCst);
        let first = shop.checkout(7).await.unwrap();
        assert_eq!(shop.checkout(7).await.unwrap(), first, "replayed");
        assert_eq!(shop.reserved.load(Ordering::SeqCst), 1);
        assert_eq!(shop.charged.load(Ordering::SeqCst), 1);
        assert_eq!(first.len(), 32, "the derived key the charge saw");
    }

    step_tests!(Arc::new(MemoryStore::new()) as Arc<dyn Store>);

    /// An undo's requests carry keys derived from the undo, the same in
    /// every attempt that tries it (a retried refund is replayed, never
    /// made twice), and other than its step's: an undo that failed in one
    /// attempt sends the same key when the next attempt finishes it.
    #[cfg(feature = "client")]
    #[tokio::test]
    async fn an_undos_requests_carry_the_same_derived_key_in_every_attempt() {
        use idem_core::client::{RetryPolicy, retry};
        let idem = Idempotency::memory();
        let key = Key::new("undo-keys", &rand::random::<u64>()).unwrap();
        let fp = Fingerprint::of(&"order").unwrap();
        let policy = RetryPolicy::builder().max_attempts(1).build().unwrap();
        let keys = Arc::new(Mutex::new(Vec::new()));
        for attempt in 0..2 {
            let (keys, step_keys) = (Arc::clone(&keys), Arc::clone(&keys));
            let (policy, undo_policy) = (policy.clone(), policy.clone());
            let result: Result<(), String> = idem
                .run_caching_errors(&settings(), key, fp, |_: &String| true, async move {
                    step("charge", async move {
                        let sent = retry(&policy, |a| {
                            let key = a.key().to_owned();
                            async move { Ok::<_, std::io::Error>(key) }
                        })
                        .await
                        .map_err(|e| e.to_string())?;
                        step_keys.lock().unwrap().push(format!("step {sent}"));
                        Ok::<_, String>(())
                    })
                    .compensate(move |()| async move {
                        let sent = retry(&undo_policy, |a| {
                            let key = a.key().to_owned();
                            async move { Ok::<_, std::io::Error>(key) }
                        })
                        .await
                        .map_err(|e| e.to_string())?;
                        keys.lock().unwrap().push(format!("undo {sent}"));
                        // The refund fails in the first attempt.
                        if attempt == 0 {
                            Err("the refund timed out".to_owned())
                        } else {
                            Ok(())
                        }
                    })
                    .await?;
                    Err("declined".to_owned())
                })
                .await;
            assert!(result.is_err(), "attempt {attempt}");
        }
        let keys = keys.lock().unwrap().clone();
        assert_eq!(keys.len(), 3, "{keys:?}");
        let (step_key, first_undo, second_undo) = (&keys[0], &keys[1], &keys[2]);
        assert!(
            step_key.starts_with("step ") && first_undo.starts_with("undo "),
            "{keys:?}"
        );
        assert_eq!(first_undo, second_undo, "the same key in both attempts");
        assert_ne!(step_key[5..], first_undo[5..], "the undo's key is its own");
    }

    /// A journal past its TTL that the sweeper has not reached yet is
    /// gone for a new attempt, as on the stores whose journals expire by
    /// themselves: its steps run again, with other arguments too, and
    /// `steps_done` shows the new journal alone.
    #[tokio::test]
    async fn an_expired_journal_not_yet_swept_starts_afresh() {
        let store = MemoryStore::builder()
            .sweep_interval(Duration::from_secs(3600))
            .build();
        let idem = Idempotency::new(store);
        let key = Key::new("unswept", &rand::random::<u64>()).unwrap();
        let short = Settings::builder()
            .lease(Duration::from_millis(20))
            .ttl(Duration::from_millis(60))
            .build()
            .unwrap();
        let runs = Arc::new(AtomicU32::new(0));
        let attempt = |arguments: &'static str| {
            let runs = Arc::clone(&runs);
            idem.run(
                &short,
                key,
                Fingerprint::of(&arguments).unwrap(),
                async move {
                    let value = step("reserve", async {
                        Ok::<_, String>(runs.fetch_add(1, Ordering::SeqCst) + 1)
                    })
                    .await?;
                    Err::<u32, String>(format!("failed after reserving {value}"))
                },
            )
        };
        assert_eq!(
            attempt("first").await.unwrap_err(),
            "failed after reserving 1"
        );
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert_eq!(
            attempt("second").await.unwrap_err(),
            "failed after reserving 2",
            "the step ran again, under other arguments"
        );
        assert_eq!(
            attempt("second").await.unwrap_err(),
            "failed after reserving 2",
            "the next attempt replays the new journal's entry"
        );
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        assert_eq!(idem.steps_done(key).await.unwrap(), ["reserve"]);
    }

    /// A store of the four core operations only, as a third party may write.
    struct NoJournal(MemoryStore);

    impl Store for NoJournal {
        fn begin(
            &self,
            key: Key,
            fingerprint: Fingerprint,
            token: idem_core::store::Token,
            lease: Duration,
        ) -> idem_core::store::StoreFuture<'_, idem_core::store::Begin> {
            self.0.begin(key, fingerprint, token, lease)
        }

        fn complete(
            &self,
            key: Key,
            token: idem_core::store::Token,
            record: idem_core::store::Record,
            ttl: Duration,
        ) -> idem_core::store::StoreFuture<'_, idem_core::store::Completion> {
            self.0.complete(key, token, record, ttl)
        }

        fn release(
            &self,
            key: Key,
            token: idem_core::store::Token,
        ) -> idem_core::store::StoreFuture<'_, ()> {
            self.0.release(key, token)
        }

        fn renew(
            &self,
            key: Key,
            token: idem_core::store::Token,
            lease: Duration,
        ) -> idem_core::store::StoreFuture<'_, bool> {
            self.0.renew(key, token, lease)
        }
    }

    /// A memory store whose claims can never be renewed: a holder's lease
    /// runs out while it works.
    struct Unrenewable(MemoryStore);

    impl Store for Unrenewable {
        fn begin(
            &self,
            key: Key,
            fingerprint: Fingerprint,
            token: idem_core::store::Token,
            lease: Duration,
        ) -> idem_core::store::StoreFuture<'_, idem_core::store::Begin> {
            self.0.begin(key, fingerprint, token, lease)
        }

        fn complete(
            &self,
            key: Key,
            token: idem_core::store::Token,
            record: idem_core::store::Record,
            ttl: Duration,
        ) -> idem_core::store::StoreFuture<'_, idem_core::store::Completion> {
            self.0.complete(key, token, record, ttl)
        }

        fn release(
            &self,
            key: Key,
            token: idem_core::store::Token,
        ) -> idem_core::store::StoreFuture<'_, ()> {
            self.0.release(key, token)
        }

        fn renew(
            &self,
            _: Key,
            _: idem_core::store::Token,
            _: Duration,
        ) -> idem_core::store::StoreFuture<'_, bool> {
            Box::pin(std::future::ready(Ok(false)))
        }

        fn append_step(
            &self,
            key: Key,
            token: idem_core::store::Token,
            name: String,
            value: Vec<u8>,
            ttl: Duration,
        ) -> idem_core::store::StoreFuture<'_, bool> {
            self.0.append_step(key, token, name, value, ttl)
        }

        fn steps(
            &self,
            key: Key,
        ) -> idem_core::store::StoreFuture<'_, Vec<idem_core::store::JournaledStep>> {
            self.0.steps(key)
        }
    }

    /// Undos run only while the attempt's lease holds: once it ran out
    /// (here, during the first undo), the next undo is left to a later
    /// attempt, which finishes the compensation. (On a paused clock: the
    /// undo outlasts the first renewal and not the claim.)
    #[tokio::test(start_paused = true)]
    async fn undos_stop_when_the_lease_runs_out() {
        let idem = Idempotency::new(Unrenewable(MemoryStore::new()));
        let key = Key::new("lease-out", &rand::random::<u64>()).unwrap();
        let fp = Fingerprint::of(&"order").unwrap();
        let short = Settings::builder()
            .lease(Duration::from_millis(150))
            .build()
            .unwrap();
        let log = Log::default();
        for attempt in 0..2 {
            let log = Arc::clone(&log);
            let result: Result<(), String> = idem
                .run_caching_errors(&short, key, fp, |_: &String| true, async move {
                    for name in ["a", "b"] {
                        let undo_log = Arc::clone(&log);
                        step(name, async { Ok::<_, String>(()) })
                            .compensate(move |()| async move {
                                note(&undo_log, &format!("undo {name} in attempt {attempt}"));
                                if attempt == 0 {
                                    // Past the first renewal (a third of
                                    // the lease), which finds the lease
                                    // lost, and before the claim lapses in
                                    // the store.
                                    tokio::time::sleep(Duration::from_millis(90)).await;
                                }
                                Ok::<_, String>(())
                            })
                            .await?;
                    }
                    Err("declined".to_owned())
                })
                .await;
            assert!(result.is_err(), "attempt {attempt}");
        }
        assert_eq!(
            entries(&log),
            ["undo b in attempt 0", "undo a in attempt 1"],
            "undo a waited for an attempt whose lease held"
        );
    }

    /// On a store that keeps no journals the first step fails with
    /// `Unsupported` before its work runs; a call without steps is unaffected.
    #[tokio::test]
    async fn a_store_without_journals_fails_the_first_step() {
        let idem = Idempotency::new(NoJournal(MemoryStore::new()));
        let key = Key::new("no-journal", &1).unwrap();
        let runs = AtomicU32::new(0);
        let result: Result<(), Error> = idem
            .run(&settings(), key, Fingerprint::of(&()).unwrap(), async {
                step("only", async {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Error>(())
                })
                .await
            })
            .await;
        assert!(
            matches!(&result, Err(Error::Store(e)) if e.kind() == idem_core::StoreErrorKind::Unsupported),
            "{result:?}"
        );
        assert_eq!(runs.load(Ordering::SeqCst), 0);
        let plain: Result<u8, Error> = idem
            .run(
                &settings(),
                Key::new("no-journal", &2).unwrap(),
                Fingerprint::of(&()).unwrap(),
                async { Ok(1) },
            )
            .await;
        assert_eq!(plain.unwrap(), 1);
    }

    /// The journal expires with the call's TTL: a call run again after
    /// that starts afresh.
    #[tokio::test(start_paused = true)]
    async fn the_journal_expires_with_the_ttl() {
        let store = MemoryStore::new();
        let idem = Idempotency::new(store.clone());
        let key = Key::new("expiring", &1).unwrap();
        let effects = Effects::default();
        let first = attempt(&idem, key, &effects, Some((1, Failure::Err))).await;
        assert!(first.is_err());
        assert_eq!(store.steps(key).await.unwrap().len(), 2);
        tokio::time::sleep(Duration::from_secs(121)).await;
        assert!(store.steps(key).await.unwrap().is_empty());
        attempt(&idem, key, &effects, None).await.unwrap();
        assert_eq!(effects.runs[0].load(Ordering::SeqCst), 2, "started afresh");
    }
}

#[cfg(feature = "redis")]
mod redis_node {
    use super::*;
    use idem_core::RedisStore;

    async fn store() -> Arc<dyn Store> {
        let url = idem_test::redis_server::shared_node().url();
        let store = RedisStore::node(url)
            .response_timeout(idem_test::redis_server::RESPONSE_TIMEOUT)
            .connect()
            .await
            .unwrap();
        Arc::new(store)
    }

    step_tests!(store().await);

    #[test]
    fn a_killed_process_resumes_after_its_last_journaled_step() {
        let store = idem_test::redis_server::RedisServer::start();
        super::killed_processes_resume(&store.url());
    }

    #[test]
    fn a_process_killed_mid_compensation_is_finished_by_the_next() {
        let store = idem_test::redis_server::RedisServer::start();
        super::killed_compensations_finish(&store.url());
    }
}

#[cfg(feature = "redis")]
mod redis_cluster {
    use super::*;
    use idem_core::RedisStore;

    async fn store() -> Arc<dyn Store> {
        let nodes = idem_test::redis_server::shared_cluster()
            .nodes
            .iter()
            .map(idem_test::redis_server::RedisServer::url);
        let store = RedisStore::cluster(nodes)
            .response_timeout(idem_test::redis_server::RESPONSE_TIMEOUT)
            .connect()
            .await
            .unwrap();
        Arc::new(store)
    }

    step_tests!(store().await);
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use idem_core::PostgresStore;

    async fn store() -> Arc<dyn Store> {
        let store = PostgresStore::builder(idem_test::postgres_server::shared().url())
            .response_timeout(idem_test::postgres_server::RESPONSE_TIMEOUT)
            // Expired rows stay until the test ends, as they may between
            // two purges.
            .purge_interval(Duration::from_secs(3600))
            .max_connections(4)
            .connect()
            .await
            .unwrap();
        Arc::new(store)
    }

    step_tests!(store().await);

    #[cfg(feature = "redis")]
    #[test]
    fn a_killed_process_resumes_after_its_last_journaled_step() {
        super::killed_processes_resume(&idem_test::postgres_server::shared().url());
    }

    #[cfg(feature = "redis")]
    #[test]
    fn a_process_killed_mid_compensation_is_finished_by_the_next() {
        super::killed_compensations_finish(&idem_test::postgres_server::shared().url());
    }
}
