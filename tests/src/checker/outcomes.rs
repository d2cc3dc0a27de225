//! The outcome idem tells for each call, captured from its `tracing` event
//! and attributed to the checker's call through the span it runs in.
//!
//! The capture is a process-wide subscriber, installed on first use: a
//! subscriber set per thread would race `tracing`'s process-wide cache of
//! which callsites are enabled. When the process already has a global
//! subscriber, outcomes are not captured and that check is skipped.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock, PoisonError};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// The name of the span each checked call runs in.
pub(crate) const CALL_SPAN: &str = "idem.checker.call";

/// Outcomes by run of the checker, then by call.
type Sink = Mutex<HashMap<u64, Vec<(usize, String)>>>;

fn sink() -> &'static Sink {
    static SINK: OnceLock<Sink> = OnceLock::new();
    SINK.get_or_init(Sink::default)
}

/// Installs the capturing subscriber once; answers whether outcomes are
/// captured.
pub(crate) fn install() -> bool {
    crate::logs::install()
}

/// Takes the outcomes told in run `run` so far.
pub(crate) fn take(run: u64) -> Vec<(usize, String)> {
    sink()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&run)
        .unwrap_or_default()
}

/// The calls of run `run` that told an outcome so far.
pub(crate) fn told(run: u64) -> std::collections::HashSet<usize> {
    sink()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&run)
        .map(|told| told.iter().map(|(call, _)| *call).collect())
        .unwrap_or_default()
}

/// The run and call a checker span stands for.
#[derive(Clone, Copy)]
struct Checked {
    run: u64,
    call: usize,
}

#[derive(Default)]
struct Numbers {
    run: Option<u64>,
    call: Option<u64>,
    outcome: Option<String>,
    key: Option<String>,
    record_lost: bool,
}

/// The keys (their digests) whose results idem said were, or may be, not
/// recorded (its events with `record_lost = true`).
fn lost() -> &'static Mutex<std::collections::HashSet<String>> {
    static LOST: OnceLock<Mutex<std::collections::HashSet<String>>> = OnceLock::new();
    LOST.get_or_init(Mutex::default)
}

/// Whether idem said a result for `key` was, or may be, not recorded.
pub(crate) fn record_lost(key: idem_core::Key) -> bool {
    lost()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .contains(&key.to_string())
}

impl Visit for Numbers {
    fn record_u64(&mut self, field: &Field, value: u64) {
        match field.name() {
            "checker_run" => self.run = Some(value),
            "checker_call" => self.call = Some(value),
            _ => {}
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if field.name() == "record_lost" {
            self.record_lost = value;
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "outcome" {
            self.outcome = Some(value.to_owned());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "outcome" => self.outcome = Some(format!("{value:?}").trim_matches('"').to_owned()),
            "key" => self.key = Some(format!("{value:?}")),
            _ => {}
        }
    }
}

/// The layer that attributes outcomes to checked calls.
pub(crate) struct Capture;

impl<S: Subscriber + for<'a> LookupSpan<'a>> tracing_subscriber::Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if attrs.metadata().name() != CALL_SPAN {
            return;
        }
        let mut numbers = Numbers::default();
        attrs.record(&mut numbers);
        if let (Some(run), Some(call), Some(span)) = (numbers.run, numbers.call, ctx.span(id)) {
            span.extensions_mut().insert(Checked {
                run,
                call: usize::try_from(call).unwrap_or(usize::MAX),
            });
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let target = event.metadata().target();
        if target != "idem" && !target.starts_with("idem_core") {
            return;
        }
        let mut numbers = Numbers::default();
        event.record(&mut numbers);
        if numbers.record_lost
            && let Some(key) = numbers.key
        {
            lost()
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(key);
        }
        let Some(outcome) = numbers.outcome else {
            return;
        };
        let Some(scope) = ctx.event_scope(event) else {
            return;
        };
        for span in scope {
            if let Some(checked) = span.extensions().get::<Checked>().copied() {
                sink()
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .entry(checked.run)
                    .or_default()
                    .push((checked.call, outcome));
                return;
            }
        }
    }
}
