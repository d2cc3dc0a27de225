//! Waking waiters in every process: `complete` and `release` send a
//! `NOTIFY` on the store's channel with the key, and one `LISTEN`ing
//! connection per store wakes the callers waiting on that key.
//!
//! A notification can be missed (the listening connection drops, or the
//! change came before a waiter registered); a waiter then checks the row and
//! otherwise wakes at its own timeout, so a lost notification costs time,
//! never correctness.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::Notify;

use crate::key::Key;

/// The waiters of one store, by key.
#[derive(Default)]
pub(crate) struct Watchers {
    waiting: Mutex<HashMap<Key, Weak<Notify>>>,
}

impl Watchers {
    /// The notifier of `key`, registered now.
    pub(crate) fn register(&self, key: Key) -> Arc<Notify> {
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(notify) = waiting.get(&key).and_then(Weak::upgrade) {
            return notify;
        }
        if waiting.len() > 1024 {
            waiting.retain(|_, notify| notify.strong_count() > 0);
        }
        let notify = Arc::new(Notify::new());
        waiting.insert(key, Arc::downgrade(&notify));
        notify
    }

    fn wake(&self, key: &Key) {
        let notify = self
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key)
            .and_then(|notify| notify.upgrade());
        if let Some(notify) = notify {
            notify.notify_waiters();
        }
    }

    /// Wakes every waiter, so that each checks its key again: after the
    /// listening connection dropped, notifications may have been missed.
    fn wake_all(&self) {
        let waiting =
            std::mem::take(&mut *self.waiting.lock().unwrap_or_else(PoisonError::into_inner));
        for notify in waiting.into_values().filter_map(|notify| notify.upgrade()) {
            notify.notify_waiters();
        }
    }
}

/// Listens on `channel` and wakes the waiters of each key notified, until
/// the store is dropped.
pub(crate) async fn listen(pool: PgPool, channel: String, watchers: Weak<Watchers>) {
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::debug!(%error, "cannot listen for idempotency notifications; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                if watchers.strong_count() == 0 {
                    return;
                }
                continue;
            }
        };
        if let Err(error) = listener.listen(&channel).await {
            tracing::debug!(%error, "cannot listen for idempotency notifications; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        loop {
            let received = listener.try_recv().await;
            let Some(watchers) = watchers.upgrade() else {
                return;
            };
            match received {
                Ok(Some(notification)) => {
                    if let Some(key) = parse_key(notification.payload()) {
                        watchers.wake(&key);
                    }
                }
                // The connection dropped; the next call reconnects. What was
                // sent meanwhile is lost: every waiter looks again.
                Ok(None) => watchers.wake_all(),
                Err(error) => {
                    tracing::debug!(%error, "lost the idempotency notification listener; reconnecting");
                    watchers.wake_all();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    break;
                }
            }
        }
    }
}

fn parse_key(hex: &str) -> Option<Key> {
    let mut digest = [0u8; 32];
    hex::decode_to_slice(hex, &mut digest).ok()?;
    Some(Key::from_digest(digest))
}
