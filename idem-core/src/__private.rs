//! Items only the `#[idempotent]` expansion uses. Not public API: they change
//! without notice.
