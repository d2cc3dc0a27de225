//! One process of the cross-process exactly-once test: `CALLERS` concurrent
//! calls of one idempotent operation on a Redis store. The body counts its
//! runs with `INCR` on a counter outside the processes and returns a random
//! value; every caller's result is printed on its own line.
//!
//! Usage: `idem-storm STORE_URL OPERATION CALLERS COUNTER_URL COUNTER_KEY`

use std::sync::Arc;
use std::time::Duration;

use idem_core::{Fingerprint, Idempotency, Key, Store, Token};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [store_url, operation, callers, counter_url, counter_key] = args.as_slice() else {
        return Err("usage: idem-storm STORE_URL OPERATION CALLERS COUNTER_URL COUNTER_KEY".into());
    };
    let callers: usize = callers.parse()?;
    let store = idem_core::connect(store_url).await?;
    let counter = redis::Client::open(counter_url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let key = Key::new(operation, "the-one-key")?;
    let fingerprint = Fingerprint::of(&("same", "arguments"))?;

    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..callers {
        let (store, mut counter): (Arc<dyn Store>, _) = (Arc::clone(&store), counter.clone());
        let counter_key = counter_key.clone();
        tasks.spawn(async move {
            Idempotency::new(store)
                .wait_timeout(Duration::from_secs(30))
                .run(key, fingerprint, async move {
                    redis::cmd("INCR")
                        .arg(&counter_key)
                        .query_async::<i64>(&mut counter)
                        .await
                        .map_err(|e| {
                            idem_core::Error::Store(idem_core::StoreError::new(
                                idem_core::StoreErrorKind::Other,
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
