//! Multi-step calls: named steps journaled under the call's key, so that a
//! call run again after a failure resumes at its first step without an
//! entry instead of running every side effect again.
//!
//! The journal of the running call travels with its body's future in a
//! task-local, as the re-entry check's claims do: [`step`] finds it there,
//! and finds none outside an idempotent call's body.

use std::collections::{HashMap, HashSet};
use std::fmt::Display;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest as _, Sha256};
use tokio::task::futures::TaskLocalFuture;

use tracing::Instrument as _;

use crate::error::Error;
use crate::key::{Fingerprint, Key};
use crate::store::{JournaledStep, Record, Store, StoreError, Token};

/// The journal entry that says the call failed for good: its value is the
/// record of that failure. Names idem journals for itself start with
/// U+0001, which no step name people write does.
const FINAL: &str = "\u{1}final";

/// What idem's own journal entries start with; step names may not.
const RESERVED: char = '\u{1}';

/// The longest step name, in bytes (UTF-8): a journal entry is stored
/// under its name, and a store's index of names has a size limit
/// (PostgreSQL's btree takes about 2.7 KB), so longer names are refused,
/// with [`Error::InvalidStepName`], before the step's work runs.
pub const MAX_STEP_NAME_LEN: usize = 1024;

/// The first byte of the journaled value of a step that has a compensation
/// (a JSON value never starts with it): a later attempt knows the step must
/// be undone even if its body does not reach the step again.
const COMPENSABLE: u8 = 0x01;

/// The first byte of the journaled value of a step whose result did not
/// serialize: the rest is why. The step ran, so a later attempt answers
/// [`Error::NotReplayable`] instead of running it again.
const UNREPLAYABLE: u8 = 0x02;

/// The first byte of every journal entry this version writes, followed by
/// the fingerprint of the call that wrote it, then the entry's value: a
/// call of the key with other arguments finds the journal another call's
/// and is [`Error::KeyReused`], as it would be over that call's record.
/// (Entries written before it have no such prefix, and are read as they
/// are: no step value, flag or record starts with this byte.)
const ARGUMENTS: u8 = 0x03;

/// The length of the [`ARGUMENTS`] prefix.
const ARGUMENTS_PREFIX: usize = 1 + 32;

/// `value` as journaled by a call of `fingerprint`.
fn with_arguments(fingerprint: Fingerprint, value: &[u8]) -> Vec<u8> {
    let mut entry = Vec::with_capacity(ARGUMENTS_PREFIX + value.len());
    entry.push(ARGUMENTS);
    entry.extend_from_slice(fingerprint.digest());
    entry.extend_from_slice(value);
    entry
}

/// An entry's value, and the fingerprint of the call that journaled it
/// (`None` for an entry written without one).
fn arguments_of(mut entry: Vec<u8>) -> (Vec<u8>, Option<[u8; 32]>) {
    if entry.first() != Some(&ARGUMENTS) || entry.len() < ARGUMENTS_PREFIX {
        return (entry, None);
    }
    let mut digest = [0; 32];
    digest.copy_from_slice(&entry[1..ARGUMENTS_PREFIX]);
    entry.drain(..ARGUMENTS_PREFIX);
    (entry, Some(digest))
}

/// `bytes` behind the flag byte `flag` ([`COMPENSABLE`], [`UNREPLAYABLE`]).
fn flagged(flag: u8, bytes: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(bytes.len() + 1);
    value.push(flag);
    value.extend_from_slice(bytes);
    value
}

/// A journaled value without its compensation flag, and the flag.
fn unflagged(bytes: &[u8]) -> (&[u8], bool) {
    match bytes.split_first() {
        Some((&COMPENSABLE, rest)) => (rest, true),
        _ => (bytes, false),
    }
}

/// How many times a journal entry of a compensation is sent at most when
/// the store times out or cannot be reached: about a second of pauses.
const APPEND_TRIES: u32 = 5;

/// How many times a step that must not run while a call is compensated
/// lets the futures polled beside it run before it fails: a sibling
/// polled before or after it in each pass gets at least one whole pass.
const YIELDS_BEFORE_COMPENSATING: usize = 3;

/// The journal entry that says step `name`'s compensation ran.
fn undone(name: &str) -> String {
    format!("\u{1}undo:{name}")
}

/// A journal entry's name as operators read it: idem's own entries without
/// their marker (`final`, `undo:charge`).
pub(crate) fn display_name(name: String) -> String {
    match name.strip_prefix('\u{1}') {
        Some(own) => own.to_owned(),
        None => name,
    }
}

/// How much of a step's serialization error its journal entry keeps.
const MAX_UNREPLAYABLE_REASON: usize = 512;

/// `text` cut to at most [`MAX_UNREPLAYABLE_REASON`] bytes, at a character
/// boundary.
fn clipped(text: &str) -> &str {
    if text.len() <= MAX_UNREPLAYABLE_REASON {
        return text;
    }
    let mut end = MAX_UNREPLAYABLE_REASON;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The record of a failure the body marked final, whose error is not kept.
fn marked_final_record() -> Record {
    Record::unserializable("the call failed for good (its body marked the failure final)")
}

/// A compensation bound to its step's value, ready to run.
type Undo = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send>;

/// A compensation given to a step, bound to the step's value (decoded from
/// its journaled bytes) once the step has one.
type Unbound = Box<dyn FnOnce(&[u8]) -> Result<Undo, Error> + Send>;

/// The journal of the call whose body is running.
pub(crate) struct Journal {
    store: Arc<dyn Store>,
    key: Key,
    /// The call's fingerprint, which its entries carry.
    fingerprint: Fingerprint,
    token: Token,
    ttl: Duration,
    state: Mutex<State>,
    /// Whether a step or [`epoch`] found the call's claim no longer its own.
    lost: std::sync::atomic::AtomicBool,
    /// Whether the journal, once read, was written by a call of other
    /// arguments: this call is then [`Error::KeyReused`], and neither runs
    /// nor replays a step.
    other_arguments: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct State {
    /// The steps a previous attempt journaled, once read from the store.
    done: Option<HashMap<String, Vec<u8>>>,
    /// Where each of them is in the journal, which is the order they
    /// completed in.
    position: HashMap<String, usize>,
    /// The names this attempt has used.
    used: HashSet<String>,
    /// The fencing epoch this attempt was given, once asked for.
    epoch: Option<u64>,
    /// The compensations of this attempt's completed steps, each with when
    /// its step completed ([`Completed`]); those this attempt ran, in the
    /// order they completed.
    undos: Vec<(Completed, String, Undo)>,
    /// The steps with a compensation this attempt journaled.
    compensable: HashSet<String>,
    /// The steps with a compensation whose append this attempt sent
    /// without hearing that it landed (its answer was lost, or the step
    /// was dropped while it was on its way), with the entry sent: the
    /// journal may hold them, and their work ran. Their undos are in
    /// `undos` already.
    unconfirmed: HashMap<String, Vec<u8>>,
    /// Whether the body marked its failure final ([`mark_final`]).
    marked_final: bool,
    /// The journal's read under way, when a step asked for it before the
    /// journal was read: steps run together share it, and all see it once
    /// it is taken. It runs on a task of its own, so that a step future
    /// left unpolled while it reads holds up no other step.
    reading: Option<JournalRead>,
}

/// The answer of a journal's read under way, once it comes.
type JournalRead = tokio::sync::watch::Receiver<Option<Result<Vec<JournaledStep>, StoreError>>>;

/// When a step completed, for the order of the undos: a step replayed from
/// the journal completed in an earlier attempt, at its place in the journal,
/// before every step this attempt runs, which are pushed in the order they
/// complete and keep it under a stable sort. (Steps run concurrently
/// resolve in the order they are polled when replayed, not the order they
/// completed.)
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Completed {
    /// At this place in the journal.
    Earlier(usize),
    /// In this attempt.
    Now,
}

impl State {
    /// Takes the journal as read from the store, unless it was already;
    /// answers whether a call of arguments other than `fingerprint`'s
    /// journaled any of it.
    fn read(&mut self, steps: Vec<JournaledStep>, fingerprint: Fingerprint) -> bool {
        if self.done.is_some() {
            return false;
        }
        let mut done = HashMap::with_capacity(steps.len());
        let mut other = false;
        for (at, step) in steps.into_iter().enumerate() {
            let (value, by) = arguments_of(step.value);
            other |= by.is_some_and(|by| by != *fingerprint.digest());
            self.position.entry(step.name.clone()).or_insert(at);
            done.entry(step.name).or_insert(value);
        }
        self.done = Some(done);
        other
    }
}

tokio::task_local! {
    /// The journal of the call whose body is running; `None` inside a body
    /// that is outside every call's (a transactional PostgreSQL call's,
    /// even one made inside another call's body).
    static JOURNAL: Option<Arc<Journal>>;
    /// The step whose work is running, for the keys of its requests.
    static RUNNING: RunningStep;
}

/// The step whose work is running: its derived key, and how many keyed
/// requests it made so far.
struct RunningStep {
    key: Key,
    name: String,
    requests: std::sync::atomic::AtomicU32,
}

/// The idempotency key for the next keyed request made by the running
/// step's work (the `client` feature's [`RetryMiddleware`] and [`retry`]
/// send it): the step's derived key ([`step_key`]) for its first request,
/// then keys derived from the step's name and the request's number (after
/// a NUL, which no step name of a person's has, so that no other step's
/// key is one of them) for later ones: the same on every attempt of the
/// call as long as the step makes its requests in the same order. In an
/// undo, the keys of the undo's own name. `None` outside a step's work.
///
/// [`RetryMiddleware`]: crate::client::RetryMiddleware
/// [`retry`]: crate::client::retry
#[cfg_attr(not(feature = "client"), allow(dead_code))]
pub(crate) fn request_key() -> Option<String> {
    RUNNING
        .try_with(|running| {
            let n = running
                .requests
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1;
            if n == 1 {
                derive_step_key(running.key, &running.name)
            } else {
                derive_step_key(running.key, &format!("{}\0{n}", running.name))
            }
        })
        .ok()
}

/// How a call's attempt ends once its body returned, as its journal says.
pub(crate) enum Ending {
    /// As the body's result says.
    AsIs,
    /// The call failed for good and its compensations all ran: this record
    /// is its outcome. `replace` when the body's result is not the
    /// caller's (the attempt only finished a compensation begun earlier),
    /// and the record's replay is.
    Final { record: Record, replace: bool },
    /// The call failed for good and a compensation could not run (it
    /// failed, or could not be journaled): the claim is released, so that
    /// the next attempt goes on with the compensations not yet done.
    /// `record` as in [`Ending::Final`].
    Unfinished { record: Record, replace: bool },
}

impl Journal {
    /// The journal of the call that holds `key` with `token`: steps are
    /// journaled under `key` for `ttl`. `read` is the journal as read with
    /// the claim, if it was; else the first step reads it.
    pub(crate) fn new(
        store: Arc<dyn Store>,
        key: Key,
        fingerprint: Fingerprint,
        token: Token,
        ttl: Duration,
        read: Option<Vec<JournaledStep>>,
    ) -> Arc<Self> {
        let mut state = State::default();
        let other = read.is_some_and(|steps| state.read(steps, fingerprint));
        Arc::new(Self {
            store,
            key,
            fingerprint,
            token,
            ttl,
            state: Mutex::new(state),
            lost: std::sync::atomic::AtomicBool::new(false),
            other_arguments: std::sync::atomic::AtomicBool::new(other),
        })
    }

    /// Whether the journal, as read so far, is another call's: one of
    /// other arguments journaled steps under the key (see [`ARGUMENTS`]).
    pub(crate) fn other_arguments(&self) -> bool {
        self.other_arguments
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Takes the journal as read from the store.
    fn take_read(&self, steps: Vec<JournaledStep>) {
        if self.state().read(steps, self.fingerprint) {
            self.other_arguments
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Whether a step or [`epoch`] of the call found its claim taken over
    /// (the store refused it as no longer the call's own).
    pub(crate) fn claim_lost(&self) -> bool {
        self.lost.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `body`, run as the body of this journal's call.
    pub(crate) fn scope<F: Future>(
        self: &Arc<Self>,
        body: F,
    ) -> TaskLocalFuture<Option<Arc<Self>>, F> {
        JOURNAL.scope(Some(Arc::clone(self)), body)
    }

    /// Whether this attempt only finishes the compensation of a call that
    /// failed for good earlier: the journal read says so.
    fn compensating(&self) -> bool {
        self.state()
            .done
            .as_ref()
            .is_some_and(|done| done.contains_key(FINAL))
    }

    /// After the body returned (`failed`: with an `Err` or a panic, and
    /// `record` what would be stored): when the call failed for good (a
    /// failure is stored, or the body marked it final) or an earlier attempt
    /// found it did, runs the compensations of the completed steps not yet
    /// undone, last step first, each journaled once it ran, while `held`
    /// says the claim is still this attempt's. The call's outcome is final
    /// only once every step journaled with a compensation was undone.
    pub(crate) async fn end(
        self: &Arc<Self>,
        failed: bool,
        record: Option<&Record>,
        held: &(dyn Fn() -> bool + Sync),
    ) -> Ending {
        let (marked, unknown) = {
            let state = self.state();
            (state.marked_final, state.done.is_none())
        };
        if self.other_arguments() {
            // Another call's journal: its compensations are its own.
            return Ending::AsIs;
        }
        let compensating = self.compensating();
        // A stored failure: a kept `Err`, or one that could not be kept
        // whole (too large, unserializable), which is final all the same.
        let stored = record.filter(|_| failed);
        let final_now = failed && (stored.is_some() || marked);
        // Every call ends here: one that neither failed for good nor found
        // a compensation to finish goes no further.
        if !final_now && !compensating {
            return Ending::AsIs;
        }
        if final_now && unknown {
            // The body failed for good before its first step: the journal
            // may still say an earlier attempt's compensation is unfinished.
            match self.store.steps(self.key).await {
                Ok(steps) => {
                    self.take_read(steps);
                    if self.other_arguments() {
                        return Ending::AsIs;
                    }
                }
                Err(error) if error.kind() == crate::StoreErrorKind::Unsupported => {}
                Err(error) => {
                    tracing::warn!(key = %self.key, %error, "could not read the journal of a call that failed for good; its outcome is recorded on its next attempt");
                    return Ending::Unfinished {
                        record: stored.cloned().unwrap_or_else(marked_final_record),
                        replace: false,
                    };
                }
            }
        }
        // Steps with an undo whose append went unanswered ran their work:
        // a call that failed for good undoes them too, each once its entry
        // is written (below).
        let mut unconfirmed: HashMap<String, Vec<u8>> = if final_now {
            std::mem::take(&mut self.state().unconfirmed)
        } else {
            HashMap::new()
        };
        let (undos, earlier, needed) = {
            let mut state = self.state();
            let earlier = state
                .done
                .as_ref()
                .and_then(|done| done.get(FINAL).cloned());
            let mut needed: Vec<String> = state
                .done
                .iter()
                .flatten()
                .filter(|(name, value)| !name.starts_with(RESERVED) && unflagged(value).1)
                .map(|(name, _)| name.clone())
                .collect();
            needed.extend(state.compensable.iter().cloned());
            needed.extend(unconfirmed.keys().cloned());
            let mut undos = std::mem::take(&mut state.undos);
            // Stable: the steps this attempt ran keep their completion order.
            undos.sort_by_key(|(completed, _, _)| *completed);
            (undos, earlier, needed)
        };
        // The undos of an attempt that finishes an earlier one's
        // compensation run after a write fenced by its claim, as the first
        // attempt's run after journaling the outcome: a holder paused past
        // its lease must not undo what a newer holder may have undone.
        let mut fence = earlier.clone();
        let (outcome, replace) = if let Some(bytes) = earlier {
            match Record::decode(bytes) {
                Ok(record) => (record, true),
                Err(error) => {
                    tracing::error!(key = %self.key, %error, "the journaled outcome of a call that failed for good does not decode; its compensation cannot finish");
                    return Ending::Unfinished {
                        record: marked_final_record(),
                        replace: false,
                    };
                }
            }
        } else {
            if !final_now {
                return Ending::AsIs;
            }
            let outcome = stored.cloned().unwrap_or_else(marked_final_record);
            if needed.is_empty() {
                return Ending::Final {
                    record: outcome,
                    replace: false,
                };
            }
            // Steps whose append went unanswered ran their work: their
            // entries are written first (one that landed keeps its value),
            // in the order they completed, so that whatever stops this
            // compensation, the attempt that finishes it knows them.
            let unanswered: Vec<(String, Vec<u8>)> = undos
                .iter()
                .filter_map(|(_, name, _)| Some((name.clone(), unconfirmed.remove(name)?)))
                .collect();
            for (name, value) in unanswered {
                match self.append_retrying(&name, value, held).await {
                    Ok(()) => {}
                    Err(Error::StepLost { .. }) => return Ending::AsIs,
                    Err(error) => {
                        tracing::warn!(key = %self.key, step = %name, %error, "could not journal a step of a call that failed for good; its next attempt runs the body again");
                        return Ending::Unfinished {
                            record: outcome,
                            replace: false,
                        };
                    }
                }
            }
            // Before the first compensation runs: an attempt after a crash
            // must know the call failed for good, and how.
            match self.journal_final(&outcome, held).await {
                Ok(outcome) => (outcome, false),
                // The claim is another's now (this holder stalled past its
                // lease): what it did stands, and this outcome is not stored.
                Err(Error::StepLost { .. }) => return Ending::AsIs,
                Err(error) => {
                    tracing::warn!(key = %self.key, %error, "could not journal that a call failed for good; its compensations run on its next attempt");
                    return Ending::Unfinished {
                        record: outcome,
                        replace: false,
                    };
                }
            }
        };
        let unfinished = |why: &str, step: &str| {
            tracing::warn!(key = %self.key, %step, why, "a compensation did not complete; it goes on at the call's next attempt");
            Ending::Unfinished {
                record: outcome.clone(),
                replace,
            }
        };
        let mut undone_now: HashSet<String> = HashSet::new();
        for (_, name, undo) in undos.into_iter().rev() {
            let entry = undone(&name);
            let done = self
                .state()
                .done
                .as_ref()
                .is_some_and(|done| done.contains_key(&entry));
            if done {
                undone_now.insert(name);
                continue;
            }
            // Never undo on a claim that may be another's by now.
            if !held() || self.claim_lost() {
                return unfinished("the claim's lease ran out", &name);
            }
            if let Some(outcome) = fence.take() {
                // The entry is there: appending it again changes nothing
                // but asks the store whether the claim is still ours.
                match self.append_retrying(FINAL, outcome, held).await {
                    Ok(()) => {}
                    // Another holder finishes the compensation; this
                    // caller gets the recorded failure, not its body's.
                    Err(Error::StepLost { .. }) => {
                        return unfinished("the claim is another holder's now", &name);
                    }
                    Err(error) => return unfinished(&error.to_string(), &name),
                }
            }
            // In the call's scope and a step's of its own, so that `epoch`
            // works and its requests carry keys stable across attempts.
            let running = RunningStep {
                key: self.key,
                name: entry.clone(),
                requests: std::sync::atomic::AtomicU32::new(0),
            };
            let run = JOURNAL.scope(Some(Arc::clone(self)), RUNNING.scope(running, undo()));
            let ran = match crate::engine::caught(run).await {
                Ok(Ok(())) => self
                    .append_retrying(&entry, Vec::new(), held)
                    .await
                    .map_err(|e| e.to_string()),
                Ok(Err(error)) => Err(error),
                Err(_panic) => Err("it panicked".to_owned()),
            };
            if let Err(error) = ran {
                return unfinished(&error, &name);
            }
            tracing::info!(key = %self.key, step = %name, "compensated a step of a call that failed for good");
            undone_now.insert(name);
        }
        // A step journaled with a compensation that this attempt did not
        // reach (its body failed before it), or whose append it did not
        // hear land, cannot be undone now: the next attempt replays it,
        // which gives idem its compensation.
        let done = self.state().done.clone().unwrap_or_default();
        if let Some(missing) = needed
            .iter()
            .find(|name| !undone_now.contains(*name) && !done.contains_key(&undone(name)))
        {
            return unfinished(
                "this attempt did not reach the step, or did not hear its append land, so its undo is not known",
                missing,
            );
        }
        Ending::Final {
            record: outcome,
            replace,
        }
    }

    /// Journals that the call failed for good with `outcome`; a store too
    /// full for it keeps the few bytes that say the call ran instead.
    /// Answers the outcome journaled.
    async fn journal_final(
        &self,
        outcome: &Record,
        held: &(dyn Fn() -> bool + Sync),
    ) -> Result<Record, Error> {
        match self
            .append_retrying(FINAL, outcome.encode().to_vec(), held)
            .await
        {
            Ok(()) => Ok(outcome.clone()),
            Err(Error::Store(error)) if error.kind() == crate::StoreErrorKind::Full => {
                let compact = outcome.unkept(&format!(
                    "the call failed for good; the store refused to keep its result ({} bytes)",
                    outcome.payload().len()
                ));
                self.append_retrying(FINAL, compact.encode().to_vec(), held)
                    .await?;
                Ok(compact)
            }
            Err(error) => Err(error),
        }
    }

    /// [`append`](Self::append), tried again (up to [`APPEND_TRIES`] times
    /// in all) while the claim is held when the store timed out or was
    /// unreachable: an
    /// entry already there keeps its first value, so a repeat whose first
    /// try landed unheard changes nothing. For the entries that say a call
    /// failed for good and that an undo ran, whose loss would make the next
    /// attempt run the body, or the undo, again.
    async fn append_retrying(
        &self,
        name: &str,
        value: Vec<u8>,
        held: &(dyn Fn() -> bool + Sync),
    ) -> Result<(), Error> {
        let mut pauses = crate::engine::backoff(Duration::from_millis(10), Duration::from_secs(1));
        let mut tries = 1;
        loop {
            match self.append(name, value.clone()).await {
                Err(Error::Store(error))
                    if matches!(
                        error.kind(),
                        crate::StoreErrorKind::Timeout | crate::StoreErrorKind::Unavailable
                    ) && tries < APPEND_TRIES
                        && held()
                        && !self.claim_lost() =>
                {
                    tries += 1;
                    tracing::debug!(key = %self.key, %error, entry = %display_name(name.to_owned()), "a journal entry was not written; retrying");
                    tokio::time::sleep(pauses.next().unwrap_or(Duration::from_secs(1))).await;
                }
                done => return done,
            }
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Notes that this attempt runs step `name`; false if it ran it before.
    fn mark(&self, name: &str) -> bool {
        self.state().used.insert(name.to_owned())
    }

    /// Step `name`'s journaled result, reading the journal from the store
    /// on the first step of the attempt.
    /// [`Error::KeyReused`] when the journal is another call's.
    async fn recorded(&self, name: &str) -> Result<Option<Vec<u8>>, Error> {
        let cached = self
            .state()
            .done
            .as_ref()
            .map(|done| done.get(name).cloned());
        let found = match cached {
            Some(found) => found,
            None => {
                let reading = {
                    let mut state = self.state();
                    if state.done.is_some() {
                        None
                    } else {
                        Some(
                            state
                                .reading
                                .get_or_insert_with(|| {
                                    let (tell, read) = tokio::sync::watch::channel(None);
                                    let (store, key) = (Arc::clone(&self.store), self.key);
                                    tokio::spawn(
                                        async move {
                                            let _ = tell.send(Some(store.steps(key).await));
                                        }
                                        .in_current_span(),
                                    );
                                    read
                                })
                                .clone(),
                        )
                    }
                };
                if let Some(mut reading) = reading {
                    let answered = reading
                        .wait_for(Option::is_some)
                        .await
                        .ok()
                        // Taken by a step that woke first: not copied again.
                        .and_then(|read| {
                            if self.state().done.is_some() {
                                Some(Ok(Vec::new()))
                            } else {
                                read.clone()
                            }
                        });
                    let read = answered.unwrap_or_else(|| {
                        Err(StoreError::new(
                            crate::StoreErrorKind::Other,
                            "the journal's read ended without an answer (its runtime stopped)",
                        ))
                    });
                    let mut state = self.state();
                    let ours = state
                        .reading
                        .as_ref()
                        .is_some_and(|current| current.same_channel(&reading));
                    if ours {
                        // Taken, or failed: the next step reads it again.
                        state.reading = None;
                    }
                    drop(state);
                    match read {
                        Ok(steps) => self.take_read(steps),
                        Err(error) => return Err(error.into()),
                    }
                }
                self.state()
                    .done
                    .as_ref()
                    .and_then(|done| done.get(name).cloned())
            }
        };
        if self.other_arguments() {
            return Err(Error::KeyReused);
        }
        Ok(found)
    }

    /// Step `name` ran and its result does not serialize: journals that it
    /// ran, so that later attempts answer [`Error::NotReplayable`] rather
    /// than run it again, and answers the error for this attempt
    /// ([`Error::Encode`], or [`Error::StepLost`] when the claim is another's).
    async fn unreplayable(&self, name: &str, error: serde_json::Error) -> Error {
        tracing::error!(key = %self.key, step = name, %error, "the result of a step does not serialize; later attempts get Error::NotReplayable and do not run it again");
        let marker = |why: &str| flagged(UNREPLAYABLE, why.as_bytes());
        // A serializer's message may be of any length: the journal keeps
        // its start, and a store too full even for that keeps the marker
        // alone, which still says the step ran.
        let why = format!("its result did not serialize: {error}");
        let appended = match self.append(name, marker(clipped(&why))).await {
            Err(Error::Store(full)) if full.kind() == crate::StoreErrorKind::Full => {
                self.append(name, marker("its result did not serialize"))
                    .await
            }
            appended => appended,
        };
        match appended {
            Ok(()) => {}
            Err(lost @ Error::StepLost { .. }) => return lost,
            Err(journal) => {
                tracing::warn!(key = %self.key, step = name, record_lost = true, error = %journal, "could not journal that a step ran; its next attempt runs it again");
            }
        }
        Error::encode("step result", error)
    }

    /// Journals step `name`'s result, fenced by the call's claim.
    async fn append(&self, name: &str, value: Vec<u8>) -> Result<(), Error> {
        let entry = with_arguments(self.fingerprint, &value);
        let appended = self
            .store
            .append_step(self.key, self.token, name.to_owned(), entry, self.ttl)
            .await?;
        if appended {
            Ok(())
        } else {
            self.lost.store(true, std::sync::atomic::Ordering::Relaxed);
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
///   does not run; so does a name that starts with U+0001 (idem's own
///   journal entries), contains U+0000 or is longer than
///   [`MAX_STEP_NAME_LEN`] (1 KiB), with [`Error::InvalidStepName`].
/// - **Only `Ok` is journaled.** A step that returns `Err` is not recorded
///   and runs again on the next attempt.
/// - **A step is at most once per journal entry, not per side effect.** If
///   the process dies after `work`'s side effect and before its entry is
///   written, the next attempt runs it again: make the downstream call
///   idempotent with [`step_key`], which is the same on every attempt.
/// - **The journal lives as long as the call's record** (the call's TTL from
///   its last step): a call run again after that starts afresh. A body
///   that runs longer than its TTL between two steps outlives the entries
///   before that gap, and a later attempt runs those steps again: keep the
///   TTL longer than a call runs.
/// - **A lost claim stops the call.** When the call's claim is no longer its
///   own (its lease lapsed and another attempt took over), the step's result
///   is not journaled and `step` fails with [`Error::StepLost`].
/// - The step's result must serialize and deserialize (serde JSON). One
///   that does not serialize fails the step with [`Error::Encode`]; `work`
///   ran, so idem journals that it did, and later attempts of the call fail
///   the step with [`Error::NotReplayable`] instead of running it again
///   (a compensation given to it cannot run: there is no value to undo).
///   One that does not deserialize fails its replays with
///   [`Error::Decode`].
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
pub fn step<T, E, F>(name: &str, work: F) -> Step<impl Future<Output = Result<T, E>>>
where
    T: Serialize + DeserializeOwned,
    E: From<Error>,
    F: Future<Output = Result<T, E>>,
{
    let undo = Arc::new(Mutex::new(None));
    Step {
        future: run_step(name, work, Arc::clone(&undo)),
        undo,
    }
}

async fn run_step<T, E, F>(name: &str, work: F, undo: Arc<Mutex<Option<Unbound>>>) -> Result<T, E>
where
    T: Serialize + DeserializeOwned,
    E: From<Error>,
    F: Future<Output = Result<T, E>>,
{
    // Refused outside a call too: a fn with such a step must not work when
    // called plainly and fail once it is made idempotent.
    if name.starts_with(RESERVED) || name.contains('\0') || name.len() > MAX_STEP_NAME_LEN {
        return Err(Error::InvalidStepName {
            name: name.to_owned().into(),
        }
        .into());
    }
    let Some(journal) = current() else {
        return work.await;
    };
    if !journal.mark(name) {
        return Err(Error::StepRepeated {
            name: name.to_owned().into(),
        }
        .into());
    }
    let unbound = undo.lock().unwrap_or_else(PoisonError::into_inner).take();
    let (value, bytes, completed) = if let Some(journaled) = journal.recorded(name).await? {
        if let Some((&UNREPLAYABLE, why)) = journaled.split_first() {
            return Err(Error::NotReplayable {
                reason: format!(
                    "its step `{name}` ran, and {}",
                    String::from_utf8_lossy(why)
                ),
            }
            .into());
        }
        tracing::debug!(key = %journal.key, step = name, "replaying a journaled step");
        let bytes = unflagged(&journaled).0.to_vec();
        let value = serde_json::from_slice(&bytes).map_err(Error::decode)?;
        let at = journal.state().position.get(name).copied().unwrap_or(0);
        (value, bytes, Completed::Earlier(at))
    } else {
        if journal.compensating() {
            // Steps run beside this one (`join!`, `try_join!`) get their
            // turns first, whichever order they are polled in: replayed
            // from the journal, they give idem their undos before this
            // error can make the body drop them.
            for _ in 0..YIELDS_BEFORE_COMPENSATING {
                tokio::task::yield_now().await;
            }
            return Err(Error::Compensating {
                name: name.to_owned().into(),
            }
            .into());
        }
        let running = RunningStep {
            key: journal.key,
            name: name.to_owned(),
            requests: std::sync::atomic::AtomicU32::new(0),
        };
        let value = RUNNING.scope(running, work).await?;
        let bytes = match serde_json::to_vec(&value) {
            Ok(bytes) => bytes,
            Err(error) => return Err(journal.unreplayable(name, error).await.into()),
        };
        let journaled = if unbound.is_some() {
            flagged(COMPENSABLE, &bytes)
        } else {
            bytes.clone()
        };
        // The work ran: its undo is known from now on, and until the
        // append's answer comes the step may be journaled even if this
        // attempt never hears that it was (an answer lost, the step
        // dropped on its way).
        let mut unbinding = None;
        if let Some(unbound) = unbound {
            match unbound(&bytes) {
                Ok(bound) => {
                    let mut state = journal.state();
                    state.undos.push((Completed::Now, name.to_owned(), bound));
                    state.unconfirmed.insert(name.to_owned(), journaled.clone());
                }
                Err(error) => unbinding = Some(error),
            }
        }
        let appended = journal.append(name, journaled).await;
        {
            let mut state = journal.state();
            if state.unconfirmed.contains_key(name) {
                match &appended {
                    Ok(()) => {
                        state.unconfirmed.remove(name);
                        state.compensable.insert(name.to_owned());
                    }
                    // Refused as no longer the call's: nothing was
                    // journaled, and another holder runs the call.
                    Err(Error::StepLost { .. }) => {
                        state.unconfirmed.remove(name);
                        state.undos.retain(|(_, undone, _)| undone != name);
                    }
                    // Unknown: undone if the call fails for good.
                    Err(_) => {}
                }
            }
        }
        if let Err(error) = &appended
            && !matches!(error, Error::StepLost { .. })
        {
            // Its work ran: unless the journal took the entry after all, the
            // call's next attempt runs the step again (or, failing for good,
            // undoes it).
            tracing::warn!(key = %journal.key, step = name, record_lost = true, %error, "could not journal that a step ran; its next attempt may run it again");
        }
        appended?;
        if let Some(error) = unbinding {
            // Journaled with its undo, which cannot be bound: the call that
            // fails for good stays unfinished, as for a step not reached.
            journal.state().compensable.insert(name.to_owned());
            return Err(error.into());
        }
        return Ok(value);
    };
    if let Some(unbound) = unbound {
        let bound = unbound(&bytes)?;
        journal
            .state()
            .undos
            .push((completed, name.to_owned(), bound));
    }
    Ok(value)
}

/// A step of an idempotent call, made by [`step`]: await it to run it, or
/// give it a compensation first with [`compensate`](Self::compensate).
#[must_use = "a step does nothing unless awaited"]
pub struct Step<F> {
    future: F,
    undo: Arc<Mutex<Option<Unbound>>>,
}

impl<F> std::fmt::Debug for Step<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Step").finish_non_exhaustive()
    }
}

impl<F: Future> IntoFuture for Step<F> {
    type Output = F::Output;
    type IntoFuture = F;

    fn into_future(self) -> F {
        self.future
    }
}

impl<T, E, F> Step<F>
where
    F: Future<Output = Result<T, E>>,
{
    /// Declares how to undo this step: `undo` gets the step's result and
    /// runs when the call fails for good, after the steps that completed
    /// after this one were undone (last step first).
    ///
    /// A call fails for good when its body returns an `Err` that is stored
    /// (the attribute's `cache_errors`,
    /// [`Idempotency::run_caching_errors`](crate::Idempotency::run_caching_errors))
    /// or after the body called [`mark_final`]. Then,
    /// before the failure is recorded, the compensations of the steps that
    /// completed (in this attempt or, replayed from the journal, in an
    /// earlier one) run, each at most once: each is journaled when it
    /// returns `Ok`. An undo that fails or panics stops the compensation;
    /// the claim is released, and the next attempt of the call goes on with
    /// the undos not yet done. A step whose append to the journal this
    /// attempt did not hear land (its answer was lost, or the step was
    /// dropped on its way, as `try_join!` drops the steps beside one that
    /// failed) ran its work: its entry is written again before the failure
    /// is, and it is undone in its place too. Undos run only while the
    /// claim is this attempt's,
    /// each after a write that the store accepts only from the claim's
    /// holder.
    ///
    /// The next attempt of a call whose compensation began (after a crash,
    /// or a failed undo) finishes it: its body runs again, its journaled
    /// steps replay (which gives idem their compensations), a step not
    /// journaled does not run but fails with [`Error::Compensating`] (once
    /// the futures polled beside it had a few turns to run, so that steps
    /// run together replay before the body drops them, when each branch
    /// reaches its step without waiting on anything else first), and
    /// once the undos ran the call's outcome is the failure recorded when
    /// it failed for good, whatever the body returned. The body must reach
    /// its completed steps the same way again, as for any replay.
    ///
    /// `undo` must own what it uses (`move` clones of handles): it may run
    /// after the body's borrows ended. Outside an idempotent call (see
    /// [`step`]) the compensation is ignored.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicI64, Ordering};
    /// use idem_core::{Error, Fingerprint, Idempotency, Key, Settings, step};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Error> {
    /// let idem = Idempotency::memory();
    /// let balance = Arc::new(AtomicI64::new(100));
    /// let key = Key::new("order", &7)?;
    /// let fingerprint = Fingerprint::of(&())?;
    /// let cache_all = |_: &String| true;
    /// let result: Result<(), String> = idem
    ///     .run_caching_errors(&Settings::default(), key, fingerprint, cache_all, async {
    ///         let refund = Arc::clone(&balance);
    ///         step("charge", async {
    ///             balance.fetch_sub(30, Ordering::SeqCst);
    ///             Ok::<_, String>(30)
    ///         })
    ///         .compensate(move |charged: i64| async move {
    ///             refund.fetch_add(charged, Ordering::SeqCst);
    ///             Ok::<_, String>(())
    ///         })
    ///         .await?;
    ///         Err("out of stock".to_owned())
    ///     })
    ///     .await;
    /// assert_eq!(result, Err("out of stock".to_owned()));
    /// assert_eq!(balance.load(Ordering::SeqCst), 100, "the charge was undone");
    /// # Ok(())
    /// # }
    /// ```
    pub fn compensate<U, UF, UE>(self, undo: U) -> Self
    where
        T: DeserializeOwned + Send + 'static,
        U: FnOnce(T) -> UF + Send + 'static,
        UF: Future<Output = Result<(), UE>> + Send + 'static,
        UE: Display + 'static,
    {
        let unbound: Unbound = Box::new(move |bytes: &[u8]| {
            let value: T = serde_json::from_slice(bytes).map_err(Error::decode)?;
            let bound: Undo = Box::new(move || {
                Box::pin(async move { undo(value).await.map_err(|error| error.to_string()) })
            });
            Ok(bound)
        });
        *self.undo.lock().unwrap_or_else(PoisonError::into_inner) = Some(unbound);
        self
    }
}

/// Marks the running call's failure as final: when its body returns an
/// `Err`, the compensations of its completed steps run (see
/// [`Step::compensate`]) even though the error is not stored, and the
/// call's record then says it failed for good, so its retries get
/// [`Error::NotReplayable`] instead of running it again. A body that
/// returns `Ok` after marking is not affected. Behind the HTTP layer every
/// response it stores (a `4xx` too) is the handler's `Ok`: a handler's
/// steps are undone when it marks its failure final and answers a status
/// the layer does not store (a `5xx`).
///
/// # Errors
///
/// [`Error::OutsideCall`] outside the body of a call run by an
/// [`Idempotency`](crate::Idempotency) handle.
pub fn mark_final() -> Result<(), Error> {
    let journal = current().ok_or(Error::OutsideCall { what: "mark_final" })?;
    journal.state().marked_final = true;
    Ok(())
}

/// Whether the body running (if any) marked its failure final.
#[cfg(feature = "consumer")]
pub(crate) fn marked_final() -> bool {
    current().is_some_and(|journal| journal.state().marked_final)
}

/// The journal of the call whose body is running, if any.
fn current() -> Option<Arc<Journal>> {
    JOURNAL.try_with(Clone::clone).ok().flatten()
}

/// Runs `body` outside every call's journal: a transactional PostgreSQL
/// call's body, whose transaction commits or rolls back with its result,
/// made inside another call's body or not. Its steps run as they are, and
/// `epoch()` and `mark_final()` answer `OutsideCall`, as documented.
#[cfg(feature = "postgres")]
pub(crate) fn outside_calls<F: Future>(body: F) -> impl Future<Output = F::Output> {
    JOURNAL.scope(None, body)
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
/// [`Error::ClaimLost`] when the call's claim is no longer its own as it
/// first asks (no epoch is given to a holder that may be stale; one given
/// earlier in the attempt is answered again from memory, without asking
/// the store), [`Error::OutsideCall`]
/// outside the body of a call run by an [`Idempotency`](crate::Idempotency)
/// handle (a transactional PostgreSQL call's transaction fences its writes
/// itself), [`Error::Store`] when the store cannot answer (or keeps no
/// epochs: [`StoreErrorKind::Unsupported`](crate::StoreErrorKind::Unsupported)).
pub async fn epoch() -> Result<u64, Error> {
    let Some(journal) = current() else {
        return Err(Error::OutsideCall { what: "epoch" });
    };
    if let Some(epoch) = journal.state().epoch {
        return Ok(epoch);
    }
    let Some(epoch) = journal
        .store
        .epoch(journal.key, journal.token, journal.ttl)
        .await?
    else {
        journal
            .lost
            .store(true, std::sync::atomic::Ordering::Relaxed);
        return Err(Error::ClaimLost);
    };
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
    current().map(|journal| derive_step_key(journal.key, name))
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

    /// A name idem refuses in a call is refused outside one too, before
    /// its work runs: a fn does not work plainly and fail once idempotent.
    #[tokio::test]
    async fn outside_a_call_a_name_idem_refuses_is_refused() {
        for name in ["\u{1}final", "a\0b"] {
            let mut ran = false;
            let value: Result<u8, Error> = step(name, async {
                ran = true;
                Ok(1)
            })
            .await;
            assert!(
                matches!(value, Err(Error::InvalidStepName { .. })),
                "{name:?}: {value:?}"
            );
            assert!(!ran, "{name:?}");
        }
    }
}
