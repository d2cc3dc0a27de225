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

/// The README says how many misuses have a case; the number stays true.
#[test]
fn the_readme_counts_every_failing_case() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let cases: usize = ["ui/fail", "ui/postgres/fail", "ui/without_postgres"]
        .iter()
        .map(|dir| {
            std::fs::read_dir(root.join(dir))
                .expect("a case directory")
                .filter(|entry| {
                    entry
                        .as_ref()
                        .expect("a directory entry")
                        .path()
                        .extension()
                        == Some("rs".as_ref())
                })
                .count()
        })
        .sum();
    let readme = std::fs::read_to_string(root.join("../README.md")).expect("the README");
    let claim = format!("({cases} cases in `tests/ui/fail`");
    assert!(
        readme.contains(&claim),
        "the README should say {claim:?}: update its count of compile-fail cases"
    );
}
