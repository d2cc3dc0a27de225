//! Rewriting the function: its signature stays, its body becomes a call of
//! the runtime's `__private::run` with the user's block as the body future.

use proc_macro2::{Span, TokenStream};
use quote::{ToTokens as _, quote, quote_spanned};
use syn::spanned::Spanned as _;
use syn::{AttrStyle, Expr, Ident, ItemFn, Path, Type};

use crate::args::{Args, CacheErrors, Duration, OnConflict};
use crate::valid::{Fingerprinted, Shape};

/// Lints the generated statements may trip in a user's crate; the user's own
/// tokens (block, expressions) keep every lint.
fn allowances() -> TokenStream {
    quote! {
        #[allow(
            unused_qualifications,
            clippy::used_underscore_binding,
            clippy::needless_borrow,
            clippy::no_effect_underscore_binding,
        )]
    }
}

fn hidden(name: &str) -> Ident {
    Ident::new(name, Span::mixed_site())
}

/// The rewritten function.
pub(crate) fn expand(
    args: &Args,
    func: &ItemFn,
    shape: Shape,
    arguments: &[Fingerprinted],
) -> TokenStream {
    let krate: Path = args
        .krate
        .clone()
        .unwrap_or_else(|| syn::parse_quote!(::idem_core));
    let allow = allowances();
    let store = hidden("__idem_store");
    let call = hidden("__idem_call");
    let prepared = hidden("__idem_prepared");
    let body = hidden("__idem_body");
    let fake = hidden("__idem_return");

    let store_expr = match &args.store {
        Some(expr) => quote_spanned!(expr.span()=> &(#expr)),
        None => quote!(#krate::__private::default_store()),
    };
    let name = match &args.name {
        Some(lit) => lit.to_token_stream(),
        None => {
            let ident = func.sig.ident.to_string();
            quote!(::core::concat!(::core::module_path!(), "::", #ident))
        }
    };
    let fingerprint = arguments.iter().flat_map(|argument| {
        let call = &call;
        argument
            .bindings
            .iter()
            .map(move |binding| quote_spanned!(argument.span=> #call.argument(&#binding);))
    });
    let scope = args.scope.as_ref().map(|expr| {
        let scope = by_reference(expr);
        quote_spanned!(expr.span()=> #call.scope(#scope);)
    });
    let key = args.key.as_ref().map(|expr| {
        let key = by_reference(expr);
        quote_spanned!(expr.span()=> #call.key(#key);)
    });
    let keyed = args.key.is_some();
    let checked = args.fingerprint.as_ref().is_none_or(|f| f.value);

    let store_span = args
        .store
        .as_ref()
        .map_or_else(Span::call_site, |expr| expr.span());
    let mut engine = quote_spanned!(store_span=> #krate::__private::Idempotency::new(#store));
    let duration = |d: &Duration| match d {
        Duration::Literal { millis, span } => {
            quote_spanned!(*span=> #krate::__private::millis(#millis))
        }
        Duration::Expr(expr) => expr.to_token_stream(),
    };
    if let Some(ttl) = &args.ttl {
        let ttl = duration(&ttl.value);
        engine.extend(quote!(.ttl(#ttl)));
    }
    if let Some(lease) = &args.lease {
        let lease = duration(&lease.value);
        engine.extend(quote!(.lease(#lease)));
    }
    if let Some(wait_timeout) = &args.wait_timeout {
        let wait_timeout = duration(&wait_timeout.value);
        engine.extend(quote!(.wait_timeout(#wait_timeout)));
    }
    if args
        .on_conflict
        .as_ref()
        .is_some_and(|c| c.value == OnConflict::Reject)
    {
        engine.extend(quote!(.on_conflict(#krate::__private::OnConflict::Reject)));
    }

    let (ret, user_body) = match &shape {
        Shape::Async { ret } => {
            let block = &func.block;
            let body = quote! {
                if let ::core::option::Option::Some(#fake) = ::core::option::Option::None::<#ret> {
                    #[allow(unreachable_code)]
                    return #fake;
                }
                #block
            };
            (ret, body)
        }
        Shape::AsyncTrait { ret, stmts } => (ret, quote!(#(#stmts)*)),
    };
    let (run, predicate) = run_call(&krate, ret, args);
    let predicate = predicate.map(|p| quote!(#p,));
    // The whole call, `.await` included, is spanned at the return type: an
    // unfit return type is reported there, once.
    let run = quote_spanned!(ret.span()=> #run(#engine, #prepared, #predicate #body).await);

    let statements = quote! {
        #allow
        let #store = #store_expr;
        #allow
        let #prepared = {
            let mut #call = #krate::__private::Call::new(#name);
            #(#fingerprint)*
            #scope
            #key
            #call.finish(#keyed, #checked)
        };
        #allow
        let #body = async { #user_body };
        #run
    };

    let (inner_attrs, outer_attrs): (Vec<_>, Vec<_>) = func
        .attrs
        .iter()
        .partition(|attr| matches!(attr.style, AttrStyle::Inner(_)));
    let vis = &func.vis;
    let sig = &func.sig;
    let statements = match shape {
        Shape::Async { .. } => statements,
        Shape::AsyncTrait { .. } => {
            quote!(::std::boxed::Box::pin(async move { #statements }))
        }
    };
    // The body keeps the user's braces, so the item's span stays the user's
    // and lints about the item itself (`dead_code`) still reach them.
    let mut body = TokenStream::new();
    func.block.brace_token.surround(&mut body, |body| {
        body.extend(quote!(#(#inner_attrs)* #statements));
    });
    quote! {
        #(#outer_attrs)*
        #vis #sig #body
    }
}

/// `__private::run::<R, …>` (or its error-caching sibling) spanned at the
/// return type, so that an unfit return type is reported there, and the
/// caching predicate to pass before the body, if any.
fn run_call(krate: &Path, ret: &Type, args: &Args) -> (TokenStream, Option<TokenStream>) {
    let span = ret.span();
    let predicate = match args.cache_errors.as_ref().map(|c| &c.value) {
        None | Some(CacheErrors::None) => None,
        Some(CacheErrors::All) => Some(quote!(#krate::__private::cache_all)),
        Some(CacheErrors::Predicate(path)) => Some(path.to_token_stream()),
    };
    match predicate {
        None => (
            quote_spanned!(span=> #krate::__private::run::<#ret, _, _>),
            None,
        ),
        Some(predicate) => (
            quote_spanned!(span=> #krate::__private::run_caching_errors::<#ret, _, _, _>),
            Some(predicate),
        ),
    }
}

/// A reference to the value of `expr`, taken without moving out of the
/// arguments: a tuple `(a, b)` becomes `&(&a, &b)`, which serializes the
/// same.
fn by_reference(expr: &Expr) -> TokenStream {
    match expr {
        Expr::Paren(inner) => by_reference(&inner.expr),
        Expr::Tuple(tuple) if !tuple.elems.is_empty() => {
            let elems = tuple
                .elems
                .iter()
                .map(|elem| quote_spanned!(elem.span()=> &(#elem)));
            quote_spanned!(expr.span()=> &(#(#elems,)*))
        }
        _ => quote_spanned!(expr.span()=> &(#expr)),
    }
}

/// The unchanged function, for when its arguments are wrong: callers then
/// see the argument error alone, not errors of their own.
pub(crate) fn unchanged(func: &ItemFn) -> TokenStream {
    func.to_token_stream()
}
