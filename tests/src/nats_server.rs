//! A real `nats-server` with JetStream for the consumer tests, on a free
//! loopback port with its store in a temporary directory.
//!
//! The server is a child of the test process, watched so that it dies with
//! it; dropping a [`NatsServer`] stops it. Nothing here touches the
//! machine's own NATS. A server that cannot start is a panic, never a skip.
//! The binary is `nats-server` from `PATH` (or `/usr/sbin`, where Debian
//! puts it), or the one `IDEM_NATS_SERVER` names; it must be 2.9 or newer
//! (the tests run on 2.9.10).

use std::io::{BufRead as _, BufReader};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::process::{free_port, require_version, watch};

/// The oldest `nats-server` the consumer is tested with (async-nats 0.50
/// follows the 2.10 API; 2.9 answers what idem uses).
pub const MIN_VERSION: (u32, u32) = (2, 9);

/// The `nats-server` binary: `$IDEM_NATS_SERVER`, `nats-server` on `PATH`,
/// or `/usr/sbin/nats-server`.
pub fn server_binary() -> String {
    if let Ok(binary) = std::env::var("IDEM_NATS_SERVER") {
        return binary;
    }
    let on_path = Command::new("nats-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !on_path && Path::new("/usr/sbin/nats-server").exists() {
        return "/usr/sbin/nats-server".to_owned();
    }
    "nats-server".to_owned()
}

fn check_version() {
    static CHECKED: OnceLock<()> = OnceLock::new();
    CHECKED.get_or_init(|| {
        require_version(
            &server_binary(),
            "v",
            MIN_VERSION,
            "nats-server",
            "install nats-server (`apt-get install nats-server`, as .ci/run does) or set \
             IDEM_NATS_SERVER",
        );
    });
}

/// A running `nats-server -js`.
pub struct NatsServer {
    port: u16,
    child: Child,
    dir: tempfile::TempDir,
}

impl NatsServer {
    /// Starts a server with JetStream on a free loopback port.
    pub fn start() -> Self {
        check_version();
        let dir = tempfile::tempdir().expect("a scratch directory");
        let port = free_port();
        let child = spawn(port, dir.path());
        let mut server = Self { port, child, dir };
        server.wait_until_ready();
        server
    }

    /// The server process's id, e.g. to read the CPU it spent from
    /// `/proc/{pid}/stat`. It changes with [`restart`](Self::restart).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the server (`SIGKILL`): a broker outage. Its store stays, for
    /// [`restart`](Self::restart).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on its port and store, after
    /// [`stop`](Self::stop): streams and durable consumers on file storage
    /// come back with their messages.
    pub fn restart(&mut self) {
        self.stop();
        self.child = spawn(self.port, self.dir.path());
        self.wait_until_ready();
    }

    fn wait_until_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(stream) = TcpStream::connect(("127.0.0.1", self.port)) {
                let mut line = String::new();
                let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
                if BufReader::new(stream).read_line(&mut line).is_ok() && line.starts_with("INFO") {
                    // Kept until now to report a failed start; from here on
                    // a server that logs a lot must not block on a full pipe.
                    if let Some(mut stderr) = self.child.stderr.take() {
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut stderr, &mut std::io::sink());
                        });
                    }
                    return;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                let mut log = String::new();
                if let Some(stderr) = self.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut log);
                }
                panic!(
                    "nats-server on port {} exited with {status}: {log}",
                    self.port
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "nats-server on port {} did not answer within 10 s",
            self.port
        );
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

fn spawn(port: u16, dir: &Path) -> Child {
    let child = Command::new(server_binary())
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string()])
        .arg("-sd")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `{}` ({e})", server_binary()));
    watch(child.id());
    child
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
