//! The retrying client end to end against idem's own HTTP edge: a real axum
//! server behind `IdempotencyLayer` on loopback, a real reqwest client with
//! `RetryMiddleware`, and a proxy that loses responses.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use idem_core::Idempotency;
use idem_core::client::{
    BreakerConfig, BreakerState, Breakers, CircuitOpen, RetryBudget, RetryMiddleware, RetryPolicy,
    RetryReport,
};
use idem_core::http::IdempotencyLayer;
use idem_test::proxy::{Fault, Proxy};
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};

/// The server's side of the story: every request that reached it, and the
/// charges made.
#[derive(Default)]
struct Server {
    /// `(Idempotency-Key, arrival)` of every request, replays included.
    arrivals: Mutex<Vec<(String, Instant)>>,
    /// Charges made, per idempotency key.
    charges: Mutex<HashMap<String, u32>>,
    /// The next this many charges fail with `failure` instead.
    failures_left: AtomicU64,
    failure: Mutex<Option<(StatusCode, Option<&'static str>)>>,
    /// While set, every request fails with 503.
    down: AtomicBool,
}

impl Server {
    fn fail_next(&self, count: u64, status: StatusCode, retry_after: Option<&'static str>) {
        *self.failure.lock().unwrap() = Some((status, retry_after));
        self.failures_left.store(count, Ordering::SeqCst);
    }

    fn arrivals(&self) -> usize {
        self.arrivals.lock().unwrap().len()
    }

    fn charges(&self) -> HashMap<String, u32> {
        self.charges.lock().unwrap().clone()
    }
}

async fn record(State(server): State<Arc<Server>>, request: Request, next: Next) -> Response {
    let key = request
        .headers()
        .get("idempotency-key")
        .map(|key| key.to_str().unwrap().to_owned())
        .unwrap_or_default();
    server.arrivals.lock().unwrap().push((key, Instant::now()));
    next.run(request).await
}

async fn charge(State(server): State<Arc<Server>>, headers: HeaderMap, body: String) -> Response {
    if server.down.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let failing = server
        .failures_left
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
            left.checked_sub(1)
        })
        .is_ok();
    if failing {
        let (status, retry_after) = server.failure.lock().unwrap().unwrap();
        return match retry_after {
            Some(after) => (status, [(header::RETRY_AFTER, after)]).into_response(),
            None => status.into_response(),
        };
    }
    let key = headers["idempotency-key"].to_str().unwrap().to_owned();
    let mut charges = server.charges.lock().unwrap();
    *charges.entry(key.clone()).or_default() += 1;
    let receipt = format!(
        r#"{{"charge":{},"for":{body:?}}}"#,
        charges.values().sum::<u32>()
    );
    (
        StatusCode::CREATED,
        [(header::CONTENT_TYPE, "application/json")],
        receipt,
    )
        .into_response()
}

/// Serves `POST /charges` behind the idempotency layer (scoped by
/// `x-api-key`), recording every arrival in front of the layer.
async fn serve() -> (SocketAddr, Arc<Server>) {
    let server = Arc::new(Server::default());
    let app = Router::new()
        .route("/charges", post(charge))
        .with_state(server.clone())
        .layer(IdempotencyLayer::scoped_by(
            Idempotency::memory(),
            |request| {
                request
                    .headers
                    .get("x-api-key")?
                    .to_str()
                    .ok()
                    .map(str::to_owned)
            },
        ))
        .layer(middleware::from_fn_with_state(server.clone(), record));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, server)
}

fn fast() -> idem_core::client::RetryPolicyBuilder {
    RetryPolicy::builder()
        .base(Duration::from_millis(20))
        .cap(Duration::from_millis(200))
        .max_attempts(5)
}

fn client(policy: RetryPolicy, breakers: Breakers) -> ClientWithMiddleware {
    ClientBuilder::new(reqwest::Client::new())
        .with(RetryMiddleware::new(policy).breakers(breakers))
        .build()
}

async fn charge_via(
    client: &ClientWithMiddleware,
    addr: SocketAddr,
    body: &str,
) -> reqwest_middleware::Result<reqwest::Response> {
    client
        .post(format!("http://{addr}/charges"))
        .header("x-api-key", "shop-1")
        .body(body.to_owned())
        .send()
        .await
}

fn report(response: &reqwest::Response) -> RetryReport {
    response.extensions().get::<RetryReport>().unwrap().clone()
}

#[tokio::test]
async fn a_lost_response_is_retried_with_its_key_and_replayed() {
    let (server_addr, server) = serve().await;
    let proxy = Proxy::start(server_addr, |connection| {
        if connection == 0 {
            Fault::DropResponse
        } else {
            Fault::Pass
        }
    })
    .await
    .unwrap();
    let client = client(fast().build().unwrap(), Breakers::default());

    let response = charge_via(&client, proxy.addr(), "100 cents")
        .await
        .unwrap();

    assert_eq!(response.status(), StatusCode::CREATED);
    let report = report(&response);
    assert_eq!(report.attempts(), 2);
    assert!(report.replayed(), "the retry got the stored receipt");
    assert_eq!(response.headers()["idempotent-replayed"], "true");
    assert_eq!(
        response.text().await.unwrap(),
        r#"{"charge":1,"for":"100 cents"}"#
    );
    let key = report.key().unwrap().to_owned();
    assert_eq!(uuid_version(&key), 4);
    let arrivals: Vec<_> = server
        .arrivals
        .lock()
        .unwrap()
        .iter()
        .map(|(k, _)| k.clone())
        .collect();
    assert_eq!(
        arrivals,
        [format!("\"{key}\""), format!("\"{key}\"")],
        "one key on every attempt"
    );
    assert_eq!(
        server.charges().into_values().collect::<Vec<_>>(),
        [1],
        "exactly one charge"
    );
    assert_eq!(proxy.connections(), 2);
}

fn uuid_version(key: &str) -> u32 {
    let version = key.split('-').nth(2).unwrap();
    version[..1].parse().unwrap()
}

#[tokio::test]
async fn a_503_is_retried_and_charges_once() {
    let (addr, server) = serve().await;
    server.fail_next(1, StatusCode::SERVICE_UNAVAILABLE, None);
    let client = client(fast().build().unwrap(), Breakers::default());

    let response = charge_via(&client, addr, "100 cents").await.unwrap();

    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(report(&response).attempts(), 2);
    assert!(!report(&response).replayed());
    assert_eq!(server.arrivals(), 2);
    assert_eq!(server.charges().into_values().collect::<Vec<_>>(), [1]);
}

#[tokio::test]
async fn a_422_is_not_retried_and_a_callers_key_is_kept() {
    let (addr, server) = serve().await;
    let client = client(fast().build().unwrap(), Breakers::default());
    let send = |body: &'static str| {
        client
            .post(format!("http://{addr}/charges"))
            .header("x-api-key", "shop-1")
            .header("idempotency-key", "order-17")
            .body(body)
            .send()
    };

    let first = send("100 cents").await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    assert_eq!(report(&first).key(), Some("order-17"));
    let reused = send("999 cents").await.unwrap();

    assert_eq!(reused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(report(&reused).attempts(), 1, "a 422 is never retried");
    assert_eq!(server.arrivals(), 2);
    assert_eq!(server.charges()["order-17"], 1);
}

#[tokio::test]
async fn other_client_errors_are_not_retried() {
    let (addr, server) = serve().await;
    let client = client(fast().build().unwrap(), Breakers::default());
    for status in [
        StatusCode::BAD_REQUEST,
        StatusCode::FORBIDDEN,
        StatusCode::NOT_FOUND,
    ] {
        server.fail_next(1, status, None);
        let before = server.arrivals();
        let response = charge_via(&client, addr, "100 cents").await.unwrap();
        assert_eq!(response.status(), status);
        assert_eq!(server.arrivals() - before, 1, "{status} is final");
    }
}

#[tokio::test]
async fn a_409_is_retried_no_sooner_than_its_retry_after() {
    let (addr, server) = serve().await;
    server.fail_next(1, StatusCode::CONFLICT, Some("1"));
    let client = client(fast().build().unwrap(), Breakers::default());

    let response = charge_via(&client, addr, "100 cents").await.unwrap();

    assert_eq!(response.status(), StatusCode::CREATED);
    let arrivals = server.arrivals.lock().unwrap().clone();
    assert_eq!(arrivals.len(), 2);
    let waited = arrivals[1].1 - arrivals[0].1;
    assert!(waited >= Duration::from_secs(1), "retried after {waited:?}");
    assert_eq!(server.charges().into_values().sum::<u32>(), 1);
}

/// A `Retry-After` that would end after `max_elapsed`: a 409's (the key's
/// first request still runs) is cut to the time left, so the operation
/// looks once more before it gives up; a 425's or 429's is the server's
/// rate limit, so the operation stops with that response, sending nothing
/// sooner than the server asked.
#[tokio::test]
async fn a_retry_after_past_the_limit_is_cut_for_a_409_only() {
    let policy = || fast().max_elapsed(Duration::from_secs(1)).build().unwrap();
    for status in [StatusCode::TOO_MANY_REQUESTS, StatusCode::TOO_EARLY] {
        let (addr, server) = serve().await;
        server.fail_next(1, status, Some("60"));
        let client = client(policy(), Breakers::default());
        let response = charge_via(&client, addr, "100 cents").await.unwrap();
        assert_eq!(response.status(), status);
        assert_eq!(report(&response).attempts(), 1, "{status}");
        assert_eq!(
            server.arrivals(),
            1,
            "{status}: nothing sent before its 60 s"
        );
    }
    let (addr, server) = serve().await;
    server.fail_next(1, StatusCode::CONFLICT, Some("60"));
    let client = client(policy(), Breakers::default());
    let response = charge_via(&client, addr, "100 cents").await.unwrap();
    assert_eq!(
        response.status(),
        StatusCode::CREATED,
        "looked at once more"
    );
    assert_eq!(report(&response).attempts(), 2);
    let arrivals = server.arrivals.lock().unwrap().clone();
    let waited = arrivals[1].1 - arrivals[0].1;
    assert!(
        waited >= Duration::from_millis(500) && waited < Duration::from_secs(30),
        "looked again after {waited:?}"
    );
}

#[tokio::test]
async fn a_hundred_clients_spread_their_retries_and_each_charges_once() {
    const CLIENTS: usize = 100;
    const FAILURES: usize = 50;
    let (addr, server) = serve().await;
    server.fail_next(FAILURES as u64, StatusCode::SERVICE_UNAVAILABLE, None);
    // One policy (and budget) shared by all; retries wait up to 200 ms.
    let policy = RetryPolicy::builder()
        .base(Duration::from_millis(200))
        .max_attempts(5)
        .build()
        .unwrap();

    let operations: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let client = client(policy.clone(), Breakers::default());
            tokio::spawn(async move { charge_via(&client, addr, &format!("order {i}")).await })
        })
        .collect();
    for operation in operations {
        assert_eq!(
            operation.await.unwrap().unwrap().status(),
            StatusCode::CREATED
        );
    }

    let charges = server.charges();
    assert_eq!(charges.len(), CLIENTS);
    assert!(
        charges.values().all(|&n| n == 1),
        "every operation charged exactly once"
    );
    assert_eq!(
        server.arrivals(),
        CLIENTS + FAILURES,
        "each failed attempt retried once"
    );

    // The retries' waits: full jitter spreads them over [0, 200 ms].
    let mut by_key: HashMap<String, Vec<Instant>> = HashMap::new();
    for (key, at) in server.arrivals.lock().unwrap().iter() {
        by_key.entry(key.clone()).or_default().push(*at);
    }
    let waits: Vec<f64> = by_key
        .values()
        .flat_map(|arrivals| arrivals.windows(2))
        .map(|pair| (pair[1] - pair[0]).as_secs_f64() * 1000.0)
        .collect();
    assert_eq!(waits.len(), FAILURES);
    let mean = waits.iter().sum::<f64>() / waits.len() as f64;
    let sd = (waits.iter().map(|w| (w - mean).powi(2)).sum::<f64>() / waits.len() as f64).sqrt();
    let mut buckets = [0usize; 12];
    for wait in &waits {
        buckets[((wait / 20.0) as usize).min(11)] += 1;
    }
    println!(
        "waits before a retry: mean {mean:.0} ms, sd {sd:.0} ms, per 20 ms (the last: 220 ms or more): {buckets:?}"
    );
    // Uniform over 200 ms has sd ≈ 58 ms; lockstep would be near 0.
    assert!(sd > 25.0, "retries in lockstep: sd {sd:.1} ms");
    assert!(
        buckets.iter().all(|&n| n <= FAILURES / 3),
        "clustered: {buckets:?}"
    );
}

#[tokio::test]
async fn the_retry_budget_caps_attempts_when_everything_fails() {
    const CLIENTS: usize = 100;
    let (addr, server) = serve().await;
    server.down.store(true, Ordering::SeqCst);
    // Up to 10 attempts each, but retries may add only 10% (+1 a second).
    let budget = RetryBudget::new(0.1, Duration::from_secs(1), 1).unwrap();
    let policy = fast().max_attempts(10).budget(budget).build().unwrap();

    let operations: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let client = client(policy.clone(), Breakers::default());
            tokio::spawn(async move { charge_via(&client, addr, &format!("order {i}")).await })
        })
        .collect();
    for operation in operations {
        let response = operation.await.unwrap().unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    let attempts = server.arrivals();
    println!(
        "{CLIENTS} operations against a dead server: {attempts} attempts (unbudgeted: {})",
        CLIENTS * 10
    );
    assert!(attempts >= CLIENTS);
    assert!(
        attempts <= CLIENTS + 20,
        "{attempts} attempts: the budget did not hold"
    );
    assert!(server.charges().is_empty());
}

fn circuit_open(error: &reqwest_middleware::Error) -> Option<&CircuitOpen> {
    match error {
        reqwest_middleware::Error::Middleware(error) => error.downcast_ref::<CircuitOpen>(),
        reqwest_middleware::Error::Reqwest(_) => None,
    }
}

#[tokio::test]
async fn the_breaker_opens_probes_and_closes_again() {
    let (addr, server) = serve().await;
    let cool_down = Duration::from_millis(300);
    let breakers = Breakers::new(
        BreakerConfig::default()
            .consecutive_failures(3)
            .cool_down(cool_down),
    )
    .unwrap();
    let client = client(fast().max_attempts(1).build().unwrap(), breakers.clone());
    let breaker = breakers.get(&format!("127.0.0.1:{}", addr.port()));
    let mut states = breaker.subscribe();
    server.down.store(true, Ordering::SeqCst);

    for _ in 0..3 {
        let response = charge_via(&client, addr, "100 cents").await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(breaker.state(), BreakerState::Open);
    assert_eq!(*states.borrow_and_update(), BreakerState::Open);
    assert_eq!(
        breakers.states(),
        [(format!("127.0.0.1:{}", addr.port()), BreakerState::Open)]
    );

    // Open: calls fail fast, without a request.
    let error = charge_via(&client, addr, "100 cents").await.unwrap_err();
    assert!(
        circuit_open(&error).is_some_and(|open| open.retry_in() <= cool_down),
        "{error}"
    );
    assert_eq!(server.arrivals(), 3);

    // After the cool-down, one probe; the server is still down.
    tokio::time::sleep(cool_down).await;
    assert_eq!(breaker.state(), BreakerState::HalfOpen);
    let probe = charge_via(&client, addr, "100 cents").await.unwrap();
    assert_eq!(probe.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(server.arrivals(), 4);
    assert_eq!(breaker.state(), BreakerState::Open);
    assert!(charge_via(&client, addr, "100 cents").await.is_err());
    assert_eq!(server.arrivals(), 4);

    // The server is back: the next probe closes the circuit.
    server.down.store(false, Ordering::SeqCst);
    tokio::time::sleep(cool_down).await;
    let response = charge_via(&client, addr, "100 cents").await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(breaker.state(), BreakerState::Closed);
    assert_eq!(*states.borrow_and_update(), BreakerState::Closed);
    let response = charge_via(&client, addr, "100 cents").await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(server.arrivals(), 6);
}

#[tokio::test]
async fn a_server_that_refuses_connections_opens_the_breaker() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let breakers = Breakers::new(BreakerConfig::default().consecutive_failures(2)).unwrap();
    let client = client(fast().max_attempts(1).build().unwrap(), breakers.clone());

    for _ in 0..2 {
        let error = charge_via(&client, addr, "100 cents").await.unwrap_err();
        assert!(
            circuit_open(&error).is_none(),
            "a connection error: {error}"
        );
    }
    let error = charge_via(&client, addr, "100 cents").await.unwrap_err();
    assert!(circuit_open(&error).is_some(), "{error}");
}

#[tokio::test]
async fn the_retry_helper_shares_policy_and_breaker_with_any_call() {
    use idem_core::client::{CircuitBreaker, StopReason, retry};
    let breaker =
        CircuitBreaker::new("ledger", BreakerConfig::default().consecutive_failures(3)).unwrap();
    let policy = fast()
        .max_attempts(3)
        .breaker(breaker.clone())
        .build()
        .unwrap();
    let (addr, server) = serve().await;
    server.fail_next(1, StatusCode::SERVICE_UNAVAILABLE, None);
    let plain = reqwest::Client::new();

    // A plain reqwest call, its key made once by `retry` and sent on every attempt.
    let receipt = retry(&policy, |attempt| {
        let request = plain
            .post(format!("http://{addr}/charges"))
            .header("x-api-key", "shop-1")
            .header("idempotency-key", attempt.key())
            .body("100 cents")
            .send();
        async move { request.await?.error_for_status()?.text().await }
    })
    .await
    .unwrap();
    assert_eq!(receipt, r#"{"charge":1,"for":"100 cents"}"#);
    assert_eq!(server.arrivals(), 2);

    server.down.store(true, Ordering::SeqCst);
    let error = retry(&policy, |_| {
        let request = plain
            .post(format!("http://{addr}/charges"))
            .header("x-api-key", "shop-1")
            .header("idempotency-key", "k")
            .send();
        async move { request.await?.error_for_status() }
    })
    .await
    .unwrap_err();
    assert_eq!(error.attempts(), 3);
    assert_eq!(breaker.state(), BreakerState::Open);
    let error = retry(&policy, |_| async { Ok::<_, reqwest::Error>(()) })
        .await
        .unwrap_err();
    assert!(matches!(error.reason(), StopReason::CircuitOpen(_)));
}

// ---- Hardening: hung probes, many hosts, lost keys, flapping, slow servers ----

/// Serves `POST /charges` with no idempotency layer, recording arrivals.
async fn serve_plain() -> (SocketAddr, Arc<Server>) {
    let server = Arc::new(Server::default());
    let app = Router::new()
        .route("/charges", post(charge))
        .with_state(server.clone())
        .layer(middleware::from_fn_with_state(server.clone(), record));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, server)
}

/// A server that accepts connections and never answers; counts them.
async fn serve_silent() -> (SocketAddr, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((connection, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            held.push(connection);
        }
    });
    (addr, accepted)
}

fn final_report(error: &reqwest_middleware::Error) -> RetryReport {
    RetryReport::of(error)
        .unwrap_or_else(|| panic!("no report in {error:?}"))
        .clone()
}

#[tokio::test]
async fn every_final_error_carries_the_key_and_a_report() {
    let (server_addr, server) = serve().await;
    // Connections closed at once: reset before anything reaches the server.
    let proxy = Proxy::start(server_addr, |_| Fault::Refuse).await.unwrap();
    let resetting = client(fast().max_attempts(3).build().unwrap(), Breakers::default());
    let error = charge_via(&resetting, proxy.addr(), "100 cents")
        .await
        .unwrap_err();
    let got = final_report(&error);
    assert_eq!(got.attempts(), 3);
    let key = got.key().unwrap().to_owned();
    assert_eq!(uuid_version(&key), 4);
    assert!(
        matches!(&error, reqwest_middleware::Error::Middleware(e) if e.downcast_ref::<reqwest::Error>().is_some()),
        "the cause stays reachable: {error:?}"
    );
    assert!(
        idem_core::client::Classify::classify(&error).is_retryable(),
        "an outer retry sees a retryable error"
    );

    // The outer retry sends the same key; the server charges once.
    let outer = client(fast().build().unwrap(), Breakers::default());
    let response = outer
        .post(format!("http://{server_addr}/charges"))
        .header("x-api-key", "shop-1")
        .header("idempotency-key", format!("\"{key}\""))
        .body("100 cents")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(report(&response).key(), Some(key.as_str()));
    assert_eq!(server.charges().into_values().collect::<Vec<_>>(), [1]);

    // A timeout after the last attempt.
    let (silent, _) = serve_silent().await;
    let timing_out = ClientBuilder::new(
        reqwest::Client::builder()
            .timeout(Duration::from_millis(200))
            .build()
            .unwrap(),
    )
    .with(RetryMiddleware::new(
        fast().max_attempts(2).build().unwrap(),
    ))
    .build();
    let error = charge_via(&timing_out, silent, "100 cents")
        .await
        .unwrap_err();
    let got = final_report(&error);
    assert_eq!(got.attempts(), 2);
    assert!(got.key().is_some());

    // An open circuit, before any attempt.
    let breakers = Breakers::new(BreakerConfig::default().consecutive_failures(1)).unwrap();
    let client = client(fast().max_attempts(1).build().unwrap(), breakers);
    let _ = charge_via(&client, proxy.addr(), "100 cents").await;
    let error = client
        .post(format!("http://{}/charges", proxy.addr()))
        .header("x-api-key", "shop-1")
        .header("idempotency-key", "\"mine\"")
        .send()
        .await
        .unwrap_err();
    assert!(circuit_open(&error).is_some(), "{error:?}");
    let got = final_report(&error);
    assert_eq!((got.attempts(), got.key()), (0, Some("mine")));
}

#[tokio::test]
async fn a_key_idem_would_not_parse_is_sent_as_given_and_retried() {
    let (addr, server) = serve_plain().await;
    server.fail_next(1, StatusCode::SERVICE_UNAVAILABLE, None);
    let client = client(fast().build().unwrap(), Breakers::default());
    let response = client
        .post(format!("http://{addr}/charges"))
        .header("idempotency-key", "order 17")
        .body("100 cents")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let report = report(&response);
    assert_eq!(report.attempts(), 2);
    assert_eq!(report.key(), Some("order 17"));
    let arrivals: Vec<_> = server
        .arrivals
        .lock()
        .unwrap()
        .iter()
        .map(|(key, _)| key.clone())
        .collect();
    assert_eq!(arrivals, ["order 17", "order 17"]);
}

/// `report.key_header()` sends the key again byte for byte, whatever it
/// was: a structured-field string with an escaped quote, bytes that are not
/// UTF-8, a made key; idem's layer replays the first charge.
#[tokio::test]
async fn the_reports_key_header_sends_the_key_again_as_it_went() {
    let (addr, server) = serve().await;
    let client = client(fast().build().unwrap(), Breakers::default());
    let post = |key: Option<HeaderValue>| {
        let request = client
            .post(format!("http://{addr}/charges"))
            .header("x-api-key", "shop-1")
            .body("100 cents");
        match key {
            Some(key) => request.header("idempotency-key", key),
            None => request,
        }
    };
    let quoted = HeaderValue::from_static(r#""a\"b""#);
    let first = post(Some(quoted.clone())).send().await.unwrap();
    let got = report(&first);
    assert_eq!(got.key(), Some(r#"a"b"#), "the key as the server reads it");
    assert_eq!(got.key_header().as_ref(), Some(&quoted));
    let again = post(got.key_header()).send().await.unwrap();
    assert_eq!(again.status(), StatusCode::CREATED);
    assert!(report(&again).replayed(), "the same key");
    let made = post(None).send().await.unwrap();
    let again = post(report(&made).key_header()).send().await.unwrap();
    assert!(report(&again).replayed());
    assert_eq!(server.charges().len(), 2);

    // Bytes that are not UTF-8, to a port that refuses connections: the
    // final error's report gives the header back as it was sent.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let refusing = listener.local_addr().unwrap();
    drop(listener);
    let raw = HeaderValue::from_bytes(b"caf\xe9").unwrap();
    let error = client
        .post(format!("http://{refusing}/charges"))
        .header("idempotency-key", raw.clone())
        .body("100 cents")
        .send()
        .await
        .unwrap_err();
    let got = final_report(&error);
    assert_eq!(got.key(), Some("caf\u{fffd}"));
    assert_eq!(got.key_header(), Some(raw));
}

/// The operation's own failures open its circuit: the last response ends
/// it (with its report), not an error without one.
#[tokio::test]
async fn a_circuit_opened_by_the_operation_ends_it_with_the_last_response() {
    let (addr, server) = serve().await;
    server.down.store(true, Ordering::SeqCst);
    let breakers = Breakers::new(BreakerConfig::default().consecutive_failures(2)).unwrap();
    let client = client(fast().build().unwrap(), breakers);
    let response = charge_via(&client, addr, "100 cents").await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let got = report(&response);
    assert_eq!(got.attempts(), 2);
    assert!(got.key().is_some());
    assert_eq!(server.arrivals(), 2);
}

/// A `Retry-After` in delay-seconds too large for 64 bits is a very long
/// wait, not a missing header: a 429 stops the operation at once.
#[tokio::test]
async fn a_retry_after_past_64_bits_stops_a_rate_limited_operation() {
    for after in ["18446744073709551616", "99999999999999999999999"] {
        let (addr, server) = serve().await;
        server.fail_next(1, StatusCode::TOO_MANY_REQUESTS, Some(after));
        let client = client(fast().build().unwrap(), Breakers::default());
        let response = charge_via(&client, addr, "100 cents").await.unwrap();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(report(&response).attempts(), 1, "{after}");
        assert_eq!(server.arrivals(), 1, "{after}");
    }
}

#[tokio::test]
async fn a_probe_that_never_answers_does_not_hold_the_circuit_open() {
    let (addr, accepted) = serve_silent().await;
    // Long enough that a loaded machine still sees the circuit open right
    // after the failure that opened it.
    let cool_down = Duration::from_secs(1);
    let probe_timeout = Duration::from_secs(2);
    let breakers = Breakers::new(
        BreakerConfig::default()
            .consecutive_failures(1)
            .cool_down(cool_down)
            .probe_timeout(probe_timeout),
    )
    .unwrap();
    let policy = fast().max_attempts(1).build().unwrap();
    let with_timeout = ClientBuilder::new(
        reqwest::Client::builder()
            .timeout(Duration::from_millis(100))
            .build()
            .unwrap(),
    )
    .with(RetryMiddleware::new(policy.clone()).breakers(breakers.clone()))
    .build();
    // No timeout of its own: its probe hangs for as long as the test runs.
    let patient = client(policy, breakers.clone());

    assert!(charge_via(&with_timeout, addr, "1").await.is_err());
    let breaker = breakers.get(&format!("127.0.0.1:{}", addr.port()));
    assert_eq!(breaker.state(), BreakerState::Open);
    tokio::time::sleep(cool_down).await;
    let hung = tokio::spawn(async move { charge_via(&patient, addr, "2").await });
    while accepted.load(Ordering::SeqCst) < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let error = charge_via(&with_timeout, addr, "3").await.unwrap_err();
    assert!(circuit_open(&error).is_some(), "one probe at a time");

    // After the probe's deadline and a cool-down, calls are let through again.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let error = charge_via(&with_timeout, addr, "4").await.unwrap_err();
        if circuit_open(&error).is_none() {
            break;
        }
        assert!(Instant::now() < deadline, "the hung probe held the circuit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(accepted.load(Ordering::SeqCst) >= 3);
    // The hung probe's caller got an error at the deadline, with its key.
    let error = tokio::time::timeout(Duration::from_secs(20), hung)
        .await
        .expect("the probe was abandoned at its deadline")
        .unwrap()
        .unwrap_err();
    assert!(final_report(&error).key().is_some());
}

#[tokio::test]
async fn a_reject_mode_server_is_polled_until_the_replay() {
    use idem_core::{OnConflict, Settings};
    let server = Arc::new(Server::default());
    let settings = Settings::builder()
        .on_conflict(OnConflict::Reject)
        .lease(Duration::from_secs(60))
        .build()
        .unwrap();
    let slow_charge = |state: State<Arc<Server>>, headers: HeaderMap, body: String| async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        charge(state, headers, body).await
    };
    let app = Router::new()
        .route("/charges", post(slow_charge))
        .with_state(server.clone())
        .layer(
            IdempotencyLayer::scoped_by(Idempotency::memory(), |request| {
                request
                    .headers
                    .get("x-api-key")?
                    .to_str()
                    .ok()
                    .map(str::to_owned)
            })
            .settings(settings),
        )
        .layer(middleware::from_fn_with_state(server.clone(), record));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let policy = fast().max_elapsed(Duration::from_secs(5)).build().unwrap();
    let client = ClientBuilder::new(
        reqwest::Client::builder()
            .timeout(Duration::from_secs(1))
            .build()
            .unwrap(),
    )
    .with(RetryMiddleware::new(policy).breakers(Breakers::default()))
    .build();

    let response = charge_via(&client, addr, "100 cents").await.unwrap();

    assert_eq!(response.status(), StatusCode::CREATED);
    let report = report(&response);
    assert!(report.replayed(), "{report:?}");
    assert!(report.attempts() >= 3, "{report:?}");
    assert_eq!(server.charges().into_values().collect::<Vec<_>>(), [1]);
}

#[tokio::test]
async fn failures_of_calls_started_during_the_outage_do_not_reopen_the_circuit() {
    // 503 at once, or (body "slow") 503 once released.
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let down = Arc::new(AtomicBool::new(true));
    let arrived = Arc::new(AtomicU64::new(0));
    let (release_, down_, arrived_) = (release.clone(), down.clone(), arrived.clone());
    let app = Router::new().route(
        "/charges",
        post(move |body: String| {
            let (release, down, arrived) = (release_.clone(), down_.clone(), arrived_.clone());
            async move {
                arrived.fetch_add(1, Ordering::SeqCst);
                if body == "slow" {
                    release.acquire().await.unwrap().forget();
                }
                if down.load(Ordering::SeqCst) || body == "slow" {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::CREATED
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let cool_down = Duration::from_millis(200);
    let breakers = Breakers::new(
        BreakerConfig::default()
            .consecutive_failures(3)
            .cool_down(cool_down),
    )
    .unwrap();
    let client = client(fast().max_attempts(1).build().unwrap(), breakers.clone());
    let breaker = breakers.get(&format!("127.0.0.1:{}", addr.port()));

    // Five calls start during the outage and hang on.
    let stragglers: Vec<_> = (0..5)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { charge_via(&client, addr, "slow").await })
        })
        .collect();
    while arrived.load(Ordering::SeqCst) < 5 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for _ in 0..3 {
        let response = charge_via(&client, addr, "fast").await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(breaker.state(), BreakerState::Open);

    // The dependency recovers; a probe closes the circuit.
    down.store(false, Ordering::SeqCst);
    tokio::time::sleep(cool_down).await;
    let probe = charge_via(&client, addr, "fast").await.unwrap();
    assert_eq!(probe.status(), StatusCode::CREATED);
    assert_eq!(breaker.state(), BreakerState::Closed);

    // The outage's stragglers fail now: they do not reopen it.
    release.add_permits(5);
    for straggler in stragglers {
        let response = straggler.await.unwrap().unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(breaker.state(), BreakerState::Closed);
    let response = charge_via(&client, addr, "fast").await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn breakers_for_many_hosts_stay_within_their_bound() {
    let breakers = Breakers::new(BreakerConfig::default().consecutive_failures(1))
        .unwrap()
        .max_dependencies(10);
    let client = client(fast().max_attempts(1).build().unwrap(), breakers.clone());
    // Fifty dependencies, each a loopback port nothing listens on.
    for _ in 0..50 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        assert!(charge_via(&client, addr, "1").await.is_err());
        assert!(breakers.len() <= 10, "{} breakers", breakers.len());
    }
    assert!(breakers.states().len() <= 10);
}

#[tokio::test]
async fn the_extremes_of_every_setting_work_or_are_refused() {
    assert_eq!(
        RetryBudget::new(0.2, Duration::from_secs(10), i32::MAX as u32)
            .unwrap_err()
            .setting(),
        "budget min_per_sec"
    );
    let budget = RetryBudget::new(1000.0, Duration::from_secs(60), i32::MAX as u32 - 1).unwrap();
    let breakers = Breakers::new(
        BreakerConfig::default()
            .consecutive_failures(1)
            .window(Duration::MAX)
            .cool_down(Duration::MAX)
            .probe_timeout(Duration::MAX),
    )
    .unwrap()
    .idle(Duration::MAX)
    .max_dependencies(usize::MAX);
    let policy = RetryPolicy::builder()
        .base(Duration::from_millis(1))
        .cap(Duration::MAX)
        .max_attempts(2)
        .max_elapsed(Duration::MAX)
        .budget(budget)
        .build()
        .unwrap();
    let client = client(policy, breakers.clone());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);

    let error = charge_via(&client, addr, "1").await.unwrap_err();
    assert!(circuit_open(&error).is_some(), "opened for good: {error}");
    let error = charge_via(&client, addr, "1").await.unwrap_err();
    let open = circuit_open(&error).unwrap();
    assert!(open.retry_in() > Duration::from_secs(365 * 24 * 3600));
}

/// A request made in a step's work is sent under the step's derived key:
/// when the step runs again (its first attempt failed after the request),
/// the server sees the same key and replays instead of charging again. A
/// second request of the same step gets a key of its own.
#[tokio::test]
async fn a_step_sends_its_derived_key_on_every_attempt() {
    use idem_core::{Error, Fingerprint, Key, Settings, derive_step_key, step};
    let (addr, server) = serve().await;
    let client = client(fast().build().unwrap(), Breakers::default());
    let idem = Idempotency::memory();
    let key = Key::new("checkout", &"order-31").unwrap();
    let seen: Arc<Mutex<Vec<[String; 2]>>> = Arc::default();
    let attempt = |fail_after: bool| {
        let (client, idem, seen) = (client.clone(), idem.clone(), seen.clone());
        async move {
            idem.run(&Settings::default(), key, Fingerprint::UNCHECKED, async {
                step("charge", async {
                    let first = charge_via(&client, addr, "31").await.unwrap();
                    let second = charge_via(&client, addr, "31-fee").await.unwrap();
                    let keys = [report(&first).key(), report(&second).key()]
                        .map(|key| key.unwrap().to_owned());
                    seen.lock().unwrap().push(keys.clone());
                    if fail_after {
                        return Err(Error::AttemptFailed);
                    }
                    Ok(keys)
                })
                .await
            })
            .await
        }
    };
    assert!(
        attempt(true).await.is_err(),
        "the step failed after charging"
    );
    let keys = attempt(false).await.expect("the step ran again");
    assert_eq!(keys[0], derive_step_key(key, "charge"));
    assert_ne!(keys[1], keys[0], "a second request has a key of its own");
    assert_ne!(
        keys[1],
        derive_step_key(key, "charge#2"),
        "not another step's key"
    );
    assert_eq!(
        seen.lock().unwrap()[0],
        keys,
        "the same keys on both attempts"
    );
    let charges = server.charges();
    assert_eq!(
        charges.len(),
        2,
        "two charges, one per request: {charges:?}"
    );
    assert!(
        charges.values().all(|&n| n == 1),
        "each charged once, replayed on the step's second run: {charges:?}"
    );
}
