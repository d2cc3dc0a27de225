//! The workload and the measuring tools of idem's benchmark (`cargo bench -p
//! benches`): a realistic request (~200 bytes of arguments) and result (~100
//! bytes), latency histograms, fixed-time throughput, and the report's tables
//! and chart.

use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

/// A payment request: about 200 bytes as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChargeRequest {
    /// The client's idempotency key.
    pub idempotency_key: String,
    /// Who pays.
    pub customer: String,
    /// The card.
    pub card: String,
    /// How much, in cents.
    pub amount_cents: u64,
    /// The currency.
    pub currency: String,
    /// What for.
    pub description: String,
}

/// A payment receipt: about 100 bytes as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The charge's id.
    pub charge_id: String,
    /// Its state.
    pub status: String,
    /// How much, in cents.
    pub amount_cents: u64,
    /// When, in Unix seconds.
    pub created: u64,
}

/// The error of the benchmarked functions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BenchError {
    /// The simulated bank declined.
    Declined,
    /// idem or a peer failed.
    Failed(String),
}

impl From<idem_core::Error> for BenchError {
    fn from(error: idem_core::Error) -> Self {
        Self::Failed(error.to_string())
    }
}

/// The request with idempotency key number `n`.
pub fn request(n: u64) -> ChargeRequest {
    ChargeRequest {
        idempotency_key: format!("7c9e6679-7425-40de-944b-{n:012}"),
        customer: "cus_9s6XKzkNRiz8i3".to_owned(),
        card: "card_1MvoiELkdIwHu7ixOeFh8mE7".to_owned(),
        amount_cents: 2_000 + n % 100,
        currency: "eur".to_owned(),
        description: "Order #100-4711: two tickets, row 7, seats 12 and 13".to_owned(),
    }
}

/// What every benchmarked function does: turn a request into a receipt.
pub fn charge(req: &ChargeRequest) -> Receipt {
    Receipt {
        charge_id: format!("ch_3MmlLrLkdIwHu7ix0snN0B15{}", req.amount_cents),
        status: "succeeded".to_owned(),
        amount_cents: req.amount_cents,
        created: 1_680_000_000,
    }
}

/// The CPU time, user and system, that process `pid` (`"self"` for this
/// one) has spent, all its threads: `/proc/{pid}/stat` in the kernel's
/// clock ticks (`USER_HZ`, 100 on Linux).
pub fn cpu_time(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/{pid}/stat");
    // Fields after the command's closing parenthesis; utime and stime are
    // the 14th and 15th fields of the whole line.
    let rest = &stat[stat.rfind(')').expect("a command") + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    Duration::from_millis(ticks * 10)
}

/// The CPU time, user and system, that a Redis server has spent, from its
/// `INFO cpu`.
pub fn redis_cpu(server: &idem_test::redis_server::RedisServer) -> Duration {
    let info = server.cli(&["INFO", "cpu"]);
    let field = |name: &str| -> f64 {
        info.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .expect("a cpu field")
            .trim()
            .parse()
            .expect("seconds")
    };
    Duration::from_secs_f64(field("used_cpu_user") + field("used_cpu_sys"))
}

/// Stores `value` under the key the Redis floor reads ([`get_floor`]).
pub async fn set_floor(conn: &ConnectionManager, value: &[u8]) {
    redis::cmd("SET")
        .arg("floor")
        .arg(value)
        .exec_async(&mut conn.clone())
        .await
        .expect("the floor's value");
}

/// The Redis floor every Redis row is measured against: a raw `GET` of the
/// value [`set_floor`] stored, one round trip.
pub async fn get_floor(mut conn: ConnectionManager) {
    let value: Option<Vec<u8>> = redis::cmd("GET")
        .arg("floor")
        .query_async(&mut conn)
        .await
        .expect("a GET");
    std::hint::black_box(value);
}

/// [`get_floor`] as an operation of an [`interleaved`] measurement.
pub fn floor_op(conn: ConnectionManager) -> Op {
    Box::new(move |_| Box::pin(get_floor(conn.clone())))
}

/// Request `n` grown to about 1 KB of JSON (a longer description): the body
/// of the HTTP layer's rows.
pub fn kilobyte_request(n: u64) -> ChargeRequest {
    let mut req = request(n);
    req.description = req.description.repeat(16);
    req
}

/// The HTTP layer's rows' service: `POST /charges` takes a request as JSON
/// and answers its receipt.
pub fn charges_router() -> axum::Router {
    async fn handler(axum::Json(req): axum::Json<ChargeRequest>) -> axum::Json<Receipt> {
        axum::Json(charge(&req))
    }
    axum::Router::new().route("/charges", axum::routing::post(handler))
}

/// Latency percentiles of one measurement, in microseconds.
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    /// The median.
    pub p50: f64,
    /// The 99th percentile.
    pub p99: f64,
}

/// Prints `rows` of a layer-by-layer measurement as a markdown table under
/// `title`, each row's p50 also as a ratio to the first row's, the floor
/// (`floor` names it in the header).
pub fn print_layers(title: &str, floor: &str, rows: &[(&str, Latency)]) {
    println!("\n{title}:\n");
    println!("| row | p50 µs | p99 µs | p50 ÷ {floor} |");
    println!("|---|---|---|---|");
    let floor = rows[0].1.p50;
    for (name, latency) in rows {
        println!(
            "| {name} | {:.1} | {:.1} | {:.2}× |",
            latency.p50,
            latency.p99,
            latency.p50 / floor
        );
    }
}

/// The median cost of one call, in nanoseconds, for calls too fast to time
/// one by one: `batches` batches of `batch` calls each are timed, and the
/// median batch's mean is reported.
pub async fn per_call_nanos<F, Fut>(batches: u64, batch: u64, mut op: F) -> f64
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut means = Vec::new();
    let mut i = 0;
    for round in 0..batches + batches / 10 {
        let start = Instant::now();
        for _ in 0..batch {
            op(i).await;
            i += 1;
        }
        if round >= batches / 10 {
            means.push(start.elapsed().as_nanos() as f64 / batch as f64);
        }
    }
    means.sort_by(f64::total_cmp);
    means[means.len() / 2]
}

/// One operation of an interleaved latency measurement.
pub type Op = Box<dyn Fn(u64) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// Measures several operations fairly on a noisy machine: `rounds` rounds,
/// each running every operation `per_round` times in turn, so that drift in
/// the machine's load touches them all alike. Call numbers are distinct
/// across rounds. Answers each operation's latency over all its calls.
pub async fn interleaved(ops: &[(&str, Op)], rounds: u64, per_round: u64) -> Vec<Latency> {
    let mut histograms: Vec<Histogram<u64>> = ops
        .iter()
        .map(|_| Histogram::new(3).expect("a histogram"))
        .collect();
    for (_, op) in ops {
        for i in 0..per_round / 10 {
            op(u64::MAX - i).await;
        }
    }
    for round in 0..rounds {
        for ((_, op), histogram) in ops.iter().zip(&mut histograms) {
            for i in 0..per_round {
                let start = Instant::now();
                op(round * per_round + i).await;
                let nanos = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
                histogram
                    .record(nanos.max(1))
                    .expect("a recordable latency");
            }
        }
    }
    histograms
        .iter()
        .map(|h| Latency {
            p50: h.value_at_quantile(0.5) as f64 / 1_000.0,
            p99: h.value_at_quantile(0.99) as f64 / 1_000.0,
        })
        .collect()
}

/// Calls per second of `tasks` concurrent tasks calling `op` for `window`.
/// Task `t` gets call numbers `t`, `t + tasks`, `t + 2 × tasks`, …
pub async fn throughput<F, Fut>(tasks: u64, window: Duration, op: F) -> f64
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + window;
    let mut set = tokio::task::JoinSet::new();
    for t in 0..tasks {
        let (op, done) = (Arc::clone(&op), Arc::clone(&done));
        set.spawn(async move {
            let mut i = t;
            while Instant::now() < deadline {
                op(i).await;
                i += tasks;
                done.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    set.join_all().await;
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// A markdown table.
#[derive(Debug, Default)]
pub struct Table {
    out: String,
}

impl Table {
    /// A table with these column heads.
    pub fn new(heads: &[&str]) -> Self {
        let mut out = format!("| {} |\n|", heads.join(" | "));
        out.push_str(&"---|".repeat(heads.len()));
        out.push('\n');
        Self { out }
    }

    /// Adds a row.
    pub fn row(&mut self, cells: &[String]) {
        let _ = writeln!(self.out, "| {} |", cells.join(" | "));
    }

    /// The table's markdown.
    pub fn render(&self) -> &str {
        &self.out
    }
}

/// A horizontal bar chart as SVG: one bar per `(label, value)`, in `unit`.
pub fn bar_chart(title: &str, unit: &str, bars: &[(String, f64)]) -> String {
    let (width, label_width, bar_height, top) = (760.0, 300.0, 22.0, 40.0);
    let max = bars
        .iter()
        .map(|(_, v)| *v)
        .fold(0.0, f64::max)
        .max(f64::MIN_POSITIVE);
    let height = top + bars.len() as f64 * (bar_height + 8.0) + 20.0;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"13\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"24\" font-size=\"16\" font-weight=\"bold\">{title}</text>\n"
    );
    for (i, (label, value)) in bars.iter().enumerate() {
        let y = top + i as f64 * (bar_height + 8.0);
        let length = (width - label_width - 110.0) * value / max;
        let fill = if label.starts_with("idem ") {
            "#2b6cb0"
        } else {
            "#a0aec0"
        };
        let _ = write!(
            svg,
            "<text x=\"{x}\" y=\"{ty}\" text-anchor=\"end\">{label}</text>\n\
             <rect x=\"{bx}\" y=\"{y}\" width=\"{length:.1}\" height=\"{bar_height}\" fill=\"{fill}\"/>\n\
             <text x=\"{vx:.1}\" y=\"{ty}\">{value:.1} {unit}</text>\n",
            x = label_width - 8.0,
            ty = y + 16.0,
            bx = label_width,
            vx = label_width + length + 6.0,
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// This process's resident memory, in bytes (Linux).
pub fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}
