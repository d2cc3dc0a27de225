//! Which outcomes are worth another attempt.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode, header::RETRY_AFTER};

/// What an attempt's outcome means for the operation and for the dependency
/// that answered it.
///
/// | verdict | retried | the [circuit breaker](super::CircuitBreaker) counts |
/// |---|---|---|
/// | [`Success`](Self::Success) | no, it is done | a success |
/// | [`Rejected`](Self::Rejected) | never: the same request fails the same way | a success (the dependency answered) |
/// | [`Busy`](Self::Busy) | yes, after `retry_after` when given | a success (the dependency is alive) |
/// | [`Failed`](Self::Failed) | yes, after `retry_after` when given | a failure |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The operation succeeded.
    Success,
    /// The operation failed for good: retrying the same request cannot help
    /// (a 400, a 422 for a reused key, a 404).
    Rejected,
    /// The dependency is alive but cannot take the request now (a 409 while
    /// the first request with the key runs, a 429).
    Busy {
        /// When the dependency said to come back (`Retry-After`).
        retry_after: Option<Duration>,
    },
    /// The attempt failed in a way that may pass (a refused or dropped
    /// connection, a timeout, a 5xx).
    Failed {
        /// When the dependency said to come back (`Retry-After`).
        retry_after: Option<Duration>,
    },
}

impl Verdict {
    /// Whether another attempt may change the outcome.
    #[must_use]
    pub const fn is_retryable(self) -> bool {
        matches!(self, Self::Busy { .. } | Self::Failed { .. })
    }

    /// The dependency's `Retry-After`, if it gave one.
    #[must_use]
    pub const fn retry_after(self) -> Option<Duration> {
        match self {
            Self::Busy { retry_after } | Self::Failed { retry_after } => retry_after,
            Self::Success | Self::Rejected => None,
        }
    }

    /// Whether the outcome counts against the dependency's health.
    #[must_use]
    pub const fn is_failure(self) -> bool {
        matches!(self, Self::Failed { .. })
    }
}

/// An outcome that knows whether it is worth another attempt; what
/// [`retry`](super::retry) asks of an operation's error.
///
/// Implemented for [`reqwest::Error`], [`reqwest::Response`],
/// [`reqwest_middleware::Error`], [`std::io::Error`] and idem's own
/// [`Error`](crate::Error). For your own error types, implement it. For
/// another crate's (a `tonic::Status`, an `async_nats` error), which Rust
/// does not let you implement it for, pass a classifier to
/// [`retry_if`](super::retry_if) — [`classify_grpc_code`] is one for gRPC
/// status codes.
pub trait Classify {
    /// The verdict on this outcome.
    fn classify(&self) -> Verdict;
}

/// The verdict on an HTTP response, by its status and `Retry-After`:
///
/// | status | verdict |
/// |---|---|
/// | 1xx, 2xx, 3xx | [`Success`](Verdict::Success) |
/// | 409 (in progress), 425 (too early), 429 (too many requests) | [`Busy`](Verdict::Busy): retried after `Retry-After`, or the backoff |
/// | 408 (request timeout) | [`Failed`](Verdict::Failed): retried |
/// | other 4xx: 400, 401, 403, 404, 413, 422 (key reused), … | [`Rejected`](Verdict::Rejected): never retried |
/// | 500, 502, 503, 504 | [`Failed`](Verdict::Failed): retried (after `Retry-After` when present) |
/// | 500 whose `Link` names idem's `#unreplayable` problem | [`Rejected`](Verdict::Rejected): the request ran; every retry gets this answer |
/// | other 5xx: 501, 505, … | [`Rejected`](Verdict::Rejected): the server cannot do it at all |
///
/// A 500 is retried because an idempotent server does not store it (idem's
/// [layer](crate::http::IdempotencyLayer) stores no 5xx), so a retry with the
/// same key runs the request again; the retry budget and the attempt limit
/// bound what that costs. The exception is idem's own `#unreplayable` 500
/// (its `Link` names that problem): the request ran, its response could not
/// be stored, and every retry gets the same answer, so it is
/// [`Rejected`](Verdict::Rejected).
#[must_use]
pub fn classify_status(status: StatusCode, headers: &HeaderMap) -> Verdict {
    let retry_after = || retry_after(headers);
    let unreplayable = || {
        headers
            .get_all(http::header::LINK)
            .iter()
            .filter_map(|link| link.to_str().ok())
            .any(|link| link.contains("#unreplayable>"))
    };
    match status.as_u16() {
        500 if unreplayable() => Verdict::Rejected,
        100..=399 => Verdict::Success,
        409 | 425 | 429 => Verdict::Busy {
            retry_after: retry_after(),
        },
        408 | 500 | 502 | 503 | 504 => Verdict::Failed {
            retry_after: retry_after(),
        },
        _ => Verdict::Rejected,
    }
}

/// The verdict on a gRPC status code (`tonic::Code as i32`, or the number
/// any gRPC or NATS client reports), for [`retry_if`](super::retry_if)'s
/// classifier: the supported way to retry calls whose error type is another
/// crate's, for which [`Classify`] cannot be implemented outside that crate.
///
/// | code | verdict |
/// |---|---|
/// | 0 `OK` | [`Success`](Verdict::Success) |
/// | 14 `UNAVAILABLE`, 4 `DEADLINE_EXCEEDED` | [`Failed`](Verdict::Failed): retried, counts against the breaker |
/// | 8 `RESOURCE_EXHAUSTED`, 10 `ABORTED` | [`Busy`](Verdict::Busy): retried, the dependency is alive |
/// | every other code (`INVALID_ARGUMENT`, `NOT_FOUND`, `ALREADY_EXISTS`, `INTERNAL`, …) | [`Rejected`](Verdict::Rejected) |
///
/// `DEADLINE_EXCEEDED` is retried because a retry sends the operation's
/// one key, so a call that did run is not run again by a server that
/// deduplicates by it; without such a server, do not retry it.
///
/// ```
/// use idem_core::client::{RetryPolicy, Verdict, classify_grpc_code, retry_if};
///
/// // A stand-in for `tonic::Status`: another crate's error type.
/// # mod tonic {
/// #     #[derive(Debug, Clone, Copy, PartialEq)]
/// #     pub enum Code { Ok = 0, Unavailable = 14, InvalidArgument = 3 }
/// #     #[derive(Debug)]
/// #     pub struct Status(Code);
/// #     impl Status {
/// #         pub fn unavailable(_: &str) -> Self { Status(Code::Unavailable) }
/// #         pub fn code(&self) -> Code { self.0 }
/// #     }
/// # }
/// # async fn charge(_key: &str, attempt: u32) -> Result<&'static str, tonic::Status> {
/// #     if attempt == 1 { Err(tonic::Status::unavailable("down")) } else { Ok("charged") }
/// # }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let policy = RetryPolicy::default();
/// let receipt = retry_if(
///     &policy,
///     |outcome: &Result<_, tonic::Status>| match outcome {
///         Ok(_) => Verdict::Success,
///         Err(status) => classify_grpc_code(status.code() as i32),
///     },
///     // The key goes in the request's metadata, e.g. `idempotency-key`.
///     |attempt| {
///         let key = attempt.key().to_owned();
///         let number = attempt.number();
///         async move { charge(&key, number).await }
///     },
/// )
/// .await
/// .map_err(|error| format!("{error:?}"))?;
/// assert_eq!(receipt, "charged");
/// # Ok(())
/// # }
/// ```
#[must_use]
pub const fn classify_grpc_code(code: i32) -> Verdict {
    match code {
        0 => Verdict::Success,
        4 | 14 => Verdict::Failed { retry_after: None },
        8 | 10 => Verdict::Busy { retry_after: None },
        _ => Verdict::Rejected,
    }
}

/// The `Retry-After` header's delay: delay-seconds or an HTTP-date (a date in
/// the past is no delay). Delay-seconds have no upper limit: a number past
/// `u64::MAX` seconds is [`Duration::MAX`]. `None` when absent or malformed.
#[must_use]
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if !value.is_empty() && value.bytes().all(|byte| byte.is_ascii_digit()) {
        return Some(
            value
                .parse::<u64>()
                .map_or(Duration::MAX, Duration::from_secs),
        );
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(
        date.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

impl Classify for reqwest::Response {
    fn classify(&self) -> Verdict {
        classify_status(self.status(), self.headers())
    }
}

/// Connection errors, timeouts and requests that failed in transit (the
/// connection closed before the response) are [`Failed`](Verdict::Failed);
/// the rest (a URL or body that cannot be built, a response that cannot be
/// decoded) are [`Rejected`](Verdict::Rejected). An error carrying a status
/// (from `error_for_status`) is classified by it.
impl Classify for reqwest::Error {
    fn classify(&self) -> Verdict {
        if let Some(status) = self.status() {
            return classify_status(status, &HeaderMap::new());
        }
        if self.is_connect() || self.is_timeout() || self.is_request() {
            Verdict::Failed { retry_after: None }
        } else {
            Verdict::Rejected
        }
    }
}

/// A reqwest or `std::io` error as below, also when a middleware wrapped it (as
/// [`RetryMiddleware`](super::RetryMiddleware) wraps its final errors with
/// their [`RetryReport`](super::RetryReport)); any other error of a
/// middleware is [`Rejected`](Verdict::Rejected) (an open circuit among
/// them: this operation does not wait for it).
impl Classify for reqwest_middleware::Error {
    fn classify(&self) -> Verdict {
        match self {
            Self::Reqwest(error) => error.classify(),
            Self::Middleware(error) => {
                if let Some(error) = error.downcast_ref::<reqwest::Error>() {
                    error.classify()
                } else if let Some(error) = error.downcast_ref::<std::io::Error>() {
                    error.classify()
                } else {
                    Verdict::Rejected
                }
            }
        }
    }
}

/// Refused, reset, aborted or unconnected connections, broken pipes, timeouts,
/// unexpected ends of input and interruptions are
/// [`Failed`](Verdict::Failed); other kinds are [`Rejected`](Verdict::Rejected).
impl Classify for std::io::Error {
    fn classify(&self) -> Verdict {
        use std::io::ErrorKind::{
            BrokenPipe, ConnectionAborted, ConnectionRefused, ConnectionReset, HostUnreachable,
            Interrupted, NetworkDown, NetworkUnreachable, NotConnected, TimedOut, UnexpectedEof,
            WouldBlock,
        };
        match self.kind() {
            BrokenPipe | ConnectionAborted | ConnectionRefused | ConnectionReset
            | HostUnreachable | Interrupted | NetworkDown | NetworkUnreachable | NotConnected
            | TimedOut | UnexpectedEof | WouldBlock => Verdict::Failed { retry_after: None },
            _ => Verdict::Rejected,
        }
    }
}

/// `InProgress` is [`Busy`](Verdict::Busy) after its `retry_after`; a store
/// that is down or slow and `AttemptFailed` are [`Failed`](Verdict::Failed);
/// the rest (a reused or invalid key, a corrupt record, bad settings) are
/// [`Rejected`](Verdict::Rejected) — the same split as
/// [`Error::http_status`](crate::Error::http_status)'s 503s and 500s.
impl Classify for crate::Error {
    fn classify(&self) -> Verdict {
        match self {
            Self::InProgress { retry_after } => Verdict::Busy {
                retry_after: Some(*retry_after),
            },
            Self::Store(_) | Self::AttemptFailed if self.http_status() == 503 => {
                Verdict::Failed { retry_after: None }
            }
            _ => Verdict::Rejected,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn verdict(status: u16) -> Verdict {
        classify_status(StatusCode::from_u16(status).unwrap(), &HeaderMap::new())
    }

    #[test]
    fn the_table_holds() {
        for status in [200, 201, 204, 301, 304] {
            assert_eq!(verdict(status), Verdict::Success, "{status}");
        }
        for status in [400, 401, 403, 404, 405, 410, 413, 415, 422, 501, 505] {
            assert_eq!(verdict(status), Verdict::Rejected, "{status}");
        }
        for status in [409, 425, 429] {
            assert_eq!(
                verdict(status),
                Verdict::Busy { retry_after: None },
                "{status}"
            );
        }
        for status in [408, 500, 502, 503, 504] {
            assert_eq!(
                verdict(status),
                Verdict::Failed { retry_after: None },
                "{status}"
            );
        }
        // idem's stable answer for a request that ran but cannot be replayed.
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::LINK,
            HeaderValue::from_static(
                "<https://docs.rs/idem-core/http#unreplayable>; rel=\"describedby\"",
            ),
        );
        assert_eq!(
            classify_status(StatusCode::INTERNAL_SERVER_ERROR, &headers),
            Verdict::Rejected
        );
    }

    #[test]
    fn a_retry_after_past_u64_seconds_is_as_long_as_can_be() {
        let mut headers = HeaderMap::new();
        for (value, expected) in [
            ("18446744073709551615", Some(Duration::from_secs(u64::MAX))),
            ("18446744073709551616", Some(Duration::MAX)),
            ("99999999999999999999999", Some(Duration::MAX)),
            ("+5", None),
            ("-5", None),
            ("", None),
        ] {
            headers.insert(RETRY_AFTER, HeaderValue::from_static(value));
            assert_eq!(retry_after(&headers), expected, "{value:?}");
        }
    }

    #[test]
    fn retry_after_is_read_in_seconds_or_as_a_date() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(
            classify_status(StatusCode::CONFLICT, &headers),
            Verdict::Busy {
                retry_after: Some(Duration::from_secs(7))
            }
        );
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
        headers.insert(RETRY_AFTER, HeaderValue::from_str(&later).unwrap());
        let after = retry_after(&headers).unwrap();
        assert!(after > Duration::from_secs(100) && after <= Duration::from_secs(120));
        headers.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT"),
        );
        assert_eq!(retry_after(&headers), Some(Duration::ZERO));
        headers.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&headers), None);
    }

    #[test]
    fn idem_errors_split_as_their_statuses_do() {
        use crate::store::{StoreError, StoreErrorKind};
        let busy = crate::Error::InProgress {
            retry_after: Duration::from_secs(2),
        };
        assert_eq!(busy.classify().retry_after(), Some(Duration::from_secs(2)));
        let down = crate::Error::Store(StoreError::new(StoreErrorKind::Unavailable, "down"));
        assert!(down.classify().is_failure());
        assert!(crate::Error::AttemptFailed.classify().is_retryable());
        let corrupt = crate::Error::Store(StoreError::new(StoreErrorKind::Corrupt, "bad"));
        assert_eq!(corrupt.classify(), Verdict::Rejected);
        assert_eq!(crate::Error::KeyReused.classify(), Verdict::Rejected);
    }

    #[test]
    fn io_errors_that_may_pass_are_retried() {
        use std::io::{Error, ErrorKind};
        assert!(
            Error::from(ErrorKind::ConnectionRefused)
                .classify()
                .is_failure()
        );
        assert!(Error::from(ErrorKind::TimedOut).classify().is_failure());
        assert_eq!(
            Error::from(ErrorKind::InvalidData).classify(),
            Verdict::Rejected
        );
    }
}
