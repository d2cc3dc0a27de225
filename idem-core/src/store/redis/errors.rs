//! Redis failures as store errors, and addresses fit to print.
//!
//! A password in a Redis URL never reaches an error message, a `Debug`
//! rendering or a log line: every address idem prints goes through
//! `redact`.

use redis::{RedisError, Value};

use crate::error::{StoreError, StoreErrorKind};
pub(crate) use crate::store::connect::redact;

/// A Redis failure as a store error of the right kind: a timeout, an
/// outage (the caller fails closed), a value that is not ours, or other.
pub(crate) fn store_error(op: &'static str, error: &RedisError) -> StoreError {
    let kind = if error.is_timeout() {
        StoreErrorKind::Timeout
    } else if error.code() == Some("WRONGTYPE") {
        StoreErrorKind::Corrupt
    } else if error.code() == Some("OOM") {
        // `maxmemory` reached under `noeviction`: the write was refused.
        StoreErrorKind::Full
    } else if error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_cluster_error()
        || matches!(
            error.code(),
            Some("LOADING" | "MASTERDOWN" | "TRYAGAIN" | "CLUSTERDOWN" | "READONLY")
        )
    {
        StoreErrorKind::Unavailable
    } else {
        StoreErrorKind::Other
    };
    let message = match kind {
        StoreErrorKind::Corrupt => {
            format!("redis {op}: a record key holds something that is not an idem record")
        }
        _ => format!("redis {op} failed"),
    };
    StoreError::new(kind, message).with_source(error.clone())
}

/// An answer of a shape the store does not expect.
pub(crate) fn unexpected(op: &'static str, value: &Value) -> StoreError {
    StoreError::new(
        StoreErrorKind::Other,
        format!("redis {op}: unexpected answer {value:?}"),
    )
}

/// A configuration mistake.
pub(crate) fn config(message: impl Into<String>) -> StoreError {
    StoreError::new(StoreErrorKind::Config, message.into())
}

/// Several addresses, redacted, for a message.
pub(crate) fn redact_all(urls: &[String]) -> String {
    urls.iter()
        .map(|url| redact(url))
        .collect::<Vec<_>>()
        .join(", ")
}
