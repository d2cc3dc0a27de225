//! What every server harness shares: free loopback ports, and a watchdog
//! that kills a server when the test process dies first.

use std::net::TcpListener;
use std::process::{Command, Stdio};

/// Kills `pid` when this test process exits, however it exits: a watchdog
/// for any server a harness starts.
pub fn watch(pid: u32) {
    watch_and_clear(pid, None);
}

/// [`watch`], and once this test process is gone, removes `scratch` (the
/// server's temporary directory): a server kept for the whole process (the
/// shared ones, in a `static`) is never dropped, so its directory would
/// stay behind. A server that ends while the process lives (killed and
/// restarted by a test) keeps it.
pub fn watch_and_clear(pid: u32, scratch: Option<&std::path::Path>) {
    let parent = std::process::id();
    let clear = scratch.map_or_else(String::new, |dir| {
        let quoted = dir.display().to_string().replace('\'', r"'\''");
        format!("; kill -0 {parent} 2>/dev/null || {{ sleep 0.5; rm -rf '{quoted}'; }}")
    });
    let script = format!(
        "while kill -0 {parent} 2>/dev/null && kill -0 {pid} 2>/dev/null; do sleep 0.3; done; \
         kill -9 {pid} 2>/dev/null{clear}"
    );
    let mut watchdog = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the server's watchdog");
    // Reaped when it ends, so it leaves no zombie behind.
    std::thread::spawn(move || watchdog.wait());
}

/// A free loopback port.
pub fn free_port() -> u16 {
    free_port_with(&[])
}

/// A free loopback port `p` such that `p + offset` is free too for each of
/// `offsets` (a Redis Cluster node's bus port is its port + 10000).
///
/// The ports are drawn below the system's ephemeral range
/// (`net.ipv4.ip_local_port_range`), where no client connection takes its
/// local port: a server killed and restarted on its port finds it free,
/// instead of taken by a connection some client opened meanwhile.
pub fn free_port_with(offsets: &[u16]) -> u16 {
    const LOWEST: u16 = 10_000;
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let highest = ephemeral.saturating_sub(offsets.iter().copied().max().unwrap_or(0));
    let free = |port: u16| {
        offsets
            .iter()
            .map(|offset| port.checked_add(*offset))
            .chain([Some(port)])
            .all(|p| p.is_some_and(|p| TcpListener::bind(("127.0.0.1", p)).is_ok()))
    };
    if highest > LOWEST + 1_000 {
        for _ in 0..500 {
            let port = rand::random_range(LOWEST..highest);
            if free(port) {
                return port;
            }
        }
    }
    // No room below the ephemeral range: any port the system hands out.
    for _ in 0..500 {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let port = listener.local_addr().expect("a local address").port();
        drop(listener);
        if free(port) {
            return port;
        }
    }
    panic!("found no free loopback port (with {offsets:?} above it)");
}

/// Whether this process runs as root (servers such as PostgreSQL refuse to).
pub fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

/// Panics, saying how to install it, unless `binary --version` runs and
/// reports (after `marker`, e.g. `v=` in `v=7.0.15`) a version of at least
/// `min`. `what` names the server in messages; `install` says how to get it.
pub fn require_version(binary: &str, marker: &str, min: (u32, u32), what: &str, install: &str) {
    let output = Command::new(binary)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{binary}` ({e}); {install}"));
    let text = String::from_utf8_lossy(&output.stdout);
    let version = parse_version(&text, marker)
        .unwrap_or_else(|| panic!("cannot read the version of `{binary}`: {text}"));
    assert!(
        version >= min,
        "`{binary}` is {what} {}.{}; idem's tests need {}.{} or newer: {text}",
        version.0,
        version.1,
        min.0,
        min.1
    );
}

/// `(major, minor)` of the first word of `text` that starts with `marker`.
fn parse_version(text: &str, marker: &str) -> Option<(u32, u32)> {
    let version = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix(marker))?;
    let mut parts = version.split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

#[cfg(test)]
mod tests {
    #[test]
    fn versions_are_read_after_their_marker() {
        let redis = "Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc-5.3.0 bits=64";
        assert_eq!(super::parse_version(redis, "v="), Some((7, 0)));
        assert_eq!(
            super::parse_version("nats-server: v2.9.10", "v"),
            Some((2, 9))
        );
        assert_eq!(super::parse_version("no version here", "v="), None);
    }
}
