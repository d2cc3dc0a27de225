//! The HTTP layer over real HTTP on loopback (an axum server, a reqwest
//! client), on the memory store and a Redis node: every rule of the
//! Idempotency-Key draft it follows, and a client that hangs up mid-request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::post;
use idem_core::http::IdempotencyLayer;
use idem_core::{Idempotency, OnConflict, Settings};
use idem_test::faults::Down;
use reqwest::{Client, Response};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt as _;

#[derive(Default)]
struct Counts {
    charges: AtomicU32,
    failures: AtomicU32,
}

async fn charge(
    State(counts): State<Arc<Counts>>,
    headers: HeaderMap,
    body: String,
) -> impl IntoResponse {
    if let Some(ms) = headers
        .get("x-sleep-ms")
        .and_then(|v| v.to_str().ok()?.parse().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let n = counts.charges.fetch_add(1, Ordering::SeqCst) + 1;
    (
        StatusCode::CREATED,
        [
            (header::LOCATION, format!("/payments/{n}")),
            (header::SET_COOKIE, format!("session={n}")),
            (header::HeaderName::from_static("x-charge"), n.to_string()),
        ],
        axum::Json(json!({ "charge": n, "request": body })),
    )
}

async fn fail(State(counts): State<Arc<Counts>>) -> StatusCode {
    counts.failures.fetch_add(1, Ordering::SeqCst);
    StatusCode::INTERNAL_SERVER_ERROR
}

async fn declined(State(counts): State<Arc<Counts>>) -> (StatusCode, &'static str) {
    counts.failures.fetch_add(1, Ordering::SeqCst);
    (StatusCode::PAYMENT_REQUIRED, "declined")
}

/// A handler in steps: the charge is journaled, then the handler fails with
/// a 503 (which releases the key) while `x-fail` is sent.
async fn checkout(
    State(counts): State<Arc<Counts>>,
    headers: HeaderMap,
) -> Result<(StatusCode, String), StatusCode> {
    let charge = idem_core::step("charge", async {
        Ok::<_, idem_core::Error>(counts.charges.fetch_add(1, Ordering::SeqCst) + 1)
    })
    .await
    .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    if headers.contains_key("x-fail") {
        counts.failures.fetch_add(1, Ordering::SeqCst);
        return Err(StatusCode::SERVICE_UNAVAILABLE);
    }
    Ok((StatusCode::CREATED, format!("charge {charge}")))
}

/// Serves the test API behind the layer `layer` on a free port.
async fn serve(layer: IdempotencyLayer) -> (SocketAddr, Arc<Counts>) {
    let counts = Arc::new(Counts::default());
    let app = Router::new()
        .route("/payments", post(charge).get(|| async { "list" }))
        .route("/fail", post(fail))
        .route("/declined", post(declined))
        .route("/checkout", post(checkout))
        .with_state(Arc::clone(&counts))
        .layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, counts)
}

fn layer(idem: Idempotency) -> IdempotencyLayer {
    IdempotencyLayer::scoped_by(idem, |request| {
        request
            .headers
            .get("x-api-key")?
            .to_str()
            .ok()
            .map(str::to_owned)
    })
    .max_body_bytes(1024)
}

async fn post_with(
    addr: SocketAddr,
    path: &str,
    api_key: Option<&str>,
    key: Option<&str>,
    body: &str,
    sleep_ms: u64,
) -> Response {
    let mut request = Client::new()
        .post(format!("http://{addr}{path}"))
        .header("x-sleep-ms", sleep_ms.to_string())
        .body(body.to_owned());
    if let Some(api_key) = api_key {
        request = request.header("x-api-key", api_key);
    }
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    request.send().await.unwrap()
}

async fn pay(addr: SocketAddr, key: &str, body: &str) -> Response {
    post_with(addr, "/payments", Some("client-a"), Some(key), body, 0).await
}

async fn problem(response: Response, status: u16, kind: &str) -> Value {
    assert_eq!(response.status().as_u16(), status);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let link = response.headers()["link"].to_str().unwrap().to_owned();
    assert!(link.ends_with("; rel=\"describedby\""), "{link}");
    let body: Value = response.json().await.unwrap();
    assert!(
        body["type"]
            .as_str()
            .unwrap()
            .ends_with(&format!("#{kind}")),
        "{body}"
    );
    assert_eq!(body["status"], status);
    body
}

fn replayed(response: &Response) -> bool {
    response
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true")
}

async fn keys_are_required_and_checked(idem: Idempotency) {
    let (addr, counts) = serve(layer(idem)).await;
    let missing = post_with(addr, "/payments", Some("client-a"), None, "{}", 0).await;
    problem(missing, 400, "missing-key").await;
    for bad in ["", "\"unterminated", "has space"] {
        let malformed = post_with(addr, "/payments", Some("client-a"), Some(bad), "{}", 0).await;
        problem(malformed, 400, "invalid-key").await;
    }
    let twice = Client::new()
        .post(format!("http://{addr}/payments"))
        .header("x-api-key", "client-a")
        .header("Idempotency-Key", "a")
        .header("Idempotency-Key", "b")
        .send()
        .await
        .unwrap();
    problem(twice, 400, "invalid-key").await;
    let unscoped = post_with(addr, "/payments", None, Some("k"), "{}", 0).await;
    problem(unscoped, 400, "missing-scope").await;
    let get = Client::new()
        .get(format!("http://{addr}/payments"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        get.text().await.unwrap(),
        "list",
        "GET passes through without a key"
    );
    assert_eq!(counts.charges.load(Ordering::SeqCst), 0);
}

async fn replays_are_byte_for_byte(idem: Idempotency) {
    let (addr, counts) = serve(layer(idem)).await;
    let key = format!("replay-{}", rand_key());
    let first = pay(addr, &format!("\"{key}\""), "{\"amount\":100}").await;
    assert_eq!(first.status(), StatusCode::CREATED);
    assert!(!replayed(&first));
    assert_eq!(first.headers()["set-cookie"], "session=1");
    assert_eq!(first.headers()["x-charge"], "1");
    assert_eq!(first.headers()["idempotency-retention"], "86400");
    let first_headers = first.headers().clone();
    let first_body = first.bytes().await.unwrap();

    let retry = pay(addr, &key, "{\"amount\":100}").await;
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert!(replayed(&retry));
    for name in ["content-type", "location"] {
        assert_eq!(retry.headers()[name], first_headers[name], "{name}");
    }
    assert!(
        retry.headers().get("set-cookie").is_none(),
        "Set-Cookie is never replayed"
    );
    assert!(
        retry.headers().get("x-charge").is_none(),
        "not on the allow-list"
    );
    assert_eq!(
        retry.bytes().await.unwrap(),
        first_body,
        "the body, byte for byte"
    );
    assert_eq!(counts.charges.load(Ordering::SeqCst), 1);
}

async fn keys_are_scoped_per_client(idem: Idempotency) {
    let (addr, counts) = serve(layer(idem)).await;
    let key = rand_key();
    let a = post_with(addr, "/payments", Some("client-a"), Some(&key), "{}", 0).await;
    let b = post_with(addr, "/payments", Some("client-b"), Some(&key), "{}", 0).await;
    assert!(
        !replayed(&a) && !replayed(&b),
        "two clients, two executions"
    );
    let a_again = post_with(addr, "/payments", Some("client-a"), Some(&key), "{}", 0).await;
    assert!(replayed(&a_again));
    assert_eq!(counts.charges.load(Ordering::SeqCst), 2);
}

async fn reuse_and_size_are_refused(idem: Idempotency) {
    let (addr, counts) = serve(layer(idem)).await;
    let key = rand_key();
    pay(addr, &key, "{\"amount\":100}").await;
    let reused = pay(addr, &key, "{\"amount\":999}").await;
    problem(reused, 422, "key-reused").await;
    let elsewhere = post_with(
        addr,
        "/fail",
        Some("client-a"),
        Some(&key),
        "{\"amount\":100}",
        0,
    )
    .await;
    problem(elsewhere, 422, "key-reused").await;
    let large = pay(addr, &rand_key(), &"x".repeat(2000)).await;
    problem(large, 413, "payload-too-large").await;
    assert_eq!(counts.charges.load(Ordering::SeqCst), 1);
    assert_eq!(counts.failures.load(Ordering::SeqCst), 0);
}

async fn server_errors_are_not_stored_and_client_errors_are(idem: Idempotency) {
    let (addr, counts) = serve(layer(idem)).await;
    let key = rand_key();
    for _ in 0..2 {
        let failed = post_with(addr, "/fail", Some("client-a"), Some(&key), "", 0).await;
        assert_eq!(failed.status(), 500);
        assert!(!replayed(&failed));
    }
    assert_eq!(
        counts.failures.load(Ordering::SeqCst),
        2,
        "a 500 runs again"
    );
    let key = rand_key();
    for _ in 0..2 {
        let declined = post_with(addr, "/declined", Some("client-a"), Some(&key), "", 0).await;
        assert_eq!(declined.status(), 402);
    }
    assert_eq!(counts.failures.load(Ordering::SeqCst), 3, "a 402 is stored");
}

async fn duplicates_in_flight_wait_or_are_rejected(idem: Idempotency) {
    let (addr, counts) = serve(layer(idem.clone())).await;
    let key = rand_key();
    let first = tokio::spawn({
        let key = key.clone();
        async move { post_with(addr, "/payments", Some("client-a"), Some(&key), "{}", 500).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let waited = post_with(addr, "/payments", Some("client-a"), Some(&key), "{}", 0).await;
    assert_eq!(waited.status(), StatusCode::CREATED);
    assert!(
        replayed(&waited),
        "the duplicate waited for the first's response"
    );
    let first = first.await.unwrap();
    assert_eq!(
        waited.bytes().await.unwrap(),
        first.bytes().await.unwrap(),
        "the same response"
    );
    assert_eq!(counts.charges.load(Ordering::SeqCst), 1);

    let rejecting = layer(idem).settings(
        Settings::builder()
            .on_conflict(OnConflict::Reject)
            .lease(Duration::from_secs(10))
            .build()
            .unwrap(),
    );
    let (addr, counts) = serve(rejecting).await;
    let key = rand_key();
    let first = tokio::spawn({
        let key = key.clone();
        async move { post_with(addr, "/payments", Some("client-a"), Some(&key), "{}", 800).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let refused = post_with(addr, "/payments", Some("client-a"), Some(&key), "{}", 0).await;
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "refused at once"
    );
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // When to look again, not the ~10 s left of the holder's lease.
    assert_eq!(retry_after, 1);
    let body = problem(refused, 409, "in-progress").await;
    let detail = body["detail"].as_str().unwrap();
    assert!(
        !detail.contains(" ms"),
        "the detail does not contradict Retry-After: {detail}"
    );
    assert_eq!(first.await.unwrap().status(), StatusCode::CREATED);
    assert_eq!(counts.charges.load(Ordering::SeqCst), 1);
}

/// The client sends its request and hangs up while the handler works: the
/// handler completes once, and the retry gets its response at once.
async fn a_client_that_hangs_up_gets_its_response_on_retry(idem: Idempotency) {
    let (addr, counts) = serve(layer(idem)).await;
    let key = rand_key();
    let body = "{\"amount\":100}";
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST /payments HTTP/1.1\r\nHost: {addr}\r\nx-api-key: client-a\r\n\
         Idempotency-Key: {key}\r\nx-sleep-ms: 500\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(socket);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        counts.charges.load(Ordering::SeqCst),
        1,
        "the handler completed"
    );
    let started = Instant::now();
    let retry = pay(addr, &key, body).await;
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "at once, not after a lease"
    );
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert!(replayed(&retry), "the recorded response");
    assert_eq!(counts.charges.load(Ordering::SeqCst), 1);
}

fn rand_key() -> String {
    idem_core::store::Token::random().to_string()
}

#[tokio::test]
async fn a_store_that_is_down_is_a_503_and_nothing_runs() {
    let (addr, counts) = serve(layer(Idempotency::new(Down))).await;
    let down = pay(addr, &rand_key(), "{}").await;
    assert!(down.headers().contains_key("retry-after"));
    let body = problem(down, 503, "store-unavailable").await;
    assert!(
        !body.to_string().contains("10.0.0.9"),
        "no store internals: {body}"
    );
    assert_eq!(counts.charges.load(Ordering::SeqCst), 0);
}

/// A handler behind the layer may use steps: a request that failed after
/// its charge step (a 5xx, so the key was released) resumes after it when
/// retried, and the charge is made once.
async fn steps_resume_behind_the_layer(idem: Idempotency) {
    let (addr, counts) = serve(layer(idem)).await;
    let key = rand_key();
    let send = |fail: bool| {
        let key = key.clone();
        async move {
            let mut request = Client::new()
                .post(format!("http://{addr}/checkout"))
                .header("x-api-key", "client-a")
                .header("Idempotency-Key", key)
                .body("order-5");
            if fail {
                request = request.header("x-fail", "1");
            }
            request.send().await.unwrap()
        }
    };
    assert_eq!(send(true).await.status(), StatusCode::SERVICE_UNAVAILABLE);
    let resumed = send(false).await;
    assert_eq!(resumed.status(), StatusCode::CREATED);
    assert!(!replayed(&resumed));
    assert_eq!(
        resumed.text().await.unwrap(),
        "charge 1",
        "the journaled charge"
    );
    let replay = send(false).await;
    assert!(replayed(&replay));
    assert_eq!(counts.charges.load(Ordering::SeqCst), 1, "charged once");
    assert_eq!(counts.failures.load(Ordering::SeqCst), 1);
}

macro_rules! on_each_store {
    ($($test:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(idem_core::Idempotency::memory()).await;
                }
            )*
        }

        #[cfg(feature = "redis")]
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let server = idem_test::redis_server::shared_node();
                    let store = idem_core::RedisStore::node(server.url())
                        .response_timeout(idem_test::redis_server::RESPONSE_TIMEOUT)
                        .connect()
                        .await
                        .expect("a Redis store");
                    super::$test(idem_core::Idempotency::new(store)).await;
                }
            )*
        }
    };
}

on_each_store!(
    steps_resume_behind_the_layer,
    keys_are_required_and_checked,
    replays_are_byte_for_byte,
    keys_are_scoped_per_client,
    reuse_and_size_are_refused,
    server_errors_are_not_stored_and_client_errors_are,
    duplicates_in_flight_wait_or_are_rejected,
    a_client_that_hangs_up_gets_its_response_on_retry,
);

/// A dead Redis: the layer answers 503 and runs nothing.
#[cfg(feature = "redis")]
#[tokio::test]
async fn a_dead_redis_is_a_503() {
    let mut server = idem_test::redis_server::RedisServer::start();
    let store = idem_core::RedisStore::node(server.url())
        .response_timeout(Duration::from_millis(300))
        .connection_timeout(Duration::from_millis(300))
        .connect()
        .await
        .unwrap();
    let (addr, counts) = serve(layer(Idempotency::new(store))).await;
    server.kill();
    let down = pay(addr, &rand_key(), "{}").await;
    problem(down, 503, "store-unavailable").await;
    assert_eq!(counts.charges.load(Ordering::SeqCst), 0);
}

/// A layer's clones are configured apart: one base layer, specialised per
/// router, and configured again after a clone was handed out.
#[tokio::test]
async fn clones_of_a_layer_are_configured_apart() {
    let base = layer(Idempotency::memory());
    let handed_out = base.clone();
    let larger = base.clone().max_body_bytes(4096);
    let renamed = base.name("payments-v2");
    let body = "x".repeat(2000);
    for (layer, status) in [
        (handed_out, 413),
        (renamed, 413),
        (larger, StatusCode::CREATED.as_u16()),
    ] {
        let (addr, _) = serve(layer).await;
        assert_eq!(
            pay(addr, &rand_key(), &body).await.status().as_u16(),
            status
        );
    }
}
