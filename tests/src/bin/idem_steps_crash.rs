//! One process of the multi-step crash tests: a call of four steps on the
//! store a URL names (Redis or PostgreSQL), each step counting its side
//! effect with `INCR` on a Redis counter outside the process, and each
//! declaring an undo that counts too.
//!
//! Usage: `idem-steps-crash STORE_URL ORDER COUNTER_URL MODE`, where MODE is
//!
//! - `none`: runs to the end and prints the call's result;
//! - `K`: after step K is journaled, prints `after K` and waits to be
//!   killed (`kill -9`);
//! - `fail`: after the four steps the call fails for good (a cached `Err`):
//!   the undos run, and it prints the error;
//! - `undo-K`: as `fail`, but the undo of step K prints `undoing K` before
//!   its effect and waits to be killed.

use std::io::Write as _;
use std::time::Duration;

use idem_core::{Fingerprint, Idempotency, Key, Settings, step, step_key};

/// How the process runs the call.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Complete,
    CrashAfter(usize),
    Fail,
    CrashInUndo(usize),
}

impl Mode {
    fn parse(text: &str) -> Result<Self, Box<dyn std::error::Error>> {
        Ok(match text {
            "none" => Self::Complete,
            "fail" => Self::Fail,
            _ => match text.strip_prefix("undo-") {
                Some(k) => Self::CrashInUndo(k.parse()?),
                None => Self::CrashAfter(text.parse()?),
            },
        })
    }

    fn fails(self) -> bool {
        matches!(self, Self::Fail | Self::CrashInUndo(_))
    }
}

/// Says `line` on stdout and waits to be killed.
async fn die(line: String) {
    println!("{line}");
    let _ = std::io::stdout().flush();
    std::future::pending::<()>().await;
}

async fn incr(counter: &redis::aio::MultiplexedConnection, name: &str) -> Result<(), String> {
    let mut counter = counter.clone();
    redis::cmd("INCR")
        .arg(name)
        .query_async::<i64>(&mut counter)
        .await
        .map(drop)
        .map_err(|e| format!("counter: {e}"))
}

/// The store `url` names, answering within half a second, so that a lease
/// of a second and a half is allowed and a killed holder's claim lapses
/// soon.
async fn store(
    url: &str,
) -> Result<std::sync::Arc<dyn idem_core::store::Store>, Box<dyn std::error::Error>> {
    let timeout = Duration::from_millis(500);
    #[cfg(feature = "postgres")]
    if url.starts_with("postgres") {
        let store = idem_core::PostgresStore::builder(url)
            .response_timeout(timeout)
            .connect()
            .await?;
        return Ok(std::sync::Arc::new(store));
    }
    let store = idem_core::RedisStore::node(url)
        .response_timeout(timeout)
        .connect()
        .await?;
    Ok(std::sync::Arc::new(store))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [store_url, order, counter_url, mode] = args.as_slice() else {
        return Err("usage: idem-steps-crash STORE_URL ORDER COUNTER_URL MODE".into());
    };
    let mode = Mode::parse(mode)?;
    let idem = Idempotency::from_arc(store(store_url).await?);
    let settings = Settings::builder()
        .lease(Duration::from_millis(1500))
        .ttl(Duration::from_secs(60))
        .wait_timeout(Duration::from_secs(30))
        .build()?;
    let counter = redis::Client::open(counter_url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let key = Key::new("steps-crash", order)?;
    let cache_all = |_: &String| true;
    let result = idem
        .run_caching_errors(&settings, key, Fingerprint::of(order)?, cache_all, async {
            let mut keys = Vec::new();
            for i in 0..4 {
                let name = format!("step-{i}");
                let undo = {
                    let (counter, order) = (counter.clone(), order.clone());
                    move |_: String| async move {
                        if mode == Mode::CrashInUndo(i) {
                            die(format!("undoing {i}")).await;
                        }
                        incr(&counter, &format!("{order}:undo-{i}")).await
                    }
                };
                let derived = step(&name, async {
                    incr(&counter, &format!("{order}:{name}")).await?;
                    Ok::<_, String>(step_key(&name).unwrap_or_default())
                })
                .compensate(undo)
                .await?;
                keys.push(derived);
                if mode == Mode::CrashAfter(i) {
                    die(format!("after {i}")).await;
                }
            }
            if mode.fails() {
                return Err("out of stock".to_owned());
            }
            Ok(keys.join(","))
        })
        .await;
    match result {
        Ok(keys) => println!("{keys}"),
        Err(error) => println!("failed: {error}"),
    }
    Ok(())
}
