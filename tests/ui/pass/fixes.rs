//! The fixes the fail cases' messages suggest, written as they say: each
//! compiles and is accepted.

#![deny(warnings, unused_braces)]

use std::sync::LazyLock;
use std::time::Duration;

use idem_core::{Idempotency, idempotent};
use serde::{Deserialize, Serialize};

#[derive(Debug)]
struct Error;

impl From<idem_core::Error> for Error {
    fn from(_: idem_core::Error) -> Self {
        Error
    }
}

// ttl_integer_within_default_lease: "such as `ttl = "1m", lease = "20s"`".
#[idempotent(key = id, ttl = "1m", lease = "20s")]
async fn short_literal(id: u64) -> Result<u64, Error> {
    Ok(id)
}

// …"or a `Duration`, such as `ttl = Duration::from_secs(60), lease = Duration::from_secs(20)`".
#[idempotent(key = id, ttl = Duration::from_secs(60), lease = Duration::from_secs(20))]
async fn short_duration(id: u64) -> Result<u64, Error> {
    Ok(id)
}

// ttl_no_lease_fits: "set a longer one, e.g. `ttl = "1s", lease = "300ms"`".
#[idempotent(key = id, ttl = "1s", lease = "300ms")]
async fn longer_ttl(id: u64) -> Result<u64, Error> {
    Ok(id)
}

// ttl_shorter_than_default_lease: "set a shorter one, e.g. `lease = "10s"`".
#[idempotent(key = id, ttl = "30s", lease = "10s")]
async fn shorter_lease(id: u64) -> Result<u64, Error> {
    Ok(id)
}

// ttl_with_space / ttl_in_words: "`ttl = "24h"`", "`ttl = "1d"`".
#[idempotent(key = id, ttl = "1d", lease = "30s")]
async fn no_spaces(id: u64) -> Result<u64, Error> {
    Ok(id)
}

// error_without_from_idem: a variant `Idem(#[from] idem_core::Error)`.
#[derive(Debug)]
enum PaymentError {
    Idem(idem_core::Error),
}

impl From<idem_core::Error> for PaymentError {
    fn from(error: idem_core::Error) -> Self {
        Self::Idem(error)
    }
}

#[idempotent(key = id)]
async fn own_error(id: u64) -> Result<u64, PaymentError> {
    Ok(id)
}

// error_foreign_type: "`String`, `std::io::Error` or `Box<dyn std::error::Error + Send + Sync>`".
#[idempotent(key = id)]
async fn string_error(id: u64) -> Result<u64, String> {
    Ok(id)
}

#[idempotent(key = id)]
async fn io_error(id: u64) -> std::io::Result<u64> {
    Ok(id)
}

#[idempotent(key = id)]
async fn boxed_error(id: u64) -> Result<u64, Box<dyn std::error::Error + Send + Sync>> {
    Ok(id)
}

// ok_borrowed_str: "return `String`".
#[idempotent(key = id)]
async fn owned(id: u64) -> Result<String, Error> {
    Ok(format!("done {id}"))
}

// ok_generic_without_deserialize: "`T: Serialize + Send + serde::de::DeserializeOwned`".
#[idempotent(key = id)]
async fn echo<T: Serialize + Send + serde::de::DeserializeOwned>(
    id: u64,
    value: T,
) -> Result<T, Error> {
    let _ = id;
    Ok(value)
}

// skip_a_field: "marking the field `#[serde(skip_serializing)]`".
#[derive(Serialize)]
struct Request {
    order: u64,
    #[serde(skip_serializing)]
    trace_id: u64,
}

#[idempotent(key = req.order)]
async fn traced(req: Request) -> Result<u64, Error> {
    Ok(req.trace_id)
}

// skip_all: "`fingerprint = false` beside a `key = …`".
struct Pool;

#[idempotent(key = id, fingerprint = false)]
async fn unchecked(pool: &Pool, id: u64) -> Result<u64, Error> {
    let _ = pool;
    Ok(id)
}

// skip_given_twice: "give one list: `skip(pool, client)`".
struct Client;

#[idempotent(key = id, skip(pool, client))]
async fn one_list(pool: &Pool, client: &Client, id: u64) -> Result<u64, Error> {
    let _ = (pool, client);
    Ok(id)
}

// positional_name: "`name = "payments.charge"`".
#[idempotent(key = id, name = "payments.charge")]
async fn named(id: u64) -> Result<u64, Error> {
    Ok(id)
}

// nothing_to_fingerprint_*: "a constant such as `key = "nightly-report"`".
#[idempotent(key = "nightly-report", ttl = "1h")]
async fn nightly() -> Result<(), Error> {
    Ok(())
}

// on_conflict_expression: "`on_conflict = reject`".
#[idempotent(key = id, on_conflict = reject)]
async fn bare_word(id: u64) -> Result<u64, Error> {
    Ok(id)
}

// cache_errors_predicate_by_value: "so it borrows its argument".
#[derive(Debug, Serialize, Deserialize)]
enum PayError {
    Declined,
    Idem(String),
}

impl From<idem_core::Error> for PayError {
    fn from(e: idem_core::Error) -> Self {
        Self::Idem(e.to_string())
    }
}

fn is_permanent(error: &PayError) -> bool {
    matches!(error, PayError::Declined)
}

#[idempotent(key = id, cache_errors = is_permanent)]
async fn caching(id: u64) -> Result<u64, PayError> {
    Ok(id)
}

// store_*: "build the handle once at start-up, keep it (a field, a `static`)".
static IDEM: LazyLock<Idempotency> = LazyLock::new(Idempotency::memory);

#[idempotent(key = id, store = IDEM)]
async fn in_a_static(id: u64) -> Result<u64, Error> {
    Ok(id)
}

struct Payments {
    idem: Idempotency,
}

impl Payments {
    // store_is_a_url: "built with `Idempotency::connect(…).await?`".
    async fn new() -> Result<Self, idem_core::store::StoreError> {
        Ok(Self {
            idem: Idempotency::connect("memory://").await?,
        })
    }

    #[idempotent(key = id, store = self.idem)]
    async fn charge(&self, id: u64) -> Result<u64, Error> {
        Ok(id)
    }

    // An explicit reference is taken as it is.
    #[idempotent(key = id, store = &self.idem)]
    async fn refund(&self, id: u64) -> Result<u64, Error> {
        Ok(id)
    }
}

// A parameter compiled out is not fingerprinted either.
#[idempotent(key = id)]
async fn with_cfg(id: u64, #[cfg(any())] debug: std::collections::HashMap<String, u8>) -> Result<u64, Error> {
    Ok(id)
}

fn main() {
    let _ = (short_literal(1), short_duration(1), longer_ttl(1), shorter_lease(1), no_spaces(1));
    let _ = (own_error(1), string_error(1), io_error(1), boxed_error(1), owned(1));
    let _ = (echo(1, 2_u8), traced(Request { order: 1, trace_id: 2 }));
    let _ = (unchecked(&Pool, 1), one_list(&Pool, &Client, 1), named(1), nightly());
    let _ = (bare_word(1), caching(1), in_a_static(1), with_cfg(1));
    let _ = async {
        let payments = Payments::new().await.unwrap();
        payments.charge(1).await?;
        payments.refund(1).await
    };
}
