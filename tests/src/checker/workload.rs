//! Workloads generated from a seed: callers × keys × arrival times, bodies
//! that take random time (some in journaled steps), return `Ok` or `Err`,
//! panic, stall past their lease or are cancelled, and settings drawn from
//! their valid ranges.

use std::time::Duration;

use idem_core::{OnConflict, Settings};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};

/// How a body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ends {
    /// Returns `Ok` with its run's value.
    Ok,
    /// Returns `Err` with its run's number (stored only where errors are
    /// cached).
    Err,
    /// Panics.
    Panics,
}

/// What one call's body does, should it run.
#[derive(Debug, Clone, Copy)]
pub struct Body {
    /// How long it runs.
    pub took: Duration,
    /// How it ends.
    pub ends: Ends,
    /// Pauses its holder for this long first: its renewals never reach the
    /// store, as a process frozen past its lease.
    pub stall: Option<Duration>,
    /// Pads its `Ok` value with this many bytes.
    pub padding: usize,
    /// Runs as this many journaled steps (its key's), each an effect the
    /// history counts; none when 0.
    pub steps: u8,
    /// Its steps declare undos, which run when a call of its key fails for
    /// good (a stored `Err`).
    pub compensate: bool,
    /// Its steps run together (`join!`), each taking a time of its own, so
    /// that they complete in another order than they were started in.
    pub concurrent: bool,
}

/// How a call reaches idem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// `Idempotency::run` (or `run_caching_errors`).
    Run,
    /// An `#[idempotent]` method.
    Attribute,
    /// A request through the HTTP layer (feature `http`).
    Http,
    /// The function-level HTTP path (feature `axum`): a request served by
    /// hyper in process to an axum handler that takes the key with the
    /// `IdempotencyKey` extractor and calls the `#[idempotent]` method, as
    /// [`Via::Attribute`] does. The client hangs up by dropping its
    /// connection (HTTP/1.1) or resetting its stream (h2).
    Handler {
        /// Over h2 rather than HTTP/1.1.
        h2: bool,
        /// The handler spawns the call, so that a hang-up does not cancel
        /// it, as the README advises.
        spawned: bool,
    },
}

impl Via {
    /// Whether a call that reaches idem this way runs on to its end after
    /// its caller hung up.
    #[must_use]
    pub fn runs_on_after_hang_up(self) -> bool {
        matches!(self, Self::Http | Self::Handler { spawned: true, .. })
    }

    /// Whether the call is a request over HTTP, whose caller hanging up
    /// the server learns of only through its connection.
    #[must_use]
    pub fn over_http(self) -> bool {
        matches!(self, Self::Http | Self::Handler { .. })
    }
}

/// One caller's call.
#[derive(Debug, Clone)]
pub struct CallPlan {
    /// The call's number in the workload.
    pub id: usize,
    /// Which key (an index into the workload's keys).
    pub key: usize,
    /// Which handle (process) it calls on.
    pub handle: usize,
    /// When it arrives, from the start.
    pub arrives: Duration,
    /// Its settings.
    pub settings: Settings,
    /// Its body.
    pub body: Body,
    /// Its caller drops it after this long.
    pub cancel_after: Option<Duration>,
    /// How it reaches idem.
    pub via: Via,
    /// Which arguments it passes: 0, as most calls of its key do, or
    /// another number for a call that reuses the key with other arguments
    /// (which must never be answered with a result of other arguments).
    pub arguments: u8,
}

/// One key's settings, shared by its callers.
#[derive(Debug, Clone, Copy)]
pub struct KeyPlan {
    /// The lease of its claims.
    pub lease: Duration,
    /// The TTL of its record.
    pub ttl: Duration,
    /// Whether `Err` results are stored.
    pub cache_errors: bool,
    /// How many journaled steps its bodies run (0: none).
    pub steps: u8,
    /// Whether its calls go through the HTTP layer (`IdempotencyLayer`),
    /// as requests whose `Idempotency-Key` names the key.
    pub http: bool,
    /// Whether its steps declare undos.
    pub compensate: bool,
    /// Whether its bodies run their steps together.
    pub concurrent: bool,
}

/// A workload: keys and the calls on them.
#[derive(Debug, Clone)]
pub struct Workload {
    /// The seed it was generated from.
    pub seed: u64,
    /// The keys.
    pub keys: Vec<KeyPlan>,
    /// The calls, by arrival.
    pub calls: Vec<CallPlan>,
    /// How many handles (processes) share the store.
    pub handles: usize,
}

impl Workload {
    /// The workload of `seed`, with leases from `lease` to twice as long.
    #[must_use]
    pub fn generate(seed: u64, lease: Duration) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        // Drawn apart, so that the other draws of a seed stay as they were
        // before bodies had steps.
        let mut step_rng = StdRng::seed_from_u64(seed ^ 0x5354_4550_5300_0000);
        let mut http_rng = StdRng::seed_from_u64(seed ^ 0x4854_5450_0000_0000);
        let mut handler_rng = StdRng::seed_from_u64(seed ^ 0x4859_5045_5200_0000);
        let mut read_rng = StdRng::seed_from_u64(seed ^ 0x5245_4144_0000_0000);
        let mut together_rng = StdRng::seed_from_u64(seed ^ 0x4A4F_494E_0000_0000);
        let mut arguments_rng = StdRng::seed_from_u64(seed ^ 0x4152_4753_0000_0000);
        // Drawn apart, so that the other draws of a seed stay as they were.
        let mut late_cancel_rng = StdRng::seed_from_u64(seed ^ 0x4c41_5445_0000_0000);
        let keys: Vec<KeyPlan> = (0..rng.random_range(1..=3))
            .map(|_| {
                let steps = if step_rng.random_bool(0.35) {
                    step_rng.random_range(1..=3)
                } else {
                    0
                };
                let lease = lease.mul_f64(rng.random_range(1.0..2.0));
                // Mostly outlasting the run; sometimes expiring within it.
                let ttl = if rng.random_bool(0.15) {
                    lease.mul_f64(rng.random_range(1.5..3.0))
                } else {
                    lease * 40
                };
                KeyPlan {
                    lease,
                    ttl,
                    cache_errors: rng.random_bool(0.3),
                    steps,
                    compensate: steps > 0 && step_rng.random_bool(0.5),
                    concurrent: steps > 1 && together_rng.random_bool(0.5),
                    http: cfg!(feature = "http") && http_rng.random_bool(0.25),
                }
            })
            .collect();
        let handles = rng.random_range(1..=2);
        // Now and then a burst of duplicates, for in-process coalescing.
        let callers = if rng.random_bool(0.1) {
            rng.random_range(20..=40)
        } else {
            rng.random_range(3..=12)
        };
        let mut calls: Vec<CallPlan> = (0..callers)
            .map(|id| {
                let key = rng.random_range(0..keys.len());
                let plan = keys[key];
                let on_conflict = if rng.random_bool(0.3) {
                    OnConflict::Reject
                } else {
                    OnConflict::Wait
                };
                // Half the calls with steps read their journal with the
                // claim, the others at their first step.
                let mut settings = Settings::builder()
                    .lease(plan.lease)
                    .ttl(plan.ttl)
                    .on_conflict(on_conflict)
                    .expect_steps(plan.steps > 0 && read_rng.random_bool(0.5));
                if on_conflict == OnConflict::Wait && rng.random_bool(0.5) {
                    settings =
                        settings.wait_timeout(plan.lease.mul_f64(rng.random_range(0.2..2.0)));
                }
                let settings = settings.build().expect("drawn from the valid ranges");
                let took = if rng.random_bool(0.15) {
                    plan.lease.mul_f64(rng.random_range(1.2..2.5))
                } else {
                    plan.lease.mul_f64(rng.random_range(0.0..0.6))
                };
                let ends = match rng.random_range(0..10) {
                    0 => Ends::Panics,
                    1 | 2 => Ends::Err,
                    _ => Ends::Ok,
                };
                let stall = rng
                    .random_bool(0.05)
                    .then(|| plan.lease.mul_f64(rng.random_range(1.3..2.0)));
                let padding = if rng.random_bool(0.1) { 4096 } else { 0 };
                let cancel_after = rng
                    .random_bool(0.1)
                    .then(|| (took + plan.lease / 2).mul_f64(rng.random_range(0.0..1.0)));
                // Now and then, just after the body would return: a caller
                // that gives up while the outcome is being recorded.
                let cancel_after = cancel_after.or_else(|| {
                    late_cancel_rng.random_bool(0.05).then(|| {
                        took + Duration::from_micros(late_cancel_rng.random_range(0..20_000))
                    })
                });
                let via = if !plan.cache_errors && rng.random_bool(0.3) {
                    Via::Attribute
                } else {
                    Via::Run
                };
                let via = if plan.http {
                    Via::Http
                } else if via == Via::Attribute
                    && cfg!(feature = "axum")
                    && handler_rng.random_bool(0.5)
                {
                    Via::Handler {
                        h2: handler_rng.random_bool(0.5),
                        spawned: handler_rng.random_bool(0.5),
                    }
                } else {
                    via
                };
                CallPlan {
                    id,
                    key,
                    handle: rng.random_range(0..handles),
                    arrives: lease.mul_f64(rng.random_range(0.0..3.0)),
                    settings,
                    body: Body {
                        took,
                        ends,
                        stall,
                        padding,
                        steps: plan.steps,
                        compensate: plan.compensate,
                        concurrent: plan.concurrent,
                    },
                    cancel_after,
                    via,
                    arguments: u8::from(arguments_rng.random_bool(0.12)),
                }
            })
            .collect();
        // Last, one call of each key after the others, in an order of their
        // own: replays of several keys' records one after another, which a
        // store that mixes up its keys answers wrongly.
        let mut late: Vec<usize> = (0..keys.len()).collect();
        for i in (1..late.len()).rev() {
            late.swap(i, arguments_rng.random_range(0..=i));
        }
        let last = calls
            .iter()
            .map(|call| call.arrives)
            .max()
            .unwrap_or_default();
        for (n, key) in late.into_iter().enumerate() {
            let plan = keys[key];
            let settings = Settings::builder()
                .lease(plan.lease)
                .ttl(plan.ttl)
                .build()
                .expect("drawn from the valid ranges");
            calls.push(CallPlan {
                id: 0,
                key,
                handle: arguments_rng.random_range(0..handles),
                arrives: last + lease.mul_f64(0.5 + 0.2 * n as f64),
                settings,
                body: Body {
                    took: plan.lease.mul_f64(arguments_rng.random_range(0.0..0.3)),
                    ends: Ends::Ok,
                    stall: None,
                    padding: 0,
                    steps: plan.steps,
                    compensate: plan.compensate,
                    concurrent: plan.concurrent,
                },
                cancel_after: None,
                via: if plan.http { Via::Http } else { Via::Run },
                arguments: u8::from(arguments_rng.random_bool(0.25)),
            });
        }
        calls.sort_by_key(|call| call.arrives);
        for (id, call) in calls.iter_mut().enumerate() {
            call.id = id;
        }
        Self {
            seed,
            keys,
            calls,
            handles,
        }
    }

    /// The longest lease of any key.
    #[must_use]
    pub fn longest_lease(&self) -> Duration {
        self.keys.iter().map(|k| k.lease).max().unwrap_or_default()
    }
}
