//! What each call did, told through `tracing` and (feature `metrics`) the
//! `metrics` facade.
//!
//! Every call of [`Idempotency::run`](crate::Idempotency::run) (and so of
//! every `#[idempotent]` fn, the HTTP layer and the consumer), and every
//! transactional call on PostgreSQL (`transaction = tx`,
//! `PostgresStore::run_in_transaction`), runs in an `idem.call` span (level
//! `INFO`) with these fields:
//!
//! | field | value |
//! |---|---|
//! | `operation` | the operation's name: the attribute's `name` (by default the fn's path), the layer's or consumer's name, or for `run` the path of the fn its body was written in (for an `async` block, the fn that calls `run`; for an `async fn`'s future passed as it is, that fn; also inside `Box::pin` or `.instrument(…)`), or, when the body's type names no fn (`std::future::ready(…)`, a boxed `dyn Future`), the file and line of the call |
//! | `key` | the key's short hash ([`Key::short`](crate::Key::short)): never the raw key or arguments |
//! | `outcome` | one of the [outcomes](#outcomes) below |
//! | `attempts` | how many times the key was claimed (`begin`), 0 when another call in this process did |
//! | `wait_ms` | how long the call waited for another holder |
//! | `body_ms` | how long the body ran, when it ran |
//! | `error` | what failed, for `store_error`, `decode_error` and `config_error` (the error's message: the broken rule, the store's failure) |
//!
//! When the call ends, one event (target `idem`) tells its outcome:
//! `DEBUG` for `ran`, `failed`, `replayed`, `waited`, `in_progress` and
//! `attempt_failed`; `INFO` for `key_reused` and `cancelled`; `WARN` for
//! `store_error` and `not_stored`;
//! `ERROR` for `decode_error` and `config_error`.
//!
//! # Outcomes
//!
//! | outcome | the call |
//! |---|---|
//! | `ran` | ran the body; its result (an `Ok`, or a cached `Err`) was stored (or, when it does not serialize, the store refused it or it was over the maximum record size, that the call ran: the caller gets its result, retries `Error::NotReplayable`), or is being recorded in the background after a timeout (a recording that fails for the whole lease is counted in `idem_records_lost_total`) |
//! | `failed` | ran the body, which returned an `Err` that is not stored, or panicked (the claim was released) |
//! | `not_stored` | ran the body, but its result was not stored: its claim lapsed or was taken over (also when the body learnt so from a step or its epoch, `Error::StepLost` or `Error::ClaimLost`, and failed), or the store failed; a retry runs the body again |
//! | `cancelled` | was dropped by its caller before it ended (a claim it held lapses with its lease; one dropped while its outcome was being recorded has it recorded in the background, and one dropped during its `begin` has the claim cleared) |
//! | `replayed` | found a completed record and replayed it |
//! | `waited` | waited for another call with the key, then replayed its result |
//! | `in_progress` | gave up on another holder: `Error::InProgress` (409) |
//! | `key_reused` | came with other arguments than the key's first call: `Error::KeyReused` (422) |
//! | `store_error` | could not reach the store, or the store refused it: the body did not run |
//! | `decode_error` | found a record it cannot replay: `Error::Decode`, `Error::NotReplayable`, or a store error of kind `Corrupt` (a record the store cannot read) |
//! | `attempt_failed` | waited for a call in this process whose body failed, or its steps' undos did not all succeed (`Error::Compensating`) |
//! | `config_error` | had settings that break a rule, a key or arguments that do not serialize (its `idem.call` span then has no `key`), or re-entered its own key |
//!
//! # Metrics
//!
//! With the `metrics` feature, through the [`metrics`](https://docs.rs/metrics)
//! facade (so any exporter — Prometheus, OpenTelemetry, StatsD — records
//! them); `observe::describe_metrics()` registers their
//! descriptions and units:
//!
//! | metric | type | labels | meaning |
//! |---|---|---|---|
//! | `idem_calls_total` | counter | `operation`, `outcome` | calls, by [outcome](#outcomes): `ran` against `replayed` + `waited` tells fresh work from retries |
//! | `idem_wait_seconds` | histogram | `operation` | time calls spent waiting for another holder of their key |
//! | `idem_body_seconds` | histogram | `operation` | time bodies ran |
//! | `idem_claims_lost_total` | counter | `operation` | bodies whose claim lapsed or was taken over while they ran, or was removed by `forget`: their results were not stored (a lease too short for the body, or an operator's `forget`) |
//! | `idem_record_retries_total` | counter | `operation` | results whose recording failed once and was retried |
//! | `idem_records_lost_total` | counter | `operation` | results that could not be recorded before their lease ran out, or whose recording in the background was stopped with its runtime: a retry will run the body again |

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tracing::Span;

use crate::codec::ResultCodec;
use crate::error::Error;
use crate::key::Key;
use crate::store::StoreErrorKind;

/// An operation's name, as spans and metrics label it.
#[derive(Clone, Debug)]
pub(crate) enum Operation {
    Static(&'static str),
    Shared(Arc<str>),
}

impl Operation {
    pub(crate) fn as_str(&self) -> &str {
        match self {
            Self::Static(name) => name,
            Self::Shared(name) => name,
        }
    }

    /// The path of the fn that `F` (a closure or async block) was written
    /// in, for transactional calls.
    #[cfg(feature = "postgres")]
    pub(crate) fn of_body<F>() -> Self {
        let name = std::any::type_name::<F>();
        // A fn item's type name is the fn's path.
        Self::Static(written_in(name).unwrap_or(name))
    }

    /// The operation of a `run` call whose body is an `F`: the path of the
    /// fn its async block or closure was written in (an `async fn`'s
    /// future: that fn), also inside a wrapper (`Pin<Box<…>>`,
    /// `Instrumented<…>`); for a future whose type names no fn
    /// (`Ready<…>`, a boxed `dyn Future`, a hand-written one), the file and
    /// line of the call.
    pub(crate) fn of_run<F>(caller: &'static std::panic::Location<'static>) -> Self {
        match written_in(std::any::type_name::<F>()) {
            Some(name) => Self::Static(name),
            None => Self::Shared(Arc::from(format!("{}:{}", caller.file(), caller.line()))),
        }
    }

    #[cfg(feature = "metrics")]
    fn label(&self) -> metrics::SharedString {
        match self {
            Self::Static(name) => metrics::SharedString::const_str(name),
            Self::Shared(name) => metrics::SharedString::from_shared(Arc::clone(name)),
        }
    }
}

/// The fn a closure or async block type (as `type_name` prints it) was
/// written in: the path before its last `::{{closure}}`s, within whatever
/// generic type holds it. `None` when the type has no closure.
fn written_in(type_name: &'static str) -> Option<&'static str> {
    const CLOSURE: &str = "::{{closure}}";
    let mut end = type_name.rfind(CLOSURE)?;
    let mut path = &type_name[..end];
    // Outer closures of the same fn: `f::{{closure}}::{{closure}}`.
    while let Some(outer) = path.strip_suffix(CLOSURE) {
        path = outer;
        end = path.len();
    }
    // Back to where the path starts: after the `<`, `,`, `(`, `&`, `*` or
    // space that opens it, skipping the generic arguments of its own
    // segments (`f<u64>::{{closure}}`).
    let bytes = &type_name.as_bytes()[..end];
    let mut depth = 0_usize;
    let mut start = 0;
    for (at, byte) in bytes.iter().enumerate().rev() {
        match byte {
            // The arrow of a fn type (`fn() -> u32`) closes nothing.
            b'>' if at > 0 && bytes[at - 1] == b'-' => {}
            b'>' => depth += 1,
            b'<' if depth > 0 => depth -= 1,
            b'<' | b',' | b'(' | b'&' | b'*' | b' ' | b'[' | b';' if depth == 0 => {
                start = at + 1;
                break;
            }
            _ => {}
        }
    }
    let path = &type_name[start..end];
    (!path.is_empty()).then_some(path)
}

impl From<&'static str> for Operation {
    fn from(name: &'static str) -> Self {
        Self::Static(name)
    }
}

impl From<Arc<str>> for Operation {
    fn from(name: Arc<str>) -> Self {
        Self::Shared(name)
    }
}

/// How a call ended; the `outcome` field and label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum CallOutcome {
    Ran = 1,
    Failed,
    Replayed,
    Waited,
    InProgress,
    KeyReused,
    StoreError,
    DecodeError,
    AttemptFailed,
    ConfigError,
    NotStored,
    Cancelled,
}

impl CallOutcome {
    const ALL: [Self; 12] = [
        Self::Ran,
        Self::Failed,
        Self::Replayed,
        Self::Waited,
        Self::InProgress,
        Self::KeyReused,
        Self::StoreError,
        Self::DecodeError,
        Self::AttemptFailed,
        Self::ConfigError,
        Self::NotStored,
        Self::Cancelled,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Ran => "ran",
            Self::Failed => "failed",
            Self::Replayed => "replayed",
            Self::Waited => "waited",
            Self::InProgress => "in_progress",
            Self::KeyReused => "key_reused",
            Self::StoreError => "store_error",
            Self::DecodeError => "decode_error",
            Self::AttemptFailed => "attempt_failed",
            Self::ConfigError => "config_error",
            Self::NotStored => "not_stored",
            Self::Cancelled => "cancelled",
        }
    }

    fn of(error: &Error) -> Self {
        match error {
            Error::InProgress { .. } => Self::InProgress,
            Error::KeyReused => Self::KeyReused,
            // A record the store holds but cannot read is not replayable.
            Error::Store(error) if error.kind() == StoreErrorKind::Corrupt => Self::DecodeError,
            Error::Store(_) | Error::StepLost { .. } | Error::ClaimLost => Self::StoreError,
            Error::Decode(_) | Error::NotReplayable { .. } => Self::DecodeError,
            Error::AttemptFailed => Self::AttemptFailed,
            Error::Encode { .. }
            | Error::InvalidKey { .. }
            | Error::Config(_)
            | Error::Reentered { .. }
            | Error::StepRepeated { .. }
            | Error::InvalidStepName { .. }
            | Error::OutsideCall { .. } => Self::ConfigError,
            Error::Compensating { .. } => Self::AttemptFailed,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|outcome| *outcome as u8 == code)
    }
}

/// One call as it goes: filled in by the engine, told when it ends.
pub(crate) struct Call {
    operation: Operation,
    /// `None` for a call refused before it had one.
    key: Option<Key>,
    span: Span,
    error: AtomicU8,
    ran: AtomicU8,
    waited: AtomicU8,
    attempts: AtomicU32,
    wait_nanos: AtomicU64,
    body_nanos: AtomicU64,
    finished: AtomicBool,
    cancelled: AtomicBool,
}

const RAN: u8 = 1;
const FAILED: u8 = 2;
const NOT_STORED: u8 = 3;

impl Call {
    pub(crate) fn new(operation: Operation, key: Key) -> Self {
        Self::open(operation, Some(key))
    }

    /// A call refused before it had a key: its key or arguments do not
    /// serialize, or its settings break a rule. Its span has no key.
    pub(crate) fn refused(operation: Operation, error: &Error) {
        let call = Self::open(operation, None);
        call.error(error);
        call.finish();
    }

    fn open(operation: Operation, key: Option<Key>) -> Self {
        let span = tracing::info_span!(
            target: "idem",
            "idem.call",
            operation = operation.as_str(),
            key = key.map(|key| tracing::field::display(key.short())),
            outcome = tracing::field::Empty,
            attempts = tracing::field::Empty,
            wait_ms = tracing::field::Empty,
            body_ms = tracing::field::Empty,
            error = tracing::field::Empty,
        );
        Self {
            operation,
            key,
            span,
            error: AtomicU8::new(0),
            ran: AtomicU8::new(0),
            waited: AtomicU8::new(0),
            attempts: AtomicU32::new(0),
            wait_nanos: AtomicU64::new(0),
            body_nanos: AtomicU64::new(0),
            finished: AtomicBool::new(false),
            cancelled: AtomicBool::new(false),
        }
    }

    pub(crate) fn span(&self) -> &Span {
        &self.span
    }

    pub(crate) fn operation(&self) -> &Operation {
        &self.operation
    }

    /// A `begin` is about to be sent.
    pub(crate) fn attempt(&self) {
        self.attempts.fetch_add(1, Ordering::Relaxed);
    }

    /// The call waited `wait` for another holder.
    pub(crate) fn waited(&self, wait: Duration) {
        self.waited.store(1, Ordering::Relaxed);
        self.wait_nanos.fetch_add(nanos(wait), Ordering::Relaxed);
    }

    /// The body ran for `took`; its result was stored (`Some` record) or not.
    pub(crate) fn ran(&self, took: Duration, stored: bool) {
        self.body_nanos.store(nanos(took), Ordering::Relaxed);
        self.ran
            .store(if stored { RAN } else { FAILED }, Ordering::Relaxed);
    }

    /// The body ran and returned a result to store, which was not stored.
    pub(crate) fn not_stored(&self) {
        self.ran.store(NOT_STORED, Ordering::Relaxed);
    }

    /// idem answered the caller with `error`.
    pub(crate) fn error(&self, error: &Error) {
        let outcome = CallOutcome::of(error);
        self.error.store(outcome as u8, Ordering::Relaxed);
        // What failed, for the outcomes an operator must act on: the span's
        // `error` field, which its end event is told in.
        if matches!(
            outcome,
            CallOutcome::StoreError | CallOutcome::DecodeError | CallOutcome::ConfigError
        ) && !self.span.is_disabled()
        {
            self.span.record("error", one_line(&error.to_string()));
        }
    }

    fn outcome(&self) -> CallOutcome {
        // Dropped before it returned: whatever the engine had made of it
        // (an error it was about to answer, a claim it was releasing), its
        // caller got nothing.
        if self.cancelled.load(Ordering::Relaxed) {
            return CallOutcome::Cancelled;
        }
        if let Some(outcome) = CallOutcome::from_code(self.error.load(Ordering::Relaxed)) {
            return outcome;
        }
        match self.ran.load(Ordering::Relaxed) {
            RAN => CallOutcome::Ran,
            FAILED => CallOutcome::Failed,
            NOT_STORED => CallOutcome::NotStored,
            _ if self.waited.load(Ordering::Relaxed) != 0 => CallOutcome::Waited,
            _ => CallOutcome::Replayed,
        }
    }

    /// Records the outcome in the span, tells it in an event and counts it.
    pub(crate) fn finish(&self) {
        if self.finished.swap(true, Ordering::Relaxed) {
            return;
        }
        let outcome = self.outcome();
        let wait = Duration::from_nanos(self.wait_nanos.load(Ordering::Relaxed));
        let body = (self.ran.load(Ordering::Relaxed) != 0)
            .then(|| Duration::from_nanos(self.body_nanos.load(Ordering::Relaxed)));
        let attempts = self.attempts.load(Ordering::Relaxed);
        let span = &self.span;
        if !span.is_disabled() {
            span.record("outcome", outcome.as_str());
            span.record("attempts", attempts);
            span.record("wait_ms", millis(wait));
            if let Some(body) = body {
                span.record("body_ms", millis(body));
            }
        }
        let _entered = span.enter();
        let outcome_name = outcome.as_str();
        match outcome {
            CallOutcome::KeyReused => {
                tracing::info!(target: "idem", outcome = outcome_name, "an idempotency key was reused with other arguments");
            }
            CallOutcome::StoreError => {
                tracing::warn!(target: "idem", outcome = outcome_name, "the idempotency store failed; the call did not run");
            }
            CallOutcome::NotStored => {
                tracing::warn!(target: "idem", outcome = outcome_name, key = self.key.map(tracing::field::display), record_lost = true, "an idempotent call ran but its result was not stored; a retry runs it again");
            }
            CallOutcome::Cancelled => {
                tracing::info!(target: "idem", outcome = outcome_name, "an idempotent call was cancelled by its caller");
            }
            CallOutcome::DecodeError => {
                tracing::error!(target: "idem", outcome = outcome_name, "a stored result cannot be replayed");
            }
            CallOutcome::ConfigError => {
                tracing::error!(target: "idem", outcome = outcome_name, "an idempotent call was misconfigured and did not run");
            }
            _ => {
                tracing::debug!(target: "idem", outcome = outcome_name, "idempotent call finished");
            }
        }
        #[cfg(feature = "metrics")]
        {
            let operation = self.operation.label();
            metrics::counter!(CALLS, "operation" => operation.clone(), "outcome" => outcome_name)
                .increment(1);
            if self.waited.load(Ordering::Relaxed) != 0 {
                metrics::histogram!(WAIT, "operation" => operation.clone())
                    .record(wait.as_secs_f64());
            }
            if let Some(body) = body {
                metrics::histogram!(BODY, "operation" => operation).record(body.as_secs_f64());
            }
        }
    }
}

/// A call dropped before it finished (its caller's future was dropped) is
/// told as `cancelled`; one that unwinds from its body's panic keeps the
/// outcome the engine gave it (`failed`).
impl Drop for Call {
    fn drop(&mut self) {
        if !*self.finished.get_mut() {
            if !std::thread::panicking() {
                *self.cancelled.get_mut() = true;
            }
            self.finish();
        }
    }
}

/// `text` as one line of at most 512 bytes, for a log field: control
/// characters become spaces, and a longer text is cut with `…`.
fn one_line(text: &str) -> String {
    const MAX: usize = 512;
    let mut line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if line.len() > MAX {
        let mut end = MAX - '…'.len_utf8();
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line.truncate(end);
        line.push('…');
    }
    line
}

/// A body's claim lapsed or was taken over while it ran.
pub(crate) fn claim_lost(operation: &Operation) {
    #[cfg(feature = "metrics")]
    metrics::counter!(CLAIMS_LOST, "operation" => operation.label()).increment(1);
    let _ = operation;
}

/// Recording a result failed once and is being retried.
pub(crate) fn record_retried(operation: &Operation) {
    #[cfg(feature = "metrics")]
    metrics::counter!(RECORD_RETRIES, "operation" => operation.label()).increment(1);
    let _ = operation;
}

/// A result could not be recorded before its lease ran out.
pub(crate) fn record_lost(operation: &Operation) {
    #[cfg(feature = "metrics")]
    metrics::counter!(RECORDS_LOST, "operation" => operation.label()).increment(1);
    let _ = operation;
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

#[cfg(feature = "metrics")]
const CALLS: &str = "idem_calls_total";
#[cfg(feature = "metrics")]
const WAIT: &str = "idem_wait_seconds";
#[cfg(feature = "metrics")]
const BODY: &str = "idem_body_seconds";
#[cfg(feature = "metrics")]
const CLAIMS_LOST: &str = "idem_claims_lost_total";
#[cfg(feature = "metrics")]
const RECORD_RETRIES: &str = "idem_record_retries_total";
#[cfg(feature = "metrics")]
const RECORDS_LOST: &str = "idem_records_lost_total";

/// Registers the descriptions and units of idem's metrics with the
/// installed recorder (feature `metrics`); call it once after installing
/// one. The metrics are listed in the [`observe`](crate::observe) docs.
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub fn describe_metrics() {
    use metrics::Unit;
    metrics::describe_counter!(
        CALLS,
        Unit::Count,
        "Idempotent calls, by operation and outcome (ran, replayed, waited, in_progress, key_reused, store_error, not_stored, cancelled, …)."
    );
    metrics::describe_histogram!(
        WAIT,
        Unit::Seconds,
        "Time idempotent calls waited for another holder of their key."
    );
    metrics::describe_histogram!(
        BODY,
        Unit::Seconds,
        "Time the bodies of idempotent calls ran."
    );
    metrics::describe_counter!(
        CLAIMS_LOST,
        Unit::Count,
        "Bodies whose claim lapsed or was taken over while they ran; their results were not stored."
    );
    metrics::describe_counter!(
        RECORD_RETRIES,
        Unit::Count,
        "Results whose recording failed once and was retried."
    );
    metrics::describe_counter!(
        RECORDS_LOST,
        Unit::Count,
        "Results that could not be recorded before their lease ran out."
    );
}

/// A codec that tells the call which idem errors it answered with.
pub(crate) struct Traced<'a, C> {
    pub(crate) inner: C,
    pub(crate) call: &'a Call,
}

impl<T, E, C: ResultCodec<T, E>> ResultCodec<T, E> for Traced<'_, C> {
    fn encode_ok(&self, value: &T) -> serde_json::Result<Vec<u8>> {
        self.inner.encode_ok(value)
    }

    fn decode_ok(&self, bytes: &[u8]) -> serde_json::Result<T> {
        self.inner.decode_ok(bytes)
    }

    fn idem_error(&self, error: Error) -> E {
        self.call.error(&error);
        self.inner.idem_error(error)
    }

    fn keep_err(&mut self, error: &E) -> Option<serde_json::Result<Vec<u8>>> {
        self.inner.keep_err(error)
    }

    fn decode_err(&self, bytes: &[u8]) -> Result<E, Error> {
        self.inner.decode_err(bytes)
    }

    fn unkept_err(&self, reason: &str) -> Option<E> {
        self.inner.unkept_err(reason)
    }

    fn awaits_record(&self) -> bool {
        self.inner.awaits_record()
    }

    fn recorded(&self, confirmed: bool) {
        self.inner.recorded(confirmed);
    }

    fn ok_tag(&self) -> u64 {
        self.inner.ok_tag()
    }

    fn err_tag(&self) -> u64 {
        self.inner.err_tag()
    }
}

impl fmt::Debug for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Call")
            .field("operation", &self.operation)
            .field("outcome", &self.outcome())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_in_a_span_is_one_bounded_line() {
        assert_eq!(one_line("a\nb\tc"), "a b c");
        let long = one_line(&"é".repeat(1000));
        assert!(long.len() <= 512 && long.ends_with('…'), "{}", long.len());
        assert_eq!(one_line("short"), "short");
    }

    #[test]
    fn the_fn_a_body_was_written_in_is_read_from_its_type() {
        for (type_name, expected) in [
            ("shop::charge::{{closure}}", Some("shop::charge")),
            (
                "shop::charge::{{closure}}::{{closure}}",
                Some("shop::charge"),
            ),
            (
                "shop::outer::{{closure}}::inner::{{closure}}",
                Some("shop::outer::{{closure}}::inner"),
            ),
            (
                "core::pin::Pin<alloc::boxed::Box<shop::charge::{{closure}}::{{closure}}>>",
                Some("shop::charge"),
            ),
            (
                "tracing::instrument::Instrumented<shop::charge::{{closure}}>",
                Some("shop::charge"),
            ),
            (
                "shop::charge<u64, shop::Euro>::{{closure}}",
                Some("shop::charge<u64, shop::Euro>"),
            ),
            (
                "core::pin::Pin<alloc::boxed::Box<shop::charge<fn() -> u32>::{{closure}}>>",
                Some("shop::charge<fn() -> u32>"),
            ),
            (
                "alloc::boxed::Box<shop::charge<alloc::boxed::Box<dyn core::ops::function::Fn(u32) -> u32>>::{{closure}}>",
                Some("shop::charge<alloc::boxed::Box<dyn core::ops::function::Fn(u32) -> u32>>"),
            ),
            (
                "futures::Join<shop::a::{{closure}}, shop::b::{{closure}}>",
                Some("shop::b"),
            ),
            (
                "core::pin::Pin<&mut shop::charge::{{closure}}>",
                Some("shop::charge"),
            ),
            (
                "core::future::ready::Ready<core::result::Result<u32, idem_core::error::Error>>",
                None,
            ),
            (
                "core::pin::Pin<alloc::boxed::Box<dyn core::future::future::Future<Output = u32> + Send>>",
                None,
            ),
            ("{{closure}}", None),
        ] {
            assert_eq!(written_in(type_name), expected, "{type_name}");
        }
    }

    #[test]
    fn a_body_whose_type_names_no_fn_is_named_by_its_call() {
        let here = std::panic::Location::caller();
        let named = Operation::of_run::<std::future::Ready<u32>>(here);
        assert_eq!(named.as_str(), format!("{}:{}", here.file(), here.line()));
        let body = async {};
        fn operation_of<F>(_: &F, here: &'static std::panic::Location<'static>) -> Operation {
            Operation::of_run::<F>(here)
        }
        assert_eq!(
            operation_of(&body, here).as_str(),
            "idem_core::observe::tests::a_body_whose_type_names_no_fn_is_named_by_its_call"
        );
    }
}
