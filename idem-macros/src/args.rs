//! Parsing `#[idempotent(...)]`'s arguments, each kept with its span.
//!
//! Every argument lives in one table, [`ARGUMENTS`]: its name, how it is
//! written, its parser and the names users reach for when they mean it.

use proc_macro2::Span;
use syn::ext::IdentExt as _;
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::{Expr, Ident, Lit, LitBool, LitStr, Path, Token};

use crate::duration;
use crate::rules::{DEFAULT_LEASE_MILLIS, MAX_DURATION_MILLIS, MIN_LEASE_MILLIS};

/// The attribute's arguments as written.
#[derive(Default)]
pub(crate) struct Args {
    pub(crate) key: Option<Arg<Expr>>,
    pub(crate) scope: Option<Arg<Expr>>,
    pub(crate) ttl: Option<Arg<Duration>>,
    pub(crate) lease: Option<Arg<Duration>>,
    pub(crate) on_conflict: Option<Arg<OnConflict>>,
    pub(crate) wait_timeout: Option<Arg<Duration>>,
    pub(crate) cache_errors: Option<Arg<CacheErrors>>,
    pub(crate) skip: Option<Arg<Vec<Ident>>>,
    pub(crate) fingerprint: Option<Arg<bool>>,
    pub(crate) name: Option<Arg<LitStr>>,
    pub(crate) store: Option<Arg<Expr>>,
    pub(crate) transaction: Option<Arg<Ident>>,
    pub(crate) isolation: Option<Arg<Isolation>>,
    pub(crate) krate: Option<Arg<Path>>,
}

/// An argument's value and the span of its name.
pub(crate) struct Arg<T> {
    pub(crate) span: Span,
    pub(crate) value: T,
}

/// A `ttl`, `lease` or `wait_timeout`.
pub(crate) enum Duration {
    /// A string literal, already checked, in milliseconds.
    Literal { millis: u64, span: Span },
    /// A `Duration` constant the macro can read (`Duration::from_secs(90)`),
    /// in milliseconds, checked with the other arguments.
    Const { millis: u128, expr: Expr },
    /// An expression that must be a `std::time::Duration`.
    Expr(Expr),
}

impl Duration {
    /// The milliseconds, if the macro knows them (a literal or a constant
    /// within the bounds every duration has).
    pub(crate) fn literal(&self) -> Option<u64> {
        match self {
            Self::Literal { millis, .. } => Some(*millis),
            Self::Const { millis, .. } => u64::try_from(*millis).ok(),
            Self::Expr(_) => None,
        }
    }

    /// The user's expression, if the duration is one.
    pub(crate) fn expr(&self) -> Option<&Expr> {
        match self {
            Self::Const { expr, .. } | Self::Expr(expr) => Some(expr),
            Self::Literal { .. } => None,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnConflict {
    Wait,
    Reject,
}

/// The isolation level of `isolation = …`: the runtime's variant name.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isolation {
    ReadCommitted,
    RepeatableRead,
    Serializable,
}

impl Isolation {
    pub(crate) fn variant(self) -> &'static str {
        match self {
            Self::ReadCommitted => "ReadCommitted",
            Self::RepeatableRead => "RepeatableRead",
            Self::Serializable => "Serializable",
        }
    }
}

pub(crate) enum CacheErrors {
    All,
    None,
    Predicate(Path),
}

/// How an argument is written.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Form {
    /// `name = value`
    Value,
    /// `name(a, b)`
    List,
}

/// One argument of the attribute.
pub(crate) struct Spec {
    pub(crate) name: &'static str,
    pub(crate) form: Form,
    parse: fn(&mut Args, &Ident, ParseStream<'_>) -> syn::Result<()>,
    /// Names users write when they mean this argument.
    hints: &'static [&'static str],
}

/// Every argument the attribute takes, in the order the docs list them.
pub(crate) const ARGUMENTS: &[Spec] = &[
    Spec {
        name: "key",
        form: Form::Value,
        parse: |args, name, input| set(&mut args.key, name, input.parse()?),
        hints: &["idempotency_key", "id"],
    },
    Spec {
        name: "scope",
        form: Form::Value,
        parse: |args, name, input| set(&mut args.scope, name, input.parse()?),
        hints: &["tenant", "namespace", "partition"],
    },
    Spec {
        name: "ttl",
        form: Form::Value,
        parse: |args, name, input| set(&mut args.ttl, name, parse_duration(name, input)?),
        hints: &[
            "ttl_secs",
            "ttl_seconds",
            "ttl_ms",
            "expire",
            "expires",
            "expiry",
            "expiration",
            "expires_in",
            "retention",
            "keep",
        ],
    },
    Spec {
        name: "lease",
        form: Form::Value,
        parse: |args, name, input| set(&mut args.lease, name, parse_duration(name, input)?),
        hints: &["lock", "lock_ttl", "lease_ttl", "lock_timeout"],
    },
    Spec {
        name: "on_conflict",
        form: Form::Value,
        parse: |args, name, input| set(&mut args.on_conflict, name, parse_on_conflict(input)?),
        hints: &["conflict", "on_busy", "mode"],
    },
    Spec {
        name: "wait_timeout",
        form: Form::Value,
        parse: |args, name, input| set(&mut args.wait_timeout, name, parse_duration(name, input)?),
        hints: &["timeout", "wait", "max_wait"],
    },
    Spec {
        name: "cache_errors",
        form: Form::Value,
        parse: |args, name, input| set(&mut args.cache_errors, name, parse_cache_errors(input)?),
        hints: &["cache_error", "cache_err", "errors"],
    },
    Spec {
        name: "skip",
        form: Form::List,
        parse: |args, name, input| {
            let content;
            syn::parenthesized!(content in input);
            let items = Punctuated::<Expr, Token![,]>::parse_terminated(&content)?;
            let mut names = Vec::new();
            for item in items {
                match &item {
                    Expr::Path(path) if path.path.get_ident().is_some() => {
                        names.push(path.path.get_ident().cloned().expect("checked"));
                    }
                    Expr::Path(path) if path.path.is_ident("self") => {
                        names.push(Ident::new("self", path.path.segments[0].ident.span()));
                    }
                    Expr::Field(field) => return Err(skip_field(field)),
                    other => {
                        return Err(syn::Error::new_spanned(
                            other,
                            "`skip(…)` takes the names of arguments, e.g. `skip(pool, client)`",
                        ));
                    }
                }
            }
            if let Some(earlier) = &args.skip {
                let merged: Vec<String> = earlier
                    .value
                    .iter()
                    .chain(&names)
                    .map(ToString::to_string)
                    .collect();
                return Err(syn::Error::new(
                    name.span(),
                    format!(
                        "`skip` is given twice; give one list: `skip({})`",
                        merged.join(", ")
                    ),
                ));
            }
            set(&mut args.skip, name, names)
        },
        hints: &["ignore", "exclude", "skip_args"],
    },
    Spec {
        name: "fingerprint",
        form: Form::Value,
        parse: |args, name, input| {
            let value = parse_bool(input, "`fingerprint` is `true` (the default) or `false`")?;
            set(&mut args.fingerprint, name, value)
        },
        hints: &["check_fingerprint", "check_args"],
    },
    Spec {
        name: "name",
        form: Form::Value,
        parse: |args, name, input| {
            let lit = parse_string(
                input,
                "`name` takes a string literal, e.g. `name = \"payments.charge\"`",
            )?;
            if lit.value().trim().is_empty() {
                return Err(syn::Error::new(lit.span(), "`name` must not be empty"));
            }
            set(&mut args.name, name, lit)
        },
        hints: &["operation", "op", "label"],
    },
    Spec {
        name: "store",
        form: Form::Value,
        parse: |args, name, input| set(&mut args.store, name, input.parse()?),
        hints: &["backend", "cache", "handle"],
    },
    Spec {
        name: "transaction",
        form: Form::Value,
        parse: |args, name, input| {
            let hint = "`transaction` names the parameter that gets the transaction, e.g. \
                        `transaction = tx` with a parameter `tx: &mut sqlx::PgConnection`";
            let value: Ident = input.parse().map_err(|e| syn::Error::new(e.span(), hint))?;
            set(&mut args.transaction, name, value)
        },
        hints: &["tx", "txn", "transactional", "in_transaction"],
    },
    Spec {
        name: "isolation",
        form: Form::Value,
        parse: |args, name, input| set(&mut args.isolation, name, parse_isolation(input)?),
        hints: &["isolation_level", "level", "serializable"],
    },
    Spec {
        name: "crate",
        form: Form::Value,
        parse: |args, name, input| {
            let hint = "`crate` takes the path of the idem runtime as a string, \
                        e.g. `crate = \"my_crate::idem\"`";
            let lit = parse_string(input, hint)?;
            let path = lit
                .parse_with(Path::parse_mod_style)
                .map_err(|_| syn::Error::new(lit.span(), hint))?;
            set(&mut args.krate, name, path)
        },
        hints: &["krate"],
    },
];

/// The names of every argument, for messages.
pub(crate) fn names() -> String {
    ARGUMENTS
        .iter()
        .map(|spec| spec.name)
        .collect::<Vec<_>>()
        .join(", ")
}

impl Parse for Args {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let mut args = Self::default();
        while !input.is_empty() {
            if input.peek(LitStr) {
                let lit: LitStr = input.parse()?;
                return Err(syn::Error::new(
                    lit.span(),
                    format!(
                        "the attribute's arguments are named; to name the operation, write \
                         `name = \"{}\"`",
                        lit.value()
                    ),
                ));
            }
            let name = input.call(Ident::parse_any)?;
            let text = name.to_string();
            let Some(spec) = ARGUMENTS.iter().find(|spec| spec.name == text) else {
                return Err(unknown_argument(&name));
            };
            match spec.form {
                Form::Value => {
                    if !input.peek(Token![=]) {
                        return Err(syn::Error::new(
                            name.span(),
                            format!("`{text}` needs a value: `{text} = …`"),
                        ));
                    }
                    input.parse::<Token![=]>()?;
                }
                Form::List => {
                    if !input.peek(syn::token::Paren) {
                        let example = if input.peek(Token![=]) {
                            input.parse::<Token![=]>()?;
                            let value: Expr = input.parse()?;
                            let value = quote::ToTokens::to_token_stream(&value).to_string();
                            value
                                .trim_start_matches('[')
                                .trim_end_matches(']')
                                .trim_start_matches('(')
                                .trim_end_matches(')')
                                .to_owned()
                        } else {
                            "a, b".to_owned()
                        };
                        return Err(syn::Error::new(
                            name.span(),
                            format!("`{text}` takes a list: `{text}({example})`"),
                        ));
                    }
                }
            }
            (spec.parse)(&mut args, &name, input)?;
            if !input.is_empty() {
                input.parse::<Token![,]>()?;
            }
        }
        Ok(args)
    }
}

fn set<T>(slot: &mut Option<Arg<T>>, name: &Ident, value: T) -> syn::Result<()> {
    if slot.is_some() {
        return Err(syn::Error::new(
            name.span(),
            format!("duplicate `{name}` argument; give it once"),
        ));
    }
    *slot = Some(Arg {
        span: name.span(),
        value,
    });
    Ok(())
}

fn parse_string(input: ParseStream<'_>, hint: &str) -> syn::Result<LitStr> {
    match input.parse::<Lit>() {
        Ok(Lit::Str(lit)) => Ok(lit),
        Ok(other) => Err(syn::Error::new(other.span(), hint)),
        Err(e) => Err(syn::Error::new(e.span(), hint)),
    }
}

fn parse_bool(input: ParseStream<'_>, hint: &str) -> syn::Result<bool> {
    match input.parse::<Lit>() {
        Ok(Lit::Bool(LitBool { value, .. })) => Ok(value),
        Ok(other) => Err(syn::Error::new(other.span(), hint)),
        Err(e) => Err(syn::Error::new(e.span(), hint)),
    }
}

fn parse_duration(name: &Ident, input: ParseStream<'_>) -> syn::Result<Duration> {
    if input.peek(LitStr) {
        let lit: LitStr = input.parse()?;
        let millis = duration::parse_millis(&lit.value(), &name.to_string())
            .map_err(|msg| syn::Error::new(lit.span(), msg))?;
        return Ok(Duration::Literal {
            millis,
            span: lit.span(),
        });
    }
    if input.peek(syn::LitInt) || input.peek(syn::LitFloat) {
        let lit: Lit = input.parse()?;
        let (number, suffix) = match &lit {
            Lit::Int(int) => (int.base10_digits().to_owned(), int.suffix().to_owned()),
            Lit::Float(float) => (float.base10_digits().to_owned(), float.suffix().to_owned()),
            _ => unreachable!("peeked a number"),
        };
        // `24h` is read by Rust as the number 24 with a suffix: the
        // duration it means, quoted.
        let written = format!("{number}{suffix}");
        if !suffix.is_empty() && duration::parse_millis(&written, &name.to_string()).is_ok() {
            return Err(syn::Error::new(
                lit.span(),
                format!("a duration is a string: write `{name} = \"{written}\"`"),
            ));
        }
        return Err(syn::Error::new(
            lit.span(),
            format!(
                "`{name} = {number}` has no unit; write {}",
                unitless_suggestion(&name.to_string(), &number)
            ),
        ));
    }
    let expr: Expr = input.parse()?;
    Ok(match const_millis(&expr) {
        Some(millis) => Duration::Const { millis, expr },
        None => Duration::Expr(expr),
    })
}

/// What to write instead of a duration given as a bare number of seconds:
/// suggestions that compile and that the rules accept.
fn unitless_suggestion(arg: &str, number: &str) -> String {
    let Some(millis) = number
        .parse::<u64>()
        .ok()
        .and_then(|secs| secs.checked_mul(1000))
        .filter(|millis| *millis > 0 && *millis <= MAX_DURATION_MILLIS)
    else {
        return format!("a duration string such as `{arg} = \"24h\"` (units ms, s, m, h, d)");
    };
    let text = duration::display_millis(millis);
    // A TTL no longer than the default lease needs a shorter lease too.
    let lease = (arg == "ttl" && millis <= DEFAULT_LEASE_MILLIS)
        .then(|| duration::display_millis((millis / 3).max(MIN_LEASE_MILLIS)));
    match lease {
        Some(lease) => format!(
            "a duration string, with a lease shorter than it, such as `{arg} = \"{text}\", \
             lease = \"{lease}\"` (units ms, s, m, h, d), or a `Duration`, such as \
             `{arg} = Duration::from_secs({number}), lease = Duration::from_secs({})`",
            (millis / 3000).max(1)
        ),
        None => format!(
            "a duration string such as `{arg} = \"{text}\"` (units ms, s, m, h, d), or a \
             `Duration`, such as `{arg} = Duration::from_secs({number})`"
        ),
    }
}

/// The milliseconds of a `Duration` written as a constant the macro can
/// read (`Duration::ZERO`, `Duration::MAX`, `Duration::from_secs(90)`,
/// `Duration::from_millis(500)`), so that it is checked at compile time like
/// a string literal. Any other expression is checked at run time.
fn const_millis(expr: &Expr) -> Option<u128> {
    let is_duration = |path: &Path, last: &str| {
        let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
        segments.len() >= 2
            && segments[segments.len() - 2] == "Duration"
            && segments[segments.len() - 1] == last
    };
    match expr {
        Expr::Path(path) if is_duration(&path.path, "ZERO") => Some(0),
        Expr::Path(path) if is_duration(&path.path, "MAX") => Some(u128::MAX),
        Expr::Call(call) if call.args.len() == 1 => {
            let Expr::Path(callee) = &*call.func else {
                return None;
            };
            let Expr::Lit(syn::ExprLit {
                lit: Lit::Int(int), ..
            }) = &call.args[0]
            else {
                return None;
            };
            let n: u128 = int.base10_parse().ok()?;
            if is_duration(&callee.path, "from_secs") {
                // Past u128, rustc says the literal is out of range.
                n.checked_mul(1000)
            } else if is_duration(&callee.path, "from_millis") {
                Some(n)
            } else {
                None
            }
        }
        _ => None,
    }
}

fn parse_on_conflict(input: ParseStream<'_>) -> syn::Result<OnConflict> {
    let hint = "`on_conflict` is `wait` (wait for the running call's result) or `reject` \
                (fail at once with `Error::InProgress`)";
    if input.peek(LitStr) {
        let lit: LitStr = input.parse()?;
        return Err(syn::Error::new(
            lit.span(),
            format!(
                "{hint}, written without quotes: `on_conflict = {}`",
                lit.value()
            ),
        ));
    }
    let value: Expr = input.parse().map_err(|e| syn::Error::new(e.span(), hint))?;
    let Expr::Path(path) = &value else {
        return Err(syn::Error::new_spanned(value, hint));
    };
    let last = path
        .path
        .segments
        .last()
        .map(|segment| segment.ident.to_string().to_lowercase())
        .unwrap_or_default();
    match (path.path.get_ident().is_some(), last.as_str()) {
        (true, "wait") => Ok(OnConflict::Wait),
        (true, "reject") => Ok(OnConflict::Reject),
        (false, word @ ("wait" | "reject")) => Err(syn::Error::new_spanned(
            value,
            format!("`on_conflict` takes a bare word: write `on_conflict = {word}`"),
        )),
        _ => Err(syn::Error::new_spanned(
            &value,
            format!(
                "unknown `on_conflict = {}`; {hint}",
                quote::ToTokens::to_token_stream(&value)
                    .to_string()
                    .replace(" :: ", "::")
            ),
        )),
    }
}

fn parse_isolation(input: ParseStream<'_>) -> syn::Result<Isolation> {
    let hint = "`isolation` is `read_committed`, `repeatable_read` or `serializable`, \
                written as a bare word";
    let value: Expr = input.parse().map_err(|e| syn::Error::new(e.span(), hint))?;
    let word = match &value {
        Expr::Path(path) => path.path.get_ident().map(ToString::to_string),
        Expr::Lit(syn::ExprLit {
            lit: Lit::Str(lit), ..
        }) => {
            let word = lit.value().to_lowercase().replace([' ', '-'], "_");
            return Err(syn::Error::new(
                lit.span(),
                if ["read_committed", "repeatable_read", "serializable"].contains(&word.as_str()) {
                    format!("{hint}, without quotes: `isolation = {word}`")
                } else {
                    format!("unknown `isolation = {:?}`; {hint}", lit.value())
                },
            ));
        }
        _ => None,
    };
    match word.as_deref() {
        Some("read_committed") => Ok(Isolation::ReadCommitted),
        Some("repeatable_read") => Ok(Isolation::RepeatableRead),
        Some("serializable") => Ok(Isolation::Serializable),
        _ => Err(syn::Error::new_spanned(
            &value,
            format!(
                "unknown `isolation = {}`; {hint}",
                quote::ToTokens::to_token_stream(&value)
            ),
        )),
    }
}

fn parse_cache_errors(input: ParseStream<'_>) -> syn::Result<CacheErrors> {
    let hint = "`cache_errors` is `true`, `false`, or the path of a `fn(&E) -> bool` that \
                picks the errors to cache, e.g. `cache_errors = PaymentError::is_permanent`";
    if input.peek(LitBool) {
        let lit: LitBool = input.parse()?;
        return Ok(if lit.value {
            CacheErrors::All
        } else {
            CacheErrors::None
        });
    }
    if input.peek(Lit) {
        let lit: Lit = input.parse()?;
        return Err(syn::Error::new(lit.span(), hint));
    }
    let expr: Expr = input.parse()?;
    match expr {
        Expr::Path(path) if path.qself.is_none() && path.attrs.is_empty() => {
            Ok(CacheErrors::Predicate(path.path))
        }
        other => Err(syn::Error::new_spanned(
            other,
            format!("{hint}; a closure or other expression goes in a `fn` first"),
        )),
    }
}

/// `skip(req.amount)`: a field cannot be skipped on its own.
fn skip_field(field: &syn::ExprField) -> syn::Error {
    let whole = quote::ToTokens::to_token_stream(&field.base).to_string();
    let member = quote::ToTokens::to_token_stream(&field.member).to_string();
    syn::Error::new_spanned(
        field,
        format!(
            "`skip(…)` takes whole arguments, not fields: leave `{member}` out of the \
             fingerprint by marking the field `#[serde(skip_serializing)]`, or skip the \
             whole argument with `skip({whole})` (and name what identifies the call with \
             `key = …`)"
        ),
    )
}

fn unknown_argument(name: &Ident) -> syn::Error {
    let text = name.to_string();
    if text == "skip_all" {
        return syn::Error::new(
            name.span(),
            "`skip_all` is tracing's; `#[idempotent]` fingerprints every argument except those \
             listed in `skip(…)`: to check no arguments at all, write `fingerprint = false` \
             beside a `key = …`; to leave some out, list them: `skip(pool, client)`",
        );
    }
    let suggestion = ARGUMENTS
        .iter()
        .find(|spec| spec.hints.contains(&text.as_str()))
        .or_else(|| {
            ARGUMENTS
                .iter()
                .map(|spec| (strsim::levenshtein(spec.name, &text), spec))
                .filter(|(distance, _)| *distance <= 2)
                .min_by_key(|(distance, _)| *distance)
                .map(|(_, spec)| spec)
        });
    let mut message = format!("unknown argument `{text}`");
    if let Some(spec) = suggestion {
        let example = match spec.form {
            Form::Value => format!("{} = …", spec.name),
            Form::List => format!("{}(…)", spec.name),
        };
        message.push_str(&format!("; did you mean `{example}`?"));
        return syn::Error::new(
            name.span(),
            format!("{message} The arguments are: {}", names()),
        );
    }
    message.push_str(&format!("; expected one of: {}", names()));
    syn::Error::new(name.span(), message)
}
