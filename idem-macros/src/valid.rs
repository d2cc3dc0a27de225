//! Checks of the arguments against each other and against the function,
//! each reported at the offending token in the attribute's words.

use proc_macro2::Span;
use syn::spanned::Spanned as _;
use syn::visit::Visit;
use syn::{Expr, ItemFn, Type};

use crate::args::{Args, OnConflict};
use crate::duration::display_millis;
use crate::func::{self, Param, Shape};
use crate::rules::{DEFAULT_LEASE_MILLIS, DEFAULT_TTL_MILLIS, MIN_LEASE_MILLIS};

/// What the expansion needs once the checks passed.
pub(crate) struct Checked {
    pub(crate) shape: Shape,
    /// The parameters that take part in the fingerprint, with their skipped
    /// bindings removed.
    pub(crate) fingerprinted: Vec<Param>,
}

/// Checks `args` against `func`.
pub(crate) fn validate(args: &Args, func: &ItemFn) -> syn::Result<Checked> {
    let mut errors = Errors::default();
    let shape = errors.keep(shape(func));
    let fingerprinted = errors.keep(fingerprinted(args, func));
    errors.keep(durations(args));
    errors.keep(store(args));
    errors.finish()?;
    Ok(Checked {
        shape: shape.expect("no errors, so a shape"),
        fingerprinted: fingerprinted.expect("no errors, so parameters"),
    })
}

#[derive(Default)]
struct Errors(Option<syn::Error>);

impl Errors {
    fn push(&mut self, error: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(error),
            None => self.0 = Some(error),
        }
    }

    fn keep<T>(&mut self, result: syn::Result<T>) -> Option<T> {
        result.map_err(|e| self.push(e)).ok()
    }

    fn finish(self) -> syn::Result<()> {
        self.0.map_or(Ok(()), Err)
    }
}

fn shape(func: &ItemFn) -> syn::Result<Shape> {
    let sig = &func.sig;
    if let Some(constness) = &sig.constness {
        return Err(syn::Error::new(
            constness.span,
            "`#[idempotent]` cannot go on a `const fn`: it claims a key in a store at run time; \
             remove `const` and make the function `async`",
        ));
    }
    if sig.asyncness.is_none() {
        if let Some(shape) = func::async_trait_shape(func) {
            return Ok(shape);
        }
        return Err(syn::Error::new(
            sig.fn_token.span,
            format!(
                "`#[idempotent]` works on `async fn`; write `async fn {}`",
                sig.ident
            ),
        ));
    }
    let Some(ret) = func::declared_return(func) else {
        return Err(syn::Error::new(
            sig.paren_token.span.close(),
            format!(
                "`{}` returns nothing; an `#[idempotent]` fn returns `Result<T, E>` so that \
                 idem can store `T` and report its own failures through `E`",
                sig.ident
            ),
        ));
    };
    no_impl_trait(ret)?;
    Ok(Shape::Async { ret: ret.clone() })
}

fn no_impl_trait(ret: &Type) -> syn::Result<()> {
    struct Finder(Option<Span>);
    impl Visit<'_> for Finder {
        fn visit_type_impl_trait(&mut self, ty: &syn::TypeImplTrait) {
            self.0.get_or_insert(ty.span());
        }
    }
    let mut finder = Finder(None);
    finder.visit_type(ret);
    match finder.0 {
        Some(span) => Err(syn::Error::new(
            span,
            "an `#[idempotent]` fn cannot return `impl Trait`: a replay decodes the stored \
             result, so it needs a named type",
        )),
        None => Ok(()),
    }
}

fn fingerprinted(args: &Args, func: &ItemFn) -> syn::Result<Vec<Param>> {
    let mut params = func::params(func);
    let names: Vec<String> = params
        .iter()
        .flat_map(|param| param.bindings.iter().map(ToString::to_string))
        .collect();
    let mut errors = Errors::default();
    let mut skipped: Vec<String> = Vec::new();
    if let Some(skip) = &args.skip {
        for ident in &skip.value {
            let name = ident.to_string();
            if name == "self" {
                errors.push(syn::Error::new(
                    ident.span(),
                    "`self` is always left out of the fingerprint; remove it from `skip`",
                ));
            } else if !names.contains(&name) {
                let known = if names.is_empty() {
                    "it takes no arguments".to_owned()
                } else {
                    format!("its arguments are: {}", names.join(", "))
                };
                errors.push(syn::Error::new(
                    ident.span(),
                    format!(
                        "`skip({name})` names no argument of `{}`; {known}",
                        func.sig.ident
                    ),
                ));
            } else if skipped.contains(&name) {
                errors.push(syn::Error::new(
                    ident.span(),
                    format!("`{name}` is skipped twice"),
                ));
            }
            skipped.push(name);
        }
    }
    errors.finish()?;
    for param in &mut params {
        param
            .bindings
            .retain(|binding| !skipped.contains(&binding.to_string()));
    }
    params.retain(|param| !param.bindings.is_empty());
    Ok(params)
}

/// The runtime's rules on durations, for literals (the runtime checks
/// expressions with the same rules and the same words).
fn durations(args: &Args) -> syn::Result<()> {
    if let Some(lease) = &args.lease
        && let Some(millis) = lease.value.literal()
        && millis < MIN_LEASE_MILLIS
    {
        return Err(syn::Error::new(
            lease.span,
            format!(
                "`lease` ({}) is shorter than the minimum of {}",
                display_millis(millis),
                display_millis(MIN_LEASE_MILLIS)
            ),
        ));
    }
    if let (Some(wait_timeout), Some(on_conflict)) = (&args.wait_timeout, &args.on_conflict)
        && on_conflict.value == OnConflict::Reject
    {
        return Err(syn::Error::new(
            wait_timeout.span,
            "`wait_timeout` needs `on_conflict = wait`: with `on_conflict = reject` a call \
             never waits; remove one of them",
        ));
    }
    let ttl = match &args.ttl {
        Some(ttl) => ttl.value.literal(),
        None => Some(DEFAULT_TTL_MILLIS),
    };
    let Some(ttl) = ttl else { return Ok(()) };
    match &args.lease {
        Some(lease) => match lease.value.literal() {
            Some(millis) if millis >= ttl => Err(syn::Error::new(
                lease.span,
                format!(
                    "`lease` ({}) must be shorter than `ttl` ({}): a claim that outlives its \
                     result would block retries after the result expired",
                    display_millis(millis),
                    display_millis(ttl)
                ),
            )),
            _ => Ok(()),
        },
        None if ttl <= DEFAULT_LEASE_MILLIS => Err(syn::Error::new(
            args.ttl
                .as_ref()
                .map_or_else(Span::call_site, |ttl| ttl.span),
            format!(
                "`ttl` ({}) must be longer than the lease, which is {} by default; \
                 set a shorter one, e.g. `lease = \"{}\"`",
                display_millis(ttl),
                display_millis(DEFAULT_LEASE_MILLIS),
                display_millis((ttl / 3).max(MIN_LEASE_MILLIS)),
            ),
        )),
        None => Ok(()),
    }
}

/// Names of calls that build a store or a handle.
const CONSTRUCTORS: &[&str] = &[
    "new", "default", "builder", "build", "connect", "memory", "from_arc", "open",
];

/// `store = …` is evaluated on every call: a handle built there would be new
/// each time, and would dedup nothing.
fn store(args: &Args) -> syn::Result<()> {
    let Some(store) = &args.store else {
        return Ok(());
    };
    let fix = "build the handle once at start-up, keep it (a field, a `static`), and name it \
               here, e.g. `store = self.idem`";
    if let Expr::Lit(syn::ExprLit {
        lit: syn::Lit::Str(url),
        ..
    }) = &store.value
    {
        return Err(syn::Error::new(
            url.span(),
            format!(
                "`store = \"{}\"` names a URL, but `store = …` takes a handle; {fix}, built \
                 with `Idempotency::connect(\"{}\").await?`",
                url.value(),
                url.value()
            ),
        ));
    }
    struct Builder(Option<Span>);
    impl Visit<'_> for Builder {
        fn visit_expr_call(&mut self, call: &syn::ExprCall) {
            if let Expr::Path(path) = &*call.func
                && path
                    .path
                    .segments
                    .last()
                    .is_some_and(|last| CONSTRUCTORS.contains(&last.ident.to_string().as_str()))
            {
                self.0.get_or_insert(call.span());
            }
            syn::visit::visit_expr_call(self, call);
        }

        fn visit_expr_method_call(&mut self, call: &syn::ExprMethodCall) {
            if CONSTRUCTORS.contains(&call.method.to_string().as_str()) {
                self.0.get_or_insert(call.span());
            }
            syn::visit::visit_expr_method_call(self, call);
        }

        fn visit_expr_struct(&mut self, literal: &syn::ExprStruct) {
            self.0.get_or_insert(literal.span());
        }

        fn visit_expr_await(&mut self, expr: &syn::ExprAwait) {
            self.0.get_or_insert(expr.span());
        }
    }
    let mut builder = Builder(None);
    builder.visit_expr(&store.value);
    match builder.0 {
        Some(span) => Err(syn::Error::new(
            span,
            format!(
                "`store = …` is evaluated on every call, so a store or handle built here is \
                 new each time and dedups nothing; {fix}"
            ),
        )),
        None => Ok(()),
    }
}
