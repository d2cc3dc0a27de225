//! The payment service behind an HTTP API (axum) made idempotent by
//! `IdempotencyLayer`: `POST /payments` takes an `Idempotency-Key` header, as
//! the IETF Idempotency-Key draft and Stripe do, and an `X-Api-Key` header
//! that authenticates its client (`shop-1`, `shop-2` or `shop-3`). The
//! idempotency layer sits behind authentication and scopes each key to the
//! shop authentication found, so a replay never skips the credential check.
//!
//! Run it with
//!
//!     cargo run -p examples --example http
//!
//! and try, from another terminal:
//!
//!     curl -i -X POST localhost:3000/payments -H 'X-Api-Key: shop-1' \
//!          -H 'Idempotency-Key: "order-1"' -H 'content-type: application/json' \
//!          -d '{"card":"4242-4242-4242-4242","amount_cents":100}'
//!
//! The same command again answers the same receipt with `Idempotent-Replayed:
//! true`; another amount under the same key answers 422, no key 400, another
//! `X-Api-Key` with the same key charges anew, and an unknown one answers
//! 401 without a replay. Set `ADDR` to listen elsewhere
//! (default `127.0.0.1:3000`) and `STORE` to use another store (default
//! `memory://`).

use std::sync::Arc;

use examples::api::router;
use examples::payments::Payments;
use idem_core::{Idempotency, Settings};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let store = std::env::var("STORE").unwrap_or_else(|_| "memory://".to_owned());
    let idem = Idempotency::connect(&store).await?;
    let payments = Arc::new(Payments::new(idem.clone()));
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!(
        "payments API on http://{}; POST /payments with Idempotency-Key and X-Api-Key headers",
        listener.local_addr()?
    );
    axum::serve(listener, router(payments, idem, Settings::default()))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
