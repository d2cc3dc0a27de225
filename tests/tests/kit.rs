//! The kit's fault helpers do what their docs say: `Flaky`'s injected
//! faults, `Down`, and the proxy.

use std::sync::Arc;
use std::time::Duration;

use idem_core::store::{Begin, Inspection, Store, StoreErrorKind, Token};
use idem_core::{Fingerprint, Key, MemoryStore};
use idem_test::faults::{Down, Fault, Flaky, Op};
use idem_test::proxy::{self, Proxy};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

fn key(name: &str) -> (Key, Fingerprint) {
    (
        Key::new("kit", &name).unwrap(),
        Fingerprint::of(&name).unwrap(),
    )
}

/// An injected `Stalled` renewal is answered as renewed and never reaches
/// the store: the claim lapses with the lease it had.
#[tokio::test(start_paused = true)]
async fn an_injected_stalled_renewal_never_reaches_the_store() {
    let inner = Arc::new(MemoryStore::new());
    let flaky = Flaky::new(inner.clone());
    let (key, fp) = key("stalled");
    let lease = Duration::from_secs(2);
    let holder = Token::random();
    assert_eq!(
        flaky.begin(key, fp, holder, lease).await.unwrap(),
        Begin::Claimed
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    flaky.inject(Op::Renew, Fault::Stalled);
    assert!(flaky.renew(key, holder, lease * 10).await.unwrap());
    assert_eq!(flaky.struck(Op::Renew), 1);
    // Had the renewal landed, the claim would hold for 20 s more.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(inner.inspect(key).await.unwrap(), Inspection::Absent);
    // The next renewal, not faulted, reaches the store (and finds no claim).
    assert!(!flaky.renew(key, holder, lease).await.unwrap());
}

/// Injected on another operation, `Stalled` changes nothing.
#[tokio::test(start_paused = true)]
async fn stalled_on_another_operation_changes_nothing() {
    let flaky = Flaky::new(Arc::new(MemoryStore::new()));
    let (key, fp) = key("stalled-begin");
    flaky.inject(Op::Begin, Fault::Stalled);
    assert_eq!(
        flaky
            .begin(key, fp, Token::random(), Duration::from_secs(2))
            .await
            .unwrap(),
        Begin::Claimed
    );
}

/// Every operation of a `Down` store fails `Unavailable`, the optional
/// ones too.
#[tokio::test]
async fn every_operation_of_a_down_store_is_unavailable() {
    let (key, fp) = key("down");
    let (token, lease) = (Token::random(), Duration::from_secs(1));
    let kinds = [
        Down.begin(key, fp, token, lease).await.map(drop),
        Down.renew(key, token, lease).await.map(drop),
        Down.release(key, token).await.map(drop),
        Down.inspect(key).await.map(drop),
        Down.forget(key).await.map(drop),
        Down.claims_older_than(Duration::ZERO, 10).await.map(drop),
        Down.steps(key).await.map(drop),
        Down.append_step(key, token, "s".to_owned(), b"1".to_vec(), lease)
            .await
            .map(drop),
        Down.epoch(key, token, lease).await.map(drop),
        Down.begin_with_steps(key, fp, token, lease).await.map(drop),
    ]
    .map(|answer| answer.unwrap_err().kind());
    assert!(
        kinds
            .iter()
            .all(|kind| *kind == StoreErrorKind::Unavailable),
        "{kinds:?}"
    );
}

/// An echo server: answers every read with the same bytes.
async fn echo() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut connection, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buffer = [0; 64];
                while let Ok(read) = connection.read(&mut buffer).await {
                    if read == 0 || connection.write_all(&buffer[..read]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// A dropped proxy stops relaying on the connections it had open, not
/// only taking new ones.
#[tokio::test]
async fn a_dropped_proxy_closes_the_connections_it_relays() {
    let proxy = Proxy::start(echo().await, |_| proxy::Fault::Pass)
        .await
        .unwrap();
    let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
    client.write_all(b"a").await.unwrap();
    let mut answer = [0; 1];
    client.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"a");
    drop(proxy);
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The relay is gone: the write may still be taken by the kernel, but
    // nothing comes back, and the connection ends.
    let _ = client.write_all(b"b").await;
    let read = tokio::time::timeout(Duration::from_secs(5), client.read(&mut answer))
        .await
        .expect("the connection ends");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}: {answer:?}");
}
