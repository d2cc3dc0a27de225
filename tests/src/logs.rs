//! What a test's thread logs through `tracing`, captured as text.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let capture = idem_test::logs::capture();
//! tracing::warn!(target: "idem", "the store is slow");
//! assert!(capture.text().contains("the store is slow"));
//! # }
//! ```
//!
//! The capture goes through a process-wide subscriber, installed on first
//! use, that asks on every span and event whether its thread is capturing.
//! A subscriber set for one thread (`tracing::subscriber::set_default`)
//! races `tracing`'s process-wide cache of which callsites are enabled:
//! while it is the only subscriber registered, that cache is rebuilt from
//! whatever thread rebuilds it, and a thread with no subscriber can leave a
//! callsite disabled for good, so that a test sees none of its events. When
//! the process already has another global subscriber, nothing is captured
//! and [`capture`] panics, saying so.
//!
//! Run the code whose logs you want on the capturing thread: in a
//! `current_thread` runtime, or `block_on` on it. Spans are told when they
//! close, with their fields.

use std::cell::RefCell;
use std::io;
use std::marker::PhantomData;
use std::sync::OnceLock;

use tracing_subscriber::Layer as _;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::layer::SubscriberExt as _;

thread_local! {
    /// The text this thread logged while it captures.
    static CAPTURED: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
}

/// Captures what this thread logs (events at every level, and spans as
/// they close) until the returned [`Capture`] is dropped.
///
/// # Panics
///
/// When the process has another global `tracing` subscriber, or this thread
/// captures already.
#[must_use = "the capture ends when it is dropped"]
pub fn capture() -> Capture {
    assert!(
        install(),
        "idem_test::logs needs to install the process's global tracing subscriber, \
         and another one is installed"
    );
    CAPTURED.with(|captured| {
        let mut captured = captured.borrow_mut();
        assert!(captured.is_none(), "this thread captures its logs already");
        *captured = Some(Vec::new());
    });
    Capture {
        _thread: PhantomData,
    }
}

/// A thread's capture of its logs; see [`capture`].
#[derive(Debug)]
pub struct Capture {
    /// The capture belongs to the thread that made it.
    _thread: PhantomData<*const ()>,
}

impl Capture {
    /// What the thread logged so far, one line per event or closed span.
    #[must_use]
    pub fn text(&self) -> String {
        CAPTURED.with(|captured| {
            String::from_utf8_lossy(captured.borrow().as_deref().unwrap_or_default()).into_owned()
        })
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        CAPTURED.with(|captured| captured.borrow_mut().take());
    }
}

/// Writes into the capturing thread's buffer.
struct ThreadWriter;

impl io::Write for ThreadWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        CAPTURED.with(|captured| {
            if let Some(captured) = captured.borrow_mut().as_mut() {
                captured.extend_from_slice(bytes);
            }
        });
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for ThreadWriter {
    type Writer = ThreadWriter;

    fn make_writer(&'a self) -> Self::Writer {
        ThreadWriter
    }
}

fn capturing() -> bool {
    CAPTURED
        .try_with(|captured| captured.try_borrow().is_ok_and(|c| c.is_some()))
        .unwrap_or(false)
}

/// Installs the process's global subscriber once: the checker's outcome
/// capture and the threads' logs. Answers whether it is installed.
pub(crate) fn install() -> bool {
    static INSTALLED: OnceLock<bool> = OnceLock::new();
    *INSTALLED.get_or_init(|| {
        let logs = tracing_subscriber::fmt::layer()
            .with_writer(ThreadWriter)
            .with_ansi(false)
            .with_span_events(FmtSpan::CLOSE)
            .with_filter(tracing_subscriber::filter::dynamic_filter_fn(|_, _| {
                capturing()
            }));
        let subscriber = tracing_subscriber::registry()
            .with(crate::checker::outcomes::Capture)
            .with(logs);
        tracing::subscriber::set_global_default(subscriber).is_ok()
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn each_thread_captures_its_own_logs() {
        let capture = super::capture();
        tracing::info!("on the test's thread");
        std::thread::spawn(|| tracing::info!("on another thread"))
            .join()
            .unwrap();
        let text = capture.text();
        assert!(text.contains("on the test's thread"), "{text}");
        assert!(!text.contains("another"), "{text}");
        drop(capture);
        let again = super::capture();
        assert!(again.text().is_empty(), "a new capture starts empty");
    }
}
