//! Calls through the HTTP layer: a request whose `Idempotency-Key` names the
//! key, to a service that runs the call's body and answers its result as
//! JSON (`200`), a stored failure as `422` and another failure as `503`.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use idem_core::Idempotency;
use idem_core::http::IdempotencyLayer;
use tower_layer::Layer as _;
use tower_service::Service;

use super::run::{CallError, Ctx, HTTP_NAME, Value, run_body};
use super::workload::{Body, CallPlan};

/// The service behind the layer, for one call.
#[derive(Clone)]
struct Handler {
    ctx: Arc<Ctx>,
    call: usize,
    key: usize,
    body: Body,
    cache_errors: bool,
}

type Answer = Pin<Box<dyn Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send>>;

impl Service<Request<Full<Bytes>>> for Handler {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Answer;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<Full<Bytes>>) -> Answer {
        let this = self.clone();
        Box::pin(async move {
            let result = run_body(&this.ctx, this.call, this.key, this.body).await;
            Ok(respond(result, this.cache_errors))
        })
    }
}

/// A call's result as a response: `200` with its value, a failure of the
/// body `422` when stored (else `503`) with its run, idem's own failure
/// `500` with its kind.
pub(crate) fn respond(result: Result<Value, CallError>, stored: bool) -> Response<Full<Bytes>> {
    let (status, json) = match result {
        Ok(value) => (StatusCode::OK, serde_json::to_vec(&value)),
        Err(CallError::Body(run)) if stored => {
            (StatusCode::UNPROCESSABLE_ENTITY, serde_json::to_vec(&run))
        }
        Err(CallError::Body(run)) => (StatusCode::SERVICE_UNAVAILABLE, serde_json::to_vec(&run)),
        Err(CallError::Idem(kind)) => {
            (StatusCode::INTERNAL_SERVER_ERROR, serde_json::to_vec(&kind))
        }
    };
    let mut response = Response::new(Full::new(Bytes::from(json.expect("JSON"))));
    *response.status_mut() = status;
    response
}

/// Reads an answer back as the other edges return it: [`respond`]'s, or one
/// of idem's problem responses (`application/problem+json`).
pub(crate) fn read_answer(
    status: StatusCode,
    headers: &HeaderMap,
    bytes: &[u8],
) -> Result<Value, CallError> {
    let problem = headers
        .get("content-type")
        .is_some_and(|c| c == "application/problem+json");
    if problem {
        let problem: serde_json::Value = serde_json::from_slice(bytes).unwrap_or_default();
        let kind = problem["type"]
            .as_str()
            .and_then(|t| t.rsplit_once('#'))
            .map_or("other", |(_, fragment)| fragment);
        let kind = match kind {
            "in-progress" => "in_progress",
            "store-unavailable" => "store",
            "attempt-failed" => "attempt_failed",
            "unreplayable" => "not_replayable",
            "key-reused" => "key_reused",
            _ => "other",
        };
        return Err(CallError::Idem(kind.to_owned()));
    }
    match status {
        StatusCode::OK => Ok(serde_json::from_slice(bytes).expect("a value")),
        StatusCode::UNPROCESSABLE_ENTITY | StatusCode::SERVICE_UNAVAILABLE => Err(CallError::Body(
            serde_json::from_slice(bytes).expect("a run"),
        )),
        _ => Err(CallError::Idem(
            serde_json::from_slice(bytes).unwrap_or_else(|_| "other".to_owned()),
        )),
    }
}

/// Makes `plan`'s call through the layer on `idem`, and reads its answer
/// back as the other edges return it.
pub(crate) async fn call(
    ctx: &Arc<Ctx>,
    idem: &Idempotency,
    plan: &CallPlan,
    cache_errors: bool,
) -> Result<Value, CallError> {
    let scope = ctx.scope.clone();
    let layer = IdempotencyLayer::scoped_by(idem.clone(), move |_| Some(scope.clone()))
        .name(HTTP_NAME)
        .settings(plan.settings);
    let mut service = layer.layer(Handler {
        ctx: Arc::clone(ctx),
        call: plan.id,
        key: plan.key,
        body: plan.body,
        cache_errors,
    });
    let request = Request::post("/orders")
        .header("idempotency-key", plan.key.to_string())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(match plan.arguments {
            0 => format!("{{\"key\":{}}}", plan.key),
            other => format!("{{\"key\":{},\"arguments\":{other}}}", plan.key),
        })))
        .expect("a request");
    std::future::poll_fn(|cx| service.poll_ready(cx))
        .await
        .expect("ready");
    let response = service.call(request).await.expect("an answer");
    let (parts, body) = response.into_parts();
    let bytes = body
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
        .unwrap_or_default();
    read_answer(parts.status, &parts.headers, &bytes)
}
