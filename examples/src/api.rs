//! The payment service over HTTP: `POST /payments` with an `Idempotency-Key`
//! header and a JSON body `{"card": "...", "amount_cents": 100}`.
//!
//! | case | response |
//! |---|---|
//! | first request | `201` with the receipt |
//! | retry, same key and body | `201` with the same receipt and `Idempotent-Replayed: true` |
//! | no or malformed key | `400`, problem+json |
//! | same key, first request still running | `409` with `Retry-After` |
//! | same key, different body | `422` |
//! | card declined | `402` |
//! | idempotency store down | `503` |

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use idem_core::Replayable;
use idem_core::http::IdempotencyKey;
use serde::{Deserialize, Serialize};

use crate::payments::{ChargeRequest, PaymentError, Payments, Receipt};

/// The body of `POST /payments`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewPayment {
    /// The card to charge.
    pub card: String,
    /// The amount, in cents.
    pub amount_cents: u64,
}

/// The API's routes over `payments`.
pub fn router(payments: Arc<Payments>) -> Router {
    Router::new()
        .route("/payments", post(create_payment))
        .with_state(payments)
}

async fn create_payment(
    State(payments): State<Arc<Payments>>,
    key: IdempotencyKey,
    Json(payment): Json<NewPayment>,
) -> Result<(StatusCode, Replayable<Json<Receipt>>), PaymentError> {
    let request = ChargeRequest {
        idempotency_key: key.to_string(),
        card: payment.card,
        amount_cents: payment.amount_cents,
    };
    let receipt = payments.charge(request).await?;
    Ok((StatusCode::CREATED, receipt.map(Json)))
}

impl IntoResponse for PaymentError {
    fn into_response(self) -> Response {
        match self {
            Self::Declined => {
                (StatusCode::PAYMENT_REQUIRED, "the card was declined").into_response()
            }
            Self::Idem(error) => error.into_response(),
        }
    }
}
