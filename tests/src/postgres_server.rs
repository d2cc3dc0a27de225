//! Real PostgreSQL servers for the PostgreSQL tests: a data directory made
//! by `initdb` in a temporary directory, and a `postgres` server on a free
//! loopback port, both removed at the end.
//!
//! The server is a child of the test process, watched so that it dies with
//! it; dropping a [`PostgresServer`] stops it. As root (PostgreSQL refuses
//! to run as root), it runs as the `postgres` user. Nothing here touches the
//! machine's own database. A server that cannot start is a panic, never a
//! skip.
//!
//! The binaries are found in `$IDEM_PG_BIN`, on `PATH`, or in the newest
//! `/usr/lib/postgresql/*/bin`; PostgreSQL 12 or newer is required.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::process::{free_port, running_as_root, watch_and_clear};

/// The oldest PostgreSQL the store is tested with.
pub const MIN_VERSION: u32 = 12;

/// A running PostgreSQL server.
pub struct PostgresServer {
    port: u16,
    dir: PathBuf,
    extra: Vec<String>,
    child: Option<Child>,
    _scratch: tempfile::TempDir,
}

/// The directory of the PostgreSQL binaries.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Ok(dir) = std::env::var("IDEM_PG_BIN") {
            return PathBuf::from(dir);
        }
        if let Ok(out) = Command::new("sh")
            .args(["-c", "command -v initdb"])
            .output()
            && out.status.success()
        {
            let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            let path = std::fs::canonicalize(&path).unwrap_or(path);
            if let Some(dir) = path.parent() {
                return dir.to_path_buf();
            }
        }
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let version = entry.file_name().to_string_lossy().parse().ok()?;
                Some((version, entry.path().join("bin")))
            })
            .filter(|(_, bin)| bin.join("initdb").exists())
            .collect();
        versions.sort();
        versions.pop().map(|(_, bin)| bin).unwrap_or_else(|| {
            panic!(
                "cannot find PostgreSQL's initdb; install PostgreSQL (`apt-get install \
                 postgresql`, as .ci/run does) or set IDEM_PG_BIN to its bin directory"
            )
        })
    })
    .as_path()
}

/// A command for a PostgreSQL binary, run as `postgres` when this process
/// is root.
fn command(binary: &str) -> Command {
    let path = bin_dir().join(binary);
    if running_as_root() {
        let mut command = Command::new("setpriv");
        command
            .args(["--reuid=postgres", "--regid=postgres", "--init-groups"])
            .arg(path);
        command
    } else {
        Command::new(path)
    }
}

fn check_version() {
    static CHECKED: OnceLock<()> = OnceLock::new();
    CHECKED.get_or_init(|| {
        let out = Command::new(bin_dir().join("postgres"))
            .arg("--version")
            .output()
            .unwrap_or_else(|e| panic!("cannot run postgres --version ({e})"));
        let text = String::from_utf8_lossy(&out.stdout);
        let major: u32 = text
            .split_whitespace()
            .last()
            .and_then(|v| v.split('.').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("cannot read the PostgreSQL version: {text}"));
        assert!(
            major >= MIN_VERSION,
            "PostgreSQL {major} is too old; idem is tested with {MIN_VERSION} or newer"
        );
    });
}

impl PostgresServer {
    /// Starts a server on a free port, with durability against a machine
    /// crash traded for speed (`fsync=off`); a killed server keeps what it
    /// committed, as the operating system still holds it.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a server with extra `-c name=value` settings.
    pub fn start_with(settings: &[&str]) -> Self {
        check_version();
        let scratch = tempfile::tempdir().expect("a scratch directory");
        let dir = scratch.path().join("data");
        std::fs::create_dir(&dir).expect("a data directory");
        if running_as_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(scratch.path())
                .status()
                .expect("run chown");
            assert!(status.success(), "chown the data directory to postgres");
        }
        let out = command("initdb")
            .arg("-D")
            .arg(&dir)
            .args([
                "--auth=trust",
                "--username=postgres",
                "--encoding=UTF8",
                "--no-sync",
            ])
            .output()
            .unwrap_or_else(|e| panic!("cannot run initdb ({e})"));
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut server = Self {
            port: free_port(),
            dir,
            extra: settings.iter().map(ToString::to_string).collect(),
            child: None,
            _scratch: scratch,
        };
        server.launch();
        server
    }

    fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("a server log");
        let mut command = command("postgres");
        command
            .arg("-D")
            .arg(&self.dir)
            .args(["-p", &self.port.to_string()])
            .arg("-k")
            .arg(&self.dir)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=300",
            ]);
        for setting in &self.extra {
            command.args(["-c", setting]);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start postgres ({e})"));
        watch_and_clear(child.id(), Some(self._scratch.path()));
        self.child = Some(child);
        self.wait_until_ready();
    }

    fn wait_until_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let ready = self
                .client("pg_isready")
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|status| status.success());
            if ready {
                return;
            }
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "postgres on port {} exited with {status}: {}",
                    self.port,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "postgres on port {} did not start in 30 s: {}",
            self.port,
            self.log()
        );
    }

    fn log_path(&self) -> PathBuf {
        self.dir.with_file_name("postgres.log")
    }

    /// What the server logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's URL, for the `postgres` database and role.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    /// Kills the server with SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            // Its backends notice the postmaster's death and exit; wait until
            // the port is free for a restart.
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Starts the server again on the same port and data directory.
    pub fn restart(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(self.dir.join("postmaster.pid"));
        self.launch();
    }

    /// A PostgreSQL client `program` (`psql`, `pg_isready`) pointed at this
    /// server as the `postgres` user.
    fn client(&self, program: &str) -> Command {
        let mut command = Command::new(bin_dir().join(program));
        command.args(["-h", "127.0.0.1", "-U", "postgres", "-p"]);
        command.arg(self.port.to_string());
        command
    }

    /// Runs SQL with `psql` and returns its unaligned output.
    pub fn psql(&self, sql: &str) -> String {
        let out = self
            .client("psql")
            .args(["-d", "postgres", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .unwrap_or_else(|e| panic!("cannot run psql ({e})"));
        assert!(
            out.status.success(),
            "psql {sql:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The lease and TTL of the conformance suite on PostgreSQL: real time,
/// with room for a busy machine; the lease is three response timeouts.
pub const TIMING: crate::conformance::Timing = crate::conformance::Timing {
    lease: Duration::from_millis(1500),
    ttl: Duration::from_secs(4),
};

/// The response timeout of the stores the PostgreSQL tests open.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_millis(500);

/// A server shared by the tests of one test binary.
pub fn shared() -> &'static PostgresServer {
    static SERVER: OnceLock<PostgresServer> = OnceLock::new();
    SERVER.get_or_init(PostgresServer::start)
}
