//! The Redis store on a real Redis Cluster (three primaries, one replica
//! each): the conformance suite, exactly-once across OS processes, keys
//! spread over the primaries, and a coordinated failover under load.

use std::sync::Arc;
use std::time::{Duration, Instant};

use idem_core::store::{Begin, Store, Token};
use idem_core::{Fingerprint, Idempotency, Key, RedisStore, Settings};
use idem_test::conformance::{Backend, Failure, Runs, Timing, fresh};
use idem_test::redis_server::{RESPONSE_TIMEOUT, RedisCluster, RedisServer, shared_cluster};

struct Cluster;

impl Backend for Cluster {
    async fn store(&self) -> Arc<dyn Store> {
        Arc::new(connect(shared_cluster()).await)
    }

    fn timing(&self) -> Timing {
        idem_test::redis_server::TIMING
    }

    fn follows_tokio_clock(&self) -> bool {
        false
    }
}

mod conformance {
    idem_test::conformance_suite!(super::Cluster);
}

async fn connect(cluster: &RedisCluster) -> RedisStore {
    let nodes = cluster.nodes.iter().map(RedisServer::url);
    RedisStore::cluster(nodes)
        .response_timeout(RESPONSE_TIMEOUT)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to {}: {e}", cluster.url()))
}

#[test]
fn exactly_once_across_four_processes() {
    let counter = RedisServer::start();
    idem_test::redis_server::exactly_once_across_processes(
        env!("CARGO_BIN_EXE_idem-storm"),
        &shared_cluster().url(),
        &counter,
        &format!("storm.cluster.{}", Token::random()),
    );
}

#[tokio::test]
async fn keys_spread_over_every_primary() {
    let cluster = shared_cluster();
    let store = connect(cluster).await;
    let idem = Idempotency::new(store);
    let name = format!("spread.{}", Token::random());
    for i in 0..300 {
        let key = Key::new(&name, &i).unwrap();
        idem.run(
            &Settings::DEFAULT,
            key,
            Fingerprint::of(&i).unwrap(),
            async { Ok::<_, Failure>(i) },
        )
        .await
        .unwrap();
    }
    for primary in cluster.primaries() {
        let keys: u64 = primary.cli(&["DBSIZE"]).trim().parse().unwrap();
        assert!(keys > 0, "primary {} holds no record", primary.port());
    }
}

/// A coordinated `CLUSTER FAILOVER` while calls run: every record completed
/// before it is still completed after it, and replays without running again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_records_survive_a_coordinated_failover() {
    let cluster = RedisCluster::start();
    let idem = Idempotency::new(connect(&cluster).await);
    let name = format!("failover.{}", Token::random());
    let runs = Runs::default();
    let call = {
        let (idem, runs, name) = (idem.clone(), runs.clone(), name.clone());
        move |i: u32| {
            let (idem, runs, name) = (idem.clone(), runs.clone(), name.clone());
            async move {
                let key = Key::new(&name, &i).unwrap();
                idem.run(
                    &Settings::DEFAULT,
                    key,
                    Fingerprint::of(&i).unwrap(),
                    async move {
                        runs.mark();
                        Ok::<_, Failure>(i * 10)
                    },
                )
                .await
            }
        }
    };
    for i in 0..100 {
        assert_eq!(call(i).await.unwrap(), i * 10);
    }
    assert_eq!(runs.count(), 100);

    // Load continues on new keys while a replica takes over its primary.
    let load = {
        let call = call.clone();
        tokio::spawn(async move {
            let mut outcomes = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(4);
            let mut i = 1000;
            while Instant::now() < deadline {
                outcomes.push(call(i).await.is_ok());
                i += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            outcomes
        })
    };
    let replica = cluster
        .nodes
        .iter()
        .find(|n| n.cli(&["ROLE"]).starts_with("slave"))
        .expect("a replica");
    assert_eq!(replica.cli(&["CLUSTER", "FAILOVER"]).trim(), "OK");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !replica.cli(&["ROLE"]).starts_with("master") {
        assert!(Instant::now() < deadline, "the replica did not take over");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.wait_until_ok();
    let outcomes = load.await.unwrap();
    assert!(
        outcomes.iter().any(|ok| *ok),
        "calls went on around the failover"
    );

    let before = runs.count();
    for i in 0..100 {
        let mut replay = call(i).await;
        for _ in 0..50 {
            if replay.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            replay = call(i).await;
        }
        assert_eq!(replay.expect("a replay after the failover"), i * 10);
    }
    assert_eq!(runs.count(), before, "no completed call ran again");
}

/// On a cluster, the eviction policy is read from every primary: one that
/// may evict keys is enough to refuse the cluster.
#[tokio::test]
async fn a_cluster_with_an_evicting_primary_is_refused() {
    let cluster = RedisCluster::start();
    let primary = cluster.primaries()[1];
    assert_eq!(
        primary.cli(&["CONFIG", "SET", "maxmemory", "64mb"]).trim(),
        "OK"
    );
    assert_eq!(
        primary
            .cli(&["CONFIG", "SET", "maxmemory-policy", "allkeys-lfu"])
            .trim(),
        "OK"
    );
    let nodes = cluster.nodes.iter().map(RedisServer::url);
    let err = RedisStore::cluster(nodes.clone())
        .connect()
        .await
        .unwrap_err();
    assert_eq!(
        err.kind(),
        idem_core::store::StoreErrorKind::Config,
        "{err}"
    );
    assert!(err.to_string().contains("allkeys-lfu"), "{err}");
    RedisStore::cluster(nodes)
        .eviction_check(idem_core::store::redis::EvictionCheck::Warn)
        .connect()
        .await
        .expect("accepted when told");
}

/// Starts moving the slot of `record_key` (the one key in it) from the
/// primary that holds it to another: marked importing on the target and
/// migrating on the source, no key moved yet. Answers the slot, the source
/// and the target.
fn start_migrating<'c>(
    cluster: &'c RedisCluster,
    record_key: &str,
) -> (String, &'c RedisServer, &'c RedisServer) {
    let primaries = cluster.primaries();
    let slot = primaries[0]
        .cli(&["CLUSTER", "KEYSLOT", record_key])
        .trim()
        .to_owned();
    let source = *primaries
        .iter()
        .find(|node| count_keys(node, &slot) == 1)
        .expect("the claim's node");
    let target = *primaries
        .iter()
        .find(|node| node.port() != source.port())
        .unwrap();
    let id = |node: &RedisServer| node.cli(&["CLUSTER", "MYID"]).trim().to_owned();
    let (source_id, target_id) = (id(source), id(target));
    target.cli(&["CLUSTER", "SETSLOT", &slot, "IMPORTING", &source_id]);
    source.cli(&["CLUSTER", "SETSLOT", &slot, "MIGRATING", &target_id]);
    (slot, source, target)
}

/// The keys `node` holds in `slot`.
fn count_keys(node: &RedisServer, slot: &str) -> u64 {
    node.cli(&["CLUSTER", "COUNTKEYSINSLOT", slot])
        .trim()
        .parse()
        .unwrap()
}

/// The stuck-key runbook during a reshard: while a claim's slot migrates
/// (the claim already moved to the importing node, so its old node answers
/// `ASK`), `inspect` and `claims_older_than` follow the redirection and
/// still see it.
#[tokio::test]
async fn the_runbook_works_while_a_slot_migrates() {
    let cluster = RedisCluster::start();
    let store = connect(&cluster).await;
    let (key, fp) = fresh("migrating");
    let claimed = store
        .begin(key, fp, Token::random(), Duration::from_secs(60))
        .await
        .unwrap();
    assert!(matches!(claimed, Begin::Claimed));
    let record_key = store.record_key(&key);
    let (_, source, target) = start_migrating(&cluster, &record_key);
    let port = target.port().to_string();
    let moved = source.cli(&[
        "MIGRATE",
        "127.0.0.1",
        &port,
        "",
        "0",
        "5000",
        "KEYS",
        &record_key,
    ]);
    assert!(moved.contains("OK"), "{moved}");

    let idem = Idempotency::new(store);
    match idem.inspect(key).await {
        Ok(idem_core::Inspection::InProgress { fingerprint, .. }) => assert_eq!(fingerprint, fp),
        other => panic!("inspect mid-migration: {other:?}"),
    }
    let claims = idem
        .claims_older_than(Duration::ZERO, 100)
        .await
        .expect("the scan follows redirections");
    assert!(claims.iter().any(|claim| claim.key == key), "{claims:?}");
}

/// A claim that also reads the journal (`begin_with_steps`), made while
/// the claim's slot migrates with the claim still on its old node and no
/// journal anywhere: the second claimant sees the claim in progress, and
/// nothing is claimed on the importing node (a pipeline whose journal read
/// was redirected with `ASK` would have been resent whole there).
#[tokio::test]
async fn a_claim_reading_the_journal_mid_migration_sees_the_old_nodes_claim() {
    let cluster = RedisCluster::start();
    let store = connect(&cluster).await;
    let (key, fp) = fresh("migrating-journal");
    let first = store
        .begin(key, fp, Token::random(), Duration::from_secs(60))
        .await
        .unwrap();
    assert!(matches!(first, Begin::Claimed));
    let record_key = store.record_key(&key);
    let (slot, _, target) = start_migrating(&cluster, &record_key);

    let (second, steps) = store
        .begin_with_steps(key, fp, Token::random(), Duration::from_secs(60))
        .await
        .unwrap();
    assert!(matches!(second, Begin::InProgress { .. }), "{second:?}");
    assert!(steps.is_none());
    assert_eq!(
        count_keys(target, &slot),
        0,
        "nothing claimed on the importing node"
    );
}

/// A brace in a cluster store's prefix would take the place of each key's
/// hash tag (`x{}` makes Redis hash the whole key, so a call's record and
/// journal land in two slots and every step and `forget` fails): refused
/// when the store is built.
#[test]
fn a_cluster_prefix_with_a_brace_is_refused() {
    for prefix in ["x{}", "{}", "a{b}", "{", "}"] {
        let error = RedisStore::cluster(["redis://127.0.0.1:7000"])
            .prefix(prefix)
            .connect_lazy()
            .unwrap_err();
        assert_eq!(
            error.kind(),
            idem_core::store::StoreErrorKind::Config,
            "{prefix}"
        );
        assert!(error.to_string().contains("prefix"), "{error}");
    }
    // A node has one slot space: any prefix works there.
    RedisStore::node("redis://127.0.0.1:7000")
        .prefix("x{}")
        .connect_lazy()
        .unwrap();
}
