//! Redis failures as store errors, and addresses fit to print.
//!
//! A password in a Redis URL never reaches an error message, a `Debug`
//! rendering or a log line: every address idem prints goes through
//! [`redact`].

use redis::{RedisError, Value};

use crate::error::{StoreError, StoreErrorKind};

/// A Redis failure as a store error of the right kind: a timeout, an
/// outage (the caller fails closed), a value that is not ours, or other.
pub(crate) fn store_error(op: &'static str, error: &RedisError) -> StoreError {
    let kind = if error.is_timeout() {
        StoreErrorKind::Timeout
    } else if error.code() == Some("WRONGTYPE") {
        StoreErrorKind::Corrupt
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

/// `url` with the password of its user info replaced by `***`:
/// `redis://app:s3cret@host:6379/0` is printed `redis://app:***@host:6379/0`.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    // A cluster URL has several hosts but one user info, before the first '@'.
    match authority.rsplit_once('@') {
        Some((user_info, hosts)) => {
            let user = user_info
                .split_once(':')
                .map_or(user_info, |(user, _)| user);
            let shown = if user_info.contains(':') {
                format!("{user}:***")
            } else {
                // A lone user info is a password for Redis URLs (`redis://pw@h`).
                "***".to_owned()
            };
            format!("{scheme}://{shown}@{hosts}{tail}")
        }
        None => url.to_owned(),
    }
}

/// Several addresses, redacted, for a message.
pub(crate) fn redact_all(urls: &[String]) -> String {
    urls.iter()
        .map(|url| redact(url))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_are_never_printed() {
        for (url, shown) in [
            (
                "redis://app:s3cret@host:6379/0",
                "redis://app:***@host:6379/0",
            ),
            ("redis://:s3cret@host", "redis://:***@host"),
            ("redis://s3cret@host/1", "redis://***@host/1"),
            ("rediss://u:p%40ss@h:1?x=1", "rediss://u:***@h:1?x=1"),
            ("redis://host:6379", "redis://host:6379"),
            ("no scheme", "no scheme"),
        ] {
            assert_eq!(redact(url), shown, "{url}");
            assert!(!redact(url).contains("s3cret"));
        }
    }
}
