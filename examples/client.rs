//! A client that retries safely, through a flaky network: the payments API
//! of the `http` example runs on loopback behind a proxy that loses the
//! first response (after the card was charged) and refuses the next
//! connection. The client, reqwest with idem's `RetryMiddleware`, sends one
//! `Idempotency-Key` on every attempt, so the card is charged once and the
//! retry gets the stored receipt.
//!
//!     cargo run -p examples --example client

use std::sync::Arc;

use examples::api::{NewPayment, router};
use examples::payments::{GOOD_CARD, Payments};
use idem_core::client::{Breakers, RetryMiddleware, RetryPolicy, RetryReport};
use idem_core::{Idempotency, Settings};
use idem_test::proxy::{Fault, Proxy};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The payments API, as in the `http` example.
    let idem = Idempotency::memory();
    let payments = Arc::new(Payments::new(idem.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let server = listener.local_addr()?;
    let app = router(Arc::clone(&payments), idem, Settings::default());
    tokio::spawn(async move { axum::serve(listener, app).await });

    // The network between client and server: the first response is lost,
    // the next connection refused, the rest pass.
    let network = Proxy::start(server, |connection| match connection {
        0 => Fault::DropResponse,
        1 => Fault::Refuse,
        _ => Fault::Pass,
    })
    .await?;
    println!(
        "payments API on {server}, reached through a flaky network on {}",
        network.addr()
    );

    let breakers = Breakers::default();
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(RetryMiddleware::new(RetryPolicy::default()).breakers(breakers.clone()))
        .build();
    let payment = NewPayment {
        card: GOOD_CARD.to_owned(),
        amount_cents: 100,
    };
    for order in ["order-1", "order-2"] {
        let response = client
            .post(format!("http://{}/payments", network.addr()))
            .header("x-api-key", "shop-1")
            .json(&payment)
            .send()
            .await?;
        let report = response
            .extensions()
            .get::<RetryReport>()
            .cloned()
            .ok_or("the middleware reports every response")?;
        println!(
            "{order}: {} after {} attempt(s) with key {}, replayed: {}; body {}",
            response.status(),
            report.attempts(),
            report.key().unwrap_or("-"),
            report.replayed(),
            response.text().await?,
        );
    }
    println!(
        "cards charged: {} for 2 orders; connections: {}; circuit breakers: {:?}",
        payments.charges(),
        network.connections(),
        breakers.states(),
    );
    assert_eq!(payments.charges(), 2, "each order is charged once");
    Ok(())
}
