//! The function-level HTTP path: a request served by hyper in process, over
//! HTTP/1.1 or h2, to an axum handler that takes the key with the
//! `IdempotencyKey` extractor and calls the `#[idempotent]` method, itself
//! or on a task of its own (as the README advises, so that a client hanging
//! up does not cancel it).
//!
//! The client hangs up as clients do: over HTTP/1.1 its connection closes;
//! over h2 its stream is reset while the connection stays. A body's panic
//! unwinds through the handler into hyper, which breaks the connection (or
//! resets the stream): the caller's answer is `reset`, and only a panicking
//! body may cause one.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::routing::post;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use idem_core::http::IdempotencyKey;
use tokio::task::JoinSet;
use tracing::{Instrument as _, Span};

use super::http_edge::{read_answer, respond};
use super::run::{Arguments, Attributed, CallError, Ctx, Value};
use super::workload::CallPlan;

/// What the handler of one call knows.
struct Call {
    ctx: Arc<Ctx>,
    attributed: Attributed,
    plan: CallPlan,
    spawned: bool,
}

/// Runs hyper's tasks (an h2 connection's streams) in the call's span, so
/// that idem's outcome of the call is told there.
#[derive(Clone)]
struct InSpan(Span);

impl<F> hyper::rt::Executor<F> for InSpan
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        tokio::spawn(future.instrument(self.0.clone()));
    }
}

/// The handler: the key from the `Idempotency-Key` header, the arguments
/// from the JSON body, and the call's result as [`respond`] answers it.
async fn handle(
    State(call): State<Arc<Call>>,
    key: IdempotencyKey,
    Json(args): Json<Arguments>,
) -> Response<Full<Bytes>> {
    let Ok(key) = key.as_str().parse::<usize>() else {
        return respond(Err(CallError::Idem("other".to_owned())), false);
    };
    let result = if call.spawned {
        let task = {
            let call = Arc::clone(&call);
            async move { call.attributed.call(&call.ctx, key, &call.plan, args).await }
                .in_current_span()
        };
        match tokio::spawn(task).await {
            Ok(result) => result,
            Err(error) => match error.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(_) => Err(CallError::Idem("other".to_owned())),
            },
        }
    } else {
        call.attributed.call(&call.ctx, key, &call.plan, args).await
    };
    respond(result, false)
}

/// Makes `plan`'s call as a request to the handler, served over a
/// connection of its own (h2 or HTTP/1.1), and reads its answer back as the
/// other edges return it; a broken connection or reset stream is `reset`.
pub(crate) async fn call(
    ctx: &Arc<Ctx>,
    attributed: &Attributed,
    plan: &CallPlan,
    args: &Arguments,
    h2: bool,
    spawned: bool,
) -> Result<Value, CallError> {
    let router = axum::Router::new()
        .route("/orders", post(handle))
        .with_state(Arc::new(Call {
            ctx: Arc::clone(ctx),
            attributed: attributed.clone(),
            plan: plan.clone(),
            spawned,
        }));
    let (client, server) = tokio::io::duplex(64 * 1024);
    let (server, service) = (TokioIo::new(server), TowerToHyperService::new(router));
    let span = Span::current();
    if h2 {
        let serving = hyper::server::conn::http2::Builder::new(InSpan(span.clone()))
            .serve_connection(server, service);
        tokio::spawn(serving.instrument(span.clone()));
    } else {
        let serving = hyper::server::conn::http1::Builder::new().serve_connection(server, service);
        tokio::spawn(serving.instrument(span.clone()));
    }
    let request = Request::post("http://checker/orders")
        .header("idempotency-key", plan.key.to_string())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            serde_json::to_vec(args).expect("JSON arguments"),
        )))
        .expect("a request");
    let reset = |_: hyper::Error| CallError::Idem("reset".to_owned());
    // HTTP/1.1: the connection lives as long as the call, so that dropping
    // the call closes it. h2: it outlives the call, so that dropping the
    // call resets only its stream.
    let mut connection = JoinSet::new();
    let response = if h2 {
        let (mut sender, driver) =
            hyper::client::conn::http2::handshake(InSpan(span), TokioIo::new(client))
                .await
                .map_err(reset)?;
        tokio::spawn(driver);
        sender.send_request(request).await
    } else {
        let (mut sender, driver) = hyper::client::conn::http1::handshake(TokioIo::new(client))
            .await
            .map_err(reset)?;
        connection.spawn(driver);
        sender.send_request(request).await
    };
    let (parts, body) = response.map_err(reset)?.into_parts();
    let bytes = body.collect().await.map_err(reset)?.to_bytes();
    read_answer(parts.status, &parts.headers, &bytes)
}
