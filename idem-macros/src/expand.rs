//! Rewriting the function: its signature stays, its body becomes a call of
//! the runtime's `__private::run` with the user's statements as the body
//! future.
//!
//! Every requirement on the user's types is checked once, by a call of one
//! of `idem_core::requirements`' traits spanned at the token the user wrote
//! (the `Ok` type, the error type, an argument, the `key`, the `store`); what
//! the checks produce is passed to `run` as plain values, so that no bound is
//! checked twice and each mistake is one error, at its token.

use proc_macro2::{Span, TokenStream};
use quote::{ToTokens as _, quote, quote_spanned};
use syn::ext::IdentExt as _;
use syn::spanned::Spanned as _;
use syn::visit_mut::VisitMut as _;
use syn::{Expr, Ident, ItemFn, Path, Type};

use crate::args::{Args, CacheErrors, Duration, OnConflict};
use crate::func::{self, Shape};
use crate::valid::Checked;

/// Lints the generated statements may trip in a user's crate; the user's own
/// tokens (statements, expressions) keep every lint.
fn allowances() -> TokenStream {
    quote! {
        #[allow(
            unused_qualifications,
            clippy::used_underscore_binding,
            clippy::needless_borrow,
            clippy::no_effect_underscore_binding,
            clippy::items_after_statements,
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
        transaction,
    } = checked;
    // Every generated path goes through one import of the runtime, spanned
    // at `crate = "…"`: a path that is not idem's runtime is one error there,
    // and the paths through the failed import raise none of their own.
    let (runtime_path, runtime_span) = args.krate.as_ref().map_or_else(
        || (syn::parse_quote!(::idem_core), Span::call_site()),
        |arg| (arg.value.clone(), arg.value.span()),
    );
    let runtime_path: Path = runtime_path;
    let runtime = Ident::new("__idem_runtime", Span::call_site());
    let import = respan(
        quote!(use #runtime_path::idem_runtime as #runtime;),
        runtime_span,
    );
    let krate: Path = syn::parse_quote!(#runtime);
    let allow = allowances();
    let handle = hidden("__idem_handle");
    let settings = hidden("__idem_settings");
    let call = hidden("__idem_call");
    let prepared = hidden("__idem_prepared");
    let body = hidden("__idem_body");
    let fake = hidden("__idem_return");
    let ok_codec = hidden("__idem_ok");
    let from_idem = hidden("__idem_from");
    let shape_of = hidden("__idem_shape");

    // The handle, or with `transaction = tx` the PostgreSQL store.
    let handle_expr = match &args.store {
        Some(store) => {
            let expr = &store.value;
            let path = if transaction.is_some() {
                quote!(#krate::requirements::TransactionalStore::postgres)
            } else {
                quote!(#krate::AsIdempotency::as_idempotency)
            };
            let path = respan(path, expr.span());
            let arg = by_reference(expr);
            // An owned clone (a reference count), so that no borrow of the
            // handle's place (`self.idem`) outlives this statement: a
            // `&mut self` body may use `self` freely, and `store =
            // self.idem.clone()` borrows no temporary past it.
            let clone = respan(quote!(::core::clone::Clone::clone), expr.span());
            quote_spanned!(expr.span()=> #clone(#path(#arg)))
        }
        None => quote!(::core::clone::Clone::clone(#krate::__private::default_handle())),
    };
    let start = match &args.name {
        // A pinned name is registered with the function it belongs to, so
        // that a second function pinning it is refused.
        Some(name) => {
            let name = &name.value;
            let pin = hidden("__IDEM_PINNED");
            let ident = func.sig.ident.to_string();
            quote! {{
                static #pin: #krate::__private::Pinned = #krate::__private::Pinned::new(
                    #name,
                    ::core::concat!(
                        ::core::module_path!(), "::", #ident,
                        " (", ::core::file!(), ":", ::core::line!(), ")"
                    ),
                );
                #krate::__private::Call::pinned(&#pin)
            }}
        }
        // A closure's type name carries the path of the function it is in,
        // with the `Self` type and every generic argument of this instance:
        // `shop::Repo<shop::Invoice>::create`, `<shop::Card as
        // shop::Ledger>::record`, `shop::publish<shop::Shipped>`.
        // The place it is written tells two fns apart whose names print
        // alike (one name in two blocks of one scope).
        None => {
            let site = hidden("__idem_site");
            let written = hidden("__IDEM_SITE");
            let ident = func.sig.ident.to_string();
            quote! {{
                static #written: #krate::__private::Site = #krate::__private::Site::new(
                    ::core::concat!(
                        ::core::module_path!(), "::", #ident,
                        " (", ::core::file!(), ":", ::core::line!(), ":", ::core::column!(), ")"
                    ),
                    ::core::option_env!("CARGO_PKG_VERSION"),
                );
                let #site = || ();
                #krate::__private::Call::at(&#written, ::core::any::type_name_of_val(&#site))
            }}
        }
    };
    // A fn pinned to a name: every instance of a generic impl (or of an
    // impl of a generic trait) shares the name, and the impl's type
    // parameters are out of the attribute's sight, so the instance, as a
    // closure's type name tells it, is part of the fingerprint when it has
    // generic arguments besides the fn's own.
    let instance = args.name.is_some().then(|| {
        let site = hidden("__idem_instance");
        // An `impl Trait` argument is a type parameter of the fn's own too
        // (an anonymous one, in the instance's generic arguments): a
        // parameter whose type is generic tells it, skipped or not.
        let own_generics = func
            .sig
            .generics
            .params
            .iter()
            .any(|param| !matches!(param, syn::GenericParam::Lifetime(_)))
            || func::params(func).iter().any(|param| param.generic);
        quote! {
            let #site = || ();
            #call.generic_instance(::core::any::type_name_of_val(&#site), #own_generics);
        }
    });
    // An argument that is also the key (or a key element, or the scope),
    // as it is written, is checked once, as the key (or scope): its value
    // is taken as a `&dyn` hashable there, and hashed through it as an
    // argument and as the key, so that one missing `Serialize` is one
    // error, not one per use.
    let mut erased: Vec<(Ident, Ident, TokenStream)> = Vec::new();
    let mut erase = |expr: &Expr, method: TokenStream| {
        // The name as written in the attribute, so that an error points
        // there (and not across to the parameter).
        let (binding, written) = bare_binding(expr, &fingerprinted)?;
        if let Some((_, var, _)) = erased.iter().find(|(b, _, _)| *b == binding) {
            return Some(var.clone());
        }
        let var = hidden(&format!("__idem_erased_{}", binding.unraw()));
        let path = respan(method, expr.span());
        let creation = quote_spanned!(expr.span()=> let #var = #path(&#written););
        erased.push((binding, var.clone(), creation));
        Some(var)
    };
    let key_erased: Vec<Option<Ident>> = match args.key.as_ref().map(|arg| &arg.value) {
        Some(Expr::Tuple(tuple)) if !tuple.elems.is_empty() => tuple
            .elems
            .iter()
            .map(|elem| erase(elem, quote!(#krate::requirements::KeyValue::erased)))
            .collect(),
        Some(expr) => vec![erase(expr, quote!(#krate::requirements::KeyValue::erased))],
        None => Vec::new(),
    };
    let scope_erased = args
        .scope
        .as_ref()
        .and_then(|arg| erase(&arg.value, quote!(#krate::requirements::ScopeValue::erased)));
    let erasures = erased.iter().map(|(_, _, creation)| creation);
    let erased_var = |binding: &Ident| {
        erased
            .iter()
            .find(|(b, _, _)| b == binding)
            .map(|(_, var, _)| var.clone())
    };
    let fingerprint = fingerprinted.iter().flat_map(|param| {
        let (call, krate, cfgs) = (&call, &krate, &param.cfgs);
        let erased_var = &erased_var;
        param.bindings.iter().map(move |binding| {
            if let Some(var) = erased_var(binding) {
                let method = if param.generic {
                    quote!(typed_argument)
                } else {
                    quote!(argument)
                };
                quote_spanned! {param.span=>
                    #(#cfgs)*
                    #var.#method(&mut #call);
                }
            } else if param.generic {
                quote_spanned! {param.span=>
                    #(#cfgs)*
                    #krate::requirements::serialize_or_skip(&#binding, &mut #call);
                }
            } else {
                quote_spanned! {param.span=>
                    #(#cfgs)*
                    #krate::requirements::Argument::fingerprint(&#binding, &mut #call);
                }
            }
        })
    });
    let scope = args.scope.as_ref().map(|arg| {
        let expr = &arg.value;
        if let Some(var) = &scope_erased {
            return quote_spanned!(expr.span()=> #var.scope(&mut #call););
        }
        let path = respan(quote!(#krate::requirements::ScopeValue::scope), expr.span());
        let scope = by_reference(expr);
        quote_spanned!(expr.span()=> #path(#scope, &mut #call);)
    });
    let key = args.key.as_ref().map(|arg| match &arg.value {
        // A tuple key is hashed element by element (as the whole tuple
        // would be), so that an unfit element is reported at its token.
        Expr::Tuple(tuple) if !tuple.elems.is_empty() => {
            let elements = tuple.elems.iter().zip(&key_erased).map(|(elem, erased)| {
                if let Some(var) = erased {
                    return quote_spanned!(elem.span()=> #var.key_element(&mut #call););
                }
                let path = respan(
                    quote!(#krate::requirements::KeyValue::key_element),
                    elem.span(),
                );
                let element = by_reference(elem);
                quote_spanned!(elem.span()=> #path(#element, &mut #call);)
            });
            quote! {
                #call.key_tuple();
                #(#elements)*
                #call.key_tuple_end();
            }
        }
        expr => {
            if let Some(Some(var)) = key_erased.first() {
                return quote_spanned!(expr.span()=> #var.key(&mut #call););
            }
            let path = respan(quote!(#krate::requirements::KeyValue::key), expr.span());
            let key = by_reference(expr);
            quote_spanned!(expr.span()=> #path(#key, &mut #call);)
        }
    });
    // `#[async_trait]` takes a destructured argument as a positional one
    // and destructures it in the body: the bindings a `key` or `scope` may
    // name are bound here too, by reference.
    let destructured: Vec<TokenStream> = match &shape {
        Shape::AsyncTrait { stmts, .. } => stmts.iter().filter_map(destructuring).collect(),
        Shape::Async { .. } => Vec::new(),
    };
    let keyed = args.key.is_some();
    let checked = args.fingerprint.as_ref().is_none_or(|f| f.value);
    let body_stmts: &[syn::Stmt] = match &shape {
        Shape::Async { .. } => &func.block.stmts,
        Shape::AsyncTrait { stmts, .. } => stmts,
    };
    let settings_expr = settings_expr(&krate, args, crate::func::calls_step(body_stmts));

    let ret = shape.ret();
    let (ok, err) = result_types(ret);
    let user_body = match &shape {
        Shape::Async { .. } => {
            // The user's statements, in a scope of their own, without braces
            // of ours around them (which would trip `unused_braces`). A
            // never-taken return of the declared type drives inference of
            // `?` and early returns.
            // After the items the body starts with, so that the
            // never-taken return is not a statement before them
            // (`items_after_statements`): nothing moves.
            let leading = func
                .block
                .stmts
                .iter()
                .take_while(|stmt| matches!(stmt, syn::Stmt::Item(_)))
                .count();
            let (items, stmts) = func.block.stmts.split_at(leading);
            // A `mut` argument is a variable of the body's own, as in an
            // `async fn`: a block that captured it would take a field
            // assigned and never read again (`request.note = …`, to drop it
            // early) for a dead assignment. (`mut self` cannot be bound
            // again: see `body_allow`.)
            let rebound = mut_arguments(&func.sig, transaction).map(
                |(cfgs, mutability, ident)| {
                    quote!(#(#cfgs)* #[allow(clippy::shadow_same)] let #mutability #ident = #ident;)
                },
            );
            quote! {
                #(#items)*
                #(#rebound)*
                #[allow(unused_qualifications)]
                if let ::core::option::Option::Some(#fake) = ::core::option::Option::None::<#ret> {
                    #[allow(unreachable_code)]
                    return #fake;
                }
                #(#stmts)*
            }
        }
        Shape::AsyncTrait { stmts, .. } => {
            let stmts = quiet_moves(stmts, &attribute_idents(args));
            quote!(#(#stmts)*)
        }
    };
    // The user's statements keep every lint; those `#[async_trait]` wrote
    // around them (moves of the arguments into the future) do not.
    let body_allow = match &shape {
        // A `mut self` taken by value is captured by the body's block, which
        // would take a field assigned and never read again (`self.conn =
        // None`, to drop it early) for a dead assignment, as an `async fn`
        // does not.
        Shape::Async { .. } if by_value_mut_self(&func.sig) => {
            quote!(#[allow(unused_assignments)])
        }
        Shape::Async { .. } => quote!(),
        Shape::AsyncTrait { .. } => allow.clone(),
    };
    let shape_check = quote_spanned!(ret.span()=> <#ret as #krate::requirements::Returns>::shape());
    let ok_check = quote_spanned!(ok.span()=> <#ok as #krate::requirements::StoredValue>::codec());
    let err_check =
        quote_spanned!(err.span()=> <#err as #krate::requirements::FromIdemError>::converter());
    // With `cache_errors`: the error's codec and the predicate, each
    // checked at the user's token.
    let cached = hidden("__idem_cached");
    let caches = hidden("__idem_caches");
    let caching = args.cache_errors.as_ref().and_then(|c| match &c.value {
        CacheErrors::None => None,
        predicate => {
            let predicate = match predicate {
                CacheErrors::Predicate(path) => path.to_token_stream(),
                _ => quote!(#krate::__private::cache_all),
            };
            let error = hidden("__idem_error");
            let cached_check =
                quote_spanned!(err.span()=> <#err as #krate::requirements::CachedError>::codec());
            let span = predicate.span();
            let caches_path = respan(quote!(#krate::requirements::CachePredicate), span);
            let predicate_check = if func::result_parts(ret).is_some() {
                quote_spanned! {span=>
                    move |#error: &#err| #caches_path::<#err>::caches(&#predicate, #error)
                }
            } else {
                // An alias of `Result`: the closure's error type is read
                // from the shape the return type was checked as, so that a
                // predicate of another type is one error at its token.
                let typed = respan(quote!(#krate::requirements::error_predicate), span);
                let caches = respan(quote!(#krate::requirements::caches), span);
                quote_spanned! {span=>
                    #typed(&#shape_of, move |#error| #caches(#error, &#predicate))
                }
            };
            Some(quote! {
                #allow
                let #cached = #cached_check;
                #allow
                let #caches = #predicate_check;
            })
        }
    });
    let run = match (transaction, &caching) {
        (None, None) => quote! {
            #body_allow
            // `move`: the arguments were read for the key and fingerprint
            // already; the body owns them, as an `async fn` body does.
            let #body = async move { #user_body };
            #krate::__private::run(
                &#handle, #settings, #prepared, #shape_of, #ok_codec, #from_idem, #body,
            ).await
        },
        (None, Some(caching)) => quote! {
            #caching
            #body_allow
            // `move`: the arguments were read for the key and fingerprint
            // already; the body owns them, as an `async fn` body does.
            let #body = async move { #user_body };
            #krate::__private::run_caching_errors(
                &#handle, #settings, #prepared, #shape_of, #ok_codec, #from_idem, #cached,
                #caches, #body,
            ).await
        },
        (Some(index), _) => {
            let codec = hidden("__idem_codec");
            let claim = hidden("__idem_claim");
            let done = hidden("__idem_done");
            let result = hidden("__idem_result");
            let cache = match &caching {
                Some(_) => quote!(::core::option::Option::Some((#cached, #caches))),
                None => quote!(::core::option::Option::<(_, fn(&_) -> bool)>::None),
            };
            let syn::FnArg::Typed(tx) = &func.sig.inputs[index] else {
                unreachable!("validated: a typed parameter")
            };
            let (tx_pat, tx_ty) = (&tx.pat, &tx.ty);
            let parameter = respan(
                quote!(#krate::requirements::TransactionParameter),
                tx_ty.span(),
            );
            let syn::Pat::Ident(tx_binding) = &**tx_pat else {
                unreachable!("validated: the transaction parameter is a name")
            };
            let tx_ident = &tx_binding.ident;
            let connection = quote_spanned! {tx_ty.span()=>
                <#tx_ty as #parameter<'_>>::from_connection(#tx_ident)
            };
            let feature_span = args
                .transaction
                .as_ref()
                .map_or_else(Span::call_site, |t| t.span);
            let feature = respan(
                quote!(<#krate::requirements::TransactionalMode as #krate::requirements::PostgresFeature>::enabled),
                feature_span,
            );
            quote! {
                #caching
                #allow
                #feature();
                let mut #codec = #krate::__private::codec(#ok_codec, #from_idem, #cache);
                match #krate::__private::transaction_open(&#handle, #settings, #prepared, &mut #codec).await {
                    #krate::__private::Opened::Done(#done) => (#shape_of.from_result)(#done),
                    #krate::__private::Opened::Claimed(mut #claim) => {
                        // The body is an async closure that gets the
                        // connection as its parameter: `tx` borrows from
                        // the parameter, as it would in a plain `async fn`,
                        // so a misuse (moving it into a spawned task) is
                        // one error about `tx`.
                        #body_allow
                        let #result = #krate::__private::transaction_body(
                            &mut #claim,
                            async move |#tx_ident: &mut #krate::requirements::Connection| {
                                #allow
                                let #tx_pat: #tx_ty = #connection;
                                #user_body
                            },
                        )
                        .await;
                        (#shape_of.from_result)(
                            #krate::__private::transaction_finish(
                                #claim,
                                (#shape_of.into_result)(#result),
                                #codec,
                            )
                            .await,
                        )
                    }
                }
            }
        }
    };

    let statements = quote! {
        #[allow(unused_imports)]
        #import
        #allow
        let #handle = #handle_expr;
        #allow
        let #settings = #settings_expr;
        #allow
        let #prepared = {
            let mut #call = #start;
            #instance
            #(#erasures)*
            #(#fingerprint)*
            #(#destructured)*
            #scope
            #key
            #call.finish(#keyed, #checked)
        };
        #allow
        let #shape_of = #shape_check;
        #allow
        let #ok_codec = #ok_check;
        #allow
        let #from_idem = #err_check;
        #run
    };

    let (inner_attrs, outer_attrs): (Vec<_>, Vec<_>) = func
        .attrs
        .iter()
        .partition(|attr| matches!(attr.style, syn::AttrStyle::Inner(_)));
    let vis = &func.vis;
    // With `transaction = tx`, idem provides `tx`: it leaves the signature.
    let mut sig = func.sig.clone();
    if let Some(index) = transaction {
        sig.inputs = sig
            .inputs
            .into_iter()
            .enumerate()
            .filter(|(i, _)| *i != index)
            .map(|(_, input)| input)
            .collect();
    }
    // A `mut` argument bound again in the body is not mutated here (unless
    // a key expression does): its `mut` is judged in the body.
    if matches!(shape, Shape::Async { .. }) {
        for input in &mut sig.inputs {
            if let syn::FnArg::Typed(typed) = input
                && is_mut_binding(&typed.pat)
            {
                typed.attrs.push(syn::parse_quote!(#[allow(unused_mut)]));
            }
        }
    }
    let statements = match shape {
        Shape::Async { .. } => statements,
        Shape::AsyncTrait { .. } => {
            quote!(::std::boxed::Box::pin(async move { #statements }))
        }
    };
    // The body keeps the user's braces, so the item's span stays the user's
    // and lints about the item itself (`dead_code`) still reach them.
    let mut out_body = TokenStream::new();
    func.block.brace_token.surround(&mut out_body, |out| {
        out.extend(quote!(#(#inner_attrs)* #statements));
    });
    quote! {
        #(#outer_attrs)*
        #vis #sig #out_body
    }
}

/// For a statement by which `#[async_trait]` destructures a positional
/// argument (`let (a, b) = { let __arg1 = __arg1; __arg1 };`), the same
/// pattern bound to a reference to the argument, for the attribute's
/// expressions; `None` for any other statement. What a pattern says of how
/// it binds (`mut`, `ref`, `&`) is left out: matched against a reference,
/// every name binds by reference, and nothing moves out of the argument.
fn destructuring(stmt: &syn::Stmt) -> Option<TokenStream> {
    let syn::Stmt::Local(local) = stmt else {
        return None;
    };
    let init = local.init.as_ref()?;
    let Expr::Block(block) = &*init.expr else {
        return None;
    };
    let [
        syn::Stmt::Local(inner),
        syn::Stmt::Expr(Expr::Path(moved), None),
    ] = block.block.stmts.as_slice()
    else {
        return None;
    };
    let syn::Pat::Ident(positional) = &inner.pat else {
        return None;
    };
    if !moved.path.is_ident(&positional.ident) || !positional.ident.to_string().starts_with("__arg")
    {
        return None;
    }
    let mut pat = local.pat.clone();
    PlainBindings.visit_pat_mut(&mut pat);
    let argument = &positional.ident;
    let cfgs = local
        .attrs
        .iter()
        .filter(|attr| attr.path().is_ident("cfg"));
    Some(quote! {
        #(#cfgs)*
        #[allow(unused_variables)]
        let #pat = &#argument;
    })
}

/// Leaves out of a pattern what it says of how it binds: `mut` and `ref`
/// on its names, and its `&` patterns (which, matched against a reference,
/// the default binding mode already looks through). Binding modifiers
/// under a by-reference default mode are an error in edition 2024.
struct PlainBindings;

impl syn::visit_mut::VisitMut for PlainBindings {
    fn visit_pat_mut(&mut self, pat: &mut syn::Pat) {
        if let syn::Pat::Reference(reference) = pat {
            *pat = (*reference.pat).clone();
            return self.visit_pat_mut(pat);
        }
        syn::visit_mut::visit_pat_mut(self, pat);
    }

    fn visit_pat_ident_mut(&mut self, ident: &mut syn::PatIdent) {
        ident.by_ref = None;
        ident.mutability = None;
        syn::visit_mut::visit_pat_ident_mut(self, ident);
    }
}

/// Whether `pat` binds a `mut` variable by value: `mut request`.
fn is_mut_binding(pat: &syn::Pat) -> bool {
    matches!(pat, syn::Pat::Ident(ident)
        if ident.mutability.is_some() && ident.by_ref.is_none() && ident.subpat.is_none())
}

/// The arguments bound as `mut` variables by value, with their `cfg`s and
/// their `mut`; not the transaction's connection (at `transaction`), which
/// idem binds in the body itself.
fn mut_arguments(
    sig: &syn::Signature,
    transaction: Option<usize>,
) -> impl Iterator<Item = (Vec<&syn::Attribute>, &syn::token::Mut, &Ident)> {
    sig.inputs
        .iter()
        .enumerate()
        .filter(move |(index, _)| Some(*index) != transaction)
        .filter_map(|(_, input)| match input {
            syn::FnArg::Typed(typed) if is_mut_binding(&typed.pat) => match &*typed.pat {
                syn::Pat::Ident(ident) => {
                    let cfgs = typed
                        .attrs
                        .iter()
                        .filter(|attr| attr.path().is_ident("cfg"))
                        .collect();
                    Some((cfgs, ident.mutability.as_ref()?, &ident.ident))
                }
                _ => None,
            },
            _ => None,
        })
}

/// Whether the receiver is `mut self` (by value).
fn by_value_mut_self(sig: &syn::Signature) -> bool {
    sig.inputs.iter().any(|input| {
        matches!(input, syn::FnArg::Receiver(receiver)
            if receiver.reference.is_none() && receiver.mutability.is_some())
    })
}

/// The function unchanged, for when the attribute is wrong, with the
/// attribute's expressions referenced in a block that never runs, so that
/// what they use (an imported `Duration`, a predicate) raises no warnings of
/// its own beside the attribute's error.
pub(crate) fn unchanged(args: &Args, func: &ItemFn) -> TokenStream {
    let mut exprs: Vec<TokenStream> = Vec::new();
    for arg in [&args.key, &args.scope, &args.store].into_iter().flatten() {
        exprs.push(arg.value.to_token_stream());
    }
    for arg in [&args.ttl, &args.lease, &args.wait_timeout]
        .into_iter()
        .flatten()
    {
        if let Some(expr) = arg.value.expr() {
            exprs.push(expr.to_token_stream());
        }
    }
    if let Some(arg) = &args.cache_errors
        && let CacheErrors::Predicate(path) = &arg.value
    {
        exprs.push(path.to_token_stream());
    }
    // `transaction = tx` takes `tx` out of the signature: it stays out, so
    // that callers written for the fixed function raise no errors of their
    // own, and the body gets a stand-in of its type (never run).
    let mut sig = func.sig.clone();
    let mut stand_in = TokenStream::new();
    if let Some(tx) = &args.transaction
        && func.sig.constness.is_none()
    {
        let position = sig.inputs.iter().position(|input| match input {
            syn::FnArg::Typed(typed) => {
                matches!(&*typed.pat, syn::Pat::Ident(ident) if ident.ident == tx.value)
            }
            syn::FnArg::Receiver(_) => false,
        });
        if let Some(position) = position {
            let removed: Vec<_> = std::mem::take(&mut sig.inputs).into_iter().collect();
            for (i, input) in removed.into_iter().enumerate() {
                if i == position {
                    if let syn::FnArg::Typed(typed) = input {
                        let (pat, ty) = (&typed.pat, &typed.ty);
                        stand_in = quote! {
                            #[allow(unused, clippy::all)]
                            let #pat: #ty = (|| ::core::panic!())();
                        };
                    }
                } else {
                    sig.inputs.push(input);
                }
            }
        }
    }
    if (exprs.is_empty() && stand_in.is_empty()) || func.sig.constness.is_some() {
        return func.to_token_stream();
    }
    let (attrs, vis, stmts) = (&func.attrs, &func.vis, &func.block.stmts);
    let mut body = TokenStream::new();
    func.block.brace_token.surround(&mut body, |out| {
        out.extend(quote! {
            #stand_in
            #[allow(unused, clippy::all)]
            let _ = async { #(let _ = &(#exprs);)* };
            #(#stmts)*
        });
    });
    quote!(#(#attrs)* #vis #sig #body)
}

/// `T` and `E` of the return type: the tokens the user wrote for
/// `Result<T, E>`, so that each check is reported at its own token, or, for
/// an alias, `_`, inferred from the return type's shape and spanned at it.
fn result_types(ret: &Type) -> (TokenStream, TokenStream) {
    match func::result_parts(ret) {
        Some((ok, err)) => (ok.to_token_stream(), err.to_token_stream()),
        None => (
            quote_spanned!(ret.span()=> _),
            quote_spanned!(ret.span()=> _),
        ),
    }
}

/// The call's settings: checked at compile time by the runtime's own rules
/// (a `const` block) when every duration is a literal, at run time otherwise.
/// A body that calls `step` (`steps`) reads its journal with its claim.
fn settings_expr(krate: &Path, args: &Args, steps: bool) -> TokenStream {
    let duration = |d: &Duration| match d {
        Duration::Literal { millis, span } => {
            quote_spanned!(*span=> #krate::__private::millis(#millis))
        }
        Duration::Const { expr, .. } => expr.to_token_stream(),
        Duration::Expr(expr) => {
            let path = respan(
                quote!(#krate::requirements::DurationValue::duration),
                expr.span(),
            );
            quote_spanned!(expr.span()=> #path(#expr))
        }
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
    if let Some(isolation) = &args.isolation {
        let variant = Ident::new(isolation.value.variant(), isolation.span);
        builder.extend(quote!(.isolation(#krate::__private::Isolation::#variant)));
    }
    if steps {
        builder.extend(quote!(.expect_steps(true)));
    }
    if literal {
        quote!(const { #builder.build() })
    } else {
        quote!(#builder.build())
    }
}

/// The parameter `expr` names, and the name as written, when `expr` is just
/// the name of one of the fingerprinted parameters (not one that a `cfg`
/// may compile out).
fn bare_binding(expr: &Expr, fingerprinted: &[func::Param]) -> Option<(Ident, Ident)> {
    let mut expr = expr;
    while let Expr::Paren(inner) = expr {
        expr = &inner.expr;
    }
    let Expr::Path(path) = expr else { return None };
    if path.qself.is_some() || !path.attrs.is_empty() {
        return None;
    }
    let ident = path.path.get_ident()?;
    fingerprinted
        .iter()
        .filter(|param| param.cfgs.is_empty())
        .flat_map(|param| &param.bindings)
        .find(|binding| *binding == ident)
        .map(|binding| (binding.clone(), ident.clone()))
}

/// A reference to the value of `expr`, taken without moving out of the
/// arguments: a tuple `(a, b)` becomes `&(&a, &b)`, which serializes the
/// same. Where precedence allows, no parentheses of ours surround the user's
/// tokens, so that an error about the value spans all of them.
fn by_reference(expr: &Expr) -> TokenStream {
    match expr {
        Expr::Paren(inner) => by_reference(&inner.expr),
        Expr::Tuple(tuple) if !tuple.elems.is_empty() => {
            let elems = tuple.elems.iter().map(by_reference);
            quote_spanned!(expr.span()=> &(#(#elems,)*))
        }
        // Already a reference: taking another would borrow a temporary.
        Expr::Reference(reference) if reference.mutability.is_none() => expr.to_token_stream(),
        Expr::Path(_)
        | Expr::Field(_)
        | Expr::MethodCall(_)
        | Expr::Call(_)
        | Expr::Index(_)
        | Expr::Lit(_)
        | Expr::Macro(_) => quote_spanned!(expr.span()=> &#expr),
        _ => quote_spanned!(expr.span()=> &(#expr)),
    }
}

/// `tokens` with every span set to `span`: a path of ours reported where
/// the user's expression is, not at the attribute.
fn respan(tokens: TokenStream, span: Span) -> TokenStream {
    tokens
        .into_iter()
        .map(|mut tree| {
            if let proc_macro2::TokenTree::Group(group) = &tree {
                let mut inner =
                    proc_macro2::Group::new(group.delimiter(), respan(group.stream(), span));
                inner.set_span(span);
                tree = inner.into();
            } else {
                tree.set_span(span);
            }
            tree
        })
        .collect()
}

/// The names the attribute's expressions (`key`, `scope`, `store`) use.
fn attribute_idents(args: &Args) -> std::collections::HashSet<String> {
    fn walk(tokens: TokenStream, out: &mut std::collections::HashSet<String>) {
        for tree in tokens {
            match tree {
                proc_macro2::TokenTree::Ident(ident) => {
                    out.insert(ident.to_string());
                }
                proc_macro2::TokenTree::Group(group) => walk(group.stream(), out),
                _ => {}
            }
        }
    }
    let mut out = std::collections::HashSet::new();
    for arg in [&args.key, &args.scope, &args.store].into_iter().flatten() {
        walk(arg.value.to_token_stream(), &mut out);
    }
    out
}

/// `#[async_trait]` moves each argument into its future with `let x = x;`;
/// an argument that only the attribute uses (`key = key`) is read before
/// that move, so the moved binding is unused. Those moves, and only those,
/// are allowed to be unused: an argument nobody uses still warns.
fn quiet_moves(stmts: &[syn::Stmt], used: &std::collections::HashSet<String>) -> Vec<syn::Stmt> {
    stmts
        .iter()
        .map(|stmt| {
            let mut stmt = stmt.clone();
            if let syn::Stmt::Local(local) = &mut stmt
                && let Some(init) = &local.init
                && let Expr::Path(from) = &*init.expr
                && let Some(from) = from.path.get_ident()
                && let syn::Pat::Ident(to) = &local.pat
                && to.ident == *from
                && used.contains(&from.to_string())
            {
                local
                    .attrs
                    .push(syn::parse_quote!(#[allow(unused_variables)]));
            }
            stmt
        })
        .collect()
}
