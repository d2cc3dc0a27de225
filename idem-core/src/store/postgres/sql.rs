//! The table and the statements of the PostgreSQL store, written once per
//! store from its (validated, quoted) schema and table names.
//!
//! ```sql
//! CREATE TABLE idempotency_keys (
//!     key         bytea PRIMARY KEY,      -- the SHA-256 of name, scope and key value
//!     fingerprint bytea NOT NULL,         -- the SHA-256 of the arguments; empty in a tombstone
//!     token       bytea NOT NULL,         -- the claim's holder, then its completer
//!     record      bytea,                  -- NULL while in progress; the encoded Record once done
//!     stored_at   timestamptz,            -- when the claim was made, then when the record was stored
//!     expires_at  timestamptz NOT NULL    -- the lease's end, then the TTL's end
//! );
//! CREATE INDEX idempotency_keys_expires_at ON idempotency_keys (expires_at);
//! CREATE INDEX idempotency_keys_claimed ON idempotency_keys (stored_at) WHERE record IS NULL;
//! CREATE SEQUENCE idempotency_keys_epoch;  -- the fencing epochs of claims
//! CREATE TABLE idempotency_keys_steps (   -- the step journals of multi-step calls
//!     key        bytea NOT NULL,           -- the call's key
//!     name       text NOT NULL,            -- the step's name
//!     seq        bigserial,                -- the order steps were journaled in
//!     value      bytea NOT NULL,           -- the step's serialized result
//!     expires_at timestamptz NOT NULL,     -- a TTL after the journal's last entry
//!     PRIMARY KEY (key, name)
//! );
//! CREATE FUNCTION idempotency_keys_claim(bytea, bytea, bytea, bigint) …  -- see `claim_function`
//! ```
//!
//! The primary key serves every operation; the index on the keys'
//! `expires_at` serves the purge of expired keys (the journal has no such
//! index: its expired rows are found by scanning it, one batch a
//! statement), and the partial index on claims in progress the listing of
//! old claims. Every time is the database's own (`now()`),
//! never a client's.

use crate::error::{StoreError, StoreErrorKind};

/// The statements of one store.
#[derive(Debug)]
pub(crate) struct Statements {
    /// What migrating creates, in order, each only when it is missing.
    pub(crate) create: Vec<Creation>,
    /// The schema's quoted name.
    pub(crate) schema: String,
    /// The name of the advisory lock migrations take: one per schema, so
    /// that stores of different tables creating the schema they share wait
    /// for each other rather than collide.
    pub(crate) migration_lock: String,
    /// Mixed into every key's advisory lock (see `PostgresStore::lock_id`):
    /// 64 bits of the SHA-256 of the table's quoted, qualified name, so that
    /// the transactional calls of two tables in one database never hold,
    /// wait for or (through `forget`) end each other's locks.
    pub(crate) lock_space: i64,
    /// The claim a replayed hit does not call (see `read_or_claim`):
    /// optional, created by migrating when the role may; without it the
    /// store claims with `begin`.
    pub(crate) claim_function: ClaimFunction,
    /// Whether the role may run the claim function (`$1`), whether it
    /// exists, whether it is the one `claim_function` creates (its body
    /// `$3`), and whether the role may create objects in the schema (`$2`).
    pub(crate) claim_function_check: &'static str,
    /// Claim-or-read as a read that calls the claim function only when the
    /// key can be claimed.
    pub(crate) read_or_claim: String,
    /// Claim-or-read in one statement that needs nothing but the table.
    pub(crate) begin: String,
    /// Stores the record of a claim the token holds, waking its waiters.
    pub(crate) complete: String,
    /// After a `complete` that updated nothing: whether the token stored
    /// the record earlier (a retried `complete`).
    pub(crate) completed_earlier: String,
    pub(crate) release: String,
    pub(crate) renew: String,
    pub(crate) in_progress: String,
    pub(crate) purge: String,
    /// The LISTEN/NOTIFY channel.
    pub(crate) channel: String,
    /// `BEGIN`'s claim inside a caller's transaction.
    pub(crate) claim_in_transaction: String,
    /// The record of that claim, written to the claimed row's address.
    pub(crate) complete_in_transaction: String,
    /// The same, written to the key's row, for a body that updated that row
    /// itself (which moved it to another address).
    pub(crate) complete_by_key_in_transaction: String,
    /// What a key holds, for operators.
    pub(crate) inspect: String,
    /// Deletes a key's row, waking its waiters.
    pub(crate) forget: String,
    /// Claims in progress made before an age.
    pub(crate) claims_older_than: String,
    /// Appends a step to a call's journal, fenced by the claim's token.
    pub(crate) append_step: String,
    /// A call's live journal, in order.
    pub(crate) steps: String,
    /// Deletes a batch of expired journal entries.
    pub(crate) purge_steps: String,
    /// A new fencing epoch for a claim that is ours.
    pub(crate) epoch: String,
}

/// `name` as a quoted SQL identifier, if it is one PostgreSQL accepts.
pub(crate) fn identifier(what: &str, name: &str) -> Result<String, StoreError> {
    if name.is_empty() || name.len() > 63 || name.contains('\0') {
        return Err(StoreError::new(
            StoreErrorKind::Config,
            format!("`{name}` is not a PostgreSQL {what} name: 1 to 63 bytes, no NUL"),
        ));
    }
    Ok(format!("\"{}\"", name.replace('"', "\"\"")))
}

/// How long a tombstone (the row a `release` leaves for a `begin` that has
/// not arrived) outlives its expiry before the purge deletes it.
const TOMBSTONE_MINUTES: u32 = 15;

/// PostgreSQL's longest identifier (and `NOTIFY` channel), in bytes.
const MAX_IDENTIFIER: usize = 63;

/// `base` followed by `suffix` if that fits an identifier; otherwise a name
/// made of `prefix` and a digest of both, so that every schema and table
/// name the store accepts gives names PostgreSQL accepts, and two long names
/// never share one.
fn derived_name(base: &str, suffix: &str, prefix: &str) -> String {
    let name = format!("{base}{suffix}");
    if name.len() <= MAX_IDENTIFIER {
        return name;
    }
    use sha2::{Digest as _, Sha256};
    let digest = Sha256::digest(name.as_bytes());
    let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}{hex}{suffix}")
}

/// The claim function, which migrating creates apart from the objects of
/// `create`: it is optional, looked up by its text as well as its name.
#[derive(Debug)]
pub(crate) struct ClaimFunction {
    /// Its qualified, quoted name and arguments, as `to_regprocedure`
    /// takes it.
    pub(crate) name: String,
    /// Its body, between the dollar quotes.
    pub(crate) body: String,
    /// The statement that creates it.
    pub(crate) create: String,
}

/// `CREATE OR REPLACE FUNCTION` of `name(bytea, bytea, bytea, bigint)`
/// returning a boolean, in PL/pgSQL, with `body` between dollar quotes whose
/// tag the body does not contain (a quoted table name may hold anything).
fn dollar_quoted_function(name: &str, body: &str) -> String {
    let mut tag = "$idem$".to_owned();
    let mut n = 0;
    while body.contains(&tag) {
        n += 1;
        tag = format!("$idem{n}$");
    }
    format!(
        "CREATE OR REPLACE FUNCTION {name}(bytea, bytea, bytea, bigint) RETURNS boolean
        LANGUAGE plpgsql VOLATILE AS {tag}{body}{tag}"
    )
}

/// The `LISTEN/NOTIFY` channel of a store's table: `idem:schema.table`, or
/// when that is longer than PostgreSQL's 63 bytes, `idem:` and a digest of
/// it (a longer channel name makes `pg_notify` fail, and with it every
/// statement that wakes waiters).
pub(crate) fn channel(schema: &str, table: &str) -> String {
    derived_name(&format!("idem:{schema}.{table}"), "", "idem:")
}

/// An object a store needs. Migrating looks them all up first, in one
/// statement, and runs the statement of each one that is missing, because
/// `… IF NOT EXISTS` is not free when the object exists: PostgreSQL still
/// checks the privilege to create it (so a role that may only create
/// tables in a schema made for it could never migrate), and `CREATE INDEX`
/// still locks the table against the writes of every transaction in
/// flight.
#[derive(Debug)]
pub(crate) struct Creation {
    /// The function that finds the object by name, or answers `NULL`:
    /// `to_regnamespace` or `to_regclass` (qualified, so that no function
    /// on the role's `search_path` stands in for it).
    pub(crate) lookup: &'static str,
    /// The object's qualified, quoted name.
    pub(crate) name: String,
    /// The statement that creates it.
    pub(crate) statement: String,
}

impl Creation {
    fn schema(name: &str) -> Self {
        Self {
            lookup: "pg_catalog.to_regnamespace",
            name: name.to_owned(),
            statement: format!("CREATE SCHEMA IF NOT EXISTS {name}"),
        }
    }

    fn relation(name: String, statement: String) -> Self {
        Self {
            lookup: "pg_catalog.to_regclass",
            name,
            statement,
        }
    }
}

impl Statements {
    pub(crate) fn new(schema: &str, table: &str) -> Result<Self, StoreError> {
        let (schema_q, table_q) = (identifier("schema", schema)?, identifier("table", table)?);
        let index = identifier("index", &derived_name(table, "_expires_at", "idem_"))?;
        let claims_index = identifier("index", &derived_name(table, "_claimed", "idem_"))?;
        let t = format!("{schema_q}.{table_q}");
        let steps_q = identifier("table", &derived_name(table, "_steps", "idem_"))?;
        let st = format!("{schema_q}.{steps_q}");
        let sequence_q = identifier("sequence", &derived_name(table, "_epoch", "idem_"))?;
        let sequence = format!("{schema_q}.{sequence_q}");
        let function_q = identifier("function", &derived_name(table, "_claim", "idem_"))?;
        let function = format!("{schema_q}.{function_q}");
        let ms = "* interval '1 millisecond'";
        // Who may claim a key, in both forms of claim-or-read: no one when
        // a live record or another's live claim holds it; its holder again
        // (same token and arguments, a `begin` retried); anyone once it
        // expired, except the token a tombstone bars.
        let upsert = format!(
            "INSERT INTO {t} AS r (key, fingerprint, token, record, stored_at, expires_at)
                    SELECT $1, $2, $3, NULL, now(), now() + $4::bigint {ms}
                    WHERE NOT EXISTS (
                        SELECT 1 FROM current c WHERE c.expires_at > now()
                        AND NOT (c.record IS NULL AND c.token = $3 AND c.fingerprint = $2)
                    )
                    ON CONFLICT (key) DO UPDATE SET
                        fingerprint = EXCLUDED.fingerprint, token = EXCLUDED.token,
                        record = NULL,
                        stored_at = CASE WHEN r.expires_at <= now() THEN now() ELSE r.stored_at END,
                        expires_at = EXCLUDED.expires_at
                    WHERE (r.expires_at <= now()
                            AND NOT (r.fingerprint = '' AND r.token = EXCLUDED.token))
                        OR (r.record IS NULL AND r.token = EXCLUDED.token
                            AND r.fingerprint = EXCLUDED.fingerprint)"
        );
        let claim_function_body = format!(
            "BEGIN
    WITH current AS (
        SELECT fingerprint, token, record, expires_at FROM {t} WHERE key = $1
    )
    {upsert};
    RETURN FOUND;
END"
        );
        // What a claim-or-read answers, as `begin_answer` reads it: the claim
        // made, or what holds the key (the live record, or another's claim
        // and how long it has left).
        let answer = "SELECT true AS claimed, NULL::bytea AS fingerprint, NULL::bytea AS record,
                       NULL::bigint AS left_ms
                FROM claimed
                UNION ALL
                SELECT false, c.fingerprint, c.record,
                       ceil(extract(epoch FROM c.expires_at - now()) * 1000)::bigint
                FROM current c
                WHERE NOT EXISTS (SELECT 1 FROM claimed) AND c.expires_at > now()";
        // The record of a transactional claim, by its key; with the row's
        // address too (`complete_in_transaction`) on the common path.
        let complete_by_key_in_transaction = format!(
            "UPDATE {t} SET record = $3, stored_at = clock_timestamp(),
                expires_at = clock_timestamp() + $4::bigint {ms}
            WHERE key = $1 AND token = $2 AND txid_current_if_assigned() IS NOT NULL"
        );
        Ok(Self {
            migration_lock: format!("idem:migrate {schema_q}"),
            lock_space: {
                use sha2::Digest as _;
                let digest = sha2::Sha256::digest(t.as_bytes());
                i64::from_be_bytes(digest[..8].try_into().unwrap_or([0; 8]))
            },
            schema: schema_q.clone(),
            create: vec![
                Creation::schema(&schema_q),
                Creation::relation(
                    t.clone(),
                    format!(
                        "CREATE TABLE IF NOT EXISTS {t} (
                        key bytea PRIMARY KEY,
                        fingerprint bytea NOT NULL,
                        token bytea NOT NULL,
                        record bytea,
                        stored_at timestamptz,
                        expires_at timestamptz NOT NULL
                    )"
                    ),
                ),
                Creation::relation(
                    st.clone(),
                    format!(
                        "CREATE TABLE IF NOT EXISTS {st} (
                        key bytea NOT NULL,
                        name text NOT NULL,
                        seq bigserial,
                        value bytea NOT NULL,
                        expires_at timestamptz NOT NULL,
                        PRIMARY KEY (key, name)
                    )"
                    ),
                ),
                Creation::relation(
                    sequence.clone(),
                    format!("CREATE SEQUENCE IF NOT EXISTS {sequence}"),
                ),
                Creation::relation(
                    format!("{schema_q}.{index}"),
                    format!("CREATE INDEX IF NOT EXISTS {index} ON {t} (expires_at)"),
                ),
                Creation::relation(
                    format!("{schema_q}.{claims_index}"),
                    format!(
                        "CREATE INDEX IF NOT EXISTS {claims_index} ON {t} (stored_at) \
                         WHERE record IS NULL"
                    ),
                ),
            ],
            // Claim-or-read in one statement. A live record or another's
            // live claim is only read (a replay takes no lock and writes
            // nothing); an absent or expired key is claimed, or re-claimed by
            // its own holder. No row at all means a concurrent writer came
            // between the read and the insert: the caller asks again.
            begin: format!(
                "WITH current AS (
                    SELECT fingerprint, token, record, expires_at FROM {t} WHERE key = $1
                ), claimed AS (
                    {upsert}
                    RETURNING 1
                )
                {answer}"
            ),
            // The claim of `read_or_claim`: the same upsert, on a key the
            // read found absent, expired or claimed by the caller's own
            // token; `false` when a concurrent writer came between that
            // read and this write. PL/pgSQL keeps its plan for the session.
            claim_function: ClaimFunction {
                name: format!("{function}(bytea, bytea, bytea, bigint)"),
                create: dollar_quoted_function(&function, &claim_function_body),
                body: claim_function_body,
            },
            // A function of that name is used only if it is this one: its
            // text the same but for white space, declared as it declares
            // it (a function an administrator wrote from other statements,
            // or that names the table without its schema, would claim
            // elsewhere; one made stable would refuse to insert).
            claim_function_check: "SELECT
                    coalesce(pg_catalog.has_function_privilege(
                        pg_catalog.to_regprocedure($1), 'EXECUTE'), false),
                    pg_catalog.to_regprocedure($1) IS NOT NULL,
                    coalesce((
                        SELECT p.prorettype = 'pg_catalog.bool'::pg_catalog.regtype
                            AND l.lanname = 'plpgsql'
                            AND p.provolatile = 'v' AND NOT p.prosecdef
                            AND NOT p.proretset AND p.proconfig IS NULL
                            AND pg_catalog.btrim(pg_catalog.regexp_replace(
                                p.prosrc, E'\\\\s+', ' ', 'g'))
                                = pg_catalog.btrim(pg_catalog.regexp_replace(
                                    $3, E'\\\\s+', ' ', 'g'))
                        FROM pg_catalog.pg_proc p
                        JOIN pg_catalog.pg_language l ON l.oid = p.prolang
                        WHERE p.oid = pg_catalog.to_regprocedure($1)
                    ), false),
                    coalesce(pg_catalog.has_schema_privilege(
                        pg_catalog.to_regnamespace($2), 'CREATE'), false)",
            // A replayed hit reads the row and writes nothing: a
            // data-modifying CTE costs PostgreSQL its set-up (about twice
            // a plain read) even when it inserts nothing, so the claim is a
            // function called only for a key that can be claimed. One row:
            // `claimed` true when claimed, false when a concurrent writer
            // came first (ask again), NULL when the key is held (its
            // fingerprint, record and time left follow).
            read_or_claim: format!(
                "SELECT CASE WHEN c.expires_at IS NULL OR c.expires_at <= now()
                            OR (c.record IS NULL AND c.token = $3 AND c.fingerprint = $2)
                        THEN {function}($1, $2, $3, $4::bigint) END AS claimed,
                    c.fingerprint, c.record,
                    ceil(extract(epoch FROM c.expires_at - now()) * 1000)::bigint AS left_ms
                FROM (SELECT) AS one LEFT JOIN {t} c ON c.key = $1"
            ),
            // A plain update, its waiters woken in its `RETURNING`: a
            // data-modifying CTE would cost its set-up on every first run.
            // No row: stored earlier by this token (also `Stored`), or lost.
            complete: format!(
                "UPDATE {t} SET record = $3, stored_at = now(), expires_at = now() + $4::bigint {ms}
                WHERE key = $1 AND token = $2 AND record IS NULL AND expires_at > now()
                RETURNING pg_notify($5, encode(key, 'hex'))"
            ),
            completed_earlier: format!(
                "SELECT EXISTS (
                    SELECT 1 FROM {t} WHERE key = $1 AND token = $2 AND record IS NOT NULL
                    AND expires_at > now()
                )"
            ),
            // Deletes the token's claim. With no claim of the token's to
            // delete, the `begin` it follows may not have arrived yet (a
            // request delayed on its way, while this one came on another
            // connection): a tombstone, an expired row with an empty
            // fingerprint and the token, stops it from claiming when it
            // does. Anything else's row is left alone, unless expired.
            release: format!(
                "WITH gone AS (
                    DELETE FROM {t} WHERE key = $1 AND token = $2 AND record IS NULL
                    RETURNING key
                ), barred AS (
                    INSERT INTO {t} AS r (key, fingerprint, token, record, stored_at, expires_at)
                    SELECT $1, '', $2, NULL, now(), now()
                    WHERE NOT EXISTS (SELECT 1 FROM gone)
                    ON CONFLICT (key) DO UPDATE SET
                        fingerprint = '', token = EXCLUDED.token, record = NULL,
                        stored_at = now(), expires_at = now()
                    WHERE r.expires_at <= now()
                )
                SELECT count(*) FROM (SELECT pg_notify($3, encode(key, 'hex')) FROM gone) woken"
            ),
            renew: format!(
                "UPDATE {t} SET expires_at = now() + $3::bigint {ms}
                WHERE key = $1 AND token = $2 AND record IS NULL AND expires_at > now()"
            ),
            in_progress: format!(
                "SELECT EXISTS (
                    SELECT 1 FROM {t} WHERE key = $1 AND record IS NULL AND expires_at > now()
                )"
            ),
            // Tombstones stay as long as a delayed request can plausibly
            // still arrive: TCP gives up retransmitting after about as long.
            purge: format!(
                "DELETE FROM {t} WHERE key IN (
                    SELECT key FROM {t} WHERE expires_at < now()
                        AND (fingerprint <> '' OR expires_at < now() - interval '{TOMBSTONE_MINUTES} minutes')
                    ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED
                )"
            ),
            channel: channel(schema, table),
            // Inside the transaction idem began, the statement after the one
            // that tried the key's advisory lock (and kept in `idem.locked`
            // whether it was taken): under the lock, claim an absent or
            // expired key, or read what is there; without it, claim nothing,
            // read a committed record (concurrent replays each take the lock
            // for a moment: they must not refuse one another) and answer the
            // session's `lock_timeout` for the wait. One row: `locked`,
            // `lock_timeout`, then the claim's answer (`claimed` is NULL when
            // there is none) with the claimed row's address (`tid`).
            //
            // An absent key is claimed by an insert that reads nothing: the
            // key's row is read (and an expired one claimed by an update)
            // only when the insert found it there, each behind a one-time
            // filter that skips its scan otherwise. At `SERIALIZABLE` a read
            // of the key's index page takes a predicate lock on it, and calls
            // of other keys inserting into that page would fail to serialize
            // with this one; a first run now takes none.
            claim_in_transaction: format!(
                "WITH lock AS (
                    SELECT coalesce(current_setting('idem.locked', true), '') = 'true' AS locked,
                        current_setting('lock_timeout') AS lock_timeout
                ), inserted AS (
                    INSERT INTO {t} (key, fingerprint, token, record, stored_at, expires_at)
                    SELECT $1, $2, $3, NULL, now(), now() + $4::bigint {ms}
                    WHERE (SELECT locked FROM lock)
                    ON CONFLICT (key) DO NOTHING
                    RETURNING ctid
                ), current AS (
                    SELECT fingerprint, record, expires_at FROM {t}
                    WHERE key = $1 AND NOT EXISTS (SELECT 1 FROM inserted)
                ), reclaimed AS (
                    -- `IS TRUE` keeps the expiry out of the index conditions: a
                    -- generic plan would otherwise scan every expired row by
                    -- the purge's index instead of the key's one by its own.
                    UPDATE {t} SET fingerprint = $2, token = $3, record = NULL,
                        stored_at = now(), expires_at = now() + $4::bigint {ms}
                    WHERE key = $1 AND (expires_at <= now()) IS TRUE
                        AND (SELECT locked FROM lock) AND NOT EXISTS (SELECT 1 FROM inserted)
                    RETURNING ctid
                ), claimed AS (
                    SELECT ctid FROM inserted UNION ALL SELECT ctid FROM reclaimed
                )
                SELECT l.locked, l.lock_timeout, a.claimed, a.fingerprint, a.record, a.left_ms, a.tid
                FROM lock l LEFT JOIN (
                    SELECT true AS claimed, NULL::bytea AS fingerprint, NULL::bytea AS record,
                        NULL::bigint AS left_ms, c.ctid::text AS tid
                    FROM claimed c
                    UNION ALL
                    SELECT false, c.fingerprint, c.record,
                        ceil(extract(epoch FROM c.expires_at - now()) * 1000)::bigint, NULL
                    FROM current c
                    WHERE NOT EXISTS (SELECT 1 FROM claimed) AND c.expires_at > now()
                ) a ON l.locked OR a.record IS NOT NULL"
            ),
            // `clock_timestamp()`, not `now()`: inside the caller's
            // transaction `now()` is when the transaction began, so a body
            // longer than the TTL would commit a record already expired.
            // Inside the transaction idem began, the claim's write gave it a
            // transaction id already: a body that ended it (`COMMIT`,
            // `ROLLBACK`) leaves this statement in a transaction of its own,
            // with none yet, which updates nothing, and the call answers an
            // error.
            //
            // The row is found by its address (`$5`, from the claim), not by
            // its key: a read of the key's index page would take the
            // predicate lock at `SERIALIZABLE` that the claim avoids.
            complete_in_transaction: format!("{complete_by_key_in_transaction} AND ctid = $5::tid"),
            complete_by_key_in_transaction,
            inspect: format!(
                "SELECT fingerprint, record,
                    extract(epoch FROM stored_at)::float8 AS stored_at,
                    ceil(extract(epoch FROM expires_at - now()) * 1000)::bigint AS left_ms,
                    floor(extract(epoch FROM now() - stored_at) * 1000)::bigint AS age_ms
                FROM {t} WHERE key = $1 AND expires_at > now()"
            ),
            // The key's row is locked without waiting: a transactional
            // holder's claim may hold it (see `forget` in the store).
            forget: format!(
                "WITH target AS (
                    SELECT key FROM {t} WHERE key = $1 FOR UPDATE NOWAIT
                ), steps_gone AS (
                    DELETE FROM {st} WHERE key = $1
                ), gone AS (
                    DELETE FROM {t} WHERE key IN (SELECT key FROM target)
                    RETURNING key, expires_at > now() AS live
                ), woken AS (
                    SELECT pg_notify($2, encode(key, 'hex')) FROM gone
                )
                SELECT coalesce(bool_or(live), false) FROM gone, (SELECT count(*) FROM woken) w"
            ),
            claims_older_than: format!(
                "SELECT key, fingerprint,
                    floor(extract(epoch FROM now() - stored_at) * 1000)::bigint AS age_ms,
                    ceil(extract(epoch FROM expires_at - now()) * 1000)::bigint AS left_ms
                FROM {t}
                WHERE record IS NULL AND expires_at > now()
                    AND stored_at < now() - $1::bigint {ms}
                ORDER BY stored_at LIMIT $2"
            ),
            // Only while the claim is ours (locked against a concurrent
            // takeover until this statement ends). An entry of an expired
            // journal under the same name is replaced, and takes a new place
            // in the journal's order (`seq`), as a new entry would; a live
            // one kept. The journal's other entries live as long as the
            // newest.
            append_step: format!(
                "WITH ours AS (
                    SELECT key FROM {t}
                    WHERE key = $1 AND token = $2 AND record IS NULL AND expires_at > now()
                    FOR SHARE
                ), appended AS (
                    INSERT INTO {st} AS s (key, name, value, expires_at)
                    SELECT key, $3, $4, now() + $5::bigint {ms} FROM ours
                    ON CONFLICT (key, name) DO UPDATE SET
                        value = CASE WHEN s.expires_at <= now() THEN EXCLUDED.value ELSE s.value END,
                        seq = CASE WHEN s.expires_at <= now() THEN EXCLUDED.seq ELSE s.seq END,
                        expires_at = greatest(s.expires_at, EXCLUDED.expires_at)
                    RETURNING 1
                ), kept AS (
                    UPDATE {st} SET expires_at = greatest(expires_at, now() + $5::bigint {ms})
                    WHERE key = $1 AND name <> $3 AND expires_at > now()
                        AND EXISTS (SELECT 1 FROM ours)
                )
                SELECT EXISTS (SELECT 1 FROM appended)"
            ),
            steps: format!(
                "SELECT name, value FROM {st} WHERE key = $1 AND expires_at > now() ORDER BY seq"
            ),
            // Locks the claim's row, so that a claim taking it over (an
            // update of the row) waits, and is handed a larger epoch. The
            // sequence's name as an escape string, which reads the same
            // whether the session's `standard_conforming_strings` is on or
            // off (a name may hold a backslash).
            epoch: format!(
                "SELECT nextval(E'{}'::regclass) FROM {t}
                WHERE key = $1 AND token = $2 AND record IS NULL AND expires_at > now()
                FOR SHARE",
                sequence.replace('\\', "\\\\").replace('\'', "''")
            ),
            purge_steps: format!(
                "DELETE FROM {st} WHERE (key, name) IN (
                    SELECT key, name FROM {st} WHERE expires_at < now()
                    LIMIT $1 FOR UPDATE SKIP LOCKED
                )"
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_quoted_and_checked() {
        assert_eq!(identifier("table", "keys").unwrap(), "\"keys\"");
        assert_eq!(identifier("table", "we\"ird").unwrap(), "\"we\"\"ird\"");
        for bad in ["", &"x".repeat(64), "nul\0"] {
            assert_eq!(
                identifier("table", bad).unwrap_err().kind(),
                StoreErrorKind::Config
            );
        }
        let statements = Statements::new("idem", "keys").unwrap();
        assert!(statements.begin.contains("\"idem\".\"keys\""));
        assert_eq!(
            statements.claim_function.name,
            "\"idem\".\"keys_claim\"(bytea, bytea, bytea, bigint)"
        );
        assert_eq!(statements.channel, "idem:idem.keys");
    }

    #[test]
    fn the_claim_functions_quotes_are_not_in_its_body() {
        let statements = Statements::new("s", "t$idem$").unwrap();
        let create = &statements.claim_function.create;
        assert!(create.contains("AS $idem1$BEGIN"), "{create}");
        assert!(create.ends_with("END$idem1$"), "{create}");
    }

    #[test]
    fn every_accepted_name_gives_names_postgres_accepts() {
        let (schema, table) = ("s".repeat(63), "t".repeat(63));
        let statements = Statements::new(&schema, &table).unwrap();
        assert!(
            statements.channel.len() <= MAX_IDENTIFIER,
            "{}",
            statements.channel
        );
        for creation in &statements.create {
            let object = creation.name.rsplit('.').next().unwrap().trim_matches('"');
            assert!(object.len() <= MAX_IDENTIFIER, "{object}");
        }
        let function = statements
            .claim_function
            .name
            .rsplit("\".\"")
            .next()
            .unwrap();
        let function = function.split('"').next().unwrap();
        assert!(function.len() <= MAX_IDENTIFIER, "{function}");
        assert_eq!(derived_name("keys", "_claim", "idem_"), "keys_claim");
        // Short names keep the names earlier versions used.
        assert_eq!(
            channel("public", "idempotency_keys"),
            "idem:public.idempotency_keys"
        );
        assert_eq!(derived_name("keys", "_claimed", "idem_"), "keys_claimed");
        // Long names that differ get different channels.
        assert_ne!(channel(&schema, &table), channel(&schema, &"u".repeat(63)));
    }
}
