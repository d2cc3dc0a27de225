//! In-process coalescing: same-key callers on one handle share one claim.
//!
//! Each [`Idempotency`](crate::Idempotency) handle owns one [`Flights`]
//! table, the way a cache owns its in-flight initializers: coalescing is a
//! property of the handle the user created, not of a process-wide table.
//!
//! The first caller for a key becomes the *leader* and talks to the store; the
//! ones that arrive while it works become *followers* and wait for what it
//! lands: the stored record, a shared failure, or word that the flight was
//! vacated (the leader released its claim, gave up waiting, or was dropped), in
//! which case they contend again.

use std::pin::pin;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::error::Error;
use crate::key::{DigestHasher, Fingerprint, Key};
use crate::observe::Call;
use crate::store::Record;

/// The flights under way on one handle.
#[derive(Default)]
pub(crate) struct Flights {
    map: DashMap<Key, Arc<Flight>, DigestHasher>,
}

/// What a flight's leader hands its followers.
#[derive(Clone)]
pub(crate) enum Landing {
    /// The call completed (now or earlier): replay this record.
    Record(Record),
    /// The attempt failed in a way every follower shares.
    Failed(Error),
    /// Nothing to share: contend for the key again.
    Vacated,
}

pub(crate) struct Flight {
    fingerprint: Fingerprint,
    landing: OnceLock<Landing>,
    landed: Notify,
    /// When the claim the flight waits on lapses at the latest.
    retry_at: Mutex<Instant>,
}

pub(crate) enum Role<'a> {
    Leader(Leader<'a>),
    Follower(Arc<Flight>),
}

impl Flights {
    /// Joins the flight for `key`, leading it if none is under way.
    pub(crate) fn join(&self, key: Key, fingerprint: Fingerprint, lease: Duration) -> Role<'_> {
        match self.map.entry(key) {
            Entry::Occupied(flight) => Role::Follower(Arc::clone(flight.get())),
            Entry::Vacant(vacant) => {
                let flight = Arc::new(Flight {
                    fingerprint,
                    landing: OnceLock::new(),
                    landed: Notify::new(),
                    retry_at: Mutex::new(Instant::now() + lease),
                });
                vacant.insert(Arc::clone(&flight));
                Role::Leader(Leader {
                    flights: self,
                    key,
                    flight,
                })
            }
        }
    }

    /// When dropped, lets no caller from then on join the flight under way
    /// for `key`, if there is one: it may have read what a `forget` has
    /// just deleted. Held across a `forget`, so that one that returns,
    /// fails, is cancelled or panics after its delete may have landed does
    /// so in every case. The flight's leader and the followers already with
    /// it go on as they were; the next caller starts a flight of its own.
    pub(crate) fn vacating(&self, key: Key) -> Vacating<'_> {
        Vacating { flights: self, key }
    }
}

/// See [`Flights::vacating`].
pub(crate) struct Vacating<'a> {
    flights: &'a Flights,
    key: Key,
}

impl Drop for Vacating<'_> {
    fn drop(&mut self) {
        self.flights.map.remove(&self.key);
    }
}

impl Flight {
    /// How long until the claim this flight waits on lapses at the latest.
    fn retry_after(&self) -> Duration {
        let at = *self.retry_at.lock().unwrap_or_else(PoisonError::into_inner);
        at.saturating_duration_since(Instant::now())
    }

    /// Follows the flight until `deadline`: the record its leader landed,
    /// `None` when the flight was vacated (contend for the key again), or
    /// the error to answer: other arguments with the key, the leader's
    /// shared failure, or the key still in progress at the deadline. Tells
    /// `call` how long it waited.
    pub(crate) async fn follow(
        &self,
        fingerprint: Fingerprint,
        deadline: Instant,
        call: &Call,
    ) -> Result<Option<Record>, Error> {
        if self.fingerprint != fingerprint {
            return Err(Error::KeyReused);
        }
        let waiting = Instant::now();
        let landed = tokio::time::timeout_at(deadline, self.landed()).await;
        call.waited(waiting.elapsed());
        match landed {
            Err(_elapsed) => Err(Error::InProgress {
                retry_after: self.retry_after(),
            }),
            Ok(Landing::Record(record)) => Ok(Some(record)),
            Ok(Landing::Failed(error)) => Err(error),
            Ok(Landing::Vacated) => Ok(None),
        }
    }

    /// Waits for the leader's landing.
    async fn landed(&self) -> Landing {
        loop {
            let mut notified = pin!(self.landed.notified());
            // Registered before the check, so a landing in between still wakes us.
            notified.as_mut().enable();
            if let Some(landing) = self.landing.get() {
                return landing.clone();
            }
            notified.await;
        }
    }
}

/// The leader's handle on its flight; dropping it unlanded vacates the flight.
pub(crate) struct Leader<'a> {
    flights: &'a Flights,
    key: Key,
    flight: Arc<Flight>,
}

impl Leader<'_> {
    pub(crate) fn set_retry_at(&self, at: Instant) {
        *self
            .flight
            .retry_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = at;
    }

    pub(crate) fn land(self, landing: Landing) {
        self.finish(landing);
    }

    /// Lands the flight once; a later call (the drop after `land`) does nothing.
    fn finish(&self, landing: Landing) {
        if self.flight.landing.get().is_some() {
            return;
        }
        self.flights
            .map
            .remove_if(&self.key, |_, flight| Arc::ptr_eq(flight, &self.flight));
        let _ = self.flight.landing.set(landing);
        self.flight.landed.notify_waiters();
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        self.finish(Landing::Vacated);
    }
}
