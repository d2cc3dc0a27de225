//! One process of the cross-process exactly-once test: `CALLERS` concurrent
//! calls of one idempotent operation on a Redis store, through one handle,
//! as one service process would make them. The body counts its
//! runs with `INCR` on a counter outside the processes and returns a random
//! value; every caller's result is printed on its own line.
//!
//! Usage: `idem-storm STORE_URL OPERATION CALLERS COUNTER_URL COUNTER_KEY`

use std::time::Duration;

use idem_core::store::{StoreError, StoreErrorKind, Token};
use idem_core::{Fingerprint, Idempotency, Key, Settings};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [store_url, operation, callers, counter_url, counter_key] = args.as_slice() else {
        return Err("usage: idem-storm STORE_URL OPERATION CALLERS COUNTER_URL COUNTER_KEY".into());
    };
    let callers: usize = callers.parse()?;
    let idem = Idempotency::connect(store_url).await?;
    let settings = Settings::builder()
        .wait_timeout(Duration::from_secs(30))
        .build()?;
    let counter = redis::Client::open(counter_url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let key = Key::new(operation, "the-one-key")?;
    let fingerprint = Fingerprint::of(&("same", "arguments"))?;

    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..callers {
        let (idem, mut counter) = (idem.clone(), counter.clone());
        let counter_key = counter_key.clone();
        tasks.spawn(async move {
            idem.run(&settings, key, fingerprint, async move {
                redis::cmd("INCR")
                    .arg(&counter_key)
                    .query_async::<i64>(&mut counter)
                    .await
                    .map_err(|e| {
                        idem_core::Error::Store(StoreError::new(
                            StoreErrorKind::Other,
                            format!("counter: {e}"),
                        ))
                    })?;
                tokio::time::sleep(Duration::from_millis(200)).await;
                Ok::<_, idem_core::Error>(Token::random().to_string())
            })
            .await
        });
    }
    let mut out = String::new();
    for result in tasks.join_all().await {
        out.push_str(&result?);
        out.push('\n');
    }
    print!("{out}");
    Ok(())
}
