//! One process of the multi-step crash test: a call of four steps on a
//! Redis store, each step counting its side effect with `INCR` on a counter
//! outside the process. After step `CRASH_AFTER` is journaled the process
//! prints `after N` and waits to be killed (`kill -9`); with `none` it runs
//! to the end and prints the call's result.
//!
//! Usage: `idem-steps-crash STORE_URL ORDER COUNTER_URL CRASH_AFTER`

use std::io::Write as _;
use std::time::Duration;

use idem_core::store::{StoreError, StoreErrorKind};
use idem_core::{Error, Fingerprint, Idempotency, Key, RedisStore, Settings, step, step_key};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [store_url, order, counter_url, crash_after] = args.as_slice() else {
        return Err("usage: idem-steps-crash STORE_URL ORDER COUNTER_URL CRASH_AFTER".into());
    };
    let crash_after: Option<usize> = match crash_after.as_str() {
        "none" => None,
        k => Some(k.parse()?),
    };
    let store = RedisStore::node(store_url.as_str())
        .response_timeout(Duration::from_millis(500))
        .connect()
        .await?;
    let idem = Idempotency::new(store);
    let settings = Settings::builder()
        .lease(Duration::from_millis(1500))
        .ttl(Duration::from_secs(60))
        .wait_timeout(Duration::from_secs(30))
        .build()?;
    let counter = redis::Client::open(counter_url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let key = Key::new("steps-crash", order)?;
    let result = idem
        .run(&settings, key, Fingerprint::of(&order)?, async {
            let mut keys = Vec::new();
            for i in 0..4 {
                let name = format!("step-{i}");
                let derived = step(&name, async {
                    let mut counter = counter.clone();
                    redis::cmd("INCR")
                        .arg(format!("{order}:{name}"))
                        .query_async::<i64>(&mut counter)
                        .await
                        .map_err(|e| {
                            Error::Store(StoreError::new(
                                StoreErrorKind::Other,
                                format!("counter: {e}"),
                            ))
                        })?;
                    Ok::<_, Error>(step_key(&name).unwrap_or_default())
                })
                .await?;
                keys.push(derived);
                if crash_after == Some(i) {
                    println!("after {i}");
                    let _ = std::io::stdout().flush();
                    std::future::pending::<()>().await;
                }
            }
            Ok::<_, Error>(keys.join(","))
        })
        .await?;
    println!("{result}");
    Ok(())
}
