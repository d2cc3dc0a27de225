//! The protocol: claim → run → complete or release, with waiting and lease
//! renewal.
//!
//! These are the [`Idempotency`] handle's `run` methods: what `#[idempotent]`
//! expands to, and what code without the macro calls directly (closures,
//! keys computed at run time).

use std::future::Future;
use std::pin::pin;
use std::time::Duration;

use backon::BackoffBuilder as _;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use crate::error::Error;
use crate::flight::{Landing, Leader, Role};
use crate::handle::Idempotency;
use crate::key::{Fingerprint, Key};
use crate::settings::{OnConflict, Settings};
use crate::store::{Begin, Completion, Outcome, Record, Token};

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
    /// then does not run), `Decode` when a stored result no longer decodes.
    pub async fn run<T, E, F>(
        &self,
        settings: &Settings,
        key: Key,
        fingerprint: Fingerprint,
        body: F,
    ) -> Result<T, E>
    where
        F: Future<Output = Result<T, E>>,
        T: Serialize + DeserializeOwned,
        E: From<Error>,
    {
        self.execute(settings, key, fingerprint, body, ReleaseErrors)
            .await
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
    pub async fn run_caching_errors<T, E, F, P>(
        &self,
        settings: &Settings,
        key: Key,
        fingerprint: Fingerprint,
        cache: P,
        body: F,
    ) -> Result<T, E>
    where
        F: Future<Output = Result<T, E>>,
        T: Serialize + DeserializeOwned,
        E: From<Error> + Serialize + DeserializeOwned,
        P: FnOnce(&E) -> bool,
    {
        self.execute(settings, key, fingerprint, body, CacheErrors(cache))
            .await
    }

    async fn execute<T, E, F, P>(
        &self,
        settings: &Settings,
        key: Key,
        fingerprint: Fingerprint,
        body: F,
        policy: P,
    ) -> Result<T, E>
    where
        F: Future<Output = Result<T, E>>,
        T: Serialize + DeserializeOwned,
        E: From<Error>,
        P: ErrorPolicy<E>,
    {
        if settings.on_conflict() == OnConflict::Reject {
            return self
                .lead(settings, None, key, fingerprint, body, policy, None)
                .await;
        }
        let deadline = Instant::now() + settings.wait_timeout();
        loop {
            match self.shared.flights.join(key, fingerprint, settings.lease()) {
                Role::Leader(leader) => {
                    return self
                        .lead(
                            settings,
                            Some(leader),
                            key,
                            fingerprint,
                            body,
                            policy,
                            Some(deadline),
                        )
                        .await;
                }
                Role::Follower(flight) => {
                    if flight.fingerprint() != fingerprint {
                        return Err(Error::KeyReused.into());
                    }
                    let landed = tokio::time::timeout_at(deadline, flight.landed()).await;
                    match landed {
                        Err(_elapsed) => {
                            return Err(Error::InProgress {
                                retry_after: flight.retry_after(),
                            }
                            .into());
                        }
                        Ok(Landing::Record(record)) => return replay(&record, &policy),
                        Ok(Landing::Failed(error)) => return Err(error.into()),
                        Ok(Landing::Vacated) => {}
                    }
                }
            }
        }
    }

    /// Claims the key (waiting for another holder until `deadline`, or not at
    /// all without one), runs the body and records its outcome.
    #[allow(clippy::too_many_arguments)]
    async fn lead<T, E, F, P>(
        &self,
        settings: &Settings,
        leader: Option<Leader<'_>>,
        key: Key,
        fingerprint: Fingerprint,
        body: F,
        policy: P,
        deadline: Option<Instant>,
    ) -> Result<T, E>
    where
        F: Future<Output = Result<T, E>>,
        T: Serialize + DeserializeOwned,
        E: From<Error>,
        P: ErrorPolicy<E>,
    {
        let mut herald = Herald(leader);
        let token = Token::random();
        let mut backoff = backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(5))
            .with_max_delay(Duration::from_secs(1))
            .with_jitter()
            .without_max_times()
            .build();
        loop {
            let begin = self
                .shared
                .store
                .begin(key, fingerprint, token, settings.lease())
                .await;
            match begin.map_err(Error::Store) {
                Err(error) => return Err(herald.fail(error).into()),
                Ok(Begin::Claimed) => break,
                Ok(Begin::Completed(record)) => {
                    let replayed = replay(&record, &policy);
                    herald.land(Landing::Record(record));
                    return replayed;
                }
                Ok(Begin::Mismatch) => return Err(herald.fail(Error::KeyReused).into()),
                Ok(Begin::InProgress { retry_after }) => {
                    let now = Instant::now();
                    let refused = Error::InProgress { retry_after };
                    let Some(deadline) = deadline.filter(|d| *d > now) else {
                        return Err(refused.into());
                    };
                    herald.set_retry_at(now + retry_after);
                    let cap = retry_after.min(deadline - now);
                    match self.shared.store.watch(key) {
                        Some(change) => {
                            let _ = tokio::time::timeout(cap, change).await;
                        }
                        None => {
                            let pause = backoff.next().unwrap_or(cap).min(cap);
                            tokio::time::sleep(pause).await;
                        }
                    }
                }
            }
        }

        herald.set_retry_at(Instant::now() + settings.lease());
        let (result, held) = self.run_renewing(settings, key, token, body, &herald).await;
        let (outcome, payload) = match &result {
            Ok(value) => (Outcome::Ok, serde_json::to_vec(value)),
            Err(error) => match policy.keep(error) {
                Some(payload) => (Outcome::Err, payload),
                None => {
                    if let Err(error) = self.shared.store.release(key, token).await {
                        tracing::warn!(%key, %error, "could not release an idempotency claim; it lapses with its lease");
                    }
                    herald.land(Landing::Vacated);
                    return result;
                }
            },
        };
        let record = match payload {
            Ok(payload) => Record::new(outcome, payload),
            Err(error) => {
                // The body ran but its result cannot be stored. The claim is
                // kept until its lease lapses, so a retry does not run at once.
                tracing::error!(%key, %error, "the result of an idempotent call does not serialize");
                return Err(herald.fail(Error::encode("result", error)).into());
            }
        };
        if held {
            match self
                .shared
                .store
                .complete(key, token, record.clone(), settings.ttl())
                .await
            {
                Ok(Completion::Stored) => {}
                Ok(Completion::Lost) => {
                    tracing::warn!(%key, "an idempotency claim lapsed while its call ran; its result was not stored");
                }
                Err(error) => {
                    tracing::error!(%key, %error, "the result of an idempotent call could not be stored; its claim lapses with its lease");
                }
            }
        }
        herald.land(Landing::Record(record));
        result
    }

    /// Polls `body` to completion while renewing the claim every third of the
    /// lease. Answers the body's output and whether the claim is still held.
    async fn run_renewing<F: Future>(
        &self,
        settings: &Settings,
        key: Key,
        token: Token,
        body: F,
        herald: &Herald<'_>,
    ) -> (F::Output, bool) {
        let every = settings.lease() / 3;
        let renewal = async {
            loop {
                tokio::time::sleep(every).await;
                match self.shared.store.renew(key, token, settings.lease()).await {
                    Ok(true) => herald.set_retry_at(Instant::now() + settings.lease()),
                    Ok(false) => {
                        tracing::warn!(%key, "an idempotency claim was lost while its call ran; its result will not be stored");
                        return;
                    }
                    Err(error) => {
                        tracing::warn!(%key, %error, "could not renew an idempotency claim; retrying");
                    }
                }
            }
        };
        let mut body = pin!(body);
        let mut renewal = pin!(renewal);
        let mut held = true;
        loop {
            tokio::select! {
                biased;
                output = &mut body => return (output, held),
                () = &mut renewal, if held => held = false,
            }
        }
    }
}

/// Decodes a stored record as the call's result.
fn replay<T, E, P>(record: &Record, policy: &P) -> Result<T, E>
where
    T: DeserializeOwned,
    E: From<Error>,
    P: ErrorPolicy<E>,
{
    match record.outcome() {
        Outcome::Ok => {
            serde_json::from_slice(record.payload()).map_err(|e| Error::decode(e).into())
        }
        Outcome::Err => Err(policy.replay(record.payload())?),
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

/// Whether an `Err` is stored, and how a stored one is read back.
trait ErrorPolicy<E> {
    /// The error's payload if it is to be stored.
    fn keep(self, error: &E) -> Option<Result<Vec<u8>, serde_json::Error>>;
    /// Reads a stored error back.
    fn replay(&self, payload: &[u8]) -> Result<E, Error>;
}

struct ReleaseErrors;

impl<E> ErrorPolicy<E> for ReleaseErrors {
    fn keep(self, _: &E) -> Option<Result<Vec<u8>, serde_json::Error>> {
        None
    }

    fn replay(&self, _: &[u8]) -> Result<E, Error> {
        let message = "the stored result is an error, but this call does not cache errors; \
                       a call with this key and `cache_errors` stored it";
        Err(Error::Decode(std::sync::Arc::from(Box::<
            dyn std::error::Error + Send + Sync,
        >::from(message))))
    }
}

struct CacheErrors<P>(P);

impl<E, P> ErrorPolicy<E> for CacheErrors<P>
where
    E: Serialize + DeserializeOwned,
    P: FnOnce(&E) -> bool,
{
    fn keep(self, error: &E) -> Option<Result<Vec<u8>, serde_json::Error>> {
        (self.0)(error).then(|| serde_json::to_vec(error))
    }

    fn replay(&self, payload: &[u8]) -> Result<E, Error> {
        serde_json::from_slice(payload).map_err(Error::decode)
    }
}
