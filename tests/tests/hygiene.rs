//! The expansion is hygienic: it compiles in a crate that shadows `core`,
//! `std`, `idem_core` and the prelude's names, its hidden bindings do not
//! collide with the user's, and it trips none of the user's lints (clippy's
//! pedantic group included, which CI runs over this file).

#![deny(unused_qualifications, clippy::pedantic, clippy::shadow_same, unused)]

use ::idem_core::idempotent;

// Shadow the crates and prelude items a careless expansion would name.
#[allow(dead_code)]
mod core {}
#[allow(dead_code)]
mod std {}
#[allow(dead_code)]
mod idem_core {}
#[allow(dead_code)]
struct Option;
#[allow(dead_code)]
struct Box;
#[allow(dead_code)]
struct Vec;
#[allow(dead_code)]
struct Key;
#[allow(dead_code)]
struct Store;

/// The error of this file's functions.
#[derive(Debug)]
pub struct Failed(::idem_core::Error);

impl From<::idem_core::Error> for Failed {
    fn from(error: ::idem_core::Error) -> Self {
        Self(error)
    }
}

type Result<T> = ::core::result::Result<T, Failed>;

/// Uses the names the expansion binds internally.
#[idempotent(key = __idem_store, scope = __idem_call)]
async fn colliding(__idem_store: u32, __idem_call: u32) -> Result<u32> {
    let __idem_body = __idem_store + __idem_call;
    Ok(__idem_body)
}

#[idempotent(key = id, ttl = "1h", on_conflict = reject, cache_errors = false)]
async fn shadowed(id: u64) -> Result<u64> {
    Ok(id)
}

#[tokio::test]
async fn compiles_and_runs_among_shadowed_names() {
    assert_eq!(colliding(1, 2).await.unwrap(), 3);
    assert_eq!(colliding(1, 2).await.unwrap(), 3);
    assert_eq!(shadowed(9).await.unwrap(), 9);
    assert_eq!(items_first(2).await.unwrap(), 4);
    assert_eq!(mutable(5).await.unwrap(), 6);
    let _ = Failed(::idem_core::Error::KeyReused).0;
}

/// A body that starts with items, then statements: the expansion adds no
/// statement before the items (`clippy::items_after_statements`).
#[idempotent(key = id)]
async fn items_first(id: u64) -> Result<u64> {
    const STEP: u64 = 2;
    fn doubled(value: u64) -> u64 {
        value * STEP
    }
    let value = doubled(id);
    Ok(value)
}

/// A `mut` argument is bound again as the body's own variable, which
/// `clippy::shadow_same` (opt in) would flag at the user's name.
#[idempotent(key = id)]
async fn mutable(mut id: u64) -> Result<u64> {
    id += 1;
    Ok(id)
}
