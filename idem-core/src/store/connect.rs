//! Choosing a store by URL at run time.

use std::sync::Arc;

use super::Store;
use super::memory::MemoryStore;
use crate::error::{StoreError, StoreErrorKind};

/// Opens the store a URL names.
///
/// | URL | store | feature |
/// |---|---|---|
/// | `memory://`, `memory://?max_records=N&max_bytes=N` | [`MemoryStore`] | always |
/// | `redis://host:port/db` | a single Redis node | `redis` |
/// | `redis+cluster://host:port,host:port` | a Redis Cluster | `redis` |
/// | `postgres://user@host/db` or `postgresql://…` | a PostgreSQL table | `postgres` |
///
/// Schemes are read in any case (`REDIS://` is `redis://`), as by
/// `RedisStore::connect` and `PostgresStore::connect`.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), idem_core::store::StoreError> {
/// let store = idem_core::connect("memory://").await?;
/// let idem = idem_core::Idempotency::from_arc(store);
/// # let _ = idem;
/// # Ok(())
/// # }
/// ```
///
/// [`Idempotency::connect`](crate::Idempotency::connect) opens a store and
/// wraps it in a handle in one step.
///
/// # Errors
/// A [`StoreErrorKind::Config`] error for a URL that is malformed, whose
/// scheme is unknown, or whose backend's Cargo feature is not compiled in.
pub async fn connect(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    let url = &*lowercase_scheme(url);
    let (scheme, rest) = url.split_once("://").ok_or_else(|| {
        config(format!(
            "`{}` is not a store URL; expected e.g. `memory://` or `redis://127.0.0.1:6379`",
            redact(url)
        ))
    })?;
    match scheme {
        "memory" => Ok(Arc::new(memory_from_url(rest)?)),
        #[cfg(feature = "redis")]
        "redis" | "rediss" | "redis+cluster" | "rediss+cluster" => {
            Ok(Arc::new(crate::RedisStore::connect(url).await?))
        }
        #[cfg(not(feature = "redis"))]
        "redis" | "rediss" | "redis+cluster" | "rediss+cluster" => {
            // `rediss` speaks TLS, which takes the `tls` feature too.
            let features = if scheme.starts_with("rediss") {
                "[\"redis\", \"tls\"]"
            } else {
                "[\"redis\"]"
            };
            Err(config(format!(
                "`{scheme}://` stores need the features {features} of idem-core: \
                 idem-core = {{ version = \"{}\", features = {features} }}",
                env!("CARGO_PKG_VERSION")
            )))
        }
        #[cfg(feature = "postgres")]
        "postgres" | "postgresql" => Ok(Arc::new(crate::PostgresStore::connect(url).await?)),
        #[cfg(not(feature = "postgres"))]
        "postgres" | "postgresql" => Err(config(format!(
            "`{scheme}://` stores need the `postgres` feature of idem-core: \
             idem-core = {{ version = \"{}\", features = [\"postgres\"] }}",
            env!("CARGO_PKG_VERSION")
        ))),
        other => Err(config(format!(
            "unknown store URL scheme `{other}://`; expected `memory://`, `redis://`, \
             `redis+cluster://` or `postgres://`"
        ))),
    }
}

fn memory_from_url(rest: &str) -> Result<MemoryStore, StoreError> {
    let query = match rest.split_once('?') {
        Some(("", query)) => query,
        None if rest.is_empty() => "",
        _ => {
            return Err(config(format!(
                "`memory://{rest}` names a location, but the memory store has none; \
                 write `memory://` or `memory://?max_records=N&max_bytes=N`"
            )));
        }
    };
    let mut builder = MemoryStore::builder();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some((option @ ("max_records" | "max_bytes"), n)) => {
                let n = n.parse().map_err(|_| {
                    config(format!("`{option}={n}` in a memory:// URL is not a count"))
                })?;
                builder = match option {
                    "max_records" => builder.max_records(n),
                    _ => builder.max_bytes(n),
                };
            }
            _ => {
                return Err(config(format!(
                    "unknown memory:// URL option `{pair}`; the options are `max_records=N` \
                     and `max_bytes=N`"
                )));
            }
        }
    }
    Ok(builder.build())
}

/// `url` with its scheme in lower case: schemes are case-insensitive
/// (RFC 3986), so `REDIS://host` is `redis://host`.
pub(crate) fn lowercase_scheme(url: &str) -> std::borrow::Cow<'_, str> {
    match url.split_once("://") {
        Some((scheme, rest)) if scheme.bytes().any(|b| b.is_ascii_uppercase()) => {
            format!("{}://{rest}", scheme.to_ascii_lowercase()).into()
        }
        _ => url.into(),
    }
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

fn config(message: String) -> StoreError {
    StoreError::new(StoreErrorKind::Config, message)
}

#[cfg(test)]
mod tests {
    use super::*;

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
            (
                "postgres://app:s3cret@db/payments",
                "postgres://app:***@db/payments",
            ),
            ("redis://host:6379", "redis://host:6379"),
            ("no scheme", "no scheme"),
        ] {
            assert_eq!(redact(url), shown, "{url}");
            assert!(!redact(url).contains("s3cret"));
        }
    }

    async fn error_of(url: &str) -> String {
        match connect(url).await {
            Ok(_) => panic!("{url} should not connect"),
            Err(e) => {
                assert_eq!(e.kind(), StoreErrorKind::Config);
                e.to_string()
            }
        }
    }

    #[test]
    fn schemes_are_read_in_any_case() {
        for (url, expected) in [
            ("REDIS://Host:6379/0", "redis://Host:6379/0"),
            ("Rediss+Cluster://A:1,B:2", "rediss+cluster://A:1,B:2"),
            ("postgres://U:P@h/DB", "postgres://U:P@h/DB"),
            ("no scheme", "no scheme"),
        ] {
            assert_eq!(lowercase_scheme(url), expected);
        }
    }

    #[tokio::test]
    async fn memory_urls() {
        connect("memory://").await.unwrap();
        connect("MEMORY://").await.unwrap();
        connect("Memory://?max_records=10").await.unwrap();
        connect("memory://?max_records=10").await.unwrap();
        connect("memory://?max_records=10&max_bytes=4096")
            .await
            .unwrap();
        assert!(
            error_of("memory://?max_records=ten")
                .await
                .contains("not a count")
        );
        assert!(
            error_of("memory://?size=1")
                .await
                .contains("unknown memory:// URL option")
        );
        assert!(error_of("memory://somewhere").await.contains("has none"));
    }

    #[tokio::test]
    async fn bad_urls_say_what_to_write() {
        assert!(error_of("localhost:6379").await.contains("not a store URL"));
        assert!(
            error_of("mongodb://x")
                .await
                .contains("unknown store URL scheme")
        );
    }

    #[cfg(not(feature = "postgres"))]
    #[tokio::test]
    async fn postgres_without_its_feature_names_the_feature() {
        for url in ["postgres://db/x", "postgresql://db/x"] {
            assert!(error_of(url).await.contains("`postgres` feature"), "{url}");
        }
    }

    #[cfg(not(feature = "redis"))]
    #[tokio::test]
    async fn redis_without_its_feature_names_the_feature() {
        for url in ["redis://127.0.0.1:6379", "redis+cluster://127.0.0.1:7000"] {
            let error = error_of(url).await;
            assert!(error.contains(r#"features = ["redis"] }"#), "{error}");
        }
        // TLS takes its own feature as well.
        for url in ["rediss://127.0.0.1:6379", "rediss+cluster://127.0.0.1:7000"] {
            let error = error_of(url).await;
            assert!(
                error.contains(r#"features = ["redis", "tls"] }"#),
                "{error}"
            );
        }
    }
}
