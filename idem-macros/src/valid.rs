//! Checks that need the function and the arguments together, and the shape of
//! the function the expansion rewrites.

use proc_macro2::Span;
use syn::spanned::Spanned as _;
use syn::visit::Visit;
use syn::{
    Expr, FnArg, GenericArgument, Ident, ItemFn, Pat, PathArguments, ReturnType, Stmt, Type,
    TypeParamBound,
};

use crate::args::{Args, Duration, OnConflict};
use crate::ttl::display_millis;

const DEFAULT_TTL_MILLIS: u64 = 24 * 60 * 60 * 1000;
const DEFAULT_LEASE_MILLIS: u64 = 60 * 1000;

/// How the function's body is reached.
pub(crate) enum Shape {
    /// An `async fn`: its block becomes the body.
    Async { ret: Type },
    /// A method `#[async_trait]` already rewrote into
    /// `fn …(…) -> Pin<Box<dyn Future<Output = R> + …>> { Box::pin(async move { … }) }`:
    /// the inner async block's statements become the body.
    AsyncTrait { ret: Type, stmts: Vec<Stmt> },
}

/// An argument that takes part in the fingerprint: the names its pattern
/// binds, and its span for diagnostics.
pub(crate) struct Fingerprinted {
    pub(crate) bindings: Vec<Ident>,
    pub(crate) span: Span,
}

/// Checks `args` against `func`; answers the function's shape and the
/// arguments that are fingerprinted.
pub(crate) fn validate(args: &Args, func: &ItemFn) -> syn::Result<(Shape, Vec<Fingerprinted>)> {
    let mut errors = Errors::default();
    let shape = errors.keep(shape(func));
    let arguments = errors.keep(arguments(args, func));
    errors.keep(durations(args));
    if let (Some(wait_timeout), Some(on_conflict)) = (&args.wait_timeout, &args.on_conflict)
        && on_conflict.value == OnConflict::Reject
    {
        errors.push(syn::Error::new(
            wait_timeout.span,
            "`wait_timeout` needs `on_conflict = wait`: with `on_conflict = reject` a call \
             never waits; remove one of them",
        ));
    }
    errors.finish()?;
    Ok((
        shape.expect("no errors, so a shape"),
        arguments.expect("no errors, so arguments"),
    ))
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
        if let Some(shape) = async_trait_shape(func) {
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
    let ret = match &sig.output {
        ReturnType::Type(_, ty) => (**ty).clone(),
        ReturnType::Default => {
            return Err(syn::Error::new(
                sig.paren_token.span.close(),
                format!(
                    "`{}` returns nothing; an `#[idempotent]` fn returns `Result<T, E>` so that \
                     idem can store `T` and report its own failures through `E`",
                    sig.ident
                ),
            ));
        }
    };
    no_impl_trait(&ret)?;
    Ok(Shape::Async { ret })
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

/// Recognises a method `#[async_trait]` rewrote.
fn async_trait_shape(func: &ItemFn) -> Option<Shape> {
    let ReturnType::Type(_, ty) = &func.sig.output else {
        return None;
    };
    let ret = future_output(ty)?;
    let [Stmt::Expr(Expr::Call(call), None)] = func.block.stmts.as_slice() else {
        return None;
    };
    let Expr::Path(callee) = &*call.func else {
        return None;
    };
    if callee.path.segments.last()?.ident != "pin" || call.args.len() != 1 {
        return None;
    }
    let Expr::Async(inner) = call.args.first()? else {
        return None;
    };
    inner.capture?;
    Some(Shape::AsyncTrait {
        ret,
        stmts: inner.block.stmts.clone(),
    })
}

/// `R` of `Pin<Box<dyn Future<Output = R> + …>>`.
fn future_output(ty: &Type) -> Option<Type> {
    let inner = only_generic(ty, "Pin")?;
    let inner = only_generic(&inner, "Box")?;
    let Type::TraitObject(object) = inner else {
        return None;
    };
    object.bounds.iter().find_map(|bound| {
        let TypeParamBound::Trait(bound) = bound else {
            return None;
        };
        let segment = bound.path.segments.last()?;
        if segment.ident != "Future" {
            return None;
        }
        let PathArguments::AngleBracketed(args) = &segment.arguments else {
            return None;
        };
        args.args.iter().find_map(|arg| match arg {
            GenericArgument::AssocType(assoc) if assoc.ident == "Output" => Some(assoc.ty.clone()),
            _ => None,
        })
    })
}

fn only_generic(ty: &Type, name: &str) -> Option<Type> {
    let Type::Path(path) = ty else { return None };
    let segment = path.path.segments.last()?;
    if segment.ident != name {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &segment.arguments else {
        return None;
    };
    match args.args.first()? {
        GenericArgument::Type(ty) => Some(ty.clone()),
        _ => None,
    }
}

fn arguments(args: &Args, func: &ItemFn) -> syn::Result<Vec<Fingerprinted>> {
    let mut errors = Errors::default();
    let mut all = Vec::new();
    let mut names = Vec::new();
    for input in &func.sig.inputs {
        if let FnArg::Typed(typed) = input {
            let mut bindings = Vec::new();
            collect_bindings(&typed.pat, &mut bindings);
            names.extend(bindings.iter().map(ToString::to_string));
            all.push(Fingerprinted {
                bindings,
                span: typed.span(),
            });
        }
    }
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
    for argument in &mut all {
        argument
            .bindings
            .retain(|binding| !skipped.contains(&binding.to_string()));
    }
    all.retain(|argument| !argument.bindings.is_empty());
    Ok(all)
}

/// The names a pattern binds, in order.
fn collect_bindings(pat: &Pat, out: &mut Vec<Ident>) {
    struct Bindings<'a>(&'a mut Vec<Ident>);
    impl Visit<'_> for Bindings<'_> {
        fn visit_pat_ident(&mut self, pat: &syn::PatIdent) {
            self.0.push(pat.ident.clone());
            syn::visit::visit_pat_ident(self, pat);
        }
    }
    Bindings(out).visit_pat(pat);
}

fn durations(args: &Args) -> syn::Result<()> {
    let literal = |d: &Duration| match d {
        Duration::Literal { millis, .. } => Some(*millis),
        Duration::Expr(_) => None,
    };
    let ttl = match &args.ttl {
        Some(ttl) => literal(&ttl.value),
        None => Some(DEFAULT_TTL_MILLIS),
    };
    let Some(ttl) = ttl else { return Ok(()) };
    match &args.lease {
        Some(lease) => match literal(&lease.value) {
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
                display_millis((ttl / 3).max(1)),
            ),
        )),
        None => Ok(()),
    }
}
