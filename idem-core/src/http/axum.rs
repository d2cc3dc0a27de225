//! The axum pieces (feature `axum`): the `Idempotency-Key` extractor, idem's
//! errors as problem responses, and replay-aware responses, for handlers
//! that call `#[idempotent]` functions themselves.

use axum::extract::{FromRequestParts, OptionalFromRequestParts};
use axum::http::HeaderValue;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};

use super::key::{IDEMPOTENT_REPLAYED, IdempotencyKey, MISSING, invalid};
use super::problem::{DEFAULT_DOCS, Problem};
use crate::error::Error;
use crate::replayable::Replayable;

/// Rejects a request without a usable key with a `400`, of the same problem
/// types as the [`IdempotencyLayer`](super::IdempotencyLayer)'s
/// (`#missing-key`, `#invalid-key`); `Option<IdempotencyKey>` makes the key
/// optional but still rejects a malformed one.
///
/// A handler that takes the key and awaits an `#[idempotent]` fn is
/// dropped when its client goes away (an HTTP/2 client resets its stream,
/// a timeout layer gives up): the call stops at its next `.await` and its
/// claim stays until its lease lapses, so the client's retry waits for the
/// lease and runs the body again. The layer runs a handler on a
/// task of its own and has no such gap; with the extractor, spawn the call
/// so that it finishes and records its result without the handler:
///
/// ```
/// use axum::Json;
/// use idem_core::http::IdempotencyKey;
/// use idem_core::{Replayable, idempotent};
/// # #[derive(serde::Serialize, serde::Deserialize)]
/// # struct Receipt(u64);
/// # enum PayError { Idem(idem_core::Error), Crashed }
/// # impl From<idem_core::Error> for PayError {
/// #     fn from(error: idem_core::Error) -> Self { Self::Idem(error) }
/// # }
/// # impl axum::response::IntoResponse for PayError {
/// #     fn into_response(self) -> axum::response::Response {
/// #         match self {
/// #             Self::Idem(error) => error.into_response(),
/// #             Self::Crashed => axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response(),
/// #         }
/// #     }
/// # }
///
/// // Scoped by the client, as the layer's keys are: two clients that pick
/// // one key never share a record.
/// #[idempotent(key = key, scope = client)]
/// async fn charge(
///     client: String,
///     key: IdempotencyKey,
///     cents: u64,
/// ) -> Result<Replayable<Receipt>, PayError> {
///     Ok(Replayable::new(Receipt(cents)))
/// }
///
/// async fn pay(
///     headers: axum::http::HeaderMap, // the authenticated principal, in a real service
///     key: IdempotencyKey,
///     Json(cents): Json<u64>,
/// ) -> Result<Replayable<Json<Receipt>>, PayError> {
///     let client = headers
///         .get("x-api-key")
///         .and_then(|v| v.to_str().ok())
///         .unwrap_or_default()
///         .to_owned();
///     // Spawned: the call finishes and records its result even if this
///     // handler is dropped.
///     let receipt = tokio::spawn(charge(client, key, cents))
///         .await
///         .map_err(|_| PayError::Crashed)??;
///     Ok(receipt.map(Json))
/// }
/// # let _: axum::Router = axum::Router::new().route("/pay", axum::routing::post(pay));
/// ```
impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Error> {
        Self::from_headers(&parts.headers)?.ok_or_else(|| invalid(MISSING))
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for IdempotencyKey {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Option<Self>, Error> {
        Self::from_headers(&parts.headers)
    }
}

/// An `application/problem+json` response with the error's status (see
/// [`Error::http_status`]), the same the [`IdempotencyLayer`](super::IdempotencyLayer)
/// answers: `409` with `Retry-After`, `422`, `400`, `503`, `500`.
impl IntoResponse for Error {
    fn into_response(self) -> Response {
        Problem::of(&self).response(DEFAULT_DOCS)
    }
}

/// The value's response, with `Idempotent-Replayed: true` when it was
/// replayed.
///
/// An error is marked only when it was stored as the value: a fn that
/// returns `Result<Replayable<Result<Receipt, Declined>>, Error>` stores its
/// declined payments and marks their replays, as the layer marks a replayed
/// `402`; an `Err` of the fn itself (idem's errors, errors not stored) is
/// never a replay.
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
    use axum::http::header::{CONTENT_TYPE, LINK, RETRY_AFTER};
    use axum::http::{Request, StatusCode};

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
    async fn the_extractor_reads_the_header() {
        let key = extract(&[("Idempotency-Key", "\"abc-123\"")])
            .await
            .unwrap()
            .unwrap();
        assert_eq!(key.as_str(), "abc-123");
        assert!(extract(&[]).await.unwrap().is_none());
        let twice = extract(&[("Idempotency-Key", "a"), ("Idempotency-Key", "b")]).await;
        assert_eq!(twice.unwrap_err().http_status(), 400);
    }

    async fn problem(error: Error) -> (StatusCode, Option<String>, serde_json::Value) {
        let response = error.into_response();
        let status = response.status();
        assert_eq!(response.headers()[CONTENT_TYPE], "application/problem+json");
        assert!(
            response.headers()[LINK]
                .to_str()
                .unwrap()
                .ends_with("; rel=\"describedby\"")
        );
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
        // When to look again (at most a second), not the 1.5 s left.
        assert_eq!((status.as_u16(), retry.as_deref()), (409, Some("1")));
        assert_eq!(body["status"], 409);
        assert!(body["type"].as_str().unwrap().ends_with("#in-progress"));
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

    #[tokio::test]
    async fn a_missing_key_is_the_same_problem_as_the_layers() {
        let (mut parts, ()) = Request::builder().body(()).unwrap().into_parts();
        let missing =
            <IdempotencyKey as FromRequestParts<()>>::from_request_parts(&mut parts, &()).await;
        let (status, _, body) = problem(missing.unwrap_err()).await;
        assert_eq!(status, 400);
        assert!(body["type"].as_str().unwrap().ends_with("#missing-key"));
        let (_, _, body) = problem(IdempotencyKey::parse("").unwrap_err()).await;
        assert!(body["type"].as_str().unwrap().ends_with("#invalid-key"));
    }

    #[tokio::test]
    async fn replays_are_marked() {
        let fresh = Replayable::new("body").into_response();
        assert!(fresh.headers().get(&IDEMPOTENT_REPLAYED).is_none());
        let replay: Replayable<String> = serde_json::from_str("\"body\"").unwrap();
        let replay = replay.into_response();
        assert_eq!(replay.headers()[&IDEMPOTENT_REPLAYED], "true");
        // An error stored as the value is marked on replay, as the layer
        // marks a replayed 4xx.
        #[derive(serde::Serialize, serde::Deserialize)]
        struct Declined;
        impl IntoResponse for Declined {
            fn into_response(self) -> Response {
                (StatusCode::PAYMENT_REQUIRED, "declined").into_response()
            }
        }
        let stored: Replayable<Result<String, Declined>> = Replayable::new(Err(Declined));
        let json = serde_json::to_string(&stored).unwrap();
        let replay: Replayable<Result<String, Declined>> = serde_json::from_str(&json).unwrap();
        let replay = replay.into_response();
        assert_eq!(replay.status(), StatusCode::PAYMENT_REQUIRED);
        assert_eq!(replay.headers()[&IDEMPOTENT_REPLAYED], "true");
    }
}
