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
//!     .dead_letter("ORDERS.dead")
//!     .consume(&consumer, &pull, |order| async move {
//!         // charge for `order.payload()` …
//!         Ok::<_, std::io::Error>(())
//!     })
//!     .await?;
//! # Ok(())
//! # }
//! ```
//!
//! A message is acknowledged (`+ACK`, waiting for the server's
//! confirmation) once its outcome is recorded; nak'ed with a delay
//! (`-NAK {"delay": …}`) to be redelivered; dead-lettered by publishing it,
//! with its headers and `Idem-Dead-Letter-Reason`, `Idem-Original-Subject`
//! and `Idem-Stream-Sequence`, to the [dead-letter
//! subject](JetStream::dead_letter) (when set; a stream must capture that
//! subject to keep them) and terminating it (`+TERM`: the server stops
//! redelivering it and publishes a `MSG_TERMINATED` advisory). While a
//! handler runs, `+WPI` tells the server it is in progress every
//! [`heartbeat`](super::Consumer::heartbeat): keep that below the consumer's
//! `ack_wait`.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self, AckKind};
use async_nats::{HeaderMap, HeaderValue};
use futures_util::StreamExt as _;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{AckError, BrokerError, Consumer, Delivery, Message};

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
    /// The message's stream sequence: the same on every redelivery of one
    /// stored message, but different for a message published twice. It
    /// guards against redelivery, not against publishers that retry.
    StreamSequence,
}

/// Runs a [`Consumer`] on JetStream pull consumers.
#[derive(Debug, Clone)]
pub struct JetStream {
    context: jetstream::Context,
    key: MessageKey,
    dead_letter: Option<Arc<str>>,
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
        }
    }

    /// Where each message's id comes from.
    #[must_use]
    pub fn key(mut self, key: MessageKey) -> Self {
        self.key = key;
        self
    }

    /// Publishes dead letters to `subject` (through JetStream: a stream
    /// must capture it) before terminating them. Should publishing fail,
    /// the message is nak'ed instead, so none is lost.
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
        }
    }

    /// Processes the messages of `pull` with `consumer` and `handler` until
    /// the message stream fails; see [`Consumer::run`].
    ///
    /// # Errors
    ///
    /// When the messages cannot be pulled: the consumer is gone, or the
    /// connection failed for good.
    pub async fn consume<T, E, F, Fut>(
        &self,
        consumer: &Consumer,
        pull: &PullConsumer,
        handler: F,
    ) -> Result<(), BrokerError>
    where
        F: Fn(Delivery) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        T: Serialize + DeserializeOwned,
        E: std::fmt::Display,
    {
        let ack_wait = pull.cached_info().config.ack_wait;
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
        let messages = pull
            .messages()
            .await
            .map_err(|error| BrokerError(error.into()))?;
        let messages = messages.map(|message| message.map(|message| self.message(message)));
        consumer
            .run(messages, handler)
            .await
            .map_err(|error| BrokerError(error.into()))
    }
}

/// A JetStream message as [`Consumer::handle`] takes it.
#[derive(Debug)]
pub struct JetStreamMessage {
    message: jetstream::Message,
    key: MessageKey,
    dead_letter: Option<(jetstream::Context, Arc<str>)>,
}

impl JetStreamMessage {
    /// The message itself.
    #[must_use]
    pub fn inner(&self) -> &jetstream::Message {
        &self.message
    }

    fn header(&self, name: &str) -> Option<&HeaderValue> {
        self.message.headers.as_ref()?.get(name)
    }
}

impl Message for JetStreamMessage {
    fn delivery(&self) -> Result<Delivery, String> {
        let info = self.message.info().map_err(|error| error.to_string())?;
        let id = match &self.key {
            MessageKey::NatsMsgId => self
                .header("Nats-Msg-Id")
                .map(|id| id.as_str().to_owned())
                .ok_or("it has no `Nats-Msg-Id` header")?,
            MessageKey::Header(name) => self
                .header(name)
                .map(|id| id.as_str().to_owned())
                .ok_or_else(|| format!("it has no `{name}` header"))?,
            MessageKey::StreamSequence => format!("{}:{}", info.stream, info.stream_sequence),
        };
        if id.is_empty() {
            return Err("its id is empty".to_owned());
        }
        Ok(Delivery::new(id, self.message.payload.clone())
            .subject(self.message.subject.as_str())
            .deliveries(u32::try_from(info.delivered).unwrap_or(u32::MAX)))
    }

    async fn ack(&self) -> Result<(), AckError> {
        self.message.double_ack().await
    }

    async fn nak(&self, delay: Duration) -> Result<(), AckError> {
        self.message.ack_with(AckKind::Nak(Some(delay))).await
    }

    async fn dead_letter(&self, reason: &str) -> Result<(), AckError> {
        if let Some((context, subject)) = &self.dead_letter {
            let mut headers = self.message.headers.clone().unwrap_or_default();
            headers.insert("Idem-Dead-Letter-Reason", reason);
            headers.insert("Idem-Original-Subject", self.message.subject.as_str());
            if let Ok(info) = self.message.info() {
                headers.insert(
                    "Idem-Stream-Sequence",
                    info.stream_sequence.to_string().as_str(),
                );
            }
            // The dead letter is a new message: the stream must not drop it
            // as a duplicate of the original.
            let headers = without(headers, "Nats-Msg-Id");
            let published = async {
                context
                    .publish_with_headers(
                        subject.to_string(),
                        headers,
                        self.message.payload.clone(),
                    )
                    .await?
                    .await?;
                Ok::<_, AckError>(())
            };
            if let Err(error) = published.await {
                tracing::error!(%error, "idem: could not publish a dead letter; nak'ing the message instead");
                return self.nak(Duration::from_secs(5)).await;
            }
        }
        self.message.ack_with(AckKind::Term).await
    }

    async fn in_progress(&self) -> Result<(), AckError> {
        self.message.ack_with(AckKind::Progress).await
    }
}

fn without(headers: HeaderMap, name: &str) -> HeaderMap {
    let mut kept = HeaderMap::new();
    for (key, values) in headers.iter() {
        if !AsRef::<str>::as_ref(key).eq_ignore_ascii_case(name) {
            for value in values {
                kept.append(key.clone(), value.clone());
            }
        }
    }
    kept
}
