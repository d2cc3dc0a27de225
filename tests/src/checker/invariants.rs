//! idem's promises as invariants over a history: the first one broken is
//! reported.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use idem_core::OnConflict;

use super::history::{Answer, Event};
use super::workload::Workload;
use crate::faults::{Fault, Op};

/// The panic message of bodies told to panic.
pub(crate) const BODY_PANIC: &str = "body panic (injected by the checker)";

/// An invariant broken: which, and how.
#[derive(Debug, Clone)]
pub struct Broken {
    /// The invariant's name.
    pub invariant: &'static str,
    /// What happened.
    pub detail: String,
}

fn broken(invariant: &'static str, detail: String) -> Result<(), Broken> {
    Err(Broken { invariant, detail })
}

struct Run {
    call: usize,
    key: usize,
    start: Duration,
    end: Option<(Duration, &'static str)>,
}

/// Undos run last completed first: when step `a` of a key was journaled
/// before step `b`'s effect was done (so `b`'s journal entry follows
/// `a`'s, whether the steps ran one after the other or together), `b` is
/// undone before `a`, by the attempt that ran them or by a later one that
/// replayed them. Checked for the steps that were done, journaled and
/// undone once each; a step done again (after a stall, an expiry, a run
/// cut short) has its journal order decided by the runs 1b excuses.
fn undo_order(workload: &Workload, events: &[(Duration, Event)]) -> Result<(), Broken> {
    // Where in the history each step was done, journaled and undone.
    let mut seen: BTreeMap<(usize, u8), [Vec<usize>; 3]> = BTreeMap::new();
    for (at, (_, event)) in events.iter().enumerate() {
        let (key, step, which) = match event {
            Event::StepDone { key, step, .. } => (key, step, 0),
            Event::StepJournaled { key, step, .. } => (key, step, 1),
            Event::StepUndone { key, step, .. } => (key, step, 2),
            _ => continue,
        };
        seen.entry((*key, *step)).or_default()[which].push(at);
    }
    let once = |key: usize, step: u8| match seen.get(&(key, step)) {
        Some([done, journaled, undone])
            if done.len() == 1 && journaled.len() == 1 && undone.len() == 1 =>
        {
            Some((done[0], journaled[0], undone[0]))
        }
        _ => None,
    };
    for (key, plan) in workload.keys.iter().enumerate() {
        for a in 0..plan.steps {
            for b in 0..plan.steps {
                let (Some(first), Some(then)) = (once(key, a), once(key, b)) else {
                    continue;
                };
                if a != b && first.1 < then.0 && first.2 < then.2 {
                    return broken(
                        "undos run last completed first",
                        format!(
                            "key {key}: step {a} was journaled before step {b} was done, \
                             but undone before it"
                        ),
                    );
                }
            }
        }
    }
    Ok(())
}

/// Checks `events` of a run of `workload` against every invariant. `slack`
/// is what a wait may overrun its `wait_timeout` by (store round trips,
/// injected delays, a loaded machine); `outcomes` says whether idem's told
/// outcomes were captured; `strict` (on tokio's paused clock, where no
/// renewal is ever late) asks that a result idem says it lost be explained
/// by repeated store faults, while on a real clock a loaded machine may
/// delay a renewal past its lease too.
pub(crate) fn check(
    workload: &Workload,
    events: &[(Duration, Event)],
    slack: Duration,
    outcomes: bool,
    strict: bool,
) -> Result<(), Broken> {
    let mut runs: HashMap<u64, Run> = HashMap::new();
    let mut answers: HashMap<usize, (Duration, Answer, Duration)> = HashMap::new();
    let mut told: HashMap<usize, Vec<String>> = HashMap::new();
    let mut stalls: Vec<(Duration, usize)> = Vec::new();
    let mut lost: Vec<usize> = Vec::new();
    let mut begins: Vec<(usize, usize)> = Vec::new();
    let mut faults: Vec<(Duration, usize, Op, Fault)> = Vec::new();
    let mut step_effects: BTreeMap<(usize, u8), Vec<(Duration, u64)>> = BTreeMap::new();
    let mut step_undos: BTreeMap<(usize, u8), Vec<(Duration, u64)>> = BTreeMap::new();
    let mut replayed_steps: Vec<(usize, u8, u64, u64)> = Vec::new();
    let mut journals: Vec<(usize, &Vec<String>, bool)> = Vec::new();
    let mut unjournaled_steps: Vec<(usize, u8, u64)> = Vec::new();
    for (at, event) in events {
        match event {
            Event::BodyStarted { call, key, run } => {
                runs.insert(
                    *run,
                    Run {
                        call: *call,
                        key: *key,
                        start: *at,
                        end: None,
                    },
                );
            }
            Event::BodyEnded { run, how } => {
                if let Some(r) = runs.get_mut(run) {
                    r.end = Some((*at, how));
                }
            }
            Event::Answered { call, answer, took } => {
                answers.insert(*call, (*at, answer.clone(), *took));
            }
            Event::Outcome { call, outcome } => {
                told.entry(*call).or_default().push(outcome.clone())
            }
            Event::Stalled { key, .. } => stalls.push((*at, *key)),
            Event::StepDone { key, step, run } => {
                step_effects
                    .entry((*key, *step))
                    .or_default()
                    .push((*at, *run));
            }
            Event::StepUndone { key, step, by } => {
                step_undos
                    .entry((*key, *step))
                    .or_default()
                    .push((*at, *by));
            }
            Event::RecordLost { key } => lost.push(*key),
            Event::Begins { key, begins: n } => begins.push((*key, *n)),
            Event::Fault {
                key: Some(key),
                struck,
            } => faults.push((*at, *key, struck.op, struck.fault)),
            Event::StepReplayed {
                key,
                step,
                run,
                from,
            } => replayed_steps.push((*key, *step, *run, *from)),
            Event::JournalAtEnd {
                key,
                entries,
                completed,
            } => journals.push((*key, entries, *completed)),
            Event::StepUnjournaled { key, step, run } => {
                unjournaled_steps.push((*key, *step, *run))
            }
            Event::Fault { key: None, .. } | Event::Called { .. } | Event::StepJournaled { .. } => {
            }
        }
    }
    let own_run = |call: usize| runs.iter().find(|(_, r)| r.call == call).map(|(n, _)| *n);
    // A call cut short by its caller: its future dropped mid-run. A call
    // whose caller hung up on the HTTP layer, or on a handler that spawned
    // it, was not: it ran on to its end, and excuses nothing.
    let dropped = |call: usize| {
        matches!(answers.get(&call), Some((_, Answer::Cancelled, _)))
            && !workload.calls[call].via.runs_on_after_hang_up()
    };
    // A run that only finished the compensation of a call that failed for
    // good: its body ran (replaying its steps), and its caller got the
    // stored failure of the run that failed, not its own result.
    let finisher = |run: &Run| {
        workload.keys[run.key].compensate
            && matches!(
                answers.get(&run.call),
                Some((_, Answer::BodyErr { run: failed }, _))
                    if runs.get(failed).is_some_and(|f| f.call != run.call)
            )
    };
    let committed = |run: &Run| match run.end {
        _ if finisher(run) => false,
        Some((_, "ok")) => true,
        Some((_, "err")) => workload.keys[run.key].cache_errors,
        _ => false,
    };

    // 1. Per key, at most one body's effect is done, except in a window
    // the README's "Not promised" list names, shown by the history: every
    // two done runs of a key must be told apart by one.
    let mut excused_keys = vec![false; workload.keys.len()];
    for (key, plan) in workload.keys.iter().enumerate() {
        let mut done: Vec<(u64, &Run)> = runs
            .iter()
            .filter(|(_, r)| r.key == key && committed(r))
            .map(|(n, r)| (*n, r))
            .collect();
        done.sort_by_key(|(_, r)| r.start);
        for (i, (later_run, later)) in done.iter().enumerate() {
            for (earlier_run, earlier) in &done[..i] {
                let stalled = stalls.iter().any(|(at, k)| *k == key && *at <= later.start);
                let earlier_end = earlier.end.map_or(Duration::MAX, |(at, _)| at);
                let expired = later.start >= earlier_end.saturating_add(plan.ttl.mul_f64(0.9));
                let outcome = told.get(&earlier.call).and_then(|o| o.first());
                // Cut short mid-body. A call dropped once its body had
                // returned `Ok` (its effect done, its outcome being
                // recorded) was not: idem records that outcome in the
                // background, and excuses nothing by it (unless it was
                // finishing an earlier attempt's undos first).
                let returned = earlier.end.is_some_and(|(_, end)| end == "ok") && !plan.compensate;
                let cancelled = dropped(earlier.call) && !returned;
                let said_lost = outcome.is_some_and(|o| o == "not_stored") || lost.contains(&key);
                // A store lost for the rest of a lease: its recording (or
                // renewal, or the journal entry that says the call failed
                // for good) failed, and failed again when retried.
                let faulted = faults
                    .iter()
                    .filter(|(at, k, op, _)| {
                        *k == key
                            && matches!(op, Op::Renew | Op::Complete | Op::AppendStep)
                            && *at >= earlier.start
                            && *at <= later.start
                    })
                    .count()
                    >= 2;
                let explained = faulted || !strict;
                if stalled || expired || cancelled || ((said_lost || !outcomes) && explained) {
                    excused_keys[key] = true;
                    continue;
                }
                return broken(
                    "at most one run per key",
                    format!(
                        "key {key}: body runs {earlier_run} (call {}) and {later_run} (call {}) were both done, \
                         with no stall, expiry, cancellation or lost record between them",
                        earlier.call, later.call
                    ),
                );
            }
        }
    }

    // 1b. Per key and step, at most one effect: a step journaled by one
    // run is replayed, not run, by the next, except across a stall, an
    // expiry of the journal, or a run cut short between the step's effect
    // and its journal entry (cancelled, or its claim or journal write lost:
    // "at most once per journal entry, not per effect").
    for ((key, step), done) in &step_effects {
        let plan = &workload.keys[*key];
        for pair in done.windows(2) {
            let ((earlier_at, earlier_run), (later_at, later_run)) = (pair[0], pair[1]);
            let stalled = stalls.iter().any(|(at, k)| k == key && *at <= later_at);
            let expired = later_at >= earlier_at.saturating_add(plan.ttl.mul_f64(0.9));
            let earlier = &runs[&earlier_run];
            // A step whose journal write failed (or went unanswered) was
            // cut short between its effect and its entry too.
            let unjournaled = faults.iter().any(|(at, k, op, _)| {
                k == key && *op == Op::AppendStep && *at >= earlier_at && *at <= later_at
            }) || unjournaled_steps.contains(&(*key, *step, earlier_run));
            let cut_short = matches!(earlier.end, Some((_, "lost")) | None)
                || dropped(earlier.call)
                || unjournaled;
            let overlapping =
                runs[&later_run].start < earlier.end.map_or(Duration::MAX, |(at, _)| at);
            let lapsed = !strict && (lost.contains(key) || overlapping);
            if stalled || expired || cut_short || lapsed {
                continue;
            }
            return broken(
                "at most one effect per step",
                format!(
                    "key {key}: step {step} was done by body runs {earlier_run} (call {}) and {later_run} (call {}), \
                     with no stall, expiry or cut-short run between them",
                    earlier.call, runs[&later_run].call
                ),
            );
        }
    }

    // 1c. Per key and step, the undo runs at most once, and only after the
    // step's effect, with the same excuses as the effect itself (an undo
    // whose journal write failed runs again).
    for ((key, step), done) in &step_undos {
        let first = done[0].0;
        let effect = step_effects
            .get(&(*key, *step))
            .and_then(|effects| effects.first())
            .map(|(at, _)| *at);
        if effect.is_none_or(|at| at > first) {
            return broken(
                "an undo follows its step",
                format!("key {key}: step {step} was undone at {first:?} before it was done"),
            );
        }
        let plan = &workload.keys[*key];
        for pair in done.windows(2) {
            let ((earlier_at, earlier_run), (later_at, later_run)) = (pair[0], pair[1]);
            let stalled = stalls.iter().any(|(at, k)| k == key && *at <= later_at);
            let expired = later_at >= earlier_at.saturating_add(plan.ttl.mul_f64(0.9));
            let earlier = &runs[&earlier_run];
            let cut_short = dropped(earlier.call);
            let lapsed = !strict && lost.contains(key);
            // The undo's journal entry not written, or its answer lost:
            // "at most once per journal entry", as for a step.
            let unjournaled = faults.iter().any(|(at, k, op, _)| {
                k == key && *op == Op::AppendStep && *at >= earlier_at && *at <= later_at
            });
            if stalled || expired || cut_short || lapsed || unjournaled {
                continue;
            }
            return broken(
                "at most one undo per step",
                format!(
                    "key {key}: step {step} was undone by runs {earlier_run} (call {}) and {later_run} (call {})",
                    earlier.call, runs[&later_run].call
                ),
            );
        }
    }

    // 1d. Undos run last completed first.
    undo_order(workload, events)?;

    // 1f. A failure for good is recorded only once every step journaled
    // with an undo was undone: a completed record beside a journal that
    // says the call failed for good has an undo entry for each step.
    for (key, entries, completed) in &journals {
        if !completed || !workload.keys[*key].compensate || !entries.iter().any(|e| e == "final") {
            continue;
        }
        let missing = entries.iter().find(|entry| {
            !entry.starts_with("undo:")
                && *entry != "final"
                && !entries
                    .iter()
                    .any(|undo| undo.strip_prefix("undo:") == Some(entry.as_str()))
        });
        if let Some(step) = missing {
            return broken(
                "a failure for good is recorded once its steps are undone",
                format!(
                    "key {key}: its record is stored, and its journal ({entries:?}) holds step {step} with an undo that never ran"
                ),
            );
        }
    }

    // 1e. A step's journaled value is replayed only to calls of the
    // arguments of the call that did it: a call of other arguments is the
    // key reused, and resumes nothing.
    for (key, step, run, from) in replayed_steps {
        let arguments = |run: u64| runs.get(&run).map(|r| workload.calls[r.call].arguments);
        if arguments(run) != arguments(from) {
            return broken(
                "steps replay to their own arguments",
                format!(
                    "key {key}: run {run} (arguments {:?}) replayed step {step} as run {from} \
                     (arguments {:?}) did it",
                    arguments(run),
                    arguments(from)
                ),
            );
        }
    }

    // 2. Every Ok answer is the caller's own result or the first stored one.
    if let Some((_, answer, _)) = answers.get(&usize::MAX) {
        return broken("every call ends", format!("{answer:?}"));
    }
    // Calls in order, so that a seed reports the same violation each time.
    let mut answered: Vec<(&usize, &(Duration, Answer, Duration))> = answers.iter().collect();
    answered.sort_by_key(|(call, _)| **call);
    for &(call, (_, answer, _)) in &answered {
        let plan = &workload.calls[*call];
        let (run, is_err) = match answer {
            Answer::Ok { run } => (*run, false),
            Answer::BodyErr { run } => (*run, true),
            _ => continue,
        };
        if let Some(own) = own_run(*call) {
            if own != run && !(is_err && finisher(&runs[&own])) {
                return broken(
                    "answers are the first stored result",
                    format!(
                        "call {call} ran body run {own} but was answered with run {run}'s result"
                    ),
                );
            }
            continue;
        }
        let Some(source) = runs.get(&run) else {
            return broken(
                "answers are the first stored result",
                format!("call {call} was answered with run {run}, which never ran"),
            );
        };
        // A failure for good whose journal entry landed unheard (its
        // call was told it was not stored) becomes the record of the
        // attempt that finishes its compensation.
        let finished = is_err
            && runs.values().any(|r| {
                finisher(r)
                    && matches!(
                        answers.get(&r.call),
                        Some((_, Answer::BodyErr { run: failed }, _)) if *failed == run
                    )
            });
        let unstored = outcomes
            && !finished
            && told
                .get(&source.call)
                .and_then(|o| o.first())
                .is_some_and(|o| o == "not_stored");
        let what = if is_err { "error" } else { "value" };
        if source.key != plan.key {
            return broken(
                "answers are the first stored result",
                format!(
                    "call {call} (key {}) was replayed run {run}'s {what}, a result of key {}, \
                     not of this key",
                    plan.key, source.key
                ),
            );
        }
        let source_arguments = workload.calls[source.call].arguments;
        if source_arguments != plan.arguments {
            return broken(
                "answers are the first stored result",
                format!(
                    "call {call} (key {}, arguments {}) was replayed run {run}'s {what}, a result \
                     of other arguments ({source_arguments}) under the same key, where idem \
                     answers `KeyReused`",
                    plan.key, plan.arguments
                ),
            );
        }
        if !committed(source) || unstored {
            return broken(
                "answers are the first stored result",
                format!(
                    "call {call} (key {}) was replayed run {run}'s {what} (ended {:?}), which was \
                     never stored",
                    plan.key,
                    source.end.map(|(_, how)| how)
                ),
            );
        }
        if !excused_keys[plan.key] {
            let first = runs
                .iter()
                .filter(|(_, r)| r.key == plan.key && committed(r))
                .min_by_key(|(_, r)| r.end.map(|(at, _)| at))
                .map(|(n, _)| *n);
            if first != Some(run) {
                return broken(
                    "answers are the first stored result",
                    format!(
                        "call {call} was replayed run {run}'s result, not the first stored ({first:?})"
                    ),
                );
            }
        }
    }

    // 3. Waits end within their timeout (plus the slack).
    for &(call, (_, answer, took)) in &answered {
        let plan = &workload.calls[*call];
        if own_run(*call).is_some() || matches!(answer, Answer::Cancelled | Answer::Panicked(_)) {
            continue;
        }
        let bound = match plan.settings.on_conflict() {
            OnConflict::Reject => slack,
            _ => plan.settings.wait_timeout() + slack,
        };
        if *took > bound {
            return broken(
                "waits end within wait_timeout",
                format!(
                    "call {call} ({:?}) took {took:?}, over {bound:?}",
                    plan.settings.on_conflict()
                ),
            );
        }
    }

    // 3b. Waiters never poll faster than the floor (10 ms), whatever the
    // holder's remaining lease reads: the claims of a key number at most one
    // per 10 ms of each of its calls, plus a few.
    for (key, sent) in begins {
        let allowed: u128 = answers
            .iter()
            .filter(|(call, _)| workload.calls.get(**call).is_some_and(|c| c.key == key))
            .map(|(_, (_, _, took))| took.as_millis() / 10 + 4)
            .sum();
        if sent as u128 > allowed {
            return broken(
                "waiters never poll faster than a floor",
                format!("{sent} claims of key {key} were sent, over {allowed}"),
            );
        }
    }

    // 4. No panic but the body's own escapes; every call ends with exactly
    // one outcome, and the one its answer implies.
    for (call, plan) in workload.calls.iter().enumerate() {
        let Some((_, answer, _)) = answers.get(&call) else {
            return broken("every call ends", format!("call {call} never answered"));
        };
        let own = own_run(call);
        let own_end = own.and_then(|n| runs[&n].end.map(|(_, how)| how));
        if let Answer::Panicked(message) = answer
            && (!message.contains(BODY_PANIC) || own_end != Some("panic"))
        {
            return broken(
                "no panic escapes idem but the body's own",
                format!("call {call} panicked: {message}"),
            );
        }
        // A server breaks a request's connection (or resets its stream)
        // only when the handler panicked: its body's own panic, unwinding.
        if let Answer::Idem(kind) = answer
            && kind == "reset"
            && own_end != Some("panic")
        {
            return broken(
                "no panic escapes idem but the body's own",
                format!(
                    "call {call} over {:?} had its request reset, but its body ended {own_end:?}",
                    plan.via
                ),
            );
        }
        // `KeyReused` is the answer to a key reused with other arguments,
        // and only where some call of the key passes other arguments.
        let reused = workload
            .calls
            .iter()
            .any(|other| other.key == plan.key && other.arguments != plan.arguments);
        if let Answer::Idem(kind) = answer
            && (matches!(kind.as_str(), "config" | "decode" | "other")
                || (kind == "key_reused" && !reused))
        {
            return broken(
                "equal arguments are the same call",
                format!(
                    "call {call} with the same arguments as every call of its key (key {}) and \
                     valid settings got idem's `{kind}`",
                    plan.key
                ),
            );
        }
        if !outcomes {
            continue;
        }
        let told = told.get(&call).cloned().unwrap_or_default();
        // The HTTP layer (and a handler that spawns its call) runs each
        // call on a task of its own, so that a client hanging up does not
        // cancel it: the call goes on, and tells the outcome it comes to,
        // once, maybe after the history closed. A server learns of the
        // hang-up only from its connection, so a handler that awaits its
        // call may run on too.
        if *answer == Answer::Cancelled && plan.via.over_http() {
            // One whose body ran was cancelled by the server or ran on: it
            // told what it came to, once.
            let dropped_mid_run = own.is_some() && !plan.via.runs_on_after_hang_up();
            if told.len() > 1 || (dropped_mid_run && told.len() != 1) {
                return broken(
                    "every call has exactly one outcome",
                    format!("call {call} ({answer:?}) was told {told:?}"),
                );
            }
            continue;
        }
        let [outcome] = told.as_slice() else {
            return broken(
                "every call has exactly one outcome",
                format!("call {call} ({answer:?}) was told {told:?}"),
            );
        };
        let expected: &[&str] = match answer {
            Answer::Cancelled => &["cancelled"],
            Answer::Panicked(_) => &["failed"],
            Answer::Ok { .. } if own.is_some() => &["ran", "not_stored"],
            Answer::BodyErr { .. } if own.is_some() => {
                if workload.keys[plan.key].cache_errors {
                    &["ran", "not_stored"]
                } else {
                    &["failed"]
                }
            }
            Answer::Ok { .. } | Answer::BodyErr { .. } => &["replayed", "waited"],
            // A step's claim found taken over, returned by the body: the
            // call's result is another holder's to store.
            Answer::Idem(kind) if own.is_some() && kind == "step_lost" => &["not_stored"],
            // A step that found the key's journal another call's: the
            // key reused with other arguments.
            Answer::Idem(kind) if own.is_some() && kind == "key_reused" => &["key_reused"],
            // Steps run together: one may find the claim taken over while
            // another fails otherwise (its journal not written), and the
            // body returns the first error of the two, while idem tells
            // what the lost claim means for the call.
            Answer::Idem(_)
                if own.is_some()
                    && own_end == Some("lost")
                    && workload.keys[plan.key].concurrent =>
            {
                &["failed", "not_stored"]
            }
            // A step's other failures (its journal not written), returned
            // by the body.
            Answer::Idem(_) if own.is_some() => &["failed"],
            Answer::Idem(kind) => match kind.as_str() {
                "in_progress" => &["in_progress"],
                "store" => &["store_error"],
                "not_replayable" | "decode" => &["decode_error"],
                "attempt_failed" => &["attempt_failed"],
                "key_reused" => &["key_reused"],
                _ => &["config_error"],
            },
        };
        if !expected.contains(&outcome.as_str()) {
            return broken(
                "every call has exactly one outcome",
                format!(
                    "call {call} answered {answer:?} was told `{outcome}`, not one of {expected:?}"
                ),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use idem_core::Settings;

    use super::super::history::{Answer, Event};
    use super::super::workload::{Body, CallPlan, Ends, KeyPlan, Via, Workload};
    use super::check;

    const LEASE: Duration = Duration::from_secs(3);

    /// One call on one key whose bodies run `steps` steps (together, when
    /// `concurrent`), reaching idem through `via`.
    fn one_call(steps: u8, concurrent: bool, via: Via) -> Workload {
        Workload {
            seed: 0,
            keys: vec![KeyPlan {
                lease: LEASE,
                ttl: LEASE * 40,
                cache_errors: false,
                steps,
                http: false,
                compensate: false,
                concurrent,
            }],
            calls: vec![CallPlan {
                id: 0,
                key: 0,
                handle: 0,
                arrives: Duration::ZERO,
                settings: Settings::default(),
                body: Body {
                    took: Duration::ZERO,
                    ends: Ends::Ok,
                    stall: None,
                    padding: 0,
                    steps,
                    compensate: false,
                    concurrent,
                },
                cancel_after: None,
                via,
                arguments: 0,
            }],
            handles: 1,
        }
    }

    /// The history of that call: its body ran as run 1 and ended `how`, and
    /// the call was answered `answer`.
    fn ran_and_answered(how: &'static str, answer: Answer) -> Vec<(Duration, Event)> {
        vec![
            (Duration::ZERO, Event::Called { call: 0, key: 0 }),
            (
                Duration::ZERO,
                Event::BodyStarted {
                    call: 0,
                    key: 0,
                    run: 1,
                },
            ),
            (Duration::ZERO, Event::BodyEnded { run: 1, how }),
            (
                Duration::ZERO,
                Event::Answered {
                    call: 0,
                    answer,
                    took: Duration::ZERO,
                },
            ),
        ]
    }

    /// One call to a handler over h2 whose body ended as `how`, answered
    /// `reset`.
    fn reset_after(how: &'static str) -> Result<(), super::Broken> {
        let workload = one_call(
            0,
            false,
            Via::Handler {
                h2: true,
                spawned: false,
            },
        );
        let events = ran_and_answered(how, Answer::Idem("reset".to_owned()));
        check(&workload, &events, LEASE, false, true)
    }

    #[test]
    fn a_request_reset_by_a_panicking_body_is_its_answer() {
        assert!(reset_after("panic").is_ok());
    }

    #[test]
    fn a_request_reset_without_a_panic_is_caught() {
        let broken = reset_after("ok").expect_err("a reset after an Ok body");
        assert_eq!(broken.invariant, "no panic escapes idem but the body's own");
    }

    /// One call through `run` on a key whose two steps run together or
    /// not, whose body ended `lost` and was answered a store error, and
    /// which idem told `told`.
    fn lost_at_a_step(concurrent: bool, told: &str) -> Result<(), super::Broken> {
        let workload = one_call(2, concurrent, Via::Run);
        let mut events = ran_and_answered("lost", Answer::Idem("store".to_owned()));
        events.push((
            Duration::ZERO,
            Event::Outcome {
                call: 0,
                outcome: told.to_owned(),
            },
        ));
        check(&workload, &events, LEASE, true, true)
    }

    /// Steps run together: one found the claim taken over, the other
    /// failed to journal; the body answers the latter's store error, and
    /// idem tells `not_stored` for the lost claim, or `failed`.
    #[test]
    fn steps_run_together_may_answer_one_error_and_tell_the_others() {
        assert!(lost_at_a_step(true, "not_stored").is_ok());
        assert!(lost_at_a_step(true, "failed").is_ok());
        let broken = lost_at_a_step(false, "not_stored").expect_err("one step at a time");
        assert_eq!(broken.invariant, "every call has exactly one outcome");
    }
}
