//! What every server harness shares: free loopback ports, and a watchdog
//! that kills a server when the test process dies first.

use std::net::TcpListener;
use std::process::{Command, Stdio};

/// Kills `pid` when this test process exits, however it exits: a watchdog
/// for any server a harness starts.
pub fn watch(pid: u32) {
    let parent = std::process::id();
    let script = format!(
        "while kill -0 {parent} 2>/dev/null && kill -0 {pid} 2>/dev/null; do sleep 0.3; done; \
         kill -9 {pid} 2>/dev/null"
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
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    listener.local_addr().expect("a local address").port()
}

/// Whether this process runs as root (servers such as PostgreSQL refuse to).
pub fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}
