//! Per-call settings and the rules they follow.
//!
//! This module is the one home of every rule about durations: the defaults,
//! the bounds, and how `ttl`, `lease` and `wait_timeout` relate. The builder
//! enforces them and answers a [`ConfigError`] instead of panicking; the
//! `#[idempotent]` attribute checks literal durations against the same rules
//! at compile time (a test pins its copies to the constants here).

use std::fmt;
use std::time::Duration;

/// The default time a completed result is kept: 24 hours.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// The default lease of an in-progress claim: 60 seconds.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(60);

/// The shortest lease: 10 milliseconds. A claim is renewed every third of
/// its lease, so a shorter one would be renewed faster than a store answers.
pub const MIN_LEASE: Duration = Duration::from_millis(10);

/// The longest `ttl`, `lease` or `wait_timeout`: 3650 days (about ten
/// years). Longer durations overflow the clocks and the stores' millisecond
/// counters.
pub const MAX_DURATION: Duration = Duration::from_secs(3650 * 24 * 60 * 60);

/// What a call does when another call holds its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum OnConflict {
    /// Wait for the holder's result, up to the wait timeout.
    #[default]
    Wait,
    /// Fail at once with [`Error::InProgress`](crate::Error::InProgress).
    Reject,
}

/// The isolation level of a transactional call's transaction (PostgreSQL's
/// `transaction = tx` and `run_in_transaction`): idem opens the transaction
/// with it, before any statement runs. Other calls ignore it. Without it the
/// transaction runs at the database's default level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Isolation {
    /// `READ COMMITTED`.
    ReadCommitted,
    /// `REPEATABLE READ`.
    RepeatableRead,
    /// `SERIALIZABLE`: a serialization failure rolls the call back (its
    /// caller gets the error, nothing is recorded, and a retry runs again).
    Serializable,
}

impl Isolation {
    /// The level as SQL spells it.
    #[must_use]
    pub const fn as_sql(self) -> &'static str {
        match self {
            Self::ReadCommitted => "READ COMMITTED",
            Self::RepeatableRead => "REPEATABLE READ",
            Self::Serializable => "SERIALIZABLE",
        }
    }
}

/// How one call runs: how long its result is kept, how long its claim holds,
/// and what it does when another call holds its key.
///
/// `Settings` is a small `Copy` value, built once (it can be a `const`) and
/// passed to [`Idempotency::run`](crate::Idempotency::run). Every setting
/// is checked when it is built:
///
/// ```
/// use std::time::Duration;
/// use idem_core::{OnConflict, Settings};
///
/// let settings = Settings::builder()
///     .ttl(Duration::from_secs(3600))
///     .lease(Duration::from_secs(30))
///     .on_conflict(OnConflict::Reject)
///     .build()?;
/// assert_eq!(settings.ttl(), Duration::from_secs(3600));
///
/// let wrong = Settings::builder().ttl(Duration::from_secs(10)).lease(Duration::from_secs(30)).build();
/// assert_eq!(
///     wrong.unwrap_err().to_string(),
///     "`lease` (30s) must be shorter than `ttl` (10s): a claim that outlives its result \
///      would block retries after the result expired",
/// );
/// # Ok::<(), idem_core::ConfigError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Settings {
    ttl: Duration,
    lease: Duration,
    on_conflict: OnConflict,
    wait_timeout: Option<Duration>,
    isolation: Option<Isolation>,
    steps: bool,
}

impl Settings {
    /// The defaults: a TTL of [`DEFAULT_TTL`], a lease of [`DEFAULT_LEASE`],
    /// [`OnConflict::Wait`] and a wait timeout of one lease.
    pub const DEFAULT: Self = Self {
        ttl: DEFAULT_TTL,
        lease: DEFAULT_LEASE,
        on_conflict: OnConflict::Wait,
        wait_timeout: None,
        isolation: None,
        steps: false,
    };

    /// Starts from the defaults.
    pub const fn builder() -> SettingsBuilder {
        SettingsBuilder {
            ttl: None,
            lease: None,
            on_conflict: OnConflict::Wait,
            wait_timeout: None,
            isolation: None,
            steps: false,
        }
    }

    /// How long a completed result is kept.
    #[must_use]
    pub const fn ttl(&self) -> Duration {
        self.ttl
    }

    /// How long an in-progress claim holds before another caller may take
    /// over. It is renewed while the body runs.
    #[must_use]
    pub const fn lease(&self) -> Duration {
        self.lease
    }

    /// What a call does when another holds its key.
    #[must_use]
    pub const fn on_conflict(&self) -> OnConflict {
        self.on_conflict
    }

    /// The isolation level a transactional call's transaction is opened
    /// with, if one is set.
    #[must_use]
    pub const fn isolation(&self) -> Option<Isolation> {
        self.isolation
    }

    /// Whether the body runs journaled [`step`](crate::step)s, so that the
    /// call reads its journal together with its claim.
    #[must_use]
    pub const fn expects_steps(&self) -> bool {
        self.steps
    }

    /// The longest a call waits for another's result under
    /// [`OnConflict::Wait`]: the one set, or else the lease.
    #[must_use]
    pub const fn wait_timeout(&self) -> Duration {
        match self.wait_timeout {
            Some(wait) => wait,
            None => self.lease,
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Builds [`Settings`]; made by [`Settings::builder`]. Every method is a
/// `const fn`, so settings can be a `const`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct SettingsBuilder {
    ttl: Option<Duration>,
    lease: Option<Duration>,
    on_conflict: OnConflict,
    wait_timeout: Option<Duration>,
    isolation: Option<Isolation>,
    steps: bool,
}

impl SettingsBuilder {
    /// How long a completed result is kept. Default [`DEFAULT_TTL`].
    pub const fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// How long an in-progress claim holds if its holder stalls or dies.
    /// Default [`DEFAULT_LEASE`]; at least [`MIN_LEASE`], and shorter than
    /// the TTL.
    pub const fn lease(mut self, lease: Duration) -> Self {
        self.lease = Some(lease);
        self
    }

    /// What a call does when another holds its key. Default
    /// [`OnConflict::Wait`].
    pub const fn on_conflict(mut self, on_conflict: OnConflict) -> Self {
        self.on_conflict = on_conflict;
        self
    }

    /// The longest a call waits for another's result; only with
    /// [`OnConflict::Wait`]. Default: the lease.
    pub const fn wait_timeout(mut self, wait_timeout: Duration) -> Self {
        self.wait_timeout = Some(wait_timeout);
        self
    }

    /// The isolation level of a transactional call's transaction (see
    /// [`Isolation`]). Default: the database's.
    pub const fn isolation(mut self, isolation: Isolation) -> Self {
        self.isolation = Some(isolation);
        self
    }

    /// Says the body runs journaled [`step`](crate::step)s: a claim then
    /// reads the call's journal with it, in the same round trip on Redis,
    /// so that the first step costs no round trip of its own. Without it
    /// the journal is read when the first step runs. Default: off; the
    /// `#[idempotent]` attribute turns it on for a body that calls `step`.
    pub const fn expect_steps(mut self, steps: bool) -> Self {
        self.steps = steps;
        self
    }

    /// Checks the settings against every rule.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the setting that breaks a rule: a zero
    /// duration, one longer than [`MAX_DURATION`], a lease shorter than
    /// [`MIN_LEASE`] or not shorter than the TTL, or a wait timeout with
    /// [`OnConflict::Reject`].
    pub const fn build(self) -> Result<Settings, ConfigError> {
        let ttl = match self.ttl {
            Some(ttl) => ttl,
            None => DEFAULT_TTL,
        };
        let lease = match self.lease {
            Some(lease) => lease,
            None => DEFAULT_LEASE,
        };
        if let Err(e) = in_range("ttl", ttl, Duration::ZERO) {
            return Err(e);
        }
        if let Err(e) = in_range("lease", lease, MIN_LEASE) {
            return Err(e);
        }
        if lease.as_nanos() >= ttl.as_nanos() {
            return Err(ConfigError(Rule::LeaseNotShorterThanTtl {
                lease,
                ttl,
                lease_is_default: self.lease.is_none(),
            }));
        }
        if let Some(wait) = self.wait_timeout {
            if let OnConflict::Reject = self.on_conflict {
                return Err(ConfigError(Rule::WaitTimeoutWithReject));
            }
            if let Err(e) = in_range("wait_timeout", wait, Duration::ZERO) {
                return Err(e);
            }
        }
        Ok(Settings {
            ttl,
            lease,
            on_conflict: self.on_conflict,
            wait_timeout: self.wait_timeout,
            isolation: self.isolation,
            steps: self.steps,
        })
    }
}

/// Checks `value` is non-zero, at least `min` and at most [`MAX_DURATION`].
const fn in_range(
    setting: &'static str,
    value: Duration,
    min: Duration,
) -> Result<(), ConfigError> {
    if value.is_zero() {
        return Err(ConfigError(Rule::Zero { setting }));
    }
    if value.as_nanos() < min.as_nanos() {
        return Err(ConfigError(Rule::TooShort {
            setting,
            value,
            min,
        }));
    }
    if value.as_nanos() > MAX_DURATION.as_nanos() {
        return Err(ConfigError(Rule::TooLong { setting, value }));
    }
    Ok(())
}

/// A setting breaks one of idem's rules. Its message names the setting as
/// the builder and the `#[idempotent]` attribute spell it, and says what to
/// write instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigError(Rule);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    Zero {
        setting: &'static str,
    },
    TooShort {
        setting: &'static str,
        value: Duration,
        min: Duration,
    },
    TooLong {
        setting: &'static str,
        value: Duration,
    },
    LeaseNotShorterThanTtl {
        lease: Duration,
        ttl: Duration,
        lease_is_default: bool,
    },
    WaitTimeoutWithReject,
    LeaseTooShortForStore {
        lease: Duration,
        response_timeout: Duration,
    },
    SharedDefaultName {
        name: &'static str,
        first: &'static str,
        second: &'static str,
    },
}

impl ConfigError {
    /// The lease is too short for the store to renew it in time: a renewal
    /// must be able to time out once and be retried within the lease.
    pub(crate) fn lease_too_short_for_store(lease: Duration, response_timeout: Duration) -> Self {
        Self(Rule::LeaseTooShortForStore {
            lease,
            response_timeout,
        })
    }

    /// Two `#[idempotent]` fns without a pinned `name` whose default names
    /// are one (`name`, at `first` and `second`).
    pub(crate) fn shared_default_name(
        name: &'static str,
        first: &'static str,
        second: &'static str,
    ) -> Self {
        Self(Rule::SharedDefaultName {
            name,
            first,
            second,
        })
    }

    /// The setting at fault: `"ttl"`, `"lease"`, `"wait_timeout"`, or
    /// `"name"` for two `#[idempotent]` fns whose default names are one.
    #[must_use]
    pub fn setting(&self) -> &'static str {
        match self.0 {
            Rule::Zero { setting }
            | Rule::TooShort { setting, .. }
            | Rule::TooLong { setting, .. } => setting,
            Rule::LeaseNotShorterThanTtl {
                lease_is_default, ..
            } => {
                if lease_is_default {
                    "ttl"
                } else {
                    "lease"
                }
            }
            Rule::WaitTimeoutWithReject => "wait_timeout",
            Rule::LeaseTooShortForStore { .. } => "lease",
            Rule::SharedDefaultName { .. } => "name",
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Rule::Zero { setting } => {
                write!(
                    f,
                    "`{setting}` is zero; an idempotency {setting} must be positive"
                )
            }
            Rule::TooShort {
                setting,
                value,
                min,
            } => write!(
                f,
                "`{setting}` ({}) is shorter than the minimum of {}",
                display(value),
                display(min)
            ),
            Rule::TooLong { setting, value } => write!(
                f,
                "`{setting}` ({}) is longer than the maximum of {}",
                display(value),
                display(MAX_DURATION)
            ),
            // No lease is both at least the shortest and shorter than it.
            Rule::LeaseNotShorterThanTtl { ttl, .. } if ttl <= MIN_LEASE => write!(
                f,
                "`ttl` ({}) must be longer than the shortest lease ({}), which must be \
                 shorter than it; set a longer one, e.g. `ttl = \"1s\", lease = \"300ms\"`",
                display(ttl),
                display(MIN_LEASE)
            ),
            Rule::LeaseNotShorterThanTtl {
                lease,
                ttl,
                lease_is_default: true,
            } => write!(
                f,
                "`ttl` ({}) must be longer than the lease, which is {} by default; set a \
                 shorter one, e.g. `lease = \"{}\"`",
                display(ttl),
                display(lease),
                display((ttl / 3).max(MIN_LEASE))
            ),
            Rule::LeaseNotShorterThanTtl { lease, ttl, .. } => write!(
                f,
                "`lease` ({}) must be shorter than `ttl` ({}): a claim that outlives its \
                 result would block retries after the result expired",
                display(lease),
                display(ttl)
            ),
            Rule::WaitTimeoutWithReject => f.write_str(
                "`wait_timeout` needs `on_conflict = wait`: with `on_conflict = reject` a call \
                 never waits; remove one of them",
            ),
            Rule::LeaseTooShortForStore {
                lease,
                response_timeout,
            } => write!(
                f,
                "`lease` ({}) must be at least three times the store's response timeout ({}), \
                 so that a renewal that times out can be retried before the lease lapses; \
                 lengthen the lease or shorten the store's response timeout",
                display(lease),
                display(response_timeout)
            ),
            Rule::SharedDefaultName {
                name,
                first,
                second,
            } if first == second => write!(
                f,
                "two #[idempotent] functions are named `{name}` by default (both written at \
                 {first}, by one macro call), so they would share records; give each its own \
                 `name = \"…\"`"
            ),
            Rule::SharedDefaultName {
                name,
                first,
                second,
            } => write!(
                f,
                "two #[idempotent] functions are named `{name}` by default ({first} and \
                 {second}), so they would share records; give each its own \
                 `name = \"…\"`"
            ),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Renders a duration in the attribute's literal syntax: `1h30m`, `500ms`.
pub(crate) fn display(duration: Duration) -> String {
    const UNITS: [(&str, u128); 5] = [
        ("d", 86_400_000_000_000),
        ("h", 3_600_000_000_000),
        ("m", 60_000_000_000),
        ("s", 1_000_000_000),
        ("ms", 1_000_000),
    ];
    let mut nanos = duration.as_nanos();
    if nanos == 0 {
        return "0s".to_owned();
    }
    if nanos < 1_000_000 {
        return format!("{duration:?}");
    }
    let mut out = String::new();
    for (unit, len) in UNITS {
        if nanos >= len {
            out.push_str(&format!("{}{unit}", nanos / len));
            nanos %= len;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_ttl_no_lease_fits_says_so() {
        let error = Settings::builder()
            .ttl(Duration::from_millis(10))
            .build()
            .unwrap_err();
        assert_eq!(error.setting(), "ttl");
        let message = error.to_string();
        assert!(message.contains("shortest lease"), "{message}");
        assert!(!message.contains("e.g. `lease"), "{message}");
        let error = Settings::builder()
            .ttl(MAX_DURATION + Duration::from_secs(1))
            .build()
            .unwrap_err();
        assert!(error.to_string().ends_with("maximum of 3650d"), "{error}");
    }

    use super::*;

    const fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn defaults_hold_every_rule() {
        assert_eq!(Settings::builder().build(), Ok(Settings::DEFAULT));
        assert_eq!(Settings::DEFAULT.wait_timeout(), DEFAULT_LEASE);
    }

    #[test]
    fn every_rule_is_an_error_not_a_panic() {
        let cases = [
            (Settings::builder().ttl(Duration::ZERO), "ttl", "zero"),
            (Settings::builder().lease(Duration::ZERO), "lease", "zero"),
            (
                Settings::builder().wait_timeout(Duration::ZERO),
                "wait_timeout",
                "zero",
            ),
            (Settings::builder().ttl(Duration::MAX), "ttl", "maximum"),
            (
                Settings::builder().wait_timeout(Duration::MAX),
                "wait_timeout",
                "maximum",
            ),
            (
                Settings::builder().lease(Duration::from_micros(500)),
                "lease",
                "minimum",
            ),
            (
                Settings::builder().ttl(secs(60)),
                "ttl",
                "by default; set a shorter one, e.g. `lease = \"20s\"`",
            ),
            (
                Settings::builder().ttl(secs(10)).lease(secs(10)),
                "lease",
                "must be shorter than `ttl`",
            ),
            (
                Settings::builder()
                    .on_conflict(OnConflict::Reject)
                    .wait_timeout(secs(1)),
                "wait_timeout",
                "needs `on_conflict = wait`",
            ),
        ];
        for (builder, setting, says) in cases {
            let err = builder.build().unwrap_err();
            assert_eq!(err.setting(), setting, "{err}");
            assert!(err.to_string().contains(says), "{err}");
        }
    }

    #[test]
    fn settings_can_be_const() {
        const SETTINGS: Result<Settings, ConfigError> = Settings::builder()
            .ttl(secs(3600))
            .lease(secs(30))
            .wait_timeout(secs(5))
            .build();
        let settings = SETTINGS.unwrap();
        assert_eq!(
            (settings.ttl(), settings.lease(), settings.wait_timeout()),
            (secs(3600), secs(30), secs(5))
        );
    }

    /// The attribute checks literal durations at compile time with copies of
    /// these rules; they must not drift from the runtime's.
    #[cfg(feature = "macros")]
    #[test]
    fn the_macro_mirrors_these_rules() {
        let (ttl, lease, min_lease, max): (u64, u64, u64, u64) = idem_macros::__rules!();
        assert_eq!(Duration::from_millis(ttl), DEFAULT_TTL);
        assert_eq!(Duration::from_millis(lease), DEFAULT_LEASE);
        assert_eq!(Duration::from_millis(min_lease), MIN_LEASE);
        assert_eq!(Duration::from_millis(max), MAX_DURATION);
    }

    #[test]
    fn durations_display_in_the_attribute_syntax() {
        assert_eq!(display(secs(5400)), "1h30m");
        assert_eq!(display(Duration::from_millis(1500)), "1s500ms");
        assert_eq!(display(secs(86_400)), "1d");
        assert_eq!(display(Duration::from_micros(5)), "5µs");
    }
}
