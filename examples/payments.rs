//! A payment service whose clients retry; idem makes every charge happen once.
//!
//! The client loses a response and retries with the same key (one charge),
//! fires 100 concurrent duplicates (one charge), reuses a key with another
//! amount (refused), and hits a declined card (not cached: the retry asks the
//! bank again). The report ends with the ledger's charge count, and the
//! program exits non-zero if any invariant broke.
//!
//! Run it on the embedded memory store:
//!
//!     cargo run -p examples --example payments
//!
//! or on Redis or PostgreSQL (the `redis` and `postgres` features):
//!
//!     cargo run -p examples --features redis --example payments -- --store redis://127.0.0.1:6379
//!     cargo run -p examples --features postgres --example payments -- --store postgres://postgres@127.0.0.1/postgres

use std::process::ExitCode;
use std::sync::Arc;

use examples::payments::{ChargeRequest, DECLINED_CARD, GOOD_CARD, PaymentError, Payments};

fn request(key: &str, card: &str, amount_cents: u64) -> ChargeRequest {
    ChargeRequest {
        idempotency_key: key.to_owned(),
        card: card.to_owned(),
        amount_cents,
    }
}

/// Keys of their own for this run, so that a shared Redis holds no old ones.
fn key(name: &str, run: &str) -> String {
    format!("{name}-{run}")
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let url = match args.as_slice() {
        [] => "memory://".to_owned(),
        [flag, url] if flag == "--store" => url.clone(),
        _ => {
            eprintln!(
                "usage: payments [--store URL]   (memory:// by default, redis://host:port or \
                 postgres://user@host/db)"
            );
            return ExitCode::FAILURE;
        }
    };
    let idem = match idem_core::Idempotency::connect(&url).await {
        Ok(idem) => idem,
        Err(error) => {
            eprintln!("cannot open the store {url}: {error}");
            return ExitCode::FAILURE;
        }
    };
    println!("idempotency store: {url}\n");
    let payments = Arc::new(Payments::new(idem));
    let run = idem_core::store::Token::random().to_string();
    let mut broken = Vec::new();
    let mut check = |ok: bool, what: String| {
        println!("   {} {what}", if ok { "ok  " } else { "FAIL" });
        if !ok {
            broken.push(what);
        }
    };

    println!("1. The response to a charge is lost; the client retries with the same key.");
    let mut requests = 2;
    let first = payments
        .charge(request(&key("order-1", &run), GOOD_CARD, 10_000))
        .await;
    let retry = payments
        .charge(request(&key("order-1", &run), GOOD_CARD, 10_000))
        .await;
    match (&first, &retry) {
        (Ok(a), Ok(b)) => {
            check(
                **a == **b,
                format!("the retry got the first receipt: {:?}", **b),
            );
            check(b.is_replay(), "and knows it is a replay".to_owned());
        }
        _ => check(false, format!("both calls succeed: {first:?}, {retry:?}")),
    }

    println!("2. 100 concurrent duplicates of one charge.");
    let before = payments.charges();
    let mut storm = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let (payments, key) = (Arc::clone(&payments), key("order-2", &run));
        storm.spawn(async move { payments.charge(request(&key, GOOD_CARD, 2_500)).await });
    }
    let receipts = storm.join_all().await;
    requests += receipts.len();
    let charged = payments.charges() - before;
    let identical = receipts
        .iter()
        .all(|r| matches!((r, &receipts[0]), (Ok(a), Ok(b)) if **a == **b));
    check(
        charged == 1,
        format!("one charge for 100 requests (charged {charged})"),
    );
    check(
        identical,
        "all 100 callers got the identical receipt".to_owned(),
    );

    println!("3. The key of charge 1 is reused with a different amount.");
    requests += 1;
    let reused = payments
        .charge(request(&key("order-1", &run), GOOD_CARD, 99_999))
        .await;
    check(
        matches!(reused, Err(PaymentError::Idem(idem_core::Error::KeyReused))),
        format!(
            "refused: {}",
            reused
                .as_ref()
                .map_or_else(ToString::to_string, |r| format!("{:?}", **r))
        ),
    );

    println!("4. A card is declined; the customer retries.");
    requests += 2;
    let attempts = payments.attempts();
    let declined = payments
        .charge(request(&key("order-3", &run), DECLINED_CARD, 500))
        .await;
    let again = payments
        .charge(request(&key("order-3", &run), DECLINED_CARD, 500))
        .await;
    check(
        matches!(
            (&declined, &again),
            (Err(PaymentError::Declined), Err(PaymentError::Declined))
        ),
        "declined both times".to_owned(),
    );
    let asked = payments.attempts() - attempts;
    check(
        asked == 2,
        format!("a decline is not cached: the bank was asked {asked} times"),
    );

    let charges = payments.charges();
    println!("\nledger: {charges} charges for {requests} requests");
    check(
        charges == 2,
        "the ledger holds exactly 2 charges".to_owned(),
    );
    if broken.is_empty() {
        println!("every invariant held");
        ExitCode::SUCCESS
    } else {
        println!("broken: {broken:?}");
        ExitCode::FAILURE
    }
}
