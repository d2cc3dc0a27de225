//! Compile-time behaviour of `#[idempotent]`: every misuse is a spanned error
//! (`ui/fail`, one rule a file, with its reviewed `.stderr`), and valid uses
//! compile (`ui/pass`).

#[test]
fn ui() {
    let cases = trybuild::TestCases::new();
    cases.pass("ui/pass/*.rs");
    cases.compile_fail("ui/fail/*.rs");
}

/// `transaction = tx` (feature `postgres`).
#[cfg(feature = "postgres")]
#[test]
fn ui_postgres() {
    let cases = trybuild::TestCases::new();
    cases.pass("ui/postgres/pass/*.rs");
    cases.compile_fail("ui/postgres/fail/*.rs");
}
