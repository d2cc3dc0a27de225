//! Real `redis-server` processes for the Redis tests: single nodes and a
//! three-primary Redis Cluster with one replica each, on free loopback ports.
//!
//! Every server is a child of the test process, watched by a small shell loop
//! that kills it if the test process dies first, so nothing outlives a test
//! run; dropping a [`RedisServer`] stops it at once. Nothing here touches the
//! machine's own Redis. A server that cannot start is a panic, never a skip.
//!
//! The binaries are `redis-server` and `redis-cli` from `PATH`, or the ones
//! the environment variables `IDEM_REDIS_SERVER` and `IDEM_REDIS_CLI` name.
//! The server must be Redis 7.0 or newer (the store's `SET … NX GET`);
//! an older one is a panic that says so.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::process::{require_version, watch_and_clear};

/// The oldest Redis the store works with.
pub const MIN_VERSION: (u32, u32) = (7, 0);

/// The `redis-server` binary: `$IDEM_REDIS_SERVER`, or `redis-server` on
/// `PATH`.
pub fn server_binary() -> String {
    std::env::var("IDEM_REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_owned())
}

/// The `redis-cli` binary: `$IDEM_REDIS_CLI`, or `redis-cli` on `PATH`.
pub fn cli_binary() -> String {
    std::env::var("IDEM_REDIS_CLI").unwrap_or_else(|_| "redis-cli".to_owned())
}

/// Checks once that the server binary runs and is new enough.
fn check_version() {
    static CHECKED: OnceLock<()> = OnceLock::new();
    CHECKED.get_or_init(|| {
        require_version(
            &server_binary(),
            "v=",
            MIN_VERSION,
            "Redis",
            "install redis-server (`apt-get install redis-server redis-tools`, as .ci/run does) \
             or set IDEM_REDIS_SERVER",
        );
    });
}

/// A running `redis-server`.
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    extra: Vec<String>,
    child: Option<Child>,
    _scratch: Option<tempfile::TempDir>,
}

/// A Redis Cluster: [`RedisCluster::start`] makes three primaries, each
/// with one replica; a test may join other nodes its own way and wrap them.
pub struct RedisCluster {
    /// Primaries first, then replicas, as created.
    pub nodes: Vec<RedisServer>,
}

/// A free loopback port whose cluster bus port (+10000) is free too.
pub fn free_port() -> u16 {
    crate::process::free_port_with(&[10_000])
}

impl RedisServer {
    /// Starts a server with no persistence on a free port.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a server with extra `redis-server` arguments.
    pub fn start_with(extra: &[&str]) -> Self {
        let scratch = tempfile::tempdir().expect("a scratch directory");
        let dir = scratch.path().to_path_buf();
        let mut server = Self {
            port: free_port(),
            dir,
            extra: extra.iter().map(ToString::to_string).collect(),
            child: None,
            _scratch: Some(scratch),
        };
        server.launch();
        server
    }

    fn launch(&mut self) {
        check_version();
        let mut command = Command::new(server_binary());
        command
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.dir.join("redis.log"))
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run `{}` ({e})", server_binary()));
        watch_and_clear(child.id(), self._scratch.as_ref().map(|s| s.path()));
        self.child = Some(child);
        self.wait_until_ready();
    }

    fn wait_until_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if ping(self.port) {
                return;
            }
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "redis-server on port {} exited with {status}: {}",
                    self.port,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "redis-server on port {} did not answer within 10 s: {}",
            self.port,
            self.log()
        );
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server with SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and directory.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    /// Stops (SIGSTOP) or continues (SIGCONT) the server process.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("a running server").id();
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// Runs a command with `redis-cli` and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        cli(self.port, args)
    }

    /// `INFO commandstats` as (command, calls) pairs.
    pub fn command_calls(&self) -> Vec<(String, u64)> {
        self.cli(&["INFO", "commandstats"])
            .lines()
            .filter_map(|line| {
                let rest = line.strip_prefix("cmdstat_")?;
                let (name, stats) = rest.split_once(':')?;
                let calls = stats.split(',').find_map(|s| s.strip_prefix("calls="))?;
                Some((name.to_owned(), calls.parse().ok()?))
            })
            .collect()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `redis-cli -p port args…`.
pub fn cli(port: u16, args: &[&str]) -> String {
    let output = Command::new(cli_binary())
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `{}` ({e}); install redis-tools or set IDEM_REDIS_CLI",
                cli_binary()
            )
        });
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    // A server that wants a password answers too, with an error.
    matches!(stream.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG") || buf[..n].starts_with(b"-NOAUTH"))
}

impl RedisCluster {
    /// The `redis-server` arguments of a cluster node (failure detection in
    /// three seconds).
    pub const NODE_ARGS: [&str; 6] = [
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
        "--cluster-node-timeout",
        "3000",
    ];

    /// Starts six servers and joins them into a cluster with
    /// `redis-cli --cluster create … --cluster-replicas 1`.
    pub fn start() -> Self {
        let nodes: Vec<RedisServer> = (0..6)
            .map(|_| RedisServer::start_with(&Self::NODE_ARGS))
            .collect();
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let output = Command::new(cli_binary())
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let cluster = Self { nodes };
        cluster.wait_until_ok();
        cluster
    }

    /// Waits until every node reports `cluster_state:ok` and knows all the
    /// others, and every replica's link to its primary is up.
    pub fn wait_until_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let known = format!("cluster_known_nodes:{}", self.nodes.len());
        loop {
            let ready = self.nodes.iter().all(|node| {
                let info = node.cli(&["CLUSTER", "INFO"]);
                let replication = node.cli(&["INFO", "replication"]);
                info.contains("cluster_state:ok")
                    && info.contains(&known)
                    && (replication.contains("role:master")
                        || replication.contains("master_link_status:up"))
            });
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not become ok in 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The `redis+cluster://` URL of the cluster.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// The nodes that are primaries now.
    pub fn primaries(&self) -> Vec<&RedisServer> {
        self.nodes
            .iter()
            .filter(|n| n.cli(&["ROLE"]).starts_with("master"))
            .collect()
    }

    /// Moves slots between the primaries in the background, one after
    /// another, until the returned [`Resharding`] is stopped or dropped: each time the
    /// slot of a key some primary holds, so that the keys in use move while
    /// calls on them run, with a pause of 10–40 ms between its keys and of
    /// 50–250 ms between moves.
    #[must_use]
    pub fn reshard_continuously(&self) -> Resharding {
        let primaries: Vec<Primary> = self
            .primaries()
            .into_iter()
            .map(|node| Primary {
                port: node.port,
                id: node.cli(&["CLUSTER", "MYID"]).trim().to_owned(),
            })
            .collect();
        assert!(primaries.len() > 1, "resharding needs two primaries");
        let stop = Arc::new(AtomicBool::new(false));
        let (moves, keys) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let thread = {
            let (stop, moves, keys) = (Arc::clone(&stop), Arc::clone(&moves), Arc::clone(&keys));
            std::thread::spawn(move || {
                let mut turn: u64 = 0;
                while !stop.load(Ordering::SeqCst) {
                    turn += 1;
                    // A cheap spread of choices, the same on every run.
                    let draw = turn.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 33;
                    let n = primaries.len();
                    let from = usize::try_from(draw).unwrap_or(0) % n;
                    let to = (from + 1 + usize::try_from(draw >> 8).unwrap_or(0) % (n - 1)) % n;
                    let (source, target) = (&primaries[from], &primaries[to]);
                    let pause = Duration::from_millis(10 + draw % 31);
                    if let Some(moved) = move_a_slot(source, target, &primaries, pause) {
                        moves.fetch_add(1, Ordering::SeqCst);
                        keys.fetch_add(moved, Ordering::SeqCst);
                    }
                    std::thread::sleep(Duration::from_millis(50 + draw % 201));
                }
            })
        };
        Resharding {
            stop,
            moves,
            keys,
            thread: Some(thread),
        }
    }
}

/// Slots moving between a cluster's primaries in the background, while the
/// cluster serves: see [`RedisCluster::reshard_continuously`]. Dropping it
/// (or [`stop`](Resharding::stop)) lets the move under way finish, then
/// stops.
pub struct Resharding {
    stop: Arc<AtomicBool>,
    moves: Arc<AtomicUsize>,
    keys: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Resharding {
    /// Slots moved so far.
    #[must_use]
    pub fn slots_moved(&self) -> usize {
        self.moves.load(Ordering::SeqCst)
    }

    /// Keys moved with them so far.
    #[must_use]
    pub fn keys_moved(&self) -> usize {
        self.keys.load(Ordering::SeqCst)
    }

    /// Stops after the move under way; answers the slots and keys moved.
    ///
    /// # Errors
    /// Why resharding stopped early: a move that could not finish (a
    /// command the cluster refused) panics the resharding thread rather
    /// than leave keys where their slot's owner cannot serve them.
    pub fn stop(mut self) -> Result<(usize, usize), String> {
        self.stop.store(true, Ordering::SeqCst);
        let thread = self.thread.take().expect("stopped once");
        let moved = (self.slots_moved(), self.keys_moved());
        thread.join().map(|()| moved).map_err(|panic| {
            panic
                .downcast_ref::<String>()
                .cloned()
                .unwrap_or_else(|| "the resharding thread panicked".to_owned())
        })
    }
}

impl Drop for Resharding {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A primary's port and id, as the resharding thread needs them.
#[derive(Clone)]
struct Primary {
    port: u16,
    id: String,
}

/// Whether `redis-cli` printed an error reply.
fn refused(answer: &str) -> bool {
    let answer = answer.trim();
    [
        "ERR",
        "IOERR",
        "MOVED",
        "ASK",
        "TRYAGAIN",
        "CLUSTERDOWN",
        "BUSY",
        "Could not connect",
    ]
    .iter()
    .any(|error| answer.starts_with(error))
}

/// Runs a command that must answer `OK`; panics with what the cluster
/// answered otherwise.
fn must(port: u16, args: &[&str]) {
    let answer = cli(port, args);
    assert!(
        answer.trim() == "OK",
        "`{}` on port {port}: {answer:?}",
        args.join(" ")
    );
}

/// Moves the slot of a key that `source` holds (one `RANDOMKEY` drew) to
/// `target`, as `redis-cli --cluster reshard` does: the slot is marked
/// importing and migrating, its keys migrate one by one with `pause`
/// before each (so that calls meet the slot half moved: `ASK` for keys
/// already gone, `TRYAGAIN` for a script whose keys are split), and once
/// the source holds none of them every primary is told the new owner.
/// Returns the keys moved, or `None` when `source` held no key. Panics when
/// a move cannot finish, rather than hand a slot over while its old owner
/// still holds keys of it (which the cluster would then delete).
fn move_a_slot(
    source: &Primary,
    target: &Primary,
    primaries: &[Primary],
    pause: Duration,
) -> Option<usize> {
    let key = cli(source.port, &["RANDOMKEY"]).trim().to_owned();
    if key.is_empty() || refused(&key) {
        return None;
    }
    let slot = cli(source.port, &["CLUSTER", "KEYSLOT", &key])
        .trim()
        .to_owned();
    slot.parse::<u16>().ok()?;
    must(
        target.port,
        &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &source.id],
    );
    must(
        source.port,
        &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &target.id],
    );
    let port = target.port.to_string();
    let (mut moved, mut failures) = (0, 0);
    loop {
        let keys = cli(source.port, &["CLUSTER", "GETKEYSINSLOT", &slot, "1"]);
        assert!(
            !refused(&keys),
            "`CLUSTER GETKEYSINSLOT {slot} 1`: {keys:?}"
        );
        let Some(key) = keys.lines().map(str::trim).find(|k| !k.is_empty()) else {
            break;
        };
        std::thread::sleep(pause);
        let answer = cli(
            source.port,
            &["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS", key],
        );
        match answer.trim() {
            "OK" => moved += 1,
            // Expired or deleted meanwhile.
            "NOKEY" => {}
            other => {
                failures += 1;
                assert!(
                    failures < 20,
                    "MIGRATE of slot {slot} keeps failing: {other:?}"
                );
            }
        }
    }
    let left = cli(source.port, &["CLUSTER", "COUNTKEYSINSLOT", &slot]);
    assert_eq!(left.trim(), "0", "slot {slot} still has keys on its source");
    for node in [target, source].into_iter().chain(primaries) {
        must(
            node.port,
            &["CLUSTER", "SETSLOT", &slot, "NODE", &target.id],
        );
    }
    Some(moved)
}

/// Runs 4 processes of the `idem-storm` binary (at `binary`), 250 concurrent
/// callers each, on one key of the store at `store_url`, and checks that the
/// body ran once in all (a counter on `counter`) and that all 1000 callers got
/// the identical result.
pub fn exactly_once_across_processes(
    binary: &str,
    store_url: &str,
    counter: &RedisServer,
    operation: &str,
) {
    let processes: Vec<_> = (0..4)
        .map(|_| {
            Command::new(binary)
                .args([store_url, operation, "250", &counter.url(), operation])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start a storm process")
        })
        .collect();
    let mut results = Vec::new();
    for process in processes {
        let output = process.wait_with_output().expect("a storm process ends");
        assert!(
            output.status.success(),
            "a storm process failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        results.extend(
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .map(str::to_owned),
        );
    }
    assert_eq!(results.len(), 1000, "4 processes × 250 callers");
    assert!(
        results.iter().all(|r| *r == results[0]),
        "identical results"
    );
    assert_eq!(
        counter.cli(&["GET", operation]).trim(),
        "1",
        "the body ran once across the processes"
    );
}

/// The response timeout of the stores the Redis tests open.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_millis(500);

/// The lease and TTL of the conformance suite on Redis: real time, with room
/// for a busy machine; the lease is three response timeouts, the least a
/// store allows.
pub const TIMING: crate::conformance::Timing = crate::conformance::Timing {
    lease: Duration::from_millis(1500),
    ttl: Duration::from_secs(4),
};

/// A node shared by the tests of one test binary.
pub fn shared_node() -> &'static RedisServer {
    static NODE: OnceLock<RedisServer> = OnceLock::new();
    NODE.get_or_init(RedisServer::start)
}

/// A cluster shared by the tests of one test binary.
pub fn shared_cluster() -> &'static RedisCluster {
    static CLUSTER: OnceLock<RedisCluster> = OnceLock::new();
    CLUSTER.get_or_init(RedisCluster::start)
}
