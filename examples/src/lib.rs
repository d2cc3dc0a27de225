//! Shared code of idem's examples: a small payment service
//! ([`payments::Payments`]) and its HTTP API ([`api::router`]). The runnable
//! examples live beside this crate as `[[example]]` targets; run one with
//! `cargo run -p examples --example NAME`.

pub mod api;
pub mod payments;
