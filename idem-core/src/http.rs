//! The HTTP edge (feature `axum`), after the IETF Idempotency-Key header
//! draft and Stripe's documented behaviour:
//!
//! - [`IdempotencyKey`] extracts the `Idempotency-Key` header; a missing or
//!   malformed key is a `400` with an `application/problem+json` body.
//! - [`Error`] is a response: `409` with `Retry-After` while the first request
//!   is in progress, `422` for a key reused with a different request, `503`
//!   when the store is down, `500` otherwise.
//! - [`Replayable`] is a response that carries `Idempotent-Replayed: true`
//!   when it was replayed.
//!
//! ```
//! use axum::{Json, Router, routing::post};
//! use idem_core::{Replayable, http::IdempotencyKey, idempotent};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Payment { amount_cents: u64 }
//!
//! #[idempotent(key = key)]
//! async fn create(key: IdempotencyKey, payment: Payment) -> Result<Replayable<u64>, idem_core::Error> {
//!     Ok(Replayable::new(payment.amount_cents))
//! }
//!
//! async fn handler(key: IdempotencyKey, Json(payment): Json<Payment>)
//!     -> Result<Replayable<Json<u64>>, idem_core::Error> {
//!     Ok(create(key, payment).await?.map(Json))
//! }
//!
//! let app: Router = Router::new().route("/payments", post(handler));
//! ```

use std::fmt;

use axum::extract::{FromRequestParts, OptionalFromRequestParts};
use axum::http::header::{CONTENT_TYPE, RETRY_AFTER};
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::replayable::Replayable;

/// The request header that carries the key.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The response header that marks a replayed response.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// The longest key accepted, in bytes (as Stripe's).
pub const MAX_KEY_LEN: usize = 255;

/// The `Idempotency-Key` of a request: 1 to [`MAX_KEY_LEN`] visible ASCII
/// characters. The draft's quoted form (`"8e03…"`) and the bare form are both
/// accepted.
///
/// As an extractor it rejects a request without a usable key with a `400`;
/// `Option<IdempotencyKey>` makes the key optional but still rejects a
/// malformed one. It serializes as its text, so it can be the `key` of an
/// `#[idempotent]` fn.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct IdempotencyKey(String);

impl TryFrom<String> for IdempotencyKey {
    type Error = Error;

    fn try_from(value: String) -> Result<Self, Error> {
        Self::parse(&value)
    }
}

impl From<IdempotencyKey> for String {
    fn from(key: IdempotencyKey) -> Self {
        key.0
    }
}

impl IdempotencyKey {
    /// Parses a header value.
    ///
    /// ```
    /// use idem_core::http::IdempotencyKey;
    ///
    /// assert_eq!(IdempotencyKey::parse("\"8e03978e\"")?.as_str(), "8e03978e");
    /// assert!(IdempotencyKey::parse("").is_err());
    /// # Ok::<(), idem_core::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidKey`] for an empty, overlong or non-ASCII key.
    pub fn parse(value: &str) -> Result<Self, Error> {
        let value = value.trim();
        let unquoted = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        if unquoted.is_empty() {
            return Err(missing("the Idempotency-Key header is empty"));
        }
        if unquoted.len() > MAX_KEY_LEN {
            return Err(missing(format!(
                "the Idempotency-Key header is longer than {MAX_KEY_LEN} characters"
            )));
        }
        if !unquoted.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(missing(
                "the Idempotency-Key header may hold visible ASCII characters only",
            ));
        }
        Ok(Self(unquoted.to_owned()))
    }

    /// The key's text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn from_parts(parts: &Parts) -> Result<Option<Self>, Error> {
        let mut values = parts.headers.get_all(&IDEMPOTENCY_KEY).iter();
        let Some(value) = values.next() else {
            return Ok(None);
        };
        if values.next().is_some() {
            return Err(missing(
                "the request carries more than one Idempotency-Key header",
            ));
        }
        let text = value.to_str().map_err(|_| {
            missing("the Idempotency-Key header may hold visible ASCII characters only")
        })?;
        Self::parse(text).map(Some)
    }
}

fn missing(reason: impl Into<std::borrow::Cow<'static, str>>) -> Error {
    Error::InvalidKey {
        reason: reason.into(),
    }
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdempotencyKey({:?})", self.0)
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Error> {
        Self::from_parts(parts)?.ok_or_else(|| {
            missing(
                "this endpoint needs an Idempotency-Key header, e.g. a fresh UUID per operation",
            )
        })
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for IdempotencyKey {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Option<Self>, Error> {
        Self::from_parts(parts)
    }
}

/// An RFC 9457 problem details body.
#[derive(Serialize)]
struct Problem<'a> {
    r#type: &'static str,
    title: &'a str,
    status: u16,
    detail: String,
}

/// The title and the detail a client sees for `error`. Only errors about the
/// request itself say more than their status; the rest are logged in full
/// and answered in general words, so that no store address, key or message
/// of a backend reaches a client.
fn describe(error: &Error) -> (&'static str, String) {
    match error {
        Error::InProgress { .. } => (
            "A request with this Idempotency-Key is in progress",
            error.to_string(),
        ),
        Error::KeyReused => (
            "This Idempotency-Key was used with a different request",
            error.to_string(),
        ),
        Error::InvalidKey { .. } => ("Missing or invalid Idempotency-Key", error.to_string()),
        Error::AttemptFailed => (
            "A request with this Idempotency-Key failed",
            error.to_string(),
        ),
        Error::Store(_) if error.http_status() == 503 => (
            "The idempotency store is unavailable",
            "The request was not processed; retry it later with the same Idempotency-Key."
                .to_owned(),
        ),
        _ => (
            "The request's stored result cannot be used",
            "The server cannot answer this request with its stored result.".to_owned(),
        ),
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::error!(error = %self, "an idempotent request failed");
        }
        let (title, detail) = describe(&self);
        let body = Problem {
            r#type: "about:blank",
            title,
            status: status.as_u16(),
            detail,
        };
        let body = serde_json::to_vec(&body).unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(retry_after) = self.retry_after() {
            let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            headers.insert(RETRY_AFTER, HeaderValue::from(seconds.max(1)));
        }
        response
    }
}

impl<T: IntoResponse> IntoResponse for Replayable<T> {
    fn into_response(self) -> Response {
        let replayed = self.is_replay();
        let mut response = self.into_inner().into_response();
        if replayed {
            response
                .headers_mut()
                .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::body::to_bytes;
    use axum::http::Request;

    use super::*;
    use crate::store::{StoreError, StoreErrorKind};

    async fn extract(headers: &[(&str, &str)]) -> Result<Option<IdempotencyKey>, Error> {
        let mut request = Request::builder();
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let (mut parts, ()) = request.body(()).unwrap().into_parts();
        <IdempotencyKey as OptionalFromRequestParts<()>>::from_request_parts(&mut parts, &()).await
    }

    #[tokio::test]
    async fn the_header_is_parsed_bare_or_quoted() {
        let key = extract(&[("Idempotency-Key", "\"abc-123\"")])
            .await
            .unwrap()
            .unwrap();
        assert_eq!(key.as_str(), "abc-123");
        let key = extract(&[("idempotency-key", "abc-123")])
            .await
            .unwrap()
            .unwrap();
        assert_eq!(key.to_string(), "abc-123");
        assert!(extract(&[]).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn malformed_keys_are_rejected() {
        let long = "k".repeat(MAX_KEY_LEN + 1);
        for bad in ["", "\"\"", "has space", long.as_str()] {
            let err = extract(&[("Idempotency-Key", bad)]).await.unwrap_err();
            assert_eq!(err.http_status(), 400, "{bad:?}");
        }
        let twice = extract(&[("Idempotency-Key", "a"), ("Idempotency-Key", "b")]).await;
        assert_eq!(twice.unwrap_err().http_status(), 400);
    }

    async fn problem(error: Error) -> (StatusCode, Option<String>, serde_json::Value) {
        let response = error.into_response();
        let status = response.status();
        assert_eq!(response.headers()[CONTENT_TYPE], "application/problem+json");
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .map(|v| v.to_str().unwrap().to_owned());
        let body = to_bytes(response.into_body(), usize::MAX).await.unwrap();
        (status, retry_after, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn errors_are_problem_responses() {
        let (status, retry, body) = problem(Error::InProgress {
            retry_after: Duration::from_millis(1500),
        })
        .await;
        assert_eq!((status.as_u16(), retry.as_deref()), (409, Some("2")));
        assert_eq!(body["status"], 409);
        let (status, retry, _) = problem(Error::KeyReused).await;
        assert_eq!((status.as_u16(), retry), (422, None));
        let down = StoreError::new(
            StoreErrorKind::Unavailable,
            "redis begin failed: connection refused (10.0.0.7:6379)",
        );
        let (status, _, unavailable) = problem(Error::Store(down)).await;
        assert_eq!(status.as_u16(), 503);
        let detail = unavailable["detail"].as_str().unwrap();
        assert!(detail.contains("retry it later"), "{detail}");
        let corrupt = StoreError::new(StoreErrorKind::Corrupt, "WRONGTYPE at idem:{abc}");
        let (status, _, corrupt) = problem(Error::Store(corrupt)).await;
        assert_eq!(status.as_u16(), 500, "a corrupt record is not retried");
        for body in [unavailable.to_string(), corrupt.to_string()] {
            for internal in ["10.0.0.7", "redis", "WRONGTYPE", "idem:{"] {
                assert!(!body.contains(internal), "{body}");
            }
        }
    }

    #[test]
    fn a_deserialized_key_is_validated() {
        let key: IdempotencyKey = serde_json::from_str("\"abc\"").unwrap();
        assert_eq!(key.as_str(), "abc");
        assert_eq!(serde_json::to_string(&key).unwrap(), "\"abc\"");
        for bad in ["\"\"", "\"has space\""] {
            assert!(
                serde_json::from_str::<IdempotencyKey>(bad).is_err(),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn replays_are_marked() {
        let fresh = Replayable::new("body").into_response();
        assert!(fresh.headers().get(&IDEMPOTENT_REPLAYED).is_none());
        let replay: Replayable<String> = serde_json::from_str("\"body\"").unwrap();
        let replay = replay.into_response();
        assert_eq!(replay.headers()[&IDEMPOTENT_REPLAYED], "true");
    }
}
