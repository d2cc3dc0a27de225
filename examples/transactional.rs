//! Payments whose charge row and idempotency record commit in one
//! PostgreSQL transaction: a crash between "charge inserted" and "response
//! stored" cannot leave a charge without its record.
//!
//! The service charges once, replays the retry, and then a charge is cut off
//! mid-body (its future dropped after the INSERT, as a crash would): neither
//! the charge nor the claim remains, and the retry charges once. The program
//! exits non-zero if the ledger breaks.
//!
//!     cargo run -p examples --features postgres --example transactional -- \
//!         --database postgres://postgres@127.0.0.1/postgres

use std::process::ExitCode;
use std::time::Duration;

use idem_core::{PostgresStore, idempotent};
use sqlx::PgConnection;

#[derive(Debug)]
enum ChargeError {
    Db(sqlx::Error),
    Idem(idem_core::Error),
}

impl std::fmt::Display for ChargeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Db(error) => write!(f, "database: {error}"),
            Self::Idem(error) => error.fmt(f),
        }
    }
}

impl From<idem_core::Error> for ChargeError {
    fn from(error: idem_core::Error) -> Self {
        Self::Idem(error)
    }
}

impl From<sqlx::Error> for ChargeError {
    fn from(error: sqlx::Error) -> Self {
        Self::Db(error)
    }
}

struct Ledger {
    pg: PostgresStore,
}

impl Ledger {
    /// Inserts the charge in the same transaction as the claim; both commit
    /// with the stored receipt, or neither does.
    #[idempotent(key = order, store = self.pg, transaction = tx, name = "ledger.charge")]
    async fn charge(
        &self,
        tx: &mut PgConnection,
        order: String,
        cents: i64,
        stall: bool,
    ) -> Result<i64, ChargeError> {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO example_charges (order_id, cents) VALUES ($1, $2) RETURNING id",
        )
        .bind(&order)
        .bind(cents)
        .fetch_one(&mut *tx)
        .await?;
        if stall {
            // The process "crashes" here: the caller gives up on the future.
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        Ok(id)
    }

    async fn charges(&self, order: &str) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("SELECT count(*) FROM example_charges WHERE order_id = $1")
            .bind(order)
            .fetch_one(self.pg.pool())
            .await
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [flag, url] = args.as_slice() else {
        eprintln!("usage: transactional --database postgres://user@host/db");
        return ExitCode::FAILURE;
    };
    if flag != "--database" {
        eprintln!("usage: transactional --database postgres://user@host/db");
        return ExitCode::FAILURE;
    }
    match run(url).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("cannot run against {url}: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(url: &str) -> Result<bool, Box<dyn std::error::Error>> {
    let ledger = Ledger {
        pg: PostgresStore::connect(url).await?,
    };
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS example_charges \
         (id bigserial PRIMARY KEY, order_id text NOT NULL, cents bigint NOT NULL)",
    )
    .execute(ledger.pg.pool())
    .await?;
    let run = idem_core::store::Token::random().to_string();
    let mut held = true;

    println!("1. A charge, and its retry.");
    let order = format!("order-1-{run}");
    let first = ledger.charge(order.clone(), 1_000, false).await;
    let retry = ledger.charge(order.clone(), 1_000, false).await;
    let charged = ledger.charges(&order).await?;
    let show = |r: &Result<i64, ChargeError>| match r {
        Ok(id) => format!("charge {id}"),
        Err(error) => format!("error: {error}"),
    };
    println!(
        "   receipts: {} and {}; {charged} charge row",
        show(&first),
        show(&retry)
    );
    held &= matches!((&first, &retry), (Ok(a), Ok(b)) if a == b) && charged == 1;

    println!("2. A charge cut off after its INSERT, before its record.");
    let order = format!("order-2-{run}");
    let cut = tokio::time::timeout(
        Duration::from_millis(300),
        ledger.charge(order.clone(), 2_500, true),
    )
    .await;
    // The dropped call's connection goes back to the pool with its
    // transaction rolled back: the INSERT and the claim are gone together.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after_cut = ledger.charges(&order).await?;
    println!("   cut off: {}; {after_cut} charge rows", cut.is_err());
    let retry = ledger.charge(order.clone(), 2_500, false).await;
    let charged = ledger.charges(&order).await?;
    println!("   the retry: {}; {charged} charge row", show(&retry));
    held &= cut.is_err() && after_cut == 0 && retry.is_ok() && charged == 1;

    println!(
        "\n{}",
        if held {
            "every invariant held"
        } else {
            "an invariant broke"
        }
    );
    Ok(held)
}
