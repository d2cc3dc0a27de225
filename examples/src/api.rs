//! The payment service over HTTP, behind `IdempotencyLayer`: `POST /payments`
//! with an `Idempotency-Key` header, an `X-Api-Key` header naming the client
//! (keys are scoped per client), and a JSON body
//! `{"card": "...", "amount_cents": 100}`.
//!
//! | case | response |
//! |---|---|
//! | first request | `201` with the receipt |
//! | retry, same key and body | the same `201`, byte for byte, with `Idempotent-Replayed: true` |
//! | no or malformed key | `400`, problem+json |
//! | no `X-Api-Key` | `400`, problem+json: the key cannot be scoped |
//! | same key, first request still running | waits for it; with `reject`, `409` with `Retry-After` |
//! | same key, different body | `422` |
//! | card declined | `402`, stored and replayed like any 4xx |
//! | idempotency store down | `503` |

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use idem_core::http::IdempotencyLayer;
use idem_core::{Idempotency, Settings};
use serde::{Deserialize, Serialize};

use crate::payments::{PaymentError, Payments, Receipt};

/// The header that names the client.
pub const API_KEY: &str = "x-api-key";

/// The body of `POST /payments`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewPayment {
    /// The card to charge.
    pub card: String,
    /// The amount, in cents.
    pub amount_cents: u64,
}

/// The API's routes over `payments`, behind the idempotency layer on `idem`
/// with `settings`.
pub fn router(payments: Arc<Payments>, idem: Idempotency, settings: Settings) -> Router {
    Router::new()
        .route("/payments", post(create_payment))
        .with_state(payments)
        .layer(
            IdempotencyLayer::scoped_by(idem, |request| {
                request
                    .headers
                    .get(API_KEY)?
                    .to_str()
                    .ok()
                    .map(str::to_owned)
            })
            .name("payments-api")
            .settings(settings),
        )
}

async fn create_payment(
    State(payments): State<Arc<Payments>>,
    Json(payment): Json<NewPayment>,
) -> Result<(StatusCode, Json<Receipt>), PaymentError> {
    let receipt = payments
        .charge_card(&payment.card, payment.amount_cents)
        .await?;
    Ok((StatusCode::CREATED, Json(receipt)))
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
