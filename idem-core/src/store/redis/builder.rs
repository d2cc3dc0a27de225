//! Configuring and opening a [`RedisStore`]: addresses, timeouts, the key
//! prefix, lazy connection, and the check that Redis will not evict claims.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use redis::Value;
use redis::aio::ConnectionManager;
use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};

use super::connection::Connection;
use super::errors::{config, redact_all, store_error};
use super::{Inner, RedisStore};
use crate::error::StoreError;
use crate::error::StoreErrorKind;

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "idem";

/// The default time a store operation may take before it fails with
/// [`StoreErrorKind::Timeout`](crate::store::StoreErrorKind::Timeout). A
/// lease must be at least three times as long.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);

/// The default time a connection attempt may take.
pub const DEFAULT_CONNECTION_TIMEOUT: Duration = Duration::from_secs(1);

/// What to do when Redis may evict keys: a Redis with a `maxmemory` limit and
/// an eviction policy other than `noeviction` (`allkeys-lru`, `volatile-ttl`,
/// …) can evict a live claim under memory pressure and let a second call run
/// the body.
///
/// The check reads `CONFIG GET maxmemory*` when connecting (on a cluster,
/// from every primary). Where `CONFIG` is not allowed (some managed Redis
/// services rename it), idem cannot tell, logs a warning and connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum EvictionCheck {
    /// Refuse to connect, with a [`Config`](crate::store::StoreErrorKind::Config)
    /// error that says how to fix the server. The default: a store that can
    /// lose claims does not keep idem's promise.
    #[default]
    Refuse,
    /// Connect, and log a warning.
    Warn,
    /// Do not check.
    Skip,
}

/// Configures a [`RedisStore`]; made by [`RedisStore::node`] or
/// [`RedisStore::cluster`].
#[derive(Clone)]
pub struct RedisStoreBuilder {
    pub(super) nodes: Vec<String>,
    pub(super) cluster: bool,
    prefix: String,
    response_timeout: Duration,
    connection_timeout: Duration,
    eviction_check: EvictionCheck,
    #[cfg(feature = "tls")]
    tls: redis::TlsCertificates,
}

impl RedisStoreBuilder {
    pub(super) fn new(nodes: Vec<String>, cluster: bool) -> Self {
        // `REDISS://` is TLS too (schemes are case-insensitive).
        let nodes = nodes
            .into_iter()
            .map(|node| crate::store::connect::lowercase_scheme(&node).into_owned())
            .collect();
        Self {
            nodes,
            cluster,
            prefix: DEFAULT_PREFIX.to_owned(),
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            connection_timeout: DEFAULT_CONNECTION_TIMEOUT,
            eviction_check: EvictionCheck::default(),
            #[cfg(feature = "tls")]
            tls: redis::TlsCertificates {
                client_tls: None,
                root_cert: None,
            },
        }
    }

    /// Trusts the certificate authority `pem` (PEM text, the file's
    /// contents: `std::fs::read("ca.pem")?`) for `rediss://` connections,
    /// instead of the system's roots: for a server whose certificate a
    /// private CA signed. Text without a certificate, one that does not
    /// parse, or an address without TLS makes the store's
    /// [`connect`](Self::connect) and [`connect_lazy`](Self::connect_lazy)
    /// a [`Config`](crate::store::StoreErrorKind::Config) error.
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    #[must_use]
    pub fn tls_root_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls.root_cert = Some(pem.into());
        self
    }

    /// Presents this client certificate and key (PEM text, as for
    /// [`tls_root_certificate`](Self::tls_root_certificate)) to a server
    /// that asks for one (mutual TLS). A certificate or key that does not
    /// parse is a [`Config`](crate::store::StoreErrorKind::Config) error
    /// when the store is built.
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    #[must_use]
    pub fn tls_client_certificate(
        mut self,
        certificate: impl Into<Vec<u8>>,
        key: impl Into<Vec<u8>>,
    ) -> Self {
        self.tls.client_tls = Some(redis::ClientTlsConfig {
            client_cert: certificate.into(),
            client_key: key.into(),
        });
        self
    }

    /// The TLS material as the connection will read it: a `Config` error
    /// for certificates given to an address without TLS, for PEM text that
    /// holds no certificate (or no key), or that does not parse. Without
    /// this, a root that holds no certificate would leave the connection
    /// trusting nothing, and a server that answers would look unavailable.
    #[cfg(feature = "tls")]
    fn check_tls(&self) -> Result<(), StoreError> {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};

        let given = |setting: &str| {
            format!(
                "the Redis store's `{setting}` (PEM text: the file's contents, as \
                 `std::fs::read(path)?` gives them, not its path)"
            )
        };
        let certificates = |pem: &[u8], setting: &str| {
            let parsed = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| config(format!("{} does not parse: {e}", given(setting))))?;
            if parsed.is_empty() {
                return Err(config(format!(
                    "{} holds no `-----BEGIN CERTIFICATE-----` section",
                    given(setting)
                )));
            }
            Ok(())
        };
        if self.tls.root_cert.is_none() && self.tls.client_tls.is_none() {
            return Ok(());
        }
        if !self.uses_tls() {
            return Err(config(format!(
                "TLS certificates were given for {}, which does not use TLS: write \
                 `rediss://` (or `rediss+cluster://`)",
                redact_all(&self.nodes)
            )));
        }
        if let Some(root) = &self.tls.root_cert {
            certificates(root, "tls_root_certificate")?;
        }
        if let Some(client) = &self.tls.client_tls {
            certificates(&client.client_cert, "tls_client_certificate")?;
            PrivateKeyDer::from_pem_slice(&client.client_key).map_err(|e| {
                config(format!(
                    "the key of {} holds no private key: {e}",
                    given("tls_client_certificate")
                ))
            })?;
        }
        Ok(())
    }

    fn uses_tls(&self) -> bool {
        self.nodes.iter().any(|node| node.starts_with("rediss://"))
    }

    /// The prefix of every key the store writes. Default
    /// [`DEFAULT_PREFIX`]; give each application its own. On a cluster it
    /// may not hold `{` or `}`: each key's hash tag (`{…}`, which picks its
    /// slot) comes after the prefix, so that a call's record, journal and
    /// epoch share a slot and calls spread over the primaries; a brace in
    /// the prefix would take its place.
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long an operation may take. Default
    /// [`DEFAULT_RESPONSE_TIMEOUT`]. Leases must be at least three times as
    /// long (a call with a shorter one fails with
    /// [`Error::Config`](crate::Error::Config)), so that a renewal that times
    /// out can be retried before its lease lapses.
    #[must_use]
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// How long a connection attempt may take. Default
    /// [`DEFAULT_CONNECTION_TIMEOUT`].
    #[must_use]
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// What to do when Redis may evict keys; see [`EvictionCheck`]. Default
    /// [`EvictionCheck::Refuse`].
    #[must_use]
    pub fn eviction_check(mut self, check: EvictionCheck) -> Self {
        self.eviction_check = check;
        self
    }

    /// Connects now. The connection is re-established by itself when it
    /// drops, so a store outlives server restarts.
    ///
    /// # Errors
    /// [`StoreErrorKind::Config`](crate::store::StoreErrorKind::Config) for a
    /// malformed URL, a zero timeout, a cluster's prefix with a brace, TLS
    /// certificates that cannot be used, or a Redis that may evict keys
    /// (see [`EvictionCheck`]),
    /// and [`StoreErrorKind::Unavailable`](crate::store::StoreErrorKind::Unavailable)
    /// when no server answers.
    pub async fn connect(self) -> Result<RedisStore, StoreError> {
        let store = self.connect_lazy()?;
        store.connection().await?;
        Ok(store)
    }

    /// A store that connects on its first call instead of now, so that a
    /// service can start while Redis is down. Until a connection succeeds,
    /// every call fails closed with
    /// [`StoreErrorKind::Unavailable`](crate::store::StoreErrorKind::Unavailable)
    /// (or [`Timeout`](crate::store::StoreErrorKind::Timeout), for a server
    /// that accepts connections but does not answer: within a few
    /// connection and response timeouts, its attempts retried twice), the
    /// body does not run, and the next call tries again. Calls that come
    /// while a connection is being opened wait for that one attempt and
    /// share its failure, rather than each opening in turn.
    ///
    /// # Errors
    /// [`StoreErrorKind::Config`](crate::store::StoreErrorKind::Config) for a
    /// malformed URL, a zero timeout, a cluster's prefix with a brace, or
    /// TLS certificates that cannot be used (see
    /// [`tls_root_certificate`](Self::tls_root_certificate)).
    pub fn connect_lazy(self) -> Result<RedisStore, StoreError> {
        if self.cluster && self.prefix.contains(['{', '}']) {
            return Err(config(format!(
                "a Redis Cluster store's prefix may not contain `{{` or `}}` (`{}`): each key's \
                 hash tag comes after it, so that a call's keys share a slot",
                self.prefix
            )));
        }
        for (setting, value) in [
            ("response_timeout", self.response_timeout),
            ("connection_timeout", self.connection_timeout),
        ] {
            if value.is_zero() {
                return Err(config(format!(
                    "the Redis store's `{setting}` must be longer than zero"
                )));
            }
        }
        if self.uses_tls() && cfg!(not(feature = "tls")) {
            return Err(config(format!(
                "{} asks for TLS (`rediss://`), which needs the `tls` feature of idem-core: \
                 `idem-core = {{ version = \"…\", features = [\"redis\", \"tls\"] }}`",
                redact_all(&self.nodes)
            )));
        }
        #[cfg(feature = "tls")]
        self.check_tls()?;
        for node in &self.nodes {
            redis::IntoConnectionInfo::into_connection_info(node.as_str()).map_err(|e| {
                config(format!(
                    "`{}` is not a Redis address ({e}); write `redis://host:port/db`",
                    redact_all(std::slice::from_ref(node))
                ))
            })?;
        }
        Ok(RedisStore {
            inner: Arc::new(Inner {
                connection: tokio::sync::OnceCell::new(),
                failed_opens: std::sync::Mutex::new((0, None)),
                prefix: self.prefix.clone(),
                response_timeout: self.response_timeout,
                opener: self,
            }),
        })
    }

    /// Opens a connection and checks the server's eviction policy.
    pub(super) async fn open(&self) -> Result<Connection, StoreError> {
        #[cfg(feature = "tls")]
        if self.uses_tls() {
            // rustls needs a process-wide crypto provider; one installed by
            // the application is kept.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let mut connection = if self.cluster {
            let builder = redis::cluster::ClusterClientBuilder::new(self.nodes.clone())
                .response_timeout(self.response_timeout)
                .connection_timeout(self.connection_timeout)
                .retries(2);
            #[cfg(feature = "tls")]
            let builder = if self.uses_tls() {
                builder.certs(self.tls.clone())
            } else {
                builder
            };
            let client = builder.build().map_err(|e| {
                config(format!(
                    "the Redis client for {} could not be built: {e}",
                    redact_all(&self.nodes)
                ))
            })?;
            let connection = client
                .get_async_connection()
                .await
                .map_err(|e| store_error("connect", &e))?;
            Connection::Cluster(connection)
        } else {
            let node = self.nodes[0].as_str();
            #[cfg(feature = "tls")]
            let client = if self.uses_tls() {
                redis::Client::build_with_tls(node, self.tls.clone())
            } else {
                redis::Client::open(node)
            };
            #[cfg(not(feature = "tls"))]
            let client = redis::Client::open(node);
            let client = client.map_err(|e| {
                config(format!(
                    "the Redis client for {} could not be built: {e}",
                    redact_all(&self.nodes)
                ))
            })?;
            let config = redis::aio::ConnectionManagerConfig::new()
                .set_response_timeout(Some(self.response_timeout))
                .set_connection_timeout(Some(self.connection_timeout))
                .set_number_of_retries(2);
            let connection = ConnectionManager::new_with_config(client, config)
                .await
                .map_err(|e| store_error("connect", &e))?;
            Connection::Node(connection)
        };
        self.check_eviction(&mut connection).await?;
        Ok(connection)
    }

    async fn check_eviction(&self, connection: &mut Connection) -> Result<(), StoreError> {
        if self.eviction_check == EvictionCheck::Skip {
            return Ok(());
        }
        let mut command = redis::cmd("CONFIG");
        command.arg("GET").arg("maxmemory*");
        let answer = match connection {
            Connection::Node(c) => command.query_async::<Value>(c).await,
            Connection::Cluster(c) => {
                let primaries = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
                c.route_command(command, primaries).await
            }
        };
        let answer = match answer {
            Ok(answer) => answer,
            // No answer is no pass: a slow or unreachable Redis may well
            // evict keys, and the store must not connect as if it had said
            // it does not.
            Err(error)
                if error.is_timeout()
                    || error.is_io_error()
                    || error.is_connection_dropped()
                    || error.is_connection_refusal() =>
            {
                return Err(StoreError::new(
                    StoreErrorKind::Unavailable,
                    format!(
                        "Redis at {} did not answer the check of its eviction policy (CONFIG GET \
                         maxmemory*): {error}",
                        redact_all(&self.nodes)
                    ),
                ));
            }
            // The server answered with an error: `CONFIG` is not allowed
            // (renamed, ACLs, a managed Redis).
            Err(error) => {
                tracing::warn!(
                    nodes = %redact_all(&self.nodes),
                    %error,
                    "cannot read Redis's eviction policy (CONFIG GET is not allowed); make sure it is `maxmemory-policy noeviction`, or an evicted claim can let a call run twice"
                );
                return Ok(());
            }
        };
        let Some((maxmemory, policy)) = eviction_risk(&answer) else {
            return Ok(());
        };
        let message = format!(
            "Redis at {} evicts keys when full (maxmemory {maxmemory} with maxmemory-policy \
             {policy}); an evicted claim lets a second call run the body. Set \
             `maxmemory-policy noeviction` (a full Redis then fails calls closed), or accept \
             the risk with `.eviction_check(EvictionCheck::Warn)`",
            redact_all(&self.nodes)
        );
        match self.eviction_check {
            EvictionCheck::Refuse => Err(config(message)),
            _ => {
                tracing::warn!("{message}");
                Ok(())
            }
        }
    }
}

impl fmt::Debug for RedisStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStoreBuilder")
            .field("nodes", &redact_all(&self.nodes))
            .field("cluster", &self.cluster)
            .field("prefix", &self.prefix)
            .field("response_timeout", &self.response_timeout)
            .field("connection_timeout", &self.connection_timeout)
            .field("eviction_check", &self.eviction_check)
            .finish()
    }
}

/// The `maxmemory` and `maxmemory-policy` of the first node (of those in
/// `CONFIG GET maxmemory*`'s answer) that may evict keys: one with a memory
/// limit and a policy other than `noeviction`.
fn eviction_risk(answer: &Value) -> Option<(String, String)> {
    let mut configs = Vec::new();
    collect_configs(answer, &mut configs);
    configs.into_iter().find_map(|config| {
        let maxmemory = config.get("maxmemory")?;
        let policy = config.get("maxmemory-policy")?;
        let limited = maxmemory.parse::<u64>().is_ok_and(|bytes| bytes > 0);
        (limited && policy != "noeviction").then(|| (maxmemory.clone(), policy.clone()))
    })
}

/// Each node's `CONFIG GET` answer as a map: a flat array or a map of
/// strings (RESP2 or RESP3), or, from a cluster, such answers nested under
/// node addresses.
fn collect_configs(value: &Value, out: &mut Vec<HashMap<String, String>>) {
    fn text(value: &Value) -> Option<String> {
        match value {
            Value::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
            Value::SimpleString(text) => Some(text.clone()),
            _ => None,
        }
    }
    match value {
        Value::Array(items) if items.len() % 2 == 0 && items.iter().all(|i| text(i).is_some()) => {
            let pairs = items
                .chunks(2)
                .filter_map(|pair| Some((text(&pair[0])?, text(&pair[1])?)));
            out.push(pairs.collect());
        }
        Value::Map(entries)
            if entries
                .iter()
                .all(|(k, v)| text(k).is_some() && text(v).is_some()) =>
        {
            let pairs = entries
                .iter()
                .filter_map(|(k, v)| Some((text(k)?, text(v)?)));
            out.push(pairs.collect());
        }
        Value::Array(items) => items.iter().for_each(|item| collect_configs(item, out)),
        Value::Map(entries) => entries.iter().for_each(|(_, v)| collect_configs(v, out)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use redis::Value;

    use super::eviction_risk;
    use crate::RedisStore;
    use crate::store::StoreErrorKind;

    #[test]
    fn zero_timeouts_are_refused_naming_the_setting() {
        let node = || RedisStore::node("redis://127.0.0.1:1");
        for (store, setting) in [
            (node().response_timeout(Duration::ZERO), "response_timeout"),
            (
                node().connection_timeout(Duration::ZERO),
                "connection_timeout",
            ),
        ] {
            let error = store.connect_lazy().unwrap_err();
            assert_eq!(error.kind(), StoreErrorKind::Config);
            assert!(error.to_string().contains(setting), "{error}");
        }
    }

    fn bulk(text: &str) -> Value {
        Value::BulkString(text.as_bytes().to_vec())
    }

    fn config(maxmemory: &str, policy: &str) -> Value {
        Value::Array(vec![
            bulk("maxmemory"),
            bulk(maxmemory),
            bulk("maxmemory-policy"),
            bulk(policy),
        ])
    }

    #[test]
    fn only_a_limited_evicting_redis_is_a_risk() {
        assert_eq!(eviction_risk(&config("0", "allkeys-lru")), None);
        assert_eq!(eviction_risk(&config("1000", "noeviction")), None);
        assert_eq!(
            eviction_risk(&config("1000", "volatile-ttl")),
            Some(("1000".into(), "volatile-ttl".into()))
        );
        let cluster = Value::Map(vec![
            (bulk("10.0.0.1:7000"), config("0", "noeviction")),
            (bulk("10.0.0.2:7000"), config("5", "allkeys-lru")),
        ]);
        assert_eq!(
            eviction_risk(&cluster),
            Some(("5".into(), "allkeys-lru".into()))
        );
    }
}

#[cfg(all(test, not(feature = "tls")))]
mod without_tls {
    use crate::RedisStore;
    use crate::store::StoreErrorKind;

    #[test]
    fn rediss_without_the_tls_feature_is_a_clear_error() {
        for url in [
            "rediss://127.0.0.1:6380",
            "rediss+cluster://127.0.0.1:7000,127.0.0.1:7001",
        ] {
            let error = RedisStore::builder_for_url(url)
                .unwrap()
                .connect_lazy()
                .unwrap_err();
            assert_eq!(error.kind(), StoreErrorKind::Config);
            assert!(error.to_string().contains("the `tls` feature"), "{error}");
        }
    }
}
