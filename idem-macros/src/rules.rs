//! The compile-time mirror of the runtime's rules on durations.
//!
//! The runtime (`idem_core::Settings`) owns every rule; these are its copies
//! for literals, so that a literal that breaks a rule is a compile error at
//! its token. The hidden `__rules!` macro hands them to a test that pins them
//! to the runtime's constants.

/// `idem_core::DEFAULT_TTL`, in milliseconds.
pub(crate) const DEFAULT_TTL_MILLIS: u64 = 24 * 60 * 60 * 1000;
/// `idem_core::DEFAULT_LEASE`, in milliseconds.
pub(crate) const DEFAULT_LEASE_MILLIS: u64 = 60 * 1000;
/// `idem_core::MIN_LEASE`, in milliseconds.
pub(crate) const MIN_LEASE_MILLIS: u64 = 10;
/// `idem_core::MAX_DURATION`, in milliseconds.
pub(crate) const MAX_DURATION_MILLIS: u64 = 3650 * 24 * 60 * 60 * 1000;

/// The constants as a tuple expression, in the order the pinning test reads
/// them: default TTL, default lease, minimum lease, maximum duration (ms).
pub(crate) fn tokens() -> proc_macro2::TokenStream {
    quote::quote!((
        #DEFAULT_TTL_MILLIS,
        #DEFAULT_LEASE_MILLIS,
        #MIN_LEASE_MILLIS,
        #MAX_DURATION_MILLIS
    ))
}
