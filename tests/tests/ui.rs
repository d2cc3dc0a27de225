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

/// `transaction = tx` without the `postgres` feature: one error, naming the
/// feature. (`.ci/run` runs it without features.)
#[cfg(not(feature = "postgres"))]
#[test]
fn ui_without_postgres() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("ui/without_postgres/*.rs");
}
