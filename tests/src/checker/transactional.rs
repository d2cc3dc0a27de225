//! PostgreSQL's transactional mode under the checker: callers of a few keys
//! at random times, waiting or rejecting, whose bodies write their effect
//! (a row) in the call's transaction, take random time, return `Ok` or
//! `Err`, panic, or are cancelled by their caller (some at a time, some at
//! a step of their opening: the wait for a connection, the `BEGIN`, the
//! claim).
//!
//! Calls open their transaction at the database's default isolation, at
//! `REPEATABLE READ` or at `SERIALIZABLE`.
//!
//! Checked against the database itself: per key, at most one body's row is
//! committed (the claim, the row and the record commit together or not at
//! all); every `Ok` a caller gets is the run whose row is committed; no
//! call that ended in `Err`, a panic or a cancellation left a row; a call
//! that arrives after another call of its key answered `Ok` replays that
//! run (neither `InProgress`, whatever its conflict setting, nor a failure
//! to serialize), or fails closed with a store that timed out or was
//! unavailable. The caller of [`check_transactional_seed`] checks, once
//! every call ended, that no session of the pool stayed inside a
//! transaction.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::task::Poll;
use std::time::Duration;

use idem_core::store::{StoreErrorKind, Token};
use idem_core::{Error, Fingerprint, Isolation, Key, OnConflict, PostgresStore, Settings};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tokio::time::Instant;

/// What one seed's transactional run did.
#[derive(Debug, Clone, Copy, Default)]
pub struct TransactionalReport {
    /// Calls made.
    pub calls: usize,
    /// Bodies run.
    pub runs: usize,
    /// Rows committed.
    pub committed: usize,
}

/// How a caller's call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Ok(i64),
    BodyErr(i64),
    Idem(String),
    /// The store timed out or was unavailable: a pool exhausted or a server
    /// slower than the response timeout, on a loaded machine. Failing
    /// closed is allowed.
    StoreFailed(String),
    Panicked,
    Cancelled,
}

/// When a caller drops its call.
#[derive(Debug, Clone, Copy)]
enum Cancel {
    /// After this long.
    After(Duration),
    /// As its call waits for the `n`th time (1 for its first wait).
    AtWait(u32),
}

/// Polls `call` until it ends (`Some`), or drops it as it waits for the
/// `n`th time (`None`): a call cut off at a step of its protocol (each wait
/// is one for an answer) rather than at a time, so that its steps' cut-off
/// points are all reached, however fast the database answers.
async fn cut_at_wait<F: Future>(n: u32, call: F) -> Option<F::Output> {
    let mut call = std::pin::pin!(call);
    let mut waits = 0;
    std::future::poll_fn(|cx| match call.as_mut().poll(cx) {
        Poll::Ready(output) => Poll::Ready(Some(output)),
        Poll::Pending => {
            waits += 1;
            if waits >= n {
                Poll::Ready(None)
            } else {
                Poll::Pending
            }
        }
    })
    .await
}

/// The body's failure, or idem's.
#[derive(Debug)]
enum TxError {
    Body(i64),
    Idem(String),
    Unavailable(String),
}

impl From<Error> for TxError {
    fn from(error: Error) -> Self {
        match &error {
            Error::Store(failure)
                if matches!(
                    failure.kind(),
                    StoreErrorKind::Timeout | StoreErrorKind::Unavailable
                ) =>
            {
                Self::Unavailable(error.to_string())
            }
            _ => Self::Idem(error.to_string()),
        }
    }
}

/// Runs the transactional workload of `seed` on `store` and checks it
/// against the rows committed.
///
/// # Errors
/// What broke, with the seed and the answers.
pub async fn check_transactional_seed(
    store: PostgresStore,
    seed: u64,
) -> Result<TransactionalReport, String> {
    super::run::quiet_body_panics();
    let mut rng = StdRng::seed_from_u64(seed);
    // Seeds checked side by side race to create it; one wins.
    let create =
        "CREATE TABLE IF NOT EXISTS idem_checker_effects (scope text, key int, run bigint)";
    if sqlx::query(create).execute(store.pool()).await.is_err() {
        tokio::time::sleep(Duration::from_millis(100)).await;
        sqlx::query(create)
            .execute(store.pool())
            .await
            .map_err(|e| e.to_string())?;
    }
    let scope = format!("tx-{seed}-{}", Token::random().as_u128());
    let keys = rng.random_range(1..=3_i32);
    let lease = Duration::from_secs(2);
    let runs = Arc::new(AtomicI64::new(0));
    let start = Instant::now();
    let calls: Vec<_> = (0..rng.random_range(3..=10))
        .map(|_| {
            let key = rng.random_range(0..keys);
            let settings = Settings::builder()
                .lease(lease)
                .ttl(Duration::from_secs(60));
            let settings = if rng.random_bool(0.3) {
                settings.on_conflict(OnConflict::Reject)
            } else {
                settings.wait_timeout(Duration::from_secs(3))
            };
            let settings = match rng.random_range(0..10) {
                0..=1 => settings.isolation(Isolation::RepeatableRead),
                2..=3 => settings.isolation(Isolation::Serializable),
                _ => settings,
            }
            .build()
            .expect("valid settings");
            let arrives = Duration::from_millis(rng.random_range(0..2000));
            let took = Duration::from_millis(rng.random_range(0..900));
            let ends = rng.random_range(0..10);
            // Half the cancelled calls are cut off at a step of their
            // opening (their first to fourth wait: for a connection, its
            // check, the `BEGIN`, the claim), the others at a time.
            let cancel = rng.random_bool(0.15).then(|| {
                if rng.random_bool(0.5) {
                    Cancel::AtWait(rng.random_range(1..=6))
                } else {
                    Cancel::After(Duration::from_millis(rng.random_range(0..1200)))
                }
            });
            (key, settings, arrives, took, ends, cancel)
        })
        .collect();
    let n_calls = calls.len();
    let tasks = calls
        .into_iter()
        .map(|(key, settings, arrives, took, ends, cancel)| {
            let (store, scope, runs) = (store.clone(), scope.clone(), Arc::clone(&runs));
            async move {
                tokio::time::sleep_until(start + arrives).await;
                let idem_key = Key::scoped("idem.checker.tx", &scope, &key).expect("a key");
                let fingerprint = Fingerprint::of(&key).expect("a fingerprint");
                let call = store.run_in_transaction(&settings, idem_key, fingerprint, |tx| {
                    let (scope, runs) = (scope.clone(), Arc::clone(&runs));
                    Box::pin(async move {
                        let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
                        sqlx::query("INSERT INTO idem_checker_effects VALUES ($1, $2, $3)")
                            .bind(&scope)
                            .bind(key)
                            .bind(run)
                            .execute(&mut *tx)
                            .await
                            .map_err(|e| TxError::Idem(format!("insert: {e}")))?;
                        tokio::time::sleep(took).await;
                        match ends {
                            0 => panic!("{}: run {run}", super::invariants::BODY_PANIC),
                            1 | 2 => Err(TxError::Body(run)),
                            _ => Ok(run),
                        }
                    })
                });
                let call = super::run::caught(call);
                let answer = match cancel {
                    Some(Cancel::After(after)) => tokio::time::timeout(after, call).await.ok(),
                    Some(Cancel::AtWait(waits)) => cut_at_wait(waits, call).await,
                    None => Some(call.await),
                };
                let answer = match answer {
                    None => Answer::Cancelled,
                    Some(Err(_panic)) => Answer::Panicked,
                    Some(Ok(Ok(run))) => Answer::Ok(run),
                    Some(Ok(Err(TxError::Body(run)))) => Answer::BodyErr(run),
                    Some(Ok(Err(TxError::Idem(kind)))) => Answer::Idem(kind),
                    Some(Ok(Err(TxError::Unavailable(why)))) => Answer::StoreFailed(why),
                };
                (key, answer, arrives, start.elapsed())
            }
        });
    let answers = futures_util::future::join_all(tasks).await;
    // Past every lease: a cancelled holder's transaction is rolled back.
    tokio::time::sleep(lease).await;
    let rows: Vec<(i32, i64)> =
        sqlx::query_as("SELECT key, run FROM idem_checker_effects WHERE scope = $1")
            .bind(&scope)
            .fetch_all(store.pool())
            .await
            .map_err(|e| e.to_string())?;
    let mut committed: HashMap<i32, Vec<i64>> = HashMap::new();
    for (key, run) in &rows {
        committed.entry(*key).or_default().push(*run);
    }
    for (key, done) in &committed {
        if done.len() > 1 {
            return Err(format!(
                "seed {seed}: key {key} committed the rows of runs {done:?}; answers {answers:?}"
            ));
        }
    }
    // When each key's first `Ok` answer came: from then on its run is
    // committed, and every call that arrives replays it.
    let mut done_at: HashMap<i32, Duration> = HashMap::new();
    for (key, answer, _, ended) in &answers {
        if matches!(answer, Answer::Ok(_)) {
            let at = done_at.entry(*key).or_insert(*ended);
            *at = (*at).min(*ended);
        }
    }
    for (key, answer, arrived, _) in &answers {
        let late = done_at.get(key).is_some_and(|done| arrived > done);
        // It replays, or fails closed: a store that fails is no answer.
        let replayed = matches!(
            answer,
            Answer::Ok(_) | Answer::Cancelled | Answer::StoreFailed(_)
        );
        if late && !replayed {
            return Err(format!(
                "seed {seed}: a call of key {key} arriving after its run committed answered \
                 {answer:?}, not the replay; answers {answers:?}"
            ));
        }
    }
    for (key, answer, _, _) in &answers {
        let done = committed.get(key).and_then(|d| d.first());
        match answer {
            Answer::Ok(run) if done != Some(run) => {
                return Err(format!(
                    "seed {seed}: a caller of key {key} got run {run}, but run {done:?} committed; \
                     answers {answers:?}"
                ));
            }
            Answer::BodyErr(run) if rows.iter().any(|(_, r)| r == run) => {
                return Err(format!(
                    "seed {seed}: run {run} failed, and its row was committed; answers {answers:?}"
                ));
            }
            _ => {}
        }
    }
    Ok(TransactionalReport {
        calls: n_calls,
        runs: usize::try_from(runs.load(Ordering::SeqCst)).unwrap_or(usize::MAX),
        committed: rows.len(),
    })
}
