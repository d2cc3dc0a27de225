//! Checks of the arguments against each other and against the function,
//! each reported at the offending token in the attribute's words.

use proc_macro2::Span;
use syn::spanned::Spanned as _;
use syn::visit::Visit;
use syn::{Expr, ItemFn, Type, TypeParamBound};

use crate::args::{Args, Duration, OnConflict};
use crate::duration::display_millis;
use crate::func::{self, Param, Shape};
use crate::rules::{DEFAULT_LEASE_MILLIS, DEFAULT_TTL_MILLIS, MIN_LEASE_MILLIS};

/// What the expansion needs once the checks passed.
pub(crate) struct Checked {
    pub(crate) shape: Shape,
    /// The parameters that take part in the fingerprint, with their skipped
    /// bindings removed.
    pub(crate) fingerprinted: Vec<Param>,
    /// With `transaction = tx`: where the parameter is in the signature.
    pub(crate) transaction: Option<usize>,
}

/// Checks `args` against `func`.
pub(crate) fn validate(args: &Args, func: &ItemFn) -> syn::Result<Checked> {
    let mut errors = Errors::default();
    errors.keep(once(func));
    let shape = errors.keep(shape(func));
    if let Some(shape) = &shape {
        errors.keep(returns(func, shape.ret()));
    }
    let fingerprinted = errors.keep(fingerprinted(args, func));
    if let Some(fingerprinted) = &fingerprinted {
        errors.keep(something_keys(args, func, fingerprinted));
    }
    errors.keep(durations(args));
    errors.keep(store(args));
    let transaction = errors.keep(transaction(args, func, shape.as_ref()));
    errors.finish()?;
    let transaction = transaction.flatten();
    let mut fingerprinted = fingerprinted.expect("no errors, so parameters");
    if let Some(tx) = &args.transaction {
        fingerprinted.retain(|param| !param.bindings.contains(&tx.value));
    }
    Ok(Checked {
        shape: shape.expect("no errors, so a shape"),
        fingerprinted,
        transaction,
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

/// The attribute is given once: twice, each call would wait on itself.
fn once(func: &ItemFn) -> syn::Result<()> {
    match func.attrs.iter().find(|attr| {
        attr.path()
            .segments
            .last()
            .is_some_and(|last| last.ident == "idempotent")
    }) {
        Some(again) => Err(syn::Error::new_spanned(
            again,
            "`#[idempotent]` is given twice on this fn; each call would wait for its own claim. \
             Keep one, with every argument in it",
        )),
        None => Ok(()),
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
        // `fn f() -> impl Future<Output = R>`: the fix is `async fn f() -> R`,
        // not `async fn` with the same return type (which returns a future
        // of a future).
        if let Some(output) = func::declared_return(func).and_then(impl_future_output) {
            return Err(syn::Error::new(
                sig.fn_token.span,
                format!(
                    "`#[idempotent]` works on `async fn`; write `async fn {}(…) -> {}` instead \
                     of returning `impl Future`",
                    sig.ident,
                    quote::ToTokens::to_token_stream(&output)
                        .to_string()
                        .replace(" < ", "<")
                        .replace(" >", ">")
                        .replace(" ,", ",")
                ),
            ));
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

/// `R` of a return type `impl Future<Output = R> (+ …)`.
fn impl_future_output(ret: &Type) -> Option<Type> {
    let Type::ImplTrait(ty) = ret else {
        return None;
    };
    ty.bounds.iter().find_map(|bound| {
        let syn::TypeParamBound::Trait(bound) = bound else {
            return None;
        };
        let segment = bound.path.segments.last()?;
        let syn::PathArguments::AngleBracketed(args) = &segment.arguments else {
            return None;
        };
        (segment.ident == "Future").then_some(())?;
        args.args.iter().find_map(|arg| match arg {
            syn::GenericArgument::AssocType(assoc) if assoc.ident == "Output" => {
                Some(assoc.ty.clone())
            }
            _ => None,
        })
    })
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

/// What the return type's shape tells before type checking: a type that is
/// plainly not a `Result`, a borrowed `Ok` type, or a generic `Ok` type
/// whose bounds leave out what replays need.
fn returns(func: &ItemFn, ret: &Type) -> syn::Result<()> {
    if let Some(what) = func::plainly_not_result(ret) {
        return Err(syn::Error::new_spanned(
            ret,
            format!(
                "an `#[idempotent]` fn must return `Result<T, E>`, not {what}: idem stores `T` \
                 for retries and reports its own failures through `E: From<idem_core::Error>`"
            ),
        ));
    }
    let Some((ok, _)) = func::result_parts(ret) else {
        return Ok(());
    };
    if let Type::Reference(reference) = ok {
        let owned = match &*reference.elem {
            Type::Path(path) if path.path.is_ident("str") => "String".to_owned(),
            Type::Slice(slice) => format!("Vec<{}>", func::type_text(&slice.elem)),
            other => func::type_text(other),
        };
        return Err(syn::Error::new_spanned(
            ok,
            format!(
                "the `Ok` type `{}` is borrowed, but a replayed result is decoded from the \
                 store, so it must be owned: return `{owned}`",
                func::type_text(ok)
            ),
        ));
    }
    generic_ok(func, ok)
}

/// A generic `Ok` type must be bounded by `Serialize` and
/// `DeserializeOwned`. Only bounds made of serde's and std's traits are
/// judged here; others may imply them and are left to the type checker.
fn generic_ok(func: &ItemFn, ok: &Type) -> syn::Result<()> {
    const NEUTRAL: &[&str] = &[
        "Clone",
        "Copy",
        "Send",
        "Sync",
        "Debug",
        "Display",
        "PartialEq",
        "Eq",
        "PartialOrd",
        "Ord",
        "Hash",
        "Default",
        "Sized",
        "Unpin",
        "Serialize",
        "Deserialize",
        "DeserializeOwned",
    ];
    let Type::Path(path) = ok else { return Ok(()) };
    let Some(param) = path.path.get_ident() else {
        return Ok(());
    };
    let generics = &func.sig.generics;
    if !generics.type_params().any(|p| p.ident == *param) {
        return Ok(());
    }
    let mut bounds: Vec<String> = Vec::new();
    let mut collect = |list: &syn::punctuated::Punctuated<TypeParamBound, syn::Token![+]>| {
        for bound in list {
            if let TypeParamBound::Trait(bound) = bound
                && let Some(last) = bound.path.segments.last()
            {
                bounds.push(last.ident.to_string());
            }
        }
    };
    for p in generics.type_params().filter(|p| p.ident == *param) {
        collect(&p.bounds);
    }
    if let Some(clause) = &generics.where_clause {
        for predicate in &clause.predicates {
            if let syn::WherePredicate::Type(predicate) = predicate
                && let Type::Path(bounded) = &predicate.bounded_ty
                && bounded.path.is_ident(param)
            {
                collect(&predicate.bounds);
            }
        }
    }
    if bounds.iter().any(|b| !NEUTRAL.contains(&b.as_str())) {
        return Ok(());
    }
    let has = |name: &str| bounds.iter().any(|b| b == name);
    let missing: Vec<&str> = [
        (!has("Serialize")).then_some("serde::Serialize"),
        (!has("DeserializeOwned") && !has("Deserialize")).then_some("serde::de::DeserializeOwned"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(syn::Error::new_spanned(
        ok,
        format!(
            "the `Ok` type `{param}` is stored and decoded for replays, so it needs {}; add {} to \
             its bounds: `{param}: {}`",
            missing.join(" and "),
            if missing.len() == 1 { "it" } else { "them" },
            bounds
                .iter()
                .map(String::as_str)
                .chain(missing.iter().copied())
                .collect::<Vec<_>>()
                .join(" + ")
        ),
    ))
}

/// Without `key`, the arguments are the key: there must be some.
fn something_keys(args: &Args, func: &ItemFn, fingerprinted: &[Param]) -> syn::Result<()> {
    if args.key.is_some() || !fingerprinted.is_empty() {
        return Ok(());
    }
    let why = if func.sig.inputs.is_empty() {
        "takes no arguments"
    } else if args.skip.is_some() {
        "fingerprints none of its arguments (`self` never is, and `skip(…)` leaves out the rest)"
    } else {
        "fingerprints none of its arguments (`self` and `_` never are)"
    };
    Err(syn::Error::new(
        Span::call_site(),
        format!(
            "without `key = …` the arguments are the key, but `{}` {why}: every call would share \
             one key for the whole TTL. Name the key, e.g. `key = order_id`, or, for an operation \
             meant to run once per TTL, a constant such as `key = \"nightly-report\"`",
            func.sig.ident
        ),
    ))
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
    // With a key and `fingerprint = false`, the arguments take no part.
    if args.key.is_some() && args.fingerprint.as_ref().is_some_and(|f| !f.value) {
        return Ok(Vec::new());
    }
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
    for (name, arg) in [
        ("ttl", &args.ttl),
        ("lease", &args.lease),
        ("wait_timeout", &args.wait_timeout),
    ] {
        if let Some(arg) = arg
            && let Duration::Const { millis, expr } = &arg.value
        {
            let written = quote::ToTokens::to_token_stream(expr)
                .to_string()
                .replace(" :: ", "::")
                .replace(" (", "(");
            crate::duration::check(name, &written, *millis)
                .map_err(|msg| syn::Error::new_spanned(expr, msg))?;
        }
    }
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
        // No lease is both at least the shortest and shorter than it.
        None if ttl <= MIN_LEASE_MILLIS => Err(syn::Error::new(
            args.ttl
                .as_ref()
                .map_or_else(Span::call_site, |ttl| ttl.span),
            format!(
                "`ttl` ({}) must be longer than the shortest lease ({}), which must be \
                 shorter than it; set a longer one, e.g. `ttl = \"1s\", lease = \"300ms\"`",
                display_millis(ttl),
                display_millis(MIN_LEASE_MILLIS),
            ),
        )),
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

/// `transaction = tx` names a `&mut` parameter of a plain `async fn`, and
/// needs a store to open the transaction on. Answers the parameter's index.
fn transaction(args: &Args, func: &ItemFn, shape: Option<&Shape>) -> syn::Result<Option<usize>> {
    let Some(tx) = &args.transaction else {
        if let Some(isolation) = &args.isolation {
            return Err(syn::Error::new(
                isolation.span,
                "`isolation` is the level of idem's transaction, which only `transaction = tx` \
                 opens: add `transaction = tx` (with a `tx: &mut sqlx::PgConnection` \
                 parameter), or remove `isolation`",
            ));
        }
        return Ok(None);
    };
    let name = &tx.value;
    let example = format!("`{name}: &mut sqlx::PgConnection`");
    if args.store.is_none() {
        return Err(syn::Error::new(
            tx.span,
            format!(
                "`transaction = {name}` opens the transaction on a `PostgresStore`: name it with \
                 `store = …`, e.g. `store = self.pg`"
            ),
        ));
    }
    if let Some(Shape::AsyncTrait { .. }) = shape {
        return Err(syn::Error::new(
            tx.span,
            "`transaction = …` takes its parameter out of the signature, which a trait method \
             cannot do; call an inherent `async fn` with `transaction = …` from the trait method",
        ));
    }
    let found = func
        .sig
        .inputs
        .iter()
        .enumerate()
        .find_map(|(index, input)| match input {
            syn::FnArg::Typed(typed) => match &*typed.pat {
                syn::Pat::Ident(ident) if ident.ident == *name => Some((index, typed)),
                _ => None,
            },
            syn::FnArg::Receiver(_) => None,
        });
    // The key and scope are computed before the transaction opens.
    for (what, arg) in [("key", &args.key), ("scope", &args.scope)] {
        if let Some(arg) = arg
            && let Some(used) = find_ident(quote::ToTokens::to_token_stream(&arg.value), name)
        {
            return Err(syn::Error::new(
                used,
                format!(
                    "`{what}` cannot use `{name}`: idem computes the {what} before it opens the \
                     transaction that `{name}` gets; compute it from the other arguments"
                ),
            ));
        }
    }
    let Some((index, typed)) = found else {
        return Err(syn::Error::new(
            name.span(),
            format!(
                "`transaction = {name}` names no parameter of `{}`; add the parameter that gets \
                 the transaction: {example}",
                func.sig.ident
            ),
        ));
    };
    match &*typed.ty {
        Type::Reference(reference) if reference.mutability.is_some() => Ok(Some(index)),
        other => Err(syn::Error::new_spanned(
            other,
            format!("the transaction parameter is a mutable connection: {example}"),
        )),
    }
}

/// Where `name` is used in `tokens`.
fn find_ident(tokens: proc_macro2::TokenStream, name: &syn::Ident) -> Option<Span> {
    tokens.into_iter().find_map(|tree| match tree {
        proc_macro2::TokenTree::Ident(ident) if ident == *name => Some(ident.span()),
        proc_macro2::TokenTree::Group(group) => find_ident(group.stream(), name),
        _ => None,
    })
}

/// Names of associated fns that build a store or a handle
/// (`Idempotency::memory()`).
const CONSTRUCTORS: &[&str] = &[
    "new", "default", "builder", "build", "connect", "memory", "from_arc", "open",
];

/// Names of methods that build a store or a handle (`….build()`,
/// `….connect()`); a method named like an associated constructor
/// (`self.registry.default()`) is a getter as likely as not.
const BUILDING_METHODS: &[&str] = &["builder", "build", "connect", "connect_lazy", "open"];

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
            if BUILDING_METHODS.contains(&call.method.to_string().as_str()) {
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
