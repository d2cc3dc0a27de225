//! The PostgreSQL store (feature `postgres`, on sqlx): the store protocol on
//! one table, and a transactional mode that commits the record with the
//! caller's own writes.
//!
//! - [`PostgresStore`] implements the [`Store`] protocol on a table (see
//!   the schema below) and passes the conformance suite like the memory and
//!   Redis stores: a replayed hit is one statement that writes nothing (it
//!   reads the key's row, and calls the table's claim function only for a
//!   key that can be claimed; with that function, a replay even runs on a
//!   read-only session), a first run two. The store's own pool skips sqlx's ping
//!   before each statement for connections used within the last
//!   [`PING_AFTER_IDLE`], so that a statement is one round trip. Expiries
//!   come from the database's clock. Waiters in other
//!   processes are woken by `LISTEN/NOTIFY`, on a connection of the
//!   store's own outside its pool, and look again at least every second
//!   whatever they hear, so a missed notification (a listener reconnecting,
//!   PgBouncer in transaction mode, which does not carry `LISTEN`) costs a
//!   second, not the holder's lease; expired rows are purged in the
//!   background in bounded batches. A `release` that finds no claim of its
//!   token (the clearing of a `begin` that timed out, which may still be on
//!   its way on another pooled connection) leaves a tombstone: an expired
//!   row with an empty fingerprint that stops that `begin` from claiming
//!   when it arrives, purged 15 minutes after.
//!
//! Every schema and table name the store accepts (1 to 63 bytes) works. A
//! store on table `t` also names, in its schema, `t_steps`, `t_epoch`,
//! `t_expires_at`, `t_claimed` and the function `t_claim`: give no other
//! store's table one of those names, or the two stores would share an
//! object. A name of these that would pass PostgreSQL's 63 bytes is
//! `idem_`, 24 hex digits of a digest of the whole name, and the suffix
//! instead (`idem_…_steps`), and so is the `NOTIFY` channel
//! (`idem:schema.table`, or `idem:` and the digest). Two stores whose names
//! write one channel (schema `a.b` and table `c`, schema `a` and table
//! `b.c`) wake each other's waiters, which then find their own keys still
//! held and wait on: a wake-up too many, never a record of the other's.
//! - [`PostgresStore::run_in_transaction`] (and `#[idempotent(transaction =
//!   tx)]`) runs the body inside a transaction that also holds the claim and,
//!   at commit, the result: the body's writes and the record commit
//!   together, or neither does. See [`transaction`].
//!
//! # The table
//!
//! ```sql
//! CREATE TABLE idempotency_keys (
//!     key         bytea PRIMARY KEY,      -- the SHA-256 of name, scope and key value
//!     fingerprint bytea NOT NULL,         -- the SHA-256 of the arguments
//!     token       bytea NOT NULL,         -- the claim's holder, then its completer
//!     record      bytea,                  -- NULL while in progress; the encoded result once done
//!     stored_at   timestamptz,
//!     expires_at  timestamptz NOT NULL    -- the lease's end, then the TTL's end
//! );
//! CREATE INDEX idempotency_keys_expires_at ON idempotency_keys (expires_at);
//! CREATE INDEX idempotency_keys_claimed ON idempotency_keys (stored_at) WHERE record IS NULL;
//! CREATE TABLE idempotency_keys_steps (   -- the journals of multi-step calls
//!     key        bytea NOT NULL,
//!     name       text NOT NULL,
//!     seq        bigserial,
//!     value      bytea NOT NULL,
//!     expires_at timestamptz NOT NULL,
//!     PRIMARY KEY (key, name)
//! );
//! CREATE SEQUENCE idempotency_keys_epoch;  -- the fencing epochs of claims
//! -- The claim of a key that a read found absent, expired or claimed by the
//! -- caller's own token: `false` when another writer came first. Its text
//! -- names the table with its schema, quoted as here (a function whose text
//! -- differs but for white space, or that is declared otherwise, is not used).
//! CREATE FUNCTION "public"."idempotency_keys_claim"(bytea, bytea, bytea, bigint)
//! RETURNS boolean LANGUAGE plpgsql VOLATILE AS $idem$
//! BEGIN
//!     WITH current AS (
//!         SELECT fingerprint, token, record, expires_at FROM "public"."idempotency_keys" WHERE key = $1
//!     )
//!     INSERT INTO "public"."idempotency_keys" AS r (key, fingerprint, token, record, stored_at, expires_at)
//!     SELECT $1, $2, $3, NULL, now(), now() + $4::bigint * interval '1 millisecond'
//!     WHERE NOT EXISTS (
//!         SELECT 1 FROM current c WHERE c.expires_at > now()
//!         AND NOT (c.record IS NULL AND c.token = $3 AND c.fingerprint = $2)
//!     )
//!     ON CONFLICT (key) DO UPDATE SET
//!         fingerprint = EXCLUDED.fingerprint, token = EXCLUDED.token,
//!         record = NULL,
//!         stored_at = CASE WHEN r.expires_at <= now() THEN now() ELSE r.stored_at END,
//!         expires_at = EXCLUDED.expires_at
//!     WHERE (r.expires_at <= now()
//!             AND NOT (r.fingerprint = '' AND r.token = EXCLUDED.token))
//!         OR (r.record IS NULL AND r.token = EXCLUDED.token
//!             AND r.fingerprint = EXCLUDED.fingerprint);
//!     RETURN FOUND;
//! END
//! $idem$;
//! ```
//!
//! For a store of another schema or table, write its quoted names for
//! `"public"` and `"idempotency_keys"` (a name that would pass 63 bytes
//! with its suffix is derived, as above: migrating once as a role that may
//! create it is simpler).
//!
//! The function is optional. A store that finds it missing where its role
//! may not create it (tables an administrator made from an earlier
//! version's statements), that its role may not run (where functions are
//! not executable by `PUBLIC`: grant the role `EXECUTE` on it), or whose
//! text is not the one above warns and claims through one statement that
//! needs only the table: as correct, at about twice a plain read's cost on
//! the server for every replay, and not on a read-only session. A store
//! looks for the function, without a lock, when it migrates (or, one that
//! does not, at its first claim) and again at every
//! purge ([`PostgresStoreBuilder::purge_interval`]), one look at a time: a
//! function created, replaced or dropped since is taken or left then, and a
//! claim that finds it gone or refused leaves it at once. It warns once
//! when the function goes out of use, not at every call.
//!
//! A row whose fingerprint is empty is a tombstone: the trace of a `release`
//! that found no claim of its token (see above).
//!
//! The primary key serves every operation; the index on `expires_at` serves
//! the purge, and the partial index on claims in progress serves
//! [`claims_older_than`](crate::Idempotency::claims_older_than). The store
//! creates what is missing (`CREATE … IF NOT EXISTS` under an advisory lock,
//! so concurrent starts do not race; an index only when the catalog lacks
//! it, so a start does not wait for the writes of calls in flight) when it
//! connects, unless told not to ([`PostgresStoreBuilder::migrate`]);
//! [`PostgresStore::migrate`] does it on demand. The schema and table names
//! are configurable.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, Row};

use super::{
    Begin, Completion, HeldClaim, Inspection, JournaledStep, Limits, Record, Store, StoreFuture,
    Token, Watch,
};
use crate::error::{StoreError, StoreErrorKind};
use crate::key::{Fingerprint, Key};
use crate::store::connect::redact;

mod listen;
mod sql;
pub mod transaction;

use listen::Watchers;
use sql::Statements;

/// The default schema of the table.
pub const DEFAULT_SCHEMA: &str = "public";

/// The default table name.
pub const DEFAULT_TABLE: &str = "idempotency_keys";

/// The default time an operation may take before it fails with
/// [`StoreErrorKind::Timeout`]. A lease must be at least three times as
/// long.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);

/// The default time between two purges of expired rows.
pub const DEFAULT_PURGE_INTERVAL: Duration = Duration::from_secs(60);

/// The longest wait the store's builder takes (3650 days, as the longest
/// TTL): a longer `response_timeout`, `connect_timeout` or `purge_interval`
/// is that long.
pub const LONGEST_WAIT: Duration = Duration::from_secs(3650 * 86_400);

/// The oldest claim [`claims_older_than`](crate::Idempotency::claims_older_than)
/// looks for: an older `age` lists nothing, as on the other stores, instead
/// of a time PostgreSQL cannot count back to.
const OLDEST_CLAIM: Duration = Duration::from_secs(1000 * 365 * 86_400);

/// The default number of rows a purge deletes per statement.
pub const DEFAULT_PURGE_BATCH: u32 = 1000;

/// How long a connection of a store's own pool may have been idle and still
/// be handed out without a ping first. One idle for longer is pinged, and
/// replaced if it does not answer (the server restarted, or closed it for
/// idling); one used more recently was alive when it came back to the pool
/// (sqlx pings every connection then). A connection the server closed
/// within this window fails the statement that next takes it; from then on
/// every connection that was idle since before that failure is pinged too,
/// and a claim (the statement a call starts with) that failed so is sent
/// once more, on a live connection: a restart, which closes every
/// connection at once, fails no call made after it. (`complete`,
/// `release` and `renew` that fail so are retried by the engine, as after
/// any failure of theirs.)
pub const PING_AFTER_IDLE: Duration = Duration::from_millis(100);

/// When a statement on the store's own pool last failed for want of the
/// database: a connection idle since before then may have been closed
/// with the one that failed, and is pinged before use.
#[derive(Debug)]
struct Breaks {
    since: std::time::Instant,
    /// Microseconds from `since` to the last failure, plus one; 0 for none.
    last: AtomicU64,
}

impl Breaks {
    fn new() -> Self {
        Self {
            since: std::time::Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    /// A statement failed for want of the database, now.
    fn mark(&self) {
        let now = u64::try_from(self.since.elapsed().as_micros()).unwrap_or(u64::MAX - 1);
        self.last.fetch_max(now + 1, Ordering::Relaxed);
    }

    /// Whether a connection idle for `idle_for` went back to the pool
    /// before the last failure.
    fn idle_since_last(&self, idle_for: Duration) -> bool {
        match self.last.load(Ordering::Relaxed) {
            0 => false,
            last => {
                let since_last = self
                    .since
                    .elapsed()
                    .saturating_sub(Duration::from_micros(last - 1));
                idle_for >= since_last
            }
        }
    }
}

/// A [`Store`] on a PostgreSQL table.
///
/// ```no_run
/// # async fn demo() -> Result<(), idem_core::store::StoreError> {
/// use idem_core::{Idempotency, PostgresStore};
///
/// // By URL, with the defaults: table `public.idempotency_keys`, created if missing.
/// let idem = Idempotency::connect("postgres://app@db/payments").await?;
///
/// // Or on the service's own pool, with a table of its own.
/// # let pool: sqlx::PgPool = todo!();
/// let store = PostgresStore::with_pool(pool).schema("billing").table("idem").connect().await?;
/// let idem = Idempotency::new(store.clone());
/// # Ok(())
/// # }
/// ```
///
/// Clones share the pool, the listener and the purge task.
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    /// The failures that make the store's own pool ping connections idle
    /// since before them (`None` on a pool of the caller's).
    breaks: Option<Arc<Breaks>>,
    sql: Statements,
    response_timeout: Duration,
    purge_interval: Duration,
    purge_batch: u32,
    watchers: Arc<Watchers>,
    listening: AtomicBool,
    purging: AtomicBool,
    /// Whether the claim function is there to use, as far as the store
    /// knows (`FUNCTION_*`): replays then read without a data-modifying
    /// statement. Learnt by migrating, or by the first claim of a store
    /// that does not migrate; unusable when a claim found it missing or
    /// refused.
    claim_function: AtomicU8,
    /// Whether a look for the claim function is under way.
    looking: AtomicBool,
    /// Whether the store migrates, and so may create the claim function
    /// when a look finds it missing.
    migrates: bool,
    /// Transactional calls under way, so that same-key duplicates in this
    /// process wait for one of them without holding a connection each.
    flights: crate::flight::Flights,
    /// A store connected lazily creates its table on its first call that
    /// reaches the database (and the next call tries again if that fails).
    migrated: Option<tokio::sync::OnceCell<()>>,
}

enum Source {
    Url(String),
    Pool(PgPool),
}

/// Configures a [`PostgresStore`]; made by [`PostgresStore::builder`] or
/// [`PostgresStore::with_pool`].
pub struct PostgresStoreBuilder {
    source: Source,
    schema: String,
    table: String,
    response_timeout: Duration,
    connect_timeout: Duration,
    max_connections: u32,
    migrate: bool,
    purge_interval: Duration,
    purge_batch: u32,
}

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://…` or
    /// `postgresql://…`) with the default settings, creating the table if it
    /// is missing.
    ///
    /// # Errors
    /// [`StoreErrorKind::Config`] for a malformed URL or one of another
    /// scheme, [`StoreErrorKind::Unavailable`] when the database cannot be reached,
    /// [`StoreErrorKind::Other`] for what a reachable database refuses (an
    /// unknown database or role, a failed authentication, a migration the
    /// role may not make).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::builder(url).connect().await
    }

    /// Starts configuring a store on its own pool of connections to `url`.
    pub fn builder(url: impl Into<String>) -> PostgresStoreBuilder {
        PostgresStoreBuilder::new(Source::Url(url.into()))
    }

    /// Starts configuring a store on an existing pool, e.g. the service's
    /// own. The pool keeps its options: sqlx's default
    /// (`test_before_acquire(true)`) pings each connection before handing
    /// it out, a round trip more for every statement of idem's (the store's
    /// own pool pings only connections idle longer than
    /// [`PING_AFTER_IDLE`]).
    pub fn with_pool(pool: PgPool) -> PostgresStoreBuilder {
        PostgresStoreBuilder::new(Source::Pool(pool))
    }

    /// The pool the store runs on.
    #[must_use]
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// Creates the schema, the tables, the epoch sequence and the indexes
    /// that are missing, and only those. Safe to run from several processes
    /// at once, for one table or for several in one schema: migrations of a
    /// schema take turns on an advisory lock.
    ///
    /// Every object is looked up first, in one statement and without a
    /// lock when nothing is missing, so a role needs the
    /// privilege to create only what is missing: `CREATE` on the database
    /// for a missing schema, `CREATE` on the schema for a missing table or
    /// sequence, and ownership of the table for a missing index. Once every
    /// object exists (made by this method, or by an administrator from the
    /// statements in the [module docs](self)), it needs no privilege to
    /// create anything, and [`migrate(false)`](PostgresStoreBuilder::migrate)
    /// is not needed either.
    ///
    /// Then the claim function: used when it exists, is idem's and the
    /// role may run it; created (without the lock) when it is missing and
    /// the role may create it in the schema; otherwise left out with a
    /// warning, and the store claims through the statement that needs only
    /// the table (see the [module docs](self)). It never fails a
    /// migration, and the store looks again at every purge.
    ///
    /// # Errors
    /// The database's, e.g. when the role may not create what is missing.
    /// Nothing is kept of a failed migration, and a store connected with
    /// [`connect_lazy`](PostgresStoreBuilder::connect_lazy) tries it again
    /// at its next call.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        self.timed("migrate", async {
            let sql = &self.inner.sql;
            // Nothing missing, the usual case: one statement and no lock, so
            // that a migration held up elsewhere in the schema (an index
            // waiting for a table's writers) holds up no one else.
            if found(&sql.create, &self.inner.pool)
                .await?
                .into_iter()
                .all(|found| found)
            {
                return Ok(());
            }
            let mut tx = begin_on(&self.inner.pool, None).await?;
            // Migrations of a schema take turns: stores of different tables
            // create the schema they share. The table's own lock too, which
            // is all that earlier versions take.
            for lock in [&sql.migration_lock, &sql.channel] {
                sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
                    .bind(lock)
                    .execute(&mut *tx)
                    .await?;
            }
            let found = found(&sql.create, &mut *tx).await?;
            for (creation, found) in sql.create.iter().zip(found) {
                if !found {
                    sqlx::query(&creation.statement).execute(&mut *tx).await?;
                }
            }
            tx.commit().await
        })
        .await?;
        // A look the database does not answer leaves the state as it is:
        // the first claim of a store that has not looked yet looks again.
        if let Ok(checked) = self.timed("migrate", self.check_claim_function(true)).await {
            self.settle_claim_function(checked);
        }
        Ok(())
    }

    /// Looks the claim function up: usable when it exists, is the one this
    /// version creates and the role may run it; when `create`, it is
    /// created first where it is missing and the role may create it. Takes
    /// no lock and never fails a migration: without the function, claims
    /// go through the statement that needs only the table.
    async fn check_claim_function(&self, create: bool) -> Result<Checked, sqlx::Error> {
        let sql = &self.inner.sql;
        let check = || async {
            sqlx::query_as::<_, (bool, bool, bool, bool)>(sql.claim_function_check)
                .bind(&sql.claim_function.name)
                .bind(&sql.schema)
                .bind(&sql.claim_function.body)
                .fetch_one(&self.inner.pool)
                .await
        };
        let (executable, exists, ours, may_create) = check().await?;
        if executable && ours {
            return Ok(Checked::Usable);
        }
        Ok(Checked::Unusable(if exists && !ours {
            "a function of its name exists that is not the one this version of idem creates \
             (its text, or how it is declared, differs: see PostgresStore's docs)"
                .to_owned()
        } else if exists {
            "it exists, and this role may not run it (grant it EXECUTE)".to_owned()
        } else if !create {
            "it is missing (PostgresStore::migrate creates it)".to_owned()
        } else if !may_create {
            "it is missing, and this role may not create it in the schema".to_owned()
        } else {
            match sqlx::query(&sql.claim_function.create)
                .execute(&self.inner.pool)
                .await
            {
                Ok(_) => return Ok(Checked::Usable),
                // Another process may have created it meanwhile.
                Err(_) if matches!(check().await, Ok((true, _, true, _))) => {
                    return Ok(Checked::Usable);
                }
                Err(error) => format!("creating it failed: {error}"),
            }
        }))
    }

    /// Takes a look's answer as the claim function's state, telling an
    /// operator when the function comes into use or goes out of it (once
    /// per change, not per call).
    fn settle_claim_function(&self, checked: Checked) {
        let function = &self.inner.sql.claim_function.name;
        let (state, why) = match checked {
            Checked::Usable => (FUNCTION_USABLE, None),
            Checked::Unusable(why) => (FUNCTION_UNUSABLE, Some(why)),
        };
        let was = self.inner.claim_function.swap(state, Ordering::Relaxed);
        match why {
            None if was == FUNCTION_UNUSABLE => {
                tracing::info!(%function, "idem's claim function is in use again");
            }
            Some(why) if was != FUNCTION_UNUSABLE => tracing::warn!(
                %function,
                "idem's claim function is not usable ({why}); replays read through a heavier \
                 statement until it is"
            ),
            _ => {}
        }
    }

    /// Looks the claim function up, unless a look is under way: one look at
    /// a time, whoever asks (the first claim of a store that does not
    /// migrate, each purge). A store that migrates may create it. A look
    /// the database does not answer changes nothing, and is the caller's
    /// error.
    async fn look_for_claim_function(&self) -> Result<(), sqlx::Error> {
        if self.inner.looking.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        // Done however the look ends, cut short with its caller included.
        let _done = Clears(&self.inner.looking);
        let checked = self.check_claim_function(self.inner.migrates).await?;
        self.settle_claim_function(checked);
        Ok(())
    }

    /// Deletes expired rows now, in batches, and answers how many. The store
    /// does this by itself every [`PostgresStoreBuilder::purge_interval`].
    ///
    /// # Errors
    /// The database's.
    pub async fn purge(&self) -> Result<u64, StoreError> {
        let mut deleted = 0;
        loop {
            let batch = self
                .timed("purge", async {
                    sqlx::query(&self.inner.sql.purge)
                        .bind(i64::from(self.inner.purge_batch))
                        .execute(&self.inner.pool)
                        .await
                })
                .await?
                .rows_affected();
            deleted += batch;
            if batch < u64::from(self.inner.purge_batch) {
                break;
            }
        }
        loop {
            let batch = self
                .timed("purge", async {
                    sqlx::query(&self.inner.sql.purge_steps)
                        .bind(i64::from(self.inner.purge_batch))
                        .execute(&self.inner.pool)
                        .await
                })
                .await?
                .rows_affected();
            deleted += batch;
            if batch < u64::from(self.inner.purge_batch) {
                return Ok(deleted);
            }
        }
    }

    /// `begin`'s statements: claim-or-read, asked again when a concurrent
    /// writer came between its read and its claim.
    async fn claim_or_read(
        &self,
        key: Key,
        fingerprint: Fingerprint,
        token: Token,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        if self.inner.claim_function.load(Ordering::Relaxed) == FUNCTION_UNKNOWN {
            // A store that does not migrate looks at its first claim (the
            // claims that come meanwhile go through the other statement).
            // The database not answering the look is this claim's error,
            // as it would be the claim's.
            self.look_for_claim_function()
                .await
                .map_err(|e| store_error("begin", &e))?;
        }
        for _ in 0..3 {
            if self.inner.claim_function.load(Ordering::Relaxed) == FUNCTION_USABLE {
                match self.read_or_claim(key, fingerprint, token, lease).await? {
                    ReadOrClaim::Answer(begin) => return Ok(begin),
                    ReadOrClaim::Raced => continue,
                    ReadOrClaim::NoFunction => {}
                }
            }
            let token = token_bytes(token);
            let row = self
                .on_a_live_connection(|| {
                    sqlx::query::<Postgres>(&self.inner.sql.begin)
                        .bind(key.digest().as_slice())
                        .bind(fingerprint.digest().as_slice())
                        .bind(token.as_slice())
                        .bind(millis(lease))
                        .fetch_optional(&self.inner.pool)
                })
                .await
                .map_err(|e| store_error("begin", &e))?;
            if let Some(row) = row {
                return begin_answer(&row, fingerprint, lease);
            }
        }
        Ok(Begin::InProgress {
            retry_after: Duration::from_millis(10),
        })
    }

    /// Claim-or-read through the claim function: a read, and the claim
    /// only for a key that can be claimed.
    async fn read_or_claim(
        &self,
        key: Key,
        fingerprint: Fingerprint,
        token: Token,
        lease: Duration,
    ) -> Result<ReadOrClaim, StoreError> {
        let token = token_bytes(token);
        let row = match self
            .on_a_live_connection(|| {
                sqlx::query::<Postgres>(&self.inner.sql.read_or_claim)
                    .bind(key.digest().as_slice())
                    .bind(fingerprint.digest().as_slice())
                    .bind(token.as_slice())
                    .bind(millis(lease))
                    .fetch_one(&self.inner.pool)
            })
            .await
        {
            Ok(row) => row,
            // `undefined_function` or `insufficient_privilege` (refused as
            // the statement started, before it ran anything; a table the
            // role may not read refuses the other statement alike), or
            // `feature_not_supported` (a function altered since it was
            // looked up, e.g. no longer volatile, whose insert was refused).
            // Nothing was written: the other statement claims instead, and
            // the next look may take the function again.
            Err(sqlx::Error::Database(error))
                if matches!(error.code().as_deref(), Some("42883" | "42501" | "0A000")) =>
            {
                self.settle_claim_function(Checked::Unusable(error.to_string()));
                return Ok(ReadOrClaim::NoFunction);
            }
            Err(error) => return Err(store_error("begin", &error)),
        };
        let corrupt = |e: sqlx::Error| store_error("begin", &e);
        match row.try_get::<Option<bool>, _>("claimed").map_err(corrupt)? {
            Some(true) => Ok(ReadOrClaim::Answer(Begin::Claimed)),
            Some(false) => Ok(ReadOrClaim::Raced),
            None => held(&row, fingerprint, lease).map(ReadOrClaim::Answer),
        }
    }

    /// Runs a claim's statement (`statement` makes it), once more when it
    /// found its connection closed by the server: a restart or an
    /// operator closes every connection at once, also those the pool hands
    /// out without a ping, and the calls that took one would each fail. The
    /// failure is noted first, so that the pool pings the connections idle
    /// since before it ([`Breaks`]) and the second try gets a live one. A
    /// claim is safe to send twice: the same token finds its own claim.
    async fn on_a_live_connection<T, F>(&self, statement: impl Fn() -> F) -> Result<T, sqlx::Error>
    where
        F: Future<Output = Result<T, sqlx::Error>>,
    {
        match statement().await {
            Err(error) if connection_closed(&error) => {
                if let Some(breaks) = &self.inner.breaks {
                    breaks.mark();
                }
                tracing::debug!(%error, "a claim found its connection closed; trying once more");
                statement().await
            }
            answered => answered,
        }
    }

    /// Terminates the session of a transactional call holding `key` (its
    /// advisory lock), if any: its transaction rolls back. Whether one was.
    async fn end_transactional_holder(&self, key: Key) -> Result<bool, StoreError> {
        Ok(self
            .timed("forget", async {
                sqlx::query_scalar::<_, Option<bool>>(&format!(
                    "SELECT bool_or(pg_terminate_backend(l.pid)) {HOLDER_LOCK}"
                ))
                .bind(transaction::lock_id(self, key))
                .fetch_one(&self.inner.pool)
                .await
            })
            .await?
            .unwrap_or(false))
    }

    /// Runs `query` within the response timeout, mapping its failure.
    async fn timed<T>(
        &self,
        op: &'static str,
        query: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, StoreError> {
        self.within(op, async { query.await.map_err(|e| store_error(op, &e)) })
            .await
    }

    /// Runs `work` (however many statements) within the response timeout.
    async fn within<T>(
        &self,
        op: &'static str,
        work: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let result = match tokio::time::timeout(self.inner.response_timeout, work).await {
            Ok(result) => result,
            Err(_elapsed) => Err(StoreError::new(
                StoreErrorKind::Timeout,
                format!(
                    "postgres {op} took longer than {:?}",
                    self.inner.response_timeout
                ),
            )),
        };
        if let (Err(error), Some(breaks)) = (&result, &self.inner.breaks)
            && matches!(
                error.kind(),
                StoreErrorKind::Unavailable | StoreErrorKind::Timeout
            )
        {
            breaks.mark();
        }
        result
    }

    /// A first connection, so that `connect` fails when the database cannot
    /// be reached.
    async fn connected(&self) -> Result<(), StoreError> {
        self.inner
            .pool
            .acquire()
            .await
            .map(drop)
            .map_err(|e| store_error("connect", &e))
    }

    /// For a lazily connected store: the table, created on the first call
    /// that reaches the database.
    pub(crate) async fn ready(&self) -> Result<(), StoreError> {
        match &self.inner.migrated {
            Some(migrated) if migrated.get().is_some() => Ok(()),
            // Boxed: migrating is rare and its future large, and every
            // operation's future would otherwise carry it.
            Some(migrated) => Box::pin(migrated.get_or_try_init(|| self.migrate()))
                .await
                .copied(),
            None => Ok(()),
        }
    }

    /// How long the session holding `key`'s transactional lock has been in
    /// its transaction, if one holds it.
    async fn transactional_holder(&self, key: Key) -> Result<Option<Duration>, StoreError> {
        let held = self
            .timed("inspect", async {
                sqlx::query_scalar::<_, Option<i64>>(&format!(
                    "SELECT floor(extract(epoch FROM now() - a.xact_start) * 1000)::bigint \
                     {HOLDER_LOCK} LIMIT 1"
                ))
                .bind(transaction::lock_id(self, key))
                .fetch_optional(&self.inner.pool)
                .await
            })
            .await?;
        Ok(held
            .map(|ms| Duration::from_millis(ms.and_then(|ms| u64::try_from(ms).ok()).unwrap_or(0))))
    }

    async fn in_progress(&self, key: Key) -> Result<bool, StoreError> {
        self.timed("watch", async {
            sqlx::query_scalar::<_, bool>(&self.inner.sql.in_progress)
                .bind(key.digest().as_slice())
                .fetch_one(&self.inner.pool)
                .await
        })
        .await
    }

    /// Starts the listener and the purge task on the current runtime, once.
    fn ensure_background(&self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if !self.inner.purging.swap(true, Ordering::AcqRel) {
            let store = Arc::downgrade(&self.inner);
            runtime.spawn(purge_forever(store, self.inner.purge_interval));
        }
    }

    fn ensure_listener(&self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if !self.inner.listening.swap(true, Ordering::AcqRel) {
            // A connection of its own, outside the store's pool: the
            // listener holds it for good, and must not starve the calls.
            let options = self.inner.pool.connect_options().as_ref().clone();
            let own = sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .min_connections(0)
                .connect_lazy_with(options);
            runtime.spawn(listen::listen(
                own,
                self.inner.sql.channel.clone(),
                Arc::downgrade(&self.inner.watchers),
            ));
        }
    }
}

async fn purge_forever(store: Weak<Inner>, every: Duration) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(inner) = store.upgrade() else {
            return;
        };
        let store = PostgresStore { inner };
        // A function created, replaced or dropped since the last look is
        // taken or left now.
        if let Err(error) = store
            .timed("claim function lookup", store.look_for_claim_function())
            .await
        {
            tracing::debug!(%error, "could not look for idem's claim function; retrying later");
        }
        if let Err(error) = store.purge().await {
            tracing::debug!(%error, "could not purge expired idempotency records; retrying later");
        }
    }
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("channel", &self.inner.sql.channel)
            .field("response_timeout", &self.inner.response_timeout)
            .finish_non_exhaustive()
    }
}

impl PostgresStoreBuilder {
    fn new(source: Source) -> Self {
        Self {
            source,
            schema: DEFAULT_SCHEMA.to_owned(),
            table: DEFAULT_TABLE.to_owned(),
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            connect_timeout: DEFAULT_RESPONSE_TIMEOUT,
            max_connections: 10,
            migrate: true,
            purge_interval: DEFAULT_PURGE_INTERVAL,
            purge_batch: DEFAULT_PURGE_BATCH,
        }
    }

    /// The table's schema. Default [`DEFAULT_SCHEMA`].
    #[must_use]
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// The table's name. Default [`DEFAULT_TABLE`].
    #[must_use]
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// How long an operation may take. Default
    /// [`DEFAULT_RESPONSE_TIMEOUT`]; leases must be at least three times as
    /// long; longer than [`LONGEST_WAIT`] is that long.
    #[must_use]
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout.min(LONGEST_WAIT);
        self
    }

    /// How long getting a connection from the pool may take (only for a
    /// store with a pool of its own). Default one second; longer than
    /// [`LONGEST_WAIT`] (3650 days) is that long.
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout.min(LONGEST_WAIT);
        self
    }

    /// The size of the store's own pool. Default 10; 0 is 1.
    #[must_use]
    pub fn max_connections(mut self, connections: u32) -> Self {
        self.max_connections = connections.max(1);
        self
    }

    /// Whether connecting creates the table if it is missing. Default
    /// `true`; turn it off where the schema is managed elsewhere (the
    /// statements are in the module docs).
    #[must_use]
    pub fn migrate(mut self, migrate: bool) -> Self {
        self.migrate = migrate;
        self
    }

    /// How often expired rows are purged. Default
    /// [`DEFAULT_PURGE_INTERVAL`]; at least 10 ms, and at most
    /// [`LONGEST_WAIT`] (3650 days: `Duration::MAX` purges never, in
    /// practice).
    #[must_use]
    pub fn purge_interval(mut self, interval: Duration) -> Self {
        self.purge_interval = interval.clamp(Duration::from_millis(10), LONGEST_WAIT);
        self
    }

    /// How many rows one purge statement deletes at most. Default
    /// [`DEFAULT_PURGE_BATCH`]; 0 is 1.
    #[must_use]
    pub fn purge_batch(mut self, rows: u32) -> Self {
        self.purge_batch = rows.max(1);
        self
    }

    /// Connects (or takes the pool), and creates the table unless told not
    /// to.
    ///
    /// # Errors
    /// [`StoreErrorKind::Config`] for a malformed URL, one of another scheme
    /// than `postgres://` or `postgresql://`, a malformed table name or a
    /// zero timeout, [`StoreErrorKind::Unavailable`] when the database cannot be reached,
    /// [`StoreErrorKind::Other`] for what a reachable database refuses (an
    /// unknown database or role, a failed authentication, a migration the
    /// role may not make).
    pub async fn connect(self) -> Result<PostgresStore, StoreError> {
        let migrate = self.migrate;
        let store = self.build(false)?;
        store.connected().await?;
        if migrate {
            store.migrate().await?;
        }
        Ok(store)
    }

    /// A store that connects on its first call instead of now, so that a
    /// service can start while the database is down. Until the database
    /// answers (and, unless told not to, the table exists), every call fails
    /// closed with [`StoreErrorKind::Unavailable`] or the database's error
    /// (the body does not run), or with [`StoreErrorKind::Timeout`] when the
    /// [response timeout](Self::response_timeout) runs out before the
    /// [connect timeout](Self::connect_timeout) (sqlx tries to connect
    /// again until the latter), and the next call tries again: the table is
    /// created by the first call that reaches the database.
    ///
    /// Call it inside a tokio runtime (the pool's upkeep runs on it).
    ///
    /// # Errors
    /// [`StoreErrorKind::Config`] for a malformed URL, one of another scheme
    /// than `postgres://` or `postgresql://`, a malformed table name or a
    /// zero timeout, or when called outside a tokio runtime.
    pub fn connect_lazy(self) -> Result<PostgresStore, StoreError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(StoreError::new(
                StoreErrorKind::Config,
                "PostgresStore::connect_lazy needs a tokio runtime: call it inside one",
            ));
        }
        self.build(true)
    }

    fn build(self, lazy: bool) -> Result<PostgresStore, StoreError> {
        for (setting, value) in [
            ("response_timeout", self.response_timeout),
            ("connect_timeout", self.connect_timeout),
        ] {
            if value.is_zero() {
                return Err(StoreError::new(
                    StoreErrorKind::Config,
                    format!("the PostgreSQL store's `{setting}` must be longer than zero"),
                ));
            }
        }
        let sql = Statements::new(&self.schema, &self.table)?;
        let (pool, breaks) = match self.source {
            Source::Pool(pool) => (pool, None),
            Source::Url(url) => {
                // sqlx reads the host, port and credentials of any URL and
                // ignores its scheme: a Redis URL given here by mistake would
                // be dialled as PostgreSQL.
                // (sqlx trims surrounding whitespace, as from a file or an
                // environment variable; so does this check.)
                let scheme = url.trim_start().split_once("://").map(|(scheme, _)| scheme);
                if !scheme.is_some_and(|s| {
                    s.eq_ignore_ascii_case("postgres") || s.eq_ignore_ascii_case("postgresql")
                }) {
                    return Err(StoreError::new(
                        StoreErrorKind::Config,
                        format!(
                            "`{}` is not a PostgreSQL URL: expected `postgres://…` or \
                             `postgresql://…`",
                            redact(&url)
                        ),
                    ));
                }
                let options: sqlx::postgres::PgConnectOptions = url.parse().map_err(|e| {
                    StoreError::new(
                        StoreErrorKind::Config,
                        format!("`{}` is not a PostgreSQL URL: {e}", redact(&url)),
                    )
                })?;
                let breaks = Arc::new(Breaks::new());
                let pool = own_pool(
                    options,
                    self.max_connections,
                    self.connect_timeout,
                    Arc::clone(&breaks),
                );
                (pool, Some(breaks))
            }
        };
        Ok(PostgresStore {
            inner: Arc::new(Inner {
                pool,
                breaks,
                sql,
                response_timeout: self.response_timeout,
                purge_interval: self.purge_interval,
                purge_batch: self.purge_batch,
                watchers: Arc::default(),
                listening: AtomicBool::new(false),
                claim_function: AtomicU8::new(FUNCTION_UNKNOWN),
                looking: AtomicBool::new(false),
                migrates: self.migrate,
                purging: AtomicBool::new(false),
                flights: crate::flight::Flights::default(),
                migrated: (lazy && self.migrate).then(tokio::sync::OnceCell::new),
            }),
        })
    }
}

/// The store's own pool. sqlx pings every connection as it goes back to the
/// pool, and by default again before handing it out: a round trip before
/// every statement, which doubled a replayed hit. Here a connection is
/// pinged before use only when it has been idle for more than
/// [`PING_AFTER_IDLE`], or since before a statement failed for want of the
/// database (`breaks`).
fn own_pool(
    options: sqlx::postgres::PgConnectOptions,
    max_connections: u32,
    acquire_timeout: Duration,
    breaks: Arc<Breaks>,
) -> PgPool {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(acquire_timeout)
        .test_before_acquire(false)
        .before_acquire(move |connection, meta| {
            let breaks = Arc::clone(&breaks);
            Box::pin(async move {
                if meta.idle_for <= PING_AFTER_IDLE && !breaks.idle_since_last(meta.idle_for) {
                    return Ok(true);
                }
                // A connection that does not answer is closed, and the pool
                // hands out another.
                Ok(sqlx::Connection::ping(connection).await.is_ok())
            })
        })
        .connect_lazy_with(options)
}

/// Whether `error` says the statement's connection was closed under it
/// (the server went away, or ended the session), rather than that the
/// statement failed.
fn connection_closed(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // admin_shutdown, crash_shutdown, and connection exceptions.
            matches!(code.as_ref(), "57P01" | "57P02") || code.starts_with("08")
        }),
        _ => false,
    }
}

/// A sqlx failure as a store error of the right kind.
pub(crate) fn store_error(op: &'static str, error: &sqlx::Error) -> StoreError {
    let kind = match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => StoreErrorKind::Unavailable,
        sqlx::Error::Configuration(_) => StoreErrorKind::Config,
        sqlx::Error::Database(db) => match db.code().as_deref() {
            // Connection exceptions, shutdowns, a database starting up.
            Some(code) if code.starts_with("08") || code.starts_with("57P") => {
                StoreErrorKind::Unavailable
            }
            Some("53300") => StoreErrorKind::Unavailable,
            // Disk full, out of memory, a value over a limit: the write was refused.
            Some("53100" | "53200" | "54000") => StoreErrorKind::Full,
            Some("42P01" | "3F000") => StoreErrorKind::Config,
            _ => StoreErrorKind::Other,
        },
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => StoreErrorKind::Corrupt,
        _ => StoreErrorKind::Other,
    };
    let message = match kind {
        StoreErrorKind::Config if matches!(error, sqlx::Error::Database(_)) => format!(
            "postgres {op}: the idempotency table or schema is missing; connect with \
             migrate(true) or run PostgresStore::migrate"
        ),
        _ => format!("postgres {op} failed"),
    };
    StoreError::new(kind, message).with_source(SqlxError(error.to_string()))
}

/// A sqlx error, as text: sqlx errors are not `Clone`.
#[derive(Debug)]
struct SqlxError(String);

impl std::fmt::Display for SqlxError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SqlxError {}

/// The session that holds a key's transactional lock (`$1`, as
/// [`transaction::lock_id`] makes it): `pg_advisory_xact_lock(bigint)` is
/// listed with the high 32 bits as `classid`, the low as `objid`. Only a
/// session that claimed the key (its transaction wrote, so it has an id)
/// holds it as its call's holder: a replay or a waiter takes the lock for
/// a moment too, before it reads the key's record, and writes nothing.
const HOLDER_LOCK: &str = "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
     WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
     AND a.backend_xid IS NOT NULL \
     AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
     AND l.classid = (($1::bigint >> 32) & 4294967295)::oid \
     AND l.objid = ($1::bigint & 4294967295)::oid";

/// The longest a waiter relies on `NOTIFY` before it looks at the key again.
const WATCH_FALLBACK: Duration = Duration::from_secs(1);

/// Begins a transaction on `pool` with `statement` (a plain `BEGIN` when
/// `None`).
///
/// Waiting for a connection stays in the caller's future: cut off there, it
/// just ends. The `BEGIN` itself, cut off on its way (a timeout, a dropped
/// call), goes on in a task of its own, whose transaction is then rolled
/// back as it is dropped: sqlx rolls back only a transaction whose `BEGIN`
/// it saw answered, and would otherwise return the connection to the pool
/// inside it, where the next user's statements would run uncommitted (and a
/// transactional call's advisory lock would stay taken).
async fn begin_on(
    pool: &PgPool,
    statement: Option<String>,
) -> Result<sqlx::Transaction<'static, Postgres>, sqlx::Error> {
    let connection = pool.acquire().await?;
    // What `Pool::begin_with` does once it holds a connection.
    let opening = crate::finish::FinishOnDrop::new(
        "a PostgreSQL BEGIN",
        sqlx::Transaction::begin(connection, statement.map(Into::into)),
    );
    opening
        .await
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Whether each of `creations` exists, looked up in one statement.
async fn found<'c>(
    creations: &[sql::Creation],
    executor: impl sqlx::PgExecutor<'c>,
) -> Result<Vec<bool>, sqlx::Error> {
    let lookups: Vec<String> = (1..=creations.len())
        .zip(creations)
        .map(|(n, creation)| format!("{}(${n}) IS NOT NULL", creation.lookup))
        .collect();
    let lookup = format!("SELECT {}", lookups.join(", "));
    let row = creations
        .iter()
        .fold(sqlx::query(&lookup), |query, creation| {
            query.bind(&creation.name)
        })
        .fetch_one(executor)
        .await?;
    (0..creations.len()).map(|n| row.try_get(n)).collect()
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis())
        .unwrap_or(i64::MAX)
        .max(1)
}

fn token_bytes(token: Token) -> [u8; 16] {
    token.as_u128().to_be_bytes()
}

/// The claim function's state, as far as a store knows.
const FUNCTION_UNKNOWN: u8 = 0;
const FUNCTION_USABLE: u8 = 1;
const FUNCTION_UNUSABLE: u8 = 2;

/// Clears a flag when dropped.
struct Clears<'a>(&'a AtomicBool);

impl Drop for Clears<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// What a look for the claim function found.
enum Checked {
    Usable,
    Unusable(String),
}

/// What `read_or_claim` answered.
enum ReadOrClaim {
    Answer(Begin),
    /// A concurrent writer came between the read and the claim.
    Raced,
    /// The claim function is missing: claim with the statement that needs
    /// only the table.
    NoFunction,
}

/// Reads the row of a claim-or-read statement.
fn begin_answer(
    row: &PgRow,
    fingerprint: Fingerprint,
    lease: Duration,
) -> Result<Begin, StoreError> {
    let corrupt = |e: sqlx::Error| store_error("begin", &e);
    if row.try_get::<bool, _>("claimed").map_err(corrupt)? {
        return Ok(Begin::Claimed);
    }
    held(row, fingerprint, lease)
}

/// What holds a key, from the `fingerprint`, `record` and `left_ms` of a
/// claim-or-read's row: a record to replay, another's claim, or a mismatch.
fn held(row: &PgRow, fingerprint: Fingerprint, lease: Duration) -> Result<Begin, StoreError> {
    let corrupt = |e: sqlx::Error| store_error("begin", &e);
    let held: Vec<u8> = row.try_get("fingerprint").map_err(corrupt)?;
    if held != fingerprint.digest() {
        return Ok(Begin::Mismatch);
    }
    if let Some(record) = row
        .try_get::<Option<Vec<u8>>, _>("record")
        .map_err(corrupt)?
    {
        return Ok(Begin::Completed(Record::decode(record)?));
    }
    let left: i64 = row
        .try_get::<Option<i64>, _>("left_ms")
        .map_err(corrupt)?
        .unwrap_or(1);
    Ok(Begin::InProgress {
        retry_after: Duration::from_millis(u64::try_from(left).unwrap_or(1))
            .clamp(Duration::from_millis(1), lease),
    })
}

#[diagnostic::do_not_recommend]
impl Store for PostgresStore {
    fn begin(
        &self,
        key: Key,
        fingerprint: Fingerprint,
        token: Token,
        lease: Duration,
    ) -> StoreFuture<'_, Begin> {
        self.ensure_background();
        Box::pin(async move {
            self.ready().await?;
            // One deadline for the whole operation, however many statements
            // it takes.
            self.within("begin", self.claim_or_read(key, fingerprint, token, lease))
                .await
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
            let stored = self
                .timed("complete", async {
                    let updated = sqlx::query(&self.inner.sql.complete)
                        .bind(key.digest().as_slice())
                        .bind(token_bytes(token).as_slice())
                        .bind(record.encode().as_ref())
                        .bind(millis(ttl))
                        .bind(&self.inner.sql.channel)
                        .execute(&self.inner.pool)
                        .await?
                        .rows_affected();
                    if updated > 0 {
                        return Ok(true);
                    }
                    // Nothing to update: this token's earlier `complete`
                    // (whose answer was lost) stored it, or the claim was
                    // lost.
                    sqlx::query_scalar::<_, bool>(&self.inner.sql.completed_earlier)
                        .bind(key.digest().as_slice())
                        .bind(token_bytes(token).as_slice())
                        .fetch_one(&self.inner.pool)
                        .await
                })
                .await?;
            Ok(if stored {
                Completion::Stored
            } else {
                Completion::Lost
            })
        })
    }

    fn release(&self, key: Key, token: Token) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            self.timed("release", async {
                sqlx::query_scalar::<_, i64>(&self.inner.sql.release)
                    .bind(key.digest().as_slice())
                    .bind(token_bytes(token).as_slice())
                    .bind(&self.inner.sql.channel)
                    .fetch_one(&self.inner.pool)
                    .await
            })
            .await
            .map(drop)
        })
    }

    fn renew(&self, key: Key, token: Token, lease: Duration) -> StoreFuture<'_, bool> {
        Box::pin(async move {
            let renewed = self
                .timed("renew", async {
                    sqlx::query(&self.inner.sql.renew)
                        .bind(key.digest().as_slice())
                        .bind(token_bytes(token).as_slice())
                        .bind(millis(lease))
                        .execute(&self.inner.pool)
                        .await
                })
                .await?;
            Ok(renewed.rows_affected() == 1)
        })
    }

    fn watch(&self, key: Key) -> Option<Watch> {
        self.ensure_listener();
        let notify = self.inner.watchers.register(key);
        let mut woken = Box::pin(notify.notified_owned());
        // Registered before the check below: a change after it is notified,
        // a change before it is seen by the check.
        woken.as_mut().enable();
        let store = self.clone();
        Some(Box::pin(async move {
            if let Ok(false) = store.in_progress(key).await {
                return;
            }
            // A notification can be missed (the listener not yet listening,
            // reconnecting, or behind a pooler that drops `LISTEN`): the
            // waiter looks again after at most a second, as on Redis.
            let _ = tokio::time::timeout(WATCH_FALLBACK, woken).await;
        }))
    }

    fn limits(&self) -> Limits {
        Limits::with_response_timeout(self.inner.response_timeout)
    }

    fn inspect(&self, key: Key) -> StoreFuture<'_, Inspection> {
        Box::pin(async move {
            self.ready().await?;
            let row = self
                .timed("inspect", async {
                    sqlx::query::<Postgres>(&self.inner.sql.inspect)
                        .bind(key.digest().as_slice())
                        .fetch_optional(&self.inner.pool)
                        .await
                })
                .await?;
            let Some(row) = row else {
                // A transactional claim is a row not yet committed, which no
                // other session sees: its holder holds the key's lock.
                return Ok(match self.transactional_holder(key).await? {
                    Some(held_for) => Inspection::InProgress {
                        fingerprint: Fingerprint::UNCHECKED,
                        expires_in: Duration::ZERO,
                        held_for: Some(held_for),
                    },
                    None => Inspection::Absent,
                });
            };
            let corrupt = |e: sqlx::Error| store_error("inspect", &e);
            let fingerprint =
                fingerprint_of(&row.try_get::<Vec<u8>, _>("fingerprint").map_err(corrupt)?)?;
            let expires_in = ms(row.try_get::<Option<i64>, _>("left_ms").map_err(corrupt)?);
            let age = row
                .try_get::<Option<i64>, _>("age_ms")
                .map_err(corrupt)?
                .map(|a| ms(Some(a)));
            Ok(
                match row
                    .try_get::<Option<Vec<u8>>, _>("record")
                    .map_err(corrupt)?
                {
                    None => Inspection::InProgress {
                        fingerprint,
                        expires_in,
                        held_for: age,
                    },
                    Some(record) => {
                        let record = Record::decode(record)?;
                        let stored_at = row
                            .try_get::<Option<f64>, _>("stored_at")
                            .map_err(corrupt)?
                            .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
                            .and_then(|since| std::time::UNIX_EPOCH.checked_add(since));
                        Inspection::Completed {
                            outcome: record.outcome(),
                            fingerprint,
                            stored_at,
                            expires_in,
                            size: record.payload().len(),
                        }
                    }
                },
            )
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
            self.ready().await?;
            self.timed("append_step", async {
                sqlx::query_scalar::<_, bool>(&self.inner.sql.append_step)
                    .bind(key.digest().as_slice())
                    .bind(token_bytes(token).as_slice())
                    .bind(&name)
                    .bind(&value)
                    .bind(millis(ttl))
                    .fetch_one(&self.inner.pool)
                    .await
            })
            .await
        })
    }

    fn steps(&self, key: Key) -> StoreFuture<'_, Vec<JournaledStep>> {
        Box::pin(async move {
            self.ready().await?;
            let rows = self
                .timed("steps", async {
                    sqlx::query_as::<_, (String, Vec<u8>)>(&self.inner.sql.steps)
                        .bind(key.digest().as_slice())
                        .fetch_all(&self.inner.pool)
                        .await
                })
                .await?;
            Ok(rows
                .into_iter()
                .map(|(name, value)| JournaledStep::new(name, value))
                .collect())
        })
    }

    fn epoch(&self, key: Key, token: Token, ttl: Duration) -> StoreFuture<'_, Option<u64>> {
        // The sequence is the database's: epochs outlive every row.
        let _ = ttl;
        Box::pin(async move {
            self.ready().await?;
            let epoch = self
                .timed("epoch", async {
                    sqlx::query_scalar::<_, i64>(&self.inner.sql.epoch)
                        .bind(key.digest().as_slice())
                        .bind(token_bytes(token).as_slice())
                        .fetch_optional(&self.inner.pool)
                        .await
                })
                .await?;
            Ok(epoch.and_then(|epoch| u64::try_from(epoch).ok()))
        })
    }

    fn forget(&self, key: Key) -> StoreFuture<'_, bool> {
        Box::pin(async move {
            // A transactional call under way in this process may have read
            // the record before it was deleted: no later call joins it, even
            // when this forget is cut off after its delete.
            let _vacating = self.inner.flights.vacating(key);
            self.ready().await?;
            // A transactional holder is ended first: its session is
            // terminated, which rolls its transaction back (its writes with
            // it) and frees the key's row, which its claim may have locked.
            // The delete does not wait for a row lock (a holder that claimed
            // meanwhile, or one still ending): left waiting after its caller
            // gave up, it would delete the record that holder commits.
            let deadline = tokio::time::Instant::now() + self.inner.response_timeout;
            let mut ended = false;
            loop {
                ended |= self.end_transactional_holder(key).await?;
                let deleted = self
                    .timed("forget", async {
                        Ok(sqlx::query_scalar::<_, bool>(&self.inner.sql.forget)
                            .bind(key.digest().as_slice())
                            .bind(&self.inner.sql.channel)
                            .fetch_optional(&self.inner.pool)
                            .await)
                    })
                    .await?;
                match deleted {
                    Ok(live) => return Ok(live.unwrap_or(false) || ended),
                    Err(error)
                        if transaction::lock_timed_out(&error)
                            && tokio::time::Instant::now() < deadline =>
                    {
                        tracing::debug!(%key, "forget found the key's row locked; ending its holder again");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Err(error) => return Err(store_error("forget", &error)),
                }
            }
        })
    }

    fn claims_older_than(&self, age: Duration, limit: usize) -> StoreFuture<'_, Vec<HeldClaim>> {
        Box::pin(async move {
            if age > OLDEST_CLAIM {
                return Ok(Vec::new());
            }
            self.ready().await?;
            let rows = self
                .timed("claims_older_than", async {
                    sqlx::query::<Postgres>(&self.inner.sql.claims_older_than)
                        .bind(i64::try_from(age.as_millis()).unwrap_or(i64::MAX))
                        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                        .fetch_all(&self.inner.pool)
                        .await
                })
                .await?;
            let corrupt = |e: sqlx::Error| store_error("claims_older_than", &e);
            rows.iter()
                .map(|row| {
                    let key: Vec<u8> = row.try_get("key").map_err(corrupt)?;
                    let key = <[u8; 32]>::try_from(key.as_slice()).map_err(|_| {
                        StoreError::new(
                            StoreErrorKind::Corrupt,
                            "a key row is not a 32-byte digest",
                        )
                    })?;
                    Ok(HeldClaim::new(
                        Key::from_digest(key),
                        fingerprint_of(
                            &row.try_get::<Vec<u8>, _>("fingerprint").map_err(corrupt)?,
                        )?,
                        ms(row.try_get::<Option<i64>, _>("age_ms").map_err(corrupt)?),
                        ms(row.try_get::<Option<i64>, _>("left_ms").map_err(corrupt)?),
                    ))
                })
                .collect()
        })
    }
}

/// A non-negative count of milliseconds, or zero.
fn ms(millis: Option<i64>) -> Duration {
    Duration::from_millis(millis.unwrap_or(0).max(0).unsigned_abs())
}

fn fingerprint_of(bytes: &[u8]) -> Result<Fingerprint, StoreError> {
    <[u8; 32]>::try_from(bytes)
        .map(Fingerprint::from_digest)
        .map_err(|_| {
            StoreError::new(
                StoreErrorKind::Corrupt,
                "a fingerprint is not a 32-byte digest",
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn zero_timeouts_are_refused_naming_the_setting() {
        let url = || PostgresStore::builder("postgres://127.0.0.1:1/db");
        for (store, setting) in [
            (url().response_timeout(Duration::ZERO), "response_timeout"),
            (url().connect_timeout(Duration::ZERO), "connect_timeout"),
        ] {
            let error = store.connect_lazy().unwrap_err();
            assert_eq!(error.kind(), StoreErrorKind::Config);
            assert!(error.to_string().contains(setting), "{error}");
        }
    }

    #[test]
    fn connections_idle_since_before_a_failure_are_told_apart() {
        let breaks = Breaks::new();
        assert!(!breaks.idle_since_last(Duration::from_secs(3600)));
        std::thread::sleep(Duration::from_millis(20));
        breaks.mark();
        // Back in the pool 10 ms before the failure: idle since before it.
        assert!(breaks.idle_since_last(Duration::from_millis(10)));
        std::thread::sleep(Duration::from_millis(20));
        // Back just now, after the failure; and an hour ago, before it.
        assert!(!breaks.idle_since_last(Duration::from_millis(1)));
        assert!(breaks.idle_since_last(Duration::from_secs(3600)));
    }
}
