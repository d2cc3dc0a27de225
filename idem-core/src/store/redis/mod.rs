//! The Redis store, for a single node or a Redis Cluster (feature `redis`).
//!
//! A record is one binary string under `{prefix}:{hex}`, with the hex in a
//! hash tag so that, on a cluster, a record maps to one slot; its layout is
//! in [`envelope`]. `begin` is one plain `SET key claim NX GET PX lease`: it
//! claims an absent key and answers what a present one holds, so a replayed
//! hit costs one cheap command and no script. `complete`, `release` and
//! `renew` compare the token first, so they are Lua scripts.

use std::sync::Arc;
use std::time::Duration;

use redis::{RedisError, Script, Value};

use super::{
    Begin, Completion, HeldClaim, Inspection, JournaledStep, Limits, Record, Store, StoreFuture,
    Token,
};
use crate::error::{StoreError, StoreErrorKind};
use crate::key::{Fingerprint, Key};

mod builder;
mod connection;
pub mod envelope;
mod errors;
mod scripts;

pub use builder::{
    DEFAULT_CONNECTION_TIMEOUT, DEFAULT_PREFIX, DEFAULT_RESPONSE_TIMEOUT, EvictionCheck,
    RedisStoreBuilder,
};
use connection::Connection;
use envelope::Held;
use errors::{config, redact, store_error, unexpected};
use scripts::SCRIPTS;

/// A [`Store`] on Redis: a single node or a Redis Cluster.
///
/// # Round trips
///
/// Every operation is one command: a replayed hit costs one round trip (a
/// plain `SET … NX GET`, no script), a first run two (`begin`, then the
/// `complete` script) and a failed run two (`begin`, then the `release`
/// script); a body longer than a third of its lease adds one `renew` per
/// third. After `SCRIPT FLUSH` or a server restart the first call of each
/// script also loads it (`NOSCRIPT` is handled). Redis 7.0 or newer is
/// required (`SET` with both `NX` and `GET`).
///
/// The time left on another holder's claim (`retry_after`) is computed from
/// the deadline that holder wrote with its own clock, clamped to the lease;
/// keep the clocks of a service's machines in sync (NTP) for it to be exact.
///
/// # Guarantees
///
/// Each operation is atomic on the server. A claim is fenced by its token: a
/// holder whose lease lapsed cannot complete over the one who took over. An
/// operation whose connection dropped is retried once on a fresh connection,
/// which is safe because every operation is harmless to repeat with the same
/// token. A server that does not answer within the response timeout fails the
/// call with [`StoreErrorKind::Timeout`]; the body does not run.
///
/// # Deployment: eviction, replication and persistence
///
/// A Redis that evicts keys when full (a `maxmemory` limit with a policy
/// other than `noeviction`) can evict a live claim and let two calls run; the
/// store refuses to connect to one unless told otherwise (see
/// [`EvictionCheck`]). Run idem's Redis with `maxmemory-policy noeviction`:
/// when it is full, calls then fail closed.
///
///
/// Redis replicates asynchronously. A claim or record written to a primary
/// that fails *unexpectedly* before its replica received the write is lost
/// with it: a retry after the failover may run the body again. A coordinated
/// `CLUSTER FAILOVER` (without `FORCE`) waits for the replica to catch up and
/// loses nothing. To narrow the window, run replicas with `min-replicas-to-write 1`
/// and, for records that must survive a restart, enable AOF persistence
/// (`appendonly yes`, `appendfsync everysec` or `always`); a server restarted
/// without persistence forgets every record, and retries then run again.
///
/// ```no_run
/// # async fn demo() -> Result<(), idem_core::store::StoreError> {
/// use std::time::Duration;
/// use idem_core::RedisStore;
///
/// let node = RedisStore::node("redis://127.0.0.1:6379/0")
///     .prefix("payments:idem")
///     .response_timeout(Duration::from_millis(250))
///     .connect()
///     .await?;
/// let cluster = RedisStore::cluster(["redis://10.0.0.1:7000", "redis://10.0.0.2:7000"])
///     .connect()
///     .await?;
/// # let _ = (node, cluster);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// Opened on first use (at once, unless connected lazily).
    connection: tokio::sync::OnceCell<Connection>,
    /// How many opens failed, and the last one's error: the callers that
    /// waited for an open that failed share its error instead of each
    /// opening in turn.
    failed_opens: std::sync::Mutex<(u64, Option<StoreError>)>,
    opener: RedisStoreBuilder,
    prefix: String,
    response_timeout: Duration,
}

impl RedisStore {
    /// Connects to the store a URL names: `redis://host:port/db` (a single
    /// node) or `redis+cluster://host:port,host:port` (a cluster, given any of
    /// its nodes), with the default settings.
    ///
    /// # Errors
    /// [`StoreErrorKind::Config`] for a URL of another scheme, and the
    /// connection's error when the server cannot be reached.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::builder_for_url(url)?.connect().await
    }

    /// Starts configuring a store on the single node at `url`
    /// (`redis://host:port/db`).
    pub fn node(url: impl Into<String>) -> RedisStoreBuilder {
        RedisStoreBuilder::new(vec![url.into()], false)
    }

    /// Starts configuring a store on the Redis Cluster that these nodes
    /// (`redis://host:port` each) belong to.
    pub fn cluster<I, U>(nodes: I) -> RedisStoreBuilder
    where
        I: IntoIterator<Item = U>,
        U: Into<String>,
    {
        RedisStoreBuilder::new(nodes.into_iter().map(Into::into).collect(), true)
    }

    pub(crate) fn builder_for_url(url: &str) -> Result<RedisStoreBuilder, StoreError> {
        let url = &*crate::store::connect::lowercase_scheme(url);
        let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
        match scheme {
            "redis" | "rediss" => Ok(Self::node(url)),
            "redis+cluster" | "rediss+cluster" => {
                let node_scheme = scheme.trim_end_matches("+cluster");
                let (hosts, path) = rest.split_once('/').unwrap_or((rest, ""));
                let nodes: Vec<String> = hosts
                    .split(',')
                    .filter(|h| !h.is_empty())
                    .map(|host| match path {
                        "" => format!("{node_scheme}://{host}"),
                        path => format!("{node_scheme}://{host}/{path}"),
                    })
                    .collect();
                if nodes.is_empty() {
                    return Err(config(format!(
                        "`{}` names no cluster node; write `redis+cluster://host:port,host:port`",
                        redact(url)
                    )));
                }
                Ok(Self::cluster(nodes))
            }
            _ => Err(config(format!(
                "`{}` is not a Redis URL; write `redis://host:port/db` or \
                 `redis+cluster://host:port,host:port`",
                redact(url)
            ))),
        }
    }

    /// The connection, opened now if it is not yet. Callers that come
    /// while it is being opened wait for that open, one at a time; when it
    /// fails, they all get its error at once, rather than each opening in
    /// turn (against a server that does not answer, each open takes a few
    /// timeouts).
    async fn connection(&self) -> Result<Connection, StoreError> {
        if let Some(connection) = self.inner.connection.get() {
            return Ok(connection.clone());
        }
        let failures = || {
            self.inner
                .failed_opens
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        let seen = failures().0;
        // Boxed: opening is rare and its future large, and every
        // operation's future would otherwise carry it.
        Box::pin(self.inner.connection.get_or_try_init(|| async {
            if let (count, Some(error)) = &*failures()
                && *count > seen
            {
                return Err(error.clone());
            }
            let opened = self.inner.opener.open().await;
            if let Err(error) = &opened {
                let mut failed = failures();
                *failed = (failed.0 + 1, Some(error.clone()));
            }
            opened
        }))
        .await
        .cloned()
    }

    /// The key a record is stored under.
    #[must_use]
    pub fn record_key(&self, key: &Key) -> String {
        key.to_store_key(&self.inner.prefix)
    }

    /// The key of the step journal of the call stored under `key`: the
    /// record's key with a suffix, so in the record's hash slot.
    fn journal_key(&self, key: &Key) -> String {
        format!("{}:steps", self.record_key(key))
    }

    /// The key of the fencing epoch of the claim stored under `key`, in the
    /// record's hash slot.
    fn epoch_key(&self, key: &Key) -> String {
        format!("{}:epoch", self.record_key(key))
    }

    async fn invoke(
        &self,
        op: &'static str,
        script: &Script,
        key: &Key,
        args: &[&[u8]],
    ) -> Result<Value, StoreError> {
        let mut invocation = script.prepare_invoke();
        invocation.key(self.record_key(key));
        for arg in args {
            invocation.arg(*arg);
        }
        self.run_script(op, &invocation).await
    }

    /// Runs a prepared script invocation, retried as every command is.
    async fn run_script(
        &self,
        op: &'static str,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<Value, StoreError> {
        self.retrying(op, |mut connection| async move {
            invocation.invoke_async::<Value>(&mut connection).await
        })
        .await
    }

    async fn query(&self, op: &'static str, command: &redis::Cmd) -> Result<Value, StoreError> {
        self.retrying(op, |mut connection| async move {
            command.query_async::<Value>(&mut connection).await
        })
        .await
    }

    /// Runs `attempt` on the connection; a dropped connection is replaced, and
    /// since every operation is safe to repeat with the same token, the
    /// attempt is made once more on the new one.
    async fn retrying<F, Fut>(&self, op: &'static str, attempt: F) -> Result<Value, StoreError>
    where
        F: Fn(Connection) -> Fut,
        Fut: std::future::Future<Output = Result<Value, RedisError>>,
    {
        let connection = self.connection().await?;
        match attempt(connection.clone()).await {
            Ok(value) => Ok(value),
            Err(e) if e.is_connection_dropped() || e.is_io_error() => {
                attempt(connection).await.map_err(|e| store_error(op, &e))
            }
            Err(e) => Err(store_error(op, &e)),
        }
    }
}

/// What the answer to [`RedisStore::claim_command`] means for `token`'s
/// claim.
fn begun(
    answer: Value,
    fingerprint: Fingerprint,
    token: Token,
    lease: Duration,
) -> Result<Begin, StoreError> {
    let held = match answer {
        Value::Nil => return Ok(Begin::Claimed),
        Value::BulkString(bytes) => envelope::parse(bytes)?,
        other => return Err(unexpected("begin", &other)),
    };
    Ok(match held {
        Held::Claimed {
            fingerprint: held, ..
        }
        | Held::Completed {
            fingerprint: held, ..
        } if held != fingerprint => Begin::Mismatch,
        Held::Completed { record, .. } => Begin::Completed(record),
        Held::Claimed { token: holder, .. } if holder == token => Begin::Claimed,
        Held::Claimed { deadline, .. } => {
            let left = deadline.saturating_sub(unix_millis());
            Begin::InProgress {
                retry_after: Duration::from_millis(left).clamp(Duration::from_millis(1), lease),
            }
        }
    })
}

/// A journal read with `HGETALL`, in the order its steps were appended.
fn journal_steps(answer: &Value) -> Result<Vec<JournaledStep>, StoreError> {
    let pairs: Vec<(Vec<u8>, Vec<u8>)> = match answer {
        Value::Map(pairs) => pairs
            .iter()
            .map(|(name, value)| Some((bulk(name)?, bulk(value)?)))
            .collect::<Option<_>>()
            .ok_or_else(|| unexpected("steps", answer))?,
        Value::Array(items) if items.len() % 2 == 0 => items
            .chunks(2)
            .map(|pair| Some((bulk(&pair[0])?, bulk(&pair[1])?)))
            .collect::<Option<_>>()
            .ok_or_else(|| unexpected("steps", answer))?,
        other => return Err(unexpected("steps", other)),
    };
    let mut steps = Vec::with_capacity(pairs.len());
    for (name, stored) in pairs {
        let position = stored
            .get(..8)
            .and_then(|digits| std::str::from_utf8(digits).ok()?.parse::<u64>().ok());
        let (Some(position), Ok(name)) = (position, String::from_utf8(name)) else {
            return Err(StoreError::new(
                StoreErrorKind::Corrupt,
                "a step journal entry is not one idem wrote",
            ));
        };
        steps.push((position, JournaledStep::new(name, stored[8..].to_vec())));
    }
    steps.sort_by_key(|(position, _)| *position);
    Ok(steps.into_iter().map(|(_, step)| step).collect())
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let topology = if self.inner.opener.cluster {
            "cluster"
        } else {
            "node"
        };
        f.debug_struct("RedisStore")
            .field("topology", &topology)
            .field("prefix", &self.inner.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// The command that claims `key` for `token` or reads what holds it:
    /// `SET record claim NX GET PX lease`.
    fn claim_command(
        &self,
        key: &Key,
        fingerprint: Fingerprint,
        token: Token,
        lease: Duration,
    ) -> redis::Cmd {
        let claim = envelope::claim(token, fingerprint, deadline_after(lease), unix_millis());
        let record_key = self.record_key(key);
        // Sized once: the command's seven arguments and their bytes (the
        // lease's milliseconds take at most 20 digits).
        let bytes = "SETNXGETPX".len() + record_key.len() + claim.len() + 20;
        let mut command = redis::Cmd::with_capacity(7, bytes);
        command
            .arg("SET")
            .arg(record_key)
            .arg(&claim[..])
            .arg("NX")
            .arg("GET")
            .arg("PX")
            .arg(millis(lease));
        command
    }

    /// The claim a scanned key holds, if it holds one that says when it
    /// was made.
    async fn held_claim(
        &self,
        connection: &mut Connection,
        prefix: &str,
        record_key: Vec<u8>,
    ) -> Result<Option<HeldClaim>, StoreError> {
        let failed = |e: RedisError| store_error("claims_older_than", &e);
        let Some(digest) = std::str::from_utf8(&record_key)
            .ok()
            .and_then(|k| k.strip_prefix(prefix)?.strip_suffix('}'))
            .and_then(|hex| <[u8; 32]>::try_from(hex::decode(hex).ok()?).ok())
        else {
            return Ok(None);
        };
        let (held, ttl): (Option<Vec<u8>>, i64) = SCRIPTS
            .read
            .key(&record_key)
            .invoke_async(connection)
            .await
            .map_err(failed)?;
        let Some(held) = held else { return Ok(None) };
        let Ok(Held::Claimed {
            fingerprint,
            claimed_at: Some(claimed_at),
            ..
        }) = envelope::parse(held)
        else {
            return Ok(None);
        };
        Ok(Some(HeldClaim::new(
            Key::from_digest(digest),
            fingerprint,
            Duration::from_millis(unix_millis().saturating_sub(claimed_at)),
            Duration::from_millis(ttl.max(0).unsigned_abs()),
        )))
    }
}

/// The most keys one `claims_older_than` looks at, however few claims it
/// finds: a listing on a large keyspace ends after this many, partial.
const MAX_SCANNED: usize = 100_000;

/// `text` with Redis glob's special characters escaped.
fn glob_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// When a lease taken now ends, in Unix ms.
fn deadline_after(lease: Duration) -> u64 {
    let lease = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
    unix_millis().saturating_add(lease)
}

fn millis(duration: Duration) -> Vec<u8> {
    // At least 1 ms: PEXPIRE 0 would delete the key at once.
    duration
        .as_millis()
        .clamp(1, i64::MAX as u128)
        .to_string()
        .into_bytes()
}

fn bulk(value: &Value) -> Option<Vec<u8>> {
    match value {
        Value::BulkString(bytes) => Some(bytes.clone()),
        _ => None,
    }
}

fn as_int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(n) => Some(*n),
        _ => None,
    }
}

// Kept out of "other types implement `Store`" hints, so diagnostics read the
// same with or without the `redis` feature.
#[diagnostic::do_not_recommend]
impl Store for RedisStore {
    fn begin(
        &self,
        key: Key,
        fingerprint: Fingerprint,
        token: Token,
        lease: Duration,
    ) -> StoreFuture<'_, Begin> {
        Box::pin(async move {
            let command = self.claim_command(&key, fingerprint, token, lease);
            let answer = self.query("begin", &command).await?;
            begun(answer, fingerprint, token, lease)
        })
    }

    fn begin_with_steps(
        &self,
        key: Key,
        fingerprint: Fingerprint,
        token: Token,
        lease: Duration,
    ) -> StoreFuture<'_, (Begin, Option<Vec<JournaledStep>>)> {
        Box::pin(async move {
            if self.inner.opener.cluster {
                // Not as a pipeline on a cluster: while the slot migrates, a
                // journal not on the old node answers ASK, which the client
                // does not follow inside a pipeline, so the claim would fail
                // for as long as the migration lasts.
                return super::begin_then_read_steps(self, key, fingerprint, token, lease).await;
            }
            // One round trip: the claim and the journal's read as one
            // pipeline. The read is wasted when the key is held or
            // completed.
            let mut pipeline = redis::pipe();
            pipeline
                .add_command(self.claim_command(&key, fingerprint, token, lease))
                .add_command({
                    let mut read = redis::cmd("HGETALL");
                    read.arg(self.journal_key(&key));
                    read
                });
            let pipeline = &pipeline;
            let answer = self
                .retrying("begin", |mut connection| async move {
                    pipeline.query_async::<Value>(&mut connection).await
                })
                .await?;
            let answers = match answer {
                Value::Array(answers) if answers.len() == 2 => answers,
                other => return Err(unexpected("begin", &other)),
            };
            let mut answers = answers.into_iter();
            let (Some(claimed), Some(journal)) = (answers.next(), answers.next()) else {
                return Err(StoreError::new(
                    StoreErrorKind::Corrupt,
                    "a pipeline of two answered fewer",
                ));
            };
            let begun = begun(claimed, fingerprint, token, lease)?;
            let steps = match begun {
                Begin::Claimed => journal_steps(&journal).ok(),
                _ => None,
            };
            Ok((begun, steps))
        })
    }

    fn complete(
        &self,
        key: Key,
        token: Token,
        record: Record,
        ttl: Duration,
    ) -> StoreFuture<'_, Completion> {
        Box::pin(async move {
            let token = token.as_u128().to_be_bytes();
            let record = record.encode();
            let stored_at = unix_millis().to_be_bytes();
            let value = self
                .invoke(
                    "complete",
                    &SCRIPTS.complete,
                    &key,
                    &[&token, &record, &millis(ttl), &stored_at],
                )
                .await?;
            match as_int(&value) {
                Some(1) => Ok(Completion::Stored),
                Some(0) => Ok(Completion::Lost),
                _ => Err(unexpected("complete", &value)),
            }
        })
    }

    fn release(&self, key: Key, token: Token) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let token = token.as_u128().to_be_bytes();
            self.invoke("release", &SCRIPTS.release, &key, &[&token])
                .await
                .map(drop)
        })
    }

    fn limits(&self) -> Limits {
        Limits::with_response_timeout(self.inner.response_timeout)
    }

    fn inspect(&self, key: Key) -> StoreFuture<'_, Inspection> {
        Box::pin(async move {
            let answer = self.invoke("inspect", &SCRIPTS.read, &key, &[]).await?;
            let Value::Array(mut answers) = answer else {
                return Err(unexpected("inspect", &answer));
            };
            let (held, ttl) = match (answers.pop(), answers.pop()) {
                (Some(ttl), Some(held)) => (held, ttl),
                _ => return Err(unexpected("inspect", &Value::Array(answers))),
            };
            let expires_in = match as_int(&ttl) {
                Some(ms) if ms > 0 => Duration::from_millis(ms.unsigned_abs()),
                _ => Duration::ZERO,
            };
            let held = match held {
                Value::Nil => return Ok(Inspection::Absent),
                Value::BulkString(bytes) => envelope::parse(bytes)?,
                other => return Err(unexpected("inspect", &other)),
            };
            let now = unix_millis();
            Ok(match held {
                Held::Claimed {
                    fingerprint,
                    claimed_at,
                    ..
                } => Inspection::InProgress {
                    fingerprint,
                    expires_in,
                    held_for: claimed_at.map(|at| Duration::from_millis(now.saturating_sub(at))),
                },
                Held::Completed {
                    fingerprint,
                    record,
                    stored_at,
                } => Inspection::Completed {
                    outcome: record.outcome(),
                    fingerprint,
                    stored_at: std::time::UNIX_EPOCH.checked_add(Duration::from_millis(stored_at)),
                    expires_in,
                    size: record.payload().len(),
                },
            })
        })
    }

    fn forget(&self, key: Key) -> StoreFuture<'_, bool> {
        Box::pin(async move {
            // One script, so that the record and the journal go together
            // and the answer counts the record alone.
            let mut invocation = SCRIPTS.forget.prepare_invoke();
            invocation
                .key(self.record_key(&key))
                .key(self.journal_key(&key));
            let value = self.run_script("forget", &invocation).await?;
            match as_int(&value) {
                Some(n) => Ok(n > 0),
                None => Err(unexpected("forget", &value)),
            }
        })
    }

    fn claims_older_than(&self, age: Duration, limit: usize) -> StoreFuture<'_, Vec<HeldClaim>> {
        Box::pin(async move {
            let failed = |e: RedisError| store_error("claims_older_than", &e);
            let mut connection = self.connection().await?;
            let prefix = format!("{}:{{", self.inner.prefix);
            let pattern = format!("{}*", glob_escape(&prefix));
            let age_ms = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
            let mut claims = Vec::new();
            let mut scanned = 0_usize;
            let targets = connection.scan_targets().await.map_err(failed)?;
            let mut failures = Vec::new();
            'targets: for target in &targets {
                let mut cursor = 0;
                loop {
                    // A node that fails (a reshard under way, a failover)
                    // is reported and skipped: the others' claims are
                    // still listed.
                    let (next, keys) = match connection.scan(target, cursor, &pattern).await {
                        Ok(page) => page,
                        Err(error) => {
                            tracing::warn!(node = ?target, %error, "could not scan a Redis node for old claims; listing the others'");
                            failures.push(failed(error));
                            continue 'targets;
                        }
                    };
                    for key in keys {
                        if claims.len() == limit {
                            return Ok(claims);
                        }
                        if scanned == MAX_SCANNED {
                            tracing::warn!(
                                scanned,
                                found = claims.len(),
                                "idem: stopped listing old claims after scanning its limit of keys; claims among the keys not scanned are not listed"
                            );
                            return Ok(claims);
                        }
                        scanned += 1;
                        let claim = match self.held_claim(&mut connection, &prefix, key).await {
                            Ok(Some(claim)) => claim,
                            Ok(None) => continue,
                            Err(error) => {
                                tracing::warn!(%error, "could not read a claim while listing old claims; skipped");
                                continue;
                            }
                        };
                        if u64::try_from(claim.held_for.as_millis()).unwrap_or(u64::MAX) > age_ms {
                            claims.push(claim);
                        }
                    }
                    cursor = next;
                    if cursor == 0 {
                        break;
                    }
                }
            }
            match failures.pop() {
                Some(error) if failures.len() + 1 == targets.len() => Err(error),
                _ => Ok(claims),
            }
        })
    }

    fn append_step(
        &self,
        key: Key,
        token: Token,
        name: String,
        value: Vec<u8>,
        ttl: Duration,
    ) -> StoreFuture<'_, bool> {
        Box::pin(async move {
            let token = token.as_u128().to_be_bytes();
            let mut invocation = SCRIPTS.append_step.prepare_invoke();
            invocation
                .key(self.record_key(&key))
                .key(self.journal_key(&key))
                .arg(&token[..])
                .arg(name.as_bytes())
                .arg(value)
                .arg(millis(ttl));
            let answer = self.run_script("append_step", &invocation).await?;
            match as_int(&answer) {
                Some(n) => Ok(n == 1),
                None => Err(unexpected("append_step", &answer)),
            }
        })
    }

    fn epoch(&self, key: Key, token: Token, ttl: Duration) -> StoreFuture<'_, Option<u64>> {
        Box::pin(async move {
            let token = token.as_u128().to_be_bytes();
            let mut invocation = SCRIPTS.epoch.prepare_invoke();
            invocation
                .key(self.record_key(&key))
                .key(self.epoch_key(&key))
                .arg(&token[..])
                .arg(millis(ttl));
            let answer = self.run_script("epoch", &invocation).await?;
            match as_int(&answer) {
                Some(-1) => Ok(None),
                Some(epoch) => u64::try_from(epoch)
                    .map(Some)
                    .map_err(|_| unexpected("epoch", &answer)),
                None => Err(unexpected("epoch", &answer)),
            }
        })
    }

    fn steps(&self, key: Key) -> StoreFuture<'_, Vec<JournaledStep>> {
        Box::pin(async move {
            let mut command = redis::cmd("HGETALL");
            command.arg(self.journal_key(&key));
            let answer = self.query("steps", &command).await?;
            journal_steps(&answer)
        })
    }

    fn renew(&self, key: Key, token: Token, lease: Duration) -> StoreFuture<'_, bool> {
        Box::pin(async move {
            let token = token.as_u128().to_be_bytes();
            let deadline = deadline_after(lease).to_be_bytes();
            let value = self
                .invoke(
                    "renew",
                    &SCRIPTS.renew,
                    &key,
                    &[&token, &millis(lease), &deadline],
                )
                .await?;
            match as_int(&value) {
                Some(n) => Ok(n == 1),
                None => Err(unexpected("renew", &value)),
            }
        })
    }
}
