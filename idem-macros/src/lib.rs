//! The `#[idempotent]` attribute of [idem](https://docs.rs/idem-core). Use it
//! through `idem-core`, which re-exports it and documents every argument.
//!
//! The crate parses the attribute (`args`, `duration`), models the function
//! (`func`), checks the two together (`valid`, mirroring the runtime's rules
//! in `rules`) and rewrites the function (`expand`) into a call of
//! `idem_core`'s runtime API. A mistake is reported at the offending token,
//! and the function is still emitted unchanged so that its callers see no
//! follow-on errors.

use proc_macro::TokenStream;
use quote::ToTokens as _;

mod args;
mod duration;
mod expand;
mod func;
mod rules;
mod valid;

/// (The attribute is implemented in the `idem-macros` crate and used through
/// `idem-core`, which documents it.)
#[proc_macro_attribute]
pub fn idempotent(args: TokenStream, item: TokenStream) -> TokenStream {
    idempotent_impl(args.into(), item.into()).into()
}

fn idempotent_impl(
    args: proc_macro2::TokenStream,
    item: proc_macro2::TokenStream,
) -> proc_macro2::TokenStream {
    let func = match parse_function(item.clone()) {
        Ok(func) => func,
        Err(error) => {
            let mut out = error.to_compile_error();
            out.extend(item);
            return out;
        }
    };
    // On a mistake the function is emitted unchanged, so that its callers
    // see the attribute's error alone and no errors of their own.
    let args = match syn::parse2::<args::Args>(args) {
        Ok(args) => args,
        Err(error) => {
            let mut out = error.to_compile_error();
            out.extend(func.to_token_stream());
            return out;
        }
    };
    match valid::validate(&args, &func) {
        Ok(checked) => expand::expand(&args, &func, checked),
        Err(error) => {
            let mut out = error.to_compile_error();
            out.extend(expand::unchanged(&args, &func));
            out
        }
    }
}

/// The macro's copies of the runtime's rules, as a tuple: default TTL,
/// default lease, minimum lease and maximum duration, in milliseconds. Only
/// the test that pins them to the runtime's constants uses it.
#[doc(hidden)]
#[proc_macro]
pub fn __rules(_: TokenStream) -> TokenStream {
    rules::tokens().into()
}

/// The annotated function, or an error saying what the attribute is on
/// instead.
fn parse_function(item: proc_macro2::TokenStream) -> syn::Result<syn::ItemFn> {
    let parsed = syn::parse2::<syn::Item>(item.clone());
    if matches!(parsed, Ok(syn::Item::Verbatim(_)) | Err(_))
        && let Ok(method) = syn::parse2::<syn::TraitItemFn>(item.clone())
        && method.default.is_none()
    {
        return Err(syn::Error::new_spanned(
            &method.sig,
            "`#[idempotent]` wraps a function body, and this trait method has none; \
             put the attribute on the method in each `impl` instead",
        ));
    }
    match parsed {
        Ok(syn::Item::Fn(func)) => Ok(func),
        Ok(other) => {
            let what = match &other {
                syn::Item::Struct(_) => "a struct",
                syn::Item::Enum(_) => "an enum",
                syn::Item::Union(_) => "a union",
                syn::Item::Impl(_) => "an impl block; put it on each method instead",
                syn::Item::Trait(_) => "a trait; put it on the methods of each impl instead",
                syn::Item::Mod(_) => "a module",
                syn::Item::Static(_) | syn::Item::Const(_) => "a static or const",
                _ => "this item",
            };
            Err(syn::Error::new_spanned(
                item_head(&other),
                format!("`#[idempotent]` goes on an `async fn`, not on {what}"),
            ))
        }
        Err(error) => Err(error),
    }
}

/// The tokens that name an item, to point errors at it rather than at all
/// of it.
fn item_head(item: &syn::Item) -> proc_macro2::TokenStream {
    match item {
        syn::Item::Struct(s) => {
            let (token, ident) = (&s.struct_token, &s.ident);
            quote::quote!(#token #ident)
        }
        syn::Item::Enum(e) => {
            let (token, ident) = (&e.enum_token, &e.ident);
            quote::quote!(#token #ident)
        }
        syn::Item::Impl(i) => {
            let (token, ty) = (&i.impl_token, &i.self_ty);
            quote::quote!(#token #ty)
        }
        syn::Item::Trait(t) => {
            let (token, ident) = (&t.trait_token, &t.ident);
            quote::quote!(#token #ident)
        }
        other => other.to_token_stream(),
    }
}
