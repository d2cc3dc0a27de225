//! Message consumers (feature `consumer`; `nats` adds JetStream): each
//! message's side effect happens once, however often the broker delivers it.
//!
//! Brokers deliver at least once: after a consumer crash, an ack lost on the
//! wire, an ack deadline that passed, or a publisher that retried, a message
//! comes again. A [`Consumer`] runs a message's handler once per message id
//! and hands redeliveries the first outcome:
//!
//! 1. the message id (from the broker: `Nats-Msg-Id`, or a key of the
//!    user's choice) is the idempotency key, in the consumer's name;
//! 2. the handler runs once per id; its `Ok` is stored for the TTL
//!    (default 24 h; keep it longer than the broker may redeliver);
//! 3. the message is acknowledged only after the outcome is recorded, so a
//!    lost ack or a crash before it leads to a redelivery that is replayed:
//!    skipped and acknowledged;
//! 4. a redelivery that arrives while the first delivery is still running
//!    waits for its outcome (in this process, or polling another's), and
//!    never runs in parallel; while a handler runs, the consumer tells the
//!    broker it is in progress (a heartbeat), so its ack deadline does not
//!    pass.
//!
//! # What happens to each outcome
//!
//! | outcome | the message is |
//! |---|---|
//! | the handler returned `Ok` (or an earlier delivery did: a replay) | acknowledged |
//! | the handler returned `Err` or panicked, delivery `n` < `max_deliveries` (5) | nak'ed, redelivered after a backoff: 1 s · 2ⁿ⁻¹, at most 60 s; a panic releases the claim at once like an `Err` |
//! | the handler ran past [`handler_timeout`](Consumer::handler_timeout) (none by default) | cancelled, and the same as an `Err` |
//! | the handler returned `Err` or panicked on the last delivery, or returned `Err` having marked its failure final ([`mark_final`](crate::mark_final)) on any | dead-lettered: published to the dead-letter subject when one is set, and terminated; the failure is recorded (as one [header-safe](header_text) line) |
//! | an earlier delivery failed for good (recorded) | dead-lettered again, without running the handler; also when only that it failed could be kept (its reason was larger than [`max_record_bytes`](crate::Idempotency::max_record_bytes), or refused by a full store) |
//! | its dead letter cannot be published | nak'ed with the backoff and only the dead letter tried again, through delivery `max_deliveries + dead_letter_attempts - 1` (a message without an id: once); then terminated without one (logged at `ERROR` with its key) |
//! | the handler ran but its outcome could not be recorded before the lease ended (a success, or a failure for good, also one whose steps' undos are left to finish) | nak'ed with the backoff, never acknowledged nor dead-lettered |
//! | another delivery of the id is running elsewhere past the wait | nak'ed, redelivered after that delivery's remaining lease |
//! | the idempotency store is down | nak'ed with the backoff; never dead-lettered, never run unguarded |
//! | the id was used before with another payload | dead-lettered: it is another message under a taken id |
//! | the message has no id | dead-lettered |
//! | it ran before, but its outcome cannot be replayed (no longer decodes) | acknowledged: its side effect happened |
//!
//! Handler errors before the last delivery are never stored (unless the
//! handler marked them final): the next delivery runs the handler again. Error texts and panic messages of any
//! shape (newlines, control characters, 10 KB) reach the dead letter as
//! one [header-safe](header_text) line of at most [`MAX_REASON_LEN`]
//! bytes. Nothing a message does (a panic, odd text, a broker that refuses
//! its ack or dead letter) stops [`Consumer::run`] or the other messages in
//! flight, but for a handler that never returns: it holds its slot (with
//! [`concurrency`](Consumer::concurrency) 1, the consumer) unless
//! [`handler_timeout`](Consumer::handler_timeout) bounds it. A message is acknowledged only when the store confirmed its
//! outcome's record (the engine is told so by the store's answer; no read
//! back is needed).
//!
//! A message's key is `Key::new(consumer_name, message_id)`: to run a
//! dead-lettered message again after a fix,
//! [`forget`](crate::Idempotency::forget) that key first, e.g.
//! `idem.forget(Key::new(consumer.name(), "order-17")?)`.
//!
//! # Ordering and batching
//!
//! idem's promise is per message: each id's side effect happens once. It
//! adds no ordering beyond the broker's: messages are processed
//! `concurrency` at a time (default 16; 1 keeps the broker's delivery
//! order, except that a nak'ed message comes back later), and a redelivery
//! is processed whenever the broker sends it. The JetStream integration
//! pulls `concurrency` messages at a time; each message of a batch is
//! claimed, run, recorded and acknowledged on its own, so a crash mid-batch
//! replays the messages that were recorded and runs the others.
//!
//! # Other brokers
//!
//! The core is broker-neutral: an integration implements [`Message`] for its
//! broker's message type (read the id, payload and delivery count; ack,
//! nak, dead-letter, heartbeat) and hands a stream of them to
//! [`Consumer::run`]. The JetStream integration ([`jetstream`], feature
//! `nats`) is such an adapter; one for RabbitMQ (`lapin`) or Kafka would be
//! the same few methods:
//!
//! ```
//! use std::time::Duration;
//! use bytes::Bytes;
//! use idem_core::consumer::{AckError, Delivery, Message};
//!
//! /// A message of some broker whose client acknowledges by delivery tag.
//! /// Its delivery count comes from the broker (RabbitMQ quorum queues'
//! /// `x-delivery-count` header, plus one): a count that stops at 2 (a
//! /// "redelivered" flag) would never reach `max_deliveries`, and a failing
//! /// message would be nak'ed for ever instead of dead-lettered.
//! struct Incoming { id: String, body: Bytes, delivery_count: u32, tag: u64 }
//!
//! impl Message for Incoming {
//!     fn delivery(&self) -> Result<Delivery, String> {
//!         Ok(Delivery::new(self.id.clone(), self.body.clone())
//!             .deliveries(self.delivery_count))
//!     }
//!     async fn ack(&self) -> Result<(), AckError> {
//!         Ok(()) // channel.basic_ack(self.tag, …)
//!     }
//!     async fn nak(&self, _delay: Duration) -> Result<(), AckError> {
//!         Ok(()) // channel.basic_nack(self.tag, requeue = true)
//!     }
//!     async fn dead_letter(&self, _reason: &str) -> Result<(), AckError> {
//!         Ok(()) // channel.basic_reject(self.tag, requeue = false) to a dead-letter exchange
//!     }
//! }
//! ```

#[cfg(feature = "nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
pub mod jetstream;

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{FutureExt as _, Stream, StreamExt as _};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest as _, Sha256};

use crate::codec::ResultCodec;
use crate::observe::Operation;
use crate::{Error, Fingerprint, Idempotency, Key, Settings};

/// A message as a handler sees it: its id, payload and delivery count.
#[derive(Debug, Clone)]
pub struct Delivery {
    id: Arc<str>,
    subject: Arc<str>,
    payload: Bytes,
    deliveries: u32,
}

impl Delivery {
    /// A first delivery of the message `id` with `payload`.
    pub fn new(id: impl Into<Arc<str>>, payload: Bytes) -> Self {
        Self {
            id: id.into(),
            subject: Arc::from(""),
            payload,
            deliveries: 1,
        }
    }

    /// The subject, topic or queue it came from.
    #[must_use]
    pub fn subject(mut self, subject: impl Into<Arc<str>>) -> Self {
        self.subject = subject.into();
        self
    }

    /// Which delivery of the message this is: 1 for the first.
    #[must_use]
    pub fn deliveries(mut self, deliveries: u32) -> Self {
        self.deliveries = deliveries.max(1);
        self
    }

    /// The message id: the idempotency key.
    #[must_use]
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The subject, topic or queue it came from (empty if unknown).
    #[must_use]
    pub fn subject_name(&self) -> &str {
        &self.subject
    }

    /// The payload.
    #[must_use]
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// Which delivery of the message this is: 1 for the first.
    #[must_use]
    pub fn delivery_count(&self) -> u32 {
        self.deliveries
    }
}

/// What to tell the broker about a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Done: do not deliver it again.
    Ack,
    /// Not done: deliver it again after `delay`.
    Nak {
        /// When to deliver it again.
        delay: Duration,
    },
    /// It will never succeed: publish it to the dead-letter destination, if
    /// any, and do not deliver it again. After [`Consumer::handle`], also a
    /// message whose dead letter could not be published on its last
    /// attempt and that was terminated without one
    /// ([`Stats::dead_letters_failed`] counts those attempts).
    DeadLetter {
        /// Why, for the dead letter and the log.
        reason: String,
    },
}

/// How a delivery was handled.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Handled<T> {
    /// The handler ran and returned this.
    Ran(T),
    /// An earlier delivery's outcome, replayed; the handler did not run.
    Replayed(T),
    /// The handler ran and failed with this error (its `Display`), or
    /// panicked (`the handler panicked: …`).
    Failed(String),
    /// An earlier delivery failed for good (on the last delivery): its
    /// failure is recorded, the handler did not run again, and the message
    /// is dead-lettered once more (its dead letter may not have been
    /// published).
    FailedBefore(String),
    /// idem did not run the handler (the store is down, another delivery is
    /// running, the id was reused) or could not replay it.
    NotRun(Error),
}

impl<T> Handled<T> {
    /// The handler's value, run now or replayed.
    #[must_use]
    pub fn value(&self) -> Option<&T> {
        match self {
            Self::Ran(value) | Self::Replayed(value) => Some(value),
            Self::Failed(_) | Self::FailedBefore(_) | Self::NotRun(_) => None,
        }
    }

    /// Whether this delivery's handler ran (and failed or not).
    #[must_use]
    pub fn ran(&self) -> bool {
        matches!(self, Self::Ran(_) | Self::Failed(_))
    }
}

/// How a delivery was handled, and what to tell the broker.
#[derive(Debug, Clone)]
pub struct Outcome<T> {
    /// How it was handled.
    pub handled: Handled<T>,
    /// What to tell the broker.
    pub disposition: Disposition,
}

/// Counts of what a [`Consumer`] did, since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Deliveries processed.
    pub delivered: u64,
    /// Handler runs (side effects).
    pub ran: u64,
    /// Deliveries answered with an earlier delivery's outcome.
    pub replayed: u64,
    /// Handler runs that failed.
    pub failed: u64,
    /// Deliveries nak'ed for redelivery: by [`Consumer::handle`] and
    /// [`Consumer::run`], once the broker took the nak (a dead letter that
    /// could not be published and was nak'ed to be tried again included);
    /// by [`Consumer::process`], when it answers a nak.
    pub naked: u64,
    /// Deliveries dead-lettered: by [`Consumer::handle`] and
    /// [`Consumer::run`], once the dead letter was published (or, with no
    /// dead-letter subject, the message terminated); by
    /// [`Consumer::process`], when it answers a dead letter.
    pub dead_lettered: u64,
    /// Handler runs that panicked (also counted as failed).
    pub panicked: u64,
    /// Dead letters that could not be published (the message was nak'ed
    /// to try again, or terminated after the last attempt).
    pub dead_letters_failed: u64,
    /// Handler runs whose outcome could not be recorded (the message was
    /// nak'ed, not acknowledged).
    pub unrecorded: u64,
}

#[derive(Default)]
struct Counters {
    panicked: AtomicU64,
    dead_letters_failed: AtomicU64,
    unrecorded: AtomicU64,
    delivered: AtomicU64,
    ran: AtomicU64,
    replayed: AtomicU64,
    failed: AtomicU64,
    naked: AtomicU64,
    dead_lettered: AtomicU64,
}

/// What a [`Message`] implementation's methods fail with: any error of the
/// broker's client.
pub type AckError = Box<dyn std::error::Error + Send + Sync>;

/// The broker failed: an ack, nak or dead letter was refused, or messages
/// could not be read. (A message left unsettled is redelivered in time, and
/// replayed.)
#[derive(Debug, thiserror::Error)]
#[error("the message broker failed: {0}")]
pub struct BrokerError(#[source] pub AckError);

impl From<AckError> for BrokerError {
    fn from(error: AckError) -> Self {
        Self(error)
    }
}

/// A broker's message, as [`Consumer::run`] handles it: the one trait a
/// broker integration implements.
pub trait Message: Send + Sync {
    /// The message's id, payload and delivery count; `Err` with the reason
    /// when it has no usable id (it is then dead-lettered).
    ///
    /// # Errors
    ///
    /// Why the message has no id.
    fn delivery(&self) -> Result<Delivery, String>;

    /// Acknowledges it: done, never deliver again.
    fn ack(&self) -> impl Future<Output = Result<(), AckError>> + Send;

    /// Asks for it to be delivered again after `delay`.
    fn nak(&self, delay: Duration) -> impl Future<Output = Result<(), AckError>> + Send;

    /// Publishes it to a dead-letter destination (if the integration has
    /// one) and stops its delivery. `reason` is one line of at most
    /// [`MAX_REASON_LEN`] bytes without control characters (see
    /// [`header_text`]), safe to put in a header.
    ///
    /// An `Err` means the dead letter was not published and the message not
    /// settled: the consumer naks it and tries again on the next delivery,
    /// without running the handler again (see
    /// [`dead_letter_attempts`](Consumer::dead_letter_attempts)). A dead
    /// letter may be published again after an `Err` (when only stopping the
    /// delivery failed): publish it idempotently if the broker can.
    fn dead_letter(&self, reason: &str) -> impl Future<Output = Result<(), AckError>> + Send;

    /// Stops its delivery without a dead letter: for a message whose dead
    /// letter could not be published after the last attempt. The default
    /// acknowledges it; JetStream terminates it (`+TERM`).
    fn terminate(&self) -> impl Future<Output = Result<(), AckError>> + Send {
        self.ack()
    }

    /// Tells the broker it is still being worked on, so that its ack
    /// deadline does not pass; sent every [`heartbeat`](Consumer::heartbeat)
    /// while the handler runs. The default does nothing.
    fn in_progress(&self) -> impl Future<Output = Result<(), AckError>> + Send {
        async { Ok(()) }
    }
}

/// The longest `reason` that [`Message::dead_letter`] gets, in bytes.
pub const MAX_REASON_LEN: usize = 1024;

/// `text` made safe for a header value (NATS, HTTP, AMQP): line breaks,
/// tabs and other control characters escaped (`\n`, `\r`, `\t`,
/// `\u{7f}`), and cut at a character boundary to at most
/// [`MAX_REASON_LEN`] bytes, ending in `…` when cut. Applying it twice
/// changes nothing more.
#[must_use]
pub fn header_text(text: &str) -> String {
    use fmt::Write as _;
    const CUT: &str = "…";
    let mut safe = String::with_capacity(text.len().min(MAX_REASON_LEN));
    for c in text.chars() {
        if safe.len() > MAX_REASON_LEN {
            break;
        }
        match c {
            '\n' => safe.push_str("\\n"),
            '\r' => safe.push_str("\\r"),
            '\t' => safe.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(safe, "\\u{{{:x}}}", u32::from(c));
            }
            c => safe.push(c),
        }
    }
    if safe.len() > MAX_REASON_LEN {
        let mut end = MAX_REASON_LEN - CUT.len();
        while !safe.is_char_boundary(end) {
            end -= 1;
        }
        safe.truncate(end);
        safe.push_str(CUT);
    }
    safe
}

/// Processes messages once per message id on an [`Idempotency`] handle.
///
/// ```
/// use bytes::Bytes;
/// use idem_core::Idempotency;
/// use idem_core::consumer::{Consumer, Delivery, Disposition, Handled};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let consumer = Consumer::new(Idempotency::memory(), "emails.welcome");
/// let message = Delivery::new("msg-1", Bytes::from_static(b"ada@example.com"));
/// let send = |delivery: Delivery| async move {
///     // send the email …
///     Ok::<_, std::io::Error>(delivery.payload().len())
/// };
/// let first = consumer.process(message.clone(), send).await;
/// assert!(matches!(first.handled, Handled::Ran(15)));
/// let again = consumer.process(message.deliveries(2), send).await;
/// assert!(matches!(again.handled, Handled::Replayed(15))); // not sent twice
/// assert_eq!(again.disposition, Disposition::Ack);
/// # }
/// ```
#[derive(Clone)]
pub struct Consumer {
    idem: Idempotency,
    name: Arc<str>,
    settings: Settings,
    max_deliveries: u32,
    backoff: (Duration, Duration),
    heartbeat: Option<Duration>,
    handler_timeout: Option<Duration>,
    concurrency: usize,
    dead_letter_attempts: u32,
    counters: Arc<Counters>,
}

impl Consumer {
    /// The default delivery limit for handler errors: 5.
    pub const DEFAULT_MAX_DELIVERIES: u32 = 5;
    /// The default first nak delay: 1 s; it doubles per delivery.
    pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_secs(1);
    /// The default largest nak delay: 60 s.
    pub const DEFAULT_BACKOFF_CAP: Duration = Duration::from_secs(60);
    /// The default heartbeat: every 10 s (a third of JetStream's default
    /// ack wait).
    pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);
    /// The default number of messages processed at once: 16.
    pub const DEFAULT_CONCURRENCY: usize = 16;
    /// The default number of deliveries on which a dead letter that cannot
    /// be published is tried: 5.
    pub const DEFAULT_DEAD_LETTER_ATTEMPTS: u32 = 5;

    /// A consumer named `name` (the keys' namespace: two consumers of one
    /// stream with different names each process every message once) on
    /// `idem`, with the default [`Settings`]. The name is idem's, not the
    /// broker's: two JetStream consumers given one name here share their
    /// records, and the second acknowledges, without running it, a message
    /// the first ran.
    pub fn new(idem: Idempotency, name: impl Into<Arc<str>>) -> Self {
        Self {
            idem,
            name: name.into(),
            settings: Settings::DEFAULT,
            max_deliveries: Self::DEFAULT_MAX_DELIVERIES,
            backoff: (Self::DEFAULT_BACKOFF_BASE, Self::DEFAULT_BACKOFF_CAP),
            heartbeat: Some(Self::DEFAULT_HEARTBEAT),
            handler_timeout: None,
            concurrency: Self::DEFAULT_CONCURRENCY,
            dead_letter_attempts: Self::DEFAULT_DEAD_LETTER_ATTEMPTS,
            counters: Arc::default(),
        }
    }

    /// The settings of every message's call: its TTL (how long a processed
    /// id is remembered: longer than the broker may redeliver), lease and
    /// conflict policy.
    #[must_use]
    pub fn settings(mut self, settings: Settings) -> Self {
        self.settings = settings;
        self
    }

    /// The delivery from which a handler's failure is final (default 5; at
    /// least 1): a handler that fails (or panics) on delivery
    /// `max_deliveries` or later dead-letters the message; on an earlier one
    /// it is nak'ed with the [backoff](Self::backoff).
    ///
    /// Deliveries are numbered as the broker counts them
    /// ([`Delivery::delivery_count`]), so those on which the handler did not
    /// run count too: the store was down, another process held the id, a
    /// redelivery came after the ack wait. A message whose first deliveries
    /// met a store outage has fewer handler runs left; with the defaults
    /// (backoff 1 s, 2 s, 4 s, 8 s) an outage of 15 s leaves it one.
    #[must_use]
    pub fn max_deliveries(mut self, deliveries: u32) -> Self {
        self.max_deliveries = deliveries.max(1);
        self
    }

    /// The nak delay after a failed delivery `n`: `base · 2ⁿ⁻¹`, at most
    /// `cap` (default 1 s and 60 s).
    #[must_use]
    pub fn backoff(mut self, base: Duration, cap: Duration) -> Self {
        self.backoff = (base, cap.max(base));
        self
    }

    /// How often to tell the broker that a message is still in progress
    /// while its handler runs (default 10 s; keep it below the ack wait),
    /// or `None` for never.
    #[must_use]
    pub fn heartbeat(mut self, every: Option<Duration>) -> Self {
        self.heartbeat = every.filter(|every| !every.is_zero());
        self
    }

    /// How long a handler may run on one delivery (default `None`: as long
    /// as it takes). A handler still running then is cancelled at its
    /// current `.await` and the delivery fails like a handler's `Err`: nak'ed
    /// with the backoff, or dead-lettered on the last delivery, its claim
    /// released. Without a limit, a handler that never returns (a
    /// dependency that never answers) holds its message's slot for good:
    /// its heartbeats keep the broker from redelivering it and its lease
    /// from lapsing, so with [`concurrency`](Self::concurrency) 1 nothing
    /// else is consumed. Give it well above the slowest handler's run
    /// (it cancels work that was under way, which the next delivery runs
    /// again).
    #[must_use]
    pub fn handler_timeout(mut self, limit: Option<Duration>) -> Self {
        self.handler_timeout = limit.filter(|limit| !limit.is_zero());
        self
    }

    /// How many messages [`run`](Self::run) processes at once (default 16;
    /// at least 1).
    #[must_use]
    pub fn concurrency(mut self, messages: usize) -> Self {
        self.concurrency = messages.max(1);
        self
    }

    /// How many deliveries a dead letter that cannot be published is tried
    /// on (default 5; at least 1). A message fails for good on delivery
    /// `max_deliveries`; that failure is recorded, so the handler does not
    /// run again. When the dead letter cannot be published (no stream
    /// captures its subject, the stream is full), the message is nak'ed with
    /// the backoff and the dead letter alone is tried again on the next
    /// delivery, through delivery `max_deliveries + attempts - 1`; after
    /// that the message is [terminated](Message::terminate) without one,
    /// logged at `ERROR` and counted in [`Stats::dead_letters_failed`].
    /// (The broker must allow those deliveries: a JetStream `max_deliver`
    /// below them ends the retries sooner.)
    ///
    /// The recorded failure lasts the TTL: a message with the same id and
    /// payload published again (a dead letter sent back to be retried) is
    /// dead-lettered again without running, until its key is
    /// [forgotten](Idempotency::forget).
    #[must_use]
    pub fn dead_letter_attempts(mut self, attempts: u32) -> Self {
        self.dead_letter_attempts = attempts.max(1);
        self
    }

    /// The last delivery on which a dead letter is tried.
    fn last_dead_letter_delivery(&self) -> u32 {
        self.max_deliveries
            .saturating_add(self.dead_letter_attempts)
            .saturating_sub(1)
    }

    /// Checks the settings against the store's limits (a lease at least
    /// three times the store's response timeout, so that a renewal that
    /// times out can be retried): settings that fail it would nak every
    /// message without running it. The JetStream integration's `consume`
    /// checks at start.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] naming the rule that is broken.
    pub fn check(&self) -> Result<(), Error> {
        match self.idem.shared.limits.response_timeout {
            Some(timeout) if self.settings.lease() < timeout.saturating_mul(3) => {
                Err(Error::Config(
                    crate::ConfigError::lease_too_short_for_store(self.settings.lease(), timeout),
                ))
            }
            _ => Ok(()),
        }
    }

    /// The consumer's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What this consumer (and its clones) did so far.
    #[must_use]
    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        Stats {
            delivered: c.delivered.load(Ordering::Relaxed),
            ran: c.ran.load(Ordering::Relaxed),
            replayed: c.replayed.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            naked: c.naked.load(Ordering::Relaxed),
            dead_lettered: c.dead_lettered.load(Ordering::Relaxed),
            panicked: c.panicked.load(Ordering::Relaxed),
            dead_letters_failed: c.dead_letters_failed.load(Ordering::Relaxed),
            unrecorded: c.unrecorded.load(Ordering::Relaxed),
        }
    }

    /// Handles one delivery: runs `handler` once per message id (and
    /// payload), returning how it went and what to tell the broker. Returns
    /// only after the outcome is recorded.
    pub async fn process<T, E, F, Fut>(&self, delivery: Delivery, handler: F) -> Outcome<T>
    where
        F: FnOnce(Delivery) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        T: Serialize + DeserializeOwned,
        E: fmt::Display,
    {
        let outcome = self.decide_counted(delivery, handler).await;
        match outcome.disposition {
            Disposition::Ack => {}
            Disposition::Nak { .. } => {
                self.counters.naked.fetch_add(1, Ordering::Relaxed);
            }
            Disposition::DeadLetter { .. } => {
                self.counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
            }
        }
        outcome
    }

    /// [`decide`](Self::decide)s a delivery and counts how it was handled;
    /// what is told to the broker is counted by the caller, once it is.
    async fn decide_counted<T, E, F, Fut>(&self, delivery: Delivery, handler: F) -> Outcome<T>
    where
        F: FnOnce(Delivery) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        T: Serialize + DeserializeOwned,
        E: fmt::Display,
    {
        self.counters.delivered.fetch_add(1, Ordering::Relaxed);
        let outcome = self.decide(delivery, handler).await;
        let counters = &self.counters;
        match &outcome.handled {
            Handled::Ran(_) => {
                counters.ran.fetch_add(1, Ordering::Relaxed);
            }
            Handled::Replayed(_) => {
                counters.replayed.fetch_add(1, Ordering::Relaxed);
            }
            Handled::Failed(_) => {
                counters.ran.fetch_add(1, Ordering::Relaxed);
                counters.failed.fetch_add(1, Ordering::Relaxed);
            }
            Handled::FailedBefore(_) | Handled::NotRun(_) => {}
        }
        outcome
    }

    async fn decide<T, E, F, Fut>(&self, delivery: Delivery, handler: F) -> Outcome<T>
    where
        F: FnOnce(Delivery) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        T: Serialize + DeserializeOwned,
        E: fmt::Display,
    {
        let deliveries = delivery.delivery_count();
        let key = match Key::new(&self.name, delivery.id()) {
            Ok(key) => key,
            Err(error) => return self.not_run(error, deliveries),
        };
        let fingerprint = Fingerprint::from_digest(Sha256::digest(delivery.payload()).into());
        let (ran, recorded) = (AtomicBool::new(false), AtomicBool::new(false));
        let last = deliveries >= self.max_deliveries;
        let handler_timeout = self.handler_timeout;
        let body = async {
            ran.store(true, Ordering::Relaxed);
            // A panic is this delivery's failure: the claim is released at
            // once and the loop serving other messages goes on.
            let running = AssertUnwindSafe(async move { handler(delivery).await }).catch_unwind();
            // `None`: the handler ran past its limit, and was cancelled.
            let result = match handler_timeout {
                None => Some(running.await),
                Some(limit) => tokio::time::timeout(limit, running).await.ok(),
            };
            let error = match result {
                Some(Ok(Ok(value))) => return Ok(value),
                Some(Ok(Err(error))) => error_text(&error),
                None => {
                    let limit = handler_timeout.unwrap_or_default();
                    tracing::warn!(
                        ?limit,
                        "idem: a message handler ran past its handler_timeout; cancelled, its delivery failed"
                    );
                    format!("the handler did not finish within its handler_timeout ({limit:?})")
                }
                Some(Err(panic)) => {
                    self.counters.panicked.fetch_add(1, Ordering::Relaxed);
                    let error = format!("the handler panicked: {}", panic_message(&*panic));
                    // One bounded line: a panic's message may quote anything.
                    tracing::error!(error = %header_text(&error), "idem: a message handler panicked");
                    error
                }
            };
            // A failure the handler marked final (`mark_final`) is final on
            // any delivery.
            let marked = crate::steps::marked_final();
            Err(if last || marked {
                // Recorded: its redeliveries are dead-lettered again without
                // running the handler.
                let how = if marked { " (marked final)" } else { "" };
                Failure::Final {
                    reason: format!("the handler failed on delivery {deliveries}{how}: {error}"),
                    error,
                }
            } else {
                Failure::Handler(error)
            })
        };
        let result = self
            .idem
            .execute(
                &self.settings,
                Operation::from(Arc::clone(&self.name)),
                key,
                fingerprint,
                body,
                ConsumerCodec {
                    recorded: &recorded,
                },
            )
            .await;
        let ran = ran.load(Ordering::Relaxed);
        match result {
            Ok(value) if ran && recorded.load(Ordering::Relaxed) => Outcome {
                handled: Handled::Ran(value),
                disposition: Disposition::Ack,
            },
            Ok(value) if ran => {
                // Acknowledging it would let a message whose outcome is not
                // recorded go; the redelivery replays it if the record landed
                // after all.
                self.counters.unrecorded.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    %key,
                    "idem: a message's handler ran but the store did not confirm its outcome; nak'ing it instead of acknowledging it"
                );
                Outcome {
                    handled: Handled::Ran(value),
                    disposition: Disposition::Nak {
                        delay: self.backoff_after(deliveries),
                    },
                }
            }
            Ok(value) => Outcome {
                handled: Handled::Replayed(value),
                disposition: Disposition::Ack,
            },
            Err(Failure::Handler(error)) => Outcome {
                handled: Handled::Failed(error),
                disposition: Disposition::Nak {
                    delay: self.backoff_after(deliveries),
                },
            },
            Err(Failure::Final { reason, error }) if ran && recorded.load(Ordering::Relaxed) => {
                Outcome {
                    handled: Handled::Failed(error),
                    disposition: Disposition::DeadLetter { reason },
                }
            }
            Err(Failure::Final { error, .. }) if ran => {
                // Not recorded (the store did not confirm it, or steps' undos
                // are left to finish): dead-lettering it would end the
                // message with nothing to tell a redelivery; the next
                // delivery runs or finishes it.
                self.counters.unrecorded.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    %key,
                    "idem: a message's handler failed for good but the store did not confirm its outcome; nak'ing it instead of dead-lettering it"
                );
                Outcome {
                    handled: Handled::Failed(error),
                    disposition: Disposition::Nak {
                        delay: self.backoff_after(deliveries),
                    },
                }
            }
            Err(Failure::Final { reason, .. }) => Outcome {
                handled: Handled::FailedBefore(reason.clone()),
                disposition: Disposition::DeadLetter { reason },
            },
            Err(Failure::Idem(error)) => self.not_run(error, deliveries),
        }
    }

    fn not_run<T>(&self, error: Error, deliveries: u32) -> Outcome<T> {
        let disposition = match &error {
            Error::InProgress { retry_after } => Disposition::Nak {
                delay: *retry_after,
            },
            Error::KeyReused => Disposition::DeadLetter {
                reason: "the message id was used before with another payload".to_owned(),
            },
            Error::InvalidKey { reason } => Disposition::DeadLetter {
                reason: format!("the message id is unusable: {reason}"),
            },
            Error::Encode { .. } => Disposition::DeadLetter {
                reason: error.to_string(),
            },
            // It ran before; only its outcome cannot be replayed.
            Error::NotReplayable { .. } | Error::Decode(_) => {
                tracing::warn!(%error, "idem: a redelivered message ran before but cannot be replayed; acknowledging it");
                Disposition::Ack
            }
            _ => Disposition::Nak {
                delay: self.backoff_after(deliveries),
            },
        };
        Outcome {
            handled: Handled::NotRun(error),
            disposition,
        }
    }

    fn backoff_after(&self, deliveries: u32) -> Duration {
        let (base, cap) = self.backoff;
        let doublings = deliveries.saturating_sub(1).min(31);
        base.saturating_mul(1 << doublings).min(cap)
    }

    /// Handles one broker message: reads its delivery, runs
    /// [`process`](Self::process) while sending heartbeats, then acks, naks
    /// or dead-letters it.
    ///
    /// # Errors
    ///
    /// When the broker refused the ack, nak or dead letter; the message is
    /// then redelivered in time, and replayed.
    pub async fn handle<M, T, E, F, Fut>(
        &self,
        message: &M,
        handler: F,
    ) -> Result<Outcome<T>, AckError>
    where
        M: Message,
        F: FnOnce(Delivery) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        T: Serialize + DeserializeOwned,
        E: fmt::Display,
    {
        let delivery = match message.delivery() {
            Ok(delivery) => delivery,
            Err(reason) => {
                self.counters.delivered.fetch_add(1, Ordering::Relaxed);
                let reason = format!("the message has no id: {reason}");
                tracing::error!(reason = %header_text(&reason), "idem: dead-lettering a message");
                // Without an id, the delivery count is unknown: one attempt.
                let disposition = self
                    .dead_letter(message, &reason, self.last_dead_letter_delivery())
                    .await?
                    .unwrap_or(Disposition::DeadLetter {
                        reason: "the message has no id".to_owned(),
                    });
                return Ok(Outcome {
                    handled: Handled::NotRun(Error::InvalidKey {
                        reason: reason.into(),
                    }),
                    disposition,
                });
            }
        };
        let deliveries = delivery.delivery_count();
        let mut outcome = {
            let processing = std::pin::pin!(self.decide_counted(delivery, handler));
            match self.heartbeat {
                None => processing.await,
                Some(every) => heartbeating(message, every, processing).await,
            }
        };
        match &outcome.disposition {
            Disposition::Ack => message.ack().await?,
            Disposition::Nak { delay } => {
                message.nak(*delay).await?;
                self.counters.naked.fetch_add(1, Ordering::Relaxed);
            }
            Disposition::DeadLetter { reason } => {
                let key = self.key_of(message);
                tracing::error!(key = key.map(tracing::field::display), deliveries, reason = %header_text(reason), "idem: dead-lettering a message");
                if let Some(nak) = self.dead_letter(message, reason, deliveries).await? {
                    outcome.disposition = nak;
                }
            }
        }
        Ok(outcome)
    }

    /// The key of `message`'s calls, for logs; `None` without a usable id.
    fn key_of<M: Message>(&self, message: &M) -> Option<Key> {
        key_of(&self.name, message)
    }

    /// Dead-letters `message`; when its dead letter cannot be published,
    /// naks it to try again on a later delivery (returning that nak), or
    /// terminates it after the last attempt. Counts what it told the broker.
    async fn dead_letter<M: Message>(
        &self,
        message: &M,
        reason: &str,
        deliveries: u32,
    ) -> Result<Option<Disposition>, AckError> {
        let Err(error) = message.dead_letter(&header_text(reason)).await else {
            self.counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        };
        self.counters
            .dead_letters_failed
            .fetch_add(1, Ordering::Relaxed);
        // Which message: its key, as every other log of the call names it.
        let key = self.key_of(message).map(tracing::field::display);
        if deliveries < self.last_dead_letter_delivery() {
            let delay = self.backoff_after(deliveries);
            tracing::error!(key, %error, ?delay, deliveries, "idem: could not publish a dead letter; nak'ing the message to try the dead letter alone again");
            message.nak(delay).await?;
            self.counters.naked.fetch_add(1, Ordering::Relaxed);
            Ok(Some(Disposition::Nak { delay }))
        } else {
            tracing::error!(key, %error, deliveries, reason = %header_text(reason), "idem: could not publish a dead letter on its last attempt; terminating the message without one");
            message.terminate().await?;
            Ok(None)
        }
    }

    /// Handles every message of `messages`, [`concurrency`](Self::concurrency)
    /// at a time, until the stream ends or yields an error. At an error it
    /// reads no further, finishes the messages in flight, and returns the
    /// error; the messages after it are the broker's to redeliver.
    ///
    /// A message whose ack, nak or dead letter fails is logged and left to
    /// the broker to redeliver (it is then replayed).
    ///
    /// # Errors
    ///
    /// The first error of the stream itself (the connection to the broker).
    pub async fn run<S, M, ME, T, E, F, Fut>(&self, messages: S, handler: F) -> Result<(), ME>
    where
        S: Stream<Item = Result<M, ME>>,
        M: Message,
        F: Fn(Delivery) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        T: Serialize + DeserializeOwned,
        E: fmt::Display,
    {
        if let Err(error) = self.check() {
            tracing::error!(%error, "idem: the consumer's settings cannot work; every message will be nak'ed without running");
        }
        let failed = std::sync::Mutex::new(None);
        let handler = &handler;
        messages
            .map(|message| {
                message
                    .map_err(|error| {
                        *failed.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                            Some(error);
                    })
                    .ok()
            })
            .take_while(|message| std::future::ready(message.is_some()))
            .for_each_concurrent(self.concurrency, |message| async move {
                let Some(message) = message else { return };
                // The handler's panics are caught in `process`; this catches
                // an integration's (settling a message), which must not stop
                // the other messages either.
                match AssertUnwindSafe(self.handle(&message, handler))
                    .catch_unwind()
                    .await
                {
                    Ok(Ok(_)) => {}
                    Ok(Err(error)) => {
                        let key = self.key_of(&message).map(tracing::field::display);
                        tracing::warn!(key, %error, "idem: could not settle a message with the broker; it will be redelivered");
                    }
                    Err(panic) => {
                        // Not named: reading its id may be what panicked.
                        tracing::error!(panic = panic_message(&*panic), "idem: settling a message panicked; it will be redelivered");
                    }
                }
            })
            .await;
        match failed
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

impl fmt::Debug for Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("name", &self.name)
            .field("settings", &self.settings)
            .field("max_deliveries", &self.max_deliveries)
            .field("backoff", &self.backoff)
            .field("heartbeat", &self.heartbeat)
            .field("handler_timeout", &self.handler_timeout)
            .field("concurrency", &self.concurrency)
            .field("dead_letter_attempts", &self.dead_letter_attempts)
            .finish_non_exhaustive()
    }
}

/// The key of `message`'s calls by the consumer `name`, for logs; `None`
/// without a usable id.
fn key_of<M: Message>(name: &str, message: &M) -> Option<Key> {
    Key::new(name, message.delivery().ok()?.id()).ok()
}

/// Polls `processing` to completion, telling the broker every `every` that
/// the message is in progress. A heartbeat that waits on the broker (a
/// reconnect) does not hold up the processing, which is polled throughout.
async fn heartbeating<M: Message, O>(
    message: &M,
    every: Duration,
    processing: std::pin::Pin<&mut impl Future<Output = O>>,
) -> O {
    // A period past the clock's range (`Duration::MAX`) never comes.
    let Some(first) = tokio::time::Instant::now().checked_add(every) else {
        return processing.await;
    };
    let beats = async {
        let mut ticks = tokio::time::interval_at(first, every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Told at `WARN` once per run of failures (during a broker outage
        // every message in flight fails each of its heartbeats).
        let mut told = false;
        loop {
            ticks.tick().await;
            match message.in_progress().await {
                Err(error) if !std::mem::replace(&mut told, true) => {
                    tracing::warn!(%error, "idem: could not send a message's heartbeat; the broker may redeliver it while it runs (the redelivery waits for it)");
                }
                Err(error) => {
                    tracing::debug!(%error, "idem: could not send a message's heartbeat again");
                }
                Ok(()) => told = false,
            }
        }
    };
    tokio::select! {
        outcome = processing => outcome,
        never = beats => never,
    }
}

/// A message call's error: the handler's (as text, never stored), its
/// final one (on the last delivery: stored, so that redeliveries are
/// dead-lettered without running it), or idem's.
enum Failure {
    Handler(String),
    Final { reason: String, error: String },
    Idem(Error),
}

/// A handler's error as text; one whose `Display` panics is told as such,
/// so that the delivery is settled like any other failure.
fn error_text(error: &impl fmt::Display) -> String {
    std::panic::catch_unwind(AssertUnwindSafe(|| error.to_string())).unwrap_or_else(|panic| {
        format!(
            "the handler failed, and its error's Display panicked: {}",
            panic_message(&*panic)
        )
    })
}

/// A panic's message, when it has one.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    if let Some(message) = panic.downcast_ref::<&str>() {
        message
    } else if let Some(message) = panic.downcast_ref::<String>() {
        message
    } else {
        "(no message)"
    }
}

/// The codec of a message's call: serde for `T`, errors never stored, and
/// the outcome recorded before the call returns, so that the message is
/// acknowledged only after; `recorded` is set when the store confirmed it.
struct ConsumerCodec<'a> {
    recorded: &'a AtomicBool,
}

impl<T: Serialize + DeserializeOwned> ResultCodec<T, Failure> for ConsumerCodec<'_> {
    fn encode_ok(&self, value: &T) -> serde_json::Result<Vec<u8>> {
        serde_json::to_vec(value)
    }

    fn decode_ok(&self, bytes: &[u8]) -> serde_json::Result<T> {
        serde_json::from_slice(bytes)
    }

    fn idem_error(&self, error: Error) -> Failure {
        Failure::Idem(error)
    }

    fn keep_err(&mut self, failure: &Failure) -> Option<serde_json::Result<Vec<u8>>> {
        match failure {
            // As the dead letter tells it: one line of a bounded length,
            // so that any error text makes a record the store keeps.
            Failure::Final { reason, .. } => Some(serde_json::to_vec(&header_text(reason))),
            Failure::Handler(_) | Failure::Idem(_) => None,
        }
    }

    fn decode_err(&self, bytes: &[u8]) -> Result<Failure, Error> {
        let reason: String = serde_json::from_slice(bytes).map_err(Error::decode)?;
        Ok(Failure::Final {
            error: reason.clone(),
            reason,
        })
    }

    fn unkept_err(&self, reason: &str) -> Option<Failure> {
        // It failed for good: its redeliveries are dead-lettered, as when
        // its reason was kept.
        let reason = format!("the handler failed for good; its reason was not kept: {reason}");
        Some(Failure::Final {
            error: reason.clone(),
            reason,
        })
    }

    fn awaits_record(&self) -> bool {
        true
    }

    fn recorded(&self, confirmed: bool) {
        self.recorded.store(confirmed, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests;
