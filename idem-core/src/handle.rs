//! The handle users create once: a store and the calls in flight on it.

use std::fmt;
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::Duration;

use crate::error::Error;
use crate::flight::Flights;
use crate::key::Key;
use crate::store::memory::MemoryStore;
use crate::store::{HeldClaim, Inspection, Limits, Store, StoreError};

/// A long-lived handle on a store: what `#[idempotent(store = …)]` names,
/// and what code without the attribute runs calls on.
///
/// Create one per store at start-up and keep it (a field of your service, a
/// `static`); clones are cheap and share everything. Besides the store, a
/// handle owns the calls in flight on it: callers of one key on one handle
/// share one claim, so a thousand concurrent duplicates cost the store two
/// operations. Two handles on one store do not coalesce with each other, as
/// two processes would not; they still run each key once, through the store.
///
/// ```
/// use idem_core::{Fingerprint, Idempotency, Key, MemoryStore, Settings};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), idem_core::Error> {
/// let idem = Idempotency::new(MemoryStore::new());
/// let settings = Settings::default();
/// let key = Key::new("greet", &"req-1")?;
/// let fingerprint = Fingerprint::of(&"world")?;
/// let first: String = idem
///     .run(&settings, key, fingerprint, async { Ok::<_, idem_core::Error>("hello".into()) })
///     .await?;
/// let retry: String = idem
///     .run(&settings, key, fingerprint, async { Ok::<_, idem_core::Error>("again".into()) })
///     .await?;
/// assert_eq!(retry, "hello", "replayed, not run again");
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Idempotency {
    pub(crate) shared: Arc<Shared>,
}

pub(crate) struct Shared {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) flights: Flights,
    pub(crate) limits: Limits,
    pub(crate) max_record_bytes: usize,
}

/// The largest result a handle stores by default: 4 MiB of serialized JSON.
/// See [`Idempotency::max_record_bytes`].
pub const DEFAULT_MAX_RECORD_BYTES: usize = 4 << 20;

impl Idempotency {
    /// A handle on `store`.
    pub fn new<S: Store + 'static>(store: S) -> Self {
        Self::from_arc(Arc::new(store))
    }

    /// A handle on a store that is already shared, e.g. one
    /// [`connect`](crate::connect) opened.
    pub fn from_arc(store: Arc<dyn Store>) -> Self {
        Self {
            shared: Arc::new(Shared {
                limits: store.limits(),
                store,
                flights: Flights::default(),
                max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
            }),
        }
    }

    /// Sets the largest result, in bytes of serialized JSON, that calls on
    /// this handle store (default [`DEFAULT_MAX_RECORD_BYTES`]). Checked
    /// before the write: a larger result goes to its own caller, and the
    /// call is recorded as run but not replayable, so retries get
    /// [`Error::NotReplayable`] until the TTL ends instead of running the
    /// body again. The same happens when the store refuses a result (a full
    /// Redis answers `OOM`).
    ///
    /// Call it when building the handle, before any call runs on it.
    ///
    /// ```
    /// let idem = idem_core::Idempotency::memory().max_record_bytes(64 * 1024);
    /// # let _ = idem;
    /// ```
    #[must_use]
    pub fn max_record_bytes(self, max: usize) -> Self {
        Self {
            shared: Arc::new(Shared {
                store: Arc::clone(&self.shared.store),
                flights: Flights::default(),
                limits: self.shared.limits,
                max_record_bytes: max,
            }),
        }
    }

    /// A handle on a new in-process [`MemoryStore`].
    #[must_use]
    pub fn memory() -> Self {
        Self::new(MemoryStore::new())
    }

    /// Opens the store a URL names (see [`connect`](crate::connect)) and
    /// returns a handle on it.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), idem_core::store::StoreError> {
    /// let idem = idem_core::Idempotency::connect("memory://").await?;
    /// # let _ = idem;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`connect`](crate::connect).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        crate::store::connect(url).await.map(Self::from_arc)
    }

    /// The store calls run against.
    #[must_use]
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.shared.store
    }

    /// What `key` holds now: nothing, a claim in progress (how long it has
    /// been held, when it lapses) or a completed record (its outcome, when it
    /// was stored, when it expires, its size), without decoding the result.
    ///
    /// ```
    /// use idem_core::{Fingerprint, Idempotency, Inspection, Key, Settings};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), idem_core::Error> {
    /// let idem = Idempotency::memory();
    /// let key = Key::new("emails.send", &"welcome-42")?;
    /// assert_eq!(idem.inspect(key).await?, Inspection::Absent);
    /// idem.run(&Settings::default(), key, Fingerprint::UNCHECKED, async { Ok::<_, idem_core::Error>(1) })
    ///     .await?;
    /// assert!(matches!(idem.inspect(key).await?, Inspection::Completed { .. }));
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`Error::Store`] when the store fails or cannot inspect
    /// ([`StoreErrorKind::Unsupported`](crate::store::StoreErrorKind::Unsupported)).
    pub async fn inspect(&self, key: Key) -> Result<Inspection, Error> {
        Ok(self.shared.store.inspect(key).await?)
    }

    /// The names of the steps journaled under `key`, in the order they
    /// were done (see [`step`](crate::step)): what a call that failed
    /// midway got through, and where its next attempt resumes. Empty when
    /// the call used no steps or its journal expired. A call that failed
    /// for good lists `final` where its compensation began, then
    /// `undo:<step>` for each step undone (see
    /// [`Step::compensate`](crate::Step::compensate)); a step of your own
    /// named `final` or `undo:…` is listed alike, so leave those names to
    /// idem.
    ///
    /// ```
    /// use idem_core::{Fingerprint, Idempotency, Key, Settings, step};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), idem_core::Error> {
    /// let idem = Idempotency::memory();
    /// let key = Key::new("checkout", &"order-9")?;
    /// let failed: Result<(), idem_core::Error> = idem
    ///     .run(&Settings::default(), key, Fingerprint::UNCHECKED, async {
    ///         step("reserve", async { Ok::<_, idem_core::Error>(1) }).await?;
    ///         Err(idem_core::Error::AttemptFailed)
    ///     })
    ///     .await;
    /// assert!(failed.is_err());
    /// assert_eq!(idem.steps_done(key).await?, ["reserve"]);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`Error::Store`] when the store fails or keeps no journals
    /// ([`StoreErrorKind::Unsupported`](crate::store::StoreErrorKind::Unsupported)).
    pub async fn steps_done(&self, key: Key) -> Result<Vec<String>, Error> {
        let steps = self.shared.store.steps(key).await?;
        Ok(steps
            .into_iter()
            .map(|step| crate::steps::display_name(step.name))
            .collect())
    }

    /// Deletes whatever `key` holds — a completed record or a claim in
    /// progress, and the call's step journal — and answers whether there
    /// was a record or a claim (a journal alone, left by a call whose
    /// claim was released, is deleted all the same and answers `false`).
    ///
    /// **Risk.** This is for repairs after an incident. A forgotten
    /// *completed* key runs its body again on the next call: the retry it
    /// was protecting against is no longer recognized. A forgotten *claim*
    /// lets the next caller run while the holder may still be running (the
    /// holder's result is then not stored: it finds its claim lost). Forget
    /// a claim only when its holder is known to be dead or hung, e.g. one
    /// that [`claims_older_than`](Self::claims_older_than) lists far past
    /// any plausible run time.
    ///
    /// A call made through this handle (or a clone) after `forget` returns
    /// does not join a same-key call that was under way before it, whose
    /// store read may predate the forget: it runs the body, or replays a
    /// result stored after the forget. Another process's calls cannot be
    /// told: there, a call that joins a same-key call already under way may
    /// still share its result.
    ///
    /// # Errors
    /// [`Error::Store`] when the store fails or cannot forget.
    pub async fn forget(&self, key: Key) -> Result<bool, Error> {
        // Once the store answered, failed or the forget was cut off (the
        // delete may have landed in every case): a call under way in this
        // process may have read the record before it was deleted, and no
        // later call may join it and replay that record.
        let _vacating = self.shared.flights.vacating(key);
        Ok(self.shared.store.forget(key).await?)
    }

    /// Up to `limit` claims in progress made more than `age` ago, however
    /// often renewed since: calls that may be stuck. The memory store scans
    /// its map, Redis `SCAN`s the store's keys (every primary of a
    /// cluster; at most 100 000 keys a call, and a listing cut there says
    /// so in a warning), PostgreSQL queries its table. PostgreSQL lists the
    /// oldest first; the memory store and Redis in no order. An `age` no
    /// claim can have (a thousand years and more) lists nothing.
    ///
    /// # Errors
    /// [`Error::Store`] when the store fails or cannot list claims.
    pub async fn claims_older_than(
        &self,
        age: Duration,
        limit: usize,
    ) -> Result<Vec<HeldClaim>, Error> {
        Ok(self.shared.store.claims_older_than(age, limit).await?)
    }
}

/// A handle on a new in-process [`MemoryStore`], as [`Idempotency::memory`].
impl Default for Idempotency {
    fn default() -> Self {
        Self::memory()
    }
}

impl fmt::Debug for Idempotency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency").finish_non_exhaustive()
    }
}

/// Anything that names an [`Idempotency`] handle: the handle itself, a
/// reference to one, or an `Arc` or `Box` of one. `#[idempotent(store = …)]`
/// takes any of these.
#[diagnostic::on_unimplemented(
    message = "`store = …` takes an `idem_core::Idempotency` handle, not `{Self}`",
    label = "not an `Idempotency` handle",
    note = "build the handle once at start-up, e.g. `Idempotency::new(store)` or `Idempotency::connect(url).await?`, keep it (a field, a `static`), and name it: `store = self.idem`"
)]
pub trait AsIdempotency {
    /// The handle.
    fn as_idempotency(&self) -> &Idempotency;
}

impl AsIdempotency for Idempotency {
    fn as_idempotency(&self) -> &Idempotency {
        self
    }
}

macro_rules! forward_handle {
    ($($ty:ty),*) => {$(
        #[diagnostic::do_not_recommend]
        impl<H: AsIdempotency + ?Sized> AsIdempotency for $ty {
            fn as_idempotency(&self) -> &Idempotency {
                (**self).as_idempotency()
            }
        }
    )*};
}
forward_handle!(&H, Arc<H>, Box<H>);

/// A handle in a `static`:
///
/// ```
/// use std::sync::LazyLock;
/// use idem_core::{Idempotency, idempotent};
///
/// static IDEM: LazyLock<Idempotency> = LazyLock::new(Idempotency::memory);
///
/// #[idempotent(key = id, store = IDEM)]
/// async fn ship(id: u64) -> Result<u64, idem_core::Error> {
///     Ok(id)
/// }
/// ```
#[diagnostic::do_not_recommend]
impl<H: AsIdempotency, F: FnOnce() -> H> AsIdempotency for LazyLock<H, F> {
    fn as_idempotency(&self) -> &Idempotency {
        LazyLock::force(self).as_idempotency()
    }
}

static DEFAULT: OnceLock<Idempotency> = OnceLock::new();

/// Sets the process-wide handle that `#[idempotent]` functions without a
/// `store = …` argument use. Call it once, at start-up, before any such call.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let idem = idem_core::Idempotency::connect("memory://?max_records=1000").await?;
/// idem_core::set_default(idem).expect("set once, at start-up");
/// # Ok(())
/// # }
/// ```
///
/// # Errors
/// [`SetDefaultError`] when the default was already set, or already used
/// (which fixes it to an in-process memory store).
pub fn set_default(idem: Idempotency) -> Result<(), SetDefaultError> {
    DEFAULT.set(idem).map_err(|_| SetDefaultError(()))
}

/// The process-wide handle: the one given to [`set_default`], or else a
/// handle on an in-process [`MemoryStore`] made on first use.
pub fn default_handle() -> &'static Idempotency {
    DEFAULT.get_or_init(Idempotency::memory)
}

/// [`set_default`] was called after the default handle was set or used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetDefaultError(());

impl fmt::Display for SetDefaultError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "the default idempotency handle was already set or used; \
             call `idem_core::set_default` once, at start-up, before any call that uses it",
        )
    }
}

impl std::error::Error for SetDefaultError {}
