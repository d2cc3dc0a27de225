//! The PostgreSQL store on a real server the test starts: the conformance
//! suite, round trips, LISTEN/NOTIFY wake-ups, migration and purging; and
//! the transactional mode under duplicates, crashes, terminated connections
//! and restarts, counting rows in a `charges` table.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use idem_core::store::{Begin, Store, StoreErrorKind, Token};
use idem_core::{
    Error, Fingerprint, Idempotency, Key, OnConflict, PostgresStore, Settings, idempotent,
};
use idem_test::conformance::{Backend, Caller, Failure, Runs, Timing, fresh};
use idem_test::postgres_server::{self, PostgresServer, RESPONSE_TIMEOUT, shared};
use sqlx::PgConnection;

struct Postgres;

async fn connect(url: &str) -> PostgresStore {
    PostgresStore::builder(url)
        .response_timeout(RESPONSE_TIMEOUT)
        .max_connections(4)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

impl Backend for Postgres {
    async fn store(&self) -> Arc<dyn Store> {
        Arc::new(connect(&shared().url()).await)
    }

    fn timing(&self) -> Timing {
        postgres_server::TIMING
    }

    fn follows_tokio_clock(&self) -> bool {
        false
    }
}

mod conformance {
    idem_test::conformance_suite!(super::Postgres);
}

/// The store on tables made without its claim function (by an earlier
/// version, or by an administrator for a role that may not create one):
/// it finds the function missing at its first claim and claims with the
/// statement that needs only the table, as correctly.
struct PostgresWithoutClaimFunction;

const WITHOUT_CLAIM_FUNCTION: &str = "without_claim_function";

static TABLES_WITHOUT_CLAIM_FUNCTION: tokio::sync::OnceCell<()> =
    tokio::sync::OnceCell::const_new();

impl Backend for PostgresWithoutClaimFunction {
    async fn store(&self) -> Arc<dyn Store> {
        let url = shared().url();
        TABLES_WITHOUT_CLAIM_FUNCTION
            .get_or_init(|| async {
                PostgresStore::builder(&url)
                    .schema(WITHOUT_CLAIM_FUNCTION)
                    .connect()
                    .await
                    .expect("the tables");
                shared().psql(&format!(
                    "DROP FUNCTION {WITHOUT_CLAIM_FUNCTION}.{CLAIM_FUNCTION}"
                ));
            })
            .await;
        let store = PostgresStore::builder(&url)
            .schema(WITHOUT_CLAIM_FUNCTION)
            .response_timeout(RESPONSE_TIMEOUT)
            .max_connections(4)
            .migrate(false)
            .connect()
            .await
            .expect("a store on tables without the claim function");
        Arc::new(store)
    }

    fn timing(&self) -> Timing {
        postgres_server::TIMING
    }

    fn follows_tokio_clock(&self) -> bool {
        false
    }
}

mod conformance_without_claim_function {
    idem_test::conformance_suite!(super::PostgresWithoutClaimFunction);
}

/// A replayed hit reads the key's row and writes nothing, not even an
/// insert that inserts nothing: it is answered on a read-only session,
/// where a first run is refused before its body runs.
#[tokio::test]
async fn a_replayed_hit_runs_on_a_read_only_session() {
    let server = shared();
    let schema = "read_only_replays";
    let writer = PostgresStore::builder(server.url())
        .schema(schema)
        .connect()
        .await
        .unwrap();
    let runs = Runs::default();
    let (key, fp) = fresh("read-only-replay");
    let first = Idempotency::new(writer)
        .run(&Settings::DEFAULT, key, fp, async {
            Ok::<_, Failure>(runs.mark())
        })
        .await;
    assert_eq!(first.unwrap(), 1);
    let read_only = PostgresStore::builder(format!(
        "{}?options=-c%20default_transaction_read_only%3Don",
        server.url()
    ))
    .schema(schema)
    .migrate(false)
    .connect()
    .await
    .unwrap();
    let idem = Idempotency::new(read_only);
    let replay = idem
        .run(&Settings::DEFAULT, key, fp, async {
            Ok::<_, Failure>(runs.mark())
        })
        .await;
    assert_eq!(replay.unwrap(), 1, "replayed on the read-only session");
    let (other, other_fp) = fresh("read-only-first-run");
    match idem
        .run(&Settings::DEFAULT, other, other_fp, async {
            Ok::<_, Failure>(runs.mark())
        })
        .await
    {
        Err(Failure::Idem(Error::Store(error))) => {
            assert!(error.to_string().contains("read-only"), "{error}");
        }
        other => panic!("expected the claim refused, got {other:?}"),
    }
    assert_eq!(runs.count(), 1, "only the first run ran");
}

/// Calls `store` twice on a fresh key named after `name`: the body runs
/// once, and the second call replays it. Answers the key.
async fn runs_once_then_replays(store: &PostgresStore, name: &str) -> (Key, Fingerprint) {
    let runs = Runs::default();
    let (key, fp) = fresh(name);
    let idem = Idempotency::new(store.clone());
    for call in 0..2 {
        let answer = idem
            .run(&Settings::DEFAULT, key, fp, async {
                Ok::<_, Failure>(runs.mark())
            })
            .await;
        assert_eq!(answer.unwrap(), 1, "call {call} of {name}");
    }
    (key, fp)
}

/// How many rows `key` has in `schema`'s table.
fn rows_of(server: &PostgresServer, schema: &str, key: Key) -> String {
    let hex: String = key.digest().iter().map(|b| format!("{b:02x}")).collect();
    server.psql(&format!(
        "SELECT count(*) FROM {schema}.idempotency_keys WHERE key = '\\x{hex}'"
    ))
}

/// An earlier version's objects, as an administrator makes them from its
/// statements: no claim function.
const OBJECTS_WITHOUT_CLAIM_FUNCTION: &str = "CREATE TABLE idempotency_keys (key bytea PRIMARY KEY, \
     fingerprint bytea NOT NULL, token bytea NOT NULL, record bytea, stored_at timestamptz, \
     expires_at timestamptz NOT NULL); \
     CREATE INDEX idempotency_keys_expires_at ON idempotency_keys (expires_at); \
     CREATE INDEX idempotency_keys_claimed ON idempotency_keys (stored_at) WHERE record IS NULL; \
     CREATE TABLE idempotency_keys_steps (key bytea NOT NULL, name text NOT NULL, \
         seq bigserial, value bytea NOT NULL, expires_at timestamptz NOT NULL, \
         PRIMARY KEY (key, name)); \
     CREATE SEQUENCE idempotency_keys_epoch;";

/// What calls need, granted to `role` in `schema`.
fn call_grants(schema: &str, role: &str) -> String {
    format!(
        "GRANT USAGE ON SCHEMA {schema} TO {role}; \
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {role}; \
         GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA {schema} TO {role};"
    )
}

fn role_url(role: &str) -> String {
    format!("postgres://{role}@127.0.0.1:{}/postgres", shared().port())
}

/// Where functions are not executable by PUBLIC (a common hardening), a
/// role the claim function was not granted to claims and replays through
/// the statement that needs only the table.
#[tokio::test]
async fn a_role_that_may_not_run_the_claim_function_still_claims_and_replays() {
    let server = shared();
    server.psql(
        "DROP SCHEMA IF EXISTS no_execute CASCADE; DROP ROLE IF EXISTS idem_no_execute; \
         CREATE ROLE idem_no_execute LOGIN; CREATE SCHEMA no_execute",
    );
    let owner = PostgresStore::builder(server.url())
        .schema("no_execute")
        .connect()
        .await
        .unwrap();
    let (key, fp) = fresh("no-execute");
    let stored = Idempotency::new(owner)
        .run(&Settings::DEFAULT, key, fp, async { Ok::<_, Failure>(7) })
        .await;
    assert_eq!(stored.unwrap(), 7);
    server.psql(&format!(
        "{} REVOKE EXECUTE ON FUNCTION \
         no_execute.idempotency_keys_claim(bytea, bytea, bytea, bigint) FROM PUBLIC",
        call_grants("no_execute", "idem_no_execute")
    ));
    for migrate in [true, false] {
        let store = PostgresStore::builder(role_url("idem_no_execute"))
            .schema("no_execute")
            .response_timeout(RESPONSE_TIMEOUT)
            .migrate(migrate)
            .connect()
            .await
            .expect("every object exists");
        let idem = Idempotency::new(store);
        let replay = idem
            .run(&Settings::DEFAULT, key, fp, async { Ok::<_, Failure>(8) })
            .await;
        assert_eq!(replay.unwrap(), 7, "replayed (migrate({migrate}))");
        let (other, other_fp) = fresh("no-execute-first");
        let first = idem
            .run(&Settings::DEFAULT, other, other_fp, async {
                Ok::<_, Failure>(9)
            })
            .await;
        assert_eq!(first.unwrap(), 9, "claimed (migrate({migrate}))");
    }
}

/// A role that may not create the claim function, on objects that exist
/// otherwise, connects without the schema's migration lock: a migration
/// held up elsewhere in the schema does not hold up its start.
#[tokio::test]
async fn a_role_that_may_not_create_the_claim_function_takes_no_migration_lock() {
    let server = shared();
    server.psql(&format!(
        "DROP SCHEMA IF EXISTS no_function CASCADE; DROP ROLE IF EXISTS idem_no_function; \
         CREATE ROLE idem_no_function LOGIN; CREATE SCHEMA no_function; \
         SET search_path TO no_function; {OBJECTS_WITHOUT_CLAIM_FUNCTION} {}",
        call_grants("no_function", "idem_no_function")
    ));
    let mut holder = <PgConnection as sqlx::Connection>::connect(&server.url())
        .await
        .unwrap();
    sqlx::query("SELECT pg_advisory_lock(hashtext('idem:migrate \"no_function\"'))")
        .execute(&mut holder)
        .await
        .unwrap();
    let started = PostgresStore::builder(role_url("idem_no_function"))
        .schema("no_function")
        .response_timeout(RESPONSE_TIMEOUT)
        .connect()
        .await;
    sqlx::query("SELECT pg_advisory_unlock_all()")
        .execute(&mut holder)
        .await
        .unwrap();
    let store = started.expect("started while the lock was held");
    runs_once_then_replays(&store, "no-function").await;
}

/// The statements of the store's module docs, as an administrator would
/// copy them (the `sql` block of "The table").
fn documented_statements() -> String {
    let docs = include_str!("../../idem-core/src/store/postgres/mod.rs");
    let start = docs.find("//! # The table").expect("the table's section");
    let lines: Vec<&str> = docs[start..]
        .lines()
        .map(|line| line.strip_prefix("//!").unwrap_or(line))
        .map(|line| line.strip_prefix(' ').unwrap_or(line))
        .skip_while(|line| *line != "```sql")
        .skip(1)
        .take_while(|line| *line != "```")
        .collect();
    lines.join("\n")
}

/// An administrator makes every object from the module docs' statements,
/// the claim function included, in a database of its own, and grants a role
/// only what calls need and `EXECUTE` on the function (where functions are
/// not executable by PUBLIC): the store, connecting with the default
/// `migrate(true)`, creates nothing and uses the function (a replay runs on
/// a read-only session).
#[tokio::test]
async fn the_documented_statements_make_objects_the_store_uses() {
    let server = shared();
    server.psql("DROP DATABASE IF EXISTS documented");
    server.psql("DROP ROLE IF EXISTS idem_documented; CREATE ROLE idem_documented LOGIN");
    server.psql("CREATE DATABASE documented");
    let admin_url = format!("postgres://postgres@127.0.0.1:{}/documented", server.port());
    let mut admin = <PgConnection as sqlx::Connection>::connect(&admin_url)
        .await
        .unwrap();
    sqlx::raw_sql(&documented_statements())
        .execute(&mut admin)
        .await
        .expect("the documented statements run");
    sqlx::raw_sql(&format!(
        "REVOKE CREATE ON SCHEMA public FROM PUBLIC; {} \
         REVOKE EXECUTE ON FUNCTION public.idempotency_keys_claim(bytea, bytea, bytea, bigint) \
             FROM PUBLIC; \
         GRANT EXECUTE ON FUNCTION public.idempotency_keys_claim(bytea, bytea, bytea, bigint) \
             TO idem_documented",
        call_grants("public", "idem_documented")
    ))
    .execute(&mut admin)
    .await
    .unwrap();
    let role_url = format!(
        "postgres://idem_documented@127.0.0.1:{}/documented",
        server.port()
    );
    let store = PostgresStore::builder(&role_url)
        .response_timeout(RESPONSE_TIMEOUT)
        .connect()
        .await
        .expect("every object exists");
    let (key, fp) = runs_once_then_replays(&store, "documented").await;
    let read_only = PostgresStore::builder(format!(
        "{role_url}?options=-c%20default_transaction_read_only%3Don"
    ))
    .response_timeout(RESPONSE_TIMEOUT)
    .connect()
    .await
    .unwrap();
    let replay = Idempotency::new(read_only)
        .run(&Settings::DEFAULT, key, fp, async {
            Ok::<_, Failure>(2_usize)
        })
        .await;
    assert_eq!(replay.unwrap(), 1, "replayed through the function");
}

/// A function of the claim function's name that is not idem's (here the
/// documented text with the table's schema left out, made in another
/// schema, so that it claims in `public` through the role's search path)
/// is not used: claims and records land in the store's own table.
#[tokio::test]
async fn a_function_of_the_claim_functions_name_that_is_not_idems_is_not_used() {
    let server = shared();
    server.psql(
        "DROP SCHEMA IF EXISTS not_idems CASCADE; DROP ROLE IF EXISTS idem_not_idems; \
         CREATE ROLE idem_not_idems LOGIN; CREATE SCHEMA not_idems",
    );
    // The default store's table, which the wrong function would write to.
    PostgresStore::connect(&server.url()).await.unwrap();
    let function = documented_statements();
    let function = &function[function.find("CREATE FUNCTION").unwrap()..];
    let function = function
        .replace("\"public\".\"idempotency_keys\"", "idempotency_keys")
        .replace("\"public\".", "not_idems.");
    server.psql(&format!(
        "SET search_path TO not_idems; {OBJECTS_WITHOUT_CLAIM_FUNCTION} {function} {} \
         GRANT SELECT, INSERT, UPDATE, DELETE ON public.idempotency_keys TO idem_not_idems",
        call_grants("not_idems", "idem_not_idems")
    ));
    for migrate in [false, true] {
        let store = PostgresStore::builder(role_url("idem_not_idems"))
            .schema("not_idems")
            .response_timeout(RESPONSE_TIMEOUT)
            .migrate(migrate)
            .connect()
            .await
            .unwrap();
        let (key, _) = runs_once_then_replays(&store, &format!("not-idems-{migrate}")).await;
        for (schema, rows) in [("not_idems", "1"), ("public", "0")] {
            assert_eq!(
                rows_of(server, schema, key),
                rows,
                "rows of the key in {schema} (migrate({migrate}))"
            );
        }
    }
}

/// The claim function's name, as the functions below alter it.
const CLAIM_FUNCTION: &str = "idempotency_keys_claim(bytea, bytea, bytea, bigint)";

/// A store in `schema` whose sessions are read-only, that does not migrate,
/// and purges (and so looks for the claim function) every 100 ms.
async fn read_only_store(schema: &str) -> PostgresStore {
    PostgresStore::builder(format!(
        "{}?options=-c%20default_transaction_read_only%3Don",
        shared().url()
    ))
    .schema(schema)
    .response_timeout(RESPONSE_TIMEOUT)
    .purge_interval(Duration::from_millis(100))
    .migrate(false)
    .connect()
    .await
    .unwrap()
}

async fn replay_of(store: &PostgresStore, key: Key, fp: Fingerprint) -> Result<u8, Failure> {
    Idempotency::new(store.clone())
        .run(&Settings::DEFAULT, key, fp, async { Ok::<_, Failure>(2) })
        .await
}

/// A running store takes up a claim function created after its first
/// claim (a migration run later, a function dropped and made again) at its
/// next purge's look: a replay then runs on a read-only session again.
#[tokio::test]
async fn a_claim_function_made_while_a_store_runs_is_taken_at_its_next_purge() {
    let server = shared();
    server.psql("DROP SCHEMA IF EXISTS made_later CASCADE");
    let writer = PostgresStore::builder(server.url())
        .schema("made_later")
        .connect()
        .await
        .unwrap();
    let (key, fp) = fresh("made-later");
    Idempotency::new(writer.clone())
        .run(&Settings::DEFAULT, key, fp, async {
            Ok::<_, Failure>(1_u8)
        })
        .await
        .unwrap();
    server.psql(&format!("DROP FUNCTION made_later.{CLAIM_FUNCTION}"));
    let read_only = read_only_store("made_later").await;
    assert!(
        replay_of(&read_only, key, fp).await.is_err(),
        "without the function, a replay does not run on a read-only session"
    );
    writer.migrate().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(replay_of(&read_only, key, fp).await.unwrap(), 1);
    // Dropped under a running store, which leaves it at its next claim,
    // and made again.
    server.psql(&format!("DROP FUNCTION made_later.{CLAIM_FUNCTION}"));
    let _ = replay_of(&read_only, key, fp).await;
    writer.migrate().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(replay_of(&read_only, key, fp).await.unwrap(), 1);
}

/// A claim function replaced by another text while a store runs (here one
/// that claims in `public`'s table) is left at the store's next purge: its
/// claims land in its own table again.
#[tokio::test]
async fn a_claim_function_replaced_while_a_store_runs_is_left_at_its_next_purge() {
    let server = shared();
    server.psql("DROP SCHEMA IF EXISTS replaced CASCADE");
    PostgresStore::connect(&server.url()).await.unwrap();
    let store = PostgresStore::builder(server.url())
        .schema("replaced")
        .response_timeout(RESPONSE_TIMEOUT)
        .purge_interval(Duration::from_millis(100))
        .connect()
        .await
        .unwrap();
    // A running store: it has made calls.
    runs_once_then_replays(&store, "replaced-warm").await;
    server.psql(&format!(
        "CREATE OR REPLACE FUNCTION replaced.{CLAIM_FUNCTION} RETURNS boolean \
         LANGUAGE plpgsql AS $f$ BEGIN \
           INSERT INTO public.idempotency_keys \
               (key, fingerprint, token, record, stored_at, expires_at) \
           VALUES ($1, $2, $3, NULL, now(), now() + $4 * interval '1 millisecond') \
           ON CONFLICT (key) DO NOTHING; \
           RETURN FOUND; \
         END $f$"
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (key, _) = runs_once_then_replays(&store, "replaced").await;
    for (schema, rows) in [("replaced", "1"), ("public", "0")] {
        assert_eq!(
            rows_of(server, schema, key),
            rows,
            "rows of the key in {schema}"
        );
    }
}

/// A claim function of idem's text declared otherwise (here `STABLE`,
/// where it must be `VOLATILE` to insert) is not used.
#[tokio::test]
async fn a_claim_function_declared_otherwise_is_not_used() {
    let server = shared();
    server.psql("DROP SCHEMA IF EXISTS declared_otherwise CASCADE");
    PostgresStore::builder(server.url())
        .schema("declared_otherwise")
        .connect()
        .await
        .unwrap();
    server.psql(&format!(
        "ALTER FUNCTION declared_otherwise.{CLAIM_FUNCTION} STABLE"
    ));
    let store = PostgresStore::builder(server.url())
        .schema("declared_otherwise")
        .response_timeout(RESPONSE_TIMEOUT)
        .connect()
        .await
        .unwrap();
    runs_once_then_replays(&store, "declared-otherwise").await;
}

/// While the database is down, a store that has not looked for the claim
/// function yet fails each call as a store that has does, within the
/// connect timeout and without a warning per call.
#[tokio::test]
async fn while_the_database_is_down_calls_do_not_each_look_for_the_claim_function() {
    let mut server = PostgresServer::start();
    let url = server.url();
    let builder = || {
        PostgresStore::builder(&url)
            .connect_timeout(Duration::from_millis(300))
            .response_timeout(Duration::from_secs(1))
    };
    let looked = builder().connect().await.unwrap();
    let (key, fp) = fresh("down");
    looked
        .begin(key, fp, Token::random(), Duration::from_secs(3))
        .await
        .unwrap();
    let not_looked = builder().migrate(false).connect_lazy().unwrap();
    server.kill();
    let logs = idem_test::logs::capture();
    for store in [&looked, &not_looked, &not_looked, &not_looked] {
        let started = Instant::now();
        let answer = store
            .begin(key, fp, Token::random(), Duration::from_secs(3))
            .await;
        let took = started.elapsed();
        match answer {
            Err(error) => assert_eq!(error.kind(), StoreErrorKind::Unavailable, "{error}"),
            Ok(begin) => panic!("the database is down, yet {begin:?}"),
        }
        assert!(took < Duration::from_millis(900), "{took:?}");
    }
    let logs = logs.text();
    assert!(!logs.contains("claim function"), "{logs}");
}

/// A first claim dropped while it looks for the claim function (its
/// caller gave up) does not leave the look marked under way: the next claim
/// looks, finds the function, and replays on a read-only session.
#[tokio::test]
async fn a_look_for_the_claim_function_cut_short_does_not_stop_the_next() {
    let server = shared();
    server.psql("DROP SCHEMA IF EXISTS cut_short CASCADE");
    let writer = PostgresStore::builder(server.url())
        .schema("cut_short")
        .connect()
        .await
        .unwrap();
    let (key, fp) = runs_once_then_replays(&writer, "cut-short").await;
    let read_only = PostgresStore::builder(format!(
        "{}?options=-c%20default_transaction_read_only%3Don",
        server.url()
    ))
    .schema("cut_short")
    .response_timeout(RESPONSE_TIMEOUT)
    .purge_interval(Duration::from_secs(3600))
    .migrate(false)
    .connect()
    .await
    .unwrap();
    // Polled once (which starts the look) and dropped at its first wait.
    let cut = tokio::time::timeout(
        Duration::from_micros(1),
        read_only.begin(key, fp, Token::random(), Duration::from_secs(3)),
    )
    .await;
    assert!(cut.is_err(), "the claim was cut short: {cut:?}");
    let replay = Idempotency::new(read_only)
        .run(&Settings::DEFAULT, key, fp, async {
            Ok::<_, Failure>(2_usize)
        })
        .await;
    assert_eq!(replay.unwrap(), 1, "replayed through the function");
}

/// Concurrent first claims of a store that does not migrate look for the
/// claim function once.
#[tokio::test]
async fn concurrent_first_claims_look_for_the_claim_function_once() {
    let (server, _) = logging_server("first_claims").await;
    let (_, mark) = statements_since(&server, 0);
    let store = PostgresStore::builder(server.url())
        .table("first_claims")
        .max_connections(8)
        .response_timeout(Duration::from_secs(2))
        .migrate(false)
        .connect()
        .await
        .unwrap();
    let claims = (0..8).map(|n| {
        let store = store.clone();
        async move {
            let (key, fp) = fresh(&format!("first-claims-{n}"));
            store
                .begin(key, fp, Token::random(), Duration::from_secs(3))
                .await
        }
    });
    for answer in futures_util::future::join_all(claims).await {
        assert!(matches!(answer, Ok(Begin::Claimed)), "{answer:?}");
    }
    let looks = server.log()[mark..]
        .matches("has_function_privilege")
        .count();
    assert_eq!(looks, 1);
}

/// Schema and table names with a backslash, on sessions whose
/// `standard_conforming_strings` is on or off (an older application's
/// setting): every statement reads them right, the fencing epoch's
/// included.
#[tokio::test]
async fn names_with_a_backslash_work_whatever_standard_conforming_strings() {
    let server = shared();
    for scs in ["on", "off"] {
        let schema = format!("back\\slash {scs}");
        server.psql(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"));
        let store = PostgresStore::builder(format!(
            "{}?options=-c%20standard_conforming_strings%3D{scs}",
            server.url()
        ))
        .schema(schema)
        .table("t\\able")
        .response_timeout(RESPONSE_TIMEOUT)
        .connect()
        .await
        .unwrap();
        let (key, fp) = fresh(&format!("backslash-{scs}"));
        let mut epochs = Vec::new();
        for _ in 0..2 {
            let epoch = Idempotency::new(store.clone())
                .run(&Settings::DEFAULT, key, fp, async {
                    Ok::<_, Failure>(idem_core::epoch().await?)
                })
                .await;
            epochs
                .push(epoch.unwrap_or_else(|e| panic!("standard_conforming_strings={scs}: {e:?}")));
        }
        assert!(epochs[0] > 0 && epochs[0] == epochs[1], "{epochs:?}");
    }
}

/// A store's own pool does not ping a connection before each statement
/// (sqlx's default, a round trip more per statement): replayed hits on one
/// connection send the hit's statement and the ping sqlx makes as each
/// connection comes back, two requests a hit, not three.
#[tokio::test]
async fn a_replayed_hit_on_the_stores_pool_is_one_round_trip() {
    let (proxy, store) = store_behind_a_proxy(idem_test::proxy::Fault::Pass, 1).await;
    let idem = Idempotency::new(store);
    let (key, fp) = fresh("one-round-trip");
    idem.run(&Settings::DEFAULT, key, fp, async { Ok::<_, Failure>(1) })
        .await
        .unwrap();
    // The first replay prepares the statement; the counted ones do not.
    idem.run(&Settings::DEFAULT, key, fp, async { Ok::<_, Failure>(2) })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let before = proxy.requests();
    for _ in 0..20 {
        let replay = idem
            .run(&Settings::DEFAULT, key, fp, async { Ok::<_, Failure>(2) })
            .await;
        assert_eq!(replay.unwrap(), 1);
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let sent = proxy.requests() - before;
    assert!(
        (40..=45).contains(&sent),
        "{sent} requests for 20 replays: a ping before each statement is back"
    );
}

/// The server processes of the store's 4 pooled connections: every
/// connection of the pool, held at once, tells its own, and goes back.
async fn backend_pids(store: &PostgresStore) -> Vec<i32> {
    let mut held = Vec::new();
    let mut pids = Vec::new();
    for _ in 0..4 {
        let mut connection = store.pool().acquire().await.unwrap();
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut *connection)
            .await
            .unwrap();
        pids.push(pid);
        held.push(connection);
    }
    pids
}

/// A pooled connection the server closed while it was idle (here by
/// `pg_terminate_backend`; a restart or an idle timeout alike) is pinged
/// before use once it has been idle longer than `PING_AFTER_IDLE`, and
/// replaced: no call fails for it.
#[tokio::test]
async fn a_connection_closed_while_idle_is_replaced_before_use() {
    let server = shared();
    let store = connect(&server.url()).await;
    let idem = Idempotency::new(store.clone());
    let (key, fp) = fresh("closed-while-idle");
    idem.run(&Settings::DEFAULT, key, fp, async { Ok::<_, Failure>(1) })
        .await
        .unwrap();
    let pids: Vec<String> = backend_pids(&store)
        .await
        .iter()
        .map(ToString::to_string)
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        server.psql(&format!(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE pid IN ({})) t",
            pids.join(", ")
        )),
        "4"
    );
    tokio::time::sleep(idem_core::store::postgres::PING_AFTER_IDLE + Duration::from_millis(50))
        .await;
    for n in 0..8 {
        let replay = idem
            .run(&Settings::DEFAULT, key, fp, async { Ok::<_, Failure>(2) })
            .await;
        assert_eq!(replay.unwrap(), 1, "call {n} after the connections closed");
    }
}

/// A restart (or an operator's `pg_terminate_backend`) closes every
/// connection at once, also those used a moment ago, which the pool would
/// hand out without a ping: a claim that finds its connection closed is
/// sent once more, after the pool was told to ping every connection idle
/// since before, so no call fails, whether the calls come one after another
/// or all at once, through the store's protocol or in transactions (whose
/// `BEGIN` is sent once more alike).
#[tokio::test]
async fn connections_closed_together_fail_no_call() {
    let server = shared();
    // Time enough for the new connections on a loaded machine: the test is
    // about calls failing, not about how fast the pool reconnects.
    let store = PostgresStore::builder(server.url())
        .response_timeout(Duration::from_secs(5))
        .max_connections(4)
        .connect()
        .await
        .unwrap();
    let idem = Idempotency::new(store.clone());
    let (key, fp) = fresh("closed-together");
    idem.run(&Settings::DEFAULT, key, fp, async { Ok::<_, Failure>(1) })
        .await
        .unwrap();
    let (tx_key, tx_fp) = fresh("closed-together-in-transactions");
    let in_transaction = |answer: i64| {
        let store = store.clone();
        async move {
            store
                .run_in_transaction(&Settings::DEFAULT, tx_key, tx_fp, move |_tx| {
                    Box::pin(async move { Ok::<_, Failure>(answer) })
                })
                .await
        }
    };
    in_transaction(1).await.unwrap();
    let mut operator = <PgConnection as sqlx::Connection>::connect(&server.url())
        .await
        .unwrap();
    for round in 0..8 {
        let pids = backend_pids(&store).await;
        // Back in the pool (sqlx pings each on its way back), then closed
        // by the server, well within `PING_AFTER_IDLE` of their last use.
        while store.pool().num_idle() < 4 {
            tokio::task::yield_now().await;
        }
        let closed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE pid = ANY($1)) t",
        )
        .bind(&pids)
        .fetch_one(&mut operator)
        .await
        .unwrap();
        assert_eq!(closed, 4);
        let calls = (0..8).map(|_| {
            let idem = idem.clone();
            let transactional = in_transaction(2);
            async move {
                // Rounds 4 to 7 in transactions.
                if round < 4 {
                    idem.run(&Settings::DEFAULT, key, fp, async { Ok::<_, Failure>(2) })
                        .await
                        .map(i64::from)
                } else {
                    transactional.await
                }
            }
        });
        // Even rounds one call after another, odd ones all at once.
        let answers = if round % 2 == 0 {
            let mut answers = Vec::new();
            for call in calls {
                answers.push(call.await);
            }
            answers
        } else {
            futures_util::future::join_all(calls).await
        };
        for (n, answer) in answers.into_iter().enumerate() {
            assert_eq!(
                answer.unwrap(),
                1,
                "round {round}, call {n}, after the server closed the pool's 4 connections"
            );
        }
    }
}

#[tokio::test]
async fn migrating_is_idempotent_and_safe_to_race() {
    let store = connect(&shared().url()).await;
    let mut racing = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let store = store.clone();
        racing.spawn(async move { store.migrate().await });
    }
    for result in racing.join_all().await {
        result.expect("a concurrent migration");
    }
    let custom = PostgresStore::builder(shared().url())
        .response_timeout(RESPONSE_TIMEOUT)
        .schema("billing")
        .table("idem_keys")
        .connect()
        .await
        .expect("a schema and table of its own");
    let caller = Caller::new(&Idempotency::new(custom), postgres_server::TIMING);
    let (key, fp) = fresh("custom-table");
    assert_eq!(
        caller
            .run(key, fp, async { Ok::<_, Failure>(1) })
            .await
            .unwrap(),
        1
    );
    assert_eq!(shared().psql("SELECT count(*) FROM billing.idem_keys"), "1");
}

/// Connecting (which migrates) does not wait for calls in flight: a
/// transactional call holding its transaction open has written to the
/// table, and creating an index that exists already would wait for it.
#[tokio::test]
async fn connecting_does_not_wait_for_transactions_in_flight() {
    let server = shared();
    let store = connect(&server.url()).await;
    let key = Key::new(&op("migrating"), "held").unwrap();
    let fp = Fingerprint::of(&1).unwrap();
    let (holder, gate) = hold_in_transaction(&store, Settings::DEFAULT, key, fp, 1).await;
    // Within RESPONSE_TIMEOUT (500 ms), while the holder's claim is open.
    let second = connect(&server.url()).await;
    second
        .migrate()
        .await
        .expect("a migration beside a call in flight");
    gate.notify_one();
    assert_eq!(holder.await.unwrap().unwrap(), 1);
}

/// A transactional call that waits for the key's holder in another process
/// (on the key's lock) is told with its wait, whatever ends it: here the
/// wait timeout (`in_progress`).
#[tokio::test]
async fn a_transactional_wait_is_measured_however_it_ends() {
    let logs = idem_test::logs::capture();
    let store = connect(&shared().url()).await;
    let elsewhere = connect(&shared().url()).await;
    let key = Key::new(&op("wait-measured"), "held").unwrap();
    let fp = Fingerprint::of(&1).unwrap();
    let (holder, gate) = hold_in_transaction(&store, Settings::DEFAULT, key, fp, 1).await;
    let waiting = Settings::builder()
        .wait_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let answer = elsewhere
        .run_in_transaction(&waiting, key, fp, |_tx| {
            Box::pin(async { Ok::<_, ChargeError>(2) })
        })
        .await;
    assert!(
        matches!(&answer, Err(ChargeError::Idem(error)) if error.contains("still in progress")),
        "{answer:?}"
    );
    gate.notify_one();
    assert_eq!(holder.await.unwrap().unwrap(), 1);
    let told = logs.text();
    let line = told
        .lines()
        .find(|line| line.contains("close") && line.contains("outcome=\"in_progress\""))
        .unwrap_or_else(|| panic!("no in_progress call in {told}"));
    assert!(wait_ms_of(line) >= 250.0, "{line}");

    // Waited for, then found written with other arguments: `key_reused`.
    let key = Key::new(&op("wait-measured"), "reused").unwrap();
    let (holder, gate) = hold_in_transaction(&store, Settings::DEFAULT, key, fp, 1).await;
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        gate.notify_one();
        holder.await.unwrap().unwrap()
    });
    let other = Fingerprint::of(&2).unwrap();
    let answer = elsewhere
        .run_in_transaction(&Settings::DEFAULT, key, other, |_tx| {
            Box::pin(async { Ok::<_, ChargeError>(2) })
        })
        .await;
    assert!(
        matches!(&answer, Err(ChargeError::Idem(error)) if error.contains("different arguments")),
        "{answer:?}"
    );
    assert_eq!(release.await.unwrap(), 1);
    let told = logs.text();
    let line = told
        .lines()
        .find(|line| line.contains("close") && line.contains("outcome=\"key_reused\""))
        .unwrap_or_else(|| panic!("no key_reused call in {told}"));
    assert!(wait_ms_of(line) >= 250.0, "{line}");
}

/// The `wait_ms` of a call's closing line.
fn wait_ms_of(line: &str) -> f64 {
    line.split("wait_ms=")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| c != '.' && !c.is_ascii_digit()).next())
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("no wait_ms in {line}"))
}

/// A store of one pooled connection, for tests of who holds it.
async fn one_connection_store() -> PostgresStore {
    PostgresStore::builder(shared().url())
        .response_timeout(RESPONSE_TIMEOUT)
        .max_connections(1)
        .connect()
        .await
        .unwrap()
}

/// A transactional call of `key` on `store` whose body takes `holding` and
/// answers 3, tried again every 250 ms while it fails (its `BEGIN` found
/// no free connection), for at most 6 s.
async fn run_once_a_connection_is_free(
    store: &PostgresStore,
    key: Key,
    holding: Duration,
) -> Result<i64, ChargeError> {
    let since = Instant::now();
    let fp = Fingerprint::of(&1).unwrap();
    loop {
        let answer = store
            .run_in_transaction(&Settings::DEFAULT, key, fp, |_tx| {
                Box::pin(async move {
                    tokio::time::sleep(holding).await;
                    Ok::<_, ChargeError>(3)
                })
            })
            .await;
        if answer.is_ok() || since.elapsed() > Duration::from_secs(6) {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A transactional waiter that finds no free connection on its store for
/// its next look at the key (it hands its connection back between looks)
/// answers `InProgress`, as when its wait ends, not a store failure.
#[tokio::test]
async fn a_waiter_without_a_free_connection_is_in_progress() {
    let holder_store = connect(&shared().url()).await;
    let waiter_store = one_connection_store().await;
    let key = Key::new(&op("waiter-without-connection"), "held").unwrap();
    let fp = Fingerprint::of(&1).unwrap();
    let (holder, gate) = hold_in_transaction(&holder_store, Settings::DEFAULT, key, fp, 1).await;
    let waiting = Settings::builder()
        .wait_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let waiter = {
        let store = waiter_store.clone();
        tokio::spawn(async move {
            store
                .run_in_transaction(&waiting, key, fp, |_tx| {
                    Box::pin(async { Ok::<_, ChargeError>(2) })
                })
                .await
        })
    };
    // Another key's call takes the connection when one of the waiter's
    // looks hands it back (asking until it gets it), and keeps it past a
    // response timeout.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let other = Key::new(&op("waiter-without-connection"), "other").unwrap();
    let busy =
        run_once_a_connection_is_free(&waiter_store, other, Duration::from_millis(1_500)).await;
    assert_eq!(busy.unwrap(), 3);
    let waited = waiter.await.unwrap();
    assert!(matches!(&waited, Err(e) if e.in_progress()), "{waited:?}");
    gate.notify_one();
    assert_eq!(holder.await.unwrap().unwrap(), 1);
}

/// A transactional waiter in another process whose caller gave up (a
/// timeout around the call, a dropped request) gives its pooled connection
/// back within about a second of lock wait, not when the holder ends: calls
/// of other keys on its store go on meanwhile.
#[tokio::test]
async fn a_cancelled_transactional_waiter_gives_its_connection_back() {
    let holder_store = connect(&shared().url()).await;
    let waiter_store = one_connection_store().await;
    let key = Key::new(&op("cancelled-waiter"), "held").unwrap();
    let fp = Fingerprint::of(&1).unwrap();
    let (holder, gate) = hold_in_transaction(&holder_store, Settings::DEFAULT, key, fp, 1).await;
    let waiting = waiter_store.run_in_transaction(&Settings::DEFAULT, key, fp, |_tx| {
        Box::pin(async { Ok::<_, ChargeError>(2) })
    });
    let gave_up = tokio::time::timeout(Duration::from_millis(200), waiting).await;
    assert!(gave_up.is_err(), "the caller gave up");
    // Bounded well past a slice and a response timeout; the holder holds
    // its key all along.
    let other = Key::new(&op("cancelled-waiter"), "other").unwrap();
    let answer = run_once_a_connection_is_free(&waiter_store, other, Duration::ZERO).await;
    assert_eq!(
        answer.unwrap(),
        3,
        "another key's call, while the holder runs"
    );
    gate.notify_one();
    assert_eq!(holder.await.unwrap().unwrap(), 1);
}

#[tokio::test]
async fn connect_by_url_names_both_schemes() {
    let url = shared().url();
    // Schemes are case-insensitive.
    for url in [
        url.clone(),
        url.replacen("postgres://", "postgresql://", 1),
        url.replacen("postgres://", "POSTGRES://", 1),
        url.replacen("postgres://", "PostgreSQL://", 1),
    ] {
        let idem = Idempotency::connect(&url).await.expect("connects");
        let (key, fp) = fresh("by-url");
        let result = idem
            .run(&Settings::DEFAULT, key, fp, async { Ok::<_, Failure>(5) })
            .await;
        assert_eq!(result.unwrap(), 5);
    }
    let port = idem_test::process::free_port();
    let err = idem_core::connect(&format!("postgres://app:s3cret@127.0.0.1:{port}/x"))
        .await
        .err()
        .expect("nothing listens");
    assert_eq!(err.kind(), StoreErrorKind::Unavailable, "{err}");
    assert!(!err.to_string().contains("s3cret"), "{err}");
}

/// A URL that is not PostgreSQL's is a configuration error, named as such,
/// before anything is dialled: sqlx alone would read its host and port and
/// ignore its scheme.
#[tokio::test]
async fn a_url_of_another_scheme_is_a_config_error() {
    for url in [
        "redis://:s3cret@127.0.0.1:6379/0",
        "http://app:s3cret@127.0.0.1/x",
        "127.0.0.1:5432/x",
        "postgres:/x",
    ] {
        let err = PostgresStore::connect(url).await.expect_err(url);
        assert_eq!(err.kind(), StoreErrorKind::Config, "{url}: {err}");
        assert!(err.to_string().contains("not a PostgreSQL URL"), "{err}");
        assert!(!err.to_string().contains("s3cret"), "{err}");
        let lazy = PostgresStore::builder(url).connect_lazy().expect_err(url);
        assert_eq!(lazy.kind(), StoreErrorKind::Config, "{url}: {lazy}");
    }
    for url in [
        "POSTGRES://127.0.0.1/x",
        "PostgreSQL://127.0.0.1/x",
        " postgres://127.0.0.1/x\n",
    ] {
        PostgresStore::builder(url)
            .connect_lazy()
            .unwrap_or_else(|e| panic!("{url}: {e}"));
    }
}

/// A server that logs every statement, and a store on it (with its own
/// `table`) that is its only client.
async fn logging_server(table: &str) -> (PostgresServer, PostgresStore) {
    let server = PostgresServer::start_with(&["log_statement=all"]);
    let store = PostgresStore::builder(server.url())
        .table(table)
        .purge_interval(Duration::from_secs(3600))
        .connect()
        .await
        .unwrap();
    (server, store)
}

/// The statements logged from byte `from` of a server's statement log on.
fn statements(log: &str, from: usize) -> Vec<&str> {
    // sqlx uses the extended protocol: each statement is logged as it runs,
    // `execute <name>: …`; simple-protocol ones as `statement: …`.
    log[from..]
        .lines()
        .filter(|line| line.contains("LOG:  execute ") || line.contains("LOG:  statement: "))
        .collect()
}

/// Counts the statements run since `from` in the server's statement log
/// (the store is its only client), and answers where the log ends now.
fn statements_since(server: &PostgresServer, from: usize) -> (usize, usize) {
    let log = server.log();
    (statements(&log, from).len(), log.len())
}

/// A replayed hit is one statement, read-only; a first run two; a failed run
/// two.
#[tokio::test]
async fn round_trips_per_call_are_one_two_and_two() {
    let (server, store) = logging_server("round_trips").await;
    let idem = Idempotency::new(store);
    let settings = Settings::DEFAULT;
    let (key, fp) = fresh("round-trips");
    let (_, mark) = statements_since(&server, 0);
    idem.run(&settings, key, fp, async { Ok::<_, Failure>(1) })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (first, mark) = statements_since(&server, mark);
    assert_eq!(first, 2, "a first run is begin + complete");
    idem.run(&settings, key, fp, async { Ok::<_, Failure>(2) })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (hit, mark) = statements_since(&server, mark);
    assert_eq!(hit, 1, "a replayed hit is one statement");
    let (key, fp) = fresh("round-trips-failed");
    let _ = idem
        .run(&settings, key, fp, async { Err::<u8, _>(Failure::Body(1)) })
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (failed, _) = statements_since(&server, mark);
    assert_eq!(failed, 2, "a failed run is begin + release");
}

/// A waiter in another process is woken by NOTIFY as the holder completes,
/// not by its polling backoff.
#[tokio::test]
async fn waiters_elsewhere_are_woken_by_notify() {
    let url = shared().url();
    let timing = Timing {
        lease: Duration::from_secs(6),
        ttl: Duration::from_secs(30),
    };
    let (key, fp) = fresh("notify");
    let (go, gate) = tokio::sync::oneshot::channel::<()>();
    let holder = Caller::new(&Idempotency::new(connect(&url).await), timing)
        .hold(key, fp, async move {
            let _ = gate.await;
            Ok(1_u8)
        })
        .await;
    let waiter = {
        let caller = Caller::new(&Idempotency::new(connect(&url).await), timing);
        tokio::spawn(async move {
            let result = caller.run(key, fp, async { Ok::<_, Failure>(2_u8) }).await;
            (result, Instant::now())
        })
    };
    // Long enough for a polling waiter's backoff to have grown to a second.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let completed = Instant::now();
    go.send(()).unwrap();
    assert_eq!(holder.await.unwrap().unwrap(), 1);
    let (result, woken) = waiter.await.unwrap();
    assert_eq!(result.unwrap(), 1, "the holder's result");
    let delay = woken.duration_since(completed);
    assert!(
        delay < Duration::from_millis(400),
        "woken {delay:?} after completion"
    );
}

/// Expired rows are deleted in batches in the background, without a cron.
#[tokio::test]
async fn expired_rows_are_purged() {
    let server = shared();
    let store = PostgresStore::builder(server.url())
        .response_timeout(Duration::from_millis(150))
        .table("purged")
        .purge_interval(Duration::from_millis(200))
        .purge_batch(7)
        .connect()
        .await
        .unwrap();
    let idem = Idempotency::new(store);
    let settings = Settings::builder()
        .ttl(Duration::from_secs(1))
        .lease(Duration::from_millis(500))
        .build()
        .unwrap();
    for i in 0..30 {
        let key = Key::new("purge", &(i, Token::random().to_string())).unwrap();
        idem.run(&settings, key, Fingerprint::of(&i).unwrap(), async {
            Ok::<_, Failure>(i)
        })
        .await
        .unwrap();
    }
    assert_eq!(server.psql("SELECT count(*) FROM purged"), "30");
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.psql("SELECT count(*) FROM purged") != "0" {
        assert!(Instant::now() < deadline, "expired rows were not purged");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// --- transactional mode ---------------------------------------------------

fn charges(server: &PostgresServer, op: &str) -> usize {
    server
        .psql(&format!("SELECT count(*) FROM charges WHERE op = '{op}'"))
        .parse()
        .unwrap()
}

fn ensure_charges(server: &PostgresServer) {
    // Concurrent `CREATE TABLE IF NOT EXISTS` can still collide in the
    // catalog: the tests of this process create it one at a time.
    static CREATING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = CREATING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    server.psql(
        "CREATE TABLE IF NOT EXISTS charges (id bigserial PRIMARY KEY, op text NOT NULL, \
         amount bigint NOT NULL)",
    );
}

/// Creates `database` on `server` with `level` as its default isolation,
/// and answers its URL.
fn database_at(server: &PostgresServer, database: &str, level: &str) -> String {
    server.psql(&format!("CREATE DATABASE {database}"));
    server.psql(&format!(
        "ALTER DATABASE {database} SET default_transaction_isolation TO '{level}'"
    ));
    format!("{}/{database}", server.url().rsplit_once('/').unwrap().0)
}

#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
enum ChargeError {
    Declined,
    Db(String),
    Idem(String),
}

impl From<Error> for ChargeError {
    fn from(error: Error) -> Self {
        Self::Idem(error.to_string())
    }
}

impl From<sqlx::Error> for ChargeError {
    fn from(error: sqlx::Error) -> Self {
        Self::Db(error.to_string())
    }
}

impl ChargeError {
    fn is_declined(&self) -> bool {
        matches!(self, Self::Declined)
    }

    fn in_progress(&self) -> bool {
        matches!(self, Self::Idem(m) if m.contains("in progress"))
    }
}

/// A service whose charge and its record commit in one transaction.
struct Shop {
    pg: PostgresStore,
    runs: AtomicU32,
}

impl Shop {
    async fn new(url: &str) -> Self {
        Self {
            pg: connect(url).await,
            runs: AtomicU32::new(0),
        }
    }

    #[idempotent(key = (op, order), store = self.pg, transaction = tx, wait_timeout = "10s")]
    async fn charge(
        &self,
        tx: &mut PgConnection,
        op: String,
        order: u32,
        amount: i64,
    ) -> Result<i64, ChargeError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        let id: i64 =
            sqlx::query_scalar("INSERT INTO charges (op, amount) VALUES ($1, $2) RETURNING id")
                .bind(&op)
                .bind(amount)
                .fetch_one(&mut *tx)
                .await?;
        if amount == 13 {
            return Err(ChargeError::Declined);
        }
        assert_ne!(amount, 66, "the card reader broke");
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok(id)
    }

    /// Declines are cached: the insert is rolled back, the decline stored.
    #[idempotent(key = (op, order), store = self.pg, transaction = tx, cache_errors = ChargeError::is_declined)]
    async fn charge_caching(
        &self,
        tx: &mut PgConnection,
        op: String,
        order: u32,
        amount: i64,
    ) -> Result<i64, ChargeError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        let id: i64 =
            sqlx::query_scalar("INSERT INTO charges (op, amount) VALUES ($1, $2) RETURNING id")
                .bind(&op)
                .bind(amount)
                .fetch_one(&mut *tx)
                .await?;
        if amount == 13 {
            return Err(ChargeError::Declined);
        }
        Ok(id)
    }

    /// Calls itself, with its own key, from inside its body.
    #[idempotent(key = (op, order), store = self.pg, transaction = tx, wait_timeout = "20s")]
    async fn charge_reentering(
        &self,
        tx: &mut PgConnection,
        op: String,
        order: u32,
    ) -> Result<String, ChargeError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        sqlx::query("INSERT INTO charges (op, amount) VALUES ($1, 1)")
            .bind(&op)
            .execute(&mut *tx)
            .await?;
        let inner = Box::pin(self.charge_reentering(op, order)).await;
        Ok(format!("{inner:?}"))
    }

    /// Rejects duplicates at once; waits on `gate` to hold the key.
    #[idempotent(key = (op, order), store = self.pg, transaction = tx, on_conflict = reject, skip(gate, held))]
    async fn charge_rejecting(
        &self,
        tx: &mut PgConnection,
        op: String,
        order: u32,
        gate: Arc<tokio::sync::Notify>,
        held: Option<tokio::sync::oneshot::Sender<i32>>,
    ) -> Result<i64, ChargeError> {
        let id: i64 =
            sqlx::query_scalar("INSERT INTO charges (op, amount) VALUES ($1, 1) RETURNING id")
                .bind(&op)
                .fetch_one(&mut *tx)
                .await?;
        if let Some(held) = held {
            let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
                .fetch_one(&mut *tx)
                .await?;
            let _ = held.send(pid);
        }
        gate.notified().await;
        Ok(id)
    }
}

/// A `charge_rejecting` call of `op` that holds its key mid-body, in its
/// transaction, until the answered gate opens; with its backend's pid.
async fn hold_rejecting(
    shop: &Arc<Shop>,
    op: &str,
) -> (
    tokio::task::JoinHandle<Result<i64, ChargeError>>,
    Arc<tokio::sync::Notify>,
    i32,
) {
    let gate = Arc::new(tokio::sync::Notify::new());
    let (held, pid) = tokio::sync::oneshot::channel();
    let holder = {
        let (shop, op, gate) = (Arc::clone(shop), op.to_owned(), Arc::clone(&gate));
        tokio::spawn(async move { shop.charge_rejecting(op, 1, gate, Some(held)).await })
    };
    (holder, gate, pid.await.unwrap())
}

/// A `run_in_transaction` call that holds `key` with its transaction open
/// until the answered gate opens, then answers `receipt`.
async fn hold_in_transaction(
    store: &PostgresStore,
    settings: Settings,
    key: Key,
    fingerprint: Fingerprint,
    receipt: i64,
) -> (
    tokio::task::JoinHandle<Result<i64, ChargeError>>,
    Arc<tokio::sync::Notify>,
) {
    let gate = Arc::new(tokio::sync::Notify::new());
    let (held, claimed) = tokio::sync::oneshot::channel();
    let holder = {
        let (store, gate) = (store.clone(), Arc::clone(&gate));
        tokio::spawn(async move {
            store
                .run_in_transaction(&settings, key, fingerprint, |_tx| {
                    Box::pin(async move {
                        let _ = held.send(());
                        gate.notified().await;
                        Ok::<_, ChargeError>(receipt)
                    })
                })
                .await
        })
    };
    claimed.await.unwrap();
    (holder, gate)
}

/// A transactional call that calls its own key from inside its body (on
/// the same store) fails at once with `Reentered`, instead of waiting for
/// its own advisory lock until its `wait_timeout`: through the attribute
/// and through `run_in_transaction`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transactional_call_that_reenters_its_key_fails_at_once() {
    let server = shared();
    ensure_charges(server);
    let shop = Shop::new(&server.url()).await;
    let op = op("reenter");
    let inner = tokio::time::timeout(
        Duration::from_secs(10),
        shop.charge_reentering(op.clone(), 1),
    )
    .await
    .expect("re-entry fails at once")
    .unwrap();
    assert!(
        inner.contains("re-entered") || inner.contains("from inside the body"),
        "{inner}"
    );
    assert!(inner.contains("charge_reentering"), "{inner}");
    assert_eq!(
        shop.runs.load(Ordering::SeqCst),
        1,
        "the inner call ran nothing"
    );

    let store = shop.pg.clone();
    let key = Key::new("tests.postgres.reenter", &op).unwrap();
    let fp = Fingerprint::of(&1).unwrap();
    let settings = Settings::builder()
        .wait_timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let inner_store = store.clone();
    let outer = tokio::time::timeout(
        Duration::from_secs(10),
        store.run_in_transaction(&settings, key, fp, move |_tx| {
            Box::pin(async move {
                let inner = inner_store
                    .run_in_transaction(&settings, key, fp, |_tx| {
                        Box::pin(async { Ok::<_, Error>(2) })
                    })
                    .await;
                Ok::<_, Error>(matches!(inner, Err(Error::Reentered { .. })))
            })
        }),
    )
    .await
    .expect("re-entry fails at once");
    assert!(outer.unwrap(), "the inner call is Reentered");
}

fn op(test: &str) -> String {
    format!("{test}-{}", Token::random())
}

/// Concurrent duplicates in one process: one charge row, one body run, the
/// same receipt everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactional_duplicates_commit_one_charge() {
    ensure_charges(shared());
    let shop = Arc::new(Shop::new(&shared().url()).await);
    let op = op("duplicates");
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..40 {
        let (shop, op) = (Arc::clone(&shop), op.clone());
        callers.spawn(async move { shop.charge(op, 1, 100).await });
    }
    let receipts: Vec<i64> = callers
        .join_all()
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert!(receipts.iter().all(|r| *r == receipts[0]), "{receipts:?}");
    assert_eq!(shop.runs.load(Ordering::SeqCst), 1);
    assert_eq!(charges(shared(), &op), 1);
}

/// Four processes × 250 callers on one key: exactly one charge row and
/// identical receipts everywhere.
#[test]
fn transactional_exactly_once_across_four_processes() {
    let server = shared();
    ensure_charges(server);
    let op = op("processes");
    let processes: Vec<_> = (0..4)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_idem-pg-storm"))
                .args(["charge", &server.url(), &op, "250"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start a storm process")
        })
        .collect();
    let mut receipts = Vec::new();
    for process in processes {
        let out = process.wait_with_output().expect("a storm process ends");
        assert!(
            out.status.success(),
            "a storm process failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        receipts.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_owned),
        );
    }
    assert_eq!(receipts.len(), 1000);
    assert!(
        receipts.iter().all(|r| *r == receipts[0]),
        "identical receipts"
    );
    assert_eq!(charges(server, &op), 1, "one charge row");
}

/// The process holding the transaction is killed mid-body: neither its
/// charge nor its claim remains, and the retry runs once.
#[tokio::test]
async fn a_killed_holder_leaves_neither_effect_nor_claim() {
    let server = shared();
    ensure_charges(server);
    let op = op("killed");
    let mut holder = Command::new(env!("CARGO_BIN_EXE_idem-pg-storm"))
        .args(["hold", &server.url(), &op])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the holder");
    let mut line = String::new();
    BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "holding");
    // The holder has the key's advisory lock until its transaction ends:
    // `inspect` shows it in progress (only the lock tells, its row is not
    // committed).
    let key = Key::new(&op, "the-one-key").unwrap();
    let store = connect(&server.url()).await;
    let operator = Idempotency::new(store.clone());
    assert!(
        matches!(
            operator.inspect(key).await.unwrap(),
            idem_core::Inspection::InProgress { .. }
        ),
        "the holder holds the key"
    );
    holder.kill().unwrap();
    holder.wait().unwrap();
    // The server rolls the dead client's transaction back.
    let deadline = Instant::now() + Duration::from_secs(10);
    while operator.inspect(key).await.unwrap() != idem_core::Inspection::Absent {
        assert!(
            Instant::now() < deadline,
            "the dead holder's transaction stayed open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(charges(server, &op), 0, "no charge");
    assert_eq!(
        server.psql(&format!(
            "SELECT count(*) FROM idempotency_keys WHERE key = '\\x{key}'"
        )),
        "0",
        "no claim"
    );
    let settings = Settings::DEFAULT;
    let op2 = op.clone();
    let id: i64 = store
        .run_in_transaction(&settings, key, Fingerprint::of(&100).unwrap(), |tx| {
            Box::pin(async move {
                let id = sqlx::query_scalar(
                    "INSERT INTO charges (op, amount) VALUES ($1, 100) RETURNING id",
                )
                .bind(&op2)
                .fetch_one(tx)
                .await
                .map_err(ChargeError::from)?;
                Ok::<_, ChargeError>(id)
            })
        })
        .await
        .unwrap();
    assert!(id > 0);
    assert_eq!(charges(server, &op), 1, "the retry ran once");
}

/// The holder's connection is terminated by the server mid-body: its
/// caller gets a store error, nothing is committed, the retry runs once.
#[tokio::test]
async fn a_terminated_connection_commits_nothing() {
    let server = shared();
    ensure_charges(server);
    let shop = Arc::new(Shop::new(&server.url()).await);
    let op = op("terminated");
    let (holder, gate, pid) = hold_rejecting(&shop, &op).await;
    assert_eq!(
        server.psql(&format!("SELECT pg_terminate_backend({pid})")),
        "t"
    );
    gate.notify_one();
    match holder.await.unwrap() {
        Err(ChargeError::Idem(message)) => assert!(message.contains("store"), "{message}"),
        other => panic!("expected a store error, got {other:?}"),
    }
    assert_eq!(charges(server, &op), 0, "nothing was committed");
    let gate = Arc::new(tokio::sync::Notify::new());
    gate.notify_one();
    shop.charge_rejecting(op.clone(), 1, gate, None)
        .await
        .unwrap();
    assert_eq!(charges(server, &op), 1, "the retry ran once");
}

/// `reject` answers `InProgress` within milliseconds while the holder runs,
/// without blocking.
#[tokio::test]
async fn reject_answers_at_once_while_the_holder_runs() {
    let server = shared();
    ensure_charges(server);
    let shop = Arc::new(Shop::new(&server.url()).await);
    let op = op("reject");
    let (holder, gate, _pid) = hold_rejecting(&shop, &op).await;
    for _ in 0..5 {
        let started = Instant::now();
        let refused = shop
            .charge_rejecting(op.clone(), 1, Arc::new(tokio::sync::Notify::new()), None)
            .await
            .unwrap_err();
        assert!(refused.in_progress(), "{refused:?}");
        assert!(
            started.elapsed() < Duration::from_millis(200),
            "{:?}",
            started.elapsed()
        );
    }
    gate.notify_one();
    let receipt = holder.await.unwrap().unwrap();
    let gate = Arc::new(tokio::sync::Notify::new());
    let replay = shop
        .charge_rejecting(op.clone(), 1, gate, None)
        .await
        .unwrap();
    assert_eq!(replay, receipt, "replayed after the commit");
    assert_eq!(charges(server, &op), 1);
}

/// An `Err` rolls the body's writes back with the claim: the retry runs
/// again. A cached `Err` is stored (the writes rolled back to a savepoint)
/// and replayed. Another amount under one key is refused.
#[tokio::test]
async fn errors_roll_back_and_cached_errors_replay() {
    let server = shared();
    ensure_charges(server);
    let shop = Shop::new(&server.url()).await;

    let op_plain = op("declined");
    assert_eq!(
        shop.charge(op_plain.clone(), 1, 13).await,
        Err(ChargeError::Declined)
    );
    assert_eq!(charges(server, &op_plain), 0, "the insert was rolled back");
    assert_eq!(
        shop.charge(op_plain.clone(), 1, 13).await,
        Err(ChargeError::Declined)
    );
    assert_eq!(
        shop.runs.load(Ordering::SeqCst),
        2,
        "not cached: the retry ran"
    );

    let op_cached = op("declined-cached");
    let before = shop.runs.load(Ordering::SeqCst);
    for _ in 0..3 {
        assert_eq!(
            shop.charge_caching(op_cached.clone(), 1, 13).await,
            Err(ChargeError::Declined)
        );
    }
    assert_eq!(
        shop.runs.load(Ordering::SeqCst),
        before + 1,
        "cached: replayed"
    );
    assert_eq!(charges(server, &op_cached), 0, "the insert was rolled back");

    let op_reused = op("reused");
    shop.charge(op_reused.clone(), 1, 100).await.unwrap();
    let reused = shop.charge(op_reused.clone(), 1, 200).await.unwrap_err();
    assert!(
        matches!(&reused, ChargeError::Idem(m) if m.contains("different arguments")),
        "{reused:?}"
    );
    assert_eq!(charges(server, &op_reused), 1);
}

/// The server restarted mid-run: calls fail closed (503) while it is down,
/// and the same store (its pool) recovers.
#[tokio::test]
async fn a_restarted_server_fails_closed_then_recovers() {
    let mut server = PostgresServer::start();
    ensure_charges(&server);
    let shop = Shop::new(&server.url()).await;
    let op = op("restart");
    shop.charge(op.clone(), 1, 100).await.unwrap();
    let epoch = || async {
        let (key, fp) = fresh("epoch-across-restarts");
        Idempotency::new(shop.pg.clone())
            .run(&Settings::DEFAULT, key, fp, async {
                Ok::<_, Failure>(idem_core::epoch().await?)
            })
            .await
    };
    let before_crash = epoch().await.expect("an epoch");
    server.kill();
    let runs = shop.runs.load(Ordering::SeqCst);
    for order in 2..4 {
        match shop.charge(op.clone(), order, 100).await {
            Err(ChargeError::Idem(message)) => assert!(message.contains("store"), "{message}"),
            other => panic!("expected a store error, got {other:?}"),
        }
    }
    assert_eq!(
        shop.runs.load(Ordering::SeqCst),
        runs,
        "no body ran unguarded"
    );
    let idem = Idempotency::new(shop.pg.clone());
    let (key, fp) = fresh("during-restart");
    let down = idem
        .run(&Settings::DEFAULT, key, fp, async { Ok::<_, Failure>(1) })
        .await;
    match down {
        Err(Failure::Idem(error @ Error::Store(_))) => assert_eq!(error.http_status(), 503),
        other => panic!("expected a store error, got {other:?}"),
    }
    server.restart();
    let mut recovered = shop.charge(op.clone(), 4, 100).await;
    for _ in 0..50 {
        if recovered.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        recovered = shop.charge(op.clone(), 4, 100).await;
    }
    recovered.expect("the same pool recovers");
    assert_eq!(charges(&server, &op), 2);
    let after_crash = epoch().await.expect("an epoch");
    assert!(
        after_crash > before_crash,
        "fencing epochs keep increasing across a crash: {after_crash} > {before_crash}"
    );
}

/// A transactional first run is five round trips: `BEGIN` with the key's
/// advisory lock, the claim, the body's statement, the record, `COMMIT`. A
/// replay is two (`BEGIN` with the lock, and the claim, which reads the
/// record); its transaction, which wrote nothing, is rolled back as its
/// connection goes back to the pool.
#[tokio::test]
async fn a_transactional_call_is_five_round_trips_and_its_replay_two() {
    let (server, store) = logging_server("transactional_round_trips").await;
    let key = Key::new("round-trips", "k").unwrap();
    let fp = Fingerprint::of(&1).unwrap();
    let call = || {
        store.run_in_transaction(&Settings::DEFAULT, key, fp, |tx| {
            Box::pin(async move {
                let one: i32 = sqlx::query_scalar("SELECT 1")
                    .fetch_one(tx)
                    .await
                    .map_err(ChargeError::from)?;
                Ok::<_, ChargeError>(one)
            })
        })
    };
    let start = server.log().len();
    assert_eq!(call().await.unwrap(), 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after_first = server.log();
    let first = statements(&after_first, start);
    assert_eq!(first.len(), 5, "{first:#?}");
    assert_eq!(call().await.unwrap(), 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after_replay = server.log();
    let replay = statements(&after_replay, after_first.len());
    assert_eq!(replay.len(), 3, "{replay:#?}");
    assert!(replay[2].ends_with("ROLLBACK"), "{replay:#?}");
}

/// The plain API: a closure gets the transaction's connection, and the
/// reject setting answers at once.
#[tokio::test]
async fn run_in_transaction_replays_and_rejects() {
    let server = shared();
    ensure_charges(server);
    let store = connect(&server.url()).await;
    let op = op("plain");
    let key = Key::new(&op, "k").unwrap();
    let fp = Fingerprint::of(&1).unwrap();
    let runs = Runs::default();
    for _ in 0..3 {
        let (op, runs) = (op.clone(), runs.clone());
        let id: i64 = store
            .run_in_transaction(&Settings::DEFAULT, key, fp, |tx| {
                Box::pin(async move {
                    runs.mark();
                    let id = sqlx::query_scalar(
                        "INSERT INTO charges (op, amount) VALUES ($1, 1) RETURNING id",
                    )
                    .bind(&op)
                    .fetch_one(tx)
                    .await
                    .map_err(ChargeError::from)?;
                    Ok::<_, ChargeError>(id)
                })
            })
            .await
            .unwrap();
        assert!(id > 0);
    }
    assert_eq!(runs.count(), 1);
    assert_eq!(charges(server, &op), 1);

    // While a holder's transaction runs, `reject` answers `InProgress` at
    // once, and nothing of the refused call runs.
    let reject = Settings::builder()
        .on_conflict(OnConflict::Reject)
        .build()
        .unwrap();
    let key = Key::new(&op, "held").unwrap();
    let (holder, gate) = hold_in_transaction(&store, reject, key, fp, 7).await;
    let started = Instant::now();
    let refused = store
        .run_in_transaction(&reject, key, fp, |_tx| {
            Box::pin(async move { Ok::<_, ChargeError>(8_i64) })
        })
        .await
        .unwrap_err();
    assert!(refused.in_progress(), "{refused:?}");
    assert!(started.elapsed() < Duration::from_millis(500));
    gate.notify_one();
    assert_eq!(holder.await.unwrap().unwrap(), 7);
    let replayed = store
        .run_in_transaction(&reject, key, fp, |_tx| {
            Box::pin(async move { Ok::<_, ChargeError>(9_i64) })
        })
        .await
        .unwrap();
    assert_eq!(replayed, 7, "the holder's committed result");
}

/// Same-key duplicates in one process wait for the first call's outcome
/// instead of each holding a pooled connection while it waits for the key's
/// lock: 200 of them on a pool of 4, behind a body slower than the pool's
/// one-second acquire timeout, all get the one receipt. Duplicates of an
/// attempt that fails share its failure instead of running in turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_in_one_process_wait_without_holding_connections() {
    let server = shared();
    ensure_charges(server);
    let store = connect(&server.url()).await;
    let op = op("coalesced");
    let fp = Fingerprint::of(&1).unwrap();
    let runs = Runs::default();
    let call = |key: Key, fail: bool| {
        let (store, op, runs) = (store.clone(), op.clone(), runs.clone());
        async move {
            store
                .run_in_transaction(&Settings::DEFAULT, key, fp, |tx| {
                    Box::pin(async move {
                        runs.mark();
                        let id: i64 = sqlx::query_scalar(
                            "INSERT INTO charges (op, amount) VALUES ($1, 1) RETURNING id",
                        )
                        .bind(&op)
                        .fetch_one(tx)
                        .await?;
                        tokio::time::sleep(Duration::from_millis(if fail { 300 } else { 1500 }))
                            .await;
                        if fail {
                            return Err(ChargeError::Declined);
                        }
                        Ok::<_, ChargeError>(id)
                    })
                })
                .await
        }
    };

    let key = Key::new(&op, "slow").unwrap();
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..200 {
        callers.spawn(call(key, false));
    }
    let receipts: Vec<i64> = callers
        .join_all()
        .await
        .into_iter()
        .map(|receipt| receipt.expect("every duplicate gets the receipt"))
        .collect();
    assert!(receipts.iter().all(|r| *r == receipts[0]), "one receipt");
    assert_eq!(runs.count(), 1);
    assert_eq!(charges(server, &op), 1);

    let key = Key::new(&op, "declined").unwrap();
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..20 {
        callers.spawn(call(key, true));
    }
    let answers = callers.join_all().await;
    assert_eq!(runs.count(), 2, "the failing body ran once");
    let declined = answers
        .iter()
        .filter(|a| matches!(a, Err(ChargeError::Declined)))
        .count();
    let shared_failure = answers
        .iter()
        .filter(|a| matches!(a, Err(ChargeError::Idem(m)) if m.contains("waited for failed")))
        .count();
    assert_eq!((declined, shared_failure), (1, 19), "{answers:?}");
    assert_eq!(charges(server, &op), 1, "the declined insert rolled back");
}

/// A transactional body that panics is rolled back, and the same-key
/// duplicates that waited for it in this process share its failure
/// (`AttemptFailed`) instead of each running the body, and panicking, in
/// turn; a later call runs it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_of_a_panicking_transactional_body_share_its_failure() {
    let server = shared();
    ensure_charges(server);
    let store = connect(&server.url()).await;
    let op = op("panicking");
    let fp = Fingerprint::of(&1).unwrap();
    let runs = Runs::default();
    let key = Key::new(&op, "k").unwrap();
    let call = |panics: bool| {
        let (store, op, runs) = (store.clone(), op.clone(), runs.clone());
        async move {
            store
                .run_in_transaction(&Settings::DEFAULT, key, fp, |tx| {
                    Box::pin(async move {
                        runs.mark();
                        let id: i64 = sqlx::query_scalar(
                            "INSERT INTO charges (op, amount) VALUES ($1, 1) RETURNING id",
                        )
                        .bind(&op)
                        .fetch_one(tx)
                        .await?;
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        assert!(!panics, "the body panics");
                        Ok::<_, ChargeError>(id)
                    })
                })
                .await
        }
    };
    let first = tokio::spawn(call(true));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut duplicates = tokio::task::JoinSet::new();
    for _ in 0..3 {
        duplicates.spawn(call(true));
    }
    assert!(first.await.unwrap_err().is_panic());
    for answer in duplicates.join_all().await {
        assert!(
            matches!(&answer, Err(ChargeError::Idem(m)) if m.contains("waited for failed")),
            "{answer:?}"
        );
    }
    assert_eq!(runs.count(), 1, "the panicking body ran once");
    assert_eq!(charges(server, &op), 0, "its insert rolled back");
    let id = call(false).await.expect("a later call runs");
    assert_eq!(call(false).await.unwrap(), id);
    assert_eq!((runs.count(), charges(server, &op)), (2, 1));

    // A closure that panics before it returns its future, the same. A
    // holder on another store keeps the key's lock until the duplicates
    // joined the call that waits for it, then fails, committing nothing.
    let key = Key::new(&op, "early").unwrap();
    let holder_store = connect(&server.url()).await;
    let gate = Arc::new(tokio::sync::Notify::new());
    let (held, claimed) = tokio::sync::oneshot::channel();
    let holder = {
        let gate = Arc::clone(&gate);
        tokio::spawn(async move {
            holder_store
                .run_in_transaction(&Settings::DEFAULT, key, fp, |_tx| {
                    Box::pin(async move {
                        let _ = held.send(());
                        gate.notified().await;
                        Err::<i64, _>(ChargeError::Declined)
                    })
                })
                .await
        })
    };
    claimed.await.unwrap();
    let early = || {
        let (store, runs) = (store.clone(), runs.clone());
        async move {
            store
                .run_in_transaction(&Settings::DEFAULT, key, fp, |_tx| {
                    runs.mark();
                    panic!("the closure panics");
                    #[allow(unreachable_code)]
                    Box::pin(async { Ok::<i64, ChargeError>(0) })
                })
                .await
        }
    };
    let first = tokio::spawn(early());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut duplicates = tokio::task::JoinSet::new();
    for _ in 0..3 {
        duplicates.spawn(early());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    gate.notify_one();
    assert_eq!(holder.await.unwrap(), Err(ChargeError::Declined));
    assert!(first.await.unwrap_err().is_panic());
    let mut shared = 0;
    while let Some(answer) = duplicates.join_next().await {
        match answer {
            Ok(Err(ChargeError::Idem(m))) if m.contains("waited for failed") => shared += 1,
            other => panic!("{:?}", other.map_err(|e| e.is_panic())),
        }
    }
    assert_eq!(shared, 3, "the duplicates share the failure");
    assert_eq!(runs.count(), 3, "the panicking closure ran once");
}

/// With errors cached, an error that does not serialize cannot be stored:
/// the body's writes are rolled back with the claim (not committed beside
/// a record that says only "it ran"), and a retry runs it again.
#[tokio::test]
async fn a_cached_error_that_does_not_serialize_rolls_everything_back() {
    #[derive(Debug, serde::Serialize, serde::Deserialize)]
    enum Odd {
        // JSON keys are strings: a map keyed by tuples does not serialize.
        Detail(std::collections::HashMap<(u8, u8), u8>),
        Idem(String),
    }
    impl From<Error> for Odd {
        fn from(error: Error) -> Self {
            Self::Idem(error.to_string())
        }
    }
    let server = shared();
    ensure_charges(server);
    let store = connect(&server.url()).await;
    let op = op("unserializable-error");
    let key = Key::new(&op, "k").unwrap();
    let fp = Fingerprint::of(&1).unwrap();
    let runs = Runs::default();
    for run in 1..=2 {
        let answer: Result<i64, Odd> = store
            .run_in_transaction_caching_errors(
                &Settings::DEFAULT,
                key,
                fp,
                |_| true,
                |tx| {
                    let (op, runs) = (op.clone(), runs.clone());
                    Box::pin(async move {
                        runs.mark();
                        sqlx::query("INSERT INTO charges (op, amount) VALUES ($1, 1)")
                            .bind(&op)
                            .execute(tx)
                            .await
                            .map_err(|e| Odd::Idem(e.to_string()))?;
                        Err(Odd::Detail([((1, 2), 3)].into()))
                    })
                },
            )
            .await;
        assert!(matches!(answer, Err(Odd::Detail(_))), "{answer:?}");
        assert_eq!(runs.count(), run, "the retry ran again");
        assert_eq!(charges(server, &op), 0, "the insert was rolled back");
    }
}

/// Transactional calls are told like every other call: each runs in an
/// `idem.call` span that ends with its outcome, and is counted by outcome,
/// with its body's time.
#[test]
fn transactional_calls_are_traced_and_counted() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    let server = shared();
    ensure_charges(server);
    let url = server.url();
    let op = op("observed");
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let capture = idem_test::logs::capture();
    {
        metrics::with_local_recorder(&recorder, || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async {
                    let shop = Shop::new(&url).await;
                    shop.charge(op.clone(), 1, 100).await.unwrap(); // ran
                    shop.charge(op.clone(), 1, 100).await.unwrap(); // replayed
                    shop.charge(op.clone(), 1, 200).await.unwrap_err(); // key_reused
                    shop.charge(op.clone(), 2, 13).await.unwrap_err(); // failed
                    let panicking = std::panic::AssertUnwindSafe(shop.charge(op.clone(), 3, 66));
                    futures_util::FutureExt::catch_unwind(panicking)
                        .await
                        .unwrap_err(); // failed: a panic
                });
        });
    }
    let log = capture.text();
    drop(capture);

    let closed: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("idem.call") && line.contains("close"))
        .collect();
    assert_eq!(closed.len(), 5, "{log}");
    for (line, outcome) in closed
        .iter()
        .zip(["ran", "replayed", "key_reused", "failed", "failed"])
    {
        assert!(line.contains(&format!("outcome=\"{outcome}\"")), "{line}");
        assert!(
            line.contains("operation=\"postgres::Shop::charge\""),
            "{line}"
        );
        assert!(!line.contains(&op), "no raw key in {line}");
    }

    let snapshot = snapshotter.snapshot().into_hashmap();
    let counted = |outcome: &str| {
        snapshot
            .iter()
            .find(|(key, _)| {
                let labels: Vec<_> = key.key().labels().map(|l| (l.key(), l.value())).collect();
                key.key().name() == "idem_calls_total"
                    && labels.contains(&("outcome", outcome))
                    && labels.contains(&("operation", "postgres::Shop::charge"))
            })
            .map_or(0, |(_, (_, _, value))| match value {
                DebugValue::Counter(n) => *n,
                other => panic!("not a counter: {other:?}"),
            })
    };
    for (outcome, calls) in [
        ("ran", 1),
        ("replayed", 1),
        ("key_reused", 1),
        ("failed", 2),
    ] {
        assert_eq!(counted(outcome), calls, "{outcome}");
    }
    let bodies = snapshot
        .iter()
        .find(|(key, _)| key.key().name() == "idem_body_seconds")
        .map(|(_, (_, _, value))| match value {
            DebugValue::Histogram(samples) => samples.len(),
            other => panic!("not a histogram: {other:?}"),
        });
    assert_eq!(bodies, Some(3), "the run, the failure and the panic");
}

// --- names, TTLs and timeouts at their limits ---------------------------------

/// A schema and table whose `idem:schema.table` channel is over PostgreSQL's
/// 63 bytes: results are stored, failed claims released, keys forgotten,
/// and waiters in another store woken, as with short names.
#[tokio::test]
async fn long_schema_and_table_names_store_results_and_wake_waiters() {
    let (schema, table) = (
        format!("s{}", "c".repeat(39)),
        format!("t{}", "k".repeat(19)),
    );
    let open = || {
        PostgresStore::builder(shared().url())
            .response_timeout(RESPONSE_TIMEOUT)
            .schema(&schema)
            .table(&table)
            .connect()
    };
    let (a, b) = (
        Idempotency::new(open().await.unwrap()),
        Idempotency::new(open().await.unwrap()),
    );
    let settings = Settings::builder()
        .lease(Duration::from_millis(1500))
        .ttl(Duration::from_secs(60))
        .build()
        .unwrap();
    let runs = Runs::default();
    let (key, fp) = fresh("long-names");
    let first: Result<u32, Failure> = a
        .run(&settings, key, fp, {
            let runs = runs.clone();
            async move {
                runs.mark();
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok(1)
            }
        })
        .await;
    assert_eq!(first.unwrap(), 1);
    // Another store replays it; a waiter there is woken by the holder's NOTIFY.
    let again: Result<u32, Failure> = b.run(&settings, key, fp, async { Ok(2) }).await;
    assert_eq!(again.unwrap(), 1);
    assert_eq!(runs.count(), 1);

    let (failing, fp) = fresh("long-names-err");
    let failed: Result<u32, Failure> = a
        .run(&settings, failing, fp, async { Err(Failure::Body(1)) })
        .await;
    assert!(failed.is_err());
    let retried: Result<u32, Failure> = b.run(&settings, failing, fp, async { Ok(3) }).await;
    assert_eq!(
        retried.unwrap(),
        3,
        "the failed call's claim was released at once"
    );
    assert!(a.forget(key).await.unwrap());
    let rows = shared().psql(&format!("SELECT count(*) FROM \"{schema}\".\"{table}\""));
    assert_eq!(rows, "1");
}

/// Inside the caller's transaction, the record's TTL counts from when it is
/// written, not from when the transaction began: a body longer than the TTL
/// still leaves a live record, and the retry replays it.
#[tokio::test]
async fn a_transactional_records_ttl_counts_from_its_commit() {
    let server = shared();
    ensure_charges(server);
    let store = connect(&server.url()).await;
    let settings = Settings::builder()
        .ttl(Duration::from_secs(3))
        .lease(Duration::from_millis(1500))
        .build()
        .unwrap();
    let op = op("ttl-from-commit");
    let key = Key::new(&op, "k").unwrap();
    let fp = Fingerprint::of(&1).unwrap();
    let runs = Runs::default();
    // Four steps of 0.9 s: longer than the TTL in all, each shorter than
    // the lease a transaction may sit idle for.
    for steps in [4, 0] {
        let (op, runs) = (op.clone(), runs.clone());
        let id: i64 = store
            .run_in_transaction(&settings, key, fp, |tx| {
                Box::pin(async move {
                    runs.mark();
                    let id = sqlx::query_scalar(
                        "INSERT INTO charges (op, amount) VALUES ($1, 1) RETURNING id",
                    )
                    .bind(&op)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(ChargeError::from)?;
                    for _ in 0..steps {
                        tokio::time::sleep(Duration::from_millis(900)).await;
                        sqlx::query("SELECT 1")
                            .execute(&mut *tx)
                            .await
                            .map_err(ChargeError::from)?;
                    }
                    Ok::<_, ChargeError>(id)
                })
            })
            .await
            .unwrap();
        assert!(id > 0);
    }
    assert_eq!(runs.count(), 1, "the retry replayed the record");
    assert_eq!(charges(server, &op), 1);
}

/// A duplicate that waited for the key's lock runs its body with the
/// session's own `lock_timeout`, not the wait's; and a `wait_timeout` over
/// PostgreSQL's 24.8-day limit waits instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_the_lock_leaves_the_bodys_lock_timeout_alone() {
    let server = shared();
    let url = server.url();
    // Two stores: duplicates on one store would wait for each other in
    // process, never on the lock.
    let (holder_store, waiter_store) = (connect(&url).await, connect(&url).await);
    for wait in [Duration::from_secs(10), Duration::from_secs(30 * 86_400)] {
        let settings = Settings::builder().wait_timeout(wait).build().unwrap();
        let op = op("lock-timeout");
        let key = Key::new(&op, "k").unwrap();
        let fp = Fingerprint::of(&1).unwrap();
        let gate = Arc::new(tokio::sync::Notify::new());
        let (held, claimed) = tokio::sync::oneshot::channel();
        let holder = {
            let (store, gate) = (holder_store.clone(), Arc::clone(&gate));
            tokio::spawn(async move {
                store
                    .run_in_transaction(&settings, key, fp, |_tx| {
                        Box::pin(async move {
                            let _ = held.send(());
                            gate.notified().await;
                            // Fails, and is not cached: the waiter runs next.
                            Err::<String, _>(ChargeError::Declined)
                        })
                    })
                    .await
            })
        };
        claimed.await.unwrap();
        let waiter = {
            let store = waiter_store.clone();
            tokio::spawn(async move {
                store
                    .run_in_transaction(&settings, key, fp, |tx| {
                        Box::pin(async move {
                            let timeout: String = sqlx::query_scalar("SHOW lock_timeout")
                                .fetch_one(&mut *tx)
                                .await
                                .map_err(ChargeError::from)?;
                            Ok::<_, ChargeError>(timeout)
                        })
                    })
                    .await
            })
        };
        // Let the waiter reach the lock, then let the holder fail.
        tokio::time::sleep(Duration::from_millis(500)).await;
        gate.notify_one();
        assert_eq!(holder.await.unwrap(), Err(ChargeError::Declined));
        assert_eq!(
            waiter.await.unwrap().unwrap(),
            "0",
            "the session's lock_timeout (wait {wait:?})"
        );
    }
}

/// A session whose own `statement_timeout` is shorter than the wait cuts
/// the wait for the key's lock short (one shorter than a statement of the
/// wait, and one longer): the key stayed held, so the call is
/// `InProgress`, not a store failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_timeout_shorter_than_the_wait_answers_in_progress() {
    let server = shared();
    let url = server.url();
    let holder_store = connect(&url).await;
    let separator = if url.contains('?') { '&' } else { '?' };
    for statement_ms in [300, 1_500] {
        let waiter_store = connect(&format!(
            "{url}{separator}options=-c%20statement_timeout%3D{statement_ms}"
        ))
        .await;
        let op = op("statement-timeout-wait");
        let key = Key::new(&op, "k").unwrap();
        let fp = Fingerprint::of(&1).unwrap();
        let (holder, gate) =
            hold_in_transaction(&holder_store, Settings::DEFAULT, key, fp, 1).await;
        let settings = Settings::builder()
            .wait_timeout(Duration::from_secs(6))
            .build()
            .unwrap();
        let started = std::time::Instant::now();
        let waited = waiter_store
            .run_in_transaction(&settings, key, fp, |_tx| {
                Box::pin(async { Ok::<i64, ChargeError>(2) })
            })
            .await;
        assert!(matches!(&waited, Err(e) if e.in_progress()), "{waited:?}");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "statement_timeout {statement_ms} ms: {:?}",
            started.elapsed()
        );
        gate.notify_one();
        assert_eq!(holder.await.unwrap().unwrap(), 1);
    }
}

/// A call that waited in the process for a call that was then cancelled
/// waits for the key's lock until the end of its own wait, not for a new
/// `wait_timeout` from then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_that_takes_over_from_a_cancelled_call_keeps_its_deadline() {
    let server = shared();
    let url = server.url();
    // The holder on one store; the cancelled call and its waiter on another,
    // where the waiter waits for the cancelled call's flight.
    let (holder_store, store) = (connect(&url).await, connect(&url).await);
    let op = op("takeover-deadline");
    let key = Key::new(&op, "k").unwrap();
    let fp = Fingerprint::of(&1).unwrap();
    let (holder, gate) = hold_in_transaction(&holder_store, Settings::DEFAULT, key, fp, 1).await;
    let settings = Settings::builder()
        .wait_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let call = |store: PostgresStore| async move {
        let started = std::time::Instant::now();
        let answer = store
            .run_in_transaction(&settings, key, fp, |_tx| {
                Box::pin(async { Ok::<i64, ChargeError>(2) })
            })
            .await;
        (answer, started.elapsed())
    };
    let cancelled = tokio::spawn(call(store.clone()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let waiter = tokio::spawn(call(store.clone()));
    tokio::time::sleep(Duration::from_millis(1700)).await;
    cancelled.abort();
    let (answer, took) = waiter.await.unwrap();
    assert!(matches!(&answer, Err(e) if e.in_progress()), "{answer:?}");
    assert!(
        took < Duration::from_millis(2700),
        "waited {took:?} for a wait of 2 s"
    );
    gate.notify_one();
    assert_eq!(holder.await.unwrap().unwrap(), 1);
}

/// Under `REPEATABLE READ` or `SERIALIZABLE` as the database's default, a
/// duplicate that waited for the holder's lock replays the holder's result
/// (its wait's snapshot predates the commit, so it starts over in a new
/// transaction) instead of failing with a serialization error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_replay_under_every_isolation_level() {
    let server = shared();
    for level in ["repeatable read", "serializable"] {
        let url = database_at(server, &format!("iso_{}", level.replace(' ', "_")), level);
        let (holder_store, waiter_store) = (connect(&url).await, connect(&url).await);
        let settings = Settings::builder()
            .wait_timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let key = Key::new("isolation", level).unwrap();
        let fp = Fingerprint::of(&1).unwrap();
        let gate = Arc::new(tokio::sync::Notify::new());
        let (held, claimed) = tokio::sync::oneshot::channel();
        let runs = Runs::default();
        let holder = {
            let (store, gate, runs) = (holder_store.clone(), Arc::clone(&gate), runs.clone());
            tokio::spawn(async move {
                store
                    .run_in_transaction(&settings, key, fp, |tx| {
                        Box::pin(async move {
                            runs.mark();
                            let level: String = sqlx::query_scalar("SHOW transaction_isolation")
                                .fetch_one(&mut *tx)
                                .await
                                .map_err(ChargeError::from)?;
                            let _ = held.send(());
                            gate.notified().await;
                            Ok::<_, ChargeError>(level)
                        })
                    })
                    .await
            })
        };
        claimed.await.unwrap();
        let waiter = {
            let (store, runs) = (waiter_store.clone(), runs.clone());
            tokio::spawn(async move {
                store
                    .run_in_transaction(&settings, key, fp, |_tx| {
                        Box::pin(async move {
                            runs.mark();
                            Ok::<_, ChargeError>("the duplicate ran".to_owned())
                        })
                    })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        gate.notify_one();
        assert_eq!(holder.await.unwrap().unwrap(), level);
        assert_eq!(
            waiter.await.unwrap().unwrap(),
            level,
            "the holder's result, replayed"
        );
        assert_eq!(runs.count(), 1);
    }
}

/// A body that ends idem's transaction itself (`COMMIT` or `ROLLBACK`)
/// records no result, and its caller gets an error that says so, not `Ok`.
/// After a `COMMIT` (its writes committed with the claim) the claim is
/// marked as having run: a retry gets `NotReplayable` at once, and does not
/// run the body again when the claim's lease ends.
#[tokio::test]
async fn a_body_that_ends_the_transaction_gets_an_error() {
    let server = shared();
    ensure_charges(server);
    let store = connect(&server.url()).await;
    let settings = Settings::builder()
        .lease(Duration::from_secs(3))
        .build()
        .unwrap();
    for statement in ["COMMIT", "ROLLBACK"] {
        let op = op("ends-transaction");
        let key = Key::new(&op, statement).unwrap();
        let fp = Fingerprint::of(&1).unwrap();
        let runs = Runs::default();
        let call = || {
            let (op, runs) = (op.clone(), runs.clone());
            store.run_in_transaction(&settings, key, fp, move |tx| {
                Box::pin(async move {
                    runs.mark();
                    sqlx::query("INSERT INTO charges (op, amount) VALUES ($1, 1)")
                        .bind(&op)
                        .execute(&mut *tx)
                        .await?;
                    sqlx::query(statement).execute(&mut *tx).await?;
                    Ok::<_, ChargeError>(1_i64)
                })
            })
        };
        match call().await {
            Err(ChargeError::Idem(message)) => {
                assert!(message.contains("ended idem's transaction"), "{message}");
            }
            other => panic!("{statement}: expected an error, got {other:?}"),
        }
        if statement == "COMMIT" {
            assert_eq!(
                charges(server, &op),
                1,
                "the body's COMMIT committed its insert"
            );
            tokio::time::sleep(Duration::from_secs(4)).await; // past the lease
            let retried = call().await;
            assert!(
                matches!(&retried, Err(ChargeError::Idem(m)) if m.contains("cannot be replayed")),
                "{retried:?}"
            );
            assert_eq!(runs.count(), 1, "the body did not run again");
            assert_eq!(charges(server, &op), 1);
        } else {
            assert_eq!(charges(server, &op), 0, "the ROLLBACK undid its insert");
        }
    }
}

/// A waiter that misses the notification (here the key is freed behind the
/// store's back, as by an operator, without a `NOTIFY`) looks again within
/// about a second instead of sleeping the holder's whole lease; and the
/// listener does not take a connection from a store's pool of one.
#[tokio::test]
async fn a_missed_notification_costs_a_second_not_the_lease() {
    let url = shared().url();
    let holder_store = connect(&url).await;
    let waiter_store = PostgresStore::builder(&url)
        .response_timeout(RESPONSE_TIMEOUT)
        .max_connections(1)
        .connect()
        .await
        .unwrap();
    let (key, fp) = fresh("missed-notify");
    let claimed = holder_store
        .begin(key, fp, Token::random(), Duration::from_secs(60))
        .await
        .unwrap();
    assert!(matches!(claimed, idem_core::store::Begin::Claimed));
    let settings = Settings::builder()
        .lease(Duration::from_secs(60))
        .wait_timeout(Duration::from_secs(50))
        .build()
        .unwrap();
    let waiter = {
        let idem = Idempotency::new(waiter_store.clone());
        tokio::spawn(async move {
            idem.run(&settings, key, fp, async { Ok::<_, Error>(2_u8) })
                .await
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let freed = Instant::now();
    let hex: String = key.digest().iter().map(|b| format!("{b:02x}")).collect();
    shared().psql(&format!(
        "DELETE FROM idempotency_keys WHERE key = '\\x{hex}'::bytea"
    ));
    assert_eq!(
        waiter.await.unwrap().unwrap(),
        2,
        "the waiter ran once the key was free"
    );
    let waited = freed.elapsed();
    assert!(
        waited < Duration::from_secs(20),
        "waited {waited:?} after the key was freed: the holder's lease, not a second"
    );
    // The one pooled connection still serves calls while the listener listens.
    let (other, fp) = fresh("missed-notify-after");
    let answer = Idempotency::new(waiter_store)
        .run(&Settings::DEFAULT, other, fp, async {
            Ok::<_, Error>(3_u8)
        })
        .await;
    assert_eq!(answer.unwrap(), 3);
}

/// A store connected lazily lets a service start while PostgreSQL is down:
/// calls fail closed (the body never runs) until the database is up, then
/// the first call creates the table and runs.
#[tokio::test]
async fn a_lazy_store_starts_while_the_database_is_down() {
    let mut server = PostgresServer::start();
    let url = server.url();
    server.kill();
    let store = PostgresStore::builder(&url)
        .response_timeout(RESPONSE_TIMEOUT)
        .schema("lazy")
        .connect_lazy()
        .expect("no connection needed to build it");
    assert!(
        PostgresStore::builder(&url)
            .response_timeout(RESPONSE_TIMEOUT)
            .connect()
            .await
            .is_err(),
        "connect, unlike connect_lazy, needs the database"
    );
    let idem = Idempotency::new(store);
    let runs = Runs::default();
    let (key, fp) = fresh("lazy");
    let call = || {
        let runs = runs.clone();
        idem.run(&Settings::DEFAULT, key, fp, async move {
            runs.mark();
            Ok::<_, Failure>(7)
        })
    };
    match call().await {
        Err(Failure::Idem(error @ Error::Store(_))) => assert_eq!(error.http_status(), 503),
        other => panic!("expected the store down, got {other:?}"),
    }
    assert_eq!(runs.count(), 0, "nothing ran unguarded");
    server.restart();
    let mut answer = call().await;
    for _ in 0..100 {
        if answer.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        answer = call().await;
    }
    assert_eq!(answer.unwrap(), 7);
    assert_eq!(call().await.unwrap(), 7, "replayed");
    assert_eq!(runs.count(), 1);
    assert_eq!(
        server.psql("SELECT count(*) FROM lazy.idempotency_keys"),
        "1"
    );
}

/// A holder that stalls mid-body with its transaction idle (a frozen
/// process, a partition without a reset) is ended by the database within
/// its lease: its writes are rolled back, the key is freed, and a duplicate
/// waiting elsewhere runs, long before the stalled body wakes up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_holder_frees_the_key_within_its_lease() {
    let server = shared();
    ensure_charges(server);
    let url = server.url();
    let (holder_store, waiter_store) = (connect(&url).await, connect(&url).await);
    let settings = Settings::builder()
        .lease(Duration::from_millis(1500))
        .wait_timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let op = op("stalled");
    let key = Key::new(&op, "k").unwrap();
    let fp = Fingerprint::of(&1).unwrap();
    let (held, claimed) = tokio::sync::oneshot::channel();
    let holder = {
        let (store, op) = (holder_store.clone(), op.clone());
        tokio::spawn(async move {
            store
                .run_in_transaction(&settings, key, fp, |tx| {
                    Box::pin(async move {
                        sqlx::query("INSERT INTO charges (op, amount) VALUES ($1, 1)")
                            .bind(&op)
                            .execute(&mut *tx)
                            .await
                            .map_err(ChargeError::from)?;
                        let _ = held.send(());
                        // Stalled, with the transaction idle, for six leases.
                        tokio::time::sleep(Duration::from_secs(9)).await;
                        Ok::<_, ChargeError>("stalled holder".to_owned())
                    })
                })
                .await
        })
    };
    claimed.await.unwrap();
    let waiter = {
        let (store, op) = (waiter_store.clone(), op.clone());
        tokio::spawn(async move {
            store
                .run_in_transaction(&settings, key, fp, |tx| {
                    Box::pin(async move {
                        sqlx::query("INSERT INTO charges (op, amount) VALUES ($1, 1)")
                            .bind(&op)
                            .execute(&mut *tx)
                            .await
                            .map_err(ChargeError::from)?;
                        Ok::<_, ChargeError>("duplicate".to_owned())
                    })
                })
                .await
        })
    };
    assert_eq!(waiter.await.unwrap().unwrap(), "duplicate");
    assert!(
        !holder.is_finished(),
        "the duplicate ran while the holder still stalled"
    );
    assert_eq!(
        charges(server, &op),
        1,
        "the stalled holder's write was rolled back"
    );
    let stalled = holder.await.unwrap();
    assert!(
        stalled.is_err(),
        "the stalled holder learns its transaction ended: {stalled:?}"
    );
    assert_eq!(charges(server, &op), 1);
}

/// The stuck-key runbook works on transactional claims: `inspect` shows the
/// holder (its claim row is not committed, so only its lock tells), and
/// `forget` ends its session, rolling its transaction back, so the next
/// call runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactional_claims_are_visible_and_forgettable() {
    let server = shared();
    let store = connect(&server.url()).await;
    let key = Key::new(&op("runbook"), "k").unwrap();
    let fp = Fingerprint::of(&1).unwrap();
    let (holder, gate) = hold_in_transaction(&store, Settings::DEFAULT, key, fp, 1).await;
    let operator = Idempotency::new(connect(&server.url()).await);
    match operator.inspect(key).await.unwrap() {
        // Only the lock shows the claim: its fingerprint and lease are in
        // the holder's uncommitted row.
        idem_core::Inspection::InProgress {
            held_for,
            fingerprint,
            expires_in,
        } => {
            assert!(held_for.is_some());
            assert_eq!(fingerprint, Fingerprint::UNCHECKED);
            assert_eq!(expires_in, Duration::ZERO);
        }
        other => panic!("expected the transactional claim, got {other:?}"),
    }
    assert!(operator.forget(key).await.unwrap(), "the holder was ended");
    // The holder's body goes on until it next talks to the database.
    gate.notify_one();
    assert!(
        holder.await.unwrap().is_err(),
        "the ended holder committed nothing"
    );
    assert_eq!(
        operator.inspect(key).await.unwrap(),
        idem_core::Inspection::Absent
    );
    let rerun = store
        .run_in_transaction(&Settings::DEFAULT, key, fp, |_tx| {
            Box::pin(async move { Ok::<_, ChargeError>(2_i64) })
        })
        .await;
    assert_eq!(rerun.unwrap(), 2);
}

/// `forget` ends the session of a transactional call's holder only: a
/// replay (or a waiter) takes the key's lock for a moment too, before it
/// reads the record, and is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_ends_no_session_that_only_reads_the_key() {
    use sqlx::Connection as _;
    let server = shared();
    let store = connect(&server.url()).await;
    let key = Key::new(&op("forget-spares-readers"), "k").unwrap();
    let fp = Fingerprint::of(&1).unwrap();
    // The key's lock, as its holder's session holds it.
    let (pid_tx, pid_rx) = tokio::sync::oneshot::channel::<i32>();
    let gate = Arc::new(tokio::sync::Notify::new());
    let holder = {
        let (store, gate) = (store.clone(), Arc::clone(&gate));
        tokio::spawn(async move {
            store
                .run_in_transaction(&Settings::DEFAULT, key, fp, |tx| {
                    Box::pin(async move {
                        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
                            .fetch_one(&mut *tx)
                            .await?;
                        let _ = pid_tx.send(pid);
                        gate.notified().await;
                        Ok::<_, ChargeError>(1_i64)
                    })
                })
                .await
        })
    };
    let pid = pid_rx.await.unwrap();
    let lock: i64 = server
        .psql(&format!(
            "SELECT (classid::bigint << 32) | objid::bigint FROM pg_locks \
             WHERE locktype = 'advisory' AND objsubid = 1 AND pid = {pid}"
        ))
        .trim()
        .parse()
        .unwrap();
    gate.notify_one();
    assert_eq!(holder.await.unwrap().unwrap(), 1);
    // A session that holds the lock as a replay does, having written nothing.
    let mut reader = sqlx::PgConnection::connect(&server.url()).await.unwrap();
    let mut reading = reader.begin().await.unwrap();
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(lock)
        .fetch_one(&mut *reading)
        .await
        .unwrap();
    assert!(locked);
    let operator = Idempotency::new(connect(&server.url()).await);
    assert!(
        operator.forget(key).await.unwrap(),
        "the record was forgotten"
    );
    let alive: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut *reading)
        .await
        .expect("the reading session was left alone");
    assert_eq!(alive, 1);
    reading.commit().await.unwrap();
}

/// `forget` ends a transactional holder also when the key's expired
/// record was still there (not yet purged), so that the holder's claim
/// locked that row: the delete waited for the holder, timed out before the
/// holder was ended, and, left running in the server, deleted the record
/// the holder then committed, so that the next call ran again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_over_an_expired_record_is_forgettable() {
    let server = shared();
    let store = connect(&server.url()).await;
    let key = Key::new(&op("forget-over-expired"), "k").unwrap();
    let fp = Fingerprint::of(&1).unwrap();
    let settings = Settings::builder()
        .lease(Duration::from_millis(1_500))
        .ttl(Duration::from_millis(1_600))
        .build()
        .unwrap();
    let first = store
        .run_in_transaction(&settings, key, fp, |_tx| {
            Box::pin(async move { Ok::<_, ChargeError>(1_i64) })
        })
        .await;
    assert_eq!(first.unwrap(), 1);
    tokio::time::sleep(Duration::from_millis(1_700)).await;
    let (holder, gate) = hold_in_transaction(&store, settings, key, fp, 2).await;
    let operator = Idempotency::new(connect(&server.url()).await);
    assert!(operator.forget(key).await.unwrap(), "the holder was ended");
    gate.notify_one();
    assert!(
        holder.await.unwrap().is_err(),
        "the ended holder committed nothing"
    );
    assert_eq!(
        operator.inspect(key).await.unwrap(),
        idem_core::Inspection::Absent
    );
    let rerun = store
        .run_in_transaction(&settings, key, fp, |_tx| {
            Box::pin(async move { Ok::<_, ChargeError>(3_i64) })
        })
        .await;
    assert_eq!(rerun.unwrap(), 3);
    // Nothing deletes the record the rerun committed.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(matches!(
        operator.inspect(key).await.unwrap(),
        idem_core::Inspection::Completed { .. }
    ));
}

/// A store on the shared server behind a proxy that treats every
/// connection as `fault` says, with `connections` pooled and a 300 ms
/// response timeout.
async fn store_behind_a_proxy(
    fault: idem_test::proxy::Fault,
    connections: u32,
) -> (idem_test::proxy::Proxy, PostgresStore) {
    let server = shared();
    let address: std::net::SocketAddr = format!("127.0.0.1:{}", server.port()).parse().unwrap();
    let proxy = idem_test::proxy::Proxy::start(address, move |_| fault)
        .await
        .unwrap();
    let url = server.url().replace(
        &format!("127.0.0.1:{}", server.port()),
        &proxy.addr().to_string(),
    );
    let store = PostgresStore::builder(url)
        .response_timeout(Duration::from_millis(300))
        .max_connections(connections)
        .connect()
        .await
        .expect("connect through the proxy");
    (proxy, store)
}

/// A transactional call whose `BEGIN` times out on its way must not leave
/// its transaction open on the pooled connection once the `BEGIN` lands:
/// the next user of that connection would run inside it, and a record
/// written there would be uncommitted, invisible to every other process,
/// and rolled back when the idle limit ends the session, so that a retry
/// runs the body again; and the key's advisory lock would stay taken.
#[tokio::test]
async fn a_transactional_begin_that_times_out_leaves_no_transaction_open() {
    let server = shared();
    ensure_charges(server);
    // One connection, so that the next call gets the one the `BEGIN` used.
    let (proxy, store) = store_behind_a_proxy(idem_test::proxy::Fault::Pass, 1).await;
    let idem = Idempotency::new(store.clone());
    let (key, fp) = fresh("late-transactional-begin");
    // A transaction's `BEGIN` goes as a simple query (`Q`), the claim and
    // the record as prepared statements.
    proxy.hold_next_request(b"Q");
    let timed_out = store
        .run_in_transaction(&Settings::DEFAULT, key, fp, |_tx| {
            Box::pin(async move { Ok::<_, ChargeError>(1_i64) })
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&timed_out, ChargeError::Idem(m) if m.contains("took longer than")),
        "{timed_out:?}"
    );
    proxy.deliver();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A plain call on the same pool, then what another process sees.
    let runs = Runs::default();
    let (plain, plain_fp) = fresh("after-a-late-begin");
    idem.run(&Settings::DEFAULT, plain, plain_fp, async {
        Ok::<_, Failure>(runs.mark())
    })
    .await
    .expect("a plain call after the late begin");
    let elsewhere = Idempotency::new(connect(&server.url()).await);
    assert!(
        matches!(
            elsewhere.inspect(plain).await.unwrap(),
            idem_core::store::Inspection::Completed { .. }
        ),
        "the plain call's record is not committed: it ran inside the late BEGIN's transaction"
    );
    // And the timed-out call's key is free: its retry runs elsewhere at once.
    let retried = connect(&server.url())
        .await
        .run_in_transaction(
            &Settings::builder()
                .on_conflict(OnConflict::Reject)
                .build()
                .unwrap(),
            key,
            fp,
            |_tx| Box::pin(async move { Ok::<_, ChargeError>(2_i64) }),
        )
        .await;
    assert_eq!(
        retried.unwrap(),
        2,
        "the key's advisory lock is still taken"
    );
}

/// Calls that time out waiting for a pooled connection leave nothing behind
/// them: once the connection is free, no abandoned wait goes on to open
/// (and roll back) a transaction of its own, taking its key's lock for a
/// moment and the connection from live calls. Each answer is 20 ms late, so
/// twenty abandoned transactions would keep the connection busy for most of
/// a second.
#[tokio::test]
async fn calls_that_time_out_waiting_for_a_connection_leave_nothing_behind() {
    let (proxy, store) =
        store_behind_a_proxy(idem_test::proxy::Fault::Delay(Duration::from_millis(20)), 1).await;
    let call = |name: String| {
        let store = store.clone();
        async move {
            let (key, fp) = fresh(&name);
            store
                .run_in_transaction(&Settings::DEFAULT, key, fp, |_tx| {
                    Box::pin(async move { Ok::<_, ChargeError>(1_i64) })
                })
                .await
        }
    };
    let held = store.pool().acquire().await.unwrap();
    let waits = (0..20).map(|n| call(format!("pool-wait-{n}")));
    for answer in futures_util::future::join_all(waits).await {
        assert!(
            matches!(&answer, Err(ChargeError::Idem(m)) if m.contains("took longer than")),
            "{answer:?}"
        );
    }
    drop(held);
    let before = proxy.requests();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let sent = proxy.requests() - before;
    assert!(
        sent <= 2,
        "{sent} requests reached the database after the waits were abandoned"
    );
    let next = call("pool-wait-next".to_owned()).await;
    assert_eq!(next, Ok(1));
}

/// A `begin` delayed on its way to the database times out; the call answers
/// a store error at once and clears its claim on another connection. The
/// `begin` arriving after the clearing must not claim the key: the retry
/// runs at once instead of waiting out an orphan claim's lease.
#[tokio::test]
async fn a_begin_that_lands_after_its_clearing_claims_nothing() {
    let (proxy, store) = store_behind_a_proxy(idem_test::proxy::Fault::Pass, 4).await;
    let idem = Idempotency::new(store);
    let reject = Settings::builder()
        .on_conflict(OnConflict::Reject)
        .lease(Duration::from_secs(60))
        .build()
        .unwrap();
    let runs = Runs::default();
    // Calls side by side: every connection of the pool has run a `begin`
    // (and holds its prepared statement, so that the held request is the
    // whole statement, not only its preparation).
    let warm_up = (0..8).map(|n| {
        let (key, fp) = fresh(&format!("late-begin-warm-{n}"));
        let (idem, reject, runs) = (&idem, &reject, &runs);
        async move {
            idem.run(reject, key, fp, async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok::<_, Failure>(runs.mark())
            })
            .await
            .expect("a warm-up call")
        }
    });
    futures_util::future::join_all(warm_up).await;

    let (key, fp) = fresh("late-begin");
    // The `begin`'s execution (a Bind message) is held on its way.
    proxy.hold_next_request(b"B");
    let delayed = idem
        .run(&reject, key, fp, async { Ok::<_, Failure>(runs.mark()) })
        .await;
    match delayed {
        Err(Failure::Idem(Error::Store(e))) => assert_eq!(e.kind(), StoreErrorKind::Timeout, "{e}"),
        other => panic!("expected the delayed begin to time out, got {other:?}"),
    }
    // The clearing runs on another connection, ahead of the held `begin`.
    tokio::time::sleep(Duration::from_millis(700)).await;
    proxy.deliver();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let retry = idem
        .run(&reject, key, fp, async { Ok::<_, Failure>(runs.mark()) })
        .await;
    assert!(retry.is_ok(), "the retry runs at once: {retry:?}");
    assert_eq!(runs.count(), 9, "the warm-up calls and the retry ran");
}

/// Fencing epochs, shown as their users write them: a holder that stalls
/// past its lease (its renewals never arrive, as in a long pause) resumes
/// and writes after another call took the key over and wrote. Each writes
/// with its epoch, conditionally on the row's epoch being smaller, so the
/// stale holder's write is refused by PostgreSQL itself.
#[tokio::test]
async fn a_stale_holder_is_fenced_by_the_epoch_in_its_write() {
    use idem_test::faults::Flaky;
    let store: Arc<dyn Store> = Arc::new(
        PostgresStore::builder(shared().url())
            .response_timeout(Duration::from_millis(300))
            .connect()
            .await
            .unwrap(),
    );
    let flaky = Arc::new(Flaky::new(store));
    let idem = Idempotency::from_arc(flaky.clone());
    let pool = sqlx::PgPool::connect(&shared().url()).await.unwrap();
    let order = i32::try_from(std::process::id() % 1_000_000).unwrap();
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS fenced_shipments \
         (order_id int PRIMARY KEY, state text NOT NULL, epoch bigint NOT NULL)",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO fenced_shipments VALUES ($1, 'new', 0) \
         ON CONFLICT (order_id) DO UPDATE SET state = 'new', epoch = 0",
    )
    .bind(order)
    .execute(&pool)
    .await
    .unwrap();
    let ship = |state: &'static str| {
        let pool = pool.clone();
        async move {
            let epoch = i64::try_from(idem_core::epoch().await?).unwrap();
            let written = sqlx::query(
                "UPDATE fenced_shipments SET state = $1, epoch = $2 \
                 WHERE order_id = $3 AND epoch < $2",
            )
            .bind(state)
            .bind(epoch)
            .bind(order)
            .execute(&pool)
            .await
            .expect("the update runs");
            Ok::<_, Failure>((epoch, written.rows_affected()))
        }
    };
    let settings = Settings::builder()
        .lease(Duration::from_secs(1))
        .on_conflict(OnConflict::Reject)
        .build()
        .unwrap();
    let (key, fp) = fresh("fenced-shipment");

    let stale = {
        let (idem, flaky, settings, pool) = (idem.clone(), flaky.clone(), settings, pool.clone());
        tokio::spawn(async move {
            idem.run(&settings, key, fp, async {
                let epoch = i64::try_from(idem_core::epoch().await?).unwrap();
                // Stalls past its lease: its renewals never arrive.
                flaky.stall(key, tokio::time::Instant::now() + Duration::from_secs(4));
                tokio::time::sleep(Duration::from_millis(2500)).await;
                let written = sqlx::query(
                    "UPDATE fenced_shipments SET state = 'stale', epoch = $1 \
                     WHERE order_id = $2 AND epoch < $1",
                )
                .bind(epoch)
                .bind(order)
                .execute(&pool)
                .await
                .expect("the update runs");
                Ok::<_, Failure>((epoch, written.rows_affected()))
            })
            .await
        })
    };
    // The stale holder's lease lapses at about one second.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let (newer, written) = idem
        .run(&settings, key, fp, ship("shipped"))
        .await
        .expect("the call that took over runs");
    assert_eq!(written, 1, "the holder that took over writes");
    let (older, stale_written) = stale.await.unwrap().expect("the stale body ends");
    assert!(newer > older, "{newer} > {older}");
    assert_eq!(
        stale_written, 0,
        "the stale holder's write is refused by its epoch"
    );
    let (state, epoch): (String, i64) =
        sqlx::query_as("SELECT state, epoch FROM fenced_shipments WHERE order_id = $1")
            .bind(order)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((state.as_str(), epoch), ("shipped", newer));
}

/// With `reject`, retries of a call that already committed
/// replay its result, however many arrive at once. Each replay now takes
/// the key's advisory lock (in the `BEGIN` round trip) and holds it until
/// its transaction is rolled back, so a concurrent replay finds the lock
/// taken and is answered `InProgress` for a key that is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reject_replays_of_a_committed_call_all_replay() {
    let server = shared();
    let store = connect(&server.url()).await;
    let op = op("reject-replays");
    let key = Key::new(&op, "k").unwrap();
    let fp = Fingerprint::of(&1).unwrap();
    let reject = Settings::builder()
        .on_conflict(OnConflict::Reject)
        .build()
        .unwrap();
    let first = store
        .run_in_transaction(&reject, key, fp, |_tx| {
            Box::pin(async move { Ok::<_, ChargeError>(7_i64) })
        })
        .await
        .unwrap();
    assert_eq!(first, 7);
    let mut refused = Vec::new();
    for _ in 0..20 {
        let mut callers = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let store = store.clone();
            callers.spawn(async move {
                store
                    .run_in_transaction(&reject, key, fp, |_tx| {
                        Box::pin(async move { Ok::<_, ChargeError>(8_i64) })
                    })
                    .await
            });
        }
        for answer in callers.join_all().await {
            match answer {
                Ok(replayed) => assert_eq!(replayed, 7),
                Err(error) => refused.push(format!("{error:?}")),
            }
        }
    }
    assert!(
        refused.is_empty(),
        "{} of 80 replays of a committed call were refused: {:?}",
        refused.len(),
        &refused[..refused.len().min(3)]
    );
}

/// Under REPEATABLE READ, a duplicate whose
/// `BEGIN` statement took its snapshot just before the holder committed,
/// and its advisory lock just after, claims under a snapshot that cannot
/// see the holder's record: it should still replay, not fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_racing_the_holders_commit_replays_under_repeatable_read() {
    let server = shared();
    let url = database_at(server, "repeatable_read_race", "repeatable read");
    let (holder_store, spinner_store) = (connect(&url).await, connect(&url).await);
    let reject = Settings::builder()
        .on_conflict(OnConflict::Reject)
        .build()
        .unwrap();
    let fp = Fingerprint::of(&1).unwrap();
    let mut failures = Vec::new();
    for trial in 0..150 {
        let key = Key::new("iso-race", &trial).unwrap();
        let (holder, gate) = hold_in_transaction(&holder_store, reject, key, fp, 7).await;
        let mut spinners = tokio::task::JoinSet::new();
        for _ in 0..3 {
            let store = spinner_store.clone();
            spinners.spawn(async move {
                loop {
                    let answer = store
                        .run_in_transaction(&reject, key, fp, |_tx| {
                            Box::pin(async move { Ok::<_, ChargeError>(8_i64) })
                        })
                        .await;
                    match answer {
                        Err(error) if error.in_progress() => {}
                        answer => return answer.map_err(|e| format!("{e:?}")),
                    }
                }
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        gate.notify_one();
        assert_eq!(holder.await.unwrap().unwrap(), 7);
        for answer in spinners.join_all().await {
            match answer {
                Ok(replayed) => assert_eq!(replayed, 7, "a duplicate ran"),
                Err(error) => failures.push(error),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} duplicates failed instead of replaying: {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
}

/// A migration that fails for want of a privilege fails the call closed
/// (the body never runs), and is tried again by the next call: once the
/// role may create tables in the schema an administrator made for it (not
/// schemas in the database), that call migrates and runs. Once everything
/// exists, migrating needs no privilege to create anything.
#[tokio::test]
async fn a_failed_migration_is_tried_again_by_the_next_call() {
    let server = shared();
    server.psql(
        "DROP SCHEMA IF EXISTS refused CASCADE; DROP ROLE IF EXISTS idem_unprivileged; \
         CREATE ROLE idem_unprivileged LOGIN; CREATE SCHEMA refused",
    );
    let url = format!(
        "postgres://idem_unprivileged@127.0.0.1:{}/postgres",
        server.port()
    );
    let store = PostgresStore::builder(&url)
        .response_timeout(RESPONSE_TIMEOUT)
        .schema("refused")
        .connect_lazy()
        .expect("no connection needed to build it");
    let idem = Idempotency::new(store);
    let runs = Runs::default();
    let (key, fp) = fresh("refused");
    let call = || {
        let runs = runs.clone();
        idem.run(&Settings::DEFAULT, key, fp, async move {
            runs.mark();
            Ok::<_, Failure>(11)
        })
    };
    match call().await {
        Err(Failure::Idem(Error::Store(error))) => {
            assert!(
                error.to_string().contains("migrate"),
                "the error names the migration: {error}"
            );
        }
        other => panic!("expected the migration refused, got {other:?}"),
    }
    assert_eq!(runs.count(), 0, "nothing ran unguarded");
    server.psql("GRANT USAGE, CREATE ON SCHEMA refused TO idem_unprivileged");
    assert_eq!(call().await.unwrap(), 11, "the next call migrated and ran");
    assert_eq!(call().await.unwrap(), 11, "replayed");
    assert_eq!(runs.count(), 1);
    assert_eq!(
        server.psql("SELECT count(*) FROM refused.idempotency_keys"),
        "1"
    );
    server.psql("REVOKE CREATE ON SCHEMA refused FROM idem_unprivileged");
    let again = PostgresStore::builder(&url)
        .response_timeout(RESPONSE_TIMEOUT)
        .schema("refused")
        .connect()
        .await
        .expect("migrating creates nothing once everything exists");
    let idem = Idempotency::new(again);
    let replayed = idem
        .run(&Settings::DEFAULT, key, fp, async { Ok::<_, Failure>(0) })
        .await;
    assert_eq!(replayed.unwrap(), 11, "the same table, replayed");
}

/// Stores of different tables that start together in a schema that does
/// not exist yet all connect: their migrations wait for each other on the
/// schema instead of colliding in creating it.
#[tokio::test]
async fn stores_of_different_tables_migrate_a_new_schema_together() {
    for round in 0..3 {
        let schema = format!("together_{round}");
        let mut starts = tokio::task::JoinSet::new();
        for table in 0..6 {
            let (url, schema) = (shared().url(), schema.clone());
            starts.spawn(async move {
                PostgresStore::builder(url)
                    .response_timeout(Duration::from_secs(5))
                    .schema(schema)
                    .table(format!("keys_{table}"))
                    .connect()
                    .await
            });
        }
        for started in starts.join_all().await {
            if let Err(error) = started {
                panic!("{schema}: a store did not start: {error}");
            }
        }
        assert_eq!(
            shared().psql(&format!(
                "SELECT count(*) FROM pg_tables WHERE schemaname = '{schema}' \
                 AND tablename LIKE 'keys\\__' ESCAPE '\\'"
            )),
            "6"
        );
    }
}

/// An administrator may make every object from the module docs' statements
/// and grant a role only what calls need: that role then connects with the
/// default `migrate(true)`, which finds everything and creates nothing.
/// Here they are an earlier version's statements, without the claim
/// function, which the role may not create: it connects and claims all the
/// same.
#[tokio::test]
async fn objects_an_administrator_made_need_no_privilege_to_create() {
    let server = shared();
    server.psql(
        "DROP SCHEMA IF EXISTS provisioned CASCADE; DROP ROLE IF EXISTS idem_calls_only; \
         CREATE ROLE idem_calls_only LOGIN; CREATE SCHEMA provisioned; SET search_path TO provisioned; \
         CREATE TABLE idempotency_keys (key bytea PRIMARY KEY, fingerprint bytea NOT NULL, \
             token bytea NOT NULL, record bytea, stored_at timestamptz, \
             expires_at timestamptz NOT NULL); \
         CREATE INDEX idempotency_keys_expires_at ON idempotency_keys (expires_at); \
         CREATE INDEX idempotency_keys_claimed ON idempotency_keys (stored_at) WHERE record IS NULL; \
         CREATE TABLE idempotency_keys_steps (key bytea NOT NULL, name text NOT NULL, \
             seq bigserial, value bytea NOT NULL, expires_at timestamptz NOT NULL, \
             PRIMARY KEY (key, name)); \
         CREATE SEQUENCE idempotency_keys_epoch; \
         GRANT USAGE ON SCHEMA provisioned TO idem_calls_only; \
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA provisioned TO idem_calls_only; \
         GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA provisioned TO idem_calls_only",
    );
    let url = format!(
        "postgres://idem_calls_only@127.0.0.1:{}/postgres",
        server.port()
    );
    let store = PostgresStore::builder(&url)
        .response_timeout(RESPONSE_TIMEOUT)
        .schema("provisioned")
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect with the default migrate(true): {e}"));
    let idem = Idempotency::new(store);
    let runs = Runs::default();
    let (key, fp) = fresh("provisioned");
    for _ in 0..2 {
        let runs = runs.clone();
        let answer = idem
            .run(&Settings::DEFAULT, key, fp, async move {
                runs.mark();
                Ok::<_, Failure>(5)
            })
            .await;
        assert_eq!(answer.unwrap(), 5);
    }
    assert_eq!(runs.count(), 1, "run once, then replayed");
}

/// A reachable server that refuses the connection (here, an unknown
/// database) is `Other`, as documented: not a malformed URL, and not a
/// database out of reach.
#[tokio::test]
async fn a_database_that_refuses_the_connection_is_other() {
    let url = format!(
        "postgres://postgres@127.0.0.1:{}/no_such_database",
        shared().port()
    );
    let error = PostgresStore::connect(&url).await.unwrap_err();
    assert_eq!(error.kind(), StoreErrorKind::Other, "{error}");
}

/// Migrating looks each object up by its quoted name: names that need
/// quoting (case, spaces, dots, quotes, a table long enough that the names
/// beside it are derived) are found once they exist, so that a role whose
/// `CREATE` was revoked still connects to them.
#[tokio::test]
async fn objects_with_names_that_need_quoting_are_found_by_their_lookup() {
    let server = shared();
    let quoted = |name: &str| format!("\"{}\"", name.replace('"', "\"\""));
    let schema = "Mixed.\"Case\" schema";
    let tables = [
        "UPPER".to_owned(),
        "with space".to_owned(),
        "dot.ted".to_owned(),
        "quo\"te".to_owned(),
        format!("Long_{}", "X".repeat(58)),
    ];
    server.psql(&format!(
        "DROP SCHEMA IF EXISTS {s} CASCADE; DROP ROLE IF EXISTS idem_quoted; \
         CREATE ROLE idem_quoted LOGIN; CREATE SCHEMA {s}; \
         GRANT USAGE, CREATE ON SCHEMA {s} TO idem_quoted",
        s = quoted(schema)
    ));
    let url = format!(
        "postgres://idem_quoted@127.0.0.1:{}/postgres",
        server.port()
    );
    let call = |table: String, value: u32| {
        let url = url.clone();
        async move {
            let store = PostgresStore::builder(&url)
                .response_timeout(RESPONSE_TIMEOUT)
                .schema(schema)
                .table(&table)
                .connect()
                .await
                .unwrap_or_else(|e| panic!("{table:?}: {e}"));
            let key = Key::new("quoted", &table).unwrap();
            let fp = Fingerprint::of(&1).unwrap();
            Idempotency::new(store)
                .run(&Settings::DEFAULT, key, fp, async move {
                    Ok::<_, Failure>(value)
                })
                .await
                .unwrap()
        }
    };
    for table in &tables {
        assert_eq!(call(table.clone(), 3).await, 3, "{table:?} ran");
    }
    server.psql(&format!(
        "REVOKE CREATE ON SCHEMA {} FROM idem_quoted",
        quoted(schema)
    ));
    for table in &tables {
        assert_eq!(call(table.clone(), 4).await, 3, "{table:?} replayed");
    }
}

/// A transactional call made after `forget` returned does not wait for the
/// holder the forget ended, which this process's later duplicates would
/// otherwise join: it claims the key and runs at once, while the ended
/// holder's body is still blocked.
#[tokio::test]
async fn a_transactional_call_after_forget_does_not_join_the_ended_holder() {
    let server = shared();
    let store = connect(&server.url()).await;
    let key = Key::new(&op("forget-flight"), "k").unwrap();
    let fp = Fingerprint::of(&1).unwrap();
    let (holder, gate) = hold_in_transaction(&store, Settings::DEFAULT, key, fp, 1).await;
    let operator = Idempotency::new(store.clone());
    assert!(operator.forget(key).await.unwrap(), "the holder was ended");
    let rerun = store.run_in_transaction(&Settings::DEFAULT, key, fp, |_tx| {
        Box::pin(async move { Ok::<_, ChargeError>(2_i64) })
    });
    let rerun = tokio::time::timeout(Duration::from_secs(5), rerun)
        .await
        .expect("the call ran without waiting for the ended holder");
    assert_eq!(rerun.unwrap(), 2);
    gate.notify_one();
    assert!(
        holder.await.unwrap().is_err(),
        "the ended holder committed nothing"
    );
}

/// A store whose objects all exist starts at once even while another
/// table's migration in the same schema is held up: here its missing index
/// waits for a transaction that wrote to its table.
#[tokio::test]
async fn a_migration_held_up_on_one_table_holds_up_no_store_of_another() {
    let server = shared();
    server.psql("DROP SCHEMA IF EXISTS held_up CASCADE");
    let open = |table: &'static str, timeout: Duration| {
        let url = server.url();
        async move {
            PostgresStore::builder(url)
                .response_timeout(timeout)
                .schema("held_up")
                .table(table)
                .connect()
                .await
        }
    };
    let b = open("b", Duration::from_secs(5)).await.expect("b migrates");
    open("a", Duration::from_secs(5)).await.expect("a migrates");
    // An index an upgrade adds, or one an administrator dropped.
    server.psql("DROP INDEX held_up.a_claimed");
    let mut writer = b.pool().begin().await.unwrap();
    sqlx::query("LOCK TABLE held_up.a IN ROW EXCLUSIVE MODE")
        .execute(&mut *writer)
        .await
        .unwrap();
    let a = tokio::spawn(open("a", Duration::from_secs(10)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!a.is_finished(), "a's migration waits for the writer");
    let b_again = open("b", Duration::from_secs(1)).await;
    writer.rollback().await.unwrap();
    assert!(a.await.unwrap().is_ok(), "a migrated once the writer ended");
    if let Err(error) = b_again {
        panic!("b's store waited for a's migration: {error}");
    }
}

/// Every value the builder takes works: `Duration::MAX` for the pool's
/// timeout and the purge's interval (the latter "never", in practice) are
/// the longest they take, not an overflow in the caller or in the purge's
/// task; an `age` no claim can have lists nothing, as on the other stores.
#[tokio::test]
async fn the_longest_settings_work_and_the_oldest_listing_is_empty() {
    let server = shared();
    let store = PostgresStore::builder(server.url())
        .response_timeout(RESPONSE_TIMEOUT)
        .connect_timeout(Duration::MAX)
        .purge_interval(Duration::MAX)
        .max_connections(2)
        .connect()
        .await
        .unwrap();
    let purge_panicked = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = Arc::clone(&purge_panicked);
    let previous = std::panic::take_hook();
    // Other tests' panics (bodies that panic on purpose) are not this one's.
    std::panic::set_hook(Box::new(move |info| {
        if info.to_string().contains("overflow") {
            seen.store(true, Ordering::SeqCst);
        }
        previous(info);
    }));
    runs_once_then_replays(&store, "pg.longest").await;
    // The purge's task starts with the first call; give it a turn.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = std::panic::take_hook();
    assert!(!purge_panicked.load(Ordering::SeqCst), "a task overflowed");
    let idem = Idempotency::new(store);
    for age in [Duration::MAX, Duration::from_secs(10_000 * 365 * 86_400)] {
        let listed = idem.claims_older_than(age, 10).await.unwrap();
        assert!(listed.is_empty(), "{age:?}");
    }
    // The longest response timeout: calls are refused for it (a lease
    // cannot be three times as long), the runbook's operations work.
    let slow = PostgresStore::builder(server.url())
        .response_timeout(Duration::MAX)
        .max_connections(1)
        .connect()
        .await
        .unwrap();
    let idem = Idempotency::new(slow);
    let (key, fp) = fresh("pg.longest-timeout");
    let refused = idem
        .run(&Settings::DEFAULT, key, fp, async { Ok::<_, Failure>(1) })
        .await;
    assert!(
        matches!(refused, Err(Failure::Idem(Error::Config(_)))),
        "{refused:?}"
    );
    assert!(!idem.forget(key).await.unwrap());
    assert!(idem.claims_older_than(Duration::ZERO, 1).await.is_ok());
}

/// A transactional call's body is outside every other call's journal, also
/// when the call is made inside a step of another call: its steps run as
/// they are (never journaled under the outer call's key), and `epoch()` and
/// `mark_final()` answer `OutsideCall` instead of the outer call's.
#[tokio::test]
async fn a_transactional_call_inside_another_calls_step_has_no_journal() {
    let pg = connect(&shared().url()).await;
    let outer = Idempotency::memory();
    let key = Key::new("tests.postgres.nested-steps", &op("outer")).unwrap();
    let fp = Fingerprint::of(&1).unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let seen = {
        let (pg, runs) = (pg.clone(), Arc::clone(&runs));
        outer
            .run(&Settings::DEFAULT, key, fp, async move {
                idem_core::step("outer-step", async move {
                    let tx_key = Key::new("tests.postgres.nested-steps", &op("inner")).unwrap();
                    pg.run_in_transaction(&Settings::DEFAULT, tx_key, fp, move |_tx| {
                        Box::pin(async move {
                            for _ in 0..2 {
                                idem_core::step("inner-step", async {
                                    runs.fetch_add(1, Ordering::SeqCst);
                                    Ok::<_, Error>(())
                                })
                                .await?;
                            }
                            let epoch = idem_core::epoch().await;
                            let marked = idem_core::mark_final();
                            Ok::<_, Error>((
                                matches!(epoch, Err(Error::OutsideCall { .. })),
                                matches!(marked, Err(Error::OutsideCall { .. })),
                            ))
                        })
                    })
                    .await
                })
                .await
            })
            .await
            .unwrap()
    };
    assert_eq!(
        seen,
        (true, true),
        "epoch and mark_final are outside a call"
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "a name used twice runs twice"
    );
    assert_eq!(outer.steps_done(key).await.unwrap(), ["outer-step"]);
}
