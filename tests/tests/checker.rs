//! The exactly-once checker on every built-in backend (memory, also behind
//! a `ReplayCache`; a Redis
//! node, also behind breaking connections and killed and restarted; a Redis
//! Cluster, also while its slots move; PostgreSQL, also behind breaking
//! connections and in transactional mode), and on the consumer core and the
//! retrying client: the fixed seeds and a few fresh ones (printed) per run;
//! a soak of them all with
//! `IDEM_CHECKER_MINUTES=30 cargo test -p idem-test --all-features --test checker -- --ignored --nocapture --test-threads 10`.
//! Replay one seed with `IDEM_CHECKER_SEED=n`.

use std::sync::Arc;
use std::time::Duration;

use idem_core::MemoryStore;
use idem_core::store::{Record, Store};
use idem_test::conformance::{Backend, Timing};

/// The memory store, on tokio's paused clock: leases and stalls pass in no
/// time, and a seed's schedule of faults is the same on every run.
struct Memory;

impl Backend for Memory {
    async fn store(&self) -> Arc<dyn Store> {
        Arc::new(MemoryStore::new())
    }

    fn timing(&self) -> Timing {
        Timing {
            lease: Duration::from_secs(3),
            ttl: Duration::from_secs(60),
        }
    }

    fn follows_tokio_clock(&self) -> bool {
        true
    }
}

/// The forget scenario of the checker on a backend: the fixed seeds and a
/// few fresh ones, and an ignored soak.
macro_rules! forget_checker {
    ($backend:expr) => {
        #[test]
        fn forget_checker() {
            let seeds = idem_test::checker::ci_seeds(8);
            for report in idem_test::checker::check_forget_seeds(&$backend, &seeds) {
                println!("{report:?}");
            }
        }

        #[test]
        #[ignore = "a soak: IDEM_CHECKER_MINUTES=30 (or IDEM_CHECKER_SEEDS=N) cargo test … -- --ignored"]
        fn forget_soak() {
            let (mut calls, mut forgets, mut replayed) = (0, 0, 0);
            idem_test::checker::soak_seeds(32, |seeds| {
                for report in idem_test::checker::check_forget_seeds(&$backend, seeds) {
                    calls += report.calls;
                    forgets += report.forgets;
                    replayed += report.replayed_after;
                }
                format!(
                    "{calls} calls, {forgets} forgets, {replayed} replays after one, no violation"
                )
            });
        }
    };
}

/// A current-thread runtime on tokio's paused clock.
fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("a tokio runtime")
}

mod memory {
    idem_test::exactly_once_suite!(super::Memory);
    forget_checker!(super::Memory);
}

/// The memory store behind a `ReplayCache` of eight records, each kept for
/// 2 s of the paused clock: replays answered in process, records pushed out
/// and read again, and replays of records that expired in the store (the
/// cache's documented window, which the expiring keys' excuse covers).
struct CachedMemory;

impl Backend for CachedMemory {
    async fn store(&self) -> Arc<dyn Store> {
        Arc::new(idem_core::ReplayCache::new(
            MemoryStore::new(),
            8,
            Duration::from_secs(2),
        ))
    }

    fn timing(&self) -> Timing {
        Memory.timing()
    }

    fn follows_tokio_clock(&self) -> bool {
        true
    }
}

mod memory_replay_cache {
    idem_test::exactly_once_suite!(super::CachedMemory);
    forget_checker!(super::CachedMemory);
}

#[cfg(feature = "redis")]
mod redis_node {
    use super::*;
    use idem_core::RedisStore;
    use idem_test::redis_server::{RESPONSE_TIMEOUT, shared_node};

    pub(crate) struct Node;

    /// A node's store, as every Redis node backend here opens it.
    pub(crate) async fn connect(url: &str) -> RedisStore {
        RedisStore::node(url)
            .response_timeout(RESPONSE_TIMEOUT)
            .connection_timeout(RESPONSE_TIMEOUT)
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
    }

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

    idem_test::exactly_once_suite!(Node);
    forget_checker!(Node);
}

/// Connections that break mid-use, every few hundred milliseconds each:
/// the proxy passes a connection's traffic for a while, then loses the
/// answer to its last request and closes it, and the store reconnects.
#[cfg(any(feature = "redis", feature = "postgres"))]
fn breaking_connections(n: u64) -> idem_test::proxy::Fault {
    idem_test::proxy::Fault::CutAfter(Duration::from_millis(200 + (n * 7919) % 900))
}

/// A Redis node behind connections that break mid-use.
#[cfg(feature = "redis")]
mod redis_node_breaking_connections {
    use super::*;
    use idem_test::proxy::Proxy;
    use idem_test::redis_server::shared_node;

    pub(crate) struct BreakingNode;

    impl Backend for BreakingNode {
        async fn store(&self) -> Arc<dyn Store> {
            let server = format!("127.0.0.1:{}", shared_node().port());
            let proxy = Proxy::start(server.parse().unwrap(), breaking_connections)
                .await
                .expect("a proxy");
            let url = format!("redis://{}", proxy.addr());
            let store = super::redis_node::connect(&url).await;
            // The proxy lives as long as the seed's runtime.
            std::mem::forget(proxy);
            Arc::new(store)
        }

        fn timing(&self) -> Timing {
            idem_test::redis_server::TIMING
        }

        fn follows_tokio_clock(&self) -> bool {
            false
        }
    }

    idem_test::exactly_once_suite!(BreakingNode);
}

/// A Redis node that is killed (SIGKILL) and restarted while the calls run,
/// one server per seed, with every write on disk before it is answered
/// (`appendfsync always`), so that a restart loses no acknowledged write:
/// calls fail with store errors while it is down, and every promise holds.
#[cfg(feature = "redis")]
mod redis_node_killed_and_restarted {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;
    use idem_test::redis_server::RedisServer;

    pub(crate) struct KilledNode;

    static SERVERS: AtomicU64 = AtomicU64::new(0);

    impl Backend for KilledNode {
        async fn store(&self) -> Arc<dyn Store> {
            let mut server =
                RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
            let url = server.url();
            let store = super::redis_node::connect(&url).await;
            // Killed at a time of its own within the seed's calls, restarted
            // at once on its port and its append-only file.
            let n = SERVERS.fetch_add(1, Ordering::Relaxed);
            let kill_at = Duration::from_millis(300 + (n * 7919) % 2500);
            std::thread::spawn(move || {
                std::thread::sleep(kill_at);
                server.restart();
                // Kept up until the seed is surely over.
                std::thread::sleep(Duration::from_secs(40));
            });
            Arc::new(store)
        }

        fn timing(&self) -> Timing {
            idem_test::redis_server::TIMING
        }

        fn follows_tokio_clock(&self) -> bool {
            false
        }
    }

    idem_test::exactly_once_suite!(KilledNode);
}

/// PostgreSQL behind connections that break mid-use.
#[cfg(feature = "postgres")]
mod postgres_breaking_connections {
    use super::*;
    use idem_test::postgres_server::shared;
    use idem_test::proxy::Proxy;

    pub(crate) struct BreakingPostgres;

    impl Backend for BreakingPostgres {
        async fn store(&self) -> Arc<dyn Store> {
            let server = format!("127.0.0.1:{}", shared().port());
            let proxy = Proxy::start(server.parse().unwrap(), breaking_connections)
                .await
                .expect("a proxy");
            let url = shared().url().replace(&server, &proxy.addr().to_string());
            let store = super::postgres::connect(&url).await;
            // The proxy lives as long as the seed's runtime.
            std::mem::forget(proxy);
            Arc::new(store)
        }

        fn timing(&self) -> Timing {
            idem_test::postgres_server::TIMING
        }

        fn follows_tokio_clock(&self) -> bool {
            false
        }
    }

    idem_test::exactly_once_suite!(BreakingPostgres);
}

#[cfg(feature = "redis")]
mod redis_cluster {
    use super::*;
    use idem_core::RedisStore;
    use idem_test::redis_server::{RESPONSE_TIMEOUT, RedisCluster, RedisServer, shared_cluster};

    pub(crate) struct Cluster;

    /// The checker's store on `cluster`.
    pub(crate) async fn connect(cluster: &RedisCluster) -> RedisStore {
        RedisStore::cluster(cluster.nodes.iter().map(RedisServer::url))
            .response_timeout(RESPONSE_TIMEOUT)
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", cluster.url()))
    }

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

    idem_test::exactly_once_suite!(Cluster);
}

/// A Redis Cluster whose slots keep moving between its primaries while
/// the calls run (`RedisCluster::reshard_continuously`): each move takes the
/// slot of a key in use, key by key, so that calls meet it half moved.
#[cfg(feature = "redis")]
mod redis_cluster_resharding {
    use super::*;
    use idem_test::redis_server::RedisCluster;
    use std::sync::OnceLock;

    /// The cluster of this backend alone.
    fn cluster() -> &'static RedisCluster {
        static CLUSTER: OnceLock<RedisCluster> = OnceLock::new();
        CLUSTER.get_or_init(RedisCluster::start)
    }

    /// How often the cluster's primaries answered a redirection or asked
    /// for a retry (`INFO errorstats`): `MOVED`, `ASK`, `TRYAGAIN`.
    fn redirections() -> [u64; 3] {
        let mut counts = [0; 3];
        for node in &cluster().nodes {
            let stats = node.cli(&["INFO", "errorstats"]);
            for (count, error) in counts.iter_mut().zip(["MOVED", "ASK", "TRYAGAIN"]) {
                *count += stats
                    .lines()
                    .find_map(|line| line.strip_prefix(&format!("errorstat_{error}:count=")))
                    .and_then(|n| n.trim().parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
        counts
    }

    /// Checks `seeds` while the cluster reshards; answers the slots and
    /// keys moved, and the redirections the calls met.
    fn check_while_resharding(seeds: &[u64]) -> (usize, usize, [u64; 3]) {
        let before = redirections();
        let resharding = cluster().reshard_continuously();
        let reports = idem_test::checker::check_seeds(&Resharded, seeds);
        let (slots, keys) = resharding
            .stop()
            .unwrap_or_else(|why| panic!("resharding stopped early: {why}"));
        for report in reports {
            println!("{report:?}");
        }
        let after = redirections();
        let met = [0, 1, 2].map(|i| after[i] - before[i]);
        println!(
            "resharding: {slots} slots moved, {keys} keys with them; calls met {} MOVED, {} ASK, {} TRYAGAIN",
            met[0], met[1], met[2]
        );
        (slots, keys, met)
    }

    pub(crate) struct Resharded;

    impl Backend for Resharded {
        async fn store(&self) -> Arc<dyn Store> {
            Arc::new(super::redis_cluster::connect(cluster()).await)
        }

        fn timing(&self) -> Timing {
            idem_test::redis_server::TIMING
        }

        fn follows_tokio_clock(&self) -> bool {
            false
        }
    }

    #[test]
    fn exactly_once_checker() {
        let (_, keys, met) = check_while_resharding(&idem_test::checker::ci_seeds(4));
        assert!(
            keys > 0,
            "no key of the checker's moved while its calls ran"
        );
        assert!(
            met.iter().sum::<u64>() > 0,
            "no call met a slot that moved or was moving"
        );
    }

    #[test]
    #[ignore = "a soak: IDEM_CHECKER_MINUTES=30 (or IDEM_CHECKER_SEEDS=N) cargo test … -- --ignored"]
    fn exactly_once_soak() {
        idem_test::checker::soak_seeds(16, |seeds| {
            let (slots, keys, met) = check_while_resharding(seeds);
            format!("{slots} slots and {keys} keys moved, redirections {met:?}, no violation")
        });
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use idem_core::PostgresStore;
    use idem_test::postgres_server::{RESPONSE_TIMEOUT, shared};

    pub(crate) struct Postgres;

    /// The store, as every PostgreSQL backend here opens it.
    pub(crate) async fn connect(url: &str) -> PostgresStore {
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
            idem_test::postgres_server::TIMING
        }

        fn follows_tokio_clock(&self) -> bool {
            false
        }
    }

    idem_test::exactly_once_suite!(Postgres);
    forget_checker!(Postgres);
}

/// The checker reaches every variant of the function-level HTTP path:
/// HTTP/1.1 and h2, handlers that spawn their call and ones that await it,
/// clients that hang up, and bodies whose panic resets the request.
#[cfg(feature = "axum")]
#[test]
fn the_checker_reaches_every_variant_of_the_function_level_path() {
    use idem_test::checker::{Via, Workload};
    let seeds: Vec<u64> = (0..200).collect();
    let lease = Memory.timing().lease;
    let mut variants = std::collections::BTreeMap::new();
    let mut hung_up = 0;
    for &seed in &seeds {
        for call in Workload::generate(seed, lease).calls {
            if let Via::Handler { h2, spawned } = call.via {
                *variants.entry((h2, spawned)).or_insert(0) += 1;
                hung_up += usize::from(call.cancel_after.is_some());
            }
        }
    }
    let resets: usize = idem_test::checker::check_seeds(&Memory, &seeds)
        .iter()
        .map(|report| report.resets)
        .sum();
    println!("handler calls by (h2, spawned): {variants:?}; {hung_up} hung up; {resets} reset");
    assert_eq!(variants.len(), 4, "{variants:?}");
    assert!(
        hung_up > 0 && resets > 0,
        "{hung_up} hung up, {resets} reset"
    );
}

/// A store that grants every claim, held or not: the checker must catch it.
struct GrantsEveryClaim(MemoryStore);

impl Store for GrantsEveryClaim {
    fn begin(
        &self,
        key: idem_core::Key,
        fingerprint: idem_core::Fingerprint,
        token: idem_core::store::Token,
        lease: Duration,
    ) -> idem_core::store::StoreFuture<'_, idem_core::store::Begin> {
        Box::pin(async move {
            match self.0.begin(key, fingerprint, token, lease).await? {
                idem_core::store::Begin::InProgress { .. } => {
                    let _ = self.0.forget(key).await;
                    self.0.begin(key, fingerprint, token, lease).await
                }
                other => Ok(other),
            }
        })
    }

    fn complete(
        &self,
        key: idem_core::Key,
        token: idem_core::store::Token,
        record: idem_core::store::Record,
        ttl: Duration,
    ) -> idem_core::store::StoreFuture<'_, idem_core::store::Completion> {
        self.0.complete(key, token, record, ttl)
    }

    fn release(
        &self,
        key: idem_core::Key,
        token: idem_core::store::Token,
    ) -> idem_core::store::StoreFuture<'_, ()> {
        self.0.release(key, token)
    }

    fn renew(
        &self,
        key: idem_core::Key,
        token: idem_core::store::Token,
        lease: Duration,
    ) -> idem_core::store::StoreFuture<'_, bool> {
        self.0.renew(key, token, lease)
    }
}

#[test]
fn the_checker_catches_a_store_that_grants_every_claim() {
    let options = idem_test::checker::Options::for_backend(&Memory);
    let caught = paused_runtime().block_on(async {
        for seed in 0..200 {
            let store: Arc<dyn Store> = Arc::new(GrantsEveryClaim(MemoryStore::new()));
            if let Err(violation) = idem_test::checker::check_seed(store, seed, &options).await {
                return Some(violation);
            }
        }
        None
    });
    let violation = caught.expect("a violation within 200 seeds");
    println!("{violation}");
    assert_eq!(violation.broken.invariant, "at most one run per key");
}

/// The memory store with one defect the checker must catch; the last
/// record it stored, for [`Defect::MixesUpKeys`].
struct Defective(MemoryStore, Defect, std::sync::Mutex<Option<Record>>);

impl Defective {
    fn new(defect: Defect) -> Self {
        Self(MemoryStore::new(), defect, std::sync::Mutex::default())
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Defect {
    /// Fingerprints are not kept: a key reused with other arguments
    /// replays the result of the first.
    IgnoresFingerprints,
    /// A replay answers the record stored last, of whichever key.
    MixesUpKeys,
    /// Journals read empty though appends succeed: a call run again
    /// repeats its steps' effects.
    ForgetsJournals,
    /// `forget` answers that it deleted the key but keeps it: calls after
    /// a forget replay what it should have deleted.
    KeepsWhatItForgets,
}

impl Store for Defective {
    fn begin(
        &self,
        key: idem_core::Key,
        fingerprint: idem_core::Fingerprint,
        token: idem_core::store::Token,
        lease: Duration,
    ) -> idem_core::store::StoreFuture<'_, idem_core::store::Begin> {
        use idem_core::store::Begin;
        let fingerprint = match self.1 {
            Defect::IgnoresFingerprints => idem_core::Fingerprint::UNCHECKED,
            _ => fingerprint,
        };
        Box::pin(async move {
            match self.0.begin(key, fingerprint, token, lease).await? {
                Begin::Completed(own) if self.1 == Defect::MixesUpKeys => {
                    let last = self.2.lock().unwrap().clone();
                    Ok(Begin::Completed(last.unwrap_or(own)))
                }
                begun => Ok(begun),
            }
        })
    }

    fn complete(
        &self,
        key: idem_core::Key,
        token: idem_core::store::Token,
        record: idem_core::store::Record,
        ttl: Duration,
    ) -> idem_core::store::StoreFuture<'_, idem_core::store::Completion> {
        *self.2.lock().unwrap() = Some(record.clone());
        self.0.complete(key, token, record, ttl)
    }

    fn release(
        &self,
        key: idem_core::Key,
        token: idem_core::store::Token,
    ) -> idem_core::store::StoreFuture<'_, ()> {
        self.0.release(key, token)
    }

    fn renew(
        &self,
        key: idem_core::Key,
        token: idem_core::store::Token,
        lease: Duration,
    ) -> idem_core::store::StoreFuture<'_, bool> {
        self.0.renew(key, token, lease)
    }

    fn inspect(
        &self,
        key: idem_core::Key,
    ) -> idem_core::store::StoreFuture<'_, idem_core::store::Inspection> {
        self.0.inspect(key)
    }

    fn append_step(
        &self,
        key: idem_core::Key,
        token: idem_core::store::Token,
        name: String,
        value: Vec<u8>,
        ttl: Duration,
    ) -> idem_core::store::StoreFuture<'_, bool> {
        self.0.append_step(key, token, name, value, ttl)
    }

    fn steps(
        &self,
        key: idem_core::Key,
    ) -> idem_core::store::StoreFuture<'_, Vec<idem_core::JournaledStep>> {
        if self.1 == Defect::ForgetsJournals {
            return Box::pin(std::future::ready(Ok(Vec::new())));
        }
        self.0.steps(key)
    }

    fn forget(&self, key: idem_core::Key) -> idem_core::store::StoreFuture<'_, bool> {
        if self.1 == Defect::KeepsWhatItForgets {
            return Box::pin(std::future::ready(Ok(true)));
        }
        self.0.forget(key)
    }
}

#[test]
fn the_checker_catches_a_store_that_forgets_its_journals() {
    let options = idem_test::checker::Options::for_backend(&Memory);
    let caught = paused_runtime().block_on(async {
        for seed in 0..300 {
            let store: Arc<dyn Store> = Arc::new(Defective::new(Defect::ForgetsJournals));
            if let Err(violation) = idem_test::checker::check_seed(store, seed, &options).await {
                return Some(violation);
            }
        }
        None
    });
    let violation = caught.expect("a violation within 300 seeds");
    println!("{violation}");
    assert_eq!(violation.broken.invariant, "at most one effect per step");
}

/// The first violation of the fixed seeds, which every `exactly_once_suite!`
/// runs, on a store with `defect`.
fn first_violation_of_the_fixed_seeds(defect: Defect) -> idem_test::checker::Violation {
    let options = idem_test::checker::Options::for_backend(&Memory);
    paused_runtime().block_on(async {
        for seed in idem_test::checker::FIXED_SEEDS {
            let store: Arc<dyn Store> = Arc::new(Defective::new(defect));
            if let Err(violation) = idem_test::checker::check_seed(store, seed, &options).await {
                return violation;
            }
        }
        panic!("no fixed seed caught a store with {defect:?}")
    })
}

#[test]
fn the_checker_catches_a_store_that_ignores_fingerprints() {
    let violation = first_violation_of_the_fixed_seeds(Defect::IgnoresFingerprints);
    println!("{violation}");
    assert_eq!(
        violation.broken.invariant,
        "answers are the first stored result"
    );
    assert!(
        violation.broken.detail.contains("other arguments"),
        "{violation}"
    );
}

#[test]
fn the_checker_catches_a_store_that_replays_another_keys_record() {
    let violation = first_violation_of_the_fixed_seeds(Defect::MixesUpKeys);
    println!("{violation}");
    assert_eq!(
        violation.broken.invariant,
        "answers are the first stored result"
    );
    assert!(
        violation.broken.detail.contains("not of this key"),
        "{violation}"
    );
}

#[test]
fn the_forget_checker_catches_a_store_that_keeps_what_it_forgets() {
    let lease = Memory.timing().lease;
    let caught = paused_runtime().block_on(async {
        for seed in 0..100 {
            let store: Arc<dyn Store> = Arc::new(Defective::new(Defect::KeepsWhatItForgets));
            if let Err(violation) = idem_test::checker::check_forget_seed(store, seed, lease).await
            {
                return Some(violation);
            }
        }
        None
    });
    let violation = caught.expect("a violation within 100 seeds");
    println!("{violation}");
    assert_eq!(
        violation.broken.invariant,
        "no replay of a forgotten result"
    );
}

/// The forget scenario keys each run of its own, so a store that still
/// holds an earlier run's records of the same seed (a shared server, a
/// rerun within the ttl) shows no violation.
#[test]
fn the_forget_checker_runs_a_seed_twice_on_one_store() {
    let lease = Memory.timing().lease;
    paused_runtime().block_on(async {
        for seed in 0..300 {
            let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
            for run in ["first", "second"] {
                if let Err(violation) =
                    idem_test::checker::check_forget_seed(Arc::clone(&store), seed, lease).await
                {
                    panic!("the {run} run of seed {seed}: {violation}");
                }
            }
        }
    });
}

/// Each fault of the engine's hardening alone, at a high rate, over the fixed seeds on
/// the paused memory store: a scenario per fix, so that each stays fixed.
mod scenarios {
    use idem_test::checker::{FIXED_SEEDS, Options, Schedule, check_seeds_with};
    use idem_test::faults::{Fault, Op};

    use super::*;

    fn only(faults: Vec<(Op, Fault)>) {
        let mut options = Options::for_backend(&Memory);
        options.schedule = Some(Schedule { rate: 0.5, faults });
        let seeds: Vec<u64> = (0..64).chain(FIXED_SEEDS).collect();
        check_seeds_with(&Memory, &seeds, &options);
    }

    /// Results refused by a full store.
    #[test]
    fn a_full_store() {
        only(vec![(Op::Complete, Fault::Full)]);
    }

    /// Renewals whose answers are slow.
    #[test]
    fn slow_renewals() {
        only(vec![(
            Op::Renew,
            Fault::Delayed(Duration::from_millis(400)),
        )]);
    }

    /// Renewals that fail, and land late.
    #[test]
    fn failing_renewals() {
        only(vec![
            (Op::Renew, Fault::Refused),
            (Op::Renew, Fault::LandsLate(Duration::from_millis(400))),
        ]);
    }

    /// Holders whose clocks lag, so their leases read as nearly over.
    #[test]
    fn lagging_holder_clocks() {
        only(vec![(Op::Begin, Fault::ClockLag(Duration::from_secs(30)))]);
    }

    /// Answers lost after the operation was applied, on every operation.
    #[test]
    fn lost_answers() {
        only(vec![
            (Op::Begin, Fault::AnswerLost),
            (Op::Complete, Fault::AnswerLost),
            (Op::Release, Fault::AnswerLost),
            (Op::Renew, Fault::AnswerLost),
        ]);
    }
}

/// The consumer core through an in-memory broker that delivers duplicates,
/// reorders, redelivers after a `Nak` and loses acknowledgements and dead
/// letters, with one to three consumers on one memory store (tokio's
/// paused clock) and failures too long to keep: each message's effect
/// once, replays of that run's value, and every message acknowledged or
/// dead-lettered, never both.
#[cfg(feature = "consumer")]
#[test]
fn the_consumer_core_runs_each_message_once_through_a_faulty_broker() {
    let mut total = idem_test::checker::BrokerReport::default();
    check_broker_seeds(&paused_runtime(), 0..200, &mut total);
    println!("{total:?}");
    assert!(
        total.acks_lost > 0 && total.dead_lettered > 0 && total.dead_letters_lost > 0,
        "{total:?}"
    );
}

/// Checks the consumer core on `seeds`, adding up what they did.
#[cfg(feature = "consumer")]
fn check_broker_seeds(
    runtime: &tokio::runtime::Runtime,
    seeds: impl IntoIterator<Item = u64>,
    total: &mut idem_test::checker::BrokerReport,
) {
    for seed in seeds {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let report = runtime
            .block_on(idem_test::checker::check_broker_seed(store, seed))
            .unwrap_or_else(|violation| panic!("{violation}"));
        total.messages += report.messages;
        total.deliveries += report.deliveries;
        total.acks_lost += report.acks_lost;
        total.dead_lettered += report.dead_lettered;
        total.dead_letters_lost += report.dead_letters_lost;
    }
}

/// The broker check has teeth: a store that grants every claim lets two
/// consumers run one message side by side.
#[cfg(feature = "consumer")]
#[test]
fn the_broker_check_catches_a_store_that_grants_every_claim() {
    let runtime = paused_runtime();
    let caught = (0..200).find_map(|seed| {
        let store: Arc<dyn Store> = Arc::new(GrantsEveryClaim(MemoryStore::new()));
        runtime
            .block_on(idem_test::checker::check_broker_seed(store, seed))
            .err()
    });
    let violation = caught.expect("a violation within 200 seeds");
    // More than once (the redeliveries' order decides how often).
    assert!(violation.contains("handler succeeded"), "{violation}");
}

/// The retrying client against the HTTP layer over a network that loses
/// responses and refuses connections (tokio's paused clock, the memory
/// store): each operation's effect once, and a success gets the body of
/// the run that did it.
#[cfg(feature = "client")]
#[test]
fn the_client_gets_each_operation_done_once_over_a_lossy_network() {
    let mut total = idem_test::checker::ClientReport::default();
    check_client_seeds(&paused_runtime(), 0..200, &mut total);
    println!("{total:?}");
    assert!(total.responses_lost > 0 && total.gave_up > 0, "{total:?}");
}

/// Checks the client on `seeds`, adding up what they did.
#[cfg(feature = "client")]
fn check_client_seeds(
    runtime: &tokio::runtime::Runtime,
    seeds: impl IntoIterator<Item = u64>,
    total: &mut idem_test::checker::ClientReport,
) {
    for seed in seeds {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let report = runtime
            .block_on(idem_test::checker::check_client_seed(store, seed))
            .unwrap_or_else(|violation| panic!("{violation}"));
        total.operations += report.operations;
        total.attempts += report.attempts;
        total.responses_lost += report.responses_lost;
        total.gave_up += report.gave_up;
    }
}

/// A soak of the consumer core's and the client's checks, on random seeds
/// (`IDEM_CHECKER_MINUTES`, `IDEM_CHECKER_SEEDS`).
#[cfg(all(feature = "consumer", feature = "client"))]
#[test]
#[ignore = "a soak: IDEM_CHECKER_MINUTES=30 (or IDEM_CHECKER_SEEDS=N) cargo test … -- --ignored"]
fn broker_and_client_soak() {
    let runtime = paused_runtime();
    let mut broker = idem_test::checker::BrokerReport::default();
    let mut client = idem_test::checker::ClientReport::default();
    idem_test::checker::soak_seeds(64, |seeds| {
        check_broker_seeds(&runtime, seeds.iter().copied(), &mut broker);
        check_client_seeds(&runtime, seeds.iter().copied(), &mut client);
        format!("{broker:?}, {client:?}, no violation")
    });
}

/// A store that answers every `complete` as stored and keeps nothing.
#[cfg(feature = "client")]
struct KeepsNothing(MemoryStore);

#[cfg(feature = "client")]
impl Store for KeepsNothing {
    fn begin(
        &self,
        key: idem_core::Key,
        fingerprint: idem_core::Fingerprint,
        token: idem_core::store::Token,
        lease: Duration,
    ) -> idem_core::store::StoreFuture<'_, idem_core::store::Begin> {
        self.0.begin(key, fingerprint, token, lease)
    }

    fn complete(
        &self,
        key: idem_core::Key,
        token: idem_core::store::Token,
        _record: idem_core::store::Record,
        _ttl: Duration,
    ) -> idem_core::store::StoreFuture<'_, idem_core::store::Completion> {
        Box::pin(async move {
            self.0.release(key, token).await?;
            Ok(idem_core::store::Completion::Stored)
        })
    }

    fn release(
        &self,
        key: idem_core::Key,
        token: idem_core::store::Token,
    ) -> idem_core::store::StoreFuture<'_, ()> {
        self.0.release(key, token)
    }

    fn renew(
        &self,
        key: idem_core::Key,
        token: idem_core::store::Token,
        lease: Duration,
    ) -> idem_core::store::StoreFuture<'_, bool> {
        self.0.renew(key, token, lease)
    }
}

/// The client check has teeth: a store that keeps no record lets a retry
/// after a lost response do the operation again.
#[cfg(feature = "client")]
#[test]
fn the_client_check_catches_a_store_that_keeps_nothing() {
    let runtime = paused_runtime();
    let caught = (0..200).find_map(|seed| {
        let store: Arc<dyn Store> = Arc::new(KeepsNothing(MemoryStore::new()));
        runtime
            .block_on(idem_test::checker::check_client_seed(store, seed))
            .err()
    });
    let violation = caught.expect("a violation within 200 seeds");
    // Done more than once (the retries' jittered pauses decide how often).
    assert!(violation.contains("was done"), "{violation}");
}

/// PostgreSQL's transactional mode, checked against the rows the bodies
/// commit: per key at most one, every `Ok` the committed run's, none from
/// a body that failed, panicked or was cancelled.
#[cfg(feature = "postgres")]
#[test]
fn the_transactional_mode_commits_one_body_per_key() {
    let seeds: Vec<u64> = (0..12).chain(idem_test::checker::ci_seeds(4)).collect();
    assert!(check_transactional_seeds(&seeds) > 0);
}

/// Checks PostgreSQL's transactional mode on `seeds`, side by side on the
/// kit's shared server; answers the rows committed.
#[cfg(feature = "postgres")]
fn check_transactional_seeds(seeds: &[u64]) -> usize {
    use idem_test::postgres_server::{RESPONSE_TIMEOUT, shared};
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // The pool's sessions carry a name of their own, to be told apart from
    // any other check's.
    let sessions = format!(
        "idem-checker-transactional-{}",
        idem_core::store::Token::random()
    );
    // What the server logs when a transaction was left open on a pooled
    // connection: its next user's `BEGIN` runs inside it, or the idle limit
    // ends it. Neither happens to a call that ended, however it ended.
    let leaked = || {
        let log = shared().log();
        log.matches("there is already a transaction in progress")
            .count()
            + log
                .matches("terminating connection due to idle-in-transaction timeout")
                .count()
    };
    let leaked_before = leaked();
    let reports = runtime.block_on(async {
        let store = idem_core::PostgresStore::builder(format!(
            "{}?application_name={sessions}",
            shared().url()
        ))
        .response_timeout(RESPONSE_TIMEOUT)
        .max_connections(12)
        .connect()
        .await
        .unwrap();
        let checks = seeds
            .iter()
            .map(|&seed| idem_test::checker::check_transactional_seed(store.clone(), seed));
        let reports = futures_util::future::join_all(checks).await;
        // Once every call ended, no session of the pool stays inside a
        // transaction: a call cut off (cancelled, timed out, panicked)
        // rolls its own back as its connection returns to the pool, within
        // milliseconds. A leaked one younger than the idle limit is still
        // open here; an older one left its mark in the server's log.
        let mut open = 0;
        for _ in 0..25 {
            open = sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE application_name = $1 AND state LIKE 'idle in transaction%'",
            )
            .bind(&sessions)
            .fetch_one(store.pool())
            .await
            .unwrap();
            if open == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            open, 0,
            "sessions left inside a transaction after every call of seeds {seeds:?} ended"
        );
        reports
    });
    assert_eq!(
        leaked(),
        leaked_before,
        "the server ended or reused a transaction left open on a pooled connection while seeds {seeds:?} ran"
    );
    reports
        .into_iter()
        .map(|report| {
            report
                .unwrap_or_else(|violation| panic!("{violation}"))
                .committed
        })
        .sum()
}

/// A soak of the transactional mode's check, on random seeds
/// (`IDEM_CHECKER_MINUTES`, `IDEM_CHECKER_SEEDS`).
#[cfg(feature = "postgres")]
#[test]
#[ignore = "a soak: IDEM_CHECKER_MINUTES=30 (or IDEM_CHECKER_SEEDS=N) cargo test … -- --ignored"]
fn transactional_soak() {
    let mut committed = 0;
    idem_test::checker::soak_seeds(16, |seeds| {
        committed += check_transactional_seeds(seeds);
        format!("{committed} rows committed, no violation")
    });
}
