//! Transactional mode: the claim, the body's own writes and the stored
//! result commit in one transaction, or none of them does.
//!
//! ```no_run
//! use idem_core::{Fingerprint, Key, PostgresStore, Settings};
//!
//! # async fn demo(store: PostgresStore) -> Result<(), idem_core::Error> {
//! let (key, fingerprint) = (Key::new("charges.create", &"order-17")?, Fingerprint::of(&1000)?);
//! let charge_id: i64 = store
//!     .run_in_transaction(&Settings::default(), key, fingerprint, |tx| {
//!         Box::pin(async move {
//!             let id: i64 = sqlx::query_scalar("INSERT INTO charges (amount) VALUES (1000) RETURNING id")
//!                 .fetch_one(&mut *tx)
//!                 .await
//!                 .map_err(|e| idem_core::Error::Store(
//!                     idem_core::store::StoreError::new(idem_core::store::StoreErrorKind::Other, e.to_string()),
//!                 ))?;
//!             Ok::<_, idem_core::Error>(id)
//!         })
//!     })
//!     .await?;
//! # let _ = charge_id;
//! # Ok(())
//! # }
//! ```
//!
//! # What it promises
//!
//! - **A crash leaves nothing.** If the process dies or its connection is
//!   cut mid-body, PostgreSQL rolls the transaction back: neither the body's
//!   writes nor the claim remain, and a retry runs cleanly.
//! - **A stuck holder is bounded by the lease.** A holder that freezes or is
//!   cut off by a partition without a reset would keep its transaction (and
//!   the key's lock) until TCP gives up, hours by default. idem sets the
//!   transaction's `idle_in_transaction_session_timeout` to the lease, so
//!   the database ends a holder that sat idle in it for a lease, rolling
//!   its writes back and freeing the key; a body must therefore not keep
//!   its transaction idle (waiting on something else) longer than the
//!   lease. A statement the body itself runs is bounded by the session's
//!   `statement_timeout`, which idem leaves as it is. Every statement idem
//!   issues (the rollback of a failed body included) is bounded by the
//!   store's response timeout.
//! - **Concurrent duplicates** take the key's advisory lock
//!   (`pg_advisory_xact_lock` on 64 bits of the key's digest, mixed with
//!   64 bits of the table's name, so that stores of other tables in the
//!   database neither wait for nor `forget` each other's), held until the
//!   holder commits or rolls back. With `on_conflict = wait` they block on it
//!   (at most `wait_timeout`, in statements of at most a second through a
//!   `lock_timeout` that holds for the lock's statement only, so the body
//!   keeps the session's own, and so that a waiter whose caller gave up
//!   hands its connection back soon; a session `statement_timeout` shorter
//!   than the wait ends it sooner, with `InProgress`, as does a pool with
//!   no connection free for the waiter's next look at the key),
//!   then replay the
//!   committed result; with `reject` they try the lock
//!   (`pg_try_advisory_xact_lock`) and get `InProgress` at once, without
//!   blocking and without aborting their transaction, which is why an
//!   advisory lock is used rather than `NOWAIT` on the row. The advisory lock
//!   space is shared with the application's own advisory locks; keys are
//!   64-bit digests, so a collision with them is unlikely but possible.
//!   Within one process, duplicates on one [`PostgresStore`] (and its
//!   clones) first wait for the call under way there, holding no connection
//!   while they wait: they replay its committed result, or share its
//!   failure (`Error::AttemptFailed`) instead of running the body in turn.
//! - **A body `Err`** rolls the body's writes back with the claim, so a retry
//!   runs again; with `cache_errors`, the writes are rolled back to a
//!   savepoint taken before the body and the error is stored and committed,
//!   so a retry replays it. An error the predicate keeps but that does not
//!   serialize is not stored: everything rolls back, as without
//!   `cache_errors`. A body that panics rolls back too, and its waiters in
//!   the process share its failure (`Error::AttemptFailed`).
//! - **A reused key with other arguments** gets `KeyReused`.
//!
//! A first run costs the body's statements and four round trips: `BEGIN`
//! (which also tries the key's lock and sets the idle limit), the claim, the
//! record, `COMMIT`. A replay costs two: `BEGIN` and the claim, which reads
//! the committed record; its transaction, which wrote nothing, is rolled
//! back as its connection returns to the pool.
//!
//! # Isolation and serialization failures
//!
//! The transaction runs at the isolation level of
//! [`Settings::isolation`](crate::Settings::isolation) (`isolation =
//! serializable` on the attribute), or else at the database's default,
//! usually `READ COMMITTED`. idem's own statements run first, so a body
//! cannot set the level itself (`SET TRANSACTION ISOLATION LEVEL` would
//! fail): set it here. A serialization failure or deadlock, in the
//! body or at commit (or a deferred constraint broken at commit), rolls
//! everything back: the call returns the error (an
//! `Error::Store` when it happens at commit), nothing was recorded, and a
//! retry runs the body again; unless the body passed it up as an `Err`
//! that `cache_errors` keeps (`true` keeps every error), which is stored
//! and replayed like any kept error: a predicate that keeps errors of a
//! body that may meet these should refuse them.
//!
//! At `SERIALIZABLE`, idem's own statements do not make calls of different
//! keys conflict: a first run claims its key with an insert that reads
//! nothing and writes its record to the row's address, so it takes no
//! predicate lock on the key's index page, which other keys share
//! (reading a key there would make every concurrent call that inserts into
//! that page a rw-conflict). A call that finds its key's row (a replay, an
//! expired record) reads it. Conflicts between the bodies' own statements
//! are the bodies'. A `COMMIT` that times out or loses its
//! connection leaves the outcome unknown to the caller, who gets
//! `Error::Store` saying so; the database knows, and the retry replays (it
//! committed) or runs (it did not). A body must not end the transaction
//! itself (`COMMIT`, `ROLLBACK`): the call then records no result and
//! answers `Error::Store` of kind `Config`; after the body's `COMMIT`,
//! which committed its writes and the claim, the claim is marked as having
//! run (retries get `NotReplayable`, not a second run). Use savepoints
//! inside the body instead.
//!
//! Claims made by the store protocol ([`PostgresStore`]'s [`Store`]
//! operations) and transactional calls share the table; use one mode per
//! operation name.
//!
//! [`Store`]: crate::store::Store

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::postgres::PgConnection;
use sqlx::{Postgres, Row as _, Transaction};
use tracing::Instrument as _;

use super::{PostgresStore, begin_answer, begin_on, millis, store_error, token_bytes};
use crate::codec::{ResultCodec, Serde, SerdeCaching};
use crate::engine::to_record_or_undo;
use crate::error::{Error, StoreError, StoreErrorKind};
use crate::flight::{Landing, Leader, Role};
use crate::key::{Fingerprint, Key};
use crate::observe::{Call, Operation, Traced};
use crate::settings::{OnConflict, Settings};
use crate::store::{Begin, Outcome, Record, Token};

/// The future a transactional body returns: it borrows the transaction's
/// connection.
pub type TxFuture<'c, T> = Pin<Box<dyn Future<Output = T> + Send + 'c>>;

/// How a transactional call opened.
#[doc(hidden)]
pub enum Opened<'s, T, E> {
    /// The call is decided without running the body: a replay, or idem's
    /// refusal.
    Done(Result<T, E>),
    /// The key is claimed in a new transaction; run the body on
    /// [`Claim::connection`], then [`Claim::finish`].
    Claimed(Box<Claim<'s>>),
}

/// A key claimed inside an open transaction. Dropping it rolls the
/// transaction back, claim included.
#[doc(hidden)]
pub struct Claim<'s> {
    held: Held,
    /// Leads this process's duplicates, who wait for what it lands.
    leader: Option<Leader<'s>>,
    call: Call,
    started: Instant,
}

/// A claim's holder and span, for its body.
pub(crate) struct Holding {
    holder: usize,
    key: Key,
    span: tracing::Span,
}

impl Holding {
    /// Runs `body` (the body's future, on [`Claim::connection`]) as the
    /// claim's holder, in the call's span, outside any other call's step
    /// journal: a call of the same key on this store made inside it fails
    /// at once with [`Error::Reentered`].
    pub(crate) fn run<F: Future>(self, body: F) -> impl Future<Output = F::Output> {
        crate::reentry::holding(self.holder, self.key, crate::steps::outside_calls(body))
            .instrument(self.span)
    }
}

/// The open transaction that holds a claim.
struct Held {
    tx: Transaction<'static, Postgres>,
    store: PostgresStore,
    key: Key,
    token: Token,
    /// The claimed row's address (`ctid`), where its record is written.
    tid: String,
    ttl: Duration,
    savepoint: bool,
}

impl Claim<'_> {
    /// The transaction's connection, for the body's own statements.
    pub fn connection(&mut self) -> &mut PgConnection {
        &mut self.held.tx
    }

    /// What the body runs as: the claim's holder, in the call's span (see
    /// [`Holding::run`]).
    pub(crate) fn holding(&self) -> Holding {
        Holding {
            holder: self.held.store.holder(),
            key: self.held.key,
            span: self.span(),
        }
    }

    /// The call's `idem.call` span, for the body to run in.
    pub fn span(&self) -> tracing::Span {
        self.call.span().clone()
    }

    /// Goes on with the panic of the body: first fails the duplicates that
    /// waited for it in the process (they share the failure,
    /// `AttemptFailed`, instead of each running the body in turn); its
    /// transaction rolls back as the claim is dropped.
    pub(crate) fn panicked(&mut self, panic: Box<dyn std::any::Any + Send>) -> ! {
        // The body ran and failed, as an engine call's panicking body does.
        self.call.ran(self.started.elapsed(), false);
        if let Some(leader) = self.leader.take() {
            leader.land(Landing::Failed(Error::AttemptFailed));
        }
        std::panic::resume_unwind(panic)
    }
}

impl PostgresStore {
    /// Who holds a transactional claim, for re-entry: this store (its
    /// clones share it).
    fn holder(&self) -> usize {
        Arc::as_ptr(&self.inner).cast::<()>() as usize
    }

    /// Runs `body` in a new transaction that also holds the claim on `key`
    /// and, at commit, the body's `Ok` result; replays the result of a
    /// committed call; rolls back on an `Err`. See the [module
    /// docs](self) for what it promises.
    ///
    /// # Errors
    /// The body's own error, or one converted from [`Error`]: `InProgress`
    /// when the key stays locked past the wait (or at once with
    /// [`OnConflict::Reject`]), `KeyReused`, `Store` when the database fails
    /// (the body then did not run, or its writes were rolled back).
    pub async fn run_in_transaction<T, E, F>(
        &self,
        settings: &Settings,
        key: Key,
        fingerprint: Fingerprint,
        body: F,
    ) -> Result<T, E>
    where
        F: for<'c> FnOnce(&'c mut PgConnection) -> TxFuture<'c, Result<T, E>>,
        T: Serialize + DeserializeOwned,
        E: From<Error>,
    {
        self.transactional(settings, key, fingerprint, body, Serde, false)
            .await
    }

    /// Like [`run_in_transaction`](Self::run_in_transaction), but an `Err`
    /// that `cache` accepts is stored (the body's writes rolled back to a
    /// savepoint) and replayed like an `Ok`.
    ///
    /// # Errors
    /// As [`run_in_transaction`](Self::run_in_transaction), plus replayed
    /// errors.
    pub async fn run_in_transaction_caching_errors<T, E, F, P>(
        &self,
        settings: &Settings,
        key: Key,
        fingerprint: Fingerprint,
        cache: P,
        body: F,
    ) -> Result<T, E>
    where
        F: for<'c> FnOnce(&'c mut PgConnection) -> TxFuture<'c, Result<T, E>>,
        T: Serialize + DeserializeOwned,
        E: From<Error> + Serialize + DeserializeOwned,
        P: FnOnce(&E) -> bool,
    {
        self.transactional(
            settings,
            key,
            fingerprint,
            body,
            SerdeCaching::new(cache),
            true,
        )
        .await
    }

    pub(crate) async fn transactional<T, E, F, C>(
        &self,
        settings: &Settings,
        key: Key,
        fingerprint: Fingerprint,
        body: F,
        codec: C,
        caching: bool,
    ) -> Result<T, E>
    where
        F: for<'c> FnOnce(&'c mut PgConnection) -> TxFuture<'c, Result<T, E>>,
        C: ResultCodec<T, E>,
    {
        let mut codec = codec;
        let operation = Operation::of_body::<F>();
        match self
            .open(settings, operation, key, fingerprint, &mut codec, caching)
            .await
        {
            Opened::Done(result) => result,
            Opened::Claimed(mut claim) => {
                let holding = claim.holding();
                // The closure is called inside the catch too: it may panic
                // before it returns its future.
                let connection = claim.connection();
                let result =
                    crate::engine::caught(async move { holding.run(body(connection)).await })
                        .await
                        .unwrap_or_else(|panic| claim.panicked(panic));
                (*claim).finish(result, codec).await
            }
        }
    }

    /// Opens a transactional call: replays a committed call, refuses, or
    /// claims the key in a new transaction. The call runs in an `idem.call`
    /// span named `operation`, told when it ends (here, or at
    /// [`Claim::finish`]).
    pub(crate) async fn open<T, E, C: ResultCodec<T, E>>(
        &self,
        settings: &Settings,
        operation: Operation,
        key: Key,
        fingerprint: Fingerprint,
        codec: &mut C,
        savepoint: bool,
    ) -> Opened<'_, T, E> {
        let call = Call::new(operation, key);
        let answer = self
            .coalesced(settings, &call, key, fingerprint, savepoint)
            .instrument(call.span().clone())
            .await;
        let done = match answer {
            Ok(Ok((held, leader))) => {
                return Opened::Claimed(Box::new(Claim {
                    held,
                    leader,
                    call,
                    started: Instant::now(),
                }));
            }
            Ok(Err(record)) => crate::engine::replay(
                &record,
                &Traced {
                    inner: codec,
                    call: &call,
                },
            ),
            Err(error) => {
                call.error(&error);
                Err(codec.idem_error(error))
            }
        };
        call.finish();
        Opened::Done(done)
    }

    /// The claim (with the lead of this process's duplicates), or the
    /// committed record to replay. Same-key calls in this process wait for
    /// the first one's outcome instead of each holding a connection while
    /// it waits for the key's lock; with `reject` there is nothing to wait
    /// for.
    async fn coalesced(
        &self,
        settings: &Settings,
        call: &Call,
        key: Key,
        fingerprint: Fingerprint,
        savepoint: bool,
    ) -> Result<Result<(Held, Option<Leader<'_>>), Record>, Error> {
        // A call of the key from inside its own body would wait for its own
        // advisory lock (or for its own flight) until its `wait_timeout`.
        if crate::reentry::reentered(self.holder(), key) {
            return Err(Error::Reentered {
                operation: call.operation().as_str().to_owned().into(),
            });
        }
        if settings.on_conflict() == OnConflict::Reject {
            let claimed = self
                .claim(settings, call, key, fingerprint, savepoint, None)
                .await?;
            return Ok(claimed.map(|held| (held, None)));
        }
        let deadline = tokio::time::Instant::now() + settings.wait_timeout();
        loop {
            match self.inner.flights.join(key, fingerprint, settings.lease()) {
                Role::Leader(leader) => {
                    return match self
                        .claim(settings, call, key, fingerprint, savepoint, Some(deadline))
                        .await
                    {
                        Ok(Ok(held)) => Ok(Ok((held, Some(leader)))),
                        Ok(Err(record)) => {
                            leader.land(Landing::Record(record.clone()));
                            Ok(Err(record))
                        }
                        Err(error) => {
                            leader.land(Landing::Failed(error.clone()));
                            Err(error)
                        }
                    };
                }
                Role::Follower(flight) => {
                    if let Some(record) = flight.follow(fingerprint, deadline, call).await? {
                        return Ok(Err(record));
                    }
                }
            }
        }
    }

    /// The claim, or the committed record to replay. A call that waited
    /// in the process (for a call that was then cancelled) waits for the
    /// key's lock until the end of the same wait, `until`, not a new one.
    async fn claim(
        &self,
        settings: &Settings,
        call: &Call,
        key: Key,
        fingerprint: Fingerprint,
        savepoint: bool,
        until: Option<tokio::time::Instant>,
    ) -> Result<Result<Held, Record>, Error> {
        self.ready().await?;
        let lock_id = lock_id(self, key);
        let locking_since = Instant::now();
        let mut deadline = until.map_or(locking_since + settings.wait_timeout(), |until| {
            locking_since + until.saturating_duration_since(tokio::time::Instant::now())
        });
        let mut waited = false;
        // Whether the session's `statement_timeout` bounds the wait yet.
        let mut bounded = false;
        let in_progress = || Error::InProgress {
            retry_after: Duration::from_secs(1).min(settings.wait_timeout()),
        };
        loop {
            call.attempt();
            // One round trip begins the transaction and tries the key's
            // advisory lock; the claim's statement, the next, reads whether
            // the lock was taken (a `BEGIN`'s rows are not returned). The
            // same round trip bounds how long the transaction may sit idle
            // by the lease: a holder that froze or lost the network mid-body
            // is ended by the database within its lease, which frees the key,
            // instead of when TCP gives up. The values are numbers idem
            // formats, never the caller's text.
            let begin = format!(
                "{}; SELECT set_config('idem.locked', pg_try_advisory_xact_lock({lock_id})::text, true), \
                 set_config('idle_in_transaction_session_timeout', '{}', true)",
                match settings.isolation() {
                    None => "BEGIN".to_owned(),
                    Some(level) => format!("BEGIN ISOLATION LEVEL {}", level.as_sql()),
                },
                idle_limit(settings.lease()),
            );
            // Sent once more on a live connection when it found its own
            // closed (a restart closes them all): nothing was begun.
            let began = self
                .timed(
                    "begin",
                    self.on_a_live_connection(|| begin_on(&self.inner.pool, Some(begin.clone()))),
                )
                .await;
            let mut tx = match began {
                Ok(tx) => tx,
                // Waiting, it handed its connection back between two looks
                // at the key (see `LOCK_WAIT_SLICE`), and the pool had none
                // free in time: the key was held when it last looked.
                Err(error) if waited && error.kind() == StoreErrorKind::Timeout => {
                    tracing::debug!(%key, %error, "a transactional waiter found no free connection to look at the key again");
                    call.waited(locking_since.elapsed());
                    return Err(in_progress());
                }
                Err(error) => return Err(error.into()),
            };
            // Claims the key if the lock was taken, or reads what it holds: a
            // committed call is replayed (the transaction, which wrote
            // nothing, is rolled back when it is dropped).
            let token = Token::random();
            let claimed = self
                .timed("claim", async {
                    Ok(sqlx::query(&self.inner.sql.claim_in_transaction)
                        .bind(key.digest().as_slice())
                        .bind(fingerprint.digest().as_slice())
                        .bind(token_bytes(token).as_slice())
                        .bind(millis(settings.lease()))
                        .fetch_one(&mut *tx)
                        .await)
                })
                .await?;
            let row = match claimed {
                Ok(row) => row,
                // Under `REPEATABLE READ` or `SERIALIZABLE` the snapshot is
                // taken before the lock: a holder that committed in between
                // left a row it cannot see, and the claim fails to serialize.
                // A new transaction sees the committed record, and replays.
                Err(error) if serialization_failure(&error) && Instant::now() < deadline => {
                    tracing::debug!(%key, %error, "a transactional claim raced a commit; starting over");
                    continue;
                }
                Err(error) => return Err(Error::Store(store_error("claim", &error))),
            };
            let column = |e: sqlx::Error| Error::Store(store_error("claim", &e));
            let locked = row.try_get::<bool, _>("locked").map_err(column)?;
            let answer = row.try_get::<Option<bool>, _>("claimed").map_err(column)?;
            if locked && answer.is_none() {
                // The insert found the key's row, which was gone when the
                // update looked for it (the purge deleted it in between):
                // a new transaction claims the absent key.
                if Instant::now() < deadline {
                    tracing::debug!(%key, "a transactional claim found the key's row deleted under it; starting over");
                    continue;
                }
                return Err(Error::Store(StoreError::new(
                    StoreErrorKind::Other,
                    "postgres claim: the key changed under its advisory lock",
                )));
            }
            // Under the lock, the claim or what the key holds; without it, a
            // committed record only.
            if answer.is_some() {
                // Told with its wait, whatever the key then held.
                if waited {
                    call.waited(locking_since.elapsed());
                }
                return match begin_answer(&row, fingerprint, settings.lease())? {
                    Begin::Claimed => {
                        let tid = row
                            .try_get::<Option<String>, _>("tid")
                            .map_err(column)?
                            .unwrap_or_default();
                        self.held(tx, key, token, tid, settings, savepoint)
                            .await
                            .map(Ok)
                    }
                    Begin::Completed(record) => Ok(Err(record)),
                    Begin::Mismatch => Err(Error::KeyReused),
                    Begin::InProgress { retry_after } => Err(Error::InProgress { retry_after }),
                };
            }
            if settings.on_conflict() == OnConflict::Reject {
                return Err(in_progress());
            }
            // Another transaction holds the key: wait for it, then start
            // over in a new transaction. This one's snapshot may have been
            // taken before the holder committed, so under `REPEATABLE READ`
            // or `SERIALIZABLE` it could neither see the holder's record nor
            // claim the key without a serialization failure.
            let session_timeout: String = row.try_get("lock_timeout").map_err(column)?;
            if !bounded {
                // Each of the wait's statements is shorter than a session
                // `statement_timeout` that is shorter than the whole wait:
                // the wait itself keeps to it, as one statement would.
                bounded = true;
                let statement_ms = self
                    .timed("lock", async {
                        sqlx::query_scalar::<_, i64>(
                            "SELECT setting::bigint FROM pg_settings WHERE name = 'statement_timeout'",
                        )
                        .fetch_one(&mut *tx)
                        .await
                    })
                    .await?;
                if let Ok(ms @ 1..) = u64::try_from(statement_ms) {
                    deadline = deadline.min(Instant::now() + Duration::from_millis(ms));
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            // In slices: a caller that gives up (a timeout around the call,
            // a dropped request) leaves the statement waiting on its pooled
            // connection, which the pool gets back only when it answers.
            let slice = left.min(LOCK_WAIT_SLICE);
            let lock = if left.is_zero() {
                LockWait::Cut
            } else {
                self.wait_for_lock(&mut tx, lock_id, slice, &session_timeout)
                    .await?
            };
            match lock {
                LockWait::Taken => {}
                // Its slice is over, not its wait: it looks again.
                LockWait::TimedOut if slice < left => {}
                LockWait::TimedOut | LockWait::Cut => {
                    // Told with the wait it gave up after.
                    call.waited(locking_since.elapsed());
                    return Err(in_progress());
                }
            }
            waited = true;
            if let Err(error) = self.timed("rollback", tx.rollback()).await {
                tracing::debug!(%key, %error, "ending a transaction that waited for a key's lock failed; the database ends it");
            }
        }
    }

    /// The claim taken in `tx`, with the savepoint the body's writes roll
    /// back to when its error is cached.
    async fn held(
        &self,
        mut tx: Transaction<'static, Postgres>,
        key: Key,
        token: Token,
        tid: String,
        settings: &Settings,
        savepoint: bool,
    ) -> Result<Held, Error> {
        if savepoint {
            self.timed("savepoint", async {
                sqlx::query("SAVEPOINT idem_body").execute(&mut *tx).await
            })
            .await?;
        }
        Ok(Held {
            tx,
            store: self.clone(),
            key,
            token,
            tid,
            ttl: settings.ttl(),
            savepoint,
        })
    }

    /// Waits for the key's advisory lock for at most `wait`, through a
    /// `lock_timeout` that holds for this statement only: the session's value
    /// is set back before the body runs, so the body's own lock waits are not
    /// cut short. Answers how the wait ended.
    async fn wait_for_lock(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        lock_id: i64,
        wait: Duration,
        session_timeout: &str,
    ) -> Result<LockWait, Error> {
        // A slice: at most `LOCK_WAIT_SLICE`, well under PostgreSQL's
        // limit of `i32::MAX` ms.
        let wait_ms = millis(wait).min(i64::from(i32::MAX));
        let locking = async {
            sqlx::query(
                "SELECT set_config('lock_timeout', $2, true), pg_advisory_xact_lock($1), \
                 set_config('lock_timeout', $3, true)",
            )
            .bind(lock_id)
            .bind(format!("{wait_ms}ms"))
            .bind(session_timeout)
            .execute(&mut **tx)
            .await
        };
        // The lock's own timeout, plus the statement's.
        let bound = Duration::from_millis(u64::try_from(wait_ms).unwrap_or(0))
            .saturating_add(self.inner.response_timeout);
        match tokio::time::timeout(bound, locking).await {
            Ok(Ok(_)) => Ok(LockWait::Taken),
            // Either way the key stayed held.
            Ok(Err(error)) if lock_timed_out(&error) => Ok(LockWait::TimedOut),
            // The session's `statement_timeout`, shorter than the wait.
            Ok(Err(error)) if statement_timed_out(&error) => Ok(LockWait::Cut),
            Ok(Err(error)) => Err(Error::Store(store_error("lock", &error))),
            Err(_elapsed) => Ok(LockWait::Cut),
        }
    }
}

impl Claim<'_> {
    /// Records the body's `result` and commits, or rolls back: an `Ok` (or
    /// a cached `Err`) is stored and committed with the body's writes; an
    /// `Err` that is not cached rolls everything back. Answers the result,
    /// or the store's error when recording or committing failed. A commit
    /// that failed outright rolled the body's writes back with the record;
    /// one that timed out or lost its connection may have committed them, so
    /// its outcome is unknown to the caller: the retry's answer (a replay if
    /// it committed) is how to learn it. Hands the outcome to the duplicates that waited for it and ends
    /// the call's span.
    pub(crate) async fn finish<T, E, C: ResultCodec<T, E>>(
        self,
        result: Result<T, E>,
        codec: C,
    ) -> Result<T, E> {
        let Self {
            held,
            leader,
            call,
            started,
        } = self;
        let took = started.elapsed();
        let codec = Traced {
            inner: codec,
            call: &call,
        };
        let span = call.span().clone();
        let (answer, landing) = held
            .finish(result, codec, took, &call)
            .instrument(span)
            .await;
        if let Some(leader) = leader {
            leader.land(landing);
        }
        call.finish();
        answer
    }
}

impl Held {
    /// The caller's answer, and what the duplicates that waited get: the
    /// committed record, or the attempt's failure (they do not run the body
    /// in turn; a later retry does).
    async fn finish<T, E, C: ResultCodec<T, E>>(
        self,
        result: Result<T, E>,
        mut codec: C,
        took: Duration,
        call: &Call,
    ) -> (Result<T, E>, Landing) {
        let key = self.key;
        // An error kept by `cache_errors` that does not serialize cannot be
        // replayed: the body's writes are rolled back with the claim (they
        // are not committed beside a record that says only "it ran"), so a
        // retry runs it again.
        let Some(record) = to_record_or_undo(key, &result, &mut codec, true) else {
            call.ran(took, false);
            // Bounded like every statement idem issues: during a partition
            // the caller gets its answer after the response timeout, and the
            // database rolls the transaction back when the session ends.
            if let Err(error) = self.store.timed("rollback", self.tx.rollback()).await {
                tracing::debug!(%key, %error, "rolling back a failed idempotent call failed; the database rolls it back itself");
            }
            return (result, Landing::Failed(Error::AttemptFailed));
        };
        match self.commit(&record).await {
            Ok(()) => {
                call.ran(took, true);
                (result, Landing::Record(record))
            }
            Err(error) => {
                call.ran(took, false);
                let error = Error::Store(error);
                let landing = Landing::Failed(error.clone());
                (Err(codec.idem_error(error)), landing)
            }
        }
    }

    async fn commit(mut self, record: &Record) -> Result<(), StoreError> {
        let store = self.store;
        if self.savepoint && record.outcome() == Outcome::Err {
            store
                .timed("rollback to savepoint", async {
                    sqlx::query("ROLLBACK TO SAVEPOINT idem_body")
                        .execute(&mut *self.tx)
                        .await
                })
                .await?;
        }
        let encoded = record.encode();
        let mut stored = store
            .timed("complete", async {
                sqlx::query(&store.inner.sql.complete_in_transaction)
                    .bind(self.key.digest().as_slice())
                    .bind(token_bytes(self.token).as_slice())
                    .bind(encoded.as_ref())
                    .bind(millis(self.ttl))
                    .bind(&self.tid)
                    .execute(&mut *self.tx)
                    .await
            })
            .await?;
        if stored.rows_affected() != 1 {
            // The claimed row moved: the body updated it itself.
            stored = store
                .timed("complete", async {
                    sqlx::query(&store.inner.sql.complete_by_key_in_transaction)
                        .bind(self.key.digest().as_slice())
                        .bind(token_bytes(self.token).as_slice())
                        .bind(encoded.as_ref())
                        .bind(millis(self.ttl))
                        .execute(&mut *self.tx)
                        .await
                })
                .await?;
        }
        if stored.rows_affected() != 1 {
            // The body ran `COMMIT` or `ROLLBACK` itself: the claim, the
            // record and the body's writes are no longer one transaction.
            let _ = store.timed("rollback", self.tx.rollback()).await;
            // After a `COMMIT`, the claim and the body's writes are
            // committed: mark the claim as having run, so that a retry does
            // not run the body again once the claim's lease ends. (After a
            // `ROLLBACK` there is no claim left to mark.)
            let ran = Record::unserializable(
                "the body ended idem's transaction itself (COMMIT or ROLLBACK); its writes may \
                 have committed, and its result was not recorded",
            );
            if let Err(error) =
                crate::store::Store::complete(&store, self.key, self.token, ran, self.ttl).await
            {
                tracing::warn!(key = %self.key, record_lost = true, %error, "could not mark a claim whose body ended idem's transaction; a retry after its lease runs the body again");
            }
            return Err(StoreError::new(
                StoreErrorKind::Config,
                "the body of a transactional call ended idem's transaction (COMMIT or ROLLBACK); \
                 its result was not recorded: leave the transaction to idem, or use savepoints",
            ));
        }
        // A commit that timed out or lost its connection may have
        // committed: the database knows, and a retry learns it (it replays a
        // committed result, or runs if nothing was).
        let unknown = |error: StoreError| {
            StoreError::new(
                error.kind(),
                format!(
                    "{error}; the transaction may or may not have committed: retry the \
                     call to learn which (a committed result replays)"
                ),
            )
        };
        match store
            .timed("commit", async { Ok(self.tx.commit().await) })
            .await
            .map_err(unknown)?
        {
            Ok(()) => Ok(()),
            // The database refused it: nothing was committed.
            Err(error) if refused_commit(&error) => Err(store_error("commit", &error)),
            Err(error) => Err(unknown(store_error("commit", &error))),
        }
    }
}

/// How a statement's wait for a key's lock ended.
enum LockWait {
    /// The lock was taken: its holder ended.
    Taken,
    /// The wait's own timeout passed.
    TimedOut,
    /// Something else cut the wait short (the session's
    /// `statement_timeout`, the statement's bound).
    Cut,
}

/// The longest one statement waits for a key's lock: a waiter whose caller
/// gave up holds its connection at most this long (and the response
/// timeout) before the pool has it back.
const LOCK_WAIT_SLICE: Duration = Duration::from_secs(1);

/// The key's advisory lock in `store`: 64 bits of its digest, mixed with
/// the store's table (two tables' calls of one key lock apart).
pub(crate) fn lock_id(store: &PostgresStore, key: Key) -> i64 {
    i64::from_be_bytes(key.digest()[..8].try_into().unwrap_or([0; 8])) ^ store.inner.sql.lock_space
}

/// `idle_in_transaction_session_timeout` for a transaction held for `lease`
/// (PostgreSQL takes at most `i32::MAX` ms).
fn idle_limit(lease: Duration) -> String {
    format!("{}ms", millis(lease).min(i64::from(i32::MAX)))
}

/// Whether a statement failed to serialize (`40001`).
fn serialization_failure(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.code().as_deref() == Some("40001"))
}

/// Whether the database answered `COMMIT` with an error that rolled the
/// transaction back: a serialization failure, a deadlock, or a deferred
/// constraint (class `23`, integrity) the body's writes broke. Any other
/// failure (a timeout, a lost connection) leaves the outcome unknown.
fn refused_commit(error: &sqlx::Error) -> bool {
    serialization_failure(error)
        || deadlock(error)
        || matches!(error, sqlx::Error::Database(db) if db.code().is_some_and(|code| code.starts_with("23")))
}

/// Whether a statement failed on a deadlock.
fn deadlock(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.code().as_deref() == Some("40P01"))
}

/// Whether a statement was cancelled by `statement_timeout` (`57014`).
fn statement_timed_out(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.code().as_deref() == Some("57014"))
}

/// Whether a statement failed on `lock_timeout` (or a `NOWAIT` lock).
pub(super) fn lock_timed_out(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.code().as_deref() == Some("55P03"))
}
