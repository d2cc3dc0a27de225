//! [`IdempotencyLayer`]: makes a tower HTTP service idempotent, as the IETF
//! Idempotency-Key draft and Stripe's API specify.

use crate::observe::Operation;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, HeaderName};
use http::request::Parts;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::BodyExt as _;
use serde::ser::{Serialize, SerializeTuple as _, Serializer};
use tower_layer::Layer;
use tower_service::Service;

use super::key::{IDEMPOTENT_REPLAYED, IdempotencyKey};
use super::problem::{DEFAULT_DOCS, Kind, Problem};
use super::stored::StoredResponse;
use crate::codec::ResultCodec;
use crate::error::Error;
use crate::handle::Idempotency;
use crate::key::{Fingerprint, Key};
use crate::settings::Settings;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type ScopeFn = Arc<dyn Fn(&Parts) -> Option<String> + Send + Sync>;
type RouteFn = Arc<dyn Fn(&Parts) -> bool + Send + Sync>;

/// The default cap on a request body the layer reads: 1 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1 << 20;

/// The default cap on a response the layer stores: 1 MiB.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 1 << 20;

/// The response header that says how long a key is honoured, in seconds:
/// the TTL of the records the layer stores.
pub const IDEMPOTENCY_RETENTION: HeaderName = HeaderName::from_static("idempotency-retention");

/// The response headers replayed by default. `Set-Cookie` is never among
/// them: a replay must not hand a session to whoever retries.
pub const DEFAULT_REPLAY_HEADERS: &[HeaderName] = &[
    http::header::CONTENT_TYPE,
    http::header::CONTENT_LANGUAGE,
    http::header::CONTENT_LOCATION,
    http::header::LOCATION,
    http::header::ETAG,
    http::header::LAST_MODIFIED,
    http::header::LINK,
];

/// The default status policy: 2xx and 4xx responses are stored and replayed,
/// except 408, 409, 425 and 429 (the request may succeed later); 1xx, 3xx and
/// 5xx are not (a retry runs again). It mirrors the attribute, where an `Ok`
/// is stored and only errors that `cache_errors` deems final are.
#[must_use]
pub fn default_store_status(status: StatusCode) -> bool {
    (status.is_success() || status.is_client_error())
        && !matches!(status.as_u16(), 408 | 409 | 425 | 429)
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
/// 3. the request is fingerprinted (method, path, query, the chosen headers
///    and the body, up to a cap: `413` beyond it); a key reused with another
///    request is a `422`;
/// 4. the inner service runs once per key; its response (status, the
///    replayed headers, the body) is stored for the TTL when the status policy
///    says so, and replayed byte for byte, with `Idempotent-Replayed: true`;
/// 5. a duplicate of a request in progress waits for its response, or with
///    [`OnConflict::Reject`](crate::OnConflict::Reject) gets `409` with
///    `Retry-After`;
/// 6. a store that is down is a `503`: nothing runs unguarded.
///
/// The inner call runs on a task of its own: once it started, its response
/// is recorded even if the client hangs up, so the client's retry replays it
/// instead of waiting out a lease and running it again.
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
/// Request and response bodies keep their types: the layer needs only that
/// each can be made from [`Bytes`] (axum's `Body` and `Full<Bytes>` can).
/// Guarded requests and stored responses are buffered, up to their caps.
#[derive(Clone)]
pub struct IdempotencyLayer {
    config: Arc<Config>,
}

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
    settings: Settings,
    docs: String,
}

impl IdempotencyLayer {
    /// A layer on the handle `idem` whose keys are scoped by `scope`: a
    /// function of the request's parts that names its client (an API key, an
    /// authenticated principal in the extensions). A guarded request with no
    /// scope (`None`) is refused with a `400`.
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
                settings: Settings::DEFAULT,
                docs: DEFAULT_DOCS.to_owned(),
            }),
        }
    }

    fn with(mut self, change: impl FnOnce(&mut Config)) -> Self {
        match Arc::get_mut(&mut self.config) {
            Some(config) => change(config),
            None => unreachable!("a layer is configured before it is cloned"),
        }
        self
    }

    /// The operation name the keys are hashed with. Default `"http"`; give
    /// two APIs on one store names of their own.
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
    /// unguarded, instead of refusing them with a `400`.
    #[must_use]
    pub fn key_optional(self) -> Self {
        self.with(|c| c.key_required = false)
    }

    /// Request headers that take part in the fingerprint, beside the method,
    /// path, query and body. Default none.
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

    /// The largest response body the layer stores. A larger response is
    /// returned to its client but not stored: its claim is released and a
    /// retry runs again. Default [`DEFAULT_MAX_RESPONSE_BYTES`].
    #[must_use]
    pub fn max_response_bytes(self, bytes: usize) -> Self {
        self.with(|c| c.max_response = bytes)
    }

    /// The response headers stored and replayed. Default
    /// [`DEFAULT_REPLAY_HEADERS`]; the first response always carries all of
    /// its headers.
    #[must_use]
    pub fn replay_headers(self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        let names = names.into_iter().collect();
        self.with(|c| c.replay_headers = names)
    }

    /// Which statuses are stored and replayed; the others release the key so
    /// that a retry runs again. Default [`default_store_status`].
    #[must_use]
    pub fn store_status(self, policy: fn(StatusCode) -> bool) -> Self {
        self.with(|c| c.store_status = policy)
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
    fn guards(&self, parts: &Parts) -> bool {
        self.methods.contains(&parts.method) && self.routes.as_ref().is_none_or(|r| r(parts))
    }

    fn problem<B: From<Bytes>>(&self, problem: &Problem) -> Response<B> {
        problem.response(&self.docs)
    }
}

/// Why an inner call's response is not stored, or how it failed.
enum Failure<E, RB> {
    /// idem refused or failed.
    Idem(Error),
    /// The response is returned as it came, unread: its status is not one
    /// that is stored, or it is declared larger than the cap.
    Passthrough(Response<RB>),
    /// The response was read, but is larger than the cap.
    Unstored(http::response::Parts, Bytes),
    /// The inner service failed.
    Inner(E),
    /// The response body could not be read.
    Body(BoxError),
}

/// The first response, whole, and its stored form.
struct Answer {
    stored: StoredResponse,
    /// The first response's own parts (all its headers); `None` on a replay.
    parts: Option<http::response::Parts>,
}

/// How the layer's results go to the store and back.
struct HttpCodec;

impl<E, RB> ResultCodec<Answer, Failure<E, RB>> for HttpCodec {
    fn encode_ok(&self, value: &Answer) -> serde_json::Result<Vec<u8>> {
        Ok(value.stored.encode())
    }

    fn decode_ok(&self, bytes: &[u8]) -> serde_json::Result<Answer> {
        let stored = StoredResponse::decode(bytes).ok_or_else(|| {
            <serde_json::Error as serde::de::Error>::custom("not a stored HTTP response")
        })?;
        Ok(Answer {
            stored,
            parts: None,
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

/// The parts of a request that its fingerprint is made of.
struct Print<'a> {
    method: &'a str,
    path: &'a str,
    query: &'a str,
    headers: Vec<(&'a str, &'a [u8])>,
    body: &'a [u8],
}

/// Bytes, serialized as bytes (one tag and length), not as a sequence.
struct Raw<'a>(&'a [u8]);

impl Serialize for Raw<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.0)
    }
}

impl Serialize for Print<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut tuple = serializer.serialize_tuple(5)?;
        tuple.serialize_element(self.method)?;
        tuple.serialize_element(self.path)?;
        tuple.serialize_element(self.query)?;
        let headers: Vec<(&str, Raw<'_>)> = self
            .headers
            .iter()
            .map(|(name, value)| (*name, Raw(value)))
            .collect();
        tuple.serialize_element(&headers)?;
        tuple.serialize_element(&Raw(self.body))?;
        tuple.end()
    }
}

fn fingerprint(parts: &Parts, names: &[HeaderName], body: &[u8]) -> Result<Fingerprint, Error> {
    let headers = names
        .iter()
        .flat_map(|name| {
            parts
                .headers
                .get_all(name)
                .iter()
                .map(move |value| (name.as_str(), value.as_bytes()))
        })
        .collect();
    Fingerprint::of(&Print {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query().unwrap_or(""),
        headers,
        body,
    })
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

fn declared_length(headers: &http::HeaderMap) -> Option<usize> {
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
    RB: Body + From<Bytes> + Send + 'static,
    RB::Data: Send,
    RB::Error: Into<BoxError>,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<RB>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // The ready service handles this request; a clone takes its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let config = Arc::clone(&self.config);
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            if !config.guards(&parts) {
                return inner.call(Request::from_parts(parts, body)).await;
            }
            let key = match IdempotencyKey::from_headers(&parts.headers) {
                Ok(Some(key)) => key,
                Ok(None) if !config.key_required => {
                    return inner.call(Request::from_parts(parts, body)).await;
                }
                Ok(None) => {
                    let detail = format!(
                        "{} {} needs an Idempotency-Key header: a fresh UUID per operation, \
                         sent again on every retry of it",
                        parts.method,
                        parts.uri.path()
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
            let request = Request::from_parts(parts, B::from(body));
            // On a task of its own: a client that hangs up drops this future,
            // not the call, which goes on and records its response.
            let task = tokio::spawn(guarded(
                Arc::clone(&config),
                inner,
                request,
                key,
                fingerprint,
            ));
            let outcome = match task.await {
                Ok(outcome) => outcome,
                Err(join) => match join.try_into_panic() {
                    Ok(panic) => std::panic::resume_unwind(panic),
                    Err(_) => Err(Failure::Idem(Error::AttemptFailed)),
                },
            };
            Ok(match outcome {
                Ok(answer) => respond(&config, answer),
                Err(Failure::Idem(error)) => config.problem(&Problem::of(&error)),
                Err(Failure::Passthrough(response)) => response,
                Err(Failure::Unstored(parts, body)) => Response::from_parts(parts, RB::from(body)),
                Err(Failure::Inner(error)) => return Err(error),
                Err(Failure::Body(error)) => {
                    tracing::error!(%error, "could not read an idempotent response's body");
                    config.problem(&Problem::new(
                        Kind::Unreplayable,
                        "The server could not complete its response.",
                    ))
                }
            })
        })
    }
}

/// Claims the key, calls the inner service and records its response.
async fn guarded<S, B, RB>(
    config: Arc<Config>,
    mut inner: S,
    request: Request<B>,
    key: Key,
    fingerprint: Fingerprint,
) -> Result<Answer, Failure<S::Error, RB>>
where
    S: Service<Request<B>, Response = Response<RB>>,
    RB: Body,
    RB::Error: Into<BoxError>,
{
    let body = async {
        let response = inner.call(request).await.map_err(Failure::Inner)?;
        let declared = declared_length(response.headers());
        if !(config.store_status)(response.status())
            || declared.is_some_and(|length| length > config.max_response)
        {
            return Err(Failure::Passthrough(response));
        }
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| Failure::Body(e.into()))?
            .to_bytes();
        if body.len() > config.max_response {
            return Err(Failure::Unstored(parts, body));
        }
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
        Ok(Answer {
            stored: StoredResponse {
                status: parts.status,
                headers,
                body,
            },
            parts: Some(parts),
        })
    };
    config
        .idem
        .execute(
            &config.settings,
            Operation::from(Arc::clone(&config.name)),
            key,
            fingerprint,
            body,
            HttpCodec,
        )
        .await
}

/// The response of a stored or replayed answer.
fn respond<RB: From<Bytes>>(config: &Config, answer: Answer) -> Response<RB> {
    let Answer { stored, parts } = answer;
    let mut response = match parts {
        Some(parts) => Response::from_parts(parts, RB::from(stored.body)),
        None => {
            let mut response = Response::new(RB::from(stored.body));
            *response.status_mut() = stored.status;
            let headers = response.headers_mut();
            for (name, value) in stored.headers {
                headers.append(name, value);
            }
            headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
            response
        }
    };
    response.headers_mut().insert(
        IDEMPOTENCY_RETENTION,
        HeaderValue::from(config.settings.ttl().as_secs()),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_policy_stores_final_answers_only() {
        for stored in [200, 201, 204, 400, 402, 404, 410, 422] {
            assert!(
                default_store_status(StatusCode::from_u16(stored).unwrap()),
                "{stored}"
            );
        }
        for not in [100, 301, 304, 408, 409, 425, 429, 500, 502, 503, 504] {
            assert!(
                !default_store_status(StatusCode::from_u16(not).unwrap()),
                "{not}"
            );
        }
    }

    #[test]
    fn cookies_are_never_replayed_by_default() {
        assert!(!DEFAULT_REPLAY_HEADERS.contains(&http::header::SET_COOKIE));
        assert!(DEFAULT_REPLAY_HEADERS.contains(&http::header::CONTENT_TYPE));
    }
}
