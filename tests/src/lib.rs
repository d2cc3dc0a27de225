//! Shared test code: the store conformance suite that every backend passes,
//! and small helpers for the integration tests under `tests/`.

pub mod conformance;

#[cfg(feature = "redis")]
pub mod redis_server;
