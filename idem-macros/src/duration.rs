//! Duration literals (`"500ms"`, `"90s"`, `"1h30m"`, `"7d"`), checked at
//! compile time.

use crate::rules::MAX_DURATION_MILLIS;

/// Units from largest to smallest, with their length in milliseconds.
const UNITS: [(&str, u64); 5] = [
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1_000),
    ("ms", 1),
];

/// Parses a duration literal into milliseconds, or says what is wrong with it
/// in words fit for a compile error about the argument `arg`.
pub(crate) fn parse_millis(text: &str, arg: &str) -> Result<u64, String> {
    let example = "write e.g. \"500ms\", \"90s\", \"15m\", \"24h\", \"7d\" or \"1h30m\"";
    if text.trim().is_empty() {
        return Err(format!("`{arg}` is empty; {example}"));
    }
    if text.contains(['.', ',']) {
        return Err(format!(
            "`{arg} = \"{text}\"` has a fraction; write whole units, e.g. \"1h30m\" or \"1500ms\""
        ));
    }
    if text.trim() != text || text.contains(char::is_whitespace) {
        let tight: String = text.split_whitespace().collect();
        let fixed = word_units(&tight).unwrap_or(tight);
        return Err(format!(
            "`{arg} = \"{text}\"` has spaces; write it without them: `{arg} = \"{fixed}\"`"
        ));
    }
    if let Some(fixed) = word_units(text) {
        return Err(format!(
            "`{arg} = \"{text}\"` spells its units out; units are ms, s, m, h and d: \
             `{arg} = \"{fixed}\"`"
        ));
    }
    let mut rest = text;
    let mut total: u64 = 0;
    let mut last_unit: Option<usize> = None;
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits == 0 {
            return Err(format!(
                "`{arg} = \"{text}\"` is not a duration: expected a number at `{rest}`; {example}"
            ));
        }
        let (number, after) = rest.split_at(digits);
        let unit_len = after.len()
            - after
                .trim_start_matches(|c: char| c.is_ascii_alphabetic())
                .len();
        let (unit, after) = after.split_at(unit_len);
        let Some(position) = UNITS.iter().position(|(name, _)| *name == unit) else {
            let found = if unit.is_empty() {
                format!("`{number}` has no unit")
            } else {
                format!("unknown unit `{unit}`")
            };
            return Err(format!(
                "`{arg} = \"{text}\"`: {found}; units are ms, s, m, h and d; {example}"
            ));
        };
        if last_unit.is_some_and(|last| position <= last) {
            return Err(format!(
                "`{arg} = \"{text}\"`: units must go from largest to smallest, each once, \
                 as in \"1h30m\""
            ));
        }
        last_unit = Some(position);
        let too_long = || {
            format!(
                "`{arg} = \"{text}\"` is longer than the maximum of {}",
                display_millis(MAX_DURATION_MILLIS)
            )
        };
        let number: u64 = number.parse().map_err(|_| too_long())?;
        total = number
            .checked_mul(UNITS[position].1)
            .and_then(|part| total.checked_add(part))
            .filter(|total| *total <= MAX_DURATION_MILLIS)
            .ok_or_else(too_long)?;
        rest = after;
    }
    check(arg, &format!("\"{text}\""), u128::from(total))
}

/// Checks a duration of `millis` written `written` against the bounds every
/// duration has: positive, at most the maximum.
pub(crate) fn check(arg: &str, written: &str, millis: u128) -> Result<u64, String> {
    if millis == 0 {
        return Err(format!(
            "`{arg} = {written}` is zero; an idempotency {arg} must be positive"
        ));
    }
    match u64::try_from(millis) {
        Ok(millis) if millis <= MAX_DURATION_MILLIS => Ok(millis),
        _ => Err(format!(
            "`{arg} = {written}` is longer than the maximum of {}",
            display_millis(MAX_DURATION_MILLIS)
        )),
    }
}

/// `text` with spelled-out units (`1day`, `30secs`, `2weeks`) in the literal
/// syntax, if it has any and is otherwise well formed.
fn word_units(text: &str) -> Option<String> {
    const WORDS: &[(&[&str], &str, u64)] = &[
        (&["w", "wk", "wks", "week", "weeks"], "d", 7),
        (&["day", "days"], "d", 1),
        (&["hr", "hrs", "hour", "hours"], "h", 1),
        (&["min", "mins", "minute", "minutes"], "m", 1),
        (&["sec", "secs", "second", "seconds"], "s", 1),
        (
            &["msec", "msecs", "millis", "millisecond", "milliseconds"],
            "ms",
            1,
        ),
    ];
    let mut out = String::new();
    let mut rest = text;
    let mut changed = false;
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        let (number, after) = rest.split_at(digits);
        let number: u64 = number.parse().ok()?;
        let letters = after.len()
            - after
                .trim_start_matches(|c: char| c.is_ascii_alphabetic())
                .len();
        let (unit, after) = after.split_at(letters);
        match WORDS.iter().find(|(words, _, _)| words.contains(&unit)) {
            Some((_, short, times)) => {
                out.push_str(&format!("{}{short}", number.checked_mul(*times)?));
                changed = true;
            }
            None if UNITS.iter().any(|(name, _)| *name == unit) => {
                out.push_str(&format!("{number}{unit}"));
            }
            None => return None,
        }
        rest = after;
    }
    changed.then_some(out)
}

/// Renders milliseconds back in the literal syntax, for messages.
pub(crate) fn display_millis(mut millis: u64) -> String {
    let mut out = String::new();
    for (unit, len) in UNITS {
        if millis >= len {
            out.push_str(&format!("{}{unit}", millis / len));
            millis %= len;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{display_millis, parse_millis};

    #[test]
    fn accepts_the_documented_forms() {
        for (text, millis) in [
            ("500ms", 500),
            ("90s", 90_000),
            ("15m", 900_000),
            ("24h", 86_400_000),
            ("7d", 604_800_000),
            ("1h30m", 5_400_000),
            ("1d2h3m4s5ms", 93_784_005),
        ] {
            assert_eq!(parse_millis(text, "ttl"), Ok(millis), "{text}");
            assert_eq!(parse_millis(&display_millis(millis), "ttl"), Ok(millis));
        }
        assert_eq!(display_millis(90_000), "1m30s");
        assert_eq!(display_millis(86_400_000), "1d");
    }

    #[test]
    fn rejects_with_a_reason() {
        for (text, reason) in [
            ("", "empty"),
            ("  ", "empty"),
            ("10", "has no unit"),
            ("10 s", "has spaces; write it without them: `ttl = \"10s\"`"),
            ("24 h", "`ttl = \"24h\"`"),
            ("1 day", "`ttl = \"1d\"`"),
            (
                "30secs",
                "spells its units out; units are ms, s, m, h and d: `ttl = \"30s\"`",
            ),
            ("2weeks", "`ttl = \"14d\"`"),
            ("1h 30min", "`ttl = \"1h30m\"`"),
            ("5w", "`ttl = \"35d\"`"),
            ("5y", "unknown unit `y`"),
            ("1.5h", "has a fraction"),
            ("0s", "zero"),
            ("0h0m", "zero"),
            ("30m1h", "largest to smallest"),
            ("1h1h", "largest to smallest"),
            ("99999999999999999999d", "longer than the maximum of 3650d"),
            ("3651d", "longer than the maximum"),
            ("h", "expected a number"),
            ("-1s", "expected a number"),
        ] {
            let err = parse_millis(text, "ttl").unwrap_err();
            assert!(err.contains(reason), "{text:?}: {err}");
        }
    }
}
