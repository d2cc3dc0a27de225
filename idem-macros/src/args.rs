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
    /// An expression that must be a `std::time::Duration`.
    Expr(Expr),
}

impl Duration {
    /// The literal's milliseconds, if it is one.
    pub(crate) fn literal(&self) -> Option<u64> {
        match self {
            Self::Literal { millis, .. } => Some(*millis),
            Self::Expr(_) => None,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnConflict {
    Wait,
    Reject,
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
            let names =
                Punctuated::<Ident, Token![,]>::parse_terminated_with(&content, Ident::parse_any)?;
            set(&mut args.skip, name, names.into_iter().collect())
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
                        return Err(syn::Error::new(
                            name.span(),
                            format!("`{text}` takes a list: `{text}(a, b)`"),
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
        let number = match &lit {
            Lit::Int(int) => int.base10_digits().to_owned(),
            Lit::Float(float) => float.base10_digits().to_owned(),
            _ => unreachable!("peeked a number"),
        };
        let as_seconds = number
            .parse::<u64>()
            .ok()
            .and_then(|secs| secs.checked_mul(1000))
            .filter(|millis| *millis > 0)
            .map_or_else(|| "24h".to_owned(), duration::display_millis);
        return Err(syn::Error::new(
            lit.span(),
            format!(
                "`{name} = {number}` has no unit; write a duration string such as \
                 `{name} = \"{as_seconds}\"` (units ms, s, m, h, d), or a `Duration` \
                 expression such as `{name} = Duration::from_secs({number})`"
            ),
        ));
    }
    Ok(Duration::Expr(input.parse()?))
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
    let value: Ident = input
        .call(Ident::parse_any)
        .map_err(|e| syn::Error::new(e.span(), hint))?;
    match value.to_string().as_str() {
        "wait" => Ok(OnConflict::Wait),
        "reject" => Ok(OnConflict::Reject),
        _ => Err(syn::Error::new(
            value.span(),
            format!("unknown `on_conflict = {value}`; {hint}"),
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

fn unknown_argument(name: &Ident) -> syn::Error {
    let text = name.to_string();
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
    }
    message.push_str(&format!(" expected one of: {}", names()));
    syn::Error::new(name.span(), message)
}
