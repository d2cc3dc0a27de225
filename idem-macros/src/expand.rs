//! Rewriting the function: its signature stays, its body becomes a call of
//! the runtime's `__private::run` with the user's block as the body future.

use proc_macro2::{Span, TokenStream};
use quote::{ToTokens as _, quote, quote_spanned};
use syn::spanned::Spanned as _;
use syn::{AttrStyle, Expr, Ident, ItemFn, Path, Type};

use crate::args::{Args, CacheErrors, Duration, OnConflict};
use crate::func::Shape;
use crate::valid::Checked;

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
pub(crate) fn expand(args: &Args, func: &ItemFn, checked: Checked) -> TokenStream {
    let Checked {
        shape,
        fingerprinted,
    } = checked;
    let krate: Path = args
        .krate
        .as_ref()
        .map_or_else(|| syn::parse_quote!(::idem_core), |arg| arg.value.clone());
    let allow = allowances();
    let handle = hidden("__idem_handle");
    let settings = hidden("__idem_settings");
    let call = hidden("__idem_call");
    let prepared = hidden("__idem_prepared");
    let body = hidden("__idem_body");
    let fake = hidden("__idem_return");

    let handle_expr = match &args.store {
        Some(store) => {
            let expr = &store.value;
            quote_spanned!(expr.span()=> #krate::__private::handle(&(#expr)))
        }
        None => quote!(#krate::__private::default_handle()),
    };
    let name = match &args.name {
        Some(name) => name.value.to_token_stream(),
        None => quote! {{
            fn __idem_operation() {}
            #krate::__private::operation_name(::core::any::type_name_of_val(&__idem_operation))
        }},
    };
    let fingerprint = fingerprinted.iter().flat_map(|param| {
        let call = &call;
        param
            .bindings
            .iter()
            .map(move |binding| quote_spanned!(param.span=> #call.argument(&#binding);))
    });
    let scope = args.scope.as_ref().map(|arg| {
        let expr = &arg.value;
        let scope = by_reference(expr);
        quote_spanned!(expr.span()=> #call.scope(#scope);)
    });
    let key = args.key.as_ref().map(|arg| {
        let expr = &arg.value;
        let key = by_reference(expr);
        quote_spanned!(expr.span()=> #call.key(#key);)
    });
    let keyed = args.key.is_some();
    let checked = args.fingerprint.as_ref().is_none_or(|f| f.value);
    let settings_expr = settings_expr(&krate, args);

    let ret = shape.ret();
    let user_body = match &shape {
        Shape::Async { .. } => {
            let block = &func.block;
            quote! {
                if let ::core::option::Option::Some(#fake) = ::core::option::Option::None::<#ret> {
                    #[allow(unreachable_code)]
                    return #fake;
                }
                #block
            }
        }
        Shape::AsyncTrait { stmts, .. } => quote!(#(#stmts)*),
    };
    let (run, predicate) = run_call(&krate, ret, args);
    let predicate = predicate.map(|p| quote!(#p,));
    // The whole call, `.await` included, is spanned at the return type: an
    // unfit return type is reported there, once.
    let run =
        quote_spanned!(ret.span()=> #run(#handle, #settings, #prepared, #predicate #body).await);

    let statements = quote! {
        #allow
        let #handle = #handle_expr;
        #allow
        let #settings = #settings_expr;
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

/// The call's settings: checked at compile time by the runtime's own rules
/// (a `const` block) when every duration is a literal, at run time otherwise.
fn settings_expr(krate: &Path, args: &Args) -> TokenStream {
    let duration = |d: &Duration| match d {
        Duration::Literal { millis, span } => {
            quote_spanned!(*span=> #krate::__private::millis(#millis))
        }
        Duration::Expr(expr) => expr.to_token_stream(),
    };
    let mut builder = quote!(#krate::__private::Settings::builder());
    let mut literal = true;
    for (method, arg) in [
        ("ttl", &args.ttl),
        ("lease", &args.lease),
        ("wait_timeout", &args.wait_timeout),
    ] {
        if let Some(arg) = arg {
            let method = Ident::new(method, arg.span);
            let value = duration(&arg.value);
            literal &= arg.value.literal().is_some();
            builder.extend(quote!(.#method(#value)));
        }
    }
    if args
        .on_conflict
        .as_ref()
        .is_some_and(|c| c.value == OnConflict::Reject)
    {
        builder.extend(quote!(.on_conflict(#krate::__private::OnConflict::Reject)));
    }
    if literal {
        quote!(const { #builder.build() })
    } else {
        quote!(#builder.build())
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
            quote_spanned!(span=> #krate::__private::run::<#ret, _>),
            None,
        ),
        Some(predicate) => (
            quote_spanned!(span=> #krate::__private::run_caching_errors::<#ret, _, _>),
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
