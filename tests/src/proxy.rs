//! A TCP proxy on loopback that loses, delays or refuses what passes
//! through it, one connection at a time: a flaky network for testing
//! clients.
//!
//! ```no_run
//! use idem_test::proxy::{Fault, Proxy};
//!
//! # async fn demo(server: std::net::SocketAddr) -> std::io::Result<()> {
//! // The first connection loses its response after the server answered.
//! let proxy = Proxy::start(server, |connection| {
//!     if connection == 0 { Fault::DropResponse } else { Fault::Pass }
//! })
//! .await?;
//! let url = format!("http://{}/payments", proxy.addr());
//! # Ok(())
//! # }
//! ```

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// What the proxy does to one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forwards both ways.
    Pass,
    /// Forwards the request; when the server starts answering, closes the
    /// client's connection without a byte of the answer: the request was
    /// processed and its response lost.
    DropResponse,
    /// Forwards the requests, and holds the connection's first answer back
    /// for this long; later answers on the same connection pass at once
    /// (a connection that carries many requests, as Redis's and
    /// PostgreSQL's do, is slow once).
    Delay(Duration),
    /// Closes the client's connection at once, before anything reaches the
    /// server.
    Refuse,
    /// Forwards both ways for this long; then closes the client's
    /// connection at the next answer, without a byte of it: a connection
    /// that breaks mid-use, its last request processed and its response
    /// lost.
    CutAfter(Duration),
}

/// A running proxy; stops when dropped, closing the connections it
/// relays.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    connections: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
    /// Whose requests are held back.
    held: Arc<tokio::sync::watch::Sender<Hold>>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream`, treating
    /// connection `n` (counted from 0) as `plan(n)` says.
    ///
    /// # Errors
    ///
    /// When no loopback port can be bound.
    pub async fn start<P>(upstream: SocketAddr, plan: P) -> io::Result<Self>
    where
        P: Fn(u64) -> Fault + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let connections = Arc::new(AtomicU64::new(0));
        let counter = connections.clone();
        let requests = Arc::new(AtomicU64::new(0));
        let sent = requests.clone();
        let held = Arc::new(tokio::sync::watch::Sender::new(Hold::None));
        let hold = held.clone();
        let task = tokio::spawn(async move {
            // The connections' relays, aborted with this task when the
            // proxy is dropped (a `JoinSet` aborts its tasks as it drops).
            let mut relays = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                while relays.try_join_next().is_some() {}
                let number = counter.fetch_add(1, Ordering::SeqCst);
                let fault = plan(number);
                let gate = Gate {
                    number,
                    held: hold.clone(),
                    sent: sent.clone(),
                };
                relays.spawn(async move {
                    // A connection that fails only ends early, as on a network.
                    let _ = relay(client, upstream, fault, gate).await;
                });
            }
        });
        Ok(Self {
            addr,
            connections,
            requests,
            held,
            task,
        })
    }

    /// The address clients connect to.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many connections were accepted.
    #[must_use]
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    /// How many requests clients sent: each read of a client's bytes, so a
    /// request may count once or as several, and requests sent together
    /// once; enough to tell a quiet connection from a busy one.
    #[must_use]
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// Holds back the next request a client sends that starts with
    /// `prefix` (any request, when empty), on whichever connection, and
    /// everything sent on that connection after it, as a congested network
    /// path does, until [`deliver`](Self::deliver): the request arrives
    /// late, after those sent on other connections meanwhile.
    ///
    /// The prefix picks a request out of a protocol's chatter: PostgreSQL's
    /// `B` (Bind) starts the execution of a prepared statement, while a lone
    /// `S` (Sync) only asks whether the server is ready.
    pub fn hold_next_request(&self, prefix: &[u8]) {
        self.held.send_replace(Hold::Next(prefix.to_vec()));
    }

    /// Delivers the requests held back since
    /// [`hold_next_request`](Self::hold_next_request), in order, and holds
    /// no more.
    pub fn deliver(&self) {
        self.held.send_replace(Hold::None);
    }
}

/// Whose requests the proxy holds back.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Hold {
    None,
    /// The next connection to send something starting with these bytes.
    Next(Vec<u8>),
    /// This connection's.
    Connection(u64),
}

/// Whether one connection's requests are held back.
struct Gate {
    number: u64,
    held: Arc<tokio::sync::watch::Sender<Hold>>,
    sent: Arc<AtomicU64>,
}

impl Gate {
    /// Waits while this connection's requests are held back, `request`
    /// the bytes about to be forwarded.
    async fn open(&self, request: &[u8]) {
        self.sent.fetch_add(1, Ordering::SeqCst);
        let number = self.number;
        self.held.send_if_modified(|hold| {
            let take = matches!(hold, Hold::Next(prefix) if request.starts_with(prefix));
            if take {
                *hold = Hold::Connection(number);
            }
            take
        });
        let mut held = self.held.subscribe();
        let _ = held
            .wait_for(|hold| *hold != Hold::Connection(number))
            .await;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(
    client: TcpStream,
    upstream: SocketAddr,
    fault: Fault,
    gate: Gate,
) -> io::Result<()> {
    if fault == Fault::Refuse {
        return Ok(());
    }
    let server = TcpStream::connect(upstream).await?;
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let requests = async {
        let mut buffer = vec![0; 16 * 1024];
        loop {
            let read = client_read.read(&mut buffer).await?;
            if read == 0 {
                break;
            }
            gate.open(&buffer[..read]).await;
            server_write.write_all(&buffer[..read]).await?;
        }
        let _ = server_write.shutdown().await;
        // The client is done sending; the connection lasts until the answer ends.
        std::future::pending::<io::Result<()>>().await
    };
    let opened = tokio::time::Instant::now();
    let responses = async {
        let mut buffer = vec![0; 16 * 1024];
        let mut first = true;
        loop {
            let read = server_read.read(&mut buffer).await?;
            if read == 0 {
                return client_write.shutdown().await;
            }
            if let Fault::CutAfter(after) = fault
                && opened.elapsed() >= after
            {
                return Ok(());
            }
            if first {
                first = false;
                match fault {
                    Fault::DropResponse => return Ok(()),
                    Fault::Delay(delay) => tokio::time::sleep(delay).await,
                    Fault::Pass | Fault::Refuse | Fault::CutAfter(_) => {}
                }
            }
            client_write.write_all(&buffer[..read]).await?;
        }
    };
    // The connection ends when the answers end (or are dropped), or when
    // copying a request fails.
    tokio::select! {
        answered = responses => answered,
        failed = requests => failed,
    }
}
