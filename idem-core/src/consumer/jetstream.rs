//! NATS JetStream (feature `nats`): a pull consumer's messages processed
//! once per message id.
//!
//! ```no_run
//! use async_nats::jetstream::{self, consumer::pull};
//! use idem_core::Idempotency;
//! use idem_core::consumer::Consumer;
//! use idem_core::consumer::jetstream::JetStream;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let context = jetstream::new(async_nats::connect("nats://127.0.0.1:4222").await?);
//! let stream = context.get_stream("ORDERS").await?;
//! let pull = stream
//!     .get_or_create_consumer("billing", pull::Config {
//!         durable_name: Some("billing".into()),
//!         ..Default::default()
//!     })
//!     .await?;
//! let idem = Idempotency::connect("redis://127.0.0.1:6379").await?; // shared by every consumer process
//! let consumer = Consumer::new(idem, "billing");
//! JetStream::new(context)
//!     .dead_letter("DEAD.orders") // a subject the ORDERS stream does not capture
//!     .consume(&consumer, &pull, |order| async move {
//!         // charge for `order.payload()` …
//!         Ok::<_, std::io::Error>(())
//!     })
//!     .await?;
//! # Ok(())
//! # }
//! ```
//!
//! A message is acknowledged (`+ACK`) once its outcome is recorded,
//! without waiting for the server to confirm the acknowledgement: one lost
//! on the way only means a redelivery, which is replayed and acknowledged
//! again, and waiting for each confirmation cost half of a consumer's
//! throughput. It is nak'ed with a delay
//! (`-NAK {"delay": …}`) to be redelivered; dead-lettered by publishing it
//! to the [dead-letter subject](JetStream::dead_letter) (when set; a stream
//! must capture that subject to keep them), with the headers that
//! [`dead_letter`](JetStream::dead_letter) lists, and terminating it (`+TERM`: the server stops
//! redelivering it and publishes a `MSG_TERMINATED` advisory). While a
//! handler runs, `+WPI` tells the server it is in progress every
//! [`heartbeat`](super::Consumer::heartbeat): keep that below the consumer's
//! `ack_wait`.
//!
//! [`consume`](JetStream::consume) refuses to start with settings that
//! cannot work ([`ConsumeError`]), and runs until the JetStream consumer is
//! deleted or the connection fails for good: a broker outage of any length
//! (missed idle heartbeats, failed pulls) is logged and ridden out while
//! async-nats reconnects.
//!
//! # What JetStream adds
//!
//! - **Versions.** Tested with nats-server 2.9.10 and async-nats 0.50 (the
//!   harness refuses an older server). async-nats 0.50 follows the 2.10+
//!   API and cannot read some replies of nats-server 2.9; what idem uses
//!   (consumer info, pulls, acks, publishes) works on 2.9.10, but prefer
//!   nats-server 2.10 or newer.
//! - **The duplicate window.** A stream drops a publish whose `Nats-Msg-Id`
//!   it stored within its duplicate window (2 min by default): such a
//!   message never reaches the consumer, and a publisher that reuses an id
//!   for *another* message inside the window loses it (its `PubAck` says
//!   `duplicate`). idem's own record of an id lasts the consumer's TTL
//!   (24 h by default), well past the window. Dead letters rely on the
//!   dead-letter stream's window: a dead letter published again after it
//!   (e.g. a `+TERM` that failed and a redelivery more than 2 min later)
//!   is stored twice.
//! - **Late acks.** The server tracks acknowledgements per stored message,
//!   not per delivery: an ack sent after `ack_wait`, when the message was
//!   already redelivered, acknowledges the redelivery too, even while it
//!   is still being handled. idem acknowledges only recorded outcomes, so
//!   that redelivery is a replay; but a handler must never ack, nak or
//!   terminate the message itself, and `heartbeat` must stay below
//!   `ack_wait` so that slow handlers are not redelivered.
//! - **Ack policy.** Only `AckPolicy::Explicit` (pull consumers' default)
//!   settles one message per ack; `consume` refuses `All` (one ack would
//!   settle the failed and running messages before it) and `None`.
//! - **`max_deliver`.** The server stops redelivering a message after the
//!   consumer's `max_deliver` deliveries (default: no limit), without a
//!   dead letter; `consume` refuses a `max_deliver` below
//!   [`max_deliveries`](super::Consumer::max_deliveries). Leave room for
//!   [`dead_letter_attempts`](super::Consumer::dead_letter_attempts) too,
//!   and for a store outage: a message nak'ed on every delivery the server
//!   allows, because the store was down, is dropped without running and
//!   without a dead letter (`consume` logs the nak of its last delivery at
//!   `ERROR`, with its key, subject and stream sequence). Keep the default (no
//!   limit) unless that is acceptable.
//! - **Stream incarnations.** [`MessageKey::StreamSequence`] keys a message
//!   by its stream, sequence and storage time, since a recreated stream
//!   numbers its messages from 1 again.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::AckPolicy;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::consumer::pull::MessagesErrorKind;
use async_nats::jetstream::{self, AckKind};
use async_nats::{HeaderMap, HeaderName, HeaderValue};
use futures_util::StreamExt as _;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{AckError, BrokerError, Consumer, Delivery, Message, header_text};

const NATS_MSG_ID: &str = "Nats-Msg-Id";
/// The prefix of the headers JetStream acts on when a message is published.
const NATS_PREFIX: &str = "Nats-";

/// Where a message's id (its idempotency key) comes from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum MessageKey {
    /// The `Nats-Msg-Id` header, which publishers set for the stream's own
    /// deduplication window (the default). A message without one is
    /// dead-lettered.
    #[default]
    NatsMsgId,
    /// A header of the application's choice (e.g. `Event-Id`). A message
    /// without it is dead-lettered.
    Header(String),
    /// The message's place in its stream: the stream's name, the message's
    /// sequence and the time the stream stored it (to the nanosecond), as
    /// `ORDERS:1:1733472000123456789`. The same on every redelivery of one
    /// stored message, but different for a message published twice, and
    /// for a message of a recreated stream (deleted and added again, a
    /// memory stream after a server restart, a lost file store) that gets
    /// an old message's sequence. It guards against redelivery, not against
    /// publishers that retry.
    StreamSequence,
}

/// Runs a [`Consumer`] on JetStream pull consumers.
#[derive(Debug, Clone)]
pub struct JetStream {
    context: jetstream::Context,
    key: MessageKey,
    dead_letter: Option<Arc<str>>,
    idle_heartbeat: Duration,
}

/// Why [`JetStream::consume`] refused to start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsumeError {
    /// The consumer's settings break a rule (e.g. a lease shorter than
    /// three times the store's response timeout): every message would be
    /// nak'ed without running. See [`Consumer::check`].
    #[error("the consumer's settings cannot work: {0}")]
    Settings(#[source] crate::Error),
    /// The JetStream consumer's `max_deliver` is below the consumer's
    /// `max_deliveries`: the server would stop redelivering a failing
    /// message before idem dead-letters it, and it would be dropped without
    /// a dead letter.
    #[error(
        "the JetStream consumer's max_deliver ({max_deliver}) is below idem's max_deliveries ({max_deliveries}): a failing message would be dropped without a dead letter; raise max_deliver (or -1 for no limit) or lower Consumer::max_deliveries"
    )]
    MaxDeliver {
        /// The JetStream consumer's `max_deliver`.
        max_deliver: i64,
        /// The consumer's [`max_deliveries`](Consumer::max_deliveries).
        max_deliveries: u32,
    },
    /// The JetStream consumer's ack policy is not `Explicit`: with `All`, the
    /// ack of one message also acknowledges every earlier one still pending
    /// (one nak'ed to be retried, one still running), which the server then
    /// never redelivers; with `None`, naks are ignored and nothing is ever
    /// redelivered. Either way a failed message would be lost without a dead
    /// letter.
    #[error(
        "the JetStream consumer's ack policy is {0:?}: acknowledging one message would drop others that failed or still run, without a dead letter; create the consumer with AckPolicy::Explicit (the default of pull consumers)"
    )]
    AckPolicy(AckPolicy),
    /// The header [`MessageKey::Header`] names is not a valid header name.
    #[error("the message key header `{0}` is not a valid header name")]
    KeyHeader(String),
    /// The broker failed for good: the consumer was deleted, or the
    /// connection closed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

impl JetStream {
    /// Messages keyed by `Nats-Msg-Id`, dead letters terminated without
    /// being published; `context` publishes dead letters.
    #[must_use]
    pub fn new(context: jetstream::Context) -> Self {
        Self {
            context,
            key: MessageKey::default(),
            dead_letter: None,
            idle_heartbeat: Self::DEFAULT_IDLE_HEARTBEAT,
        }
    }

    /// The default idle heartbeat of the pull requests: 15 s (async-nats's).
    pub const DEFAULT_IDLE_HEARTBEAT: Duration = Duration::from_secs(15);

    /// How often the server tells an idle pull that it is alive (default
    /// 15 s); each pull request lasts twice as long (30 s by default). Two
    /// missed heartbeats in a row are reported as a missed heartbeat, which
    /// [`consume`](Self::consume) logs and rides out: the client
    /// reconnects, and messages flow again by the next pull request, at
    /// most one request's time after the server is back.
    #[must_use]
    pub fn idle_heartbeat(mut self, every: Duration) -> Self {
        self.idle_heartbeat = every.max(Duration::from_millis(100));
        self
    }

    /// Where each message's id comes from.
    #[must_use]
    pub fn key(mut self, key: MessageKey) -> Self {
        self.key = key;
        self
    }

    /// Publishes dead letters to `subject` (through JetStream: a stream
    /// must capture it) before terminating them. A dead letter is the
    /// message's payload with these headers:
    ///
    /// | header | value |
    /// |---|---|
    /// | the message's own headers | as they were, but for those below |
    /// | `Idem-Original-Nats-Msg-Id`, `Idem-Original-Nats-Expected-Stream`, … | each `Nats-…` header of the message, which JetStream would act on if the dead letter carried it (its id, a publisher's expectations about its stream) |
    /// | `Idem-Dead-Letter-Reason` | why (one escaped line of at most 1 KiB: [`header_text`]) |
    /// | `Idem-Original-Subject` | the message's subject |
    /// | `Idem-Stream-Sequence` | its sequence in its stream |
    /// | `Idem-Consumer` | the JetStream consumer that dead-lettered it |
    /// | `Nats-Msg-Id` | `idem-dead-letter:` and the message's stream, sequence, storage time and consumer (`idem-dead-letter:ORDERS:1:1733472000123456789:billing`) |
    ///
    /// The dead-letter stream therefore drops a second publish of one
    /// consumer's dead letter within its duplicate window (2 min by
    /// default) — e.g. after a `+TERM` that failed — while two consumers of
    /// one stream each keep their own. To run a dead-lettered message again
    /// after a fix, [forget](crate::Idempotency::forget) its key and publish its
    /// payload to `Idem-Original-Subject` with `Idem-Original-Nats-Msg-Id`
    /// as its `Nats-Msg-Id` (past the source stream's duplicate window,
    /// which would drop it as a duplicate of the original), and with the
    /// header the message's id is read from, for
    /// [`MessageKey::Header`] (the dead letter carries it as it came).
    ///
    /// Give the dead letters a subject their source stream does not
    /// capture (`DEAD.orders`, not `ORDERS.dead` beside a stream of
    /// `ORDERS.*`): the consumer would otherwise take them as new messages.
    ///
    /// Should publishing fail, the message is nak'ed and the dead letter
    /// alone tried again on later deliveries (the handler does not run
    /// again); see [`Consumer::dead_letter_attempts`].
    ///
    #[must_use]
    pub fn dead_letter(mut self, subject: impl Into<Arc<str>>) -> Self {
        self.dead_letter = Some(subject.into());
        self
    }

    /// Wraps a JetStream message for [`Consumer::handle`].
    #[must_use]
    pub fn message(&self, message: jetstream::Message) -> JetStreamMessage {
        JetStreamMessage {
            message,
            key: self.key.clone(),
            dead_letter: self
                .dead_letter
                .clone()
                .map(|subject| (self.context.clone(), subject)),
            max_deliver: None,
        }
    }

    /// Processes the messages of `pull` with `consumer` and `handler` until
    /// the consumer is deleted or the connection fails for good (the
    /// client's reconnects are exhausted, or it is closed); see
    /// [`Consumer::run`]. It never returns `Ok`.
    ///
    /// Checks first that the settings can work ([`Consumer::check`]), and
    /// refuses a JetStream consumer whose `max_deliver` is below
    /// [`max_deliveries`](Consumer::max_deliveries) (the server would drop a
    /// failing message before idem dead-letters it). A broker outage does
    /// not end it: missed heartbeats and failed pull requests are logged
    /// while the client reconnects.
    ///
    /// Dropping its future stops it at once: the handlers under way are
    /// cancelled where they are, as a process that is killed, and their
    /// messages come back after the ack wait and run again once their
    /// claims' leases end. To stop it cleanly (a deploy, a signal), use
    /// [`consume_until`](Self::consume_until).
    ///
    /// # Errors
    ///
    /// [`ConsumeError::Settings`], [`ConsumeError::MaxDeliver`],
    /// [`ConsumeError::AckPolicy`] or [`ConsumeError::KeyHeader`] at start; [`ConsumeError::Broker`] when
    /// the messages cannot be pulled: the consumer is gone or is not a pull
    /// consumer, or the connection failed for good.
    pub async fn consume<T, E, F, Fut>(
        &self,
        consumer: &Consumer,
        pull: &PullConsumer,
        handler: F,
    ) -> Result<(), ConsumeError>
    where
        F: Fn(Delivery) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        T: Serialize + DeserializeOwned,
        E: std::fmt::Display,
    {
        self.consume_until(consumer, pull, std::future::pending(), handler)
            .await
    }

    /// [`consume`](Self::consume), until `shutdown` completes: then it
    /// takes no new message, lets the handlers under way finish and settles
    /// their messages (acknowledged, nak'ed or dead-lettered as ever), and
    /// returns `Ok(())`. Messages pulled but not yet started are left to the
    /// server, which redelivers them after their ack wait; none ran. A
    /// handler that never returns keeps it from returning: bound handlers
    /// with [`Consumer::handler_timeout`].
    ///
    /// ```no_run
    /// # use idem_core::consumer::{Consumer, jetstream::JetStream};
    /// # async fn demo(js: JetStream, consumer: Consumer, pull: async_nats::jetstream::consumer::PullConsumer) -> Result<(), Box<dyn std::error::Error>> {
    /// // Sent by the service's signal handler (SIGTERM) on shutdown.
    /// let (_stop, stopping) = tokio::sync::oneshot::channel::<()>();
    /// let shutdown = async {
    ///     let _ = stopping.await;
    /// };
    /// js.consume_until(&consumer, &pull, shutdown, |order| async move {
    ///     Ok::<_, std::io::Error>(order.payload().len())
    /// })
    /// .await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`consume`](Self::consume), when they come before `shutdown`.
    pub async fn consume_until<S, T, E, F, Fut>(
        &self,
        consumer: &Consumer,
        pull: &PullConsumer,
        shutdown: S,
        handler: F,
    ) -> Result<(), ConsumeError>
    where
        S: Future<Output = ()>,
        F: Fn(Delivery) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        T: Serialize + DeserializeOwned,
        E: std::fmt::Display,
    {
        consumer.check().map_err(ConsumeError::Settings)?;
        if let MessageKey::Header(name) = &self.key
            && name.parse::<HeaderName>().is_err()
        {
            return Err(ConsumeError::KeyHeader(name.clone()));
        }
        let config = &pull.cached_info().config;
        if config.ack_policy != AckPolicy::Explicit {
            return Err(ConsumeError::AckPolicy(config.ack_policy));
        }
        if config.max_deliver > 0 && config.max_deliver < i64::from(consumer.max_deliveries) {
            return Err(ConsumeError::MaxDeliver {
                max_deliver: config.max_deliver,
                max_deliveries: consumer.max_deliveries,
            });
        }
        if config.max_deliver > 0
            && config.max_deliver < i64::from(consumer.last_dead_letter_delivery())
        {
            tracing::warn!(
                max_deliver = config.max_deliver,
                last_attempt = consumer.last_dead_letter_delivery(),
                "idem: the JetStream consumer's max_deliver leaves fewer deliveries than dead_letter_attempts for a dead letter that cannot be published"
            );
        }
        let ack_wait = config.ack_wait;
        if let Some(heartbeat) = consumer.heartbeat
            && !ack_wait.is_zero()
            && heartbeat >= ack_wait
        {
            tracing::warn!(
                ?heartbeat,
                ?ack_wait,
                "idem: the consumer's heartbeat is not shorter than the JetStream ack wait; slow handlers' messages will be redelivered while they run (and wait for them)"
            );
        }
        // Pulled in batches of `concurrency`: a message pulled waits in the
        // client, without heartbeats, until a slot is free, and the broker
        // redelivers one that waits past its ack wait (async-nats pulls 200
        // at a time by default: 200 waiting behind 16 slow handlers).
        let messages = pull
            .stream()
            .max_messages_per_batch(consumer.concurrency)
            .heartbeat(self.idle_heartbeat)
            .expires(self.idle_heartbeat.saturating_mul(2))
            .messages()
            .await
            .map_err(|error| BrokerError(error.into()))?;
        // The server's last delivery, which a nak cannot extend.
        let max_deliver =
            (config.max_deliver > 0).then(|| (config.max_deliver, Arc::clone(&consumer.name)));
        let messages = messages.filter_map(|message| {
            std::future::ready(match message {
                Ok(message) => Some(Ok(JetStreamMessage {
                    max_deliver: max_deliver.clone(),
                    ..self.message(message)
                })),
                // async-nats goes on after these: an outage (missed
                // heartbeats, failed pulls) is ridden out.
                Err(error) if !ends_the_stream(error.kind()) => {
                    tracing::warn!(%error, "idem: the JetStream message stream failed; waiting for the connection to come back");
                    None
                }
                Err(error) => Some(Err(error)),
            })
        });
        let stopped = std::sync::atomic::AtomicBool::new(false);
        let messages = messages.take_until(async {
            shutdown.await;
            stopped.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        consumer
            .run(messages, handler)
            .await
            .map_err(|error| ConsumeError::Broker(BrokerError(error.into())))?;
        if stopped.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        // The messages end only with the client: its connection failed for
        // good (reconnects exhausted) or it was closed.
        Err(ConsumeError::Broker(BrokerError(
            "the connection to the NATS server closed for good".into(),
        )))
    }
}

/// Whether async-nats ends a pull consumer's message stream after `kind`:
/// the consumer was deleted or is not a pull consumer.
fn ends_the_stream(kind: MessagesErrorKind) -> bool {
    matches!(
        kind,
        MessagesErrorKind::ConsumerDeleted | MessagesErrorKind::PushBasedConsumer
    )
}

/// A JetStream message as [`Consumer::handle`] takes it.
#[derive(Debug)]
pub struct JetStreamMessage {
    message: jetstream::Message,
    key: MessageKey,
    dead_letter: Option<(jetstream::Context, Arc<str>)>,
    /// The JetStream consumer's `max_deliver`, when `consume` pulled it,
    /// and the idem consumer's name (its calls' keys).
    max_deliver: Option<(i64, Arc<str>)>,
}

impl JetStreamMessage {
    /// The message itself.
    #[must_use]
    pub fn inner(&self) -> &jetstream::Message {
        &self.message
    }

    fn header(&self, name: &str) -> Option<&HeaderValue> {
        let name = name.parse::<HeaderName>().ok()?;
        self.message.headers.as_ref()?.get(name)
    }
}

impl Message for JetStreamMessage {
    fn delivery(&self) -> Result<Delivery, String> {
        let info = self.message.info().map_err(|error| error.to_string())?;
        let id = match &self.key {
            MessageKey::NatsMsgId => self
                .header(NATS_MSG_ID)
                .map(|id| id.as_str().to_owned())
                .ok_or("it has no `Nats-Msg-Id` header")?,
            MessageKey::Header(name) => self
                .header(name)
                .map(|id| id.as_str().to_owned())
                .ok_or_else(|| format!("it has no `{name}` header"))?,
            MessageKey::StreamSequence => place(&info),
        };
        if id.is_empty() {
            return Err("its id is empty".to_owned());
        }
        Ok(Delivery::new(id, self.message.payload.clone())
            .subject(self.message.subject.as_str())
            .deliveries(u32::try_from(info.delivered).unwrap_or(u32::MAX)))
    }

    async fn ack(&self) -> Result<(), AckError> {
        // Not `double_ack`: the outcome is recorded, so a lost `+ACK` costs a
        // replay, not a second run.
        self.message.ack().await
    }

    async fn nak(&self, delay: Duration) -> Result<(), AckError> {
        if let Some((max_deliver, consumer)) = &self.max_deliver
            && let Ok(info) = self.message.info()
            && info.delivered >= *max_deliver
        {
            // idem's own limit (`max_deliveries`) dead-letters before this;
            // a message nak'ed here (the store down, its outcome unrecorded,
            // another process holding it) ends without one.
            let key = super::key_of(consumer, self);
            tracing::error!(
                key = key.map(tracing::field::display),
                subject = %self.message.subject,
                stream_sequence = info.stream_sequence,
                delivered = info.delivered,
                max_deliver,
                "idem: nak'ing a message on the JetStream consumer's last delivery (max_deliver): the server drops it without a dead letter"
            );
        }
        self.message.ack_with(AckKind::Nak(Some(delay))).await
    }

    async fn dead_letter(&self, reason: &str) -> Result<(), AckError> {
        if let Some((context, subject)) = &self.dead_letter {
            let info = self.message.info().ok();
            // The dead letter is a new message: the original's directives to
            // the server (its `Nats-Msg-Id`, a `Nats-Expected-Stream` that the
            // dead-letter stream would fail) are kept under other names.
            let mut headers = dead_letter_headers(self.message.headers.as_ref());
            let mut set = |name: &'static str, text: &str| match header_text(text)
                .parse::<HeaderValue>()
            {
                Ok(value) => headers.insert(name, value),
                Err(error) => {
                    tracing::warn!(%error, header = name, "idem: a dead letter's header could not be written; publishing it without");
                }
            };
            set("Idem-Dead-Letter-Reason", reason);
            set("Idem-Original-Subject", self.message.subject.as_str());
            if let Some(info) = &info {
                set("Idem-Stream-Sequence", &info.stream_sequence.to_string());
                set("Idem-Consumer", info.consumer);
                // Its own id, the same for every publish of this consumer's
                // dead letter of this message (after a `+TERM` that failed,
                // the stream answers the second one as a duplicate: it has
                // it), and another consumer's dead letter of the message is
                // another.
                set(
                    NATS_MSG_ID,
                    &format!("idem-dead-letter:{}:{}", place(info), info.consumer),
                );
            }
            context
                .publish_with_headers(subject.to_string(), headers, self.message.payload.clone())
                .await?
                .await?;
        }
        self.message.ack_with(AckKind::Term).await
    }

    async fn terminate(&self) -> Result<(), AckError> {
        self.message.ack_with(AckKind::Term).await
    }

    async fn in_progress(&self) -> Result<(), AckError> {
        self.message.ack_with(AckKind::Progress).await
    }
}

/// The message's place in its stream, the same on every redelivery and
/// never that of another message, in this or an earlier incarnation of the
/// stream: `STREAM:sequence:stored-at-nanos`.
fn place(info: &async_nats::jetstream::message::Info<'_>) -> String {
    format!(
        "{}:{}:{}",
        info.stream,
        info.stream_sequence,
        info.published.unix_timestamp_nanos()
    )
}

/// The original's headers, as its dead letter carries them: each `Nats-…`
/// header, which the server would act on when the dead letter is published
/// (`Nats-Msg-Id`, `Nats-Expected-Stream`, `Nats-Rollup`, …), is kept as
/// `Idem-Original-Nats-…`; the others as they are.
fn dead_letter_headers(headers: Option<&HeaderMap>) -> HeaderMap {
    let mut kept = HeaderMap::new();
    for (name, values) in headers.into_iter().flat_map(HeaderMap::iter) {
        let text: &str = name.as_ref();
        let directive = text
            .get(..NATS_PREFIX.len())
            .is_some_and(|prefix| prefix.eq_ignore_ascii_case(NATS_PREFIX));
        let name = if directive {
            match format!("Idem-Original-{text}").parse::<HeaderName>() {
                Ok(name) => name,
                Err(error) => {
                    tracing::warn!(%error, header = text, "idem: a dead letter's header could not be renamed; publishing it without");
                    continue;
                }
            }
        } else {
            name.clone()
        };
        for value in values {
            kept.append(name.clone(), value.clone());
        }
    }
    kept
}
