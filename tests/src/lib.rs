//! The conformance kit of [idem](https://docs.rs/idem-core): the store
//! conformance suite that every built-in backend passes, for any backend to
//! run, and harnesses that start real servers for tests.
//!
//! # Proving a store
//!
//! A store written outside idem proves itself with the same suite as the
//! memory and Redis stores: implement
//! [`Backend`](conformance::Backend) (open a store, say what lease and TTL
//! the suite may wait out) and invoke
//! [`conformance_suite!`] once. It writes one `#[test]` per behaviour:
//! exactly-once under a thousand concurrent callers of one handle and
//! under claims raced from many clients, fencing of stale holders, replay
//! of falsy results and of the record's type tag, expiry, renewal, waiting,
//! and more.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use idem_core::store::Store;
//! use idem_test::conformance::{Backend, Timing};
//!
//! // Your store; here the memory store stands in for it.
//! fn my_store() -> Arc<dyn Store> {
//!     Arc::new(idem_core::MemoryStore::new())
//! }
//!
//! struct MyBackend;
//!
//! impl Backend for MyBackend {
//!     async fn store(&self) -> Arc<dyn Store> {
//!         my_store()
//!     }
//!
//!     fn timing(&self) -> Timing {
//!         Timing { lease: Duration::from_secs(2), ttl: Duration::from_secs(10) }
//!     }
//!
//!     // `true` if the store reads tokio's clock, so that the suite can pause
//!     // it and skip waiting; `false` for a store on a server's clock.
//!     fn follows_tokio_clock(&self) -> bool {
//!         true
//!     }
//! }
//!
//! mod conformance {
//!     idem_test::conformance_suite!(super::MyBackend);
//! }
//! # fn main() {}
//! ```
//!
//! `cargo test` then runs each behaviour as its own test,
//! `conformance::reject_lets_exactly_one_run` and so on.
//!
//! # The exactly-once checker
//!
//! [`exactly_once_suite!`] runs the [`checker`] on the same [`Backend`](conformance::Backend):
//! seeded workloads of concurrent callers, under injected faults, checked
//! against idem's promises; a violation is reported with its seed and
//! history.
//!
//! ```ignore
//! mod exactly_once {
//!     idem_test::exactly_once_suite!(super::MyBackend);
//! }
//! ```
//!
//! # Faults
//!
//! [`faults::Flaky`] wraps any store and makes its operations fail as a
//! network, a full store or a paused process would: refused, carried out
//! with the answer lost, delayed, landing late, refused as full, or (for a
//! holder paused past its lease) renewals that never arrive; one by one or
//! on a seeded schedule.
//!
//! # A flaky network
//!
//! [`proxy::Proxy`] sits between a client and a server on loopback and
//! loses responses, delays them or refuses connections, one connection at a
//! time: the lost response after a charge, for testing retrying clients.
//!
//! # Real servers
//!
//! With the `redis` feature, `redis_server` starts `redis-server` processes
//! (single nodes and a six-node cluster) on free loopback ports; with
//! `postgres`, `postgres_server` runs `initdb` and a `postgres` server in a
//! temporary directory; with `nats`, `nats_server` starts a `nats-server`
//! with JetStream. Each server is watched so that it dies with the test
//! process.

#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod checker;
pub mod conformance;
pub mod faults;
pub mod logs;
pub mod process;
pub mod proxy;

#[cfg(feature = "nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
pub mod nats_server;

#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod postgres_server;

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis_server;
