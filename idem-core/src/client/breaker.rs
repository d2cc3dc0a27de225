//! Circuit breakers: stop calling a dependency that keeps failing, and probe
//! it after a cool-down.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::{PolicyError, Verdict};

/// When a [`CircuitBreaker`] opens, and for how long.
///
/// It opens after `consecutive_failures` failures in a row, or when at least
/// `min_calls` calls ended in the last `window` and `failure_ratio` of them
/// failed; it stays open for `cool_down`, then lets one probe through. A
/// probe with no answer after `probe_timeout` counts as failed: the circuit
/// opens again for another cool-down and a later call probes afresh, so a
/// probe that hangs never holds the circuit open for longer.
///
/// Only calls started in the breaker's current state count: a call that
/// began before the circuit opened (or before a probe closed it) and ends
/// after is not counted, so the stragglers of an outage cannot reopen a
/// circuit that a probe has just closed.
///
/// ```
/// use std::time::Duration;
/// use idem_core::client::BreakerConfig;
///
/// let config = BreakerConfig::default()
///     .consecutive_failures(3)
///     .failure_ratio(0.5, 20)
///     .cool_down(Duration::from_secs(10));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[must_use]
pub struct BreakerConfig {
    consecutive_failures: u32,
    failure_ratio: f64,
    min_calls: u32,
    window: Duration,
    cool_down: Duration,
    probe_timeout: Duration,
}

impl Default for BreakerConfig {
    /// Open after 5 failures in a row, or half of at least 20 calls in 10 s;
    /// probe after 5 s.
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            failure_ratio: 0.5,
            min_calls: 20,
            window: Duration::from_secs(10),
            cool_down: Duration::from_secs(5),
            probe_timeout: Duration::from_secs(10),
        }
    }
}

impl BreakerConfig {
    /// Open after this many failures in a row (default 5).
    pub const fn consecutive_failures(mut self, failures: u32) -> Self {
        self.consecutive_failures = failures;
        self
    }

    /// Open when this fraction (0 to 1] of the calls in the window failed,
    /// once at least `min_calls` calls ended in it (default 0.5 of 20).
    pub const fn failure_ratio(mut self, ratio: f64, min_calls: u32) -> Self {
        self.failure_ratio = ratio;
        self.min_calls = min_calls;
        self
    }

    /// The sliding window the ratio is taken over (default 10 s).
    pub const fn window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    /// How long the circuit stays open before a probe (default 5 s).
    pub const fn cool_down(mut self, cool_down: Duration) -> Self {
        self.cool_down = cool_down;
        self
    }

    /// How long a probe may go unanswered before it counts as failed
    /// (default 10 s).
    pub const fn probe_timeout(mut self, timeout: Duration) -> Self {
        self.probe_timeout = timeout;
        self
    }

    fn check(&self) -> Result<(), PolicyError> {
        if self.consecutive_failures == 0 {
            return Err(PolicyError::new(
                "consecutive_failures",
                "must be at least 1",
            ));
        }
        if !(self.failure_ratio > 0.0 && self.failure_ratio <= 1.0) {
            return Err(PolicyError::new(
                "failure_ratio",
                "must be a number above 0 and at most 1",
            ));
        }
        if self.min_calls == 0 {
            return Err(PolicyError::new(
                "failure_ratio",
                "min_calls must be at least 1",
            ));
        }
        if self.window < Duration::from_millis(10) {
            return Err(PolicyError::new("window", "must be at least 10 ms"));
        }
        if self.cool_down.is_zero() {
            return Err(PolicyError::new("cool_down", "must be longer than zero"));
        }
        if self.probe_timeout.is_zero() {
            return Err(PolicyError::new(
                "probe_timeout",
                "must be longer than zero",
            ));
        }
        Ok(())
    }
}

/// A circuit breaker's state, as [`CircuitBreaker::state`] and
/// [`CircuitBreaker::subscribe`] report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BreakerState {
    /// Calls go through; failures are counted.
    Closed,
    /// Calls fail fast with [`CircuitOpen`], without reaching the dependency.
    Open,
    /// The cool-down is over: the next call goes through as a probe (one at
    /// a time); its success closes the circuit, its failure opens it again.
    HalfOpen,
}

/// A call was not made because the dependency's circuit is open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the circuit for `{dependency}` is open; calls resume in {} ms", retry_in.as_millis())]
pub struct CircuitOpen {
    dependency: Arc<str>,
    retry_in: Duration,
}

impl CircuitOpen {
    /// The dependency's name (for the reqwest middleware, `host:port`).
    #[must_use]
    pub fn dependency(&self) -> &str {
        &self.dependency
    }

    /// How long until a probe may go through. While a probe is out, the time
    /// left until its deadline (`probe_timeout`): the circuit closes or
    /// opens again when it answers, and opens again at the deadline if it
    /// has not.
    #[must_use]
    pub fn retry_in(&self) -> Duration {
        self.retry_in
    }
}

/// A circuit breaker for one dependency: closed → open after failures →
/// half-open (one probe) after a cool-down → closed on the probe's success.
///
/// Cheap to clone; clones share the state. Failures are what
/// [`Verdict::is_failure`] says: connection errors, timeouts, 5xx; a 4xx or
/// a 409 proves the dependency alive.
///
/// ```
/// use idem_core::client::{BreakerConfig, BreakerState, CircuitBreaker};
///
/// let breaker = CircuitBreaker::new("ledger", BreakerConfig::default())?;
/// assert_eq!(breaker.state(), BreakerState::Closed);
/// # Ok::<(), idem_core::client::PolicyError>(())
/// ```
#[derive(Clone)]
pub struct CircuitBreaker {
    shared: Arc<Shared>,
}

struct Shared {
    name: Arc<str>,
    config: BreakerConfig,
    inner: Mutex<Inner>,
    state: watch::Sender<BreakerState>,
}

struct Inner {
    phase: Phase,
    /// Bumped on every change of phase and every probe admitted; a permit
    /// of another generation is not counted.
    generation: u64,
    consecutive_failures: u32,
    buckets: [Bucket; BUCKETS],
    epoch: Instant,
}

#[derive(Clone, Copy)]
enum Phase {
    Closed,
    Open {
        until: Instant,
    },
    /// `probing`: the deadline of the probe that is out, if one is.
    HalfOpen {
        probing: Option<Instant>,
    },
}

/// The window is kept as this many buckets, each a tenth of it.
const BUCKETS: usize = 10;

#[derive(Clone, Copy, Default)]
struct Bucket {
    slot: u64,
    successes: u32,
    failures: u32,
}

impl CircuitBreaker {
    /// A closed breaker for the dependency `name`.
    ///
    /// # Errors
    ///
    /// [`PolicyError`] when a setting of `config` is out of range.
    pub fn new(name: impl Into<Arc<str>>, config: BreakerConfig) -> Result<Self, PolicyError> {
        config.check()?;
        Ok(Self::checked(name.into(), config))
    }

    fn checked(name: Arc<str>, config: BreakerConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                name,
                config,
                inner: Mutex::new(Inner {
                    phase: Phase::Closed,
                    generation: 0,
                    consecutive_failures: 0,
                    buckets: [Bucket::default(); BUCKETS],
                    epoch: Instant::now(),
                }),
                state: watch::Sender::new(BreakerState::Closed),
            }),
        }
    }

    /// The dependency's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The state now. An open circuit whose cool-down is over reports
    /// [`HalfOpen`](BreakerState::HalfOpen): the next call is the probe. A
    /// probe unanswered past its deadline failed: the circuit reports
    /// [`Open`](BreakerState::Open) for a cool-down from that deadline, then
    /// half-open again.
    #[must_use]
    pub fn state(&self) -> BreakerState {
        let now = Instant::now();
        match self.lock().phase {
            Phase::Closed => BreakerState::Closed,
            Phase::Open { until } if now < until => BreakerState::Open,
            Phase::HalfOpen {
                probing: Some(deadline),
            } if now >= deadline && now < later(deadline, self.shared.config.cool_down) => {
                BreakerState::Open
            }
            Phase::Open { .. } | Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// A receiver of the state's changes, for a health endpoint or a gauge.
    /// An open circuit becomes half-open here when its probe is admitted,
    /// and a probe that timed out opens it here when the next call asks.
    #[must_use]
    pub fn subscribe(&self) -> watch::Receiver<BreakerState> {
        self.shared.state.subscribe()
    }

    /// Asks to make a call: a [`Permit`] to report its outcome with, or
    /// [`CircuitOpen`] when the call must not be made.
    ///
    /// # Errors
    ///
    /// [`CircuitOpen`] while the circuit is open, or half-open with its
    /// probe still out.
    pub fn try_acquire(&self) -> Result<Permit, CircuitOpen> {
        let now = Instant::now();
        let config = &self.shared.config;
        let mut inner = self.lock();
        if let Phase::HalfOpen {
            probing: Some(deadline),
        } = inner.phase
            && now >= deadline
        {
            // The probe never answered: a failed probe, at its deadline, so
            // the cool-down counts from there however late this call is.
            tracing::warn!(dependency = %self.shared.name, timeout = ?config.probe_timeout, "idem: a circuit breaker's probe timed out");
            self.trip(&mut inner, deadline);
        }
        let probe = match inner.phase {
            Phase::Closed => false,
            Phase::Open { until } if now < until => {
                return Err(self.open(until - now));
            }
            Phase::Open { .. } | Phase::HalfOpen { probing: None } => {
                inner.phase = Phase::HalfOpen {
                    probing: Some(later(now, config.probe_timeout)),
                };
                inner.generation = inner.generation.wrapping_add(1);
                self.publish(BreakerState::HalfOpen);
                true
            }
            Phase::HalfOpen {
                probing: Some(deadline),
            } => return Err(self.open(deadline - now)),
        };
        Ok(Permit {
            breaker: self.clone(),
            probe,
            generation: inner.generation,
            recorded: false,
        })
    }

    /// Opens the circuit for a cool-down from `now` (when the failure that
    /// opens it happened).
    fn trip(&self, inner: &mut Inner, now: Instant) {
        inner.phase = Phase::Open {
            until: later(now, self.shared.config.cool_down),
        };
        inner.generation = inner.generation.wrapping_add(1);
        self.publish(BreakerState::Open);
    }

    /// The refusal a call would get now, whatever the state (a zero wait
    /// when it would be admitted): for an operation whose probe got no
    /// answer, which stops as if the circuit refused it, without taking the
    /// next probe's place.
    pub(super) fn refusal(&self) -> CircuitOpen {
        let now = Instant::now();
        let retry_in = match self.lock().phase {
            Phase::Open { until } => until.saturating_duration_since(now),
            Phase::HalfOpen {
                probing: Some(deadline),
            } => deadline.saturating_duration_since(now),
            Phase::Closed | Phase::HalfOpen { probing: None } => Duration::ZERO,
        };
        self.open(retry_in)
    }

    /// The refusal of a call made after `wait`, when the circuit is open
    /// for longer than that: an operation whose attempt opened it ends at
    /// once instead of waiting to be refused.
    pub(super) fn open_past(&self, wait: Duration) -> Option<CircuitOpen> {
        let left = match self.lock().phase {
            Phase::Open { until } => until.saturating_duration_since(Instant::now()),
            _ => return None,
        };
        (left > wait).then(|| self.open(left))
    }

    fn open(&self, retry_in: Duration) -> CircuitOpen {
        CircuitOpen {
            dependency: self.shared.name.clone(),
            retry_in,
        }
    }

    fn record(&self, probe: bool, generation: u64, failure: bool) {
        let now = Instant::now();
        let config = &self.shared.config;
        let mut inner = self.lock();
        if generation != inner.generation {
            // Started in an earlier state (before the circuit opened, or a
            // probe that timed out): it says nothing about this one.
            return;
        }
        if probe {
            if failure {
                self.trip(&mut inner, now);
            } else {
                inner.phase = Phase::Closed;
                inner.generation = inner.generation.wrapping_add(1);
                inner.consecutive_failures = 0;
                inner.buckets = [Bucket::default(); BUCKETS];
                self.publish(BreakerState::Closed);
            }
            return;
        }
        let slot = inner.slot(now, config.window);
        let bucket = &mut inner.buckets[(slot % BUCKETS as u64) as usize];
        if bucket.slot != slot {
            *bucket = Bucket {
                slot,
                ..Bucket::default()
            };
        }
        if failure {
            bucket.failures = bucket.failures.saturating_add(1);
            inner.consecutive_failures = inner.consecutive_failures.saturating_add(1);
        } else {
            bucket.successes = bucket.successes.saturating_add(1);
            inner.consecutive_failures = 0;
        }
        if failure && matches!(inner.phase, Phase::Closed) && inner.tripped(slot, config) {
            inner.consecutive_failures = 0;
            inner.buckets = [Bucket::default(); BUCKETS];
            self.trip(&mut inner, now);
        }
    }

    fn abandon_probe(&self, generation: u64) {
        let mut inner = self.lock();
        if generation == inner.generation
            && matches!(inner.phase, Phase::HalfOpen { probing: Some(_) })
        {
            inner.phase = Phase::HalfOpen { probing: None };
        }
    }

    /// The probe timeout, for callers that bound the probe's call as well.
    pub(super) fn probe_timeout(&self) -> Duration {
        self.shared.config.probe_timeout
    }

    fn publish(&self, state: BreakerState) {
        let changed = self.shared.state.send_if_modified(|current| {
            let changed = *current != state;
            *current = state;
            changed
        });
        if changed {
            tracing::info!(dependency = %self.shared.name, ?state, "idem: circuit breaker changed state");
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The state stays consistent between statements; a panic elsewhere
        // while holding the lock leaves it usable.
        self.shared
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// `now + duration`, or as far ahead as the clock goes: a `Duration::MAX`
/// cool-down means "until a probe is let through by nothing but the end of
/// time", never a panic.
fn later(now: Instant, duration: Duration) -> Instant {
    now.checked_add(duration).unwrap_or_else(|| {
        // About 30 years, then less until the clock can hold it.
        let mut step = Duration::from_secs(30 * 365 * 24 * 3600);
        loop {
            if let Some(instant) = now.checked_add(step) {
                return instant;
            }
            step /= 2;
        }
    })
}

impl Inner {
    fn slot(&self, now: Instant, window: Duration) -> u64 {
        let width = (window / BUCKETS as u32).as_nanos().max(1);
        u64::try_from(now.duration_since(self.epoch).as_nanos() / width).unwrap_or(u64::MAX)
    }

    fn tripped(&self, slot: u64, config: &BreakerConfig) -> bool {
        if self.consecutive_failures >= config.consecutive_failures {
            return true;
        }
        let (calls, failures) = self
            .buckets
            .iter()
            .filter(|bucket| bucket.slot <= slot && slot - bucket.slot < BUCKETS as u64)
            .fold((0u64, 0u64), |(calls, failures), bucket| {
                (
                    calls + u64::from(bucket.successes) + u64::from(bucket.failures),
                    failures + u64::from(bucket.failures),
                )
            });
        #[allow(clippy::cast_precision_loss)] // counts far below 2^52
        let ratio = failures as f64 / calls.max(1) as f64;
        calls >= u64::from(config.min_calls) && ratio >= config.failure_ratio
    }
}

impl fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("name", &self.shared.name)
            .field("state", &self.state())
            .field("config", &self.shared.config)
            .finish()
    }
}

/// Leave to make one call through a [`CircuitBreaker`]; report how it ended
/// with [`record`](Self::record). A permit dropped unreported (the call was
/// cancelled) counts as nothing, and frees the probe's place.
#[must_use = "report the call's outcome with `record`"]
pub struct Permit {
    breaker: CircuitBreaker,
    probe: bool,
    generation: u64,
    recorded: bool,
}

impl Permit {
    /// Reports the call's outcome: a [failure](Verdict::is_failure) counts
    /// against the dependency, anything else for it.
    pub fn record(mut self, verdict: Verdict) {
        self.recorded = true;
        self.breaker
            .record(self.probe, self.generation, verdict.is_failure());
    }

    /// Whether this call is the half-open circuit's probe.
    #[must_use]
    pub fn is_probe(&self) -> bool {
        self.probe
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.probe && !self.recorded {
            self.breaker.abandon_probe(self.generation);
        }
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("dependency", &self.breaker.name())
            .field("probe", &self.probe)
            .finish()
    }
}

/// One [`CircuitBreaker`] per dependency, made on first use with one
/// configuration: the reqwest middleware keeps one per `host:port`.
///
/// **Bounded.** A client that calls many hosts (a webhook sender) must not
/// keep a breaker for every host it ever saw. A breaker that is closed and
/// has not been asked for in [`idle`](Self::idle) (default 10 minutes) is
/// forgotten, and at most [`max_dependencies`](Self::max_dependencies)
/// (default 10 000) are kept: when a new one would exceed it, the least
/// recently used tenth is forgotten, closed ones first. A forgotten
/// dependency starts again with a closed breaker.
///
/// Cheap to clone; clones share the breakers. The default configuration is
/// [`BreakerConfig::default`].
#[derive(Clone)]
pub struct Breakers {
    config: BreakerConfig,
    idle: Duration,
    max: usize,
    breakers: Arc<Mutex<Table>>,
}

#[derive(Default)]
struct Table {
    entries: HashMap<Arc<str>, Entry>,
    /// New entries since idle ones were last swept.
    inserted: usize,
    /// When idle ones were last swept.
    swept: Option<Instant>,
}

impl Table {
    /// Forgets the closed breakers unused for `idle`.
    fn sweep(&mut self, now: Instant, idle: Duration) {
        self.inserted = 0;
        self.swept = Some(now);
        self.entries.retain(|_, entry| !entry.forgotten(now, idle));
    }
}

struct Entry {
    breaker: CircuitBreaker,
    used: Instant,
}

impl Entry {
    /// Whether it is closed and was unused for `idle`: forgotten.
    fn forgotten(&self, now: Instant, idle: Duration) -> bool {
        now.saturating_duration_since(self.used) >= idle
            && self.breaker.state() == BreakerState::Closed
    }
}

impl Default for Breakers {
    fn default() -> Self {
        Self {
            config: BreakerConfig::default(),
            idle: Self::DEFAULT_IDLE,
            max: Self::DEFAULT_MAX_DEPENDENCIES,
            breakers: Arc::default(),
        }
    }
}

impl Breakers {
    /// How long a closed breaker may go unused before it is forgotten: 10
    /// minutes.
    pub const DEFAULT_IDLE: Duration = Duration::from_secs(600);
    /// The shortest [`idle`](Self::idle): a second.
    pub const MIN_IDLE: Duration = Duration::from_secs(1);
    /// How many breakers are kept at most: 10 000.
    pub const DEFAULT_MAX_DEPENDENCIES: usize = 10_000;

    /// Breakers configured by `config`.
    ///
    /// # Errors
    ///
    /// [`PolicyError`] when a setting of `config` is out of range.
    pub fn new(config: BreakerConfig) -> Result<Self, PolicyError> {
        config.check()?;
        Ok(Self {
            config,
            ..Self::default()
        })
    }

    /// Forget a closed breaker after this long unused (default 10 minutes;
    /// at least a second: a breaker forgotten between two calls would
    /// never count their failures together).
    #[must_use]
    pub fn idle(mut self, idle: Duration) -> Self {
        self.idle = idle.max(Self::MIN_IDLE);
        self
    }

    /// Keep at most this many breakers (default 10 000; at least 1).
    #[must_use]
    pub fn max_dependencies(mut self, max: usize) -> Self {
        self.max = max.max(1);
        self
    }

    /// The breaker of `dependency`, made closed on first use.
    #[must_use]
    pub fn get(&self, dependency: &str) -> CircuitBreaker {
        let now = Instant::now();
        let mut table = self.breakers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = table.entries.get_mut(dependency) {
            // A forgotten one (not swept yet) starts again below.
            if !entry.forgotten(now, self.idle) {
                entry.used = now;
                return entry.breaker.clone();
            }
        }
        let sweep_due = table
            .swept
            .is_none_or(|swept| now.saturating_duration_since(swept) >= self.idle);
        if sweep_due || table.inserted >= SWEEP_EVERY || table.entries.len() >= self.max {
            table.sweep(now, self.idle);
        }
        if table.entries.len() >= self.max {
            // Forget the least recently used tenth, closed breakers first.
            let mut by_age: Vec<_> = table
                .entries
                .iter()
                .map(|(name, entry)| {
                    let open = entry.breaker.state() != BreakerState::Closed;
                    (open, entry.used, name.clone())
                })
                .collect();
            by_age.sort_unstable();
            let excess = table.entries.len() + 1 - self.max;
            let forget = excess.max(self.max / 10);
            for (_, _, name) in by_age.into_iter().take(forget) {
                table.entries.remove(&name);
            }
        }
        let name: Arc<str> = dependency.into();
        let breaker = CircuitBreaker::checked(name.clone(), self.config);
        table.entries.insert(
            name,
            Entry {
                breaker: breaker.clone(),
                used: now,
            },
        );
        table.inserted += 1;
        breaker
    }

    /// The table, with the breakers forgotten by now swept.
    fn swept(&self) -> MutexGuard<'_, Table> {
        let mut table = self.breakers.lock().unwrap_or_else(PoisonError::into_inner);
        table.sweep(Instant::now(), self.idle);
        table
    }

    /// How many breakers are kept now.
    #[must_use]
    pub fn len(&self) -> usize {
        self.swept().entries.len()
    }

    /// Whether no breaker is kept.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every dependency kept and its breaker's state, by name.
    #[must_use]
    pub fn states(&self) -> Vec<(String, BreakerState)> {
        let breakers: Vec<_> = self
            .swept()
            .entries
            .values()
            .map(|entry| entry.breaker.clone())
            .collect();
        let mut states: Vec<_> = breakers
            .iter()
            .map(|breaker| (breaker.name().to_owned(), breaker.state()))
            .collect();
        states.sort_by(|a, b| a.0.cmp(&b.0));
        states
    }
}

/// Idle breakers are swept after this many new ones (and, when one is
/// made, once per `idle`; and whenever the table is listed or counted).
const SWEEP_EVERY: usize = 1024;

impl fmt::Debug for Breakers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Breakers")
            .field("config", &self.config)
            .field("states", &self.states())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAIL: Verdict = Verdict::Failed { retry_after: None };

    fn breaker(config: BreakerConfig) -> CircuitBreaker {
        CircuitBreaker::new("dependency", config).unwrap()
    }

    fn call(breaker: &CircuitBreaker, verdict: Verdict) -> Result<(), CircuitOpen> {
        breaker.try_acquire()?.record(verdict);
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn it_opens_probes_and_closes() {
        let cool_down = Duration::from_secs(5);
        let breaker = breaker(
            BreakerConfig::default()
                .consecutive_failures(3)
                .cool_down(cool_down),
        );
        let mut states = breaker.subscribe();
        for _ in 0..2 {
            call(&breaker, FAIL).unwrap();
        }
        assert_eq!(breaker.state(), BreakerState::Closed);
        call(&breaker, FAIL).unwrap();
        assert_eq!(breaker.state(), BreakerState::Open);
        assert!(states.has_changed().unwrap());
        assert_eq!(*states.borrow_and_update(), BreakerState::Open);
        let open = call(&breaker, Verdict::Success).unwrap_err();
        assert_eq!(open.retry_in(), cool_down);
        assert_eq!(open.dependency(), "dependency");

        tokio::time::advance(cool_down).await;
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        let probe = breaker.try_acquire().unwrap();
        assert!(probe.is_probe());
        assert!(breaker.try_acquire().is_err(), "one probe at a time");
        probe.record(FAIL);
        assert_eq!(breaker.state(), BreakerState::Open);

        tokio::time::advance(cool_down).await;
        call(&breaker, Verdict::Success).unwrap();
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert_eq!(*states.borrow_and_update(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn successes_and_alive_answers_reset_the_run_of_failures() {
        let breaker = breaker(BreakerConfig::default().consecutive_failures(3));
        for verdict in [
            FAIL,
            FAIL,
            Verdict::Rejected,
            FAIL,
            FAIL,
            Verdict::Busy { retry_after: None },
        ] {
            call(&breaker, verdict).unwrap();
        }
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_ratio_over_the_window_opens_it() {
        let config = BreakerConfig::default()
            .consecutive_failures(100)
            .failure_ratio(0.5, 10)
            .window(Duration::from_secs(10));
        let breaker = breaker(config);
        for _ in 0..5 {
            call(&breaker, Verdict::Success).unwrap();
            call(&breaker, FAIL).unwrap();
        }
        assert_eq!(breaker.state(), BreakerState::Open);

        let breaker = CircuitBreaker::new("old", config).unwrap();
        for _ in 0..5 {
            call(&breaker, FAIL).unwrap();
        }
        tokio::time::advance(Duration::from_secs(11)).await;
        for _ in 0..5 {
            call(&breaker, Verdict::Success).unwrap();
        }
        call(&breaker, FAIL).unwrap();
        assert_eq!(
            breaker.state(),
            BreakerState::Closed,
            "old failures left the window"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_probe_frees_its_place() {
        let breaker = breaker(BreakerConfig::default().consecutive_failures(1));
        call(&breaker, FAIL).unwrap();
        tokio::time::advance(Duration::from_secs(5)).await;
        drop(breaker.try_acquire().unwrap());
        assert!(breaker.try_acquire().unwrap().is_probe());
    }

    #[test]
    fn settings_out_of_range_are_errors() {
        let setting = |config| CircuitBreaker::new("x", config).unwrap_err().setting();
        let config = BreakerConfig::default();
        assert_eq!(
            setting(config.consecutive_failures(0)),
            "consecutive_failures"
        );
        assert_eq!(setting(config.failure_ratio(1.5, 10)), "failure_ratio");
        assert_eq!(setting(config.failure_ratio(f64::NAN, 10)), "failure_ratio");
        assert_eq!(setting(config.failure_ratio(0.5, 0)), "failure_ratio");
        assert_eq!(setting(config.window(Duration::ZERO)), "window");
        assert_eq!(setting(config.cool_down(Duration::ZERO)), "cool_down");
        assert_eq!(
            setting(config.probe_timeout(Duration::ZERO)),
            "probe_timeout"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_that_never_answers_times_out() {
        let breaker = breaker(
            BreakerConfig::default()
                .consecutive_failures(1)
                .cool_down(Duration::from_secs(5))
                .probe_timeout(Duration::from_secs(2)),
        );
        call(&breaker, FAIL).unwrap();
        tokio::time::advance(Duration::from_secs(5)).await;
        let hung = breaker.try_acquire().unwrap();
        assert!(hung.is_probe());
        let open = breaker.try_acquire().unwrap_err();
        assert_eq!(
            open.retry_in(),
            Duration::from_secs(2),
            "until the probe's deadline"
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        // The hung probe counts as failed: open again for a cool-down...
        assert!(breaker.try_acquire().is_err());
        assert_eq!(breaker.state(), BreakerState::Open);
        tokio::time::advance(Duration::from_secs(5)).await;
        // ...then a new probe, whose success closes it; the hung one's late
        // answer changes nothing.
        let probe = breaker.try_acquire().unwrap();
        assert!(probe.is_probe());
        probe.record(Verdict::Success);
        hung.record(FAIL);
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    /// A hung probe fails at its deadline, not when the next call notices:
    /// the state says so without a call, and a call after the cool-down
    /// that followed the deadline is the next probe.
    #[tokio::test(start_paused = true)]
    async fn a_hung_probes_cool_down_counts_from_its_deadline() {
        let breaker = breaker(
            BreakerConfig::default()
                .consecutive_failures(1)
                .cool_down(Duration::from_secs(5))
                .probe_timeout(Duration::from_secs(10)),
        );
        call(&breaker, FAIL).unwrap();
        tokio::time::advance(Duration::from_secs(5)).await;
        let _hung = breaker.try_acquire().unwrap();
        assert_eq!(breaker.state(), BreakerState::HalfOpen, "probe out");
        tokio::time::advance(Duration::from_secs(12)).await;
        assert_eq!(
            breaker.state(),
            BreakerState::Open,
            "2 s into the cool-down"
        );
        let open = breaker.try_acquire().unwrap_err();
        assert_eq!(open.retry_in(), Duration::from_secs(3), "from the deadline");
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        let probe = breaker.try_acquire().expect("the next call is the probe");
        assert!(probe.is_probe());
        probe.record(Verdict::Success);
        assert_eq!(breaker.state(), BreakerState::Closed);

        // Noticed only an hour after the deadline: the next call probes.
        call(&breaker, FAIL).unwrap();
        tokio::time::advance(Duration::from_secs(5)).await;
        let _hung = breaker.try_acquire().unwrap();
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        let probe = breaker.try_acquire().expect("the next call is the probe");
        assert!(probe.is_probe());
    }

    #[tokio::test(start_paused = true)]
    async fn only_calls_started_in_the_current_state_count() {
        let breaker = breaker(BreakerConfig::default().consecutive_failures(3));
        // Ten calls start during the outage; three fail and open the circuit.
        let mut stragglers: Vec<_> = (0..10).map(|_| breaker.try_acquire().unwrap()).collect();
        for permit in stragglers.drain(..3) {
            permit.record(FAIL);
        }
        assert_eq!(breaker.state(), BreakerState::Open);
        tokio::time::advance(Duration::from_secs(5)).await;
        breaker.try_acquire().unwrap().record(Verdict::Success);
        assert_eq!(breaker.state(), BreakerState::Closed);
        // The rest of the outage's calls fail now: they do not reopen it.
        for permit in stragglers {
            permit.record(FAIL);
        }
        assert_eq!(breaker.state(), BreakerState::Closed);
        for _ in 0..2 {
            call(&breaker, FAIL).unwrap();
        }
        assert_eq!(breaker.state(), BreakerState::Closed);
        call(&breaker, FAIL).unwrap();
        assert_eq!(
            breaker.state(),
            BreakerState::Open,
            "new failures still count"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_longest_settings_never_panic() {
        let breaker = breaker(
            BreakerConfig::default()
                .consecutive_failures(1)
                .window(Duration::MAX)
                .cool_down(Duration::MAX)
                .probe_timeout(Duration::MAX),
        );
        call(&breaker, FAIL).unwrap();
        assert_eq!(breaker.state(), BreakerState::Open);
        assert!(breaker.try_acquire().unwrap_err().retry_in() > Duration::from_secs(86_400));
        let breaker = CircuitBreaker::new(
            "x",
            BreakerConfig::default()
                .consecutive_failures(u32::MAX)
                .failure_ratio(f64::MIN_POSITIVE, u32::MAX)
                .window(Duration::from_millis(10))
                .cool_down(Duration::from_nanos(1))
                .probe_timeout(Duration::from_nanos(1)),
        )
        .unwrap();
        call(&breaker, FAIL).unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        call(&breaker, Verdict::Success).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn breakers_are_bounded() {
        let breakers = Breakers::new(BreakerConfig::default().consecutive_failures(1))
            .unwrap()
            .max_dependencies(1000)
            .idle(Duration::from_secs(60));
        call(&breakers.get("down:443"), FAIL).unwrap();
        for host in 0..100_000 {
            let _ = breakers.get(&format!("host-{host}.example:443"));
            if host % 97 == 0 {
                assert!(breakers.len() <= 1000);
            }
        }
        assert_eq!(
            breakers.get("down:443").state(),
            BreakerState::Open,
            "an open circuit is forgotten last"
        );
        // Idle closed breakers are forgotten once enough new ones came.
        tokio::time::advance(Duration::from_secs(61)).await;
        for host in 0..SWEEP_EVERY {
            let _ = breakers.get(&format!("new-{host}.example:443"));
        }
        assert!(breakers.len() <= SWEEP_EVERY + 1, "{}", breakers.len());
    }

    #[tokio::test(start_paused = true)]
    async fn closed_breakers_idle_for_their_idle_time_are_forgotten() {
        let breakers = Breakers::new(BreakerConfig::default().consecutive_failures(2)).unwrap();
        call(&breakers.get("quiet:443"), FAIL).unwrap();
        call(&breakers.get("down:443"), FAIL).unwrap();
        call(&breakers.get("down:443"), FAIL).unwrap();
        tokio::time::advance(Breakers::DEFAULT_IDLE - Duration::from_secs(1)).await;
        let _ = breakers.get("busy:443");
        assert_eq!(breakers.len(), 3, "none idle for ten minutes yet");
        tokio::time::advance(Duration::from_secs(1)).await;
        // Listed and counted without another breaker made first.
        assert_eq!(
            breakers.states(),
            [
                ("busy:443".to_owned(), BreakerState::Closed),
                ("down:443".to_owned(), BreakerState::HalfOpen),
            ],
            "the idle closed one is forgotten, the opened one (half-open after its cool-down) kept"
        );
        assert_eq!(breakers.len(), 2);
        // A forgotten dependency starts again: its earlier failure is gone.
        call(&breakers.get("quiet:443"), FAIL).unwrap();
        assert_eq!(breakers.get("quiet:443").state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_of_zero_is_a_second() {
        let breakers = Breakers::new(BreakerConfig::default().consecutive_failures(2))
            .unwrap()
            .idle(Duration::ZERO);
        call(&breakers.get("down:443"), FAIL).unwrap();
        call(&breakers.get("down:443"), FAIL).unwrap();
        assert_eq!(breakers.get("down:443").state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_breaker_asked_for_before_any_sweep_starts_again() {
        let breakers = Breakers::new(BreakerConfig::default().consecutive_failures(2)).unwrap();
        call(&breakers.get("quiet:443"), FAIL).unwrap();
        tokio::time::advance(Breakers::DEFAULT_IDLE).await;
        call(&breakers.get("quiet:443"), FAIL).unwrap();
        assert_eq!(
            breakers.get("quiet:443").state(),
            BreakerState::Closed,
            "one failure since it was forgotten"
        );
    }

    #[test]
    fn breakers_are_kept_per_dependency() {
        let breakers = Breakers::new(BreakerConfig::default().consecutive_failures(1)).unwrap();
        call(&breakers.get("a:443"), FAIL).unwrap();
        assert_eq!(breakers.get("a:443").state(), BreakerState::Open);
        assert_eq!(breakers.get("b:443").state(), BreakerState::Closed);
        assert_eq!(
            breakers.states(),
            [
                ("a:443".to_owned(), BreakerState::Open),
                ("b:443".to_owned(), BreakerState::Closed)
            ]
        );
    }
}
