//! The Redis store on a single node: the conformance suite, round trips
//! counted by the server, exactly-once across OS processes, and real faults
//! (a killed server, killed connections, flushed scripts, a paused server,
//! records that are not ours).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use idem_core::store::redis::{EvictionCheck, envelope};
use idem_core::store::{Begin, Outcome, Record, Store, StoreErrorKind, Token};
use idem_core::{Error, Fingerprint, Idempotency, Key, OnConflict, RedisStore, Settings};
use idem_test::conformance::{Backend, Failure, Runs, Timing, fresh};
use idem_test::redis_server::{RESPONSE_TIMEOUT, RedisServer, shared_node};

struct Node;

impl Backend for Node {
    async fn store(&self) -> Arc<dyn Store> {
        Arc::new(connect(&shared_node().url()).await)
    }

    fn timing(&self) -> Timing {
        idem_test::redis_server::TIMING
    }

    fn follows_tokio_clock(&self) -> bool {
        false
    }
}

mod conformance {
    idem_test::conformance_suite!(super::Node);
}

async fn connect(url: &str) -> RedisStore {
    RedisStore::node(url)
        .response_timeout(RESPONSE_TIMEOUT)
        .connection_timeout(RESPONSE_TIMEOUT)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

/// Commands run inside our scripts (which write with PSETEX, never SET);
/// everything else a client sent.
const SCRIPT_INTERNAL: [&str; 3] = ["get", "psetex", "del"];

fn client_commands(server: &RedisServer) -> HashMap<String, u64> {
    server
        .command_calls()
        .into_iter()
        .filter(|(name, _)| !SCRIPT_INTERNAL.contains(&name.as_str()) && name != "info")
        .collect()
}

fn delta(before: &HashMap<String, u64>, after: &HashMap<String, u64>) -> (u64, Vec<String>) {
    let mut total = 0;
    let mut names = Vec::new();
    for (name, calls) in after {
        let d = calls - before.get(name).copied().unwrap_or(0);
        if d > 0 {
            total += d;
            names.push(format!("{name}×{d}"));
        }
    }
    (total, names)
}

#[tokio::test]
async fn round_trips_per_call_are_one_two_and_two() {
    let server = RedisServer::start();
    let store = connect(&server.url()).await;
    let idem = Idempotency::new(store.clone());
    // Load every script once, so the counts below are steady-state.
    let (key, fp) = fresh("warm-up");
    idem.run(&Settings::DEFAULT, key, fp, async { Ok::<_, Failure>(1) })
        .await
        .unwrap();
    idem.run(&Settings::DEFAULT, key, fp, async { Ok::<_, Failure>(1) })
        .await
        .unwrap();
    let (key, fp) = fresh("warm-up-failed");
    let _ = idem
        .run(&Settings::DEFAULT, key, fp, async {
            Err::<u8, _>(Failure::Body(1))
        })
        .await;

    let (key, fp) = fresh("first-run");
    let before = client_commands(&server);
    idem.run(&Settings::DEFAULT, key, fp, async {
        Ok::<_, Failure>("r".to_owned())
    })
    .await
    .unwrap();
    let (first_run, names) = delta(&before, &client_commands(&server));
    assert_eq!(first_run, 2, "a first run is begin + complete: {names:?}");

    let before = client_commands(&server);
    idem.run(&Settings::DEFAULT, key, fp, async {
        Ok::<_, Failure>("other".to_owned())
    })
    .await
    .unwrap();
    let (hit, names) = delta(&before, &client_commands(&server));
    assert_eq!(hit, 1, "a replayed hit is one round trip: {names:?}");

    let (key, fp) = fresh("failed-run");
    let before = client_commands(&server);
    let _ = idem
        .run(&Settings::DEFAULT, key, fp, async {
            Err::<u8, _>(Failure::Body(2))
        })
        .await;
    let (failed, names) = delta(&before, &client_commands(&server));
    assert_eq!(failed, 2, "a failed run is begin + release: {names:?}");
}

#[test]
fn exactly_once_across_four_processes() {
    let server = RedisServer::start();
    idem_test::redis_server::exactly_once_across_processes(
        env!("CARGO_BIN_EXE_idem-storm"),
        &server.url(),
        &server,
        &format!("storm.node.{}", Token::random()),
    );
}

#[tokio::test]
async fn a_killed_server_fails_closed_then_recovers() {
    let mut server = RedisServer::start();
    let idem = Idempotency::new(connect(&server.url()).await);
    let runs = Runs::default();
    let (key, fp) = fresh("before-outage");
    idem.run(&Settings::DEFAULT, key, fp, async {
        Ok::<_, Failure>(runs.mark())
    })
    .await
    .unwrap();

    // Killed in the middle of a call: the holder's own caller gets its result;
    // the record cannot be stored and the claim dies with the server.
    let (key, fp) = fresh("mid-call");
    let (tell, began) = tokio::sync::oneshot::channel();
    let holder = {
        let (idem, runs) = (idem.clone(), runs.clone());
        tokio::spawn(async move {
            idem.run(&Settings::DEFAULT, key, fp, async move {
                runs.mark();
                let _ = tell.send(());
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok::<_, Failure>("finished".to_owned())
            })
            .await
        })
    };
    began.await.unwrap();
    server.kill();
    assert_eq!(holder.await.unwrap().unwrap(), "finished");
    assert_eq!(runs.count(), 2);

    for _ in 0..3 {
        let (key, fp) = fresh("during-outage");
        let result = idem
            .run(&Settings::DEFAULT, key, fp, async {
                Ok::<_, Failure>(runs.mark())
            })
            .await;
        match result {
            Err(Failure::Idem(Error::Store(e))) => {
                assert_eq!(e.kind(), StoreErrorKind::Unavailable, "{e}")
            }
            other => panic!("expected a store error during the outage, got {other:?}"),
        }
    }
    assert_eq!(runs.count(), 2, "no body ran unguarded during the outage");

    server.restart();
    let (key, fp) = fresh("after-restart");
    let mut result = idem
        .run(&Settings::DEFAULT, key, fp, async {
            Ok::<_, Failure>(runs.mark())
        })
        .await;
    // The connection manager may still be between reconnect attempts.
    for _ in 0..20 {
        if result.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        result = idem
            .run(&Settings::DEFAULT, key, fp, async {
                Ok::<_, Failure>(runs.mark())
            })
            .await;
    }
    assert_eq!(result.expect("the same store works after the restart"), 3);
}

#[tokio::test]
async fn a_killed_connection_is_replaced_by_the_next_call() {
    let server = RedisServer::start();
    let store = connect(&server.url()).await;
    let idem = Idempotency::new(store.clone());
    let (key, fp) = fresh("client-kill");
    assert_eq!(
        idem.run(&Settings::DEFAULT, key, fp, async { Ok::<_, Failure>(1) })
            .await
            .unwrap(),
        1
    );
    let killed = server.cli(&["CLIENT", "KILL", "TYPE", "normal"]);
    assert!(
        killed.trim().parse::<u32>().unwrap_or(0) >= 1,
        "killed {killed}"
    );
    assert_eq!(
        idem.run(&Settings::DEFAULT, key, fp, async { Ok::<_, Failure>(2) })
            .await
            .unwrap(),
        1
    );
    let (key, fp) = fresh("client-kill-new");
    assert_eq!(
        idem.run(&Settings::DEFAULT, key, fp, async { Ok::<_, Failure>(3) })
            .await
            .unwrap(),
        3
    );
}

#[tokio::test]
async fn flushed_scripts_are_loaded_again() {
    let server = RedisServer::start();
    let store = connect(&server.url()).await;
    let idem = Idempotency::new(store.clone());
    let (key, fp) = fresh("script-flush");
    assert_eq!(
        idem.run(&Settings::DEFAULT, key, fp, async { Ok::<_, Failure>(1) })
            .await
            .unwrap(),
        1
    );
    assert_eq!(server.cli(&["SCRIPT", "FLUSH"]).trim(), "OK");
    assert_eq!(
        idem.run(&Settings::DEFAULT, key, fp, async { Ok::<_, Failure>(2) })
            .await
            .unwrap(),
        1
    );
    let (key, fp) = fresh("script-flush-new");
    assert_eq!(server.cli(&["SCRIPT", "FLUSH"]).trim(), "OK");
    assert_eq!(
        idem.run(&Settings::DEFAULT, key, fp, async { Ok::<_, Failure>(3) })
            .await
            .unwrap(),
        3
    );
}

#[tokio::test]
async fn a_paused_server_times_out_without_granting_a_second_claim() {
    let server = RedisServer::start();
    let store = RedisStore::node(server.url())
        .response_timeout(Duration::from_millis(200))
        .connect()
        .await
        .unwrap();
    let (key, fp) = fresh("paused");
    let holder = Token::random();
    let lease = Duration::from_secs(10);
    assert_eq!(
        store.begin(key, fp, holder, lease).await.unwrap(),
        Begin::Claimed
    );

    assert_eq!(server.cli(&["CLIENT", "PAUSE", "1500", "ALL"]).trim(), "OK");
    let runs = Runs::default();
    let reject = Settings::builder()
        .on_conflict(OnConflict::Reject)
        .build()
        .unwrap();
    let during = Idempotency::new(store.clone())
        .run(&reject, key, fp, async { Ok::<_, Failure>(runs.mark()) })
        .await;
    match during {
        Err(Failure::Idem(Error::Store(e))) => assert_eq!(e.kind(), StoreErrorKind::Timeout, "{e}"),
        other => panic!("expected a timeout while paused, got {other:?}"),
    }
    assert_eq!(runs.count(), 0);

    // SIGSTOP freezes the whole server the same way.
    server.cli(&["CLIENT", "UNPAUSE"]);
    server.signal("-STOP");
    let frozen = store.begin(key, fp, Token::random(), lease).await;
    server.signal("-CONT");
    assert_eq!(frozen.unwrap_err().kind(), StoreErrorKind::Timeout);

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        matches!(
            store.begin(key, fp, Token::random(), lease).await.unwrap(),
            Begin::InProgress { .. }
        ),
        "the live claim still holds"
    );
    assert!(
        store.renew(key, holder, lease).await.unwrap(),
        "and it is still the holder's"
    );
}

async fn raw_connection(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// The raw bytes under `key`, bypassing the store.
async fn raw_get(server: &RedisServer, key: &str) -> Vec<u8> {
    let mut connection = raw_connection(server).await;
    redis::cmd("GET")
        .arg(key)
        .query_async(&mut connection)
        .await
        .unwrap()
}

/// Runs a raw command on `server`, bypassing the store.
async fn raw(server: &RedisServer, args: &[&[u8]]) {
    let mut connection = raw_connection(server).await;
    let mut command = redis::cmd(std::str::from_utf8(args[0]).unwrap());
    for arg in &args[1..] {
        command.arg(*arg);
    }
    command.exec_async(&mut connection).await.unwrap();
}

#[tokio::test]
async fn records_that_are_not_ours_are_clear_errors() {
    let server = RedisServer::start();
    let store = connect(&server.url()).await;
    let lease = Duration::from_secs(5);
    let runs = Runs::default();

    // Garbage of another type under a record key.
    let (key, fp) = fresh("wrong-type");
    raw(
        &server,
        &[b"SET", store.record_key(&key).as_bytes(), b"garbage"],
    )
    .await;
    let err = store
        .begin(key, fp, Token::random(), lease)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Corrupt, "{err}");
    let result = Idempotency::new(store.clone())
        .run(&Settings::DEFAULT, key, fp, async {
            Ok::<_, Failure>(runs.mark())
        })
        .await;
    match result {
        Err(Failure::Idem(error @ Error::Store(_))) => {
            assert_eq!(
                error.http_status(),
                500,
                "not an outage a client should retry"
            );
        }
        other => panic!("expected a store error, got {other:?}"),
    }
    assert_eq!(runs.count(), 0);

    // A hash that is not an idem record.
    let (key, fp) = fresh("foreign-hash");
    raw(
        &server,
        &[
            b"HSET",
            store.record_key(&key).as_bytes(),
            b"name",
            b"someone",
        ],
    )
    .await;
    let err = store
        .begin(key, fp, Token::random(), lease)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Corrupt, "{err}");

    // A completed record whose bytes are garbage, or from a newer format.
    for (bytes, says) in [
        (&b"garbage"[..], "not an idem record"),
        (b"\x09o{}", "newer"),
    ] {
        let (key, fp) = fresh("bad-record");
        let token = Token::random();
        assert_eq!(
            store.begin(key, fp, token, lease).await.unwrap(),
            Begin::Claimed
        );
        store
            .complete(key, token, Record::new(Outcome::Ok, &b"1"[..]), lease)
            .await
            .unwrap();
        // Keep the header; replace the record after it.
        let record_key = store.record_key(&key);
        let mut value = raw_get(&server, &record_key).await;
        value.truncate(envelope::HEADER);
        value.extend_from_slice(bytes);
        raw(&server, &[b"SET", record_key.as_bytes(), &value]).await;
        let err = store
            .begin(key, fp, Token::random(), lease)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Corrupt, "{err}");
        assert!(err.to_string().contains(says), "{err}");
    }

    // Too short to be a record.
    let (key, fp) = fresh("short");
    raw(
        &server,
        &[b"SET", store.record_key(&key).as_bytes(), b"c123"],
    )
    .await;
    let err = store
        .begin(key, fp, Token::random(), lease)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Corrupt, "{err}");
}

#[tokio::test]
async fn stored_keys_are_prefixed_hash_tagged_digests() {
    let server = RedisServer::start();
    let store = RedisStore::node(server.url())
        .prefix("shop:idem")
        .connect()
        .await
        .unwrap();
    let key = Key::new("orders.create", "customer-secret-42").unwrap();
    Idempotency::new(store)
        .run(
            &Settings::DEFAULT,
            key,
            Fingerprint::of(&("card", "4242-4242-secret")).unwrap(),
            async { Ok::<_, Failure>(()) },
        )
        .await
        .unwrap();
    let keys = server.cli(&["KEYS", "*"]);
    let stored = keys.trim();
    assert_eq!(stored, format!("shop:idem:{{{key}}}"));
    let record = server.cli(&["GET", stored]);
    assert!(record.contains("null"), "the result is there: {record}");
    for text in [stored, record.as_str()] {
        assert!(
            !text.contains("secret") && !text.contains("4242-4242"),
            "user bytes never reach the store: {text}"
        );
    }
}

/// A listing of old claims looks at 100 000 keys at most, and says so when
/// it stops there: the claims among the keys it did not scan are missing.
#[tokio::test]
async fn a_listing_cut_at_its_scan_limit_says_so() {
    let server = RedisServer::start();
    let store = RedisStore::node(server.url())
        .prefix("shop:idem")
        .connect()
        .await
        .unwrap();
    server.cli(&[
        "EVAL",
        "for i = 1, 100001 do redis.call('SET', ARGV[1] .. i .. '}', 'x') end",
        "0",
        "shop:idem:{",
    ]);
    let logs = idem_test::logs::capture();
    let claims = Idempotency::new(store)
        .claims_older_than(Duration::ZERO, 10)
        .await
        .unwrap();
    assert!(claims.is_empty(), "{claims:?}");
    let text = logs.text();
    assert!(
        text.contains("stopped listing old claims after scanning its limit of keys")
            && text.contains("scanned=100000"),
        "{text}"
    );
}

/// A lease must be at least three response timeouts of its store, so that
/// a renewal can time out once and be sent again before it lapses: a
/// shorter one is a configuration error, and the body does not run.
#[tokio::test]
async fn a_lease_shorter_than_three_response_timeouts_is_refused() {
    let store = RedisStore::node(shared_node().url())
        .response_timeout(Duration::from_millis(250))
        .connect()
        .await
        .unwrap();
    let idem = Idempotency::new(store);
    let runs = Runs::default();
    for (lease, runs_it) in [(749, false), (750, true)] {
        let settings = Settings::builder()
            .lease(Duration::from_millis(lease))
            .build()
            .unwrap();
        let (key, fp) = fresh("lease-rule");
        let answer = idem
            .run(&settings, key, fp, async { Ok::<_, Failure>(runs.mark()) })
            .await;
        match answer {
            Ok(_) => assert!(runs_it, "a lease of {lease} ms ran"),
            Err(Failure::Idem(Error::Config(rule))) => {
                assert!(!runs_it, "a lease of {lease} ms: {rule}");
                assert!(rule.to_string().contains("lease"), "{rule}");
            }
            Err(other) => panic!("a lease of {lease} ms: {other:?}"),
        }
    }
    assert_eq!(runs.count(), 1, "only the long enough lease ran");
}

#[tokio::test]
async fn connect_by_url() {
    let server = RedisServer::start();
    let idem = Idempotency::connect(&format!("{}/0", server.url()))
        .await
        .unwrap();
    let (key, fp) = fresh("by-url");
    let result = idem
        .run(&Settings::DEFAULT, key, fp, async { Ok::<_, Failure>(5) })
        .await;
    assert_eq!(result.unwrap(), 5);
    // Schemes are case-insensitive.
    let upper = server.url().replacen("redis://", "REDIS://", 1);
    let idem = Idempotency::connect(&upper).await.unwrap();
    let result = idem
        .run(&Settings::DEFAULT, key, fp, async { Ok::<_, Failure>(6) })
        .await;
    assert_eq!(result.unwrap(), 5, "the same store, replayed");

    let port = idem_test::redis_server::free_port();
    let err = idem_core::connect(&format!("redis://127.0.0.1:{port}"))
        .await
        .err()
        .expect("nothing listens");
    assert_eq!(err.kind(), StoreErrorKind::Unavailable, "{err}");
    let err = idem_core::connect("redis+cluster://")
        .await
        .err()
        .expect("no nodes");
    assert_eq!(err.kind(), StoreErrorKind::Config, "{err}");
}

/// A `begin` sent to a frozen server times out (the caller gets a 503) but
/// lands when the server resumes; the claim it leaves is cleared, so the
/// caller's retry runs at once instead of waiting out the lease.
#[tokio::test]
async fn a_begin_lost_to_a_frozen_server_does_not_lock_the_key() {
    let server = RedisServer::start();
    let store = RedisStore::node(server.url())
        .response_timeout(Duration::from_millis(200))
        .connect()
        .await
        .unwrap();
    let idem = Idempotency::new(store);
    let reject = Settings::builder()
        .on_conflict(OnConflict::Reject)
        .lease(Duration::from_secs(30))
        .build()
        .unwrap();
    let (key, fp) = fresh("frozen-begin");
    let runs = Runs::default();

    server.signal("-STOP");
    let frozen = idem
        .run(&reject, key, fp, async { Ok::<_, Failure>(runs.mark()) })
        .await;
    server.signal("-CONT");
    match frozen {
        Err(Failure::Idem(Error::Store(e))) => {
            assert_eq!(e.kind(), StoreErrorKind::Timeout, "{e}");
            assert_eq!(Error::Store(e).http_status(), 503);
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert_eq!(runs.count(), 0);

    tokio::time::sleep(Duration::from_millis(300)).await;
    let retried = idem
        .run(&reject, key, fp, async { Ok::<_, Failure>(runs.mark()) })
        .await;
    assert_eq!(retried.expect("the retry runs at once"), 1);
}

/// A Redis that may evict keys under memory pressure could evict a live
/// claim; the store refuses it unless told to accept the risk.
#[tokio::test]
async fn a_redis_that_may_evict_claims_is_refused_unless_told() {
    let evicting =
        RedisServer::start_with(&["--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"]);
    let err = RedisStore::node(evicting.url())
        .connect()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Config, "{err}");
    for says in [
        "allkeys-lru",
        "maxmemory-policy noeviction",
        "EvictionCheck::Warn",
    ] {
        assert!(err.to_string().contains(says), "{err}");
    }
    let by_url = idem_core::connect(&evicting.url())
        .await
        .err()
        .expect("refused");
    assert_eq!(by_url.kind(), StoreErrorKind::Config);
    RedisStore::node(evicting.url())
        .eviction_check(EvictionCheck::Warn)
        .connect()
        .await
        .expect("accepted when told");

    let limited =
        RedisServer::start_with(&["--maxmemory", "64mb", "--maxmemory-policy", "noeviction"]);
    RedisStore::node(limited.url())
        .connect()
        .await
        .expect("noeviction is safe");
}

/// A lazy store lets a service start while Redis is down: calls fail closed
/// (the body never runs) until Redis is up, then work.
#[tokio::test]
async fn a_lazy_store_starts_while_redis_is_down() {
    let mut server = RedisServer::start();
    server.kill();
    let store = RedisStore::node(server.url())
        .connection_timeout(Duration::from_millis(200))
        .response_timeout(Duration::from_millis(200))
        .connect_lazy()
        .expect("no connection is made yet");
    let idem = Idempotency::new(store);
    let runs = Runs::default();
    let (key, fp) = fresh("lazy");
    for _ in 0..3 {
        let down = idem
            .run(&Settings::DEFAULT, key, fp, async {
                Ok::<_, Failure>(runs.mark())
            })
            .await;
        match down {
            Err(Failure::Idem(Error::Store(e))) => {
                assert_eq!(e.kind(), StoreErrorKind::Unavailable, "{e}")
            }
            other => panic!("expected a store error, got {other:?}"),
        }
    }
    assert_eq!(runs.count(), 0, "nothing ran unguarded");
    server.restart();
    let up = idem
        .run(&Settings::DEFAULT, key, fp, async {
            Ok::<_, Failure>(runs.mark())
        })
        .await;
    assert_eq!(up.expect("works once Redis is up"), 1);
}

/// Callers that come together to a lazy store whose server accepts
/// connections and never answers share one open's failure: each fails
/// within about one open's time, not one after another (twenty opens).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_of_a_lazy_store_share_a_failed_open() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket); // never read, never answered
        }
    });
    let store = RedisStore::node(format!("redis://{addr}"))
        .connection_timeout(Duration::from_millis(200))
        .response_timeout(Duration::from_millis(200))
        .connect_lazy()
        .unwrap();
    let idem = Idempotency::new(store);
    // One open, alone, for the measure.
    let (key, fp) = fresh("lazy-silent");
    let started = Instant::now();
    let alone = idem
        .run(&Settings::DEFAULT, key, fp, async { Ok::<_, Failure>(1) })
        .await;
    assert!(alone.is_err(), "{alone:?}");
    let one_open = started.elapsed();

    let runs = Runs::default();
    let started = Instant::now();
    let mut callers = tokio::task::JoinSet::new();
    for n in 0..20 {
        let (idem, runs) = (idem.clone(), runs.clone());
        callers.spawn(async move {
            let (key, fp) = fresh(&format!("lazy-silent-{n}"));
            let answer = idem
                .run(&Settings::DEFAULT, key, fp, async {
                    Ok::<_, Failure>(runs.mark())
                })
                .await;
            (answer.is_err(), started.elapsed())
        });
    }
    for (failed, took) in callers.join_all().await {
        assert!(failed, "no server answers");
        assert!(
            took < one_open * 3 + Duration::from_secs(1),
            "{took:?}, where one open takes {one_open:?}"
        );
    }
    assert_eq!(runs.count(), 0, "nothing ran unguarded");
}

/// Captures what idem logs while `f` runs on this thread.
async fn logs_of<F: std::future::Future>(f: F) -> (F::Output, String) {
    let capture = idem_test::logs::capture();
    let output = f.await;
    (output, capture.text())
}

/// A password in a Redis URL never appears in an error, a `Debug` rendering
/// or a log line.
#[tokio::test]
async fn passwords_in_urls_are_never_printed() {
    let server = RedisServer::start_with(&[
        "--requirepass",
        "s3cret-pw",
        "--maxmemory",
        "64mb",
        "--maxmemory-policy",
        "volatile-ttl",
    ]);
    let url = format!("redis://:s3cret-pw@127.0.0.1:{}", server.port());
    let (refused, logs) = logs_of(RedisStore::node(&url).connect()).await;
    let refused = refused.expect_err("an evicting Redis");
    let (warned, warn_logs) = logs_of(
        RedisStore::node(&url)
            .eviction_check(EvictionCheck::Warn)
            .connect(),
    )
    .await;
    let store = warned.expect("accepted when told");
    assert!(warn_logs.contains("evicts keys"), "{warn_logs}");
    let wrong = format!("redis://:wrong-pw@127.0.0.1:{}", server.port());
    let denied = RedisStore::node(&wrong)
        .connect()
        .await
        .expect_err("a wrong password");
    let no_nodes = idem_core::connect("redis+cluster://:s3cret-pw@/0")
        .await
        .err()
        .expect("no nodes");
    let printed = [
        refused.to_string(),
        format!("{refused:?}"),
        logs,
        warn_logs,
        denied.to_string(),
        format!("{store:?}"),
        format!("{:?}", RedisStore::node(&url)),
        no_nodes.to_string(),
    ];
    for text in printed {
        assert!(
            !text.contains("s3cret-pw") && !text.contains("wrong-pw"),
            "{text}"
        );
    }
    assert!(refused.to_string().contains(":***@"), "{refused}");
}

/// A server that speaks just enough RESP to be connected to, and never
/// answers `CONFIG`: a slow or proxied Redis whose eviction policy cannot be
/// read. Every other command gets `+OK`.
async fn silent_on_config() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut pending = Vec::new();
                let mut buffer = [0; 4096];
                loop {
                    let Ok(read) = socket.read(&mut buffer).await else {
                        return;
                    };
                    if read == 0 {
                        return;
                    }
                    pending.extend_from_slice(&buffer[..read]);
                    while let Some((command, used)) = resp_command(&pending) {
                        pending.drain(..used);
                        if command.eq_ignore_ascii_case("config") {
                            continue;
                        }
                        if socket.write_all(b"+OK\r\n").await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// The name of the first RESP command in `bytes`, and how many bytes it
/// takes, once all of it has arrived.
fn resp_command(bytes: &[u8]) -> Option<(String, usize)> {
    fn line(bytes: &[u8], at: usize) -> Option<(&[u8], usize)> {
        let end = bytes[at..].windows(2).position(|w| w == b"\r\n")? + at;
        Some((&bytes[at..end], end + 2))
    }
    let (header, mut at) = line(bytes, 0)?;
    let count: usize = std::str::from_utf8(header.strip_prefix(b"*")?)
        .ok()?
        .parse()
        .ok()?;
    let mut name = None;
    for _ in 0..count {
        let (length, next) = line(bytes, at)?;
        let length: usize = std::str::from_utf8(length.strip_prefix(b"$")?)
            .ok()?
            .parse()
            .ok()?;
        let end = next + length;
        if bytes.len() < end + 2 {
            return None;
        }
        name.get_or_insert_with(|| String::from_utf8_lossy(&bytes[next..end]).into_owned());
        at = end + 2;
    }
    Some((name.unwrap_or_default(), at))
}

/// A Redis that does not answer the eviction check is not connected to as if
/// it had passed it: only an explicit refusal of `CONFIG` takes the warning
/// path.
#[tokio::test]
async fn an_unanswered_eviction_check_fails_the_connect() {
    let addr = silent_on_config().await;
    let error = RedisStore::node(format!("redis://{addr}"))
        .response_timeout(Duration::from_millis(300))
        .connection_timeout(Duration::from_millis(300))
        .connect()
        .await
        .expect_err("no answer is no pass");
    assert_eq!(error.kind(), StoreErrorKind::Unavailable, "{error}");
    assert!(error.to_string().contains("eviction policy"), "{error}");

    // CONFIG refused outright (renamed away) still connects, with a warning,
    // even where the policy (unreadable) would have been refused.
    let renamed = RedisServer::start_with(&[
        "--maxmemory",
        "64mb",
        "--maxmemory-policy",
        "allkeys-lru",
        "--rename-command",
        "CONFIG",
        "\"\"",
    ]);
    RedisStore::node(renamed.url())
        .connect()
        .await
        .expect("a refused CONFIG takes the documented warning path");

    // A real Redis that evicts (`maxmemory` with `allkeys-lru`), whose
    // answer to the check never comes (the proxy holds the `CONFIG GET`
    // back): the connect fails instead of passing with a warning.
    let evicting =
        RedisServer::start_with(&["--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"]);
    let upstream = format!("127.0.0.1:{}", evicting.port()).parse().unwrap();
    let proxy = idem_test::proxy::Proxy::start(upstream, |_| idem_test::proxy::Fault::Pass)
        .await
        .unwrap();
    proxy.hold_next_request(b"*3\r\n$6\r\nCONFIG");
    let error = RedisStore::node(format!("redis://{}", proxy.addr()))
        .response_timeout(Duration::from_millis(300))
        .connection_timeout(Duration::from_millis(300))
        .connect()
        .await
        .expect_err("an evicting Redis whose check goes unanswered is not connected to");
    assert_eq!(error.kind(), StoreErrorKind::Unavailable, "{error}");
    assert!(error.to_string().contains("eviction policy"), "{error}");
    proxy.deliver();
}

/// `used_memory` from `INFO memory`.
fn used_memory(server: &RedisServer) -> u64 {
    server
        .cli(&["INFO", "memory"])
        .lines()
        .find_map(|line| line.strip_prefix("used_memory:"))
        .and_then(|bytes| bytes.trim().parse().ok())
        .expect("INFO memory reports used_memory")
}

/// A real Redis at `maxmemory` under `noeviction` (the policy idem requires)
/// takes the claim (a few bytes) and refuses the 3 MB result (under the
/// handle's 4 MB maximum record size) with `OOM`:
/// the call's own caller gets its result, the store keeps a few bytes
/// saying the call ran, and the retry gets `NotReplayable` instead of
/// running the body again.
#[tokio::test]
async fn a_result_a_full_redis_refuses_is_recorded_not_run_again() {
    let server = RedisServer::start_with(&["--maxmemory-policy", "noeviction"]);
    let store = connect(&server.url()).await;
    // Room for claims and small records, none for a 3 MB one.
    let limit = used_memory(&server) + 1024 * 1024;
    assert_eq!(
        server
            .cli(&["CONFIG", "SET", "maxmemory", &limit.to_string()])
            .trim(),
        "OK"
    );
    let idem = Idempotency::new(store);
    let settings = Settings::builder()
        .lease(Duration::from_secs(5))
        .build()
        .unwrap();
    let (key, fp) = fresh("full-redis");
    let big = "x".repeat(3 * 1024 * 1024);
    let runs = Runs::default();

    let first = idem
        .run(&settings, key, fp, async {
            runs.mark();
            Ok::<_, Failure>(big.clone())
        })
        .await;
    assert_eq!(first.expect("its own caller gets the result"), big);
    assert!(
        server
            .cli(&["INFO", "errorstats"])
            .contains("errorstat_OOM"),
        "the 3 MB record was refused with OOM: {}",
        server.cli(&["INFO", "errorstats"])
    );

    // Past the lease: a claim left to lapse would let the retry run.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let retry = idem
        .run(&settings, key, fp, async {
            runs.mark();
            Ok::<_, Failure>(String::new())
        })
        .await;
    assert!(
        matches!(retry, Err(Failure::Idem(Error::NotReplayable { .. }))),
        "{retry:?}"
    );
    assert_eq!(runs.count(), 1, "the body ran once");
}
