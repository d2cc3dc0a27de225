//! Every argument at once, on a method, compiles.

use std::time::Duration;

use idem_core::{Idempotency, idempotent};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
enum Error {
    Declined,
    Idem(String),
}

impl From<idem_core::Error> for Error {
    fn from(error: idem_core::Error) -> Self {
        Self::Idem(error.to_string())
    }
}

fn is_permanent(error: &Error) -> bool {
    matches!(error, Error::Declined)
}

struct Client;

struct Payments {
    idem: Idempotency,
}

impl Payments {
    #[idempotent(
        key = (order, attempt),
        scope = customer,
        ttl = "7d",
        lease = "30s",
        on_conflict = wait,
        wait_timeout = "10s",
        cache_errors = is_permanent,
        skip(client),
        fingerprint = true,
        name = "payments.charge",
        store = self.idem,
        crate = "idem_core",
    )]
    async fn charge(
        &self,
        client: &Client,
        customer: u64,
        order: String,
        attempt: u32,
    ) -> Result<u64, Error> {
        let _ = client;
        Ok(customer + u64::from(attempt) + order.len() as u64)
    }
}

#[idempotent(ttl = Duration::from_secs(60), lease = Duration::from_secs(5))]
async fn content_keyed(a: u8) -> Result<(), Error> {
    let _ = a;
    Ok(())
}

fn main() {
    let payments = Payments {
        idem: Idempotency::memory(),
    };
    let _ = payments.charge(&Client, 1, "o".into(), 0);
    let _ = content_keyed(1);
}
