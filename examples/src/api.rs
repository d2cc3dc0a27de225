//! The payment service over HTTP, behind `IdempotencyLayer`: `POST /payments`
//! with an `Idempotency-Key` header, an `X-Api-Key` header naming the client
//! (keys are scoped per client), and a JSON body
//! `{"card": "...", "amount_cents": 100}`.
//!
//! | case | response |
//! |---|---|
//! | no or unknown `X-Api-Key` | `401`, before the idempotency layer: never a replay |
//! | first request | `201` with the receipt |
//! | retry, same key and body | the same `201`, byte for byte, with `Idempotent-Replayed: true` |
//! | no or malformed key | `400`, problem+json |
//! | same key, first request still running | waits for it; with `reject`, `409` with `Retry-After` |
//! | same key, different body | `422` |
//! | card declined | `402`, stored and replayed like any 4xx |
//! | idempotency store down | `503` |
//!
//! The idempotency layer sits *behind* authentication: a replay is answered
//! before the handler runs, so only an authenticated shop may get one, and
//! keys are scoped by the shop that authentication found (in the request's
//! extensions), not by a header any client could send.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use idem_core::http::IdempotencyLayer;
use idem_core::{Idempotency, Settings};
use serde::{Deserialize, Serialize};

use crate::payments::{PaymentError, Payments, Receipt};

/// The header that names the client.
pub const API_KEY: &str = "x-api-key";

/// The API keys of the shops the API knows (a real service asks its
/// database or identity provider).
pub const SHOPS: &[&str] = &["shop-1", "shop-2", "shop-3"];

/// The authenticated client of a request, put in its extensions by
/// [`authenticate`].
#[derive(Debug, Clone)]
pub struct Shop(pub String);

/// Lets through only requests with a known API key, marked with their
/// [`Shop`]; the others get `401`.
pub async fn authenticate(mut request: Request, next: Next) -> Response {
    let shop = request
        .headers()
        .get(API_KEY)
        .and_then(|key| key.to_str().ok())
        .filter(|key| SHOPS.contains(key))
        .map(str::to_owned);
    match shop {
        Some(shop) => {
            request.extensions_mut().insert(Shop(shop));
            next.run(request).await
        }
        None => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "ApiKey")],
            "a known X-Api-Key header is required",
        )
            .into_response(),
    }
}

/// The body of `POST /payments`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewPayment {
    /// The card to charge.
    pub card: String,
    /// The amount, in cents.
    pub amount_cents: u64,
}

/// The API's routes over `payments`, behind the idempotency layer on `idem`
/// with `settings`, behind authentication.
pub fn router(payments: Arc<Payments>, idem: Idempotency, settings: Settings) -> Router {
    Router::new()
        .route("/payments", post(create_payment))
        .with_state(payments)
        .layer(
            // Keys are scoped by the shop authentication found.
            IdempotencyLayer::scoped_by(idem, |request| {
                request.extensions.get::<Shop>().map(|shop| shop.0.clone())
            })
            .name("payments-api")
            .settings(settings),
        )
        // Added last, so it runs first: outside the idempotency layer.
        .layer(middleware::from_fn(authenticate))
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
