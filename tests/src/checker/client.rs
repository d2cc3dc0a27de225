//! The retrying client under the checker: operations sent with
//! [`retry_with_key`] to a service behind [`IdempotencyLayer`], over a
//! network that, per attempt and from a seed, passes the request, loses
//! the response after the service handled it, or refuses the connection.
//!
//! Checked: per operation, the service's effect is done at most once; an
//! operation that succeeds gets the body of the run that did it (its own
//! or the replay of it); one that gives up did its effect at most once.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use idem_core::client::{RetryPolicy, Verdict, retry_with_key};
use idem_core::http::IdempotencyLayer;
use idem_core::store::Store;
use idem_core::{Idempotency, Settings};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tower_layer::Layer as _;
use tower_service::Service;

/// What one seed's client run did.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClientReport {
    /// Operations sent.
    pub operations: usize,
    /// Attempts made.
    pub attempts: usize,
    /// Responses the network lost after the service handled the request.
    pub responses_lost: usize,
    /// Operations that gave up.
    pub gave_up: usize,
}

/// The service's effects: per operation, the runs that did it.
type Effects = Arc<Mutex<HashMap<String, Vec<u64>>>>;

/// The service behind the layer: does the operation the body names, after
/// a pause, and answers `201` with its run's number.
#[derive(Clone)]
struct Service201 {
    effects: Effects,
    runs: Arc<Mutex<u64>>,
}

type Answer = Pin<Box<dyn Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send>>;

impl Service<Request<Full<Bytes>>> for Service201 {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Answer;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Full<Bytes>>) -> Answer {
        let this = self.clone();
        Box::pin(async move {
            let operation = request
                .into_body()
                .collect()
                .await
                .map(|body| String::from_utf8_lossy(&body.to_bytes()).into_owned())
                .unwrap_or_default();
            tokio::time::sleep(Duration::from_millis(20)).await;
            let run = {
                let mut runs = this.runs.lock().unwrap_or_else(PoisonError::into_inner);
                *runs += 1;
                *runs
            };
            this.effects
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(operation)
                .or_default()
                .push(run);
            let mut response = Response::new(Full::new(Bytes::from(run.to_string())));
            *response.status_mut() = StatusCode::CREATED;
            Ok(response)
        })
    }
}

/// What the network does to one attempt.
#[derive(Debug, Clone, Copy)]
enum Network {
    Pass,
    LoseResponse,
    Refuse,
}

/// Runs the client workload of `seed` against a service on `store`.
///
/// # Errors
/// What broke, with the seed.
pub async fn check_client_seed(store: Arc<dyn Store>, seed: u64) -> Result<ClientReport, String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let operations = rng.random_range(3..=8);
    let effects = Effects::default();
    let settings = Settings::builder()
        .lease(Duration::from_secs(2))
        .wait_timeout(Duration::from_secs(1))
        .build()
        .map_err(|e| e.to_string())?;
    let service = IdempotencyLayer::unscoped(Idempotency::from_arc(store))
        .settings(settings)
        .layer(Service201 {
            effects: Arc::clone(&effects),
            runs: Arc::default(),
        });
    let policy = RetryPolicy::builder()
        .base(Duration::from_millis(10))
        .cap(Duration::from_millis(200))
        .max_attempts(rng.random_range(2..=6))
        .no_budget()
        .build()
        .map_err(|e| e.to_string())?;
    let network = Arc::new(Mutex::new(StdRng::seed_from_u64(seed ^ 0x4e45_5457)));
    let report = Arc::new(Mutex::new(ClientReport {
        operations,
        ..ClientReport::default()
    }));
    let sends = (0..operations).map(|op| {
        let (service, policy, network, report) = (
            service.clone(),
            &policy,
            Arc::clone(&network),
            Arc::clone(&report),
        );
        async move {
            let operation = format!("{seed}-{op}");
            let classify = |outcome: &Result<(StatusCode, Bytes), io::Error>| match outcome {
                Ok((status, _)) if status.is_success() => Verdict::Success,
                Ok((StatusCode::CONFLICT, _)) => Verdict::Busy { retry_after: None },
                Ok((status, _)) if status.is_server_error() => {
                    Verdict::Failed { retry_after: None }
                }
                Ok(_) => Verdict::Rejected,
                Err(_) => Verdict::Failed { retry_after: None },
            };
            let sent = retry_with_key(policy, idem_core::client::new_key(), classify, |attempt| {
                let (mut service, network, report, operation) = (
                    service.clone(),
                    Arc::clone(&network),
                    Arc::clone(&report),
                    operation.clone(),
                );
                let key = attempt.key().to_owned();
                async move {
                    let fate = {
                        let mut rng = network.lock().unwrap_or_else(PoisonError::into_inner);
                        match rng.random_range(0..20) {
                            0..=4 => Network::LoseResponse,
                            5..=7 => Network::Refuse,
                            _ => Network::Pass,
                        }
                    };
                    report
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .attempts += 1;
                    if let Network::Refuse = fate {
                        return Err(io::Error::from(io::ErrorKind::ConnectionRefused));
                    }
                    let request = Request::post("/charges")
                        .header("idempotency-key", format!("\"{key}\""))
                        .body(Full::new(Bytes::from(operation)))
                        .expect("a request");
                    std::future::poll_fn(|cx| service.poll_ready(cx))
                        .await
                        .expect("ready");
                    let response = service.call(request).await.expect("an answer");
                    let status = response.status();
                    let body = response
                        .into_body()
                        .collect()
                        .await
                        .map(http_body_util::Collected::to_bytes)
                        .unwrap_or_default();
                    if let Network::LoseResponse = fate {
                        report
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .responses_lost += 1;
                        return Err(io::Error::from(io::ErrorKind::ConnectionReset));
                    }
                    Ok((status, body))
                }
            })
            .await;
            (operation, sent.map(|((_, body), _)| body).ok())
        }
    });
    let sent = futures_util::future::join_all(sends).await;
    let effects = effects.lock().unwrap_or_else(PoisonError::into_inner);
    let mut report = *report.lock().unwrap_or_else(PoisonError::into_inner);
    for (operation, body) in sent {
        let done = effects.get(&operation).map_or(&[][..], Vec::as_slice);
        if done.len() > 1 {
            return Err(format!(
                "seed {seed}: operation {operation} was done {} times (runs {done:?})",
                done.len()
            ));
        }
        match body {
            Some(body) => {
                let run: Option<u64> = String::from_utf8_lossy(&body).parse().ok();
                if run.is_none() || done.first() != run.as_ref() {
                    return Err(format!(
                        "seed {seed}: operation {operation} got run {run:?}, but runs {done:?} did it"
                    ));
                }
            }
            None => report.gave_up += 1,
        }
    }
    Ok(report)
}
