//! A payment service whose `charge` is idempotent: the same request with the
//! same key charges once, whatever the retries.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use idem_core::{Idempotency, Replayable, idempotent};
use serde::{Deserialize, Serialize};

/// A card that the simulated bank declines.
pub const DECLINED_CARD: &str = "4000-0000-0000-0002";

/// A card that the simulated bank takes a second and a half to charge.
pub const SLOW_CARD: &str = "4000-0000-0000-0077";

/// A card that is charged at once.
pub const GOOD_CARD: &str = "4242-4242-4242-4242";

/// A charge, as a client sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChargeRequest {
    /// The client's key for this charge: a retry sends the same one.
    pub idempotency_key: String,
    /// The card to charge.
    pub card: String,
    /// The amount, in cents.
    pub amount_cents: u64,
}

/// Proof of a charge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The ledger's number for the charge.
    pub charge_id: u32,
    /// The amount charged, in cents.
    pub amount_cents: u64,
}

/// Why a charge failed.
#[derive(Debug)]
pub enum PaymentError {
    /// The bank declined the card. Not cached: the customer may retry.
    Declined,
    /// idem refused or failed: in progress, key reused, store down.
    Idem(idem_core::Error),
}

impl From<idem_core::Error> for PaymentError {
    fn from(error: idem_core::Error) -> Self {
        Self::Idem(error)
    }
}

impl std::fmt::Display for PaymentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Declined => f.write_str("the card was declined"),
            Self::Idem(error) => error.fmt(f),
        }
    }
}

impl std::error::Error for PaymentError {}

/// The payment service and its ledger.
pub struct Payments {
    idem: Idempotency,
    charges: AtomicU32,
    attempts: AtomicU32,
}

impl Payments {
    /// A service that runs its charges on the handle `idem`, made once at
    /// start-up.
    pub fn new(idem: Idempotency) -> Self {
        Self {
            idem,
            charges: AtomicU32::new(0),
            attempts: AtomicU32::new(0),
        }
    }

    /// Charges a card, once per idempotency key. A retry with the same key and
    /// request gets the first receipt back (marked as a replay); the same key
    /// with another request is refused with `KeyReused`.
    #[idempotent(key = req.idempotency_key, ttl = "24h", lease = "30s", wait_timeout = "1s", store = self.idem)]
    pub async fn charge(&self, req: ChargeRequest) -> Result<Replayable<Receipt>, PaymentError> {
        self.charge_card(&req.card, req.amount_cents)
            .await
            .map(Replayable::new)
    }

    /// Asks the bank to charge a card: not idempotent by itself (the HTTP
    /// API runs it behind the idempotency layer).
    pub async fn charge_card(
        &self,
        card: &str,
        amount_cents: u64,
    ) -> Result<Receipt, PaymentError> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        let latency = if card == SLOW_CARD { 1_500 } else { 20 };
        tokio::time::sleep(Duration::from_millis(latency)).await;
        if card == DECLINED_CARD {
            return Err(PaymentError::Declined);
        }
        let charge_id = self.charges.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(Receipt {
            charge_id,
            amount_cents,
        })
    }

    /// How many charges the ledger holds.
    pub fn charges(&self) -> u32 {
        self.charges.load(Ordering::SeqCst)
    }

    /// How many times the bank was asked, declines included.
    pub fn attempts(&self) -> u32 {
        self.attempts.load(Ordering::SeqCst)
    }
}
