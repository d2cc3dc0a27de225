//! A payment service whose clients retry, on the embedded memory store.
//!
//! The client loses a response and retries with the same key (one charge),
//! fires 100 concurrent duplicates (one charge), reuses a key with another
//! amount (refused), and hits a declined card (not cached: the retry runs
//! again). The program exits non-zero if any of that breaks.
//!
//! Run it with `cargo run -p examples --example payments`.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use idem_core::idempotent;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ChargeRequest {
    idempotency_key: String,
    card: String,
    amount_cents: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Receipt {
    charge_id: u32,
    amount_cents: u64,
}

#[derive(Debug)]
enum PaymentError {
    Declined,
    Idem(idem_core::Error),
}

impl From<idem_core::Error> for PaymentError {
    fn from(error: idem_core::Error) -> Self {
        Self::Idem(error)
    }
}

#[derive(Default)]
struct Payments {
    charges: AtomicU32,
    declines: AtomicU32,
}

impl Payments {
    #[idempotent(key = req.idempotency_key, ttl = "24h")]
    async fn charge(&self, req: ChargeRequest) -> Result<Receipt, PaymentError> {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        if req.card == "4000-0000-0000-0002" {
            self.declines.fetch_add(1, Ordering::SeqCst);
            return Err(PaymentError::Declined);
        }
        let charge_id = self.charges.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(Receipt {
            charge_id,
            amount_cents: req.amount_cents,
        })
    }
}

fn request(key: &str, card: &str, amount_cents: u64) -> ChargeRequest {
    ChargeRequest {
        idempotency_key: key.to_owned(),
        card: card.to_owned(),
        amount_cents,
    }
}

const CARD: &str = "4242-4242-4242-4242";

#[tokio::main]
async fn main() -> ExitCode {
    let payments = Arc::new(Payments::default());
    let mut broken = Vec::new();
    let mut check = |ok: bool, what: &str| {
        println!("  {} {what}", if ok { "ok  " } else { "FAIL" });
        if !ok {
            broken.push(what.to_owned());
        }
    };

    println!("1. A response is lost; the client retries with the same key.");
    let first = payments.charge(request("order-1", CARD, 10_000)).await;
    let retry = payments.charge(request("order-1", CARD, 10_000)).await;
    match (&first, &retry) {
        (Ok(a), Ok(b)) => check(a == b, &format!("the retry got the same receipt ({a:?})")),
        _ => check(false, &format!("both calls succeed: {first:?}, {retry:?}")),
    }

    println!("2. 100 concurrent duplicates of one request.");
    let before = payments.charges.load(Ordering::SeqCst);
    let mut storm = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let payments = Arc::clone(&payments);
        storm.spawn(async move { payments.charge(request("order-2", CARD, 2_500)).await });
    }
    let receipts: Vec<_> = storm.join_all().await;
    let charged = payments.charges.load(Ordering::SeqCst) - before;
    let identical = receipts
        .iter()
        .all(|r| matches!((r, &receipts[0]), (Ok(a), Ok(b)) if a == b));
    check(
        charged == 1,
        &format!("one charge for 100 requests (charged {charged})"),
    );
    check(identical, "all 100 callers got the identical receipt");

    println!("3. The same key is reused with a different amount.");
    let reused = payments.charge(request("order-1", CARD, 99_999)).await;
    check(
        matches!(reused, Err(PaymentError::Idem(idem_core::Error::KeyReused))),
        "refused with KeyReused (HTTP 422)",
    );

    println!("4. A declined card, then a retry.");
    let declined = payments
        .charge(request("order-3", "4000-0000-0000-0002", 500))
        .await;
    let again = payments
        .charge(request("order-3", "4000-0000-0000-0002", 500))
        .await;
    check(
        matches!(
            (declined, again),
            (Err(PaymentError::Declined), Err(PaymentError::Declined))
        ),
        "declined both times",
    );
    let declines = payments.declines.load(Ordering::SeqCst);
    check(
        declines == 2,
        &format!("errors are not cached: the retry ran again ({declines} attempts)"),
    );

    let charges = payments.charges.load(Ordering::SeqCst);
    println!("ledger: {charges} charges for 103 requests");
    check(charges == 2, "the ledger holds exactly 2 charges");
    if broken.is_empty() {
        println!("every invariant held");
        ExitCode::SUCCESS
    } else {
        println!("broken: {broken:?}");
        ExitCode::FAILURE
    }
}
