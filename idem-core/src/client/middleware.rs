//! Retries for reqwest, as a `reqwest-middleware` middleware.

use std::sync::Arc;

use http::{Extensions, Method};
use reqwest::{Request, Response};
use reqwest_middleware::{Middleware, Next};

use super::retry::Retries;
use super::{Breakers, CircuitBreaker, CircuitOpen, Classify, RetryPolicy, RetryReport, new_key};
use crate::http::{IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED, IdempotencyKey};

/// Retries reqwest requests safely: one idempotency key per request, the
/// same on every attempt; backoff with full jitter and `Retry-After`; a
/// retry budget; a circuit breaker per `host:port`.
///
/// A `POST` or `PATCH` (see [`key_methods`](Self::key_methods)) without an
/// `Idempotency-Key` header gets one, sent as a structured-field string on
/// every attempt: a fresh UUID, or, in the work of a
/// [`step`](crate::step) of an idempotent call, the step's derived key
/// ([`step_key`](crate::step_key) for its first request, a key derived
/// from it and the request's number for each later one; an undo's requests
/// get the undo's keys), so that a step run again after its journal entry
/// was lost sends the same keys and the server replays instead of charging
/// twice. A key the caller set is kept
/// and sent exactly as given, whatever its form (`order 17` as well as
/// `"order-17"`: the server judges it, not the client).
/// Requests are retried when they carry a key or their method is idempotent
/// (`GET`, `HEAD`, `OPTIONS`, `TRACE`, `PUT`, `DELETE`); any other is sent
/// once, as is a request whose body cannot be cloned (a stream). Which
/// outcomes are retried is [`classify_status`](super::classify_status)'s
/// table, and reqwest's errors as [`Classify`] says.
///
/// The final response carries a [`RetryReport`] in its extensions: the
/// attempts made, the key, and whether the server replayed a stored
/// response (`Idempotent-Replayed: true`). So does every final error
/// ([`RetryReport::of`]): the error after the last attempt (a timeout, a
/// reset connection) and a request to a host whose circuit is open, which
/// fails at once. Such an error is a middleware error whose cause stays
/// reachable: `downcast_ref::<reqwest::Error>()`, or
/// `downcast_ref::<CircuitOpen>()` for an open circuit (a circuit that an
/// attempt opened, and that stays open past the wait before the next one,
/// ends the operation at once with that attempt's outcome: its response, or
/// its error with the `CircuitOpen` as well), or
/// `downcast_ref::<std::io::Error>()` (`TimedOut`) for a breaker's probe
/// that got no answer within its `probe_timeout`. Keep the key until the
/// outcome is known: an outer retry sends
/// [`report.key_header()`](RetryReport::key_header) again.
///
/// ```no_run
/// use idem_core::client::{RetryMiddleware, RetryPolicy, RetryReport};
///
/// # async fn charge() -> Result<(), Box<dyn std::error::Error>> {
/// let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
///     .with(RetryMiddleware::new(RetryPolicy::default()))
///     .build();
/// let response = client
///     .post("https://payments.example/v1/charges")
///     .header("x-api-key", "shop-1")
///     .body(r#"{"amount_cents":100}"#)
///     .send()
///     .await?;
/// let report = response.extensions().get::<RetryReport>().unwrap();
/// println!("{} attempt(s), replayed: {}", report.attempts(), report.replayed());
///
/// // An error: the charge may have run. Keep the key for the next try.
/// let next_try = client
///     .post("https://payments.example/v1/charges")
///     .header("x-api-key", "shop-1")
///     .body(r#"{"amount_cents":250}"#)
///     .send()
///     .await;
/// if let Err(error) = &next_try
///     && let Some(report) = RetryReport::of(error)
/// {
///     let key = report.key_header().unwrap(); // send it as `Idempotency-Key` next time
///     # let _ = key;
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct RetryMiddleware {
    policy: RetryPolicy,
    breakers: Option<Breakers>,
    key_methods: Arc<[Method]>,
}

impl RetryMiddleware {
    /// Retries by `policy`, with a breaker per host configured by
    /// [`BreakerConfig::default`](super::BreakerConfig::default), and keys
    /// added to `POST` and `PATCH` requests.
    #[must_use]
    pub fn new(policy: RetryPolicy) -> Self {
        Self {
            policy,
            breakers: Some(Breakers::default()),
            key_methods: Arc::new([Method::POST, Method::PATCH]),
        }
    }

    /// Uses these breakers (e.g. to share them among clients, or to read
    /// their states).
    #[must_use]
    pub fn breakers(mut self, breakers: Breakers) -> Self {
        self.breakers = Some(breakers);
        self
    }

    /// No circuit breaking.
    #[must_use]
    pub fn without_breakers(mut self) -> Self {
        self.breakers = None;
        self
    }

    /// The methods whose requests get an `Idempotency-Key` when they have
    /// none (default `POST` and `PATCH`, as the draft and idem's
    /// [layer](crate::http::IdempotencyLayer) guard).
    #[must_use]
    pub fn key_methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.key_methods = methods.into_iter().collect();
        self
    }
}

/// Whether a response is a replay (`Idempotent-Replayed: true`).
#[must_use]
pub fn replayed(response: &Response) -> bool {
    response
        .headers()
        .get(IDEMPOTENT_REPLAYED)
        .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"true") || value == "?1")
}

fn is_idempotent(method: &Method) -> bool {
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::TRACE,
        Method::PUT,
        Method::DELETE,
    ]
    .contains(method)
}

#[async_trait::async_trait]
impl Middleware for RetryMiddleware {
    async fn handle(
        &self,
        mut request: Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<Response> {
        let key = match request.headers().get(IDEMPOTENCY_KEY) {
            // The caller's key is sent as it is; the report names it as
            // the server will read it when idem can parse it, else as sent.
            Some(value) => Some(
                value
                    .to_str()
                    .ok()
                    .and_then(|text| IdempotencyKey::parse(text).ok())
                    .map_or_else(
                        || String::from_utf8_lossy(value.as_bytes()).into_owned(),
                        |key| key.as_str().to_owned(),
                    ),
            ),
            None if self.key_methods.contains(request.method()) => {
                // Inside a step, the step's derived key: the same on every
                // attempt of the call, so the server deduplicates a request
                // whose step was not journaled.
                let key = crate::steps::request_key().unwrap_or_else(new_key);
                let value = crate::http::sf_string_header(&key)
                    .expect("a UUID or a derived key is a structured-field string");
                request.headers_mut().insert(IDEMPOTENCY_KEY, value);
                Some(key)
            }
            None => None,
        };
        let retryable = key.is_some() || is_idempotent(request.method());
        let mut report = RetryReport {
            attempts: 0,
            key,
            header: request.headers().get(IDEMPOTENCY_KEY).cloned(),
            replayed: false,
        };
        let url = request.url();
        let dependency = format!(
            "{}:{}",
            url.host_str().unwrap_or_default(),
            url.port_or_known_default().unwrap_or_default()
        );
        let breaker = self
            .breakers
            .as_ref()
            .map(|breakers| breakers.get(&dependency));
        let mut retries = Retries::start(&self.policy);
        let mut attempts = 0;
        loop {
            let (attempt, kept) = match retryable.then(|| request.try_clone()).flatten() {
                Some(copy) => (copy, Some(request)),
                None => (request, None),
            };
            let permit = match breaker.as_ref().map(CircuitBreaker::try_acquire) {
                Some(Ok(permit)) => Some(permit),
                Some(Err(open)) => {
                    report.attempts = attempts;
                    return Err(reqwest_middleware::Error::Middleware(
                        anyhow::Error::new(open).context(report),
                    ));
                }
                None => None,
            };
            attempts += 1;
            let probe_timeout = permit
                .as_ref()
                .filter(|permit| permit.is_probe())
                .and(breaker.as_ref())
                .map(CircuitBreaker::probe_timeout);
            let run = next.clone().run(attempt, extensions);
            let outcome = match probe_timeout {
                // A probe that hangs is abandoned at its deadline and counts
                // as failed; the request may have run, so its key is kept.
                Some(timeout) => tokio::time::timeout(timeout, run)
                    .await
                    .unwrap_or_else(|_| {
                        Err(reqwest_middleware::Error::middleware(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "the circuit breaker's probe got no answer in time",
                        )))
                    }),
                None => run.await,
            };
            let verdict = match &outcome {
                Ok(response) => response.classify(),
                Err(error) => error.classify(),
            };
            if let Some(permit) = permit {
                permit.record(verdict);
            }
            // Only a 409 says the key's first request is still running; a
            // 425's or 429's `Retry-After` is the server's rate limit.
            let in_progress = matches!(&outcome, Ok(response) if response.status() == 409);
            let delay = (verdict.is_retryable() && kept.is_some())
                .then(|| retries.next_delay(attempts, verdict, in_progress).ok())
                .flatten();
            let (Some(delay), Some(kept)) = (delay, kept) else {
                report.attempts = attempts;
                return finish(outcome, report, None);
            };
            tracing::debug!(
                attempt = attempts,
                ?verdict,
                ?delay,
                "idem: retrying a request"
            );
            // A circuit this attempt opened, open past the wait: the
            // operation ends now, with this attempt's outcome, instead of
            // waiting to find the circuit open.
            if let Some(open) = breaker.as_ref().and_then(|b| b.open_past(delay)) {
                report.attempts = attempts;
                return finish(outcome, report, Some(open));
            }
            // Dropped before the wait: its connection goes back to the pool.
            drop(outcome);
            tokio::time::sleep(delay).await;
            request = kept;
        }
    }
}

/// The operation's final outcome, with its report: the response, or the
/// error with the report (and the open circuit that stopped the retries,
/// if one did) as its context.
fn finish(
    outcome: reqwest_middleware::Result<Response>,
    mut report: RetryReport,
    open: Option<CircuitOpen>,
) -> reqwest_middleware::Result<Response> {
    match outcome {
        Ok(mut response) => {
            report.replayed = replayed(&response);
            response.extensions_mut().insert(report);
            Ok(response)
        }
        Err(error) => {
            let mut error = match error {
                reqwest_middleware::Error::Reqwest(error) => anyhow::Error::new(error),
                reqwest_middleware::Error::Middleware(error) => error,
            };
            if let Some(open) = open {
                error = error.context(open);
            }
            Err(reqwest_middleware::Error::Middleware(error.context(report)))
        }
    }
}
