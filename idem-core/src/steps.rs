//! Multi-step calls: named steps journaled under the call's key, so that a
//! call run again after a failure resumes at its first step without an
//! entry instead of running every side effect again.
//!
//! The journal of the running call travels with its body's future in a
//! task-local, as the re-entry check's claims do: [`step`] finds it there,
//! and finds none outside an idempotent call's body.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest as _, Sha256};
use tokio::task::futures::TaskLocalFuture;

use crate::error::Error;
use crate::key::Key;
use crate::store::{Store, Token};

/// The journal of the call whose body is running.
pub(crate) struct Journal {
    store: Arc<dyn Store>,
    key: Key,
    token: Token,
    ttl: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The steps a previous attempt journaled, once read from the store.
    done: Option<HashMap<String, Vec<u8>>>,
    /// The names this attempt has used.
    used: HashSet<String>,
    /// The fencing epoch this attempt was given, once asked for.
    epoch: Option<u64>,
}

tokio::task_local! {
    static JOURNAL: Arc<Journal>;
}

/// `body`, run as the body of the call that holds `key` with `token`:
/// steps in it are journaled under `key` for `ttl`.
pub(crate) fn journaled<F: Future>(
    store: Arc<dyn Store>,
    key: Key,
    token: Token,
    ttl: Duration,
    body: F,
) -> TaskLocalFuture<Arc<Journal>, F> {
    JOURNAL.scope(
        Arc::new(Journal {
            store,
            key,
            token,
            ttl,
            state: Mutex::default(),
        }),
        body,
    )
}

impl Journal {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Notes that this attempt runs step `name`; false if it ran it before.
    fn mark(&self, name: &str) -> bool {
        self.state().used.insert(name.to_owned())
    }

    /// Step `name`'s journaled result, reading the journal from the store
    /// on the first step of the attempt.
    async fn recorded(&self, name: &str) -> Result<Option<Vec<u8>>, Error> {
        let cached = self
            .state()
            .done
            .as_ref()
            .map(|done| done.get(name).cloned());
        if let Some(found) = cached {
            return Ok(found);
        }
        let steps = self.store.steps(self.key).await?;
        let done: HashMap<String, Vec<u8>> = steps
            .into_iter()
            .map(|step| (step.name, step.value))
            .collect();
        let found = done.get(name).cloned();
        self.state().done.get_or_insert(done);
        Ok(found)
    }

    /// Journals step `name`'s result, fenced by the call's claim.
    async fn append(&self, name: &str, value: Vec<u8>) -> Result<(), Error> {
        let appended = self
            .store
            .append_step(self.key, self.token, name.to_owned(), value, self.ttl)
            .await?;
        if appended {
            Ok(())
        } else {
            Err(Error::StepLost {
                name: name.to_owned().into(),
            })
        }
    }
}

/// Runs `work` as the step `name` of the idempotent call whose body is
/// running, at most once per call key: its `Ok` result is serialized and
/// journaled under the call's key, fenced by the call's claim, before
/// `step` returns. When the call runs again (its body failed with an `Err`
/// that released the claim, panicked, was dropped, or lost its lease), a
/// step found in the journal is not run: its result is decoded from the
/// journal, so the call resumes at its first step without an entry.
///
/// ```
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use idem_core::{Idempotency, Fingerprint, Key, MemoryStore, Settings, step};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), idem_core::Error> {
/// let idem = Idempotency::new(MemoryStore::new());
/// let settings = Settings::default();
/// let key = Key::new("checkout", &"order-7")?;
/// let charges = AtomicU32::new(0);
/// for attempt in 0..2 {
///     let result: Result<u32, idem_core::Error> = idem
///         .run(&settings, key, Fingerprint::of(&())?, async {
///             let charge = step("charge", async {
///                 Ok::<_, idem_core::Error>(charges.fetch_add(1, Ordering::SeqCst))
///             })
///             .await?;
///             if attempt == 0 {
///                 // Fails after the charge: the claim is released, the
///                 // journal kept.
///                 return Err(idem_core::Error::AttemptFailed);
///             }
///             Ok(charge)
///         })
///         .await;
///     assert_eq!(result.is_ok(), attempt == 1);
/// }
/// assert_eq!(charges.load(Ordering::SeqCst), 1, "charged once");
/// # Ok(())
/// # }
/// ```
///
/// # Rules
///
/// - **Names are unique per call.** A step's identity is its name, not its
///   position, so steps inside loops and conditionals are fine as long as
///   each has a name of its own (e.g. `format!("ship-{i}")`). A name used
///   twice in one attempt fails with [`Error::StepRepeated`] and `work`
///   does not run.
/// - **Only `Ok` is journaled.** A step that returns `Err` is not recorded
///   and runs again on the next attempt.
/// - **A step is at most once per journal entry, not per side effect.** If
///   the process dies after `work`'s side effect and before its entry is
///   written, the next attempt runs it again: make the downstream call
///   idempotent with [`step_key`], which is the same on every attempt.
/// - **The journal lives as long as the call's record** (the call's TTL from
///   its last step): a call run again after that starts afresh.
/// - **A lost claim stops the call.** When the call's claim is no longer its
///   own (its lease lapsed and another attempt took over), the step's result
///   is not journaled and `step` fails with [`Error::StepLost`].
/// - The step's result must serialize and deserialize (serde JSON); one that
///   does not fails with [`Error::Encode`] or [`Error::Decode`].
///
/// # Outside an idempotent call
///
/// Outside the body of a call run by an [`Idempotency`](crate::Idempotency)
/// handle (and so in the body of a transactional PostgreSQL call, which
/// commits or rolls back with its result and needs no journal), `step` runs
/// `work` as it is, once per call of `step`, and journals nothing: a
/// function written with steps can be called both ways.
///
/// A store that keeps no journals (its [`Store::steps`] answers
/// [`StoreErrorKind::Unsupported`](crate::StoreErrorKind::Unsupported))
/// fails the first step with that error, before `work` runs.
///
/// # Errors
///
/// `work`'s own error, or an idem [`Error`] converted into `E`: see the
/// rules above, and [`Error::Store`] when the journal cannot be read or
/// written.
pub async fn step<T, E, F>(name: &str, work: F) -> Result<T, E>
where
    T: Serialize + DeserializeOwned,
    E: From<Error>,
    F: Future<Output = Result<T, E>>,
{
    let Ok(journal) = JOURNAL.try_with(Arc::clone) else {
        return work.await;
    };
    if !journal.mark(name) {
        return Err(Error::StepRepeated {
            name: name.to_owned().into(),
        }
        .into());
    }
    if let Some(bytes) = journal.recorded(name).await? {
        tracing::debug!(key = %journal.key, step = name, "replaying a journaled step");
        return serde_json::from_slice(&bytes).map_err(|error| Error::decode(error).into());
    }
    let value = work.await?;
    let bytes = serde_json::to_vec(&value).map_err(|error| Error::encode("step result", error))?;
    journal.append(name, bytes).await?;
    Ok(value)
}

/// The fencing epoch of the idempotent call whose body is running: a number
/// greater than every epoch given to an earlier claim of the call's key, the
/// same for the rest of this attempt (asked of the store once).
///
/// A lease-based claim cannot stop a holder that stalled (a long GC pause,
/// a frozen VM) past its lease from resuming and writing after another
/// attempt took the key over. The resource it writes can: store the epoch
/// with the write, and refuse a write whose epoch is smaller than the one
/// stored, so the stale holder's write is rejected by the resource itself.
///
/// ```
/// use idem_core::{Fingerprint, Idempotency, Key, Settings, epoch};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), idem_core::Error> {
/// let idem = Idempotency::memory();
/// let key = Key::new("ship", &"order-7")?;
/// let first: u64 = idem
///     .run(&Settings::default(), key, Fingerprint::of(&())?, async {
///         let epoch = epoch().await?;
///         // UPDATE shipments SET state = 'sent', epoch = $epoch
///         //   WHERE order_id = 7 AND epoch < $epoch
///         Ok::<_, idem_core::Error>(epoch)
///     })
///     .await?;
/// assert!(first > 0);
/// # Ok(())
/// # }
/// ```
///
/// On PostgreSQL the epochs come from a sequence of the store's
/// (`idempotency_keys_epoch`), so they keep increasing across restarts and
/// can be compared in SQL; on Redis they are the server's time in µs, kept
/// above the key's last epoch; in memory, a counter of the store's.
///
/// # Errors
///
/// [`Error::ClaimLost`] when the call's claim is no longer its own (no
/// epoch is given to a holder that may be stale), [`Error::OutsideCall`]
/// outside the body of a call run by an [`Idempotency`](crate::Idempotency)
/// handle (a transactional PostgreSQL call's transaction fences its writes
/// itself), [`Error::Store`] when the store cannot answer (or keeps no
/// epochs: [`StoreErrorKind::Unsupported`](crate::StoreErrorKind::Unsupported)).
pub async fn epoch() -> Result<u64, Error> {
    let Ok(journal) = JOURNAL.try_with(Arc::clone) else {
        return Err(Error::OutsideCall { what: "epoch" });
    };
    if let Some(epoch) = journal.state().epoch {
        return Ok(epoch);
    }
    let epoch = journal
        .store
        .epoch(journal.key, journal.token, journal.ttl)
        .await?
        .ok_or(Error::ClaimLost)?;
    Ok(*journal.state().epoch.get_or_insert(epoch))
}

/// The key derived from the running call's key and the step name `name`:
/// 32 hex digits, the same on every attempt of the call and in every
/// process, and different for every call key and step name. Pass it as the
/// `Idempotency-Key` of a downstream request made by the step, so that a
/// step run again (its effect happened, its journal entry was not written)
/// is deduplicated downstream.
///
/// `None` outside the body of an idempotent call (see [`step`]); use
/// [`derive_step_key`] with the call's [`Key`] there.
#[must_use]
pub fn step_key(name: &str) -> Option<String> {
    JOURNAL
        .try_with(|journal| derive_step_key(journal.key, name))
        .ok()
}

/// The key derived from the call key `key` and the step name `name`, as
/// [`step_key`] gives it inside the call's body.
#[must_use]
pub fn derive_step_key(key: Key, name: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"idem-step\0");
    hasher.update(key.digest());
    hasher.update(name.as_bytes());
    hex::encode(&hasher.finalize()[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_keys_differ_by_call_and_step() {
        let key = Key::new("op", &1).unwrap();
        let other = Key::new("op", &2).unwrap();
        let charge = derive_step_key(key, "charge");
        assert_eq!(charge.len(), 32);
        assert_eq!(charge, derive_step_key(key, "charge"));
        assert_ne!(charge, derive_step_key(key, "email"));
        assert_ne!(charge, derive_step_key(other, "charge"));
    }

    #[tokio::test]
    async fn outside_a_call_a_step_runs_as_it_is() {
        let mut runs = 0;
        for _ in 0..2 {
            let value: Result<u8, Error> = step("same", async {
                runs += 1;
                Ok(7)
            })
            .await;
            assert_eq!(value.unwrap(), 7);
        }
        assert_eq!(runs, 2);
        assert_eq!(step_key("same"), None);
    }
}
