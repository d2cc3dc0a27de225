//! How long to wait between attempts, and when to stop.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use super::CircuitBreaker;

/// A retry policy: exponential backoff with full jitter, an attempt limit, a
/// time limit, a retry budget and, optionally, a circuit breaker.
///
/// Cheap to clone; clones share one budget and one breaker, so a policy made
/// once and cloned into every client caps the retries of them all.
///
/// **Backoff.** Before retry `n` (the first retry is `n = 1`) it waits a
/// uniformly random time in `[0, min(cap, base · 2ⁿ⁻¹)]` — "full jitter".
/// Of the usual schemes it spreads clients that failed together the most
/// evenly, so a thousand of them do not come back in lockstep, and its
/// bounds are plain to state and to test (decorrelated jitter spreads about
/// as well, but each delay depends on the last). When the dependency sent
/// `Retry-After`, the wait is that long plus a random `[0, base]`, so that
/// the clients it told the same moment do not return at once.
///
/// **Limits.** It stops after `max_attempts` attempts, or when the next wait
/// would end later than `max_elapsed` after the first attempt began (a
/// `Retry-After` is judged as the dependency sent it, and the jitter added
/// to it cut to the time left; a request still in progress, a 409, is
/// looked at once more at the limit), or when the [`RetryBudget`] has no
/// retry left; the last outcome is then returned. A look at a request in
/// progress is an attempt like any other. An attempt under way is not cut
/// at `max_elapsed`.
///
/// ```
/// use std::time::Duration;
/// use idem_core::client::{RetryBudget, RetryPolicy};
///
/// let policy = RetryPolicy::builder()
///     .base(Duration::from_millis(50))
///     .cap(Duration::from_secs(5))
///     .max_attempts(4)
///     .max_elapsed(Duration::from_secs(20))
///     .budget(RetryBudget::new(0.1, Duration::from_secs(10), 5)?)
///     .build()?;
/// # Ok::<(), idem_core::client::PolicyError>(())
/// ```
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    pub(super) base: Duration,
    pub(super) cap: Duration,
    pub(super) max_attempts: u32,
    pub(super) max_elapsed: Duration,
    pub(super) budget: Option<RetryBudget>,
    pub(super) breaker: Option<CircuitBreaker>,
}

impl RetryPolicy {
    /// The default first backoff bound: 100 ms.
    pub const DEFAULT_BASE: Duration = Duration::from_millis(100);
    /// The default largest backoff bound: 10 s.
    pub const DEFAULT_CAP: Duration = Duration::from_secs(10);
    /// The default attempt limit, the first attempt included: 4.
    pub const DEFAULT_MAX_ATTEMPTS: u32 = 4;
    /// The default time limit: 30 s.
    pub const DEFAULT_MAX_ELAPSED: Duration = Duration::from_secs(30);

    /// A builder, starting from the defaults.
    pub fn builder() -> RetryPolicyBuilder {
        RetryPolicyBuilder {
            policy: Self {
                base: Self::DEFAULT_BASE,
                cap: Self::DEFAULT_CAP,
                max_attempts: Self::DEFAULT_MAX_ATTEMPTS,
                max_elapsed: Self::DEFAULT_MAX_ELAPSED,
                budget: Some(RetryBudget::default()),
                breaker: None,
            },
        }
    }

    /// The bound of the random wait before retry `retry` (1 for the first):
    /// `min(cap, base · 2^(retry - 1))`.
    #[must_use]
    pub fn backoff_bound(&self, retry: u32) -> Duration {
        let doublings = retry.saturating_sub(1).min(63);
        self.base
            .checked_mul(1u32.checked_shl(doublings).unwrap_or(u32::MAX))
            .unwrap_or(Duration::MAX)
            .min(self.cap)
    }

    /// The wait before retry `retry`: uniformly random in
    /// `[0, backoff_bound(retry)]`, or `retry_after` plus a random
    /// `[0, base]` when the dependency asked for it.
    #[must_use]
    pub fn delay(&self, retry: u32, retry_after: Option<Duration>) -> Duration {
        match retry_after {
            Some(after) => after.saturating_add(uniform(self.base)),
            None => uniform(self.backoff_bound(retry)),
        }
    }

    /// The attempt limit, the first attempt included.
    #[must_use]
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The time limit.
    #[must_use]
    pub fn max_elapsed(&self) -> Duration {
        self.max_elapsed
    }

    /// The shared retry budget, if any.
    #[must_use]
    pub fn budget(&self) -> Option<&RetryBudget> {
        self.budget.as_ref()
    }

    /// The circuit breaker that [`retry`](super::retry) consults, if any.
    #[must_use]
    pub fn breaker(&self) -> Option<&CircuitBreaker> {
        self.breaker.as_ref()
    }
}

impl Default for RetryPolicy {
    /// Backoff from 100 ms up to 10 s, 4 attempts within 30 s, the default
    /// budget, no breaker.
    fn default() -> Self {
        Self::builder().policy
    }
}

fn uniform(bound: Duration) -> Duration {
    let nanos = u64::try_from(bound.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rand::rng().random_range(0..=nanos))
}

/// Builds a [`RetryPolicy`]; [`build`](Self::build) checks the settings.
#[derive(Debug, Clone)]
#[must_use]
pub struct RetryPolicyBuilder {
    policy: RetryPolicy,
}

impl RetryPolicyBuilder {
    /// The bound of the first retry's random wait (default 100 ms); each
    /// further retry doubles it, up to [`cap`](Self::cap).
    pub fn base(mut self, base: Duration) -> Self {
        self.policy.base = base;
        self
    }

    /// The largest bound of a random wait (default 10 s).
    pub fn cap(mut self, cap: Duration) -> Self {
        self.policy.cap = cap;
        self
    }

    /// The attempt limit, the first attempt included (default 4; 1 means
    /// no retries).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.policy.max_attempts = attempts;
        self
    }

    /// The time from the first attempt after which no retry starts
    /// (default 30 s).
    pub fn max_elapsed(mut self, elapsed: Duration) -> Self {
        self.policy.max_elapsed = elapsed;
        self
    }

    /// The retry budget shared by every clone of the policy (default
    /// [`RetryBudget::default`]).
    pub fn budget(mut self, budget: RetryBudget) -> Self {
        self.policy.budget = Some(budget);
        self
    }

    /// No retry budget: only the attempt and time limits bound retries. A
    /// fleet of clients without one can multiply an outage's load by
    /// `max_attempts`.
    pub fn no_budget(mut self) -> Self {
        self.policy.budget = None;
        self
    }

    /// A circuit breaker for the one dependency this policy's
    /// [`retry`](super::retry) calls reach. (The reqwest middleware keeps one
    /// per host instead; see [`Breakers`](super::Breakers).)
    pub fn breaker(mut self, breaker: CircuitBreaker) -> Self {
        self.policy.breaker = Some(breaker);
        self
    }

    /// The policy, or the first setting that is out of range.
    ///
    /// # Errors
    ///
    /// [`PolicyError`] naming the setting: a zero `max_attempts`,
    /// `max_elapsed` or `base`, or a `cap` below `base`.
    pub fn build(self) -> Result<RetryPolicy, PolicyError> {
        let policy = self.policy;
        if policy.max_attempts == 0 {
            return Err(PolicyError::new("max_attempts", "must be at least 1"));
        }
        if policy.base.is_zero() {
            return Err(PolicyError::new("base", "must be longer than zero"));
        }
        if policy.cap < policy.base {
            return Err(PolicyError::new("cap", "must be at least `base`"));
        }
        if policy.max_elapsed.is_zero() {
            return Err(PolicyError::new("max_elapsed", "must be longer than zero"));
        }
        Ok(policy)
    }
}

/// Caps retries at a fraction of the operations started over a sliding
/// window, plus a reserve, so that retries cannot multiply an outage's
/// load: when every call fails, clients sharing a budget add at most
/// `ratio` retries per operation (and the reserve) instead of
/// `max_attempts - 1`.
///
/// This is finagle's retry budget: each operation deposits `ratio` of a
/// retry, each retry withdraws one, deposits and withdrawals count for
/// `window` (in tenths of it, so they leave it a tenth at a time), and a
/// reserve of `min_per_sec` × `window` (in seconds) retries is always there
/// besides: a client that started few operations may retry that many
/// within a window, all at once if its calls fail together. Exact to a
/// thousandth of a retry (tower's `TpsBudget`, which it follows, rounds
/// `1 / ratio` down to a whole number, so that `0.6` there allows as many
/// retries as `1.0`). Cheap to clone; clones share the tokens.
#[derive(Clone)]
pub struct RetryBudget {
    tokens: Arc<Tokens>,
    ratio: f32,
    window: Duration,
    min_per_sec: u32,
}

/// What a retry withdraws from a [`RetryBudget`]; an operation deposits
/// `ratio` of it.
const RETRY: i64 = 1000;
/// The tenths of a budget's window that deposits and withdrawals leave it by.
const SLOTS: usize = 10;

/// A budget's balance: the reserve, and what each tenth of the window
/// added (deposits) and took (withdrawals).
struct Tokens {
    deposit: i64,
    reserve: i64,
    slot: Duration,
    slots: Mutex<Slots>,
}

struct Slots {
    counts: [i64; SLOTS],
    current: usize,
    /// When the current slot began.
    began: Instant,
}

impl Tokens {
    fn new(ratio: f32, window: Duration, min_per_sec: u32) -> Self {
        // `ratio` is at most 1000 and `min_per_sec` below `i32::MAX`, the
        // window at most 60 s: both fit an i64 many times over.
        #[allow(clippy::cast_possible_truncation)]
        let deposit = (f64::from(ratio) * RETRY as f64).round() as i64;
        #[allow(clippy::cast_possible_truncation)]
        let reserve = (f64::from(min_per_sec) * window.as_secs_f64() * RETRY as f64).round() as i64;
        Self {
            deposit,
            reserve,
            slot: window / SLOTS as u32,
            slots: Mutex::new(Slots {
                counts: [0; SLOTS],
                current: 0,
                began: Instant::now(),
            }),
        }
    }

    /// The slots, with those that left the window by now emptied.
    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if now < slots.began {
            // A clock behind the one the budget began on (another runtime's
            // paused clock): the current slot begins now, or nothing would
            // leave the window until that clock caught up.
            slots.began = now;
        }
        let elapsed = now.saturating_duration_since(slots.began).as_nanos();
        let slot = self.slot.as_nanos();
        let passed = elapsed / slot;
        if passed > 0 {
            for _ in 0..passed.min(SLOTS as u128) {
                slots.current = (slots.current + 1) % SLOTS;
                let current = slots.current;
                slots.counts[current] = 0;
            }
            // The remainder is below one slot (at most 6 s).
            #[allow(clippy::cast_possible_truncation)]
            let into_slot = Duration::from_nanos((elapsed % slot) as u64);
            slots.began = now.checked_sub(into_slot).unwrap_or(now);
        }
        slots
    }

    fn deposit(&self) {
        let mut slots = self.slots();
        let current = slots.current;
        slots.counts[current] = slots.counts[current].saturating_add(self.deposit);
    }

    fn withdraw(&self) -> bool {
        let mut slots = self.slots();
        let balance = slots
            .counts
            .iter()
            .fold(self.reserve, |sum, count| sum.saturating_add(*count));
        if balance < RETRY {
            return false;
        }
        let current = slots.current;
        slots.counts[current] -= RETRY;
        true
    }
}

impl RetryBudget {
    /// The default budget: retries may add 20% to the operations of the
    /// last 10 s, plus a reserve of 10 a second over those 10 s (100).
    pub const DEFAULT: (f32, Duration, u32) = (0.2, Duration::from_secs(10), 10);

    /// A budget that lets retries add `ratio` (e.g. `0.2` for 20%) to the
    /// operations started in the last `window`, plus a reserve of
    /// `min_per_sec` × `window` (in seconds) retries for clients that have
    /// started few (see [`RetryBudget`]).
    ///
    /// # Errors
    ///
    /// [`PolicyError`] when `window` is not between 1 and 60 s, `ratio` is
    /// not a number between 0 and 1000, or `min_per_sec` is not below
    /// `i32::MAX`.
    pub fn new(ratio: f32, window: Duration, min_per_sec: u32) -> Result<Self, PolicyError> {
        if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&window) {
            return Err(PolicyError::new(
                "budget window",
                "must be between 1 and 60 seconds",
            ));
        }
        if !(0.0..=1000.0).contains(&ratio) {
            return Err(PolicyError::new(
                "budget ratio",
                "must be a number between 0 and 1000",
            ));
        }
        if i32::try_from(min_per_sec).is_err() || min_per_sec == i32::MAX.unsigned_abs() {
            return Err(PolicyError::new(
                "budget min_per_sec",
                "must be below i32::MAX",
            ));
        }
        Ok(Self {
            tokens: Arc::new(Tokens::new(ratio, window, min_per_sec)),
            ratio,
            window,
            min_per_sec,
        })
    }

    /// Records an operation's first attempt.
    pub fn deposit(&self) {
        self.tokens.deposit();
    }

    /// Takes one retry from the budget; `false` when none is left.
    #[must_use]
    pub fn withdraw(&self) -> bool {
        self.tokens.withdraw()
    }
}

impl Default for RetryBudget {
    fn default() -> Self {
        let (ratio, window, min_per_sec) = Self::DEFAULT;
        Self {
            tokens: Arc::new(Tokens::new(ratio, window, min_per_sec)),
            ratio,
            window,
            min_per_sec,
        }
    }
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudget")
            .field("ratio", &self.ratio)
            .field("window", &self.window)
            .field("min_per_sec", &self.min_per_sec)
            .finish_non_exhaustive()
    }
}

/// A retry policy, budget or breaker setting is out of range; the message
/// names the setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid retry setting `{setting}`: {rule}")]
pub struct PolicyError {
    setting: &'static str,
    rule: &'static str,
}

impl PolicyError {
    pub(super) const fn new(setting: &'static str, rule: &'static str) -> Self {
        Self { setting, rule }
    }

    /// The setting at fault, as the builder spells it.
    #[must_use]
    pub fn setting(&self) -> &'static str {
        self.setting
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_full_jitter() {
        let policy = RetryPolicy::builder()
            .base(Duration::from_millis(100))
            .cap(Duration::from_secs(1))
            .build()
            .unwrap();
        let bounds: Vec<_> = (1..=6)
            .map(|n| policy.backoff_bound(n).as_millis())
            .collect();
        assert_eq!(bounds, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(policy.backoff_bound(u32::MAX), Duration::from_secs(1));
        let delays: Vec<_> = (0..1000).map(|_| policy.delay(3, None)).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(400)));
        let low = delays
            .iter()
            .filter(|d| **d < Duration::from_millis(200))
            .count();
        assert!(
            (350..650).contains(&low),
            "full jitter is uniform: {low} of 1000 below half"
        );
    }

    #[test]
    fn retry_after_is_a_floor_with_a_little_jitter() {
        let policy = RetryPolicy::default();
        for _ in 0..100 {
            let delay = policy.delay(1, Some(Duration::from_secs(1)));
            assert!(delay >= Duration::from_secs(1));
            assert!(delay <= Duration::from_secs(1) + RetryPolicy::DEFAULT_BASE);
        }
    }

    #[test]
    fn settings_out_of_range_are_errors_naming_them() {
        let setting = |b: RetryPolicyBuilder| b.build().unwrap_err().setting();
        assert_eq!(
            setting(RetryPolicy::builder().max_attempts(0)),
            "max_attempts"
        );
        assert_eq!(setting(RetryPolicy::builder().base(Duration::ZERO)), "base");
        assert_eq!(
            setting(
                RetryPolicy::builder()
                    .base(Duration::from_secs(2))
                    .cap(Duration::from_secs(1))
            ),
            "cap"
        );
        assert_eq!(
            setting(RetryPolicy::builder().max_elapsed(Duration::ZERO)),
            "max_elapsed"
        );
        let budget = |r, w, m| RetryBudget::new(r, w, m).unwrap_err().setting();
        assert_eq!(budget(0.1, Duration::ZERO, 1), "budget window");
        assert_eq!(budget(0.1, Duration::from_secs(61), 1), "budget window");
        assert_eq!(budget(f32::NAN, Duration::from_secs(1), 1), "budget ratio");
        assert_eq!(budget(-1.0, Duration::from_secs(1), 1), "budget ratio");
        assert_eq!(
            budget(0.1, Duration::from_secs(1), u32::MAX),
            "budget min_per_sec"
        );
        assert_eq!(
            budget(0.2, Duration::from_secs(10), i32::MAX.unsigned_abs()),
            "budget min_per_sec"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn every_accepted_extreme_works() {
        for (ratio, window, min_per_sec) in [
            (0.0, Duration::from_secs(1), 0),
            (1000.0, Duration::from_secs(60), i32::MAX.unsigned_abs() - 1),
            (f32::MIN_POSITIVE, Duration::from_secs(60), 0),
            (1.0, Duration::from_secs(1), 1),
        ] {
            let budget = RetryBudget::new(ratio, window, min_per_sec).unwrap();
            budget.deposit();
            let _ = budget.withdraw();
        }
        let policy = RetryPolicy::builder()
            .base(Duration::MAX)
            .cap(Duration::MAX)
            .max_attempts(u32::MAX)
            .max_elapsed(Duration::MAX)
            .build()
            .unwrap();
        let _ = policy.delay(u32::MAX, None);
        let _ = policy.delay(1, Some(Duration::MAX));
        assert_eq!(policy.backoff_bound(64), Duration::MAX);
    }

    #[tokio::test(start_paused = true)]
    async fn a_budget_caps_retries_at_its_ratio() {
        let budget = RetryBudget::new(0.1, Duration::from_secs(1), 0).unwrap();
        for _ in 0..100 {
            budget.deposit();
        }
        let granted = (0..100).take_while(|_| budget.withdraw()).count();
        assert_eq!(granted, 10);
    }

    #[tokio::test(start_paused = true)]
    async fn a_budget_grants_its_ratio_exactly() {
        for (ratio, expected) in [
            (0.0, 0),
            (0.1, 10),
            (0.2, 20),
            (0.25, 25),
            (0.4, 40),
            (0.6, 60),
            (0.75, 75),
            (1.0, 100),
            (2.5, 250),
            (1000.0, 100_000),
        ] {
            let budget = RetryBudget::new(ratio, Duration::from_secs(10), 0).unwrap();
            for _ in 0..100 {
                budget.deposit();
            }
            let granted = (0..200_000).take_while(|_| budget.withdraw()).count();
            assert_eq!(granted, expected, "ratio {ratio}");
        }
    }

    #[test]
    fn the_window_slides_on_a_clock_behind_the_budgets() {
        let paused = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap()
        };
        let budget = paused().block_on(async {
            tokio::time::advance(Duration::from_secs(3600)).await;
            RetryBudget::new(0.0, Duration::from_secs(1), 2).unwrap()
        });
        paused().block_on(async {
            assert_eq!((0..10).take_while(|_| budget.withdraw()).count(), 2);
            tokio::time::advance(Duration::from_secs(2)).await;
            assert_eq!(
                (0..10).take_while(|_| budget.withdraw()).count(),
                2,
                "the withdrawals left the window"
            );
        });
    }

    #[tokio::test(start_paused = true)]
    async fn the_reserve_is_min_per_sec_over_the_window() {
        let budget = RetryBudget::default();
        let granted = (0..1000).take_while(|_| budget.withdraw()).count();
        assert_eq!(granted, 100, "10 a second over 10 s, at once");
        let budget = RetryBudget::new(0.0, Duration::from_millis(2500), 4).unwrap();
        assert_eq!((0..1000).take_while(|_| budget.withdraw()).count(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn deposits_and_withdrawals_leave_the_window() {
        let budget = RetryBudget::new(0.5, Duration::from_secs(10), 0).unwrap();
        for _ in 0..100 {
            budget.deposit();
        }
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!((0..1000).take_while(|_| budget.withdraw()).count(), 50);
        // The deposits leave the window a second later, the withdrawals
        // (made nine seconds after them) nine seconds after that.
        tokio::time::advance(Duration::from_secs(1)).await;
        for _ in 0..10 {
            budget.deposit();
        }
        assert_eq!(
            (0..1000).take_while(|_| budget.withdraw()).count(),
            0,
            "the withdrawals still count"
        );
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!((0..1000).take_while(|_| budget.withdraw()).count(), 5);
        // Idle for longer than the window: all of it left.
        tokio::time::advance(Duration::from_secs(3600)).await;
        budget.deposit();
        budget.deposit();
        assert_eq!((0..1000).take_while(|_| budget.withdraw()).count(), 1);
    }
}
