//! How the HTTP layer answers when a response does not end as a plain body:
//! redirects, panics, bodies that fail or stream or grow past the cap,
//! compression, trailers over h2c, nested routers, authentication, optional
//! keys and queries. Over real loopback HTTP (axum and hyper servers,
//! reqwest and hyper clients), on the memory store and a Redis node,
//! counting handler runs. Nothing here waits on a clock: a test that steps
//! a stream hands each chunk over a channel.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::Frame;
use idem_core::http::IdempotencyLayer;
use idem_core::{Idempotency, OnConflict, Settings};
use reqwest::Client;
use serde_json::Value;
use tokio::sync::{Mutex, mpsc};

/// Handler runs, shared by a test's routes.
#[derive(Default)]
struct Runs(AtomicU32);

impl Runs {
    fn bump(&self) -> u32 {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn get(&self) -> u32 {
        self.0.load(Ordering::SeqCst)
    }
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
}

/// A layer whose duplicates in flight are refused at once: a key held when
/// it should be free shows as a `409`, not as a wait.
fn rejecting(idem: Idempotency) -> IdempotencyLayer {
    layer(idem).settings(
        Settings::builder()
            .on_conflict(OnConflict::Reject)
            .lease(Duration::from_secs(60))
            .build()
            .unwrap(),
    )
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn client() -> Client {
    Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

fn post_to(addr: SocketAddr, path: &str, key: &str) -> reqwest::RequestBuilder {
    client()
        .post(format!("http://{addr}{path}"))
        .header("x-api-key", "client-a")
        .header("idempotency-key", key)
}

fn replayed(response: &reqwest::Response) -> bool {
    response
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true")
}

async fn problem(response: reqwest::Response, status: u16, kind: &str) -> Value {
    assert_eq!(response.status().as_u16(), status);
    assert_eq!(response.headers()["idempotency-retention"], "86400");
    let body: Value = response.json().await.unwrap();
    let kind_of = body["type"].as_str().unwrap();
    assert!(kind_of.ends_with(&format!("#{kind}")), "{body}");
    body
}

fn key() -> String {
    idem_core::store::Token::random().to_string()
}

/// Post/redirect/get. The `303` reports a created order: stored, and
/// the retry is sent to the same order.
async fn a_redirect_after_a_post_is_replayed(idem: Idempotency) {
    let runs = Arc::new(Runs::default());
    let app = Router::new()
        .route(
            "/orders",
            post(|State(runs): State<Arc<Runs>>| async move {
                let n = runs.bump();
                (
                    StatusCode::SEE_OTHER,
                    [(header::LOCATION, format!("/orders/{n}"))],
                )
            }),
        )
        .with_state(Arc::clone(&runs))
        .layer(layer(idem));
    let addr = serve(app).await;
    let key = key();
    let first = post_to(addr, "/orders", &key).send().await.unwrap();
    assert_eq!(first.status(), StatusCode::SEE_OTHER);
    assert_eq!(first.headers()["location"], "/orders/1");
    let retry = post_to(addr, "/orders", &key).send().await.unwrap();
    assert_eq!(retry.status(), StatusCode::SEE_OTHER);
    assert!(replayed(&retry));
    assert_eq!(retry.headers()["location"], "/orders/1", "the same order");
    assert_eq!(runs.get(), 1);
}

/// A handler that panics frees its key at once: the retry runs (it
/// is not refused as in progress for the lease).
async fn a_panicking_handler_frees_its_key(idem: Idempotency) {
    let runs = Arc::new(Runs::default());
    let app = Router::new()
        .route(
            "/charge",
            post(|State(runs): State<Arc<Runs>>| async move {
                if runs.bump() == 1 {
                    panic!("the card processor's client panicked");
                }
                (StatusCode::CREATED, "charged")
            }),
        )
        .with_state(Arc::clone(&runs))
        .layer(rejecting(idem));
    let addr = serve(app).await;
    let key = key();
    let first = post_to(addr, "/charge", &key).send().await;
    assert!(
        first.is_err() || first.unwrap().status().is_server_error(),
        "the panic is the server's own answer"
    );
    let retry = post_to(addr, "/charge", &key).send().await.unwrap();
    assert_eq!(
        retry.status(),
        StatusCode::CREATED,
        "not 409: the key is free"
    );
    assert!(!replayed(&retry));
    let again = post_to(addr, "/charge", &key).send().await.unwrap();
    assert!(replayed(&again));
    assert_eq!(runs.get(), 2);
}

/// A body fed chunk by chunk from the test, ended by dropping the sender,
/// or failed by sending an error.
type Chunks = mpsc::Sender<Result<Bytes, std::io::Error>>;

type Queue = mpsc::UnboundedSender<mpsc::Receiver<Result<Bytes, std::io::Error>>>;

/// A route whose response streams what the test sends on the handler's
/// channel: each run takes the next channel the test queued.
fn streaming(runs: &Arc<Runs>) -> (Router, Queue) {
    let (queue, receivers) =
        mpsc::unbounded_channel::<mpsc::Receiver<Result<Bytes, std::io::Error>>>();
    let receivers = Arc::new(Mutex::new(receivers));
    let runs = Arc::clone(runs);
    let handler = move || {
        let receivers = Arc::clone(&receivers);
        let runs = Arc::clone(&runs);
        async move {
            runs.bump();
            let chunks = receivers.lock().await.recv().await.unwrap();
            let body =
                Body::from_stream(futures_util::stream::unfold(chunks, |mut chunks| async {
                    chunks.recv().await.map(|chunk| (chunk, chunks))
                }));
            (
                StatusCode::CREATED,
                [(header::CONTENT_TYPE, "text/plain")],
                body,
            )
        }
    };
    (Router::new().route("/export", post(handler)), queue)
}

/// A streamed response reaches its client chunk by chunk while the
/// layer copies it: the client reads the first chunk before the second is
/// produced. Under the cap it is stored and replayed whole.
async fn a_stream_flows_through_and_is_replayed(idem: Idempotency) {
    let runs = Arc::new(Runs::default());
    let (routes, queue) = streaming(&runs);
    let addr = serve(routes.layer(rejecting(idem))).await;
    let (chunks, receiver): (Chunks, _) = mpsc::channel(1);
    queue.send(receiver).unwrap();
    let key = key();
    let mut first = post_to(addr, "/export", &key).send().await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    chunks
        .send(Ok(Bytes::from_static(b"progress 1\n")))
        .await
        .unwrap();
    assert_eq!(first.chunk().await.unwrap().unwrap(), "progress 1\n");
    chunks
        .send(Ok(Bytes::from_static(b"progress 2\n")))
        .await
        .unwrap();
    assert_eq!(first.chunk().await.unwrap().unwrap(), "progress 2\n");
    drop(chunks);
    assert!(first.chunk().await.unwrap().is_none());
    let retry = post_to(addr, "/export", &key).send().await.unwrap();
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert!(
        replayed(&retry),
        "the stream ended only once it was recorded"
    );
    assert_eq!(retry.headers()["content-type"], "text/plain");
    assert_eq!(retry.text().await.unwrap(), "progress 1\nprogress 2\n");
    assert_eq!(runs.get(), 1);
}

/// Past `max_response_bytes` the rest flows to the client uncopied,
/// and retries are told the response cannot be replayed: never a re-run.
async fn a_stream_over_the_cap_flows_and_is_not_run_again(idem: Idempotency) {
    let runs = Arc::new(Runs::default());
    let (routes, queue) = streaming(&runs);
    let addr = serve(routes.layer(rejecting(idem).max_response_bytes(16))).await;
    let (chunks, receiver): (Chunks, _) = mpsc::channel(1);
    queue.send(receiver).unwrap();
    let key = key();
    let mut first = post_to(addr, "/export", &key).send().await.unwrap();
    let mut got = Vec::new();
    for part in ["0123456789", "abcdefghij", "ABCDEFGHIJ"] {
        chunks.send(Ok(Bytes::from(part))).await.unwrap();
        got.extend_from_slice(&first.chunk().await.unwrap().unwrap());
    }
    drop(chunks);
    assert!(first.chunk().await.unwrap().is_none());
    assert_eq!(
        got, b"0123456789abcdefghijABCDEFGHIJ",
        "all of it, past the cap"
    );
    for _ in 0..2 {
        let retry = post_to(addr, "/export", &key).send().await.unwrap();
        let body = problem(retry, 500, "unreplayable").await;
        let detail = body["detail"].as_str().unwrap();
        assert!(detail.contains("larger than the 16 bytes"), "{detail}");
    }
    assert_eq!(runs.get(), 1);
}

/// The handler answered 201 and its body failed midway: the client
/// sees the failure, and retries are told the request ran but cannot be
/// replayed. It never runs again, and the key is not released.
async fn a_body_that_fails_midway_is_not_run_again(idem: Idempotency) {
    let runs = Arc::new(Runs::default());
    let (routes, queue) = streaming(&runs);
    let addr = serve(routes.layer(rejecting(idem))).await;
    let (chunks, receiver): (Chunks, _) = mpsc::channel(1);
    queue.send(receiver).unwrap();
    let key = key();
    let mut first = post_to(addr, "/export", &key).send().await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    chunks
        .send(Ok(Bytes::from_static(b"charged; receipt: ")))
        .await
        .unwrap();
    assert_eq!(first.chunk().await.unwrap().unwrap(), "charged; receipt: ");
    chunks
        .send(Err(std::io::Error::other("the receipt service went away")))
        .await
        .unwrap();
    assert!(first.chunk().await.is_err(), "the client sees the failure");
    for _ in 0..2 {
        let retry = post_to(addr, "/export", &key).send().await.unwrap();
        let body = problem(retry, 500, "unreplayable").await;
        let detail = body["detail"].as_str().unwrap();
        assert!(detail.contains("failed after 18 bytes"), "{detail}");
        assert!(
            !detail.contains("receipt service"),
            "no internals: {detail}"
        );
    }
    assert_eq!(runs.get(), 1);
}

/// A body of known length under the cap is read whole before it is sent:
/// when it fails midway, its client got none of it, and neither it nor a
/// retry is told that bytes were sent. The handler never runs again.
async fn a_whole_body_that_fails_is_not_said_to_have_been_sent(idem: Idempotency) {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// Says it is 10 bytes long, yields 5 and fails.
    struct Truncated(bool);

    impl hyper::body::Body for Truncated {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            if std::mem::replace(&mut self.0, true) {
                Poll::Ready(Some(Err(std::io::Error::other("the disk went away"))))
            } else {
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"12345")))))
            }
        }

        fn size_hint(&self) -> hyper::body::SizeHint {
            hyper::body::SizeHint::with_exact(10)
        }
    }

    let runs = Arc::new(Runs::default());
    let counted = Arc::clone(&runs);
    let app = Router::new().route(
        "/export",
        post(move || {
            counted.bump();
            async { (StatusCode::CREATED, Body::new(Truncated(false))) }
        }),
    );
    let addr = serve(app.layer(rejecting(idem))).await;
    let key = key();
    for _ in 0..2 {
        let answer = post_to(addr, "/export", &key).send().await.unwrap();
        let body = problem(answer, 500, "unreplayable").await;
        let detail = body["detail"].as_str().unwrap();
        assert!(
            detail.contains("failed after 5 bytes, before any was sent"),
            "{detail}"
        );
        assert!(!detail.contains("disk"), "no internals: {detail}");
    }
    assert_eq!(runs.get(), 1);
}

/// Steps behind the layer: every stored response, a `4xx` included, is the
/// handler's answer and undoes nothing, even marked final; a handler that
/// marks its failure final and answers a status the layer does not store
/// (a `5xx`) has its steps undone, and its retries are told it failed for
/// good and cannot be replayed.
async fn a_handler_behind_the_layer_compensates_when_marked_final_and_unstored(idem: Idempotency) {
    let charges = Arc::new(Runs::default());
    let refunds = Arc::new(Runs::default());
    let handler = {
        let (charges, refunds) = (Arc::clone(&charges), Arc::clone(&refunds));
        move |headers: HeaderMap| {
            let (charges, refunds) = (Arc::clone(&charges), Arc::clone(&refunds));
            async move {
                let charged = idem_core::step("charge", async {
                    charges.bump();
                    Ok::<_, idem_core::Error>(30_u32)
                })
                .compensate(move |_: u32| async move {
                    refunds.bump();
                    Ok::<_, String>(())
                })
                .await;
                assert_eq!(charged.unwrap(), 30);
                idem_core::mark_final().unwrap();
                let status = headers["x-status"].to_str().unwrap().parse().unwrap();
                StatusCode::from_u16(status).unwrap()
            }
        }
    };
    let app = Router::new().route("/charge", post(handler));
    let addr = serve(app.layer(rejecting(idem))).await;
    let send = |key: String, status: &'static str| async move {
        post_to(addr, "/charge", &key)
            .header("x-status", status)
            .send()
            .await
            .unwrap()
    };
    // A stored refusal: the charge stands.
    let key = key();
    assert_eq!(send(key.clone(), "402").await.status(), 402);
    let again = send(key, "402").await;
    assert_eq!(again.status(), 402);
    assert!(replayed(&again));
    assert_eq!((charges.get(), refunds.get()), (1, 0));
    // Marked final, not stored: undone, and never run again.
    let key = self::key();
    assert_eq!(send(key.clone(), "503").await.status(), 503);
    assert_eq!((charges.get(), refunds.get()), (2, 1));
    problem(send(key, "503").await, 500, "unreplayable").await;
    assert_eq!((charges.get(), refunds.get()), (2, 1));
}

/// A gzip body from tower-http's compression inside the layer is
/// replayed with its `Content-Encoding` and `Vary`; `Set-Cookie` never is.
async fn compressed_responses_replay_their_encoding(idem: Idempotency) {
    let runs = Arc::new(Runs::default());
    let app = Router::new()
        .route(
            "/report",
            post(|State(runs): State<Arc<Runs>>| async move {
                let n = runs.bump();
                (
                    StatusCode::CREATED,
                    [
                        (header::CONTENT_TYPE, "text/plain".to_owned()),
                        (header::SET_COOKIE, format!("session={n}")),
                        (header::ETAG, "\"r1\"".to_owned()),
                        (header::CACHE_CONTROL, "no-store".to_owned()),
                        (header::CONTENT_LANGUAGE, "en".to_owned()),
                    ],
                    "a report that compresses well, ".repeat(50),
                )
            }),
        )
        .with_state(Arc::clone(&runs))
        .layer(tower_http::compression::CompressionLayer::new())
        .layer(layer(idem));
    let addr = serve(app).await;
    let key = key();
    let send = || {
        post_to(addr, "/report", &key)
            .header(header::ACCEPT_ENCODING, "gzip")
            .send()
    };
    let first = send().await.unwrap();
    assert_eq!(first.headers()["content-encoding"], "gzip");
    assert!(first.headers().contains_key("set-cookie"));
    let first_headers = first.headers().clone();
    let first_body = first.bytes().await.unwrap();
    assert_eq!(&first_body[..2], b"\x1f\x8b", "gzip");
    let retry = send().await.unwrap();
    assert!(replayed(&retry));
    for name in [
        "content-encoding",
        "content-type",
        "vary",
        "etag",
        "cache-control",
        "content-language",
    ] {
        assert_eq!(retry.headers().get(name), first_headers.get(name), "{name}");
    }
    assert!(!retry.headers().contains_key("set-cookie"));
    assert_eq!(retry.bytes().await.unwrap(), first_body);
    assert_eq!(runs.get(), 1);
}

/// Every guarded answer says how long its key is honoured: the
/// problems, the responses that are passed through unstored, and the
/// responses streamed to their client (of unknown length, or over the
/// replay limit).
async fn every_guarded_answer_carries_retention(idem: Idempotency) {
    let runs = Arc::new(Runs::default());
    let app = Router::new()
        .route(
            "/charge",
            post(|State(runs): State<Arc<Runs>>, body: String| async move {
                runs.bump();
                if body == "fail" {
                    return StatusCode::BAD_GATEWAY.into_response();
                }
                (StatusCode::CREATED, body).into_response()
            }),
        )
        .route(
            "/stream",
            post(|body: String| async move {
                let chunks = [Ok::<_, std::io::Error>(body)];
                axum::body::Body::from_stream(futures_util::stream::iter(chunks))
            }),
        )
        .route("/large", post(|| async { "x".repeat(64) }))
        .with_state(Arc::clone(&runs))
        .layer(layer(idem).max_body_bytes(8).max_response_bytes(16));
    let addr = serve(app).await;
    for (path, body) in [("/stream", "abcd"), ("/large", "")] {
        let streamed = post_to(addr, path, &key()).body(body).send();
        let streamed = streamed.await.unwrap();
        assert_eq!(streamed.status(), StatusCode::OK, "{path}");
        assert_eq!(
            streamed.headers()["idempotency-retention"],
            "86400",
            "{path}"
        );
    }
    let key = key();
    let first = post_to(addr, "/charge", &key)
        .body("a")
        .send()
        .await
        .unwrap();
    assert_eq!(first.headers()["idempotency-retention"], "86400");
    let reused = post_to(addr, "/charge", &key)
        .body("b")
        .send()
        .await
        .unwrap();
    problem(reused, 422, "key-reused").await;
    let large = post_to(addr, "/charge", &self::key())
        .body("123456789")
        .send();
    problem(large.await.unwrap(), 413, "payload-too-large").await;
    let missing = client()
        .post(format!("http://{addr}/charge"))
        .header("x-api-key", "client-a")
        .send();
    problem(missing.await.unwrap(), 400, "missing-key").await;
    let unscoped = client()
        .post(format!("http://{addr}/charge"))
        .header("idempotency-key", "k")
        .send();
    problem(unscoped.await.unwrap(), 400, "missing-scope").await;
    let failed = post_to(addr, "/charge", &self::key()).body("fail").send();
    let failed = failed.await.unwrap();
    assert_eq!(failed.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(failed.headers()["idempotency-retention"], "86400");
    assert_eq!(runs.get(), 2);
}

/// One layer inside two nested routers, each with `POST /create`:
/// the same client and key on both are two requests, not a replay; and the
/// same with merged routers.
async fn nested_routers_do_not_share_replays(idem: Idempotency) {
    let runs = Arc::new(Runs::default());
    let layer = layer(idem);
    let route = |what: &'static str| {
        Router::new()
            .route(
                "/create",
                post(move |State(runs): State<Arc<Runs>>| async move {
                    let n = runs.bump();
                    (StatusCode::CREATED, format!("{what} {n} created"))
                }),
            )
            .with_state(Arc::clone(&runs))
            .layer(layer.clone())
    };
    let nested = Router::new()
        .nest("/orders", route("order"))
        .nest("/refunds", route("refund"));
    let merged = Router::new()
        .merge(Router::new().nest("/v2/orders", route("order")))
        .merge(Router::new().nest("/v2/refunds", route("refund")));
    let addr = serve(nested.merge(merged)).await;
    for (orders, refunds) in [("/orders", "/refunds"), ("/v2/orders", "/v2/refunds")] {
        let key = key();
        let order = post_to(addr, &format!("{orders}/create"), &key)
            .send()
            .await
            .unwrap();
        assert!(order.text().await.unwrap().starts_with("order"));
        let refund = post_to(addr, &format!("{refunds}/create"), &key)
            .send()
            .await;
        let refund = refund.unwrap();
        assert_eq!(
            refund.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "{refunds}"
        );
        let again = post_to(addr, &format!("{orders}/create"), &key)
            .send()
            .await
            .unwrap();
        assert!(replayed(&again));
    }
    assert_eq!(
        runs.get(),
        2,
        "one order per prefix; no refund ran under an order's key"
    );
}

/// One layer mounted on a nested router and on the app around it: the
/// request is guarded once, by the outer layer, and replayed; it is not
/// refused as re-entering its own key (`500`) or left waiting for itself.
async fn a_layer_on_a_nested_router_and_on_its_app_guards_once(idem: Idempotency) {
    let runs = Arc::new(Runs::default());
    let layer = rejecting(idem);
    let orders = Router::new()
        .route(
            "/create",
            post(|State(runs): State<Arc<Runs>>| async move {
                let n = runs.bump();
                (StatusCode::CREATED, format!("order {n} created"))
            }),
        )
        .with_state(Arc::clone(&runs))
        .layer(layer.clone());
    let addr = serve(Router::new().nest("/orders", orders).layer(layer)).await;
    let key = key();
    let first = post_to(addr, "/orders/create", &key).send().await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    assert!(!replayed(&first));
    assert_eq!(first.headers()["idempotency-retention"], "86400");
    assert_eq!(first.text().await.unwrap(), "order 1 created");
    let retry = post_to(addr, "/orders/create", &key).send().await.unwrap();
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert!(replayed(&retry));
    assert_eq!(retry.text().await.unwrap(), "order 1 created");
    let reused = post_to(addr, "/orders/create", &key).body("other").send();
    problem(reused.await.unwrap(), 422, "key-reused").await;
    assert_eq!(runs.get(), 1);
}

/// A `401` or `403` is not stored: the client that fixes its
/// credentials is answered afresh under the same key.
async fn refusals_for_credentials_are_not_stored(idem: Idempotency) {
    let runs = Arc::new(Runs::default());
    let app = Router::new()
        .route(
            "/charge",
            post(
                |State(runs): State<Arc<Runs>>, headers: HeaderMap| async move {
                    match headers.get("authorization").map(|v| v.as_bytes()) {
                        None => StatusCode::UNAUTHORIZED.into_response(),
                        Some(b"Bearer reader") => StatusCode::FORBIDDEN.into_response(),
                        Some(_) => {
                            let n = runs.bump();
                            (StatusCode::CREATED, format!("charge {n}")).into_response()
                        }
                    }
                },
            ),
        )
        .with_state(Arc::clone(&runs))
        .layer(rejecting(idem));
    let addr = serve(app).await;
    let key = key();
    let anonymous = post_to(addr, "/charge", &key).send().await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let reader = post_to(addr, "/charge", &key).bearer_auth("reader");
    assert_eq!(reader.send().await.unwrap().status(), StatusCode::FORBIDDEN);
    let writer = post_to(addr, "/charge", &key).bearer_auth("writer");
    let writer = writer.send().await.unwrap();
    assert_eq!(writer.status(), StatusCode::CREATED);
    assert!(!replayed(&writer));
    assert_eq!(runs.get(), 1);
}

/// A key a client sends unasked: on a request the layer does not
/// guard it is ignored; with `key_optional`, a keyed request is guarded and
/// a request without one runs unguarded.
async fn unsolicited_keys_behave_as_documented(idem: Idempotency) {
    let runs = Arc::new(Runs::default());
    let app = Router::new()
        .route(
            "/items",
            get(|State(runs): State<Arc<Runs>>| async move { runs.bump().to_string() })
                .post(|State(runs): State<Arc<Runs>>| async move { runs.bump().to_string() }),
        )
        .with_state(Arc::clone(&runs))
        .layer(layer(idem).key_optional());
    let addr = serve(app).await;
    let key = key();
    for _ in 0..2 {
        let got = client()
            .get(format!("http://{addr}/items"))
            .header("idempotency-key", &key)
            .send()
            .await
            .unwrap();
        assert!(!replayed(&got), "a GET is not guarded: its key is ignored");
    }
    assert_eq!(runs.get(), 2);
    for _ in 0..2 {
        let bare = client().post(format!("http://{addr}/items")).send();
        assert!(!replayed(&bare.await.unwrap()));
    }
    assert_eq!(runs.get(), 4, "without a key, each POST runs");
    let first = post_to(addr, "/items", &key).send().await.unwrap();
    assert_eq!(first.text().await.unwrap(), "5");
    let again = post_to(addr, "/items", &key).send().await.unwrap();
    assert!(replayed(&again));
    assert_eq!(again.text().await.unwrap(), "5");
    let malformed = client()
        .post(format!("http://{addr}/items"))
        .header("x-api-key", "client-a")
        .header("idempotency-key", "\"unterminated")
        .send();
    problem(malformed.await.unwrap(), 400, "invalid-key").await;
    assert_eq!(runs.get(), 5);
}

/// The query is compared as form pairs: the order of different
/// names and `+` against `%20` do not make another request.
async fn equal_queries_replay(idem: Idempotency) {
    let runs = Arc::new(Runs::default());
    let app = Router::new()
        .route(
            "/search",
            post(|State(runs): State<Arc<Runs>>| async move { runs.bump().to_string() }),
        )
        .with_state(Arc::clone(&runs))
        .layer(layer(idem));
    let addr = serve(app).await;
    let key = key();
    let first = post_to(addr, "/search?a=1&b=x%20y", &key)
        .send()
        .await
        .unwrap();
    assert!(!replayed(&first));
    for same in ["/search?b=x+y&a=1", "/search?a=%31&b=x%20y"] {
        let retry = post_to(addr, same, &key).send().await.unwrap();
        assert!(replayed(&retry), "{same}");
    }
    let other = post_to(addr, "/search?a=2&b=x%20y", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(runs.get(), 1);
}

/// Serves `app` over HTTP/2 without TLS (h2c, as gRPC inside a mesh).
async fn serve_h2c(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (socket, _) = listener.accept().await.unwrap();
            let service = hyper_util::service::TowerToHyperService::new(app.clone());
            tokio::spawn(async move {
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(socket), service)
                        .await;
            });
        }
    });
    addr
}

/// An HTTP/2 client connection to `addr`.
async fn h2c_client(
    addr: SocketAddr,
) -> hyper::client::conn::http2::SendRequest<http_body_util::Full<Bytes>> {
    let socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(socket),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    sender
}

/// A unary gRPC-shaped method behind the layer: its answer streams, with
/// `grpc-status` 9 and a `grpc-message` naming its run in the trailers
/// (named in a `Trailer` header when `declared`).
fn grpc_orders(idem: Idempotency, declared: bool) -> (Router, Arc<Runs>) {
    let runs = Arc::new(Runs::default());
    let app = Router::new()
        .route(
            "/pkg.Orders/Create",
            post(move |State(runs): State<Arc<Runs>>| async move {
                let n = runs.bump();
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", "9".parse().unwrap());
                trailers.insert(
                    "grpc-message",
                    format!("order {n} precondition").parse().unwrap(),
                );
                let frames = vec![
                    Ok::<_, Infallible>(Frame::data(Bytes::from(vec![0, 0, 0, 0, 1, n as u8]))),
                    Ok(Frame::trailers(trailers)),
                ];
                let body = Body::new(StreamBody::new(futures_util::stream::iter(frames)));
                let mut response = Response::new(body);
                let headers = response.headers_mut();
                headers.insert(header::CONTENT_TYPE, "application/grpc".parse().unwrap());
                if declared {
                    headers.insert(
                        header::TRAILER,
                        "grpc-status, grpc-message".parse().unwrap(),
                    );
                }
                response
            }),
        )
        .with_state(Arc::clone(&runs))
        .layer(layer(idem));
    (app, runs)
}

/// A call of [`grpc_orders`] under `key` that asks for trailers.
fn grpc_request(addr: SocketAddr, key: &str) -> hyper::Request<http_body_util::Full<Bytes>> {
    hyper::Request::post(format!("http://{addr}/pkg.Orders/Create"))
        .header("x-api-key", "client-a")
        .header("idempotency-key", key)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::Full::new(Bytes::from_static(&[
            0, 0, 0, 0, 0,
        ])))
        .unwrap()
}

/// Whether `response` is a replay, its trailers and its body.
async fn grpc_answer(response: hyper::Response<hyper::body::Incoming>) -> (bool, HeaderMap, Bytes) {
    let replay = response.headers().contains_key("idempotent-replayed");
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers");
    (replay, trailers, collected.to_bytes())
}

/// A first answer of [`grpc_orders`], then its replay: the same trailers
/// and body, from one run.
fn first_then_replay(answers: &[(bool, HeaderMap, Bytes)], runs: &Runs) {
    let [(false, first, first_body), (true, second, second_body)] = answers else {
        panic!("a first answer, then a replay: {answers:?}");
    };
    assert_eq!(first["grpc-status"], "9");
    assert_eq!(first["grpc-message"], "order 1 precondition");
    assert_eq!(second, first);
    assert_eq!(second_body, first_body);
    assert_eq!(runs.get(), 1);
}

/// A gRPC-shaped answer over h2c (`grpc-status` in the trailers)
/// keeps its trailers through the layer, the first time and on replay.
async fn trailers_pass_through_and_replay_over_h2c(idem: Idempotency) {
    let (app, runs) = grpc_orders(idem, false);
    let addr = serve_h2c(app).await;
    let mut sender = h2c_client(addr).await;
    let key = key();
    let mut answers = Vec::new();
    for _ in 0..2 {
        let response = sender.send_request(grpc_request(addr, &key)).await.unwrap();
        answers.push(grpc_answer(response).await);
    }
    first_then_replay(&answers, &runs);
}

/// Over HTTP/1.1 a client that asks with `TE: trailers` gets the trailers
/// of a replay too: hyper sends only trailers a `Trailer` header names, in a
/// chunked body, and the replay names the ones it stores (its first answer,
/// streamed, names them itself, as it must without the layer).
async fn trailers_replay_over_http1(idem: Idempotency) {
    let (app, runs) = grpc_orders(idem, true);
    let addr = serve(app).await;
    let key = key();
    let mut answers = Vec::new();
    for _ in 0..2 {
        let socket = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(socket))
                .await
                .unwrap();
        tokio::spawn(connection);
        let mut request = grpc_request(addr, &key);
        request
            .headers_mut()
            .insert(header::HOST, addr.to_string().parse().unwrap());
        let response = sender.send_request(request).await.unwrap();
        assert!(
            !response.headers().contains_key(header::CONTENT_LENGTH),
            "chunked: {:?}",
            response.headers()
        );
        answers.push(grpc_answer(response).await);
    }
    first_then_replay(&answers, &runs);
}

/// gRPC says how a call went in `grpc-status` under HTTP `200`: an
/// `UNAVAILABLE` in the trailers, or in the headers of a trailers-only
/// answer, is a failure, so its key is released and the retry runs again.
async fn grpc_failures_are_not_stored(idem: Idempotency) {
    let runs = Arc::new(Runs::default());
    let app = Router::new()
        .route(
            "/pkg.Orders/Create",
            post(
                |State(runs): State<Arc<Runs>>, headers: HeaderMap| async move {
                    runs.bump();
                    let mut unavailable = HeaderMap::new();
                    unavailable.insert("grpc-status", "14".parse().unwrap());
                    if headers.contains_key("x-trailers-only") {
                        let mut response = Response::new(Body::empty());
                        response.headers_mut().extend(unavailable);
                        return response;
                    }
                    let frames = vec![
                        Ok::<_, Infallible>(Frame::data(Bytes::from_static(&[0, 0, 0, 0, 0]))),
                        Ok(Frame::trailers(unavailable)),
                    ];
                    Response::new(Body::new(StreamBody::new(futures_util::stream::iter(
                        frames,
                    ))))
                },
            ),
        )
        .with_state(Arc::clone(&runs))
        .layer(layer(idem));
    let addr = serve_h2c(app).await;
    let mut sender = h2c_client(addr).await;
    for trailers_only in [false, true] {
        let key = key();
        for _ in 0..2 {
            let mut request = hyper::Request::post(format!("http://{addr}/pkg.Orders/Create"))
                .header("x-api-key", "client-a")
                .header("idempotency-key", &key)
                .header("te", "trailers");
            if trailers_only {
                request = request.header("x-trailers-only", "1");
            }
            let request = request
                .body(http_body_util::Full::new(Bytes::from_static(&[
                    0, 0, 0, 0, 0,
                ])))
                .unwrap();
            let response = sender.send_request(request).await.unwrap();
            assert!(!response.headers().contains_key("idempotent-replayed"));
            let status = response.headers().get("grpc-status").cloned();
            let collected = response.into_body().collect().await.unwrap();
            let status = status.or_else(|| collected.trailers()?.get("grpc-status").cloned());
            assert_eq!(status.unwrap(), "14");
        }
    }
    assert_eq!(runs.get(), 4, "each retry ran again");
}

/// A client that hangs up while its stream is sent: the layer copies the
/// rest without it, and the retry replays the whole response.
async fn a_client_that_hangs_up_mid_stream_gets_it_all_on_retry(idem: Idempotency) {
    let runs = Arc::new(Runs::default());
    let (routes, queue) = streaming(&runs);
    let addr = serve(routes.layer(layer(idem))).await;
    let (chunks, receiver): (Chunks, _) = mpsc::channel(1);
    queue.send(receiver).unwrap();
    let key = key();
    let mut first = post_to(addr, "/export", &key).send().await.unwrap();
    chunks
        .send(Ok(Bytes::from_static(b"row 1\n")))
        .await
        .unwrap();
    assert_eq!(first.chunk().await.unwrap().unwrap(), "row 1\n");
    drop(first);
    for row in ["row 2\n", "row 3\n"] {
        chunks.send(Ok(Bytes::from(row))).await.unwrap();
    }
    drop(chunks);
    let retry = post_to(addr, "/export", &key).send().await.unwrap();
    assert!(replayed(&retry), "the duplicate waited for the record");
    assert_eq!(retry.text().await.unwrap(), "row 1\nrow 2\nrow 3\n");
    assert_eq!(runs.get(), 1);
}

/// Notifies when dropped: tells the test that the server dropped a handler.
struct Dropped(Arc<tokio::sync::Notify>);

impl Drop for Dropped {
    fn drop(&mut self) {
        self.0.notify_one();
    }
}

/// The function-level path, as the extractor's docs advise. The
/// client resets its h2 stream while the handler runs, and the server drops
/// the handler; the handler had spawned its idempotent call, which finishes
/// without it, and the retry gets its result, marked as a replay. (Awaited
/// in the handler instead, the call would stop there and hold its key for
/// the lease: the retry would wait for it, then charge again.)
async fn a_spawned_function_call_survives_a_hang_up(idem: Idempotency) {
    use idem_core::http::IdempotencyKey;
    use idem_core::{Fingerprint, Key, Replayable};
    let runs = Arc::new(Runs::default());
    let started = Arc::new(tokio::sync::Notify::new());
    let dropped = Arc::new(tokio::sync::Notify::new());
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let handler = {
        let (runs, started, gate) = (Arc::clone(&runs), Arc::clone(&started), Arc::clone(&gate));
        let dropped = Arc::clone(&dropped);
        move |key: IdempotencyKey| async move {
            let _guard = Dropped(dropped);
            let call = async move {
                let key = Key::new("charge", key.as_str())?;
                let body = async move {
                    started.notify_one();
                    let _open = gate.acquire().await;
                    Ok::<_, idem_core::Error>(Replayable::new(format!("charge {}", runs.bump())))
                };
                idem.run(&Settings::DEFAULT, key, Fingerprint::of(&())?, body)
                    .await
            };
            match tokio::spawn(call).await {
                Ok(charged) => charged.into_response(),
                Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
            }
        }
    };
    let addr = serve_h2c(Router::new().route("/charge", post(handler))).await;
    let key = key();
    let request = || {
        hyper::Request::post(format!("http://{addr}/charge"))
            .header("idempotency-key", &key)
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap()
    };
    let mut sender = h2c_client(addr).await;
    let first = tokio::spawn(sender.send_request(request()));
    started.notified().await;
    first.abort();
    dropped.notified().await;
    gate.add_permits(1);
    let retry = sender.send_request(request()).await.unwrap();
    assert!(
        retry.headers().contains_key("idempotent-replayed"),
        "the first call was recorded"
    );
    let body = retry.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "charge 1");
    assert_eq!(runs.get(), 1);
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
    a_redirect_after_a_post_is_replayed,
    a_panicking_handler_frees_its_key,
    a_stream_flows_through_and_is_replayed,
    a_stream_over_the_cap_flows_and_is_not_run_again,
    a_body_that_fails_midway_is_not_run_again,
    a_whole_body_that_fails_is_not_said_to_have_been_sent,
    a_handler_behind_the_layer_compensates_when_marked_final_and_unstored,
    compressed_responses_replay_their_encoding,
    every_guarded_answer_carries_retention,
    nested_routers_do_not_share_replays,
    a_layer_on_a_nested_router_and_on_its_app_guards_once,
    refusals_for_credentials_are_not_stored,
    unsolicited_keys_behave_as_documented,
    equal_queries_replay,
    trailers_pass_through_and_replay_over_h2c,
    trailers_replay_over_http1,
    grpc_failures_are_not_stored,
    a_client_that_hangs_up_mid_stream_gets_it_all_on_retry,
    a_spawned_function_call_survives_a_hang_up,
);

/// An inner service that answers `Err` rather than a response (a tower
/// service, not axum's) releases the key as a panic does: its error goes on
/// to the caller as it came, and the retry runs.
#[tokio::test]
async fn an_inner_service_error_releases_the_key() {
    use std::future::{Future, poll_fn};
    use std::pin::Pin;
    use tower_layer::Layer as _;
    use tower_service::Service;

    /// Fails its first call with an `Err`, answers `201` after.
    #[derive(Clone)]
    struct FailsFirst(Arc<Runs>);

    impl Service<axum::http::Request<Body>> for FailsFirst {
        type Response = Response;
        type Error = std::io::Error;
        type Future = Pin<Box<dyn Future<Output = Result<Response, std::io::Error>> + Send>>;

        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), std::io::Error>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: axum::http::Request<Body>) -> Self::Future {
            let run = self.0.bump();
            Box::pin(async move {
                if run == 1 {
                    return Err(std::io::Error::other("the service failed"));
                }
                Ok((StatusCode::CREATED, format!("run {run}")).into_response())
            })
        }
    }

    let runs = Arc::new(Runs::default());
    let service = layer(Idempotency::memory()).layer(FailsFirst(Arc::clone(&runs)));
    let key = key();
    let call = || {
        let mut service = service.clone();
        let request = axum::http::Request::post("/charge")
            .header("idempotency-key", &key)
            .header("x-api-key", "client-a")
            .body(Body::empty())
            .unwrap();
        async move {
            poll_fn(|cx| service.poll_ready(cx)).await.unwrap();
            service.call(request).await
        }
    };
    let failed = call().await.expect_err("the inner error, as it came");
    assert_eq!(failed.to_string(), "the service failed");
    let retry = call().await.expect("a response");
    assert_eq!(retry.status(), StatusCode::CREATED);
    let body = retry.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "run 2", "the retry ran");
    assert_eq!(runs.get(), 2);
}
