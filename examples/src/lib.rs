//! Runnable examples of idem live beside this crate as `[[example]]`
//! targets; run one with `cargo run -p examples --example NAME`.
