//! The retry loop, for any async operation.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use tokio::time::Instant;

use super::{CircuitBreaker, CircuitOpen, Classify, RetryPolicy, Verdict};

/// How an operation went: the attempts made, its idempotency key, and
/// whether the server replayed a stored response. The reqwest middleware
/// puts it in the final response's extensions (and in its final error, see
/// [`RetryReport::of`]); [`retry`]'s [`RetryError`] carries it, and
/// [`retry_with_key`] returns it with the value.
///
/// **Keep the key until the outcome is known.** An operation that ended in
/// an error (a timeout, a reset connection, an open circuit, the last
/// attempt's 503) may have run. A later retry of it — a job queue's, a user
/// clicking again — must send the same key, taken from the report, so that
/// the server replays it instead of running it twice; only a success or a
/// definite rejection (a 4xx) lets the key go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryReport {
    pub(super) attempts: u32,
    pub(super) key: Option<String>,
    /// The `Idempotency-Key` header as the middleware sent it.
    pub(super) header: Option<HeaderValue>,
    pub(super) replayed: bool,
}

impl RetryReport {
    /// How many attempts were sent, the last included (0 when the circuit
    /// was open from the start).
    #[must_use]
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The operation's idempotency key, if it had one: the one made for it,
    /// or the caller's own. Through the middleware it is the key's value as
    /// a server reads the header: the contents of the structured-field
    /// string it carries (`order-17` for `Idempotency-Key: "order-17"`, and
    /// a made key's UUID, sent as `"<uuid>"`), or the header as sent when it
    /// is not one idem can parse (with bytes that are not UTF-8 replaced).
    /// An outer retry sends [`key_header`](Self::key_header) again.
    #[must_use]
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// The `Idempotency-Key` header that sends this operation's key again:
    /// through the middleware, the header exactly as the operation sent it
    /// (the caller's bytes, or the made key as a structured-field string);
    /// for [`retry`], the key as a structured-field string. `None` without
    /// a key, and for a key a structured-field string cannot carry (only
    /// visible ASCII and spaces; a UUID or a derived key always can).
    ///
    /// ```
    /// # use idem_core::client::{RetryPolicy, Verdict, retry_with_key};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let policy = RetryPolicy::default();
    /// let verdict = |_: &Result<(), std::io::Error>| Verdict::Success;
    /// let (_, report) = retry_with_key(&policy, r#"order "17""#, verdict, |_| async { Ok(()) })
    ///     .await
    ///     .unwrap();
    /// assert_eq!(report.key_header().unwrap(), r#""order \"17\"""#);
    /// let (_, report) = retry_with_key(&policy, "clé", verdict, |_| async { Ok(()) })
    ///     .await
    ///     .unwrap();
    /// assert_eq!(report.key_header(), None); // not visible ASCII
    /// assert_eq!(report.key(), Some("clé"));
    /// # }
    /// ```
    #[must_use]
    pub fn key_header(&self) -> Option<HeaderValue> {
        if let Some(sent) = &self.header {
            return Some(sent.clone());
        }
        crate::http::sf_string_header(self.key.as_deref()?)
    }

    /// Whether the server replayed a stored response
    /// (`Idempotent-Replayed: true`), as it does when an earlier attempt was
    /// processed but its response lost.
    #[must_use]
    pub fn replayed(&self) -> bool {
        self.replayed
    }

    /// The report in a final error of the reqwest middleware, if it made
    /// that error (it wraps every error after its attempts so that the key
    /// is never lost; the original error stays reachable with
    /// `downcast_ref::<reqwest::Error>()` or `::<CircuitOpen>()`).
    #[must_use]
    pub fn of(error: &reqwest_middleware::Error) -> Option<&Self> {
        match error {
            reqwest_middleware::Error::Middleware(error) => error.downcast_ref::<Self>(),
            reqwest_middleware::Error::Reqwest(_) => None,
        }
    }
}

impl fmt::Display for RetryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gave up after {} attempt(s)", self.attempts)?;
        if let Some(key) = &self.key {
            write!(f, " with idempotency key {key:?} (send it again to retry)")?;
        }
        Ok(())
    }
}

/// A fresh idempotency key: a random (version 4) UUID, hyphenated.
#[must_use]
pub fn new_key() -> String {
    uuid::Uuid::new_v4().hyphenated().to_string()
}

/// One attempt of an operation, as [`retry`] hands it to the operation.
#[derive(Debug, Clone)]
pub struct Attempt {
    number: u32,
    key: Arc<str>,
}

impl Attempt {
    /// 1 for the first attempt, 2 for the first retry, and so on.
    #[must_use]
    pub fn number(&self) -> u32 {
        self.number
    }

    /// Whether this attempt is a retry.
    #[must_use]
    pub fn is_retry(&self) -> bool {
        self.number > 1
    }

    /// The operation's idempotency key: made once per operation
    /// ([`new_key`]) and the same on every attempt. Send it with the
    /// request (an `Idempotency-Key` header, a message id) so that the
    /// receiver runs the operation once however many attempts reach it.
    /// (A caller with a key of its own sends that one instead.)
    #[must_use]
    pub fn key(&self) -> &str {
        &self.key
    }
}

/// Why [`retry`] stopped without success.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StopReason {
    /// The last outcome is [`Rejected`](Verdict::Rejected): a retry would
    /// fail the same way.
    NotRetryable,
    /// The policy's `max_attempts` were made.
    MaxAttempts,
    /// The next wait would have ended after the policy's `max_elapsed`.
    MaxElapsed,
    /// The retry budget had no retry left.
    BudgetExhausted,
    /// The dependency's circuit is open: no further attempt was made.
    CircuitOpen(CircuitOpen),
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotRetryable => f.write_str("the error is not retryable"),
            Self::MaxAttempts => f.write_str("the attempt limit was reached"),
            Self::MaxElapsed => f.write_str("the time limit was reached"),
            Self::BudgetExhausted => f.write_str("the retry budget is exhausted"),
            Self::CircuitOpen(open) => open.fmt(f),
        }
    }
}

/// An operation that [`retry`] gave up on: why, after how many attempts,
/// under which key, and the last attempt's error (none when the circuit was
/// open from the start, or when the attempt that was the breaker's probe
/// got no answer within its `probe_timeout` and was dropped).
///
/// Its [`key`](Self::key) is the operation's: the outcome is not known, so
/// a later retry must reuse it ([`retry_with_key`]).
#[derive(Debug)]
pub struct RetryError<E> {
    reason: StopReason,
    report: RetryReport,
    last: Option<E>,
}

impl<E> RetryError<E> {
    /// Why it stopped.
    #[must_use]
    pub fn reason(&self) -> &StopReason {
        &self.reason
    }

    /// How many attempts were made (0 when the circuit was open).
    #[must_use]
    pub fn attempts(&self) -> u32 {
        self.report.attempts
    }

    /// The operation's idempotency key: keep it until the outcome is known.
    #[must_use]
    pub fn key(&self) -> &str {
        self.report.key.as_deref().unwrap_or_default()
    }

    /// The attempts and the key.
    #[must_use]
    pub fn report(&self) -> &RetryReport {
        &self.report
    }

    /// The last attempt's error.
    #[must_use]
    pub fn last_error(&self) -> Option<&E> {
        self.last.as_ref()
    }

    /// The last attempt's error, by value.
    #[must_use]
    pub fn into_last_error(self) -> Option<E> {
        self.last
    }
}

impl<E: fmt::Display> fmt::Display for RetryError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "gave up after {} attempt(s) with idempotency key {:?}: {}",
            self.report.attempts,
            self.key(),
            self.reason
        )?;
        if let Some(last) = &self.last {
            write!(f, "; last error: {last}")?;
        }
        Ok(())
    }
}

impl<E: std::error::Error + 'static> std::error::Error for RetryError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match (&self.last, &self.reason) {
            (Some(last), _) => Some(last),
            (None, StopReason::CircuitOpen(open)) => Some(open),
            (None, _) => None,
        }
    }
}

/// Runs `operation` until it succeeds, fails for good, or `policy` says
/// stop; the error's [`Classify`] verdict decides which.
///
/// Each attempt gets an [`Attempt`] with the operation's one idempotency
/// key: a fresh UUID, or, in the work of a [`step`](crate::step) of an
/// idempotent call, the step's derived key (as
/// [`RetryMiddleware`](super::RetryMiddleware) sends it), the same on every
/// attempt of the call. Between attempts it waits as [`RetryPolicy::delay`] says (honouring
/// the dependency's `Retry-After`), within the policy's attempt limit, time
/// limit and budget. With a [breaker](RetryPolicy::breaker), an open circuit
/// stops it at once, without calling `operation`; an attempt that is the
/// breaker's probe is dropped (cancelled) when it has no outcome within the
/// breaker's `probe_timeout`: the probe failed, the circuit opens again, and
/// the operation stops with [`StopReason::CircuitOpen`] and the key (the
/// attempt may have run).
///
/// ```
/// use idem_core::client::{RetryPolicy, retry};
/// use std::io;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let policy = RetryPolicy::default();
/// let mut calls = 0;
/// let receipt = retry(&policy, |attempt| {
///     calls += 1;
///     let key = attempt.key().to_owned(); // the same on every attempt
///     async move {
///         if calls < 2 {
///             Err(io::Error::from(io::ErrorKind::ConnectionReset)) // retried
///         } else {
///             Ok(format!("charged once under {key}"))
///         }
///     }
/// })
/// .await?;
/// # assert_eq!(calls, 2);
/// # Ok(())
/// # }
/// ```
///
/// # Errors
///
/// [`RetryError`] with the last error when the error is not retryable or a
/// limit was reached, or when the circuit is open.
pub async fn retry<T, E, F, Fut>(policy: &RetryPolicy, operation: F) -> Result<T, RetryError<E>>
where
    E: Classify,
    F: FnMut(&Attempt) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    retry_if(
        policy,
        |outcome: &Result<T, E>| match outcome {
            Ok(_) => Verdict::Success,
            Err(error) => error.classify(),
        },
        operation,
    )
    .await
}

/// [`retry`] with the verdict given by `classify`, for outcomes without a
/// [`Classify`] implementation or an `Ok` that should be retried (a
/// response with status 503). An `Ok` judged retryable that is the last
/// attempt is returned as it is, as is one after which the circuit opened
/// (at once when it stays open past the wait; an error there ends the
/// operation as a [`RetryError`] with [`StopReason::CircuitOpen`] and that
/// error).
///
/// ```
/// use idem_core::client::{RetryPolicy, Verdict, retry_if};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// #[derive(Debug)]
/// enum PublishError { Unavailable, Invalid }
///
/// let published = retry_if(
///     &RetryPolicy::default(),
///     |outcome: &Result<(), PublishError>| match outcome {
///         Ok(()) => Verdict::Success,
///         Err(PublishError::Unavailable) => Verdict::Failed { retry_after: None },
///         Err(PublishError::Invalid) => Verdict::Rejected,
///     },
///     |attempt| {
///         let message_id = attempt.key().to_owned(); // the broker deduplicates by it
///         async move { let _ = message_id; Err(PublishError::Invalid) }
///     },
/// )
/// .await;
/// assert_eq!(published.unwrap_err().attempts(), 1);
/// # }
/// ```
///
/// # Errors
///
/// As [`retry`].
pub async fn retry_if<T, E, F, Fut, C>(
    policy: &RetryPolicy,
    classify: C,
    operation: F,
) -> Result<T, RetryError<E>>
where
    C: Fn(&Result<T, E>) -> Verdict,
    F: FnMut(&Attempt) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let key = crate::steps::request_key().unwrap_or_else(new_key);
    retry_with_key(policy, key, classify, operation)
        .await
        .map(|(value, _)| value)
}

/// [`retry_if`] under a key the caller keeps, returning the
/// [`RetryReport`] with the value: the form for an operation that may be
/// retried again later (by a job queue, by a user) and so must keep one
/// key until its outcome is known. Make the key once with [`new_key`] (or
/// take the one a [`RetryError`] carries) and pass it to every run.
///
/// ```
/// use idem_core::client::{RetryPolicy, Verdict, new_key, retry_with_key};
/// use std::io;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let policy = RetryPolicy::builder().max_attempts(1).build().unwrap();
/// let classify = |outcome: &Result<(), io::Error>| match outcome {
///     Ok(()) => Verdict::Success,
///     Err(_) => Verdict::Failed { retry_after: None },
/// };
/// let key = new_key(); // stored with the job, before the first run
/// let first = retry_with_key(&policy, key.clone(), classify, |_| async {
///     Err(io::Error::from(io::ErrorKind::TimedOut)) // did it run? unknown
/// })
/// .await
/// .unwrap_err();
/// assert_eq!(first.key(), key); // so the next run sends the same key
/// let (_, report) = retry_with_key(&policy, first.key(), classify, |attempt| {
///     assert_eq!(attempt.key(), key);
///     async { Ok(()) }
/// })
/// .await
/// .unwrap();
/// assert_eq!(report.key(), Some(key.as_str()));
/// # }
/// ```
///
/// # Errors
///
/// As [`retry`].
pub async fn retry_with_key<T, E, F, Fut, C>(
    policy: &RetryPolicy,
    key: impl Into<Arc<str>>,
    classify: C,
    mut operation: F,
) -> Result<(T, RetryReport), RetryError<E>>
where
    C: Fn(&Result<T, E>) -> Verdict,
    F: FnMut(&Attempt) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempt = Attempt {
        number: 0,
        key: key.into(),
    };
    let report = |attempt: &Attempt, attempts: u32| RetryReport {
        attempts,
        key: Some(attempt.key.to_string()),
        header: None,
        replayed: false,
    };
    let mut retries = Retries::start(policy);
    let mut last = None;
    // A retryable `Ok` of the last attempt, returned as it is if the circuit
    // opens before the next one.
    let mut last_ok = None;
    loop {
        attempt.number += 1;
        let permit = match policy.breaker.as_ref().map(CircuitBreaker::try_acquire) {
            Some(Err(open)) => {
                if let Some(value) = last_ok.take() {
                    return Ok((value, report(&attempt, attempt.number - 1)));
                }
                return Err(RetryError {
                    reason: StopReason::CircuitOpen(open),
                    report: report(&attempt, attempt.number - 1),
                    last,
                });
            }
            Some(Ok(permit)) => Some(permit),
            None => None,
        };
        let probe_timeout = permit
            .as_ref()
            .filter(|permit| permit.is_probe())
            .map(|_| policy.breaker.as_ref().map(CircuitBreaker::probe_timeout));
        let outcome = match probe_timeout.flatten() {
            // A probe that hangs is abandoned at its deadline: the breaker
            // has counted it as failed, and this operation's next attempt
            // (with the same key) finds the circuit open again.
            Some(timeout) => tokio::time::timeout(timeout, operation(&attempt))
                .await
                .ok(),
            None => Some(operation(&attempt).await),
        };
        let Some(outcome) = outcome else {
            // The probe failed: the circuit opens again, and this
            // operation stops as any other finding it open.
            // Asking the breaker again could admit the next probe (a
            // cool-down shorter than the wait so far) only to drop it.
            if let Some(permit) = permit {
                permit.record(Verdict::Failed { retry_after: None });
            }
            let open = policy
                .breaker
                .as_ref()
                .expect("only a breaker's permit is a probe")
                .refusal();
            return Err(RetryError {
                reason: StopReason::CircuitOpen(open),
                report: report(&attempt, attempt.number),
                last,
            });
        };
        let verdict = classify(&outcome);
        if let Some(permit) = permit {
            permit.record(verdict);
        }
        let stop = match verdict {
            Verdict::Success => {
                let report = report(&attempt, attempt.number);
                return match outcome {
                    Ok(value) => Ok((value, report)),
                    Err(error) => Err(RetryError {
                        reason: StopReason::NotRetryable,
                        report,
                        last: Some(error),
                    }),
                };
            }
            Verdict::Rejected => Err(StopReason::NotRetryable),
            // A classifier speaks in verdicts only: every busy one may be a
            // request in progress (idem's `InProgress`, a 409).
            Verdict::Busy { .. } => retries.next_delay(attempt.number, verdict, true),
            Verdict::Failed { .. } => retries.next_delay(attempt.number, verdict, false),
        };
        // A circuit this attempt opened, open past the wait: the operation
        // ends now, with this attempt's outcome.
        let open_past = |delay: Duration| {
            policy
                .breaker
                .as_ref()
                .and_then(|breaker| breaker.open_past(delay))
        };
        let stop = match stop {
            Ok(delay) => {
                open_past(delay).map_or(Ok(delay), |open| Err(StopReason::CircuitOpen(open)))
            }
            stop => stop,
        };
        match (stop, outcome) {
            (Ok(delay), Err(error)) => {
                last = Some(error);
                last_ok = None;
                tokio::time::sleep(delay).await;
            }
            (Ok(delay), Ok(value)) => {
                last = None;
                last_ok = Some(value);
                tokio::time::sleep(delay).await;
            }
            (Err(_), Ok(value)) => return Ok((value, report(&attempt, attempt.number))),
            (Err(reason), Err(error)) => {
                return Err(RetryError {
                    reason,
                    report: report(&attempt, attempt.number),
                    last: Some(error),
                });
            }
        }
    }
}

/// The limits of one operation's retries: the clock, the attempt count and
/// the budget. Shared by [`retry_if`] and the reqwest middleware.
pub(super) struct Retries<'a> {
    policy: &'a RetryPolicy,
    started: Instant,
}

impl<'a> Retries<'a> {
    /// Starts an operation: deposits in the budget.
    pub(super) fn start(policy: &'a RetryPolicy) -> Self {
        if let Some(budget) = &policy.budget {
            budget.deposit();
        }
        Self {
            policy,
            started: Instant::now(),
        }
    }

    /// The wait before the attempt after `attempts` attempts ended in
    /// `verdict`, or why there is none.
    ///
    /// A request still in progress (`in_progress`: a 409 while the
    /// operation's first request still runs, idem's `InProgress`) is polled
    /// within the time limit: when its wait would end past the limit, it is
    /// cut to what is left, so the operation's last look comes before it
    /// gives up instead of never. Other waits that would end past the limit
    /// stop it, a rate limit's `Retry-After` (425, 429) among them: the
    /// server said not to come back sooner.
    pub(super) fn next_delay(
        &mut self,
        attempts: u32,
        verdict: Verdict,
        in_progress: bool,
    ) -> Result<Duration, StopReason> {
        if attempts >= self.policy.max_attempts {
            return Err(StopReason::MaxAttempts);
        }
        let mut delay = self.policy.delay(attempts, verdict.retry_after());
        // The dependency's `Retry-After` is judged as it was sent: the
        // jitter added to it is cut to the time left.
        let asked = verdict.retry_after().unwrap_or(delay);
        let elapsed = self.started.elapsed();
        let left = self.policy.max_elapsed.saturating_sub(elapsed);
        if elapsed.saturating_add(asked) > self.policy.max_elapsed {
            if !in_progress || left.is_zero() {
                return Err(StopReason::MaxElapsed);
            }
            delay = left;
        }
        delay = delay.min(left);
        if let Some(budget) = &self.policy.budget
            && !budget.withdraw()
        {
            return Err(StopReason::BudgetExhausted);
        }
        Ok(delay)
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;
    use crate::client::{BreakerConfig, RetryBudget};

    fn policy() -> crate::client::RetryPolicyBuilder {
        RetryPolicy::builder()
            .base(Duration::from_millis(100))
            .cap(Duration::from_secs(1))
            .max_attempts(5)
    }

    fn refused() -> io::Error {
        io::Error::from(io::ErrorKind::ConnectionRefused)
    }

    #[tokio::test(start_paused = true)]
    async fn every_attempt_carries_the_operations_one_key() {
        let mut keys = Vec::new();
        let done = retry(&policy().build().unwrap(), |attempt| {
            keys.push((attempt.number(), attempt.key().to_owned()));
            let fail = attempt.number() < 3;
            async move { if fail { Err(refused()) } else { Ok(()) } }
        })
        .await;
        assert!(done.is_ok());
        assert_eq!(keys.iter().map(|(n, _)| *n).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(keys.iter().all(|(_, key)| *key == keys[0].1));
        assert_eq!(
            uuid::Uuid::parse_str(&keys[0].1).unwrap().get_version_num(),
            4
        );
    }

    #[tokio::test(start_paused = true)]
    async fn rejected_errors_are_not_retried() {
        let mut calls = 0;
        let error = retry(&policy().build().unwrap(), |_| {
            calls += 1;
            async { Err::<(), _>(io::Error::from(io::ErrorKind::InvalidInput)) }
        })
        .await
        .unwrap_err();
        assert_eq!((calls, error.attempts()), (1, 1));
        assert_eq!(error.reason(), &StopReason::NotRetryable);
        assert!(error.last_error().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn limits_stop_it_with_the_last_error() {
        let error = retry(&policy().build().unwrap(), |_| async {
            Err::<(), _>(refused())
        })
        .await
        .unwrap_err();
        assert_eq!(
            (error.attempts(), error.reason()),
            (5, &StopReason::MaxAttempts)
        );

        let start = Instant::now();
        let slow = policy()
            .max_attempts(100)
            .max_elapsed(Duration::from_secs(3))
            .no_budget();
        let error = retry(&slow.build().unwrap(), |_| async {
            Err::<(), _>(refused())
        })
        .await
        .unwrap_err();
        assert_eq!(error.reason(), &StopReason::MaxElapsed);
        assert!(start.elapsed() <= Duration::from_secs(3));

        let budget = RetryBudget::new(0.5, Duration::from_secs(1), 0).unwrap();
        let stingy = policy().max_attempts(100).budget(budget).build().unwrap();
        let error = retry(&stingy, |_| async { Err::<(), _>(refused()) })
            .await
            .unwrap_err();
        assert_eq!(error.reason(), &StopReason::BudgetExhausted);
        assert_eq!(
            error.attempts(),
            1,
            "one deposit at 0.5 buys no whole retry"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_waited_out() {
        let start = Instant::now();
        let mut starts = Vec::new();
        let busy = crate::Error::InProgress {
            retry_after: Duration::from_secs(2),
        };
        retry(&policy().build().unwrap(), |attempt| {
            starts.push(start.elapsed());
            let outcome = if attempt.is_retry() {
                Ok(())
            } else {
                Err(busy.clone())
            };
            async move { outcome }
        })
        .await
        .unwrap();
        assert!(starts[1] >= Duration::from_secs(2), "{starts:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_circuit_stops_it_without_a_call() {
        let breaker =
            CircuitBreaker::new("ledger", BreakerConfig::default().consecutive_failures(2))
                .unwrap();
        let guarded = policy().breaker(breaker.clone()).build().unwrap();
        let mut calls = 0;
        let error = retry(&guarded, |_| {
            calls += 1;
            async { Err::<(), _>(refused()) }
        })
        .await
        .unwrap_err();
        assert_eq!((calls, error.attempts()), (2, 2));
        assert!(
            matches!(error.reason(), StopReason::CircuitOpen(open) if open.dependency() == "ledger")
        );
        let error = retry(&guarded, |_| {
            calls += 1;
            async { Ok::<(), io::Error>(()) }
        })
        .await
        .unwrap_err();
        assert_eq!((calls, error.attempts()), (2, 0));
        assert!(error.last_error().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_probe_is_abandoned_at_its_deadline() {
        let breaker = CircuitBreaker::new(
            "ledger",
            BreakerConfig::default()
                .consecutive_failures(1)
                .probe_timeout(Duration::from_secs(3)),
        )
        .unwrap();
        let guarded = policy().breaker(breaker.clone()).build().unwrap();
        let _ = retry(&guarded, |_| async { Err::<(), _>(refused()) }).await;
        tokio::time::advance(Duration::from_secs(5)).await;
        let start = Instant::now();
        let error = retry(&guarded, |_| {
            std::future::pending::<Result<(), io::Error>>()
        })
        .await
        .unwrap_err();
        assert_eq!(start.elapsed(), Duration::from_secs(3));
        assert_eq!(error.attempts(), 1);
        assert!(
            matches!(error.reason(), StopReason::CircuitOpen(_)),
            "{error}"
        );
        assert_eq!(breaker.state(), crate::client::BreakerState::Open);
    }

    /// A cool-down shorter than the probe's timeout: the breaker would
    /// admit another probe when the hung one is dropped, which the
    /// operation must not take (and leave half-open) to find a reason.
    #[tokio::test(start_paused = true)]
    async fn a_hung_probe_stops_it_as_open_whatever_the_cool_down() {
        let breaker = CircuitBreaker::new(
            "ledger",
            BreakerConfig::default()
                .consecutive_failures(1)
                .cool_down(Duration::from_millis(1))
                .probe_timeout(Duration::from_millis(50)),
        )
        .unwrap();
        let guarded = policy().breaker(breaker.clone()).build().unwrap();
        let _ = retry(&guarded, |_| async { Err::<(), _>(refused()) }).await;
        tokio::time::advance(Duration::from_millis(5)).await;
        let error = retry(&guarded, |_| {
            std::future::pending::<Result<(), io::Error>>()
        })
        .await
        .unwrap_err();
        assert_eq!(error.attempts(), 1);
        assert!(
            matches!(error.reason(), StopReason::CircuitOpen(open) if open.dependency() == "ledger"),
            "{error}"
        );
        assert_eq!(breaker.state(), crate::client::BreakerState::Open);
        tokio::time::advance(Duration::from_millis(5)).await;
        let done = retry(&guarded, |_| async { Ok::<_, io::Error>(7) }).await;
        assert_eq!(done.unwrap(), 7, "the next probe's place was kept free");
    }

    /// The operation's own failures open the circuit: its last outcome
    /// ends it, an `Ok` returned as it is and an error kept in the error.
    #[tokio::test(start_paused = true)]
    async fn a_circuit_opened_between_attempts_ends_it_with_the_last_outcome() {
        let breaker =
            CircuitBreaker::new("ledger", BreakerConfig::default().consecutive_failures(2))
                .unwrap();
        let guarded = policy().breaker(breaker.clone()).build().unwrap();
        let mut calls = 0;
        let (status, report) = retry_with_key(
            &guarded,
            "k",
            |outcome: &Result<u16, io::Error>| match outcome {
                Ok(503) => Verdict::Failed { retry_after: None },
                Ok(_) => Verdict::Success,
                Err(error) => error.classify(),
            },
            |_| {
                calls += 1;
                async { Ok(503) }
            },
        )
        .await
        .unwrap();
        assert_eq!((calls, status, report.attempts()), (2, 503, 2));
        let other = CircuitBreaker::new("ledger", BreakerConfig::default().consecutive_failures(2))
            .unwrap();
        let guarded = policy().breaker(other).build().unwrap();
        let error = retry(&guarded, |_| async { Err::<(), _>(refused()) })
            .await
            .unwrap_err();
        assert!(matches!(error.reason(), StopReason::CircuitOpen(_)));
        assert_eq!(
            error.last_error().map(io::Error::kind),
            Some(io::ErrorKind::ConnectionRefused)
        );
    }

    /// A `Retry-After` that ends within the time limit is waited out even
    /// when its jitter would end past it: the jitter is cut to the limit.
    #[tokio::test(start_paused = true)]
    async fn a_retry_after_within_the_limit_is_not_stopped_by_its_jitter() {
        let policy = RetryPolicy::builder()
            .base(Duration::from_secs(1000))
            .cap(Duration::from_secs(1000))
            .max_elapsed(Duration::from_secs(10))
            .build()
            .unwrap();
        let limited = |after: u64| Verdict::Busy {
            retry_after: Some(Duration::from_secs(after)),
        };
        for _ in 0..20 {
            let mut retries = Retries::start(&policy);
            let delay = retries.next_delay(1, limited(1), false).unwrap();
            assert!(
                (Duration::from_secs(1)..=Duration::from_secs(10)).contains(&delay),
                "{delay:?}"
            );
            assert!(matches!(
                retries.next_delay(1, limited(11), false),
                Err(StopReason::MaxElapsed)
            ));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_409_past_the_time_limit_is_polled_before_it() {
        let start = Instant::now();
        let busy = crate::Error::InProgress {
            retry_after: Duration::from_secs(59),
        };
        let limited = policy()
            .max_elapsed(Duration::from_secs(5))
            .build()
            .unwrap();
        let (_, report) = retry_with_key(
            &limited,
            "k",
            |outcome: &Result<(), crate::Error>| match outcome {
                Ok(()) => Verdict::Success,
                Err(error) => error.classify(),
            },
            |attempt| {
                let outcome = if attempt.is_retry() {
                    Ok(())
                } else {
                    Err(busy.clone())
                };
                async move { outcome }
            },
        )
        .await
        .unwrap();
        assert_eq!((report.attempts(), report.key()), (2, Some("k")));
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_retryable_ok_is_retried_and_the_last_returned() {
        let mut calls = 0;
        let status = retry_if(
            &policy().max_attempts(3).build().unwrap(),
            |outcome: &Result<u16, io::Error>| match outcome {
                Ok(503) => Verdict::Failed { retry_after: None },
                Ok(_) => Verdict::Success,
                Err(error) => error.classify(),
            },
            |_| {
                calls += 1;
                async { Ok(503) }
            },
        )
        .await
        .unwrap();
        assert_eq!((calls, status), (3, 503));
    }
}
