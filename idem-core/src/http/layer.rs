//! [`IdempotencyLayer`]: makes a tower HTTP service idempotent, as the IETF
//! Idempotency-Key draft and Stripe's API specify.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf as _, Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, HeaderName, TRAILER};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt as _;
use tokio::sync::oneshot;
use tower_layer::Layer;
use tower_service::Service;

use super::body::{BoxError, FrameSender, ResponseBody};
use super::fingerprint::{fingerprint, sent_uri};
use super::key::{IDEMPOTENT_REPLAYED, IdempotencyKey};
use super::problem::{DEFAULT_DOCS, Kind, Problem};
use super::stored::StoredResponse;
use crate::codec::ResultCodec;
use crate::error::Error;
use crate::finish::FinishOnDrop;
use crate::handle::Idempotency;
use crate::key::{Fingerprint, Key};
use crate::observe::Operation;
use crate::settings::Settings;

type ScopeFn = Arc<dyn Fn(&Parts) -> Option<String> + Send + Sync>;
type RouteFn = Arc<dyn Fn(&Parts) -> bool + Send + Sync>;

/// The default cap on a request body the layer reads: 1 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1 << 20;

/// The default cap on a response the layer stores: 1 MiB.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 1 << 20;

/// The response header that says how long a key is honoured, in seconds:
/// the TTL of the records the layer stores.
pub const IDEMPOTENCY_RETENTION: HeaderName = HeaderName::from_static("idempotency-retention");

/// The response headers replayed by default: the representation metadata
/// that says what the body is and how it may be cached (`Content-Type`,
/// `Content-Encoding`, `Content-Language`, `Content-Location`, `Location`,
/// `ETag`, `Last-Modified`, `Vary`, `Cache-Control`, `Link`). A gzip body is
/// replayed with the `Content-Encoding` that says so.
///
/// [`NEVER_REPLAYED`] headers are not replayed even when listed.
pub const DEFAULT_REPLAY_HEADERS: &[HeaderName] = &[
    http::header::CONTENT_TYPE,
    http::header::CONTENT_ENCODING,
    http::header::CONTENT_LANGUAGE,
    http::header::CONTENT_LOCATION,
    http::header::LOCATION,
    http::header::ETAG,
    http::header::LAST_MODIFIED,
    http::header::VARY,
    http::header::CACHE_CONTROL,
    http::header::LINK,
];

/// The response headers never stored nor replayed, whatever
/// [`replay_headers`](IdempotencyLayer::replay_headers) lists: `Set-Cookie`
/// (a replay must not hand a session to whoever retries), the hop-by-hop
/// headers of one connection (`Connection`, `Keep-Alive`,
/// `Proxy-Connection`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`),
/// and `Content-Length`, which is the replayed body's own. (A replay with
/// trailers declares them in a `Trailer` header of its own.)
pub const NEVER_REPLAYED: &[&str] = &[
    "set-cookie",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
];

/// The default status policy: which responses are final answers to the
/// request, stored and replayed to its retries.
///
/// | status | stored | why |
/// |---|---|---|
/// | 2xx | yes | the operation happened |
/// | 3xx except 304 | yes | a redirect after a `POST` (`303 See Other` to what it created) reports an operation that happened |
/// | 4xx | yes | the request was refused for what it is (`400`, `402`, `404`, `422`): it will be refused again |
/// | 401, 403, 407 | no | refused for who sent it: fixed credentials or permissions must get a fresh answer, and nothing about the client is kept |
/// | 405 | no | refused by routing, before any handler ran |
/// | 408, 409, 425, 429 | no | the same request may succeed later |
/// | 1xx, 304, 5xx | no | no answer to the operation, or a failure: the key is released at once and a retry runs again |
///
/// A handler that may have had its effect must not answer `5xx` under this
/// policy; Stripe, which stores every response once a handler has started,
/// is [`store_status`](IdempotencyLayer::store_status)`(|s| !matches!(s.as_u16(), 401 | 403 | 405 | 407 | 408 | 409 | 425 | 429))`
/// away. It mirrors the attribute, where an `Ok` is stored and only errors
/// that `cache_errors` deems final are.
#[must_use]
pub fn default_store_status(status: StatusCode) -> bool {
    let code = status.as_u16();
    match code {
        200..=299 => true,
        300..=399 => code != 304,
        400..=499 => !matches!(code, 401 | 403 | 405 | 407 | 408 | 409 | 425 | 429),
        _ => false,
    }
}

/// The default gRPC status policy: gRPC answers with HTTP `200` and says
/// how the call went in `grpc-status`, so a gRPC method's outcome is
/// judged by it, as [`default_store_status`] judges HTTP statuses.
///
/// | code | stored | why |
/// |---|---|---|
/// | 0 `OK` | yes | the call happened |
/// | 3 `INVALID_ARGUMENT`, 5 `NOT_FOUND`, 6 `ALREADY_EXISTS`, 9 `FAILED_PRECONDITION`, 11 `OUT_OF_RANGE` | yes | refused for what the request is, as a 4xx |
/// | 7 `PERMISSION_DENIED`, 16 `UNAUTHENTICATED` | no | refused for who sent it, as 401 and 403 |
/// | 12 `UNIMPLEMENTED` | no | refused before any handler ran, as 405 |
/// | 1 `CANCELLED`, 2 `UNKNOWN`, 4 `DEADLINE_EXCEEDED`, 8 `RESOURCE_EXHAUSTED`, 10 `ABORTED`, 13 `INTERNAL`, 14 `UNAVAILABLE`, 15 `DATA_LOSS`, others | no | a failure, or one that may pass: a retry runs again, as after a 5xx or a 429 |
#[must_use]
pub fn default_store_grpc_status(code: u32) -> bool {
    matches!(code, 0 | 3 | 5 | 6 | 9 | 11)
}

/// Makes a tower HTTP service (an axum `Router`, tonic's HTTP server, a
/// hyper service) idempotent, following
/// [draft-ietf-httpapi-idempotency-key-header](https://datatracker.ietf.org/doc/draft-ietf-httpapi-idempotency-key-header/).
///
/// For each request whose method (by default `POST` or `PATCH`) it guards:
///
/// 1. the `Idempotency-Key` header is required (missing, malformed or
///    repeated: `400`, problem+json);
/// 2. the key is scoped by the function given to
///    [`scoped_by`](Self::scoped_by) (an API key, a principal), so two clients
///    never share records;
/// 3. the request is fingerprinted (method, the path the client sent, the
///    query as form pairs, the chosen headers and the body, up to a cap:
///    `413` beyond it); a key reused with another request is a `422`;
/// 4. the inner service runs once per key; its response (status, the
///    replayed headers, the body, the trailers) is stored for the TTL when
///    the [status policy](default_store_status) says so, and replayed byte
///    for byte, with `Idempotent-Replayed: true`;
/// 5. a duplicate of a request in progress waits for its response (for at
///    most the settings' `wait_timeout`, one lease by default, then it gets
///    the `409`), or with [`OnConflict::Reject`](crate::OnConflict::Reject)
///    gets `409` at once; a `409`'s `Retry-After` is `1`, when to look
///    again (whole seconds, at least one), never the holder's lease;
/// 6. a store that is down is a `503`: nothing runs unguarded.
///
/// Once the inner service has started, its side effects may have happened,
/// so it never runs again for the key unless the status policy says its
/// answer was a failure:
///
/// - it runs on a task of its own: its response is recorded even if the
///   client hangs up, so the client's retry replays it instead of waiting
///   out a lease and running it again;
/// - a response whose body fails midway, or is larger than
///   [`max_response_bytes`](Self::max_response_bytes), is recorded as run
///   but not replayable: retries get a `500` problem
///   ([`#unreplayable`](super#unreplayable)) until the TTL ends or an
///   operator forgets the key;
/// - a handler that panics releases the key at once (a duplicate waiting
///   for it gets a `503` [`#attempt-failed`](super#attempt-failed), a retry
///   runs), and its panic goes on as it would without the layer; so does
///   an inner service that answers `Err` instead of a response (possible
///   with tower services other than axum's), whose error goes on to the
///   caller.
///
/// A response whose length is known and under the cap (a `Full` body) is
/// read whole, recorded, then sent. Any other streams to its client as it
/// comes, through a buffer of a few frames, while the layer copies at most
/// `max_response_bytes` of it; its end (and its trailers) reach the client
/// once it is recorded (a handler that sets its own `Content-Length` on a
/// stream lets its client finish at the last byte, which may be before the
/// record: a retry then finds the call still running).
///
/// ```
/// use axum::{Router, routing::post};
/// use idem_core::Idempotency;
/// use idem_core::http::IdempotencyLayer;
///
/// let idem = Idempotency::memory(); // once, at start-up
/// let app: Router = Router::new()
///     .route("/payments", post(|| async { "charged" }))
///     .layer(IdempotencyLayer::scoped_by(idem, |request| {
///         request.headers.get("x-api-key")?.to_str().ok().map(str::to_owned)
///     }));
/// ```
///
/// The request body keeps its type: the layer needs only that it can be
/// made from [`Bytes`] (axum's `Body` and `Full<Bytes>` can); a guarded
/// request is read whole, up to its cap, to fingerprint it. Responses come
/// in a [`ResponseBody`], the inner body itself when the layer passes it
/// through.
///
/// # Where it sits
///
/// A replay is answered before the inner service runs, so whatever the
/// inner service checks is skipped for it. Put the layer *after*
/// authentication (authentication layers outside it, i.e. added after it
/// with axum's `.layer`), and scope keys by the authenticated principal (a
/// type the authentication layer puts in the request's extensions), never
/// by a header a client could pick for another. Refusals for who sent the
/// request (`401`, `403`, `407`) are not stored by default, so a client
/// that fixes its credentials gets a fresh answer.
///
/// In an axum router nested under a prefix (`Router::nest`), the request's
/// URI lacks the prefix; the fingerprint uses the one the client sent
/// (axum 0.8's `OriginalUri`, read with the `tower` feature alone too), but
/// a [`routes`](Self::routes) filter and [`scoped_by`](Self::scoped_by) see
/// the parts as the layer gets them.
///
/// A request that a layer outside this one already guards under the same
/// key on the same handle (one layer mounted on a nested router and on the
/// app around it) passes through this one: the outer layer runs it once and
/// records it. Layers of other names, scopes or handles each guard it under
/// their own key (two handles of one store then wait for each other, until
/// `wait_timeout`: mount one). What sits between the two layers (a retry)
/// acts as it would without the inner one.
#[derive(Clone)]
pub struct IdempotencyLayer {
    config: Arc<Config>,
}

#[derive(Clone)]
struct Config {
    idem: Idempotency,
    scope: Option<ScopeFn>,
    name: Arc<str>,
    methods: Vec<Method>,
    routes: Option<RouteFn>,
    key_required: bool,
    fingerprint_headers: Vec<HeaderName>,
    max_body: usize,
    max_response: usize,
    replay_headers: Vec<HeaderName>,
    store_status: fn(StatusCode) -> bool,
    store_grpc_status: fn(u32) -> bool,
    settings: Settings,
    docs: String,
}

impl IdempotencyLayer {
    /// A layer on the handle `idem` whose keys are scoped by `scope`: a
    /// function of the request's parts that names its client. Best the
    /// principal an authentication layer outside this one put in the
    /// extensions (see [where it sits](Self#where-it-sits)): a value read from
    /// a header is only as good as the check that it belongs to the client.
    /// A guarded request with no scope (`None`) is refused with a `400`.
    pub fn scoped_by<F>(idem: Idempotency, scope: F) -> Self
    where
        F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        Self::new(idem, Some(Arc::new(scope)))
    }

    /// A layer whose keys are *not* scoped: every client shares one key
    /// space, so two clients that pick the same key share a record (one gets
    /// the other's response, or a `422`). Only for services with one client,
    /// or keys that clients cannot choose alike.
    pub fn unscoped(idem: Idempotency) -> Self {
        Self::new(idem, None)
    }

    fn new(idem: Idempotency, scope: Option<ScopeFn>) -> Self {
        Self {
            config: Arc::new(Config {
                idem,
                scope,
                name: Arc::from("http"),
                methods: vec![Method::POST, Method::PATCH],
                routes: None,
                key_required: true,
                fingerprint_headers: Vec::new(),
                max_body: DEFAULT_MAX_BODY_BYTES,
                max_response: DEFAULT_MAX_RESPONSE_BYTES,
                replay_headers: DEFAULT_REPLAY_HEADERS.to_vec(),
                store_status: default_store_status,
                store_grpc_status: default_store_grpc_status,
                settings: Settings::DEFAULT,
                docs: DEFAULT_DOCS.to_owned(),
            }),
        }
    }

    /// The layer with `change` made to its configuration; a clone made
    /// before keeps its own.
    fn with(mut self, change: impl FnOnce(&mut Config)) -> Self {
        change(Arc::make_mut(&mut self.config));
        self
    }

    /// The operation name the keys are hashed with. Default `"http"`; give
    /// two APIs on one store names of their own. A request's key is
    /// `Key::scoped(name, scope, idempotency_key)` (`Key::new(name,
    /// idempotency_key)` when [`unscoped`](Self::unscoped)), where
    /// `idempotency_key` is the header's string without its quotes
    /// (`"order-1"` is `order-1`): the key an operator
    /// [inspects](crate::Idempotency::inspect) or
    /// [forgets](crate::Idempotency::forget).
    #[must_use]
    pub fn name(self, name: impl Into<String>) -> Self {
        let name: Arc<str> = name.into().into();
        self.with(|c| c.name = name)
    }

    /// The TTL, lease and conflict behaviour. Default [`Settings::DEFAULT`]:
    /// 24 hours, a 60-second lease, duplicates wait.
    #[must_use]
    pub fn settings(self, settings: Settings) -> Self {
        self.with(|c| c.settings = settings)
    }

    /// The methods guarded. Default `POST` and `PATCH`; others pass through.
    #[must_use]
    pub fn methods(self, methods: impl IntoIterator<Item = Method>) -> Self {
        let methods = methods.into_iter().collect();
        self.with(|c| c.methods = methods)
    }

    /// Guards only the requests (of the guarded methods) that `routes`
    /// accepts, e.g. `|r| r.uri.path().starts_with("/payments")`.
    #[must_use]
    pub fn routes<F>(self, routes: F) -> Self
    where
        F: Fn(&Parts) -> bool + Send + Sync + 'static,
    {
        self.with(|c| c.routes = Some(Arc::new(routes)))
    }

    /// Lets guarded requests without an `Idempotency-Key` pass through,
    /// unguarded, instead of refusing them with a `400`. A request that
    /// carries a key (some clients attach one unasked) is still guarded:
    /// it runs once per key, and a malformed key is still a `400`. Requests
    /// of methods or routes the layer does not guard pass through whatever
    /// key they carry.
    #[must_use]
    pub fn key_optional(self) -> Self {
        self.with(|c| c.key_required = false)
    }

    /// Request headers that take part in the fingerprint, beside the method,
    /// path, query and body. Default none; e.g. `Accept-Encoding` when a
    /// compression layer inside this one answers clients differently, so
    /// that a retry that asks for another encoding is not handed the first's.
    #[must_use]
    pub fn fingerprint_headers(self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        let names = names.into_iter().collect();
        self.with(|c| c.fingerprint_headers = names)
    }

    /// The largest request body a guarded request may have: a larger one is
    /// refused with `413`. Default [`DEFAULT_MAX_BODY_BYTES`].
    #[must_use]
    pub fn max_body_bytes(self, bytes: usize) -> Self {
        self.with(|c| c.max_body = bytes)
    }

    /// The largest response body the layer stores. A larger response flows
    /// to its client whole (the layer stops copying it at the cap), and is
    /// recorded as run but too large to replay: its retries get a `500`
    /// [`#unreplayable`](super#unreplayable) problem, and it does not run
    /// again. Default [`DEFAULT_MAX_RESPONSE_BYTES`].
    #[must_use]
    pub fn max_response_bytes(self, bytes: usize) -> Self {
        self.with(|c| c.max_response = bytes)
    }

    /// The response headers stored and replayed. Default
    /// [`DEFAULT_REPLAY_HEADERS`]; [`NEVER_REPLAYED`] ones are left out
    /// whatever the list says. The first response always carries all of its
    /// headers.
    #[must_use]
    pub fn replay_headers(self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        let names = names
            .into_iter()
            .filter(|name| !NEVER_REPLAYED.contains(&name.as_str()))
            .collect();
        self.with(|c| c.replay_headers = names)
    }

    /// Which statuses are stored and replayed; the others release the key so
    /// that a retry runs again, and are passed through as they came (with
    /// `Idempotency-Retention`). Default [`default_store_status`].
    #[must_use]
    pub fn store_status(self, policy: fn(StatusCode) -> bool) -> Self {
        self.with(|c| c.store_status = policy)
    }

    /// Which gRPC statuses (`grpc-status`, in a response's headers or
    /// trailers) are stored and replayed; the others release the key, as a
    /// status [`store_status`](Self::store_status) refuses does. Default
    /// [`default_store_grpc_status`].
    #[must_use]
    pub fn store_grpc_status(self, policy: fn(u32) -> bool) -> Self {
        self.with(|c| c.store_grpc_status = policy)
    }

    /// Where the problem types are documented: each problem's `type` is this
    /// URL with a fragment, and each problem response links it with
    /// `rel="describedby"`. Default the docs of [`idem_core::http`](super).
    #[must_use]
    pub fn problem_docs(self, url: impl Into<String>) -> Self {
        let url = url.into();
        self.with(|c| c.docs = url)
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = IdempotencyService<S>;

    fn layer(&self, inner: S) -> IdempotencyService<S> {
        IdempotencyService {
            inner,
            config: Arc::clone(&self.config),
        }
    }
}

/// The service [`IdempotencyLayer`] wraps around an inner one.
#[derive(Clone)]
pub struct IdempotencyService<S> {
    inner: S,
    config: Arc<Config>,
}

impl Config {
    /// Whether a response with these headers (or trailers) may be stored,
    /// by its gRPC status; `true` without one.
    fn stores_grpc(&self, fields: &HeaderMap) -> bool {
        let code = fields
            .get("grpc-status")
            .and_then(|v| v.to_str().ok()?.parse::<u32>().ok());
        code.is_none_or(self.store_grpc_status)
    }

    fn guards(&self, parts: &Parts) -> bool {
        self.methods.contains(&parts.method) && self.routes.as_ref().is_none_or(|r| r(parts))
    }

    /// A problem response, with `Idempotency-Retention` as every guarded
    /// response has.
    fn problem<RB>(&self, problem: &Problem) -> Response<ResponseBody<RB>> {
        let mut response = problem.response(&self.docs);
        self.retention(response.headers_mut());
        response
    }

    /// Says on a guarded response how long its key is honoured.
    fn retention(&self, headers: &mut http::HeaderMap) {
        headers.insert(
            IDEMPOTENCY_RETENTION,
            HeaderValue::from(self.settings.ttl().as_secs()),
        );
    }
}

/// How a guarded call ended, other than with a response to record.
enum Failure<E, RB> {
    /// idem refused or failed.
    Idem(Error),
    /// The response is returned as it came: its status is not one that is
    /// stored.
    Passthrough(Response<RB>),
    /// The response was read whole, and its trailers' gRPC status is not
    /// one that is stored.
    Unstored(http::response::Parts, Bytes, Option<HeaderMap>),
    /// The response streamed to its client, and its trailers' gRPC status
    /// is not one that is stored.
    Streamed,
    /// The inner service failed.
    Inner(E),
    /// The inner service panicked; the panic goes on once the key is free.
    Panicked(Box<dyn Any + Send>),
}

/// What a guarded call records, and what its own client gets.
struct Answer {
    /// The stored response, or why the call ran but cannot be replayed.
    record: Result<StoredResponse, String>,
    /// Who gets the response, and how.
    first: First,
}

/// How a response goes to the client of the call that produced it.
enum First {
    /// Not at all: this is a replay.
    Replay,
    /// Whole, once recorded, with the inner response's own parts (all its
    /// headers).
    Whole(http::response::Parts),
    /// Already sent: it streamed while it was copied.
    Streamed,
}

/// How the layer's results go to the store and back.
struct HttpCodec;

impl<E, RB> ResultCodec<Answer, Failure<E, RB>> for HttpCodec {
    fn encode_ok(&self, value: &Answer) -> serde_json::Result<Vec<u8>> {
        match &value.record {
            Ok(stored) => Ok(stored.encode()),
            // Recorded as a result that ran but does not replay: retries get
            // `Error::NotReplayable` with this reason, never a second run.
            Err(reason) => Err(<serde_json::Error as serde::ser::Error>::custom(reason)),
        }
    }

    fn decode_ok(&self, bytes: &[u8]) -> serde_json::Result<Answer> {
        let stored = StoredResponse::decode(bytes).ok_or_else(|| {
            <serde_json::Error as serde::de::Error>::custom("not a stored HTTP response")
        })?;
        Ok(Answer {
            record: Ok(stored),
            first: First::Replay,
        })
    }

    fn idem_error(&self, error: Error) -> Failure<E, RB> {
        Failure::Idem(error)
    }

    fn keep_err(&mut self, _: &Failure<E, RB>) -> Option<serde_json::Result<Vec<u8>>> {
        None
    }

    fn decode_err(&self, _: &[u8]) -> Result<Failure<E, RB>, Error> {
        Err(Error::Decode(Arc::from(Box::<
            dyn std::error::Error + Send + Sync,
        >::from(
            "the layer stores no errors"
        ))))
    }
}

/// Reads a body up to `max` bytes: `None` when it is larger.
async fn read_limited<B>(body: B, max: usize) -> Result<Option<Bytes>, BoxError>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    match http_body_util::Limited::new(body, max).collect().await {
        Ok(collected) => Ok(Some(collected.to_bytes())),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => Ok(None),
        Err(error) => Err(error),
    }
}

fn declared_length(headers: &http::HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

impl<S, B, RB> Service<Request<B>> for IdempotencyService<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Body + From<Bytes> + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    RB: Body + Send + 'static,
    RB::Data: Send,
    RB::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<RB>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // The ready service handles this request; a clone takes its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let config = Arc::clone(&self.config);
        Box::pin(async move {
            let (mut parts, body) = request.into_parts();
            if !config.guards(&parts) {
                let response = inner.call(Request::from_parts(parts, body)).await?;
                return Ok(response.map(ResponseBody::inner));
            }
            let key = match IdempotencyKey::from_headers(&parts.headers) {
                Ok(Some(key)) => key,
                Ok(None) if !config.key_required => {
                    let response = inner.call(Request::from_parts(parts, body)).await?;
                    return Ok(response.map(ResponseBody::inner));
                }
                Ok(None) => {
                    let detail = format!(
                        "{} {} needs an Idempotency-Key header: a fresh UUID per operation, \
                         sent again on every retry of it",
                        parts.method,
                        sent_uri(&parts).path()
                    );
                    return Ok(config.problem(&Problem::new(Kind::MissingKey, detail)));
                }
                Err(error) => return Ok(config.problem(&Problem::of(&error))),
            };
            let key = match &config.scope {
                Some(scope) => match scope(&parts) {
                    Some(scope) => Key::scoped(&config.name, &scope, key.as_str()),
                    None => {
                        let detail = "the request carries nothing that identifies its client \
                                      (such as credentials), so its Idempotency-Key cannot be \
                                      kept apart from other clients'";
                        return Ok(config.problem(&Problem::new(Kind::MissingScope, detail)));
                    }
                },
                None => Key::new(&config.name, key.as_str()),
            };
            // The same key guarded by a layer outside this one (one layer
            // mounted on a nested router and on the app): that one runs the
            // request once; claiming it here too would find it held by the
            // very request that waits for this one.
            if let Ok(key) = &key
                && GuardedKeys::contain(&parts, &config.idem, key)
            {
                tracing::debug!(%key, "a request already guarded under its key by an outer layer");
                let response = inner.call(Request::from_parts(parts, body)).await?;
                return Ok(response.map(ResponseBody::inner));
            }
            let body = match read_limited(body, config.max_body).await {
                Ok(Some(body)) => body,
                Ok(None) => {
                    let detail = format!(
                        "an idempotent request's body may be at most {} bytes",
                        config.max_body
                    );
                    return Ok(config.problem(&Problem::new(Kind::PayloadTooLarge, detail)));
                }
                Err(error) => {
                    let detail = format!("the request body could not be read: {error}");
                    return Ok(config.problem(&Problem::new(Kind::UnreadableBody, detail)));
                }
            };
            let prepared = key.and_then(|key| {
                Ok((
                    key,
                    fingerprint(&parts, &config.fingerprint_headers, &body)?,
                ))
            });
            let (key, fingerprint) = match prepared {
                Ok(prepared) => prepared,
                Err(error) => return Ok(config.problem(&Problem::of(&error))),
            };
            GuardedKeys::add(&mut parts, &config.idem, key);
            let request = Request::from_parts(parts, B::from(body));
            // Polled here, and moved to a task of its own if this future is
            // dropped first: a client that hangs up drops this future, not
            // the call, which goes on and records its response. In the
            // request's span, so that the call's span and events stay
            // inside the request's (a trace layer's, an operator's).
            let (head, mut streamed) = oneshot::channel();
            let mut task = FinishOnDrop::new(
                "a request's call",
                tracing::Instrument::instrument(
                    guarded(Arc::clone(&config), inner, request, key, fingerprint, head),
                    tracing::Span::current(),
                ),
            );
            // A response streamed while it is copied comes as soon as its
            // head is known (and before the call ends); every other answer
            // when the call is recorded.
            let outcome = tokio::select! {
                biased;
                Ok(response) = &mut streamed => return Ok(response),
                outcome = &mut task => outcome,
            };
            // A call polled here can send a streamed response's head and end
            // in one poll: the head is the answer then.
            if let Ok(response) = streamed.try_recv() {
                return Ok(response);
            }
            let outcome = match outcome {
                Ok(outcome) => outcome,
                Err(_) => Err(Failure::Idem(Error::AttemptFailed)),
            };
            Ok(match outcome {
                Ok(answer) => respond(&config, answer),
                Err(Failure::Idem(error)) => config.problem(&unreplayable_problem(&error)),
                Err(Failure::Passthrough(response)) => {
                    let mut response = response.map(ResponseBody::inner);
                    config.retention(response.headers_mut());
                    response
                }
                Err(Failure::Unstored(parts, body, trailers)) => {
                    let mut response = whole(parts, body, trailers);
                    config.retention(response.headers_mut());
                    response
                }
                Err(Failure::Streamed) => streamed_already(),
                Err(Failure::Inner(error)) => return Err(error),
                Err(Failure::Panicked(panic)) => std::panic::resume_unwind(panic),
            })
        })
    }
}

/// The keys that layers outside the inner service guard a request under,
/// each with its handle, in the request's extensions.
#[derive(Clone, Default)]
struct GuardedKeys(Vec<(usize, Key)>);

impl GuardedKeys {
    fn contain(parts: &Parts, idem: &Idempotency, key: &Key) -> bool {
        parts
            .extensions
            .get::<Self>()
            .is_some_and(|guarded| guarded.0.contains(&(idem.holder(), *key)))
    }

    fn add(parts: &mut Parts, idem: &Idempotency, key: Key) {
        parts
            .extensions
            .get_or_insert_default::<Self>()
            .0
            .push((idem.holder(), key));
    }
}

/// The problem of an idem error; for a call that ran but cannot be replayed,
/// one that says so.
fn unreplayable_problem(error: &Error) -> Problem {
    match error {
        Error::NotReplayable { reason } => {
            tracing::warn!(%reason, "a retry of an idempotent request that ran but cannot be replayed");
            Problem::new(
                Kind::Unreplayable,
                format!(
                    "The request with this Idempotency-Key was processed, but its response \
                     cannot be replayed ({reason}). It is not processed again under this key."
                ),
            )
        }
        error => Problem::of(error),
    }
}

/// Polls `future`, turning a panic into `Err` with its payload.
async fn catching<F: Future>(future: F) -> Result<F::Output, Box<dyn Any + Send>> {
    let mut future = std::pin::pin!(future);
    std::future::poll_fn(|cx| {
        match std::panic::catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(cx))) {
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(panic) => Poll::Ready(Err(panic)),
        }
    })
    .await
}

/// Claims the key, calls the inner service and records its response. A
/// response that streams is sent on `head` as soon as its head is known, and
/// its end (and trailers) only once its outcome is recorded.
async fn guarded<S, B, RB>(
    config: Arc<Config>,
    mut inner: S,
    request: Request<B>,
    key: Key,
    fingerprint: Fingerprint,
    head: oneshot::Sender<Response<ResponseBody<RB>>>,
) -> Result<Answer, Failure<S::Error, RB>>
where
    S: Service<Request<B>, Response = Response<RB>>,
    RB: Body,
    RB::Error: Into<BoxError>,
{
    let mut held = None;
    let body = async {
        // `call` itself runs inside the catch too: a service may panic
        // before its future exists.
        let response = match catching(async { inner.call(request).await }).await {
            Ok(response) => response.map_err(Failure::Inner)?,
            Err(panic) => return Err(Failure::Panicked(panic)),
        };
        if !(config.store_status)(response.status()) || !config.stores_grpc(response.headers()) {
            return Err(Failure::Passthrough(response));
        }
        let (parts, body) = response.into_parts();
        let relay = Relay::new(&config, &parts);
        relay.run(&config, parts, body, head, &mut held).await
    };
    let outcome = config
        .idem
        .execute(
            &config.settings,
            Operation::from(Arc::clone(&config.name)),
            key,
            fingerprint,
            body,
            HttpCodec,
        )
        .await;
    // The streamed response ends once its outcome is recorded, so that a
    // retry after it finds the record.
    if let Some(Held { sender, last }) = held {
        if let Some(last) = last {
            let _ = sender.send(last).await;
        }
        drop(sender);
    }
    outcome
}

/// The end of a streamed response, held back until its outcome is recorded:
/// the sender (the stream ends when it is dropped) and the last frame to
/// send (its trailers, or the error it failed with).
struct Held {
    sender: FrameSender,
    last: Option<Result<Frame<Bytes>, BoxError>>,
}

/// The copy of a response body the layer keeps while it sends it on.
struct Relay {
    /// The stored response's headers.
    headers: Vec<(HeaderName, HeaderValue)>,
    status: StatusCode,
    /// The body copied so far; `None` once it is over the cap.
    data: Option<BytesMut>,
    /// Whether the response is sent whole once read (its length is known and
    /// under the cap) rather than streamed as it comes.
    whole: bool,
}

impl Relay {
    fn new(config: &Config, parts: &http::response::Parts) -> Self {
        let headers = config
            .replay_headers
            .iter()
            .flat_map(|name| {
                parts
                    .headers
                    .get_all(name)
                    .iter()
                    .map(move |value| (name.clone(), value.clone()))
            })
            .collect();
        let max = config.max_response as u64;
        let declared = declared_length(&parts.headers);
        Self {
            headers,
            status: parts.status,
            data: declared
                .is_none_or(|length| length <= max)
                .then(BytesMut::new),
            whole: false,
        }
    }

    /// Reads the body to its end: a body whose length is known and under
    /// the cap is read whole and answered with its record; any other is
    /// streamed to the client (through `head`) while a copy of at most the
    /// cap is kept.
    async fn run<E, RB>(
        mut self,
        config: &Config,
        parts: http::response::Parts,
        body: RB,
        head: oneshot::Sender<Response<ResponseBody<RB>>>,
        held: &mut Option<Held>,
    ) -> Result<Answer, Failure<E, RB>>
    where
        RB: Body,
        RB::Error: Into<BoxError>,
    {
        let mut body = Box::pin(body);
        let max = config.max_response;
        self.whole = self.data.is_some()
            && body
                .size_hint()
                .exact()
                .is_some_and(|length| length <= max as u64);
        let mut parts = Some(parts);
        let mut head = Some(head);
        let mut sender: Option<FrameSender> = None;
        if !self.whole {
            sender = self
                .start(config, &mut parts, &mut head, Bytes::new())
                .await;
        }
        let mut trailers = None;
        let mut failed = None;
        let mut sent = 0usize;
        loop {
            let next = std::future::poll_fn(|cx| {
                let frame = body.as_mut().poll_frame(cx);
                frame.map(|frame| frame.map(|frame| frame.map_err(Into::into)))
            });
            let frame = catching(next).await;
            let frame = match frame {
                Ok(Some(Ok(frame))) => frame,
                Ok(None) => break,
                Ok(Some(Err(error))) => {
                    failed = Some(error);
                    break;
                }
                Err(_) => {
                    failed = Some(BoxError::from("the response body panicked"));
                    break;
                }
            };
            let frame = match frame.into_data() {
                Ok(mut data) => {
                    let data = data.copy_to_bytes(data.remaining());
                    sent += data.len();
                    if let Some(copy) = &mut self.data {
                        if copy.len() + data.len() <= max {
                            copy.extend_from_slice(&data);
                        } else if self.whole {
                            // Longer than it said: streamed from here on.
                            self.whole = false;
                            let so_far = std::mem::take(copy).freeze();
                            sender = self.start(config, &mut parts, &mut head, so_far).await;
                            self.data = None;
                        } else {
                            self.data = None;
                        }
                    }
                    Frame::data(data)
                }
                Err(frame) => match frame.into_trailers() {
                    Ok(map) => {
                        trailers = Some(map);
                        continue;
                    }
                    Err(_) => continue,
                },
            };
            if let Some(to) = &sender {
                // A client that hung up no longer reads: the copy goes on.
                if to.send(Ok(frame)).await.is_err() {
                    sender = None;
                }
            }
        }
        let failure = failed.is_none() && trailers.as_ref().is_some_and(|t| !config.stores_grpc(t));
        if failure {
            // A gRPC failure, like a 5xx: the key is released.
            return Err(match (parts, head, sender) {
                (Some(parts), Some(_), None) => {
                    let data = self.data.map(BytesMut::freeze).unwrap_or_default();
                    Failure::Unstored(parts, data, trailers)
                }
                (_, _, sender) => {
                    if let Some(to) = sender {
                        *held = Some(Held {
                            sender: to,
                            last: trailers.map(|t| Ok(Frame::trailers(t))),
                        });
                    }
                    Failure::Streamed
                }
            });
        }
        let record = match (failed, self.data) {
            (Some(error), _) => {
                tracing::error!(%error, status = %self.status, "an idempotent response's body failed after {sent} bytes; retries are told it cannot be replayed");
                if let Some(to) = sender.take() {
                    *held = Some(Held {
                        sender: to,
                        last: Some(Err(error)),
                    });
                }
                // A body read whole (its length known and under the cap)
                // had sent the client nothing when it failed.
                Err(if self.whole {
                    format!("its response body failed after {sent} bytes, before any was sent")
                } else {
                    format!("its response body failed after {sent} bytes had been sent")
                })
            }
            (None, None) => {
                tracing::warn!(status = %self.status, "an idempotent response is larger than max_response_bytes ({max}); retries are told it cannot be replayed");
                Err(format!(
                    "its response is larger than the {max} bytes a stored response may have"
                ))
            }
            (None, Some(data)) => Ok(StoredResponse {
                status: self.status,
                headers: self.headers,
                body: data.freeze(),
                trailers: trailers.clone(),
            }),
        };
        if let Some(to) = sender {
            *held = Some(Held {
                sender: to,
                last: trailers.map(|t| Ok(Frame::trailers(t))),
            });
        }
        Ok(Answer {
            first: match parts {
                Some(parts) if head.is_some() => First::Whole(parts),
                _ => First::Streamed,
            },
            record,
        })
    }

    /// Sends the response's head to its client with a body streamed from the
    /// returned sender, which `so_far` starts. `None` once the client is gone.
    async fn start<RB>(
        &self,
        config: &Config,
        parts: &mut Option<http::response::Parts>,
        head: &mut Option<oneshot::Sender<Response<ResponseBody<RB>>>>,
        so_far: Bytes,
    ) -> Option<FrameSender> {
        let (Some(parts), Some(head)) = (parts.take(), head.take()) else {
            return None;
        };
        let (sender, body) = ResponseBody::stream();
        let mut response = Response::from_parts(parts, body);
        // Its head goes to its client from here, not through `respond`: it
        // is guarded, and says so too.
        config.retention(response.headers_mut());
        head.send(response).ok()?;
        if !so_far.is_empty() {
            sender.send(Ok(Frame::data(so_far))).await.ok()?;
        }
        Some(sender)
    }
}

/// Cannot happen: a streamed response reached its client before its call
/// ended, and is taken first. An empty answer, should it ever be asked for.
fn streamed_already<RB>() -> Response<ResponseBody<RB>> {
    let mut response = Response::new(ResponseBody::from(Bytes::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    response
}

/// A response of a body held whole, and its trailers. With trailers, the
/// body is sent without a `Content-Length` and a `Trailer` header names
/// them (when the response has none): an HTTP/1.1 server sends only the
/// trailers so declared, and only in a chunked body. (`Trailer` is never
/// stored, as it is one connection's; this one is made anew.)
fn whole<RB>(
    mut parts: http::response::Parts,
    body: Bytes,
    trailers: Option<HeaderMap>,
) -> Response<ResponseBody<RB>> {
    if let Some(trailers) = trailers.as_ref().filter(|t| !t.is_empty()) {
        // A handler's own length would have the body sent without them.
        parts.headers.remove(CONTENT_LENGTH);
        if !parts.headers.contains_key(TRAILER) {
            let names: Vec<&str> = trailers.keys().map(HeaderName::as_str).collect();
            if let Ok(declared) = HeaderValue::from_str(&names.join(", ")) {
                parts.headers.insert(TRAILER, declared);
            }
        }
    }
    Response::from_parts(parts, ResponseBody::full(body, trailers))
}

/// The response of a recorded or replayed answer.
fn respond<RB>(config: &Config, answer: Answer) -> Response<ResponseBody<RB>> {
    let Answer { record, first } = answer;
    let mut response = match (record, first) {
        (Ok(stored), First::Whole(parts)) => whole(parts, stored.body, stored.trailers),
        (Ok(stored), First::Replay) => {
            let (mut parts, ()) = Response::new(()).into_parts();
            parts.status = stored.status;
            for (name, value) in stored.headers {
                parts.headers.append(name, value);
            }
            parts
                .headers
                .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
            whole(parts, stored.body, stored.trailers)
        }
        (_, First::Streamed) => return streamed_already(),
        // A whole body that failed while it was read: its client is told as
        // its retries will be.
        (Err(reason), _) => {
            return config.problem(&unreplayable_problem(&Error::NotReplayable { reason }));
        }
    };
    config.retention(response.headers_mut());
    response
}

#[cfg(test)]
mod tests {
    use http_body_util::Full;

    use super::*;

    #[test]
    fn a_whole_body_with_trailers_is_sent_chunked_and_names_them() {
        use http_body::Body as _;
        let parts = || {
            let mut response = Response::new(());
            response
                .headers_mut()
                .insert(CONTENT_LENGTH, HeaderValue::from_static("3"));
            response.into_parts().0
        };
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        trailers.append("x-note", HeaderValue::from_static("a"));
        trailers.append("x-note", HeaderValue::from_static("b"));
        let body = Bytes::from_static(b"abc");
        let sent: Response<ResponseBody<Full<Bytes>>> =
            whole(parts(), body.clone(), Some(trailers.clone()));
        assert!(!sent.headers().contains_key(CONTENT_LENGTH));
        assert_eq!(sent.headers()[TRAILER], "grpc-status, x-note");
        assert_eq!(sent.body().size_hint().exact(), None);
        // A handler's own declaration is kept.
        let mut declared = parts();
        declared
            .headers
            .insert(TRAILER, HeaderValue::from_static("grpc-status"));
        let sent: Response<ResponseBody<Full<Bytes>>> =
            whole(declared, body.clone(), Some(trailers));
        assert_eq!(sent.headers()[TRAILER], "grpc-status");
        // Without trailers: as it was, of exact size.
        for none in [None, Some(HeaderMap::new())] {
            let sent: Response<ResponseBody<Full<Bytes>>> = whole(parts(), body.clone(), none);
            assert_eq!(sent.headers()[CONTENT_LENGTH], "3");
            assert!(!sent.headers().contains_key(TRAILER));
        }
    }

    #[test]
    fn the_default_policy_stores_final_answers_only() {
        for stored in [
            200, 201, 204, 301, 302, 303, 307, 308, 400, 402, 404, 410, 422,
        ] {
            assert!(
                default_store_status(StatusCode::from_u16(stored).unwrap()),
                "{stored}"
            );
        }
        for not in [
            100, 304, 401, 403, 405, 407, 408, 409, 425, 429, 500, 502, 503, 504,
        ] {
            assert!(
                !default_store_status(StatusCode::from_u16(not).unwrap()),
                "{not}"
            );
        }
    }

    /// A service that panics in `call` itself, before its future exists,
    /// on its first request.
    #[derive(Clone, Default)]
    struct PanicsFirst(Arc<std::sync::atomic::AtomicU32>);

    impl Service<Request<Full<Bytes>>> for PanicsFirst {
        type Response = Response<Full<Bytes>>;
        type Error = std::convert::Infallible;
        type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Request<Full<Bytes>>) -> Self::Future {
            let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            assert!(n > 1, "the service panics in call");
            let mut response = Response::new(Full::new(Bytes::from(n.to_string())));
            *response.status_mut() = StatusCode::CREATED;
            std::future::ready(Ok(response))
        }
    }

    #[tokio::test]
    async fn a_service_that_panics_in_call_frees_its_key() {
        let settings = Settings::builder()
            .on_conflict(crate::OnConflict::Reject)
            .build()
            .unwrap();
        let layer = IdempotencyLayer::unscoped(Idempotency::memory()).settings(settings);
        let service = layer.layer(PanicsFirst::default());
        let request = || {
            Request::post("/charge")
                .header("idempotency-key", "k1")
                .body(Full::new(Bytes::new()))
                .unwrap()
        };
        let first = tokio::spawn(service.clone().call(request())).await;
        assert!(first.unwrap_err().is_panic(), "the panic goes on");
        let retry = service.clone().call(request()).await.unwrap();
        assert_eq!(
            retry.status(),
            StatusCode::CREATED,
            "not 409: the key is free"
        );
        let body = retry.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "2");
    }

    /// A service that answers its call number once `gate` gives a permit.
    #[derive(Clone)]
    struct Gated {
        gate: Arc<tokio::sync::Semaphore>,
        calls: Arc<std::sync::atomic::AtomicU32>,
    }

    impl Service<Request<Full<Bytes>>> for Gated {
        type Response = Response<Full<Bytes>>;
        type Error = std::convert::Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Request<Full<Bytes>>) -> Self::Future {
            let n = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            let gate = Arc::clone(&self.gate);
            Box::pin(async move {
                let _permit = gate.acquire().await;
                Ok(Response::new(Full::new(Bytes::from(n.to_string()))))
            })
        }
    }

    #[tokio::test]
    async fn a_request_dropped_mid_call_leaves_its_call_to_end_and_record() {
        let inner = Gated {
            gate: Arc::new(tokio::sync::Semaphore::new(0)),
            calls: Arc::default(),
        };
        let service = IdempotencyLayer::unscoped(Idempotency::memory()).layer(inner.clone());
        let request = || {
            Request::post("/charge")
                .header("idempotency-key", "\"k1\"")
                .body(Full::new(Bytes::new()))
                .unwrap()
        };
        // The client hangs up while the call waits in the service.
        let mut first = Box::pin(service.clone().call(request()));
        let hung_up = tokio::time::timeout(std::time::Duration::from_millis(50), &mut first).await;
        assert!(hung_up.is_err(), "the call is under way");
        drop(first);
        inner.gate.add_permits(8);
        let retry = service.clone().call(request()).await.unwrap();
        assert_eq!(retry.headers()[IDEMPOTENT_REPLAYED], "true");
        let body = retry.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            body, "1",
            "the first call's response, recorded after the hang-up"
        );
        assert_eq!(inner.calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    /// An axum route that counts its runs in `runs` and answers `answer`.
    fn counted(answer: &'static str, runs: &Arc<std::sync::atomic::AtomicU32>) -> axum::Router {
        let runs = Arc::clone(runs);
        axum::Router::new().route(
            "/create",
            axum::routing::post(move || {
                runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async move { answer }
            }),
        )
    }

    async fn post(app: &axum::Router, path: &str) -> (StatusCode, Option<HeaderValue>, Bytes) {
        let request = Request::post(path)
            .header("idempotency-key", "k1")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = app.clone().call(request).await.unwrap();
        let status = response.status();
        let replayed = response.headers().get(IDEMPOTENT_REPLAYED).cloned();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, replayed, body)
    }

    // Run with the `tower` feature alone as well (CI's feature matrix): the
    // path the client sent is read without the `axum` feature.
    #[tokio::test]
    async fn nested_routers_fingerprint_the_path_the_client_sent() {
        let layer = IdempotencyLayer::unscoped(Idempotency::memory());
        let (orders, refunds) = (Arc::default(), Arc::default());
        let app = axum::Router::new()
            .nest("/orders", counted("order", &orders).layer(layer.clone()))
            .nest("/refunds", counted("refund", &refunds).layer(layer));
        let (status, _, body) = post(&app, "/orders/create").await;
        assert_eq!((status, body.as_ref()), (StatusCode::OK, &b"order"[..]));
        let (status, replayed, _) = post(&app, "/refunds/create").await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "another request");
        assert_eq!(replayed, None, "never the order's response");
        let ran = |runs: &Arc<std::sync::atomic::AtomicU32>| {
            runs.load(std::sync::atomic::Ordering::SeqCst)
        };
        assert_eq!((ran(&orders), ran(&refunds)), (1, 0));
    }

    #[tokio::test]
    async fn a_layer_on_a_nested_router_and_its_app_guards_once() {
        let idem = Idempotency::memory();
        let layer = IdempotencyLayer::unscoped(idem.clone());
        let runs = Arc::default();
        let app = axum::Router::new()
            .nest("/orders", counted("order", &runs).layer(layer.clone()))
            .layer(layer);
        let (status, replayed, body) = post(&app, "/orders/create").await;
        assert_eq!(
            (status, replayed, body.as_ref()),
            (StatusCode::OK, None, &b"order"[..])
        );
        let (status, replayed, body) = post(&app, "/orders/create").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            replayed.as_ref().map(HeaderValue::as_bytes),
            Some(&b"true"[..])
        );
        assert_eq!(body.as_ref(), b"order");
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
        // A layer of another name guards the request under a key of its
        // own, inside the first.
        let named = IdempotencyLayer::unscoped(idem.clone()).name("orders");
        let runs = Arc::default();
        let app = axum::Router::new()
            .nest("/orders", counted("order", &runs).layer(named))
            .layer(IdempotencyLayer::unscoped(idem.clone()).name("outer"));
        post(&app, "/orders/create").await;
        post(&app, "/orders/create").await;
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
        for name in ["orders", "outer"] {
            let key = Key::new(name, "k1").unwrap();
            assert!(
                matches!(
                    idem.inspect(key).await.unwrap(),
                    crate::Inspection::Completed { .. }
                ),
                "{name}"
            );
        }
        // An inner layer on another handle (a store shared by replicas,
        // inside a layer on each replica's own) guards the request in its
        // store too.
        let shared = Idempotency::memory();
        let own = Idempotency::memory();
        let runs = Arc::default();
        let app = axum::Router::new()
            .nest(
                "/orders",
                counted("order", &runs).layer(IdempotencyLayer::unscoped(shared.clone())),
            )
            .layer(IdempotencyLayer::unscoped(own.clone()));
        let (status, _, body) = post(&app, "/orders/create").await;
        assert_eq!((status, body.as_ref()), (StatusCode::OK, &b"order"[..]));
        assert!(matches!(
            shared
                .inspect(Key::new("http", "k1").unwrap())
                .await
                .unwrap(),
            crate::Inspection::Completed { .. }
        ));
        let replica = axum::Router::new()
            .nest(
                "/orders",
                counted("order", &runs).layer(IdempotencyLayer::unscoped(shared)),
            )
            .layer(IdempotencyLayer::unscoped(Idempotency::memory()));
        let (_, replayed, _) = post(&replica, "/orders/create").await;
        assert!(replayed.is_some(), "the shared store replays");
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn the_default_grpc_policy_stores_final_answers_only() {
        for stored in [0, 3, 5, 6, 9, 11] {
            assert!(default_store_grpc_status(stored), "{stored}");
        }
        for not in [1, 2, 4, 7, 8, 10, 12, 13, 14, 15, 16, 17] {
            assert!(!default_store_grpc_status(not), "{not}");
        }
    }

    #[test]
    fn cookies_are_never_replayed_by_default() {
        assert!(!DEFAULT_REPLAY_HEADERS.contains(&http::header::SET_COOKIE));
        assert!(DEFAULT_REPLAY_HEADERS.contains(&http::header::CONTENT_TYPE));
        assert!(DEFAULT_REPLAY_HEADERS.contains(&http::header::CONTENT_ENCODING));
        let layer = IdempotencyLayer::unscoped(Idempotency::memory()).replay_headers([
            http::header::SET_COOKIE,
            http::header::TRANSFER_ENCODING,
            http::header::ETAG,
        ]);
        assert_eq!(layer.config.replay_headers, [http::header::ETAG]);
    }
}
