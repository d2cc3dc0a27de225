//! The protocol: claim → run → complete or release, with waiting and lease
//! renewal.
//!
//! These are the [`Idempotency`] handle's `run` methods: what `#[idempotent]`
//! expands to, and what code without the macro calls directly (closures,
//! keys computed at run time).

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::Duration;

use backon::BackoffBuilder as _;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::codec::{ResultCodec, Serde, SerdeCaching};
use crate::error::{Error, StoreError, StoreErrorKind};
use crate::flight::{Landing, Leader, Role};
use crate::handle::Idempotency;
use crate::key::{Fingerprint, Key};
use crate::observe::{self, Call, Operation, Traced};
use crate::settings::{ConfigError, OnConflict, Settings};
use crate::steps::{Ending, Journal};
use crate::store::{Begin, Completion, JournaledStep, Outcome, Record, Token};

// Every event that says a result was (or may be) not recorded carries
// `record_lost = true` and the key's digest, so that tests and log queries
// can find the calls that a retry may run again.

impl Idempotency {
    /// Runs `body` once for `key`, or replays the result of the call that did.
    ///
    /// An `Ok` result is stored for the TTL. An `Err` is not: the claim is
    /// released, so a retry runs the body again (see
    /// [`run_caching_errors`](Self::run_caching_errors)).
    ///
    /// ```
    /// use std::time::Duration;
    /// use idem_core::{Fingerprint, Idempotency, Key, OnConflict, Settings};
    ///
    /// #[derive(Debug)]
    /// enum ChargeError { Idem(idem_core::Error) }
    /// impl From<idem_core::Error> for ChargeError {
    ///     fn from(e: idem_core::Error) -> Self { Self::Idem(e) }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), ChargeError> {
    /// let idem = Idempotency::memory();
    /// let settings = Settings::builder()
    ///     .ttl(Duration::from_secs(3600))
    ///     .lease(Duration::from_secs(30))
    ///     .on_conflict(OnConflict::Wait)
    ///     .build()
    ///     .map_err(idem_core::Error::from)?;
    ///
    /// let (customer, amount) = (7_u64, 100_u32);
    /// let key = Key::scoped("payments.charge", &customer, &"order-17")?;
    /// let fingerprint = Fingerprint::of(&(&customer, &amount))?;
    /// let receipt: u64 = idem.run(&settings, key, fingerprint, async { Ok::<_, ChargeError>(4711) }).await?;
    /// let again: u64 = idem.run(&settings, key, fingerprint, async { Ok::<_, ChargeError>(9999) }).await?;
    /// assert_eq!(receipt, again, "the retry replays the first result");
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// The body's own error, or one converted from [`Error`]: `InProgress`
    /// when the key stays held past the wait, `KeyReused` when `fingerprint`
    /// differs from the stored one, `Store` when the store fails (the body
    /// then does not run), `Decode` when a stored result no longer decodes,
    /// `NotReplayable` when the call ran but its result could not be stored,
    /// `AttemptFailed` when the call this one waited for in the process
    /// failed, `Reentered` when the body of a call of `key` on this handle
    /// makes it, and `Config` when `settings` break a rule for the store (a
    /// lease shorter than three response timeouts).
    #[track_caller]
    pub fn run<T, E, F>(
        &self,
        settings: &Settings,
        key: Key,
        fingerprint: Fingerprint,
        body: F,
    ) -> impl Future<Output = Result<T, E>>
    where
        F: Future<Output = Result<T, E>>,
        T: Serialize + DeserializeOwned,
        E: From<Error>,
    {
        let operation = Operation::of_run::<F>(std::panic::Location::caller());
        // `execute` where the future is first polled (it joins the task's
        // claims there); the caller's location here.
        async move {
            self.execute(settings, operation, key, fingerprint, body, Serde)
                .await
        }
    }

    /// Like [`run`](Self::run), but an `Err` that `cache` accepts is stored
    /// and replayed like an `Ok`.
    ///
    /// ```
    /// # use idem_core::{Fingerprint, Idempotency, Key, Settings};
    /// #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    /// enum PayError { Declined, Idem(String) }
    /// impl From<idem_core::Error> for PayError {
    ///     fn from(e: idem_core::Error) -> Self { Self::Idem(e.to_string()) }
    /// }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), idem_core::Error> {
    /// let idem = Idempotency::memory();
    /// let settings = Settings::default();
    /// let (key, fp) = (Key::new("pay", &1)?, Fingerprint::of(&())?);
    /// let declined = |e: &PayError| *e == PayError::Declined;
    /// let first: Result<u32, _> = idem
    ///     .run_caching_errors(&settings, key, fp, declined, async { Err(PayError::Declined) })
    ///     .await;
    /// let retry: Result<u32, _> = idem
    ///     .run_caching_errors(&settings, key, fp, declined, async { Ok(1) })
    ///     .await;
    /// assert_eq!(retry, Err(PayError::Declined));
    /// # let _ = first;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`run`](Self::run), plus replayed errors.
    #[track_caller]
    pub fn run_caching_errors<T, E, F, P>(
        &self,
        settings: &Settings,
        key: Key,
        fingerprint: Fingerprint,
        cache: P,
        body: F,
    ) -> impl Future<Output = Result<T, E>>
    where
        F: Future<Output = Result<T, E>>,
        T: Serialize + DeserializeOwned,
        E: From<Error> + Serialize + DeserializeOwned,
        P: FnOnce(&E) -> bool,
    {
        let operation = Operation::of_run::<F>(std::panic::Location::caller());
        async move {
            let codec = SerdeCaching::new(cache);
            self.execute(settings, operation, key, fingerprint, body, codec)
                .await
        }
    }

    /// This handle's identity in the re-entry check (and the HTTP layer's
    /// check of a request an outer layer guards).
    pub(crate) fn holder(&self) -> usize {
        Arc::as_ptr(&self.shared) as usize
    }

    /// Runs `body` once for `key` with results stored by `codec`: what
    /// every `run` comes down to, the attribute's included. The call runs in
    /// an `idem.call` span and is counted as `operation`.
    ///
    /// Called where the returned future is first polled, as every caller
    /// awaits it at once: the body joins the task's claims here.
    pub(crate) fn execute<T, E, F, C>(
        &self,
        settings: &Settings,
        operation: Operation,
        key: Key,
        fingerprint: Fingerprint,
        body: F,
        codec: C,
    ) -> impl Future<Output = Result<T, E>>
    where
        F: Future<Output = Result<T, E>>,
        C: ResultCodec<T, E>,
    {
        // Boxed once, here: each layer below would otherwise keep a copy of
        // the body's future in its own, and a replay never runs it.
        let body = Box::pin(crate::reentry::holding(self.holder(), key, body));
        async move {
            let call = Call::new(operation, key);
            let codec = Traced {
                inner: codec,
                call: &call,
            };
            // Boxed once here, so that the callers' futures, moved whole at
            // each level of nesting, stay small.
            let result = Box::pin(
                self.observed(settings, &call, key, fingerprint, body, codec)
                    .instrument(call.span().clone()),
            )
            .await;
            call.finish();
            result
        }
    }

    // An async block, not an `async fn`: it uses its arguments in place,
    // where an `async fn` keeps a copy of each beside them, in a future that
    // every replay allocates.
    #[allow(clippy::manual_async_fn)]
    fn observed<T, E, F, C>(
        &self,
        settings: &Settings,
        call: &Call,
        key: Key,
        fingerprint: Fingerprint,
        body: F,
        codec: C,
    ) -> impl Future<Output = Result<T, E>>
    where
        F: Future<Output = Result<T, E>>,
        C: ResultCodec<T, E>,
    {
        async move {
            if let Err(error) = self.check(settings) {
                return Err(codec.idem_error(error));
            }
            if crate::reentry::reentered(self.holder(), key) {
                return Err(codec.idem_error(Error::Reentered {
                    operation: call.operation().as_str().to_owned().into(),
                }));
            }
            if settings.on_conflict() == OnConflict::Reject {
                return self
                    .lead(settings, call, None, key, fingerprint, body, codec, None)
                    .await;
            }
            let deadline = WaitUntil::new(settings.wait_timeout());
            loop {
                match self.shared.flights.join(key, fingerprint, settings.lease()) {
                    Role::Leader(leader) => {
                        return self
                            .lead(
                                settings,
                                call,
                                Some(leader),
                                key,
                                fingerprint,
                                body,
                                codec,
                                Some(&deadline),
                            )
                            .await;
                    }
                    Role::Follower(flight) => {
                        match Box::pin(flight.follow(fingerprint, deadline.at(), call)).await {
                            Ok(Some(record)) => return replay(&record, &codec),
                            Ok(None) => {}
                            Err(error) => return Err(codec.idem_error(error)),
                        }
                    }
                }
            }
        }
    }

    /// Checks the settings against what the store promises: a renewal that
    /// times out must be retried before the lease lapses.
    fn check(&self, settings: &Settings) -> Result<(), Error> {
        match self.shared.limits.response_timeout {
            Some(timeout) if settings.lease() < timeout.saturating_mul(3) => Err(Error::Config(
                ConfigError::lease_too_short_for_store(settings.lease(), timeout),
            )),
            _ => Ok(()),
        }
    }

    /// Claims the key (waiting for another holder until `deadline`, or not at
    /// all without one), runs the body and records its outcome.
    // An async block, as `observed` is.
    #[allow(clippy::too_many_arguments, clippy::manual_async_fn)]
    fn lead<T, E, F, C>(
        &self,
        settings: &Settings,
        call: &Call,
        leader: Option<Leader<'_>>,
        key: Key,
        fingerprint: Fingerprint,
        body: F,
        mut codec: C,
        deadline: Option<&WaitUntil>,
    ) -> impl Future<Output = Result<T, E>>
    where
        F: Future<Output = Result<T, E>>,
        C: ResultCodec<T, E>,
    {
        async move {
            let mut herald = Herald(leader);
            let token = Token::random();
            let mut journal_read = None;
            match self
                .claim(
                    settings,
                    call,
                    key,
                    fingerprint,
                    token,
                    deadline,
                    &herald,
                    &mut journal_read,
                )
                .await
            {
                Ok(None) => {}
                Ok(Some(record)) => {
                    let replayed = replay(&record, &codec);
                    herald.land(Landing::Record(record));
                    return replayed;
                }
                Err(error) => return Err(codec.idem_error(herald.fail(error))),
            }

            let lease = Lease::new(settings.lease());
            herald.set_retry_at(lease.until());
            let work = async {
                let started = Instant::now();
                let journal = Journal::new(
                    Arc::clone(&self.shared.store),
                    key,
                    fingerprint,
                    token,
                    settings.ttl(),
                    journal_read,
                );
                // A journal read with the claim that another call's
                // arguments wrote: this call is that key reused, and its
                // body does not run.
                let reused_at_claim = journal.other_arguments();
                let mut result = if reused_at_claim {
                    Ok(Err(codec.idem_error(Error::KeyReused)))
                } else {
                    caught(journal.scope(body)).await
                };
                let took = started.elapsed();
                let mut record = match &result {
                    // Another call's journal, found with the claim or at a
                    // step: nothing of this call is recorded (below), so
                    // its result is neither encoded nor offered to a
                    // `cache_errors` predicate.
                    _ if journal.other_arguments() => None,
                    Ok(result) => to_record(key, result, &mut codec)
                        .map(|record| bounded(key, record, self.shared.max_record_bytes)),
                    // A panicking body failed: its claim is released and its
                    // waiters are told, as for an `Err`; the panic goes on to
                    // the caller once that is done.
                    Err(_panic) => None,
                };
                // A call that failed for good undoes its completed steps first.
                let failed = !matches!(result, Ok(Ok(_)));
                let held = || !lease.lost() && Instant::now() < lease.until();
                let mut unrecorded = false;
                match journal.end(failed, record.as_ref(), &held).await {
                    Ending::AsIs => {}
                    Ending::Final {
                        record: outcome,
                        replace,
                    } => {
                        if replace {
                            result = Ok(replay(&outcome, &codec));
                        }
                        record = Some(outcome);
                    }
                    Ending::Unfinished {
                        record: outcome,
                        replace,
                    } => {
                        if replace {
                            result = Ok(replay(&outcome, &codec));
                        }
                        unrecorded = record.take().is_some();
                    }
                }
                // The journal is another call's (found with the claim, at a
                // step, or as `end` read it for a call that failed for
                // good): whatever the body made of it, the call is the key
                // reused; nothing of it is recorded or compensated, and its
                // claim is released.
                let reused = journal.other_arguments();
                if reused {
                    if !reused_at_claim && result.is_ok() {
                        result = Ok(Err(codec.idem_error(Error::KeyReused)));
                    }
                    record = None;
                    unrecorded = false;
                }
                call.ran(took, record.is_some());
                if record.is_none() && journal.claim_lost() {
                    // The body stopped at a step or its epoch, which found
                    // the claim taken over: another holder runs the call.
                    // (A result to store is counted when it is refused.)
                    call.not_stored();
                    observe::claim_lost(call.operation());
                    tracing::warn!(%key, record_lost = true, "an idempotency claim was taken over while its call ran; its body stopped at a step or its fencing epoch");
                }
                // (A claim taken over says so above: another holder
                // finishes the call, and this one does not run it again.)
                if unrecorded && !journal.claim_lost() {
                    // The call failed for good, but its compensation did not
                    // finish (or its journal could not be read): its failure is
                    // recorded by a later attempt, which runs the body again.
                    call.not_stored();
                    observe::record_lost(call.operation());
                    tracing::warn!(%key, record_lost = true, "the failure of an idempotent call is not recorded until its compensation finishes; a retry runs its body again");
                }
                lease.settle();
                // Until the outcome is settled, a caller that drops the call
                // (a timeout around it, a client that left) hands it to a
                // task: the body ran, and its outcome is known.
                let mut unsettled = Unsettled {
                    engine: self,
                    settings,
                    operation: call.operation(),
                    key,
                    token,
                    lease: &lease,
                    record,
                    refused: AtomicBool::new(false),
                    armed: true,
                };
                let (landing, confirmed) = self
                    .settle(
                        settings,
                        call,
                        key,
                        token,
                        &lease,
                        &mut unsettled.record,
                        &unsettled.refused,
                        codec.awaits_record(),
                    )
                    .await;
                unsettled.armed = false;
                // A failure whose compensation did not finish is not recorded,
                // whatever the release of its claim answered.
                codec.recorded(confirmed && !unrecorded);
                // Followers, of the same arguments, are the key reused too.
                let landing = if reused {
                    Landing::Failed(Error::KeyReused)
                } else {
                    landing
                };
                (result, landing)
            };
            // Boxed: a replay never gets here, and every call's future (moved
            // whole on each call) would otherwise be as large as this path's.
            let (result, landing) =
                Box::pin(self.renewing(settings, key, token, &lease, &herald, work)).await;
            herald.land(landing);
            match result {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
    }

    /// Claims `key`: `None` once claimed, or the completed record to replay.
    /// A call that expects steps reads its journal with the claim, into
    /// `journal`.
    // An async block, as `observed` is.
    #[allow(clippy::too_many_arguments, clippy::manual_async_fn)]
    fn claim(
        &self,
        settings: &Settings,
        call: &Call,
        key: Key,
        fingerprint: Fingerprint,
        token: Token,
        deadline: Option<&WaitUntil>,
        herald: &Herald<'_>,
        journal: &mut Option<Vec<JournaledStep>>,
    ) -> impl Future<Output = Result<Option<Record>, Error>> {
        async move {
            let store = &self.shared.store;
            let mut polls = 0;
            loop {
                call.attempt();
                // A call dropped while its `begin` is on its way may have
                // claimed the key: that claim, fenced by the token, is
                // cleared, as one whose answer was lost is.
                let mut pending = PendingBegin {
                    engine: self,
                    key,
                    token,
                    armed: true,
                };
                let begin = if settings.expects_steps() {
                    store
                        .begin_with_steps(key, fingerprint, token, settings.lease())
                        .await
                        .map(|(begun, read)| {
                            *journal = read;
                            begun
                        })
                } else {
                    store.begin(key, fingerprint, token, settings.lease()).await
                };
                pending.armed = false;
                match begin {
                    Err(error) => {
                        self.clear_unknown_claim(key, token, &error);
                        return Err(Error::Store(error));
                    }
                    Ok(Begin::Claimed) => return Ok(None),
                    Ok(Begin::Completed(record)) => return Ok(Some(record)),
                    Ok(Begin::Mismatch) => return Err(Error::KeyReused),
                    Ok(Begin::InProgress { retry_after }) => {
                        let now = Instant::now();
                        let refused = Error::InProgress { retry_after };
                        let Some(deadline) = deadline.map(WaitUntil::at).filter(|d| *d > now)
                        else {
                            return Err(refused);
                        };
                        herald.set_retry_at(now + retry_after);
                        // A holder's remaining lease is only a hint: a clock that
                        // lags (or a lease about to be renewed) says "almost
                        // over" again and again. Never poll faster than the floor.
                        let cap = retry_after.max(MIN_POLL_PAUSE).min(deadline - now);
                        // Boxed, as the body's path is: only waiting calls pay for
                        // the timer.
                        match store.watch(key) {
                            Some(change) => {
                                let _ = Box::pin(tokio::time::timeout(cap, change)).await;
                                // A wake-up that keeps firing at once (a claim that
                                // lapsed but was not yet replaced) must not turn the
                                // wait into a busy loop: from the second wait on,
                                // each lasts at least the floor.
                                if polls > 0 {
                                    let floor = (now + MIN_POLL_PAUSE).min(deadline);
                                    Box::pin(tokio::time::sleep_until(floor)).await;
                                }
                                polls += 1;
                            }
                            None => {
                                // At least the floor, but for a last look at
                                // the deadline.
                                let pause = poll_pause(polls).max(MIN_POLL_PAUSE).min(cap);
                                polls += 1;
                                Box::pin(tokio::time::sleep(pause)).await;
                            }
                        }
                        call.waited(now.elapsed());
                    }
                }
            }
        }
    }

    /// A `begin` that failed may still have landed (a timeout: the command
    /// was sent, the answer never came) and left a claim nobody owns, which
    /// would lock the key out for a lease. Release it, fenced by the token, in
    /// the background; on a connection that keeps order it runs after the
    /// `begin` it follows.
    fn clear_unknown_claim(&self, key: Key, token: Token, error: &StoreError) {
        let unknown = matches!(
            error.kind(),
            StoreErrorKind::Timeout | StoreErrorKind::Unavailable | StoreErrorKind::Other
        );
        if unknown {
            self.release_later(key, token);
        }
    }

    /// Releases the claim `token` may hold on `key` from a task: a `begin`
    /// whose outcome is unknown may have made it. Fenced by the token, so a
    /// `begin` that claimed nothing makes it a no-op.
    fn release_later(&self, key: Key, token: Token) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let store = Arc::clone(&self.shared.store);
        runtime.spawn(async move {
            if let Err(error) = store.release(key, token).await {
                tracing::debug!(%key, %error, "could not clear a claim whose begin's outcome is unknown; it lapses with its lease");
            }
        });
    }

    /// Records the body's outcome: completes the claim with its record, or,
    /// with none, releases it. Answers what the flight's followers get: the
    /// record, or, when the claim was no longer ours (its result was not
    /// stored, and another call's may be), word to contend again.
    ///
    /// An operation whose outcome is unknown (a timeout, a dropped
    /// connection) is retried in the background, renewing the claim
    /// meanwhile, while the lease as it stood when the body returned allows:
    /// the operations are fenced and safe to repeat, and one lost answer must
    /// not lose a result (or lock a key out for a lease). The caller does not
    /// wait for those retries, unless `awaited`.
    ///
    /// Also answers whether the store confirmed the outcome (after the
    /// retries, when `awaited`).
    #[allow(clippy::too_many_arguments)]
    async fn settle(
        &self,
        settings: &Settings,
        call: &Call,
        key: Key,
        token: Token,
        lease: &Lease,
        record: &mut Option<Record>,
        refused: &AtomicBool,
        awaited: bool,
    ) -> (Landing, bool) {
        let operation = call.operation();
        let mut confirmed = false;
        // Whether the claim was no longer ours: another call may have run and
        // stored its own result, so followers must not get this one.
        let mut stale = false;
        if lease.lost() {
            stale = true;
            if record.is_some() {
                observe::claim_lost(operation);
                call.not_stored();
                tracing::warn!(%key, record_lost = true, "an idempotency claim was taken over while its call ran; its result was not stored");
            }
        } else {
            let recorded = self
                .record(settings, key, token, record.as_ref(), refused)
                .await;
            // Once the store refused the result as full, its retries write
            // only the few bytes saying the call ran: the full record, sent
            // again, would keep the store full (Redis holds a buffer the size
            // of the last argument for a while) and be refused again.
            match recorded {
                Ok(Completion::Stored) => confirmed = true,
                Ok(Completion::Lost) => {
                    stale = true;
                    if record.is_some() {
                        call.not_stored();
                    }
                    observe::claim_lost(operation);
                    tracing::warn!(%key, record_lost = true, "an idempotency claim lapsed, was taken over or was forgotten while its call ran; its result was not stored");
                }
                Err(error) if retryable(&error) && awaited => {
                    tracing::warn!(%key, %error, "could not record the outcome of an idempotent call; retrying while its lease allows");
                    observe::record_retried(operation);
                    // On a lease of its own (the call's goes on being
                    // renewed), and with the call's word of a full store's
                    // refusal, which a drop hands on to the background.
                    let lease = lease.clone();
                    confirmed = Box::pin(self.record_retrying_on(
                        settings,
                        operation,
                        key,
                        token,
                        &lease,
                        record.as_ref(),
                        refused,
                    ))
                    .await;
                    // Told, as the store did not confirm it: the caller (a
                    // consumer) does not act on it as stored.
                    if !confirmed && record.is_some() {
                        call.not_stored();
                    }
                }
                Err(error) if retryable(&error) => {
                    self.record_later(
                        settings,
                        operation,
                        key,
                        token,
                        lease,
                        record.clone(),
                        refused.load(Ordering::Relaxed),
                        error,
                    );
                }
                Err(error) => {
                    if record.is_some() {
                        call.not_stored();
                        observe::record_lost(operation);
                    }
                    tracing::error!(%key, record_lost = true, %error, "could not record the outcome of an idempotent call; its claim lapses with its lease");
                }
            }
        }
        let landing = match record.take() {
            // Followers contend again, and replay what the store holds. So
            // do those of a caller that awaits the record when the store did
            // not confirm it: a consumer must not acknowledge a redelivery
            // on an outcome that may not be recorded. And so do those of a
            // holder whose lease ran out before the store confirmed its
            // record: another call may hold the key, and store its own.
            Some(_) if stale || (awaited && !confirmed) => Landing::Vacated,
            Some(_) if !confirmed && Instant::now() >= lease.until() => Landing::Vacated,
            Some(record) => Landing::Record(record),
            None => Landing::Failed(Error::AttemptFailed),
        };
        (landing, confirmed)
    }

    /// Completes the claim with `record` (or, when the store refuses it as
    /// full, with a few bytes saying the call ran), or releases it without
    /// one. `refused` says the store refused `record` as full before (and
    /// is set when it does now): then only the few bytes are written.
    async fn record(
        &self,
        settings: &Settings,
        key: Key,
        token: Token,
        record: Option<&Record>,
        refused: &AtomicBool,
    ) -> Result<Completion, StoreError> {
        let store = &self.shared.store;
        let Some(record) = record else {
            return store.release(key, token).await.map(|()| Completion::Stored);
        };
        let unstorable = || {
            record.unkept(&format!(
                "the store refused to keep the result ({} bytes); the call ran",
                record.payload().len()
            ))
        };
        if refused.load(Ordering::Relaxed) {
            return store
                .complete(key, token, unstorable(), settings.ttl())
                .await;
        }
        let completed = store
            .complete(key, token, record.clone(), settings.ttl())
            .await;
        match completed {
            Err(error)
                if error.kind() == StoreErrorKind::Full
                    && record.outcome() != Outcome::Unserializable =>
            {
                // The body ran, and its result cannot be kept: record that
                // much, in a few bytes, so that a retry does not run it again.
                // On the first attempt and on every retry alike.
                tracing::error!(%key, %error, size = record.payload().len(), "the store refused the result of an idempotent call; retries get Error::NotReplayable and do not run it again");
                refused.store(true, Ordering::Relaxed);
                store
                    .complete(key, token, unstorable(), settings.ttl())
                    .await
            }
            completed => completed,
        }
    }

    /// Retries [`record`](Self::record) in the background, renewing the
    /// claim meanwhile, until it succeeds or the lease (as it stands now)
    /// runs out. Without a tokio runtime to run on, gives up at once.
    #[allow(clippy::too_many_arguments)]
    fn record_later(
        &self,
        settings: &Settings,
        operation: &Operation,
        key: Key,
        token: Token,
        lease: &Lease,
        record: Option<Record>,
        refused: bool,
        error: StoreError,
    ) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            if record.is_some() {
                observe::record_lost(operation);
            }
            tracing::error!(%key, record_lost = true, %error, "could not record the outcome of an idempotent call; its claim lapses with its lease");
            return;
        };
        tracing::warn!(%key, %error, "could not record the outcome of an idempotent call; retrying while its lease allows");
        observe::record_retried(operation);
        runtime.spawn(self.clone().record_retrying(
            *settings,
            operation.clone(),
            key,
            token,
            lease.clone(),
            record,
            refused,
        ));
    }

    /// Retries [`record`](Self::record), renewing the claim meanwhile, until
    /// it succeeds or the lease (as it stands now) runs out. Answers whether
    /// it succeeded.
    #[allow(clippy::too_many_arguments)]
    fn record_retrying(
        self,
        settings: Settings,
        operation: Operation,
        key: Key,
        token: Token,
        lease: Lease,
        record: Option<Record>,
        refused: bool,
    ) -> impl Future<Output = bool> + Send + 'static {
        /// Dropped unfinished, the task was: its runtime stopped (a service
        /// shutting down, a `block_on` that ended) before the outcome was
        /// recorded, whether the task had begun or not.
        struct Unfinished {
            key: Key,
            operation: Operation,
            done: bool,
        }
        impl Unfinished {
            fn finish(mut self) {
                self.done = true;
            }
        }
        impl Drop for Unfinished {
            fn drop(&mut self) {
                if !self.done {
                    observe::record_lost(&self.operation);
                    tracing::error!(key = %self.key, record_lost = true, "the runtime stopped before the outcome of an idempotent call was recorded; a retry after its lease runs the body again");
                }
            }
        }
        // Made now, not when the task first runs: a task dropped before it
        // ran must tell it too.
        let unfinished = Unfinished {
            key,
            operation,
            done: false,
        };
        async move {
            let refused = AtomicBool::new(refused);
            let confirmed = self
                .record_retrying_on(
                    &settings,
                    &unfinished.operation,
                    key,
                    token,
                    &lease,
                    record.as_ref(),
                    &refused,
                )
                .await;
            unfinished.finish();
            confirmed
        }
    }

    /// [`record_retrying`](Self::record_retrying), on borrowed state:
    /// `refused` is set when the store refuses the record as full.
    #[allow(clippy::too_many_arguments)]
    async fn record_retrying_on(
        &self,
        settings: &Settings,
        operation: &Operation,
        key: Key,
        token: Token,
        lease: &Lease,
        record: Option<&Record>,
        refused: &AtomicBool,
    ) -> bool {
        let until = lease.until();
        let attempts = retrying(key, until, lease, || {
            self.record(settings, key, token, record, refused)
        });
        let recorded = self
            .renewing(settings, key, token, lease, &Herald(None), attempts)
            .await;
        match recorded {
            Ok(Completion::Stored) => {
                tracing::info!(%key, "recorded the outcome of an idempotent call after retrying");
                true
            }
            Ok(Completion::Lost) => {
                observe::record_lost(operation);
                tracing::warn!(%key, record_lost = true, "an idempotency claim lapsed before its outcome could be recorded");
                false
            }
            Err(error) => {
                observe::record_lost(operation);
                tracing::error!(%key, record_lost = true, %error, "could not record the outcome of an idempotent call before its lease ran out; a retry after it runs the body again");
                false
            }
        }
    }

    /// Polls `work` to completion while renewing the claim every third of the
    /// lease. A renewal that fails is retried at once, with a short backoff,
    /// while the lease allows; past it, every third of the lease (at least
    /// [`PAST_LEASE_RENEW_PAUSE`] apart, at most half a lease) while the work
    /// runs.
    async fn renewing<W: Future>(
        &self,
        settings: &Settings,
        key: Key,
        token: Token,
        lease: &Lease,
        herald: &Herald<'_>,
        work: W,
    ) -> W::Output {
        let store = &self.shared.store;
        let every = settings.lease() / 3;
        let renewal = async {
            // Whether the lease ran out unrenewed (the store unreachable).
            let mut past = false;
            loop {
                tokio::time::sleep_until(lease.renewed_at() + every).await;
                let mut pauses = backoff(Duration::from_millis(10), every / 2);
                loop {
                    // The store extends the lease when it applies the renewal,
                    // at the earliest when it is sent: reckon from then, so that
                    // a slow answer never makes the holder think its lease
                    // lasts longer than it does.
                    let sent = Instant::now();
                    match store.renew(key, token, settings.lease()).await {
                        Ok(true) => {
                            if std::mem::take(&mut past) {
                                tracing::warn!(%key, "renewed an idempotency claim after its lease had run out unrenewed: the store still held it for this call");
                            }
                            lease.renew_from(sent, settings.lease());
                            herald.set_retry_at(lease.until());
                            break;
                        }
                        // Once the outcome is being recorded, the record may
                        // have landed before this renewal: its own answer
                        // tells whether the claim was lost.
                        Ok(false) if lease.settling() => return,
                        Ok(false) => {
                            tracing::warn!(%key, record_lost = true, "an idempotency claim was lost while its call ran; its result will not be stored");
                            lease.lose();
                            return;
                        }
                        Err(error) => {
                            // Keep trying while the last confirmed lease
                            // allows: the store may come back before it ends.
                            let left = lease.until().saturating_duration_since(Instant::now());
                            let pause = pauses.next().unwrap_or(every).min(left / 2);
                            if pause >= MIN_RENEW_PAUSE {
                                tracing::warn!(%key, %error, "could not renew an idempotency claim; retrying");
                                tokio::time::sleep(pause).await;
                                continue;
                            }
                            // Past the lease, the claim may have lapsed, or
                            // the store (whose renewals may have landed, their
                            // answers lost) may still hold it: a renewal, which
                            // is fenced, says which once the store answers.
                            if !std::mem::replace(&mut past, true) {
                                tracing::error!(%key, record_lost = true, %error, "could not renew an idempotency claim before its lease ran out; trying on while the call runs");
                            }
                            tokio::time::sleep(
                                every.max(PAST_LEASE_RENEW_PAUSE.min(settings.lease() / 2)),
                            )
                            .await;
                        }
                    }
                }
            }
        };
        let mut work = pin!(work);
        let mut renewal = pin!(renewal);
        let mut renewing = true;
        loop {
            tokio::select! {
                biased;
                output = &mut work => return output,
                () = &mut renewal, if renewing => renewing = false,
            }
        }
    }
}

/// What the stored record of a body's result is: `None` for an `Err` the
/// policy does not keep, a record of `Unserializable` for a value that does
/// not serialize. A panic in the user's code that this runs (`Serialize`,
/// a `cache_errors` predicate) is a value that does not serialize: the
/// body ran, so its claim must still be settled as having run.
pub(crate) fn to_record<T, E, C>(key: Key, result: &Result<T, E>, codec: &mut C) -> Option<Record>
where
    C: ResultCodec<T, E>,
{
    to_record_or_undo(key, result, codec, false)
}

/// [`to_record`], or `None` for a kept `Err` that does not serialize when
/// `undone` says the body's writes are undone with its claim (a
/// transactional call): a retry may then run it again.
pub(crate) fn to_record_or_undo<T, E, C>(
    key: Key,
    result: &Result<T, E>,
    codec: &mut C,
    undone: bool,
) -> Option<Record>
where
    C: ResultCodec<T, E>,
{
    let panicked = || <serde_json::Error as serde::ser::Error>::custom("encoding it panicked");
    let (outcome, payload, tag) = match result {
        Ok(value) => (
            Outcome::Ok,
            std::panic::catch_unwind(AssertUnwindSafe(|| codec.encode_ok(value)))
                .unwrap_or_else(|_| Err(panicked())),
            codec.ok_tag(),
        ),
        Err(error) => (
            Outcome::Err,
            std::panic::catch_unwind(AssertUnwindSafe(|| codec.keep_err(error)))
                .unwrap_or_else(|_| Some(Err(panicked())))?,
            codec.err_tag(),
        ),
    };
    Some(match payload {
        Ok(payload) => Record::new(outcome, payload).with_type_tag(tag),
        Err(error) if undone && outcome == Outcome::Err => {
            tracing::warn!(%key, %error, "the error of an idempotent call does not serialize, so it is not kept: its writes are rolled back and a retry runs it again");
            return None;
        }
        Err(error) => {
            tracing::error!(%key, %error, "the result of an idempotent call does not serialize; retries get Error::NotReplayable and do not run it again");
            // Tagged as what it was: a kept error that does not serialize
            // is still told from a value (see `replay`).
            Record::unserializable(&error.to_string()).with_type_tag(match outcome {
                Outcome::Err => crate::store::unkept_err_tag(tag),
                _ => tag,
            })
        }
    })
}

/// Polls `body`, catching a panic in it, so that the claim can be settled
/// before the panic goes on.
pub(crate) async fn caught<F: Future>(body: F) -> std::thread::Result<F::Output> {
    let mut body = pin!(body);
    std::future::poll_fn(|cx| {
        match std::panic::catch_unwind(AssertUnwindSafe(|| body.as_mut().poll(cx))) {
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(panic) => Poll::Ready(Err(panic)),
        }
    })
    .await
}

/// `record`, or, when it is larger than `max` bytes, a record that says the
/// call ran but its result was too large to keep: checked before the write,
/// so that a store never holds (or refuses) an oversized result.
fn bounded(key: Key, record: Record, max: usize) -> Record {
    let size = record.payload().len();
    if size <= max || record.outcome() == Outcome::Unserializable {
        return record;
    }
    tracing::error!(%key, size, max, "the result of an idempotent call is larger than the maximum record size; retries get Error::NotReplayable and do not run it again");
    record.unkept(&format!(
        "the result ({size} bytes) is larger than the maximum record size ({max} bytes); the call ran"
    ))
}

/// A `begin` on its way to the store. Dropped armed (the caller dropped the
/// call before its answer came), it clears the claim the `begin` may have
/// made, from a task: otherwise the key would stay locked for a lease by a
/// claim nobody holds.
struct PendingBegin<'a> {
    engine: &'a Idempotency,
    key: Key,
    token: Token,
    armed: bool,
}

impl Drop for PendingBegin<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.engine.release_later(self.key, self.token);
        }
    }
}

/// A body's outcome on its way to the store. Dropped armed (the caller
/// dropped the call while the outcome was being recorded), it records the
/// outcome from a task, as an outcome whose answer was lost is, so that
/// the body, which ran, does not run again once the claim lapses.
struct Unsettled<'a> {
    engine: &'a Idempotency,
    settings: &'a Settings,
    operation: &'a Operation,
    key: Key,
    token: Token,
    lease: &'a Lease,
    record: Option<Record>,
    /// Whether the store refused the record as full (then only a few bytes
    /// saying the call ran are written).
    refused: AtomicBool,
    armed: bool,
}

impl Drop for Unsettled<'_> {
    fn drop(&mut self) {
        if !self.armed || self.lease.lost() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            if self.record.is_some() {
                observe::record_lost(self.operation);
            }
            tracing::error!(key = %self.key, record_lost = true, "an idempotent call was dropped while its outcome was being recorded, outside a runtime; its claim lapses with its lease");
            return;
        };
        tracing::info!(key = %self.key, "an idempotent call was dropped while its outcome was being recorded; recording it in the background");
        runtime.spawn(self.engine.clone().record_retrying(
            *self.settings,
            self.operation.clone(),
            self.key,
            self.token,
            self.lease.clone(),
            self.record.take(),
            self.refused.load(Ordering::Relaxed),
        ));
    }
}

/// What the holder knows of its lease. Shared by the renewal and the body's
/// settlement, which run in one task.
struct Lease(Mutex<LeaseState>);

impl Clone for Lease {
    fn clone(&self) -> Self {
        Self(Mutex::new(self.state()))
    }
}

#[derive(Clone, Copy)]
struct LeaseState {
    renewed_at: Instant,
    until: Instant,
    lost: bool,
    /// Whether the body's outcome is being recorded: the record's own
    /// (fenced) answer then says whether the claim was lost, and a renewal
    /// that finds the claim gone may only have come after the record.
    settling: bool,
}

impl Lease {
    fn new(lease: Duration) -> Self {
        let now = Instant::now();
        Self(Mutex::new(LeaseState {
            renewed_at: now,
            until: now + lease,
            lost: false,
            settling: false,
        }))
    }

    fn state(&self) -> LeaseState {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn update(&self, change: impl FnOnce(&mut LeaseState)) {
        change(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner));
    }

    fn renewed_at(&self) -> Instant {
        self.state().renewed_at
    }

    /// When the claim lapses at the latest, as far as the holder knows.
    fn until(&self) -> Instant {
        self.state().until
    }

    /// A renewal sent at `sent` was confirmed: the claim holds for `lease`
    /// from then (the store applied it no earlier).
    fn renew_from(&self, sent: Instant, lease: Duration) {
        self.update(|state| {
            state.renewed_at = sent;
            state.until = state.until.max(sent + lease);
        });
    }

    /// Whether the store said the claim is no longer ours.
    fn lost(&self) -> bool {
        self.state().lost
    }

    fn lose(&self) {
        self.update(|state| state.lost = true);
    }

    /// The body's outcome is being recorded from now on.
    fn settle(&self) {
        self.update(|state| state.settling = true);
    }

    fn settling(&self) -> bool {
        self.state().settling
    }
}

/// Repeats a fenced store operation that already failed once, while its
/// outcome stays unknown (a timeout, a dropped connection), with a bounded
/// backoff, until `until` or until the store says the claim is lost.
async fn retrying<T, O>(
    key: Key,
    until: Instant,
    lease: &Lease,
    mut attempt: impl FnMut() -> O,
) -> Result<T, StoreError>
where
    O: Future<Output = Result<T, StoreError>>,
{
    let mut pauses = backoff(Duration::from_millis(10), Duration::from_secs(1));
    loop {
        let pause = pauses.next().unwrap_or(Duration::from_secs(1));
        tokio::time::sleep(pause).await;
        match attempt().await {
            Ok(answer) => return Ok(answer),
            Err(error) if retryable(&error) && !lease.lost() && Instant::now() + pause < until => {
                tracing::debug!(%key, %error, "idempotency store operation failed again; retrying");
            }
            Err(error) => return Err(error),
        }
    }
}

/// Whether a failed operation may have failed for a passing reason, so that
/// repeating it may succeed. A full store is one: expiring records free
/// room, and a result that is not recorded may run again.
pub(crate) fn retryable(error: &StoreError) -> bool {
    matches!(
        error.kind(),
        StoreErrorKind::Timeout
            | StoreErrorKind::Unavailable
            | StoreErrorKind::Other
            | StoreErrorKind::Full
    )
}

/// The shortest pause between two renewals of a claim whose lease ran out
/// unrenewed (for a lease of at least two seconds; half a lease, for a
/// shorter one, so that a renewal that lands still keeps the claim): a store
/// that fails at once is not asked hundreds of times a second.
const PAST_LEASE_RENEW_PAUSE: Duration = Duration::from_secs(1);

/// The shortest pause between two polls of a waiting caller, whatever the
/// holder's remaining lease says.
pub(crate) const MIN_POLL_PAUSE: Duration = Duration::from_millis(10);

/// The shortest pause before a failed renewal is tried again; with less of
/// the lease left than twice this, renewals go on at the pace of those past
/// the lease.
const MIN_RENEW_PAUSE: Duration = Duration::from_millis(5);

/// How long a caller that polls a store for another holder's claim waits
/// before poll `n` (from 0): 5 ms doubling to 1 s, each with up to half of
/// itself added at random, so that waiters do not poll in step (the caller
/// waits at least [`MIN_POLL_PAUSE`]). A counter
/// rather than an iterator keeps every call's future small.
fn poll_pause(n: u32) -> Duration {
    let base = Duration::from_millis(5)
        .saturating_mul(1 << n.min(8))
        .min(Duration::from_secs(1));
    let half = u64::try_from(base.as_micros() / 2).unwrap_or(u64::MAX);
    base + Duration::from_micros(rand::random_range(0..=half))
}

pub(crate) fn backoff(min: Duration, max: Duration) -> impl Iterator<Item = Duration> {
    backon::ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max.max(min))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Decodes a stored record as the call's result.
pub(crate) fn replay<T, E, C>(record: &Record, codec: &C) -> Result<T, E>
where
    C: ResultCodec<T, E>,
{
    let expected = match record.outcome() {
        Outcome::Err => codec.err_tag(),
        _ => codec.ok_tag(),
    };
    // A kept error that could not be stored whole (too large, a full store,
    // or it did not serialize) is recorded as run with the error's tag.
    let unkept_err = record.outcome() == Outcome::Unserializable
        && record.type_tag() == Some(crate::store::unkept_err_tag(codec.err_tag()));
    if !unkept_err && record.type_tag().is_some_and(|tag| tag != expected) {
        return Err(codec.idem_error(Error::other_type(match record.outcome() {
            Outcome::Err => std::any::type_name::<E>(),
            _ => std::any::type_name::<T>(),
        })));
    }
    match record.outcome() {
        Outcome::Ok => codec
            .decode_ok(record.payload())
            .map_err(|e| codec.idem_error(Error::decode(e))),
        Outcome::Err => Err(codec
            .decode_err(record.payload())
            .unwrap_or_else(|e| codec.idem_error(e))),
        Outcome::Unserializable => {
            let reason = String::from_utf8_lossy(record.payload());
            Err(unkept_err
                .then(|| codec.unkept_err(&reason))
                .flatten()
                .unwrap_or_else(|| {
                    codec.idem_error(Error::NotReplayable {
                        reason: reason.into_owned(),
                    })
                }))
        }
    }
}

/// When a call stops waiting for another holder: its wait timeout from the
/// moment it first waits, read off the clock only then (a replay never
/// does).
struct WaitUntil {
    wait: Duration,
    at: std::sync::OnceLock<Instant>,
}

impl WaitUntil {
    fn new(wait: Duration) -> Self {
        Self {
            wait,
            at: std::sync::OnceLock::new(),
        }
    }

    fn at(&self) -> Instant {
        *self.at.get_or_init(|| Instant::now() + self.wait)
    }
}

/// Tells followers, if any, how the leader's attempt ended.
struct Herald<'a>(Option<Leader<'a>>);

impl Herald<'_> {
    fn set_retry_at(&self, at: Instant) {
        if let Some(leader) = &self.0 {
            leader.set_retry_at(at);
        }
    }

    fn land(&mut self, landing: Landing) {
        if let Some(leader) = self.0.take() {
            leader.land(landing);
        }
    }

    fn fail(&mut self, error: Error) -> Error {
        self.land(Landing::Failed(error.clone()));
        error
    }
}
