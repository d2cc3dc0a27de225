//! A payment service whose client retries: every retry with the same
//! idempotency key gets the first charge's receipt, and the card is charged
//! once.
//!
//! Run it with `cargo run -p examples --example payments`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use idem_core::{Fingerprint, Idempotency, Key};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Receipt {
    charge_id: u32,
    amount_cents: u64,
}

#[derive(Debug)]
enum PaymentError {
    Idem(idem_core::Error),
}

impl std::fmt::Display for PaymentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Idem(error) => write!(f, "{error}"),
        }
    }
}

impl std::error::Error for PaymentError {}

impl From<idem_core::Error> for PaymentError {
    fn from(error: idem_core::Error) -> Self {
        Self::Idem(error)
    }
}

#[derive(Default)]
struct Ledger {
    charges: AtomicU32,
}

impl Ledger {
    async fn charge(
        &self,
        idempotency_key: &str,
        amount_cents: u64,
    ) -> Result<Receipt, PaymentError> {
        let idem = Idempotency::new(idem_core::default_store());
        let key = Key::new("payments.charge", idempotency_key)?;
        let fingerprint = Fingerprint::of(&(amount_cents,))?;
        idem.run(key, fingerprint, async {
            let charge_id = self.charges.fetch_add(1, Ordering::SeqCst) + 1;
            Ok(Receipt {
                charge_id,
                amount_cents,
            })
        })
        .await
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let ledger = Arc::new(Ledger::default());
    let first = ledger.charge("order-17", 10_000).await?;
    println!("charged: {first:?}");
    for attempt in 1..=3 {
        let retry = ledger.charge("order-17", 10_000).await?;
        println!("retry {attempt}: {retry:?}");
        assert_eq!(retry, first, "a retry replays the first receipt");
    }
    let charges = ledger.charges.load(Ordering::SeqCst);
    println!("ledger: {charges} charge(s)");
    if charges != 1 {
        std::process::exit(1);
    }
    Ok(())
}
