//! The HTTP API of the `http` example, over real HTTP on a loopback port:
//! concurrent duplicates charge once and answer identical bodies, and the
//! 400, 402, 409 and 422 cases answer as the Idempotency-Key draft says.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use examples::api::router;
use examples::payments::{DECLINED_CARD, GOOD_CARD, Payments, SLOW_CARD};
use idem_core::{OnConflict, Settings};
use reqwest::{Client, Response, StatusCode};
use serde_json::{Value, json};

async fn serve() -> (SocketAddr, Arc<Payments>) {
    serve_with(Settings::default()).await
}

async fn serve_with(settings: Settings) -> (SocketAddr, Arc<Payments>) {
    let idem = idem_core::Idempotency::memory();
    let payments = Arc::new(Payments::new(idem.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = router(Arc::clone(&payments), idem, settings);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, payments)
}

async fn pay(
    client: &Client,
    addr: SocketAddr,
    key: Option<&str>,
    card: &str,
    amount: u64,
) -> Response {
    let mut request = client
        .post(format!("http://{addr}/payments"))
        .header("x-api-key", "shop-1")
        .json(&json!({ "card": card, "amount_cents": amount }));
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    request.send().await.unwrap()
}

fn replayed(response: &Response) -> bool {
    response
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true")
}

async fn problem(response: Response, status: StatusCode) -> Value {
    assert_eq!(response.status(), status);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    response.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_charge_once_with_identical_bodies() {
    let (addr, payments) = serve().await;
    let client = Client::new();
    let requests = (0..50).map(|_| {
        let client = client.clone();
        tokio::spawn(async move {
            let response = pay(&client, addr, Some("order-storm"), GOOD_CARD, 1_000).await;
            let (status, replay) = (response.status(), replayed(&response));
            (status, replay, response.text().await.unwrap())
        })
    });
    let mut responses = Vec::new();
    for request in requests {
        responses.push(request.await.unwrap());
    }
    assert_eq!(payments.charges(), 1, "one charge for 50 requests");
    assert!(
        responses
            .iter()
            .all(|(status, _, _)| *status == StatusCode::CREATED)
    );
    assert!(
        responses.iter().all(|(_, _, body)| *body == responses[0].2),
        "identical bodies"
    );
    let firsts = responses.iter().filter(|(_, replay, _)| !replay).count();
    assert_eq!(firsts, 1, "all but the first are marked as replays");
}

#[tokio::test]
async fn a_retry_is_replayed_and_marked() {
    let (addr, payments) = serve().await;
    let client = Client::new();
    let first = pay(&client, addr, Some("order-1"), GOOD_CARD, 500).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    assert!(!replayed(&first));
    let first: Value = first.json().await.unwrap();
    let retry = pay(&client, addr, Some("\"order-1\""), GOOD_CARD, 500).await;
    assert!(
        replayed(&retry),
        "the draft's quoted form names the same key"
    );
    assert_eq!(retry.json::<Value>().await.unwrap(), first);
    assert_eq!(payments.charges(), 1);
}

#[tokio::test]
async fn a_missing_or_malformed_key_is_400() {
    let (addr, payments) = serve().await;
    let client = Client::new();
    let body = problem(
        pay(&client, addr, None, GOOD_CARD, 500).await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(body["status"], 400);
    assert!(
        body["detail"].as_str().unwrap().contains("Idempotency-Key"),
        "{body}"
    );
    let long = "k".repeat(300);
    for bad in ["", "two words", long.as_str()] {
        problem(
            pay(&client, addr, Some(bad), GOOD_CARD, 500).await,
            StatusCode::BAD_REQUEST,
        )
        .await;
    }
    assert_eq!(payments.attempts(), 0, "nothing was charged");
}

#[tokio::test]
async fn a_reused_key_with_another_body_is_422() {
    let (addr, payments) = serve().await;
    let client = Client::new();
    assert_eq!(
        pay(&client, addr, Some("order-2"), GOOD_CARD, 500)
            .await
            .status(),
        StatusCode::CREATED
    );
    let body = problem(
        pay(&client, addr, Some("order-2"), GOOD_CARD, 501).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(body["status"], 422);
    assert_eq!(payments.charges(), 1);
}

#[tokio::test]
async fn a_duplicate_of_a_running_request_is_409_with_retry_after() {
    let reject = Settings::builder()
        .on_conflict(OnConflict::Reject)
        .lease(Duration::from_secs(30))
        .build()
        .unwrap();
    let (addr, payments) = serve_with(reject).await;
    let client = Client::new();
    let slow = {
        let client = client.clone();
        tokio::spawn(async move {
            pay(&client, addr, Some("order-slow"), SLOW_CARD, 900)
                .await
                .status()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let response = pay(&client, addr, Some("order-slow"), SLOW_CARD, 900).await;
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1..=30).contains(&retry_after),
        "Retry-After: {retry_after}"
    );
    problem(response, StatusCode::CONFLICT).await;
    assert_eq!(slow.await.unwrap(), StatusCode::CREATED);
    let after = pay(&client, addr, Some("order-slow"), SLOW_CARD, 900).await;
    assert!(replayed(&after), "once done, the duplicate replays");
    assert_eq!(payments.charges(), 1);
}

#[tokio::test]
async fn a_decline_is_402_and_replayed() {
    let (addr, payments) = serve().await;
    let client = Client::new();
    for _ in 0..2 {
        let response = pay(&client, addr, Some("order-3"), DECLINED_CARD, 500).await;
        assert_eq!(response.status(), StatusCode::PAYMENT_REQUIRED);
    }
    assert_eq!(
        payments.attempts(),
        1,
        "a 4xx is stored: the bank was asked once"
    );
    assert_eq!(payments.charges(), 0);
}

#[tokio::test]
async fn keys_are_scoped_by_the_api_key() {
    let (addr, payments) = serve().await;
    let client = Client::new();
    for shop in ["shop-1", "shop-2"] {
        let response = client
            .post(format!("http://{addr}/payments"))
            .header("x-api-key", shop)
            .header("Idempotency-Key", "order-shared")
            .json(&json!({ "card": GOOD_CARD, "amount_cents": 700 }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        assert!(!replayed(&response), "{shop} gets its own charge");
    }
    assert_eq!(payments.charges(), 2);
}

#[tokio::test]
async fn unknown_clients_are_refused_before_any_replay() {
    let (addr, payments) = serve().await;
    let client = Client::new();
    let first = pay(&client, addr, Some("order-auth"), GOOD_CARD, 900).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    for api_key in [None, Some("shop-9")] {
        let mut request = client
            .post(format!("http://{addr}/payments"))
            .header("Idempotency-Key", "order-auth")
            .json(&json!({ "card": GOOD_CARD, "amount_cents": 900 }));
        if let Some(api_key) = api_key {
            request = request.header("x-api-key", api_key);
        }
        let refused = request.send().await.unwrap();
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED, "{api_key:?}");
        assert!(!replayed(&refused), "no replay without credentials");
    }
    assert_eq!(payments.charges(), 1);
}
