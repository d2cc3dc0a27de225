//! The annotated function as the expansion sees it: how its body is reached
//! (a plain `async fn`, or a method `#[async_trait]` already rewrote), what it
//! returns, and the names its parameters bind.

use proc_macro2::Span;
use syn::spanned::Spanned as _;
use syn::visit::Visit;
use syn::{
    Expr, FnArg, GenericArgument, Ident, ItemFn, Pat, PathArguments, ReturnType, Stmt, Type,
    TypeParamBound,
};

/// How the function's body is reached.
pub(crate) enum Shape {
    /// An `async fn`: its block becomes the body.
    Async { ret: Type },
    /// A method `#[async_trait]` already rewrote into
    /// `fn …(…) -> Pin<Box<dyn Future<Output = R> + …>> { Box::pin(async move { … }) }`:
    /// the inner async block's statements become the body.
    AsyncTrait { ret: Type, stmts: Vec<Stmt> },
}

impl Shape {
    /// The type the caller awaits: `R`.
    pub(crate) fn ret(&self) -> &Type {
        match self {
            Self::Async { ret } | Self::AsyncTrait { ret, .. } => ret,
        }
    }
}

/// A typed parameter: the names its pattern binds, and its span.
pub(crate) struct Param {
    pub(crate) bindings: Vec<Ident>,
    pub(crate) span: Span,
}

/// The typed parameters of `func` (not `self`), in order.
pub(crate) fn params(func: &ItemFn) -> Vec<Param> {
    func.sig
        .inputs
        .iter()
        .filter_map(|input| match input {
            FnArg::Typed(typed) => {
                let mut bindings = Vec::new();
                collect_bindings(&typed.pat, &mut bindings);
                Some(Param {
                    bindings,
                    span: typed.span(),
                })
            }
            FnArg::Receiver(_) => None,
        })
        .collect()
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

/// The declared return type of an `async fn`, if it declares one.
pub(crate) fn declared_return(func: &ItemFn) -> Option<&Type> {
    match &func.sig.output {
        ReturnType::Type(_, ty) => Some(ty),
        ReturnType::Default => None,
    }
}

/// Recognises a method `#[async_trait]` rewrote.
pub(crate) fn async_trait_shape(func: &ItemFn) -> Option<Shape> {
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
