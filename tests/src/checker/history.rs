//! The history of one run: every body's start and end, every caller's
//! answer and the outcome idem told for it, and the faults that struck.

use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::faults::Struck;

/// What a caller got back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// `Ok` with the value of run `run` (padded with `padding` bytes).
    Ok {
        /// The run whose value it is.
        run: u64,
    },
    /// The body's own `Err` of run `run`, returned or replayed.
    BodyErr {
        /// The run whose error it is.
        run: u64,
    },
    /// An idem error, by kind (`in_progress`, `store`, `not_replayable`, …).
    Idem(String),
    /// The call panicked with this message.
    Panicked(String),
    /// The caller dropped the call.
    Cancelled,
}

/// One event of a history.
#[derive(Debug, Clone)]
pub enum Event {
    /// A call arrived.
    Called {
        /// The call.
        call: usize,
        /// Its key.
        key: usize,
    },
    /// The body of `call` started as run `run`.
    BodyStarted {
        /// The call.
        call: usize,
        /// Its key.
        key: usize,
        /// The run's number, unique in the history.
        run: u64,
    },
    /// Run `run` ended.
    BodyEnded {
        /// The run.
        run: u64,
        /// How: `ok`, `err` or `panic`.
        how: &'static str,
    },
    /// Run `run` did the effect of step `step` of `key`'s body (its work
    /// ran; a replayed step does not count).
    StepDone {
        /// The key.
        key: usize,
        /// The step's index.
        step: u8,
        /// The run that did it.
        run: u64,
    },
    /// Step `step` of `key`, whose effect run `run` did, returned: its
    /// journal entry is written, and steps started after this event are
    /// journaled after it.
    StepJournaled {
        /// The key.
        key: usize,
        /// The step's index.
        step: u8,
        /// The run that did it.
        run: u64,
    },
    /// Step `step` of `key`, whose effect run `run` did, failed because
    /// its journal entry could not be written (or its answer was lost):
    /// the step may run again, at most once per journal entry.
    StepUnjournaled {
        /// The key.
        key: usize,
        /// The step's index.
        step: u8,
        /// The run that did it.
        run: u64,
    },
    /// Run `run` got step `step` of `key` from the journal: its value is
    /// run `from`'s, which did the step's effect.
    StepReplayed {
        /// The key.
        key: usize,
        /// The step's index.
        step: u8,
        /// The run that replayed it.
        run: u64,
        /// The run that did it.
        from: u64,
    },
    /// Run `by` undid step `step` of `key` (the call failed for good).
    StepUndone {
        /// The key.
        key: usize,
        /// The step's index.
        step: u8,
        /// The run whose compensation ran it.
        by: u64,
    },
    /// The holder of `key` paused for `for_` (its renewals lost).
    Stalled {
        /// The key.
        key: usize,
        /// For how long.
        for_: Duration,
    },
    /// `call` got its answer after `took`.
    Answered {
        /// The call.
        call: usize,
        /// What it got.
        answer: Answer,
        /// How long the call took.
        took: Duration,
    },
    /// idem told `outcome` for `call`.
    Outcome {
        /// The call.
        call: usize,
        /// The outcome's name.
        outcome: String,
    },
    /// idem said a result for `key` was, or may be, not recorded (its event
    /// with `record_lost = true`; counted in `idem_records_lost_total` or
    /// `idem_claims_lost_total`).
    RecordLost {
        /// The key.
        key: usize,
    },
    /// At the end of the run, `key`'s journal held `entries` (idem's own
    /// as `final` and `undo:<step>`), and its record was `completed`.
    JournalAtEnd {
        /// The key.
        key: usize,
        /// The journal's entries, in order.
        entries: Vec<String>,
        /// Whether the key held a completed record.
        completed: bool,
    },
    /// `begins` claims of `key` were sent in the whole run.
    Begins {
        /// The key.
        key: usize,
        /// How many.
        begins: usize,
    },
    /// A store fault struck an operation on `key`.
    Fault {
        /// The key (index), when it is one of the workload's.
        key: Option<usize>,
        /// The fault.
        struck: Struck,
    },
}

/// The events of one run, in order.
#[derive(Debug, Default)]
pub struct History {
    start: Mutex<Option<Instant>>,
    events: Mutex<Vec<(Duration, Event)>>,
}

impl History {
    /// Starts the clock of the history.
    pub fn start(&self) {
        *self.start.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
    }

    fn since_start(&self, at: Instant) -> Duration {
        let start = self.start.lock().unwrap_or_else(PoisonError::into_inner);
        start.map_or(Duration::ZERO, |start| at.saturating_duration_since(start))
    }

    /// Appends `event`, happening now.
    pub fn push(&self, event: Event) {
        self.push_at(Instant::now(), event);
    }

    /// Appends `event`, which happened at `at`.
    pub fn push_at(&self, at: Instant, event: Event) {
        let since = self.since_start(at);
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((since, event));
    }

    /// The events so far, by time.
    pub fn events(&self) -> Vec<(Duration, Event)> {
        let mut events = self
            .events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        events.sort_by_key(|(at, _)| *at);
        events
    }
}

impl fmt::Display for History {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (at, event) in self.events() {
            writeln!(f, "  {:>9.3}s  {}", at.as_secs_f64(), Line(&event))?;
        }
        Ok(())
    }
}

struct Line<'a>(&'a Event);

impl fmt::Display for Line<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Event::Called { call, key } => write!(f, "call {call} arrives on key {key}"),
            Event::BodyStarted { call, key, run } => {
                write!(f, "call {call}: body run {run} starts (key {key})")
            }
            Event::BodyEnded { run, how } => write!(f, "body run {run} ends: {how}"),
            Event::StepDone { key, step, run } => {
                write!(f, "body run {run} does step {step} of key {key}")
            }
            Event::StepJournaled { key, step, run } => {
                write!(f, "body run {run} journaled step {step} of key {key}")
            }
            Event::StepUnjournaled { key, step, run } => write!(
                f,
                "body run {run}'s step {step} of key {key} was not journaled (a store error)"
            ),
            Event::StepReplayed {
                key,
                step,
                run,
                from,
            } => write!(
                f,
                "body run {run} replays step {step} of key {key}, as run {from} did it"
            ),
            Event::StepUndone { key, step, by } => {
                write!(f, "run {by}'s compensation undoes step {step} of key {key}")
            }
            Event::Stalled { key, for_ } => {
                write!(f, "the holder of key {key} pauses for {for_:?}")
            }
            Event::Answered { call, answer, took } => {
                write!(f, "call {call} answered {answer:?} after {took:?}")
            }
            Event::Outcome { call, outcome } => write!(f, "call {call}: idem tells `{outcome}`"),
            Event::Begins { key, begins } => write!(f, "{begins} claims of key {key} were sent"),
            Event::JournalAtEnd {
                key,
                entries,
                completed,
            } => write!(
                f,
                "at the end, key {key}'s journal holds {entries:?}; its record is {}",
                if *completed { "completed" } else { "absent" }
            ),
            Event::RecordLost { key } => {
                write!(f, "idem: a result for key {key} may not be recorded")
            }
            Event::Fault { key, struck } => write!(
                f,
                "fault: {:?} on {:?} of key {}",
                struck.fault,
                struck.op,
                key.map_or_else(|| "?".to_owned(), |k| k.to_string())
            ),
        }
    }
}
