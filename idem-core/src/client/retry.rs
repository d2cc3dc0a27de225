//! The retry loop, for any async operation.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{CircuitBreaker, CircuitOpen, Classify, RetryPolicy, Verdict};

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

/// An operation that [`retry`] gave up on: why, after how many attempts, and
/// the last attempt's error (none when the circuit was open from the start).
#[derive(Debug)]
pub struct RetryError<E> {
    reason: StopReason,
    attempts: u32,
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
        self.attempts
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
            "gave up after {} attempt(s): {}",
            self.attempts, self.reason
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
/// key. Between attempts it waits as [`RetryPolicy::delay`] says (honouring
/// the dependency's `Retry-After`), within the policy's attempt limit, time
/// limit and budget. With a [breaker](RetryPolicy::breaker), an open circuit
/// stops it at once, without calling `operation`.
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
/// attempt is returned as it is.
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
    mut operation: F,
) -> Result<T, RetryError<E>>
where
    C: Fn(&Result<T, E>) -> Verdict,
    F: FnMut(&Attempt) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempt = Attempt {
        number: 0,
        key: new_key().into(),
    };
    let mut retries = Retries::start(policy);
    let mut last = None;
    loop {
        attempt.number += 1;
        let permit = match policy.breaker.as_ref().map(CircuitBreaker::try_acquire) {
            Some(Err(open)) => {
                return Err(RetryError {
                    reason: StopReason::CircuitOpen(open),
                    attempts: attempt.number - 1,
                    last,
                });
            }
            Some(Ok(permit)) => Some(permit),
            None => None,
        };
        let outcome = operation(&attempt).await;
        let verdict = classify(&outcome);
        if let Some(permit) = permit {
            permit.record(verdict);
        }
        let stop = match verdict {
            Verdict::Success => {
                return outcome.map_err(|error| stopped(StopReason::NotRetryable, &attempt, error));
            }
            Verdict::Rejected => Err(StopReason::NotRetryable),
            Verdict::Busy { retry_after } | Verdict::Failed { retry_after } => {
                retries.next_delay(attempt.number, retry_after)
            }
        };
        match (stop, outcome) {
            (Ok(delay), Err(error)) => {
                last = Some(error);
                tokio::time::sleep(delay).await;
            }
            (Ok(delay), Ok(_)) => {
                last = None;
                tokio::time::sleep(delay).await;
            }
            (Err(_), Ok(value)) => return Ok(value),
            (Err(reason), Err(error)) => return Err(stopped(reason, &attempt, error)),
        }
    }
}

fn stopped<E>(reason: StopReason, attempt: &Attempt, error: E) -> RetryError<E> {
    RetryError {
        reason,
        attempts: attempt.number,
        last: Some(error),
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

    /// The wait before the attempt after `attempts` attempts, or why there is
    /// none.
    pub(super) fn next_delay(
        &mut self,
        attempts: u32,
        retry_after: Option<Duration>,
    ) -> Result<Duration, StopReason> {
        if attempts >= self.policy.max_attempts {
            return Err(StopReason::MaxAttempts);
        }
        let delay = self.policy.delay(attempts, retry_after);
        if self.started.elapsed().saturating_add(delay) > self.policy.max_elapsed {
            return Err(StopReason::MaxElapsed);
        }
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
