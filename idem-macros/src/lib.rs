//! The `#[idempotent]` attribute. Use it through `idem-core`, which
//! re-exports it.
