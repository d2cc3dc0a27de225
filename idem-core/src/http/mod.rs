//! HTTP (feature `tower`; `axum` adds the extractor and responses):
//! idempotent endpoints after
//! [draft-ietf-httpapi-idempotency-key-header](https://datatracker.ietf.org/doc/draft-ietf-httpapi-idempotency-key-header/)
//! and Stripe's API.
//!
//! - [`IdempotencyLayer`] makes any tower HTTP service idempotent: put it in
//!   front of the routes and every `POST` and `PATCH` runs once per key,
//!   replaying the stored response to retries.
//! - For handlers that call `#[idempotent]` functions themselves (feature
//!   `axum`): [`IdempotencyKey`] extracts the header, [`Error`](crate::Error)
//!   is a problem response, and [`Replayable`](crate::Replayable) marks
//!   replays. Both paths answer with the same problem responses.
//!
//! ```
//! use axum::{Router, routing::post};
//! use idem_core::http::IdempotencyLayer;
//! use idem_core::{Idempotency, Settings};
//! # use std::time::Duration;
//!
//! let idem = Idempotency::memory(); // once, at start-up; a Redis or PostgreSQL store in production
//! let app: Router = Router::new()
//!     .route("/payments", post(|| async { (axum::http::StatusCode::CREATED, "charged") }))
//!     .layer(
//!         IdempotencyLayer::scoped_by(idem, |request| {
//!             request.headers.get("x-api-key")?.to_str().ok().map(str::to_owned)
//!         })
//!         .settings(Settings::builder().ttl(Duration::from_secs(24 * 3600)).build().unwrap()),
//!     );
//! ```
//!
//! # The draft's requirements, and what the layer does
//!
//! | draft | requirement | the layer |
//! |---|---|---|
//! | MUST | the key is an `Idempotency-Key` header, a structured-field string | parsed as one (a bare token is accepted too); 1–255 characters |
//! | SHOULD | the server documents which resources need a key | [`methods`](IdempotencyLayer::methods), [`routes`](IdempotencyLayer::routes); `POST` and `PATCH` by default |
//! | MUST | a missing key where one is required is a `400` | `400`, [`#missing-key`](#missing-key) |
//! | — | a malformed or repeated key | `400`, [`#invalid-key`](#invalid-key) |
//! | SHOULD | the server publishes an expiry policy | records are kept for the TTL, sent in `Idempotency-Retention` (whole seconds, rounded down) on every guarded response |
//! | MAY | a fingerprint of the request | method, the path the client sent, the query as form pairs, chosen headers and body (SHA-256) |
//! | MUST | a key reused with another request is a `422` | `422`, [`#key-reused`](#key-reused) |
//! | MUST | a request while the first is in progress is a `409` | with `on_conflict = reject`: `409` with `Retry-After`, [`#in-progress`](#in-progress); by default it waits for the first's response |
//! | SHOULD | the error responses are problem details (RFC 9457) with a documentation link | `application/problem+json` with a `type` under these docs and `Link: <…>; rel="describedby"` |
//! | — | a retry gets the first response | status, the [replayed headers](IdempotencyLayer::replay_headers), the body byte for byte and the trailers, with `Idempotent-Replayed: true` |
//!
//! Keys are scoped per client by the function given to
//! [`IdempotencyLayer::scoped_by`], so that two clients that pick the same
//! key never share a record; [`IdempotencyLayer::unscoped`] is the explicit
//! opt-out. A replay is answered before the inner service runs: put the
//! layer behind authentication and scope by the principal it found
//! ([where it sits](IdempotencyLayer#where-it-sits)).
//!
//! # Which responses are stored
//!
//! By [`default_store_status`]: 2xx, 3xx (but `304`) and 4xx responses are
//! stored and replayed, except `401`, `403`, `405`, `407`, `408`, `409`,
//! `425` and `429`; 5xx are not, so a retry runs again (the attribute stores
//! `Ok` results and only the errors that `cache_errors` deems final, alike).
//! A response the layer cannot replay — larger than
//! [`max_response_bytes`](IdempotencyLayer::max_response_bytes), or whose
//! body failed midway — is recorded as run: its retries get
//! [`#unreplayable`](#unreplayable), never a second run.
//!
//! # The fingerprint
//!
//! Two requests under one key are the same request when their method, path
//! (as the client sent it, before any router stripped a prefix), query,
//! [`fingerprint_headers`](IdempotencyLayer::fingerprint_headers) and body
//! are. The query is compared as `name=value` pairs, percent-decoded with
//! `+` as a space, in the order of their names: `?a=1&b=2` and `?b=2&a=1`
//! are one request, as are `?q=a+b` and `?q=a%20b`; `?tag=x&tag=y` and
//! `?tag=y&tag=x` are two, since the order of a repeated name can matter.
//!
//! # gRPC
//!
//! Trailers (gRPC's `grpc-status` and `grpc-message`) pass through, are
//! stored and are replayed. Over HTTP/1.1, hyper sends them in a chunked
//! body to clients that ask with `TE: trailers`, and only those a
//! `Trailer` header names: a response streamed through the layer the first
//! time needs the handler's own `Trailer` header; a replay, and a response
//! the layer read whole, name the trailers they carry. A gRPC method is guarded like any `POST`, and
//! its outcome is judged by its `grpc-status` (in the trailers, or the
//! headers of a trailers-only answer) as well as its HTTP status: by
//! [`default_store_grpc_status`], `UNAVAILABLE`, `INTERNAL` and the other
//! failures release the key like a 5xx. A unary call runs once per key; a
//! streaming
//! response is copied up to the cap like any other, and a request stream is
//! read whole (up to `max_body_bytes`) before the method runs, so
//! client-streaming and bidirectional methods are left out with
//! [`routes`](IdempotencyLayer::routes).
//!
//! # Problems
//!
//! The problem responses' `type`s point here.
//!
//! ## missing-key
//! `400`: the request must carry an `Idempotency-Key` header. Send a fresh
//! UUID per operation, and the same one on every retry of it.
//!
//! ## invalid-key
//! `400`: the `Idempotency-Key` header is empty, longer than 255 characters,
//! malformed, or given twice.
//!
//! ## missing-scope
//! `400`: nothing in the request identifies its client (such as
//! credentials), so its key cannot be kept apart from other clients'.
//!
//! ## unreadable-body
//! `400`: the request's body could not be read.
//!
//! ## payload-too-large
//! `413`: the body is larger than an idempotent request may be.
//!
//! ## key-reused
//! `422`: the key was used before with a different request (method, path,
//! query or body). Send the original request again, or use a new key.
//!
//! ## in-progress
//! `409`: a request with this key is still running. Retry after
//! `Retry-After` seconds, with the same key.
//!
//! ## attempt-failed
//! `503`: the request this one waited for failed (an error status, a
//! panic) and stored nothing, or this request's own attempt lost its claim
//! on the key before it finished (its lease lapsed and another attempt took
//! the key over). Retry with the same key: it runs again, or gets the
//! response of the attempt that finished it.
//!
//! ## store-unavailable
//! `503`: the idempotency store could not be reached, so the request was not
//! processed. Retry later with the same key.
//!
//! ## unreplayable
//! `500`: the request with this key was processed, but its response cannot
//! be replayed: it was larger than the server stores, its body failed while
//! it was sent, or its stored form can no longer be read. It is not
//! processed again under this key; check its outcome another way (e.g. list
//! the resources it creates) before sending it with a new key.
//!
//! ## internal-error
//! `500`: the server's idempotency handling failed in a way a retry does
//! not fix by itself: its settings, or its code's use of idem (a call that
//! re-enters its own key, a step name used twice, a key or argument that
//! does not serialize). The server logs which.
//! Like any `500`, the request may have been partly processed; retrying it
//! with the same key is safe, as its outcome, once there is one, is
//! replayed.

#[cfg(feature = "axum")]
mod axum;
mod body;
mod fingerprint;
mod key;
mod layer;
mod problem;
mod stored;

pub use body::ResponseBody;
#[cfg(feature = "client")]
pub(crate) use key::sf_string_header;
pub use key::{IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED, IdempotencyKey, MAX_KEY_LEN};
pub use layer::{
    DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_RESPONSE_BYTES, DEFAULT_REPLAY_HEADERS,
    IDEMPOTENCY_RETENTION, IdempotencyLayer, IdempotencyService, NEVER_REPLAYED,
    default_store_grpc_status, default_store_status,
};
pub use problem::DEFAULT_DOCS;
