//! Re-entry: a call made, with the key it holds and on the same handle,
//! from inside its own body (directly, or through functions awaited in it).
//! Such a call would wait for itself until its `wait_timeout`; it fails at
//! once with [`Error::Reentered`](crate::Error::Reentered) instead.
//!
//! The keys a call chain holds travel with its future in a task-local, so
//! the check sees what the awaiting chain holds and nothing of other tasks;
//! a body that hands the call to another task (`tokio::spawn`) and awaits
//! it is not seen as re-entry.

use std::future::Future;
use std::sync::Arc;

use tokio::task::futures::TaskLocalFuture;

use crate::key::Key;

/// The claims held by the call chain a future belongs to: (handle, key).
#[derive(Clone, Default)]
pub(crate) struct Held(Arc<[(usize, Key)]>);

tokio::task_local! {
    static HELD: Held;
}

/// Whether the current call chain already holds `key` on `handle`.
pub(crate) fn reentered(handle: usize, key: Key) -> bool {
    HELD.try_with(|held| held.0.contains(&(handle, key)))
        .unwrap_or(false)
}

/// `body`, run as a holder of `key` on `handle`: calls made in it see the
/// claim.
pub(crate) fn holding<F: Future>(handle: usize, key: Key, body: F) -> TaskLocalFuture<Held, F> {
    // One allocation of the exact length, as every call makes one.
    let outer = HELD
        .try_with(|held| Arc::clone(&held.0))
        .unwrap_or_default();
    let claims = outer
        .iter()
        .copied()
        .chain(std::iter::once((handle, key)))
        .collect();
    HELD.scope(Held(claims), body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_chain_sees_its_own_claims_only() {
        let key = Key::new("op", &1).unwrap();
        let other = Key::new("op", &2).unwrap();
        assert!(!reentered(1, key));
        holding(1, key, async {
            assert!(reentered(1, key));
            assert!(!reentered(2, key), "another handle");
            assert!(!reentered(1, other));
            holding(1, other, async {
                assert!(reentered(1, key) && reentered(1, other));
            })
            .await;
            let spawned = tokio::spawn(async move { reentered(1, key) });
            assert!(!spawned.await.unwrap(), "another task");
        })
        .await;
        assert!(!reentered(1, key));
    }
}
