//! The payment service behind an HTTP API (axum): `POST /payments` takes an
//! `Idempotency-Key` header, as the IETF Idempotency-Key draft and Stripe do.
//!
//! Run it with
//!
//!     cargo run -p examples --example http
//!
//! and try, from another terminal:
//!
//!     curl -i -X POST localhost:3000/payments -H 'Idempotency-Key: order-1' \
//!          -H 'content-type: application/json' -d '{"card":"4242-4242-4242-4242","amount_cents":100}'
//!
//! The same command again answers the same receipt with `Idempotent-Replayed:
//! true`; another amount under the same key answers 422, no key answers 400.
//! Set `ADDR` to listen elsewhere (default `127.0.0.1:3000`).

use std::sync::Arc;

use examples::api::router;
use examples::payments::Payments;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let payments = Arc::new(Payments::new(
        idem_core::Idempotency::connect("memory://").await?,
    ));
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!(
        "payments API on http://{}; POST /payments with an Idempotency-Key header",
        listener.local_addr()?
    );
    axum::serve(listener, router(payments))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
