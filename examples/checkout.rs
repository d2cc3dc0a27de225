//! A checkout of three steps (reserve stock, charge the card through a
//! gateway, email the receipt) that fails after the charge on its first
//! attempt. The retry replays the reservation and the charge from the
//! journal and runs only the email. The gateway deduplicates by the
//! charge step's derived key, so even a charge whose journal entry was lost
//! would be taken once. Prints what ran on each attempt; exits non-zero if
//! any effect happened twice.
//!
//!     cargo run -p examples --example checkout

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use idem_core::{Idempotency, MemoryStore, idempotent, step, step_key};

#[derive(Debug)]
enum ShopError {
    MailerDown,
    Idem(idem_core::Error),
}

impl std::fmt::Display for ShopError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::MailerDown => f.write_str("the mail server is down"),
            Self::Idem(error) => error.fmt(f),
        }
    }
}

impl From<idem_core::Error> for ShopError {
    fn from(error: idem_core::Error) -> Self {
        Self::Idem(error)
    }
}

/// A payment gateway that, like real ones, answers a repeated
/// `Idempotency-Key` with the charge it made the first time.
#[derive(Default)]
struct Gateway {
    charges: Mutex<HashMap<String, String>>,
    taken: AtomicU32,
}

impl Gateway {
    fn charge(&self, cents: u64, idempotency_key: &str) -> String {
        let mut charges = self.charges.lock().unwrap();
        charges
            .entry(idempotency_key.to_owned())
            .or_insert_with(|| {
                let n = self.taken.fetch_add(1, Ordering::SeqCst) + 1;
                format!("ch_{n} ({cents} cents)")
            })
            .clone()
    }
}

struct Shop {
    idem: Idempotency,
    gateway: Gateway,
    reserved: AtomicU32,
    emailed: AtomicU32,
    mailer_down: AtomicBool,
}

impl Shop {
    #[idempotent(key = order, store = self.idem)]
    async fn checkout(&self, order: &str, cents: u64) -> Result<String, ShopError> {
        let hold = step("reserve", async {
            println!("    reserve: runs");
            let n = self.reserved.fetch_add(1, Ordering::SeqCst) + 1;
            Ok::<_, ShopError>(format!("hold_{n}"))
        })
        .await?;
        let charge = step("charge", async {
            let key = step_key("charge").expect("inside an idempotent call");
            println!("    charge: runs, Idempotency-Key {key}");
            Ok::<_, ShopError>(self.gateway.charge(cents, &key))
        })
        .await?;
        step("email", async {
            if self.mailer_down.load(Ordering::SeqCst) {
                println!("    email: fails");
                return Err(ShopError::MailerDown);
            }
            println!("    email: runs");
            self.emailed.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .await?;
        Ok(format!("{hold}, {charge}, receipt sent"))
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let shop = Shop {
        idem: Idempotency::new(MemoryStore::new()),
        gateway: Gateway::default(),
        reserved: AtomicU32::new(0),
        emailed: AtomicU32::new(0),
        mailer_down: AtomicBool::new(true),
    };
    for attempt in 1..=3 {
        println!("attempt {attempt}:");
        match shop.checkout("order-42", 1999).await {
            Ok(done) => println!("  -> {done}"),
            Err(error) => println!("  -> failed: {error}"),
        }
        // The mail server comes back after the first attempt.
        shop.mailer_down.store(false, Ordering::SeqCst);
    }
    let (reserved, charged, emailed) = (
        shop.reserved.load(Ordering::SeqCst),
        shop.gateway.taken.load(Ordering::SeqCst),
        shop.emailed.load(Ordering::SeqCst),
    );
    println!("reserved {reserved}, charged {charged}, emailed {emailed}");
    if (reserved, charged, emailed) == (1, 1, 1) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
