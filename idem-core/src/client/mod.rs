//! Retrying safely from a client (feature `client`): one idempotency key per
//! operation, backoff with full jitter, `Retry-After`, a retry budget and
//! circuit breakers.
//!
//! Server-side idempotency pays off only when clients retry well: the key
//! is made once per logical operation and sent unchanged on every attempt
//! while the outcome is unknown; retries back off with jitter so that a
//! thousand clients do not return in lockstep; a budget keeps retries from
//! multiplying an outage's load; errors that cannot pass are not retried;
//! and a dependency that keeps failing is left alone for a while.
//!
//! - [`RetryMiddleware`]: all of it for [`reqwest`], as a
//!   [`reqwest_middleware`] middleware. `POST` and `PATCH` requests get an
//!   `Idempotency-Key`; the final response says how many attempts were made
//!   and whether it was a replay ([`RetryReport`]).
//! - [`retry`] and [`retry_if`]: the same policy and breaker for any async
//!   call — a gRPC request, a queue publish. For an error type of another
//!   crate (`tonic::Status`), give [`retry_if`] a classifier such as
//!   [`classify_grpc_code`]; [`retry_with_key`] runs under a key you keep.
//! - [`RetryPolicy`]: backoff, limits and [`RetryBudget`];
//!   [`CircuitBreaker`] and [`Breakers`]: per dependency, observable.
//!
//! # What is retried
//!
//! | outcome | retried | counts against the breaker |
//! |---|---|---|
//! | 2xx, 3xx | no: done | no |
//! | connection refused or reset, timeout, connection closed before the response | yes | yes |
//! | 409 (the first request with the key is still running) | yes, after `Retry-After`, cut to the time left | no |
//! | 425, 429 | yes, after `Retry-After` when present | no |
//! | 408, 500, 502, 503, 504 | yes, after `Retry-After` when present | yes |
//! | 400, 401, 403, 404, 413, 422 and every other 4xx | never | no |
//! | 501, 505 and other 5xx | never | no |
//!
//! ([`classify_status`] is the table; [`Classify`] says how errors of
//! reqwest, `std::io` and idem map to it.)
//!
//! Every final outcome carries the operation's key and a [`RetryReport`]:
//! a response in its extensions, the middleware's final error (the last
//! attempt's, an open circuit's) through [`RetryReport::of`], and
//! [`RetryError::key`]. **Keep the key until the outcome is known**: an
//! error may follow a request that did run, so a later retry (a job
//! queue's, a user clicking again) sends the same key and gets the replay.
//!
//! # Waiting
//!
//! Retry `n` waits a uniformly random time in `[0, min(cap, base · 2ⁿ⁻¹)]`
//! (full jitter; base 100 ms, cap 10 s by default), or the `Retry-After`
//! the server sent plus a random `[0, base]`. It stops after `max_attempts`
//! (4), when the next wait would end after `max_elapsed` (30 s), or when the
//! budget (20% of the operations of the last 10 s, plus a reserve of 100:
//! 10 a second over those 10 s) has no retry left — and returns the last outcome. A 409 whose `Retry-After`
//! would end after `max_elapsed` is looked at once more just before it
//! instead, so a slow first request still ends in its replay; a 425's or
//! 429's `Retry-After` is the server's rate limit, and one that would end
//! after `max_elapsed` stops the operation with that response. ([`retry`]
//! and [`retry_if`] see verdicts, not statuses: there every
//! [`Busy`](Verdict::Busy) outcome, such as idem's `Error::InProgress`, is
//! looked at once more.)
//!
//! # Circuit breakers
//!
//! A breaker opens after 5 failures in a row, or when half of at least 20
//! calls in 10 s failed; open, it fails calls at once without sending them;
//! after a 5 s cool-down it lets one probe through, which closes it on
//! success and opens it again on failure, or when it has not answered in
//! 10 s. Only calls started in its current state count. [`Breakers`] keeps
//! one per `host:port`, forgets closed ones idle for 10 minutes and keeps at
//! most 10 000. [`CircuitBreaker::state`] and [`CircuitBreaker::subscribe`]
//! observe them.

mod breaker;
mod classify;
mod middleware;
mod policy;
mod retry;

pub use breaker::{BreakerConfig, BreakerState, Breakers, CircuitBreaker, CircuitOpen, Permit};
pub use classify::{Classify, Verdict, classify_grpc_code, classify_status, retry_after};
pub use middleware::{RetryMiddleware, replayed};
pub use policy::{PolicyError, RetryBudget, RetryPolicy, RetryPolicyBuilder};
pub use retry::{
    Attempt, RetryError, RetryReport, StopReason, new_key, retry, retry_if, retry_with_key,
};
