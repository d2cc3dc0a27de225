//! RFC 9457 problem details: the one mapping of idem's errors (and the
//! layer's own refusals) to HTTP responses, shared by the
//! [`IdempotencyLayer`](super::IdempotencyLayer) and, with the `axum`
//! feature, by `IntoResponse for Error`.
//!
//! Only what concerns the request itself is said in a response; a store's
//! own messages (addresses, keys) are logged, never sent.

use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, LINK, RETRY_AFTER};
use http::{HeaderValue, Response, StatusCode};
use serde::Serialize;

use crate::error::Error;
use crate::store::StoreErrorKind;

/// Where the problem types are described, by default: the docs of
/// [`idem_core::http`](super). A problem's `type` is this with a fragment
/// (`#key-reused`).
pub const DEFAULT_DOCS: &str = "https://docs.rs/idem-core/latest/idem_core/http/index.html";

/// A problem a client is told about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    MissingKey,
    InvalidKey,
    MissingScope,
    UnreadableBody,
    PayloadTooLarge,
    InProgress,
    KeyReused,
    AttemptFailed,
    StoreUnavailable,
    Unreplayable,
    Internal,
}

impl Kind {
    fn of(error: &Error) -> Self {
        match error {
            Error::InProgress { .. } => Self::InProgress,
            Error::KeyReused => Self::KeyReused,
            Error::InvalidKey { reason } if reason == super::key::MISSING => Self::MissingKey,
            Error::InvalidKey { .. } => Self::InvalidKey,
            // This attempt lost its claim before it finished: as for an
            // attempt waited for that failed, a retry with the key runs
            // again or replays the new holder's result.
            Error::AttemptFailed | Error::StepLost { .. } | Error::ClaimLost => Self::AttemptFailed,
            Error::Store(store) => match store.kind() {
                StoreErrorKind::Corrupt => Self::Unreplayable,
                StoreErrorKind::Config | StoreErrorKind::Unsupported => Self::Internal,
                _ => Self::StoreUnavailable,
            },
            Error::Decode(_) | Error::NotReplayable { .. } => Self::Unreplayable,
            // The service's configuration or its use of idem: a retry of
            // the request does not fix it. (A key, scope or argument that
            // does not serialize fails before the body runs; a step's result
            // that does not serialize is journaled as run, and never run
            // again.)
            Error::Encode { .. }
            | Error::Reentered { .. }
            | Error::StepRepeated { .. }
            | Error::InvalidStepName { .. }
            | Error::OutsideCall { .. }
            | Error::Compensating { .. }
            | Error::Config(_) => Self::Internal,
        }
    }

    fn status(self) -> StatusCode {
        match self {
            Self::MissingKey | Self::InvalidKey | Self::MissingScope | Self::UnreadableBody => {
                StatusCode::BAD_REQUEST
            }
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::InProgress => StatusCode::CONFLICT,
            Self::KeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::AttemptFailed | Self::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Unreplayable | Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The fragment of the problem type, as documented in [`super`].
    fn fragment(self) -> &'static str {
        match self {
            Self::MissingKey => "missing-key",
            Self::InvalidKey => "invalid-key",
            Self::MissingScope => "missing-scope",
            Self::UnreadableBody => "unreadable-body",
            Self::PayloadTooLarge => "payload-too-large",
            Self::InProgress => "in-progress",
            Self::KeyReused => "key-reused",
            Self::AttemptFailed => "attempt-failed",
            Self::StoreUnavailable => "store-unavailable",
            Self::Unreplayable => "unreplayable",
            Self::Internal => "internal-error",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Self::MissingKey => "This request needs an Idempotency-Key header",
            Self::InvalidKey => "The Idempotency-Key header is invalid",
            Self::MissingScope => "This request cannot be scoped",
            Self::UnreadableBody => "The request body could not be read",
            Self::PayloadTooLarge => "The request is too large to be idempotent",
            Self::InProgress => "A request with this Idempotency-Key is in progress",
            Self::KeyReused => "This Idempotency-Key was used with a different request",
            Self::AttemptFailed => "A request with this Idempotency-Key failed",
            Self::StoreUnavailable => "The idempotency store is unavailable",
            Self::Unreplayable => "The request's stored result cannot be used",
            Self::Internal => "The server failed to handle this request idempotently",
        }
    }
}

/// A problem response's parts, before its body type is chosen.
pub(crate) struct Problem {
    kind: Kind,
    detail: String,
    retry_after: Option<Duration>,
}

/// The longest `Retry-After` idem sends: when a client should look again.
const LOOK_AGAIN: Duration = Duration::from_secs(1);

impl Problem {
    pub(crate) fn new(kind: Kind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
            retry_after: None,
        }
    }

    /// The problem of an idem error: its status, and a detail that says
    /// nothing of the store's internals.
    pub(crate) fn of(error: &Error) -> Self {
        let kind = Kind::of(error);
        // The call told its outcome at its own level (a store error at
        // `WARN`); this is the same failure as an HTTP answer. An internal
        // one (a step named twice, a misconfigured store) may have been
        // the body's own error, which its call tells only at `DEBUG`.
        if kind == Kind::Internal {
            tracing::error!(%error, "an idempotent request failed");
        } else if kind.status().is_server_error() {
            tracing::debug!(%error, "an idempotent request failed");
        }
        let detail = match kind {
            Kind::StoreUnavailable => {
                "This request was not processed; retry it later with the same Idempotency-Key."
                    .to_owned()
            }
            Kind::Unreplayable => {
                "The server cannot answer this request with its stored result.".to_owned()
            }
            // The error names the service's code or settings: logged above,
            // not sent.
            Kind::Internal => "The server's idempotency handling failed; retrying with the \
                 same Idempotency-Key is safe."
                .to_owned(),
            // Not the error's own text, which gives what is left of the
            // holder's lease: the response says when to look again, in
            // `Retry-After`, and its detail must not say otherwise.
            Kind::InProgress => "A request with this Idempotency-Key is still in progress; \
                 retry it as Retry-After says."
                .to_owned(),
            _ => error.to_string(),
        };
        Self {
            kind,
            detail,
            retry_after: error
                .retry_after()
                // A 409's `Retry-After` says when to look again, not how
                // much of the holder's lease is left: the holder usually
                // finishes long before its lease ends, and a client that
                // waits out the lease (or gives up because it would pass
                // its own budget) learns the outcome late or never.
                .map(|left| left.min(LOOK_AGAIN))
                .or(match kind {
                    Kind::AttemptFailed | Kind::StoreUnavailable => Some(LOOK_AGAIN),
                    _ => None,
                }),
        }
    }

    /// The response: `application/problem+json`, with a `type` under `docs`,
    /// `Link: <docs#type>; rel="describedby"`, and `Retry-After` where a
    /// retry is due later.
    pub(crate) fn response<B: From<Bytes>>(&self, docs: &str) -> Response<B> {
        #[derive(Serialize)]
        struct Body<'a> {
            r#type: String,
            title: &'a str,
            status: u16,
            detail: &'a str,
        }
        let status = self.kind.status();
        let body = Body {
            r#type: format!("{docs}#{}", self.kind.fragment()),
            title: self.kind.title(),
            status: status.as_u16(),
            detail: &self.detail,
        };
        let body = serde_json::to_vec(&body).unwrap_or_default();
        let mut response = Response::new(B::from(Bytes::from(body)));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        // The link names the problem's own section, so that a client that
        // reads only headers can tell it (idem's client does not retry an
        // `#unreplayable` 500: it is the stable answer for the key).
        if let Ok(link) = HeaderValue::from_str(&format!(
            "<{docs}#{}>; rel=\"describedby\"",
            self.kind.fragment()
        )) {
            headers.insert(LINK, link);
        }
        if let Some(retry_after) = self.retry_after {
            let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            headers.insert(RETRY_AFTER, HeaderValue::from(seconds.max(1)));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::time::Duration;

    use super::*;
    use crate::error::StoreError;
    use crate::settings::ConfigError;

    fn every_error() -> Vec<Error> {
        let store = |kind| Error::Store(StoreError::new(kind, "from the store"));
        let name = Cow::Borrowed("charge");
        vec![
            Error::InProgress {
                retry_after: Duration::from_secs(3),
            },
            Error::KeyReused,
            store(StoreErrorKind::Unavailable),
            store(StoreErrorKind::Timeout),
            store(StoreErrorKind::Corrupt),
            store(StoreErrorKind::Full),
            store(StoreErrorKind::Config),
            store(StoreErrorKind::Unsupported),
            store(StoreErrorKind::Other),
            Error::decode(serde_json::from_str::<u8>("x").unwrap_err()),
            Error::encode("result", std::fmt::Error),
            Error::InvalidKey {
                reason: "too long".into(),
            },
            Error::NotReplayable {
                reason: "too large".to_owned(),
            },
            Error::AttemptFailed,
            Error::Reentered {
                operation: name.clone(),
            },
            Error::StepRepeated { name: name.clone() },
            Error::InvalidStepName { name: name.clone() },
            Error::StepLost { name: name.clone() },
            Error::Compensating { name },
            Error::ClaimLost,
            Error::OutsideCall { what: "epoch()" },
            Error::Config(ConfigError::lease_too_short_for_store(
                Duration::from_secs(1),
                Duration::from_secs(2),
            )),
        ]
    }

    /// A problem's status is its error's `http_status`, whatever the error.
    #[test]
    fn every_error_is_answered_with_its_status() {
        for error in every_error() {
            assert_eq!(
                Kind::of(&error).status().as_u16(),
                error.http_status(),
                "{error:?}"
            );
        }
    }

    /// `#unreplayable` tells a client not to send the request again: only
    /// a request that ran and whose outcome cannot be answered is told so.
    /// One that lost its claim is to be retried; idem's misuse or
    /// misconfiguration is an internal error.
    #[test]
    fn only_outcomes_that_cannot_be_answered_are_unreplayable() {
        for error in every_error() {
            let expected = match &error {
                Error::Decode(_) | Error::NotReplayable { .. } => Kind::Unreplayable,
                Error::Store(store) if store.kind() == StoreErrorKind::Corrupt => {
                    Kind::Unreplayable
                }
                Error::StepLost { .. } | Error::ClaimLost | Error::AttemptFailed => {
                    Kind::AttemptFailed
                }
                Error::Store(store)
                    if matches!(
                        store.kind(),
                        StoreErrorKind::Config | StoreErrorKind::Unsupported
                    ) =>
                {
                    Kind::Internal
                }
                Error::Encode { .. }
                | Error::Reentered { .. }
                | Error::StepRepeated { .. }
                | Error::InvalidStepName { .. }
                | Error::OutsideCall { .. }
                | Error::Compensating { .. }
                | Error::Config(_) => Kind::Internal,
                _ => continue,
            };
            assert_eq!(Kind::of(&error), expected, "{error:?}");
        }
        let response: Response<Bytes> = Problem::of(&Error::ClaimLost).response(DEFAULT_DOCS);
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[RETRY_AFTER], "1");
        let response: Response<Bytes> = Problem::of(&Error::StepRepeated {
            name: "secret-step".into(),
        })
        .response(DEFAULT_DOCS);
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = String::from_utf8(response.body().to_vec()).unwrap();
        assert!(body.contains("#internal-error"), "{body}");
        assert!(
            !body.contains("secret-step"),
            "the service's names stay in its logs: {body}"
        );
    }
}
