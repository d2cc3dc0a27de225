//! What can go wrong, and the HTTP status each failure maps to.
//!
//! idem fails closed: when it cannot tell whether a call already ran, the body
//! does not run and the caller gets an [`Error`].

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::settings::ConfigError;

/// A boxed error behind an [`Error`] or a [`StoreError`]; cheap to clone.
type Source = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// Why an idempotent call did not produce its result.
///
/// Every variant maps to the HTTP status that the IETF Idempotency-Key draft
/// gives it; see [`Error::http_status`]. Annotated functions turn it into their
/// own error type through `E: From<idem_core::Error>`.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Another call holds this key and has not finished. Retry after
    /// `retry_after` (at most what is left of the holder's lease).
    #[error(
        "a call with this idempotency key is still in progress; retry in {} ms",
        retry_after.as_millis()
    )]
    InProgress {
        /// How long until the holder's lease lapses, at most.
        retry_after: Duration,
    },

    /// The key was used before with different arguments. A different request
    /// needs a new idempotency key.
    #[error(
        "this idempotency key was already used with different arguments; \
         send the original request again or use a new key"
    )]
    KeyReused,

    /// The store failed or could not be reached. The body did not run, or its
    /// result could not be recorded.
    #[error("idempotency store error: {0}")]
    Store(#[from] StoreError),

    /// The stored result does not decode as the function's return type: the
    /// type changed between releases, or the record was written for another
    /// result type (its type tag differs: two functions pinned to one
    /// `name`, or a return type renamed). The message never quotes the
    /// stored value.
    #[error("the stored result of this call no longer decodes as its return type: {0}")]
    Decode(#[source] Arc<dyn std::error::Error + Send + Sync + 'static>),

    /// A key, scope, argument or result could not be serialized.
    #[error("could not serialize the {what} of an idempotent call: {source}")]
    Encode {
        /// What failed to serialize: `"key"`, `"scope"`, `"arguments"` or `"result"`.
        what: &'static str,
        /// The serializer's error.
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync + 'static>,
    },

    /// An idempotency key was required (e.g. by an HTTP endpoint) but the
    /// request carried none, or an unusable one (empty, too long, malformed,
    /// given twice).
    #[error("missing or invalid idempotency key: {reason}")]
    InvalidKey {
        /// What was wrong with the key.
        reason: Cow<'static, str>,
    },

    /// The call with this key already ran, but its result could not be
    /// stored, so it cannot be replayed: it did not serialize (fix the
    /// result type or its `Serialize`), it was larger than the handle's
    /// `max_record_bytes`, or the store refused it as full. The body does
    /// not run again until the record expires.
    #[error(
        "the call with this idempotency key already ran, but its result could not be stored, \
         so it cannot be replayed: {reason}"
    )]
    NotReplayable {
        /// Why the result could not be stored.
        reason: String,
    },

    /// This call waited for another call with its key (in this process),
    /// and that call failed without storing a result. Nothing was stored, so
    /// a retry runs the body again.
    #[error(
        "the call with this idempotency key that this one waited for failed and stored no \
         result; retry to run it again"
    )]
    AttemptFailed,

    /// The call was made, with the same key on the same handle (in the
    /// transactional mode, the same `PostgresStore`), from inside the body
    /// of the call that holds that key (directly, or through other
    /// functions awaited in it): it would wait for itself until its
    /// `wait_timeout`. The inner call fails at once; the body did not run
    /// again. Give the inner operation a key of its own.
    #[error(
        "an idempotent call was made from inside the body that holds its own key ({operation}); \
         it would wait for itself: give the inner call a key of its own"
    )]
    Reentered {
        /// The operation whose key was re-entered.
        operation: Cow<'static, str>,
    },

    /// A step name was used twice within one call (see
    /// [`step`](crate::step)): a retry could not tell which of the two a
    /// journal entry belongs to. Give each step a name of its own, e.g. one
    /// that includes a loop's index.
    #[error(
        "the step `{name}` ran twice in one idempotent call; step names must be unique per call"
    )]
    StepRepeated {
        /// The repeated name.
        name: Cow<'static, str>,
    },

    /// A step's name starts with U+0001, which marks idem's own entries in
    /// a call's journal, contains U+0000, which not every store can keep
    /// and which separates the names of a step's derived request keys, or
    /// is longer than [`MAX_STEP_NAME_LEN`](crate::MAX_STEP_NAME_LEN)
    /// bytes, which a store's index of names cannot hold. Name the step
    /// otherwise; its work does not run (inside a call or outside
    /// one).
    #[error(
        "the step name {name:?} starts with U+0001 (idem's own journal entries), contains \
         U+0000 (which stores cannot keep) or is longer than 1024 bytes; name the step otherwise"
    )]
    InvalidStepName {
        /// The name given.
        name: Cow<'static, str>,
    },

    /// A step finished after its call's claim was lost (the lease lapsed
    /// and another attempt took the key over, or an operator forgot it):
    /// its result was not journaled, and the call stops here so that the
    /// new holder alone goes on.
    #[error("the claim of the idempotent call was lost before step `{name}` could be journaled")]
    StepLost {
        /// The step whose result was not journaled.
        name: Cow<'static, str>,
    },

    /// The step did not run: this attempt of the call only finishes the
    /// compensation of a call that failed for good on an earlier attempt
    /// (see [`Step::compensate`](crate::Step::compensate)). Its journaled
    /// steps replay, new ones fail with this error, and the call's outcome
    /// is the failure recorded then, whatever the body returns.
    #[error(
        "the step `{name}` did not run: the call failed for good earlier and is being compensated"
    )]
    Compensating {
        /// The step that did not run.
        name: Cow<'static, str>,
    },

    /// The call's claim was lost (its lease lapsed and another attempt took
    /// the key over, or an operator forgot it) when its body asked for a
    /// fencing [`epoch`](crate::epoch): no epoch is handed to a holder that
    /// may be stale, and the call stops here so that the new holder alone
    /// goes on.
    #[error("the claim of the idempotent call was lost before it was given a fencing epoch")]
    ClaimLost,

    /// Something that needs the claim of a running idempotent call (a
    /// fencing [`epoch`](crate::epoch)) was asked for outside the body of
    /// one: in plain code, or in a transactional PostgreSQL call (whose
    /// transaction commits the body's writes with the claim, and needs no
    /// epoch).
    #[error(
        "`{what}` was asked for outside the body of an idempotent call run by an Idempotency handle"
    )]
    OutsideCall {
        /// What was asked for.
        what: &'static str,
    },

    /// The call's settings break one of idem's rules, e.g. a `lease` not
    /// shorter than the `ttl` given as an expression. The body did not run.
    #[error("invalid idempotency settings: {0}")]
    Config(#[from] ConfigError),
}

impl Error {
    pub(crate) fn encode(
        what: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Encode {
            what,
            source: Arc::new(source),
        }
    }

    /// A stored value that does not decode. serde_json's own message quotes
    /// the offending value (`invalid type: string "…"`), which may be a
    /// secret, so only its category and position are kept.
    pub(crate) fn decode(source: serde_json::Error) -> Self {
        let what = match source.classify() {
            serde_json::error::Category::Io => "an I/O error",
            serde_json::error::Category::Syntax => "malformed JSON",
            serde_json::error::Category::Data => "a value of another type or shape",
            serde_json::error::Category::Eof => "a truncated value",
        };
        Self::Decode(Arc::from(Box::<dyn std::error::Error + Send + Sync>::from(
            format!(
                "the stored data holds {what} (at line {} column {})",
                source.line(),
                source.column()
            ),
        )))
    }

    /// A stored record whose type tag is not `expected`'s.
    pub(crate) fn other_type(expected: &'static str) -> Self {
        Self::Decode(Arc::from(Box::<dyn std::error::Error + Send + Sync>::from(
            format!(
                "the record under this key was written for another result type than `{expected}` \
                 (two functions share the key's operation name, or the type was renamed)"
            ),
        )))
    }

    /// The HTTP status for this error, per the IETF Idempotency-Key draft:
    /// `InProgress` → 409, `KeyReused` → 422, `InvalidKey` → 400,
    /// `Store` → 503 when the store is down or slow (a retry may succeed)
    /// and 500 when a record is corrupt or the store misconfigured (a retry
    /// would fail the same way), `AttemptFailed` → 503, `Decode`, `Encode`,
    /// `NotReplayable`, `Reentered`, `StepRepeated`, `InvalidStepName`,
    /// `OutsideCall`, `Compensating` and `Config` → 500, `StepLost` and `ClaimLost` → 503.
    ///
    /// ```
    /// use std::time::Duration;
    /// use idem_core::Error;
    ///
    /// assert_eq!(Error::KeyReused.http_status(), 422);
    /// assert_eq!(Error::InProgress { retry_after: Duration::from_secs(1) }.http_status(), 409);
    /// ```
    #[must_use]
    pub fn http_status(&self) -> u16 {
        match self {
            Self::InProgress { .. } => 409,
            Self::KeyReused => 422,
            Self::InvalidKey { .. } => 400,
            Self::Store(error) => match error.kind() {
                StoreErrorKind::Corrupt | StoreErrorKind::Config | StoreErrorKind::Unsupported => {
                    500
                }
                _ => 503,
            },
            Self::AttemptFailed => 503,
            Self::Reentered { .. } | Self::StepRepeated { .. } | Self::InvalidStepName { .. } => {
                500
            }
            Self::StepLost { .. } | Self::ClaimLost => 503,
            Self::OutsideCall { .. } | Self::Compensating { .. } => 500,
            Self::Decode(_)
            | Self::Encode { .. }
            | Self::NotReplayable { .. }
            | Self::Config(_) => 500,
        }
    }

    /// For [`Error::InProgress`], what is left of the holder's lease: the
    /// longest a retry may have to wait for the holder (a bound, not when
    /// to look again). idem's HTTP answers send `Retry-After: 1` instead
    /// (for `409` and for every `503`), so that a client looks again soon
    /// rather than after a long lease; a response of your own should too.
    /// `None` for every other error.
    #[must_use]
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::InProgress { retry_after } => Some(*retry_after),
            _ => None,
        }
    }
}

/// The error's message, so that `Result<T, String>` functions can be
/// `#[idempotent]`.
impl From<Error> for String {
    fn from(error: Error) -> Self {
        error.to_string()
    }
}

/// The error as an I/O error of the matching kind, so that
/// `std::io::Result<T>` functions can be `#[idempotent]`.
impl From<Error> for std::io::Error {
    fn from(error: Error) -> Self {
        use std::io::ErrorKind;
        let kind = match &error {
            Error::InProgress { .. } => ErrorKind::ResourceBusy,
            Error::KeyReused | Error::InvalidKey { .. } | Error::Config(_) => {
                ErrorKind::InvalidInput
            }
            Error::Reentered { .. } => ErrorKind::Deadlock,
            Error::StepRepeated { .. } | Error::InvalidStepName { .. } => ErrorKind::InvalidInput,
            Error::StepLost { .. } | Error::ClaimLost => ErrorKind::Other,
            Error::OutsideCall { .. } => ErrorKind::Unsupported,
            Error::Compensating { .. } => ErrorKind::Other,
            Error::Store(store) if store.kind() == StoreErrorKind::Timeout => ErrorKind::TimedOut,
            Error::Store(_) | Error::AttemptFailed => ErrorKind::Other,
            Error::Decode(_) | Error::NotReplayable { .. } => ErrorKind::InvalidData,
            Error::Encode { .. } => ErrorKind::InvalidInput,
        };
        Self::new(kind, error)
    }
}

/// A store backend failed.
///
/// Backends build one with [`StoreError::new`] and say what kind of failure it
/// was, so callers can tell an outage from a corrupt record.
#[derive(Clone)]
pub struct StoreError {
    kind: StoreErrorKind,
    message: Cow<'static, str>,
    source: Option<Source>,
}

/// The kind of a [`StoreError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// The backend could not be reached or dropped the connection.
    Unavailable,
    /// The backend did not answer in time.
    Timeout,
    /// A stored record is not one this version of idem can read: garbage
    /// bytes, or a newer record format.
    Corrupt,
    /// The store is at its capacity: it cannot claim a new key, or refuses
    /// to keep a record (a full Redis answers `OOM`).
    Full,
    /// The store was configured wrongly, e.g. a bad URL or a missing feature.
    Config,
    /// The store does not offer this operation (e.g. `inspect` on a store
    /// written before it existed).
    Unsupported,
    /// Any other backend failure.
    Other,
}

impl StoreError {
    /// A store error of `kind` with a message for humans.
    pub fn new(kind: StoreErrorKind, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Attaches the backend's own error as the source.
    #[must_use]
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Arc::new(source));
        self
    }

    /// What kind of failure this is.
    #[must_use]
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreError")
            .field("kind", &self.kind)
            .field("message", &self.message)
            .field("source", &self.source)
            .finish()
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_draft() {
        let store = StoreError::new(StoreErrorKind::Unavailable, "down");
        assert_eq!(Error::Store(store).http_status(), 503);
        assert_eq!(
            Error::InvalidKey {
                reason: "absent".into()
            }
            .http_status(),
            400
        );
        let decode = serde_json::from_str::<u8>("x").unwrap_err();
        assert_eq!(Error::decode(decode).http_status(), 500);
    }

    #[test]
    fn decode_errors_never_quote_the_stored_value() {
        let error = serde_json::from_str::<u32>("\"card 4242 4242\"").unwrap_err();
        assert!(
            error.to_string().contains("4242"),
            "serde_json quotes it: {error}"
        );
        let message = Error::decode(error).to_string();
        assert!(!message.contains("4242"), "{message}");
        assert!(message.contains("another type"), "{message}");
    }

    #[test]
    fn a_corrupt_record_is_not_a_retryable_outage() {
        for (kind, status) in [
            (StoreErrorKind::Unavailable, 503),
            (StoreErrorKind::Timeout, 503),
            (StoreErrorKind::Full, 503),
            (StoreErrorKind::Corrupt, 500),
            (StoreErrorKind::Config, 500),
        ] {
            let error = Error::Store(StoreError::new(kind, "x"));
            assert_eq!(error.http_status(), status, "{kind:?}");
        }
        assert_eq!(Error::AttemptFailed.http_status(), 503);
        let gone = Error::NotReplayable {
            reason: "key must be a string".into(),
        };
        assert_eq!(gone.http_status(), 500);
    }

    #[test]
    fn messages_say_what_to_do() {
        let msg = Error::InProgress {
            retry_after: Duration::from_millis(1500),
        }
        .to_string();
        assert!(msg.contains("retry in 1500 ms"), "{msg}");
        assert!(Error::KeyReused.to_string().contains("new key"));
        let err = StoreError::new(StoreErrorKind::Timeout, "begin timed out")
            .with_source(std::io::Error::other("socket"));
        assert_eq!(err.to_string(), "begin timed out: socket");
        assert!(std::error::Error::source(&err).is_some());
    }
}
