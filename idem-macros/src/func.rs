//! The annotated function as the expansion sees it: how its body is reached
//! (a plain `async fn`, or a method `#[async_trait]` already rewrote), what it
//! returns, and the names its parameters bind.

use proc_macro2::Span;
use syn::spanned::Spanned as _;
use syn::visit::Visit;
use syn::{
    Attribute, Expr, FnArg, GenericArgument, Ident, ItemFn, Pat, PathArguments, ReturnType, Stmt,
    Type, TypeParamBound,
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

/// A typed parameter: the names its pattern binds, its `cfg` attributes
/// (a parameter compiled out is not fingerprinted either), and its span.
pub(crate) struct Param {
    pub(crate) bindings: Vec<Ident>,
    pub(crate) cfgs: Vec<Attribute>,
    pub(crate) span: Span,
    /// Whether its type is (or names) one of the fn's type parameters or an
    /// `impl Trait`: rustc's help for an unfit generic then restricts it with
    /// the trait checked, which must be `Serialize`, not an idem trait.
    pub(crate) generic: bool,
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
                let cfgs = typed
                    .attrs
                    .iter()
                    .filter(|attr| attr.path().is_ident("cfg"))
                    .cloned()
                    .collect();
                Some(Param {
                    bindings,
                    cfgs,
                    span: typed.span(),
                    generic: names_generic(&typed.ty, &func.sig.generics),
                })
            }
            FnArg::Receiver(_) => None,
        })
        .collect()
}

/// Whether `ty` is or contains an `impl Trait` or one of `generics`' type
/// parameters.
fn names_generic(ty: &Type, generics: &syn::Generics) -> bool {
    struct Finder<'a> {
        params: Vec<&'a Ident>,
        found: bool,
    }
    impl Visit<'_> for Finder<'_> {
        fn visit_type_impl_trait(&mut self, _: &syn::TypeImplTrait) {
            self.found = true;
        }
        fn visit_type_path(&mut self, ty: &syn::TypePath) {
            if ty.qself.is_none()
                && let Some(first) = ty.path.segments.first()
                && self.params.contains(&&first.ident)
            {
                self.found = true;
            }
            syn::visit::visit_type_path(self, ty);
        }
    }
    let mut finder = Finder {
        params: generics.type_params().map(|param| &param.ident).collect(),
        found: false,
    };
    finder.visit_type(ty);
    finder.found
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

/// `T` and `E` of a return type written `Result<T, E>` (any path ending in
/// `Result` with two type arguments), so that each can be checked at its
/// own token. An alias (`io::Result<T>`, `AppResult<T>`) answers `None`.
pub(crate) fn result_parts(ret: &Type) -> Option<(&Type, &Type)> {
    let Type::Path(path) = ret else { return None };
    let segment = path.path.segments.last()?;
    if segment.ident != "Result" {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &segment.arguments else {
        return None;
    };
    let mut types = args.args.iter().filter_map(|arg| match arg {
        GenericArgument::Type(ty) => Some(ty),
        _ => None,
    });
    match (types.next(), types.next(), types.next()) {
        (Some(ok), Some(err), None) => Some((ok, err)),
        _ => None,
    }
}

/// What a return type is, when it is plainly not a `Result` (nor an alias of
/// one): a reference, a tuple, an array, or a well-known type.
pub(crate) fn plainly_not_result(ret: &Type) -> Option<String> {
    const NOT_RESULTS: &[&str] = &[
        "Option", "Vec", "String", "Box", "Arc", "Rc", "HashMap", "BTreeMap", "HashSet", "bool",
        "char", "str", "u8", "u16", "u32", "u64", "u128", "usize", "i8", "i16", "i32", "i64",
        "i128", "isize", "f32", "f64", "Json", "Response",
    ];
    match ret {
        Type::Reference(_) => Some("a reference".to_owned()),
        Type::Tuple(tuple) if tuple.elems.is_empty() => Some("`()`".to_owned()),
        Type::Tuple(_) => Some("a tuple".to_owned()),
        Type::Array(_) | Type::Slice(_) => Some("an array".to_owned()),
        Type::Path(path) if path.qself.is_none() => {
            let last = path.path.segments.last()?;
            NOT_RESULTS
                .contains(&last.ident.to_string().as_str())
                .then(|| format!("`{}`", type_text(ret)))
        }
        _ => None,
    }
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

/// A type as its user wrote it, without the spaces of a token stream.
pub(crate) fn type_text(ty: &Type) -> String {
    let mut text = quote::ToTokens::to_token_stream(ty).to_string();
    for (spaced, tight) in [
        (" < ", "<"),
        (" <", "<"),
        ("< ", "<"),
        (" >", ">"),
        (" :: ", "::"),
        (":: ", "::"),
        (" ,", ","),
        ("& ", "&"),
        ("' ", "'"),
    ] {
        text = text.replace(spaced, tight);
    }
    text
}

/// Whether `stmts` call a function named `step` (`step(…)`,
/// `idem_core::step(…)`), inside macros too: the body then runs journaled
/// steps, and its call reads the journal with its claim. A method named
/// `step` (`.step(…)`) or a `fn step(…)` is not such a call. A call this
/// misses (`step` called through a helper fn, or renamed by `use … as`)
/// reads its journal at its first step instead, a round trip of its own,
/// and is held as a call without steps is (the README's "Compensation is
/// learned by replay"): a body that returns `Ok` before its first step
/// stores its result over an unfinished compensation, and one reused with
/// other arguments runs up to its first step. `Settings::expect_steps`
/// makes such a call read its journal with its claim.
pub(crate) fn calls_step(stmts: &[Stmt]) -> bool {
    use proc_macro2::{Delimiter, TokenStream, TokenTree};
    use quote::ToTokens as _;

    fn scan(tokens: TokenStream) -> bool {
        let mut before: Option<TokenTree> = None;
        let mut tokens = tokens.into_iter().peekable();
        while let Some(token) = tokens.next() {
            match &token {
                TokenTree::Ident(ident) if ident == "step" => {
                    let called = matches!(
                        tokens.peek(),
                        Some(TokenTree::Group(group)) if group.delimiter() == Delimiter::Parenthesis
                    );
                    let method_or_item = match &before {
                        Some(TokenTree::Punct(punct)) => punct.as_char() == '.',
                        Some(TokenTree::Ident(ident)) => ident == "fn",
                        _ => false,
                    };
                    if called && !method_or_item {
                        return true;
                    }
                }
                TokenTree::Group(group) if scan(group.stream()) => return true,
                _ => {}
            }
            before = Some(token);
        }
        false
    }

    stmts.iter().any(|stmt| scan(stmt.to_token_stream()))
}
