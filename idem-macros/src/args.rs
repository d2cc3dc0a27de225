//! Parsing `#[idempotent(...)]`'s arguments, each kept with its span.

use proc_macro2::Span;
use syn::ext::IdentExt as _;
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::{Expr, Ident, Lit, LitBool, LitStr, Path, Token};

use crate::ttl;

/// Every argument the attribute takes, in the order the docs list them.
pub(crate) const ARGUMENTS: [&str; 12] = [
    "key",
    "scope",
    "ttl",
    "lease",
    "on_conflict",
    "wait_timeout",
    "cache_errors",
    "skip",
    "fingerprint",
    "name",
    "store",
    "crate",
];

/// The attribute's arguments as written.
#[derive(Default)]
pub(crate) struct Args {
    pub(crate) key: Option<Expr>,
    pub(crate) scope: Option<Expr>,
    pub(crate) ttl: Option<Arg<Duration>>,
    pub(crate) lease: Option<Arg<Duration>>,
    pub(crate) on_conflict: Option<Arg<OnConflict>>,
    pub(crate) wait_timeout: Option<Arg<Duration>>,
    pub(crate) cache_errors: Option<Arg<CacheErrors>>,
    pub(crate) skip: Option<Arg<Vec<Ident>>>,
    pub(crate) fingerprint: Option<Arg<bool>>,
    pub(crate) name: Option<LitStr>,
    pub(crate) store: Option<Expr>,
    pub(crate) krate: Option<Path>,
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

impl Parse for Args {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let mut args = Self::default();
        while !input.is_empty() {
            let name = input.call(Ident::parse_any)?;
            let span = name.span();
            let text = name.to_string();
            match text.as_str() {
                "skip" => {
                    let content;
                    syn::parenthesized!(content in input);
                    let names = Punctuated::<Ident, Token![,]>::parse_terminated_with(
                        &content,
                        Ident::parse_any,
                    )?;
                    set(&mut args.skip, &name, names.into_iter().collect())?;
                }
                _ if ARGUMENTS.contains(&text.as_str()) => {
                    if !input.peek(Token![=]) {
                        return Err(syn::Error::new(
                            span,
                            format!("`{text}` needs a value: `{text} = …`"),
                        ));
                    }
                    input.parse::<Token![=]>()?;
                    args.parse_value(&name, input)?;
                }
                _ => return Err(unknown_argument(&name)),
            }
            if !input.is_empty() {
                input.parse::<Token![,]>()?;
            }
        }
        Ok(args)
    }
}

impl Args {
    fn parse_value(&mut self, name: &Ident, input: ParseStream<'_>) -> syn::Result<()> {
        match name.to_string().as_str() {
            "key" => set_plain(&mut self.key, name, input.parse()?),
            "scope" => set_plain(&mut self.scope, name, input.parse()?),
            "store" => set_plain(&mut self.store, name, input.parse()?),
            "ttl" => set(&mut self.ttl, name, parse_duration(name, input)?),
            "lease" => set(&mut self.lease, name, parse_duration(name, input)?),
            "wait_timeout" => set(&mut self.wait_timeout, name, parse_duration(name, input)?),
            "on_conflict" => set(&mut self.on_conflict, name, parse_on_conflict(input)?),
            "cache_errors" => set(&mut self.cache_errors, name, parse_cache_errors(input)?),
            "fingerprint" => {
                let value = parse_bool(input, "`fingerprint` is `true` (the default) or `false`")?;
                set(&mut self.fingerprint, name, value)
            }
            "name" => {
                let lit = parse_string(
                    input,
                    "`name` takes a string literal, e.g. `name = \"payments.charge\"`",
                )?;
                if lit.value().trim().is_empty() {
                    return Err(syn::Error::new(lit.span(), "`name` must not be empty"));
                }
                set_plain(&mut self.name, name, lit)
            }
            "crate" => {
                let hint = "`crate` takes the path of the idem runtime as a string, \
                            e.g. `crate = \"my_crate::idem\"`";
                let lit = parse_string(input, hint)?;
                let path = lit
                    .parse_with(Path::parse_mod_style)
                    .map_err(|_| syn::Error::new(lit.span(), hint))?;
                set_plain(&mut self.krate, name, path)
            }
            other => unreachable!("`{other}` is listed in ARGUMENTS but not parsed"),
        }
    }
}

fn duplicate(name: &Ident) -> syn::Error {
    syn::Error::new(
        name.span(),
        format!("duplicate `{name}` argument; give it once"),
    )
}

fn set<T>(slot: &mut Option<Arg<T>>, name: &Ident, value: T) -> syn::Result<()> {
    if slot.is_some() {
        return Err(duplicate(name));
    }
    *slot = Some(Arg {
        span: name.span(),
        value,
    });
    Ok(())
}

fn set_plain<T>(slot: &mut Option<T>, name: &Ident, value: T) -> syn::Result<()> {
    if slot.is_some() {
        return Err(duplicate(name));
    }
    *slot = Some(value);
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
        let millis = ttl::parse_millis(&lit.value(), &name.to_string())
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
            .map_or_else(|| "24h".to_owned(), ttl::display_millis);
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

/// The names users reach for, and the argument they mean.
const HINTS: &[(&str, &str)] = &[
    ("ttl_secs", "ttl"),
    ("ttl_seconds", "ttl"),
    ("ttl_ms", "ttl"),
    ("expire", "ttl"),
    ("expires", "ttl"),
    ("expiry", "ttl"),
    ("expiration", "ttl"),
    ("expires_in", "ttl"),
    ("retention", "ttl"),
    ("keep", "ttl"),
    ("idempotency_key", "key"),
    ("id", "key"),
    ("tenant", "scope"),
    ("namespace", "scope"),
    ("partition", "scope"),
    ("lock", "lease"),
    ("lock_ttl", "lease"),
    ("lease_ttl", "lease"),
    ("lock_timeout", "lease"),
    ("conflict", "on_conflict"),
    ("on_busy", "on_conflict"),
    ("mode", "on_conflict"),
    ("timeout", "wait_timeout"),
    ("wait", "wait_timeout"),
    ("max_wait", "wait_timeout"),
    ("cache_error", "cache_errors"),
    ("cache_err", "cache_errors"),
    ("errors", "cache_errors"),
    ("ignore", "skip"),
    ("exclude", "skip"),
    ("skip_args", "skip"),
    ("backend", "store"),
    ("cache", "store"),
    ("operation", "name"),
    ("op", "name"),
    ("label", "name"),
    ("check_fingerprint", "fingerprint"),
    ("check_args", "fingerprint"),
    ("krate", "crate"),
];

fn unknown_argument(name: &Ident) -> syn::Error {
    let text = name.to_string();
    let suggestion = HINTS
        .iter()
        .find(|(wrong, _)| *wrong == text)
        .map(|(_, right)| *right)
        .or_else(|| {
            ARGUMENTS
                .iter()
                .map(|known| (strsim::levenshtein(known, &text), *known))
                .filter(|(distance, _)| *distance <= 2)
                .min()
                .map(|(_, known)| known)
        });
    let mut message = format!("unknown argument `{text}`");
    if let Some(right) = suggestion {
        message.push_str(&format!("; did you mean `{right}`?"));
    }
    message.push_str(&format!(" expected one of: {}", ARGUMENTS.join(", ")));
    syn::Error::new(name.span(), message)
}
