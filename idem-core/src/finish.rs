//! A future that ends even when its awaiter is dropped first.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

/// A future polled in place by the one that awaits it, and moved to a task
/// of its own when that one is dropped before it ends, so that it still
/// ends. A task from the start would cost every use a spawn and, on a
/// runtime whose other workers sleep, the wake of one to run it.
///
/// Its users: the HTTP layer's call, which must end and record its response
/// when its client hangs up (or its response streams on); and a
/// transactional call's `BEGIN`, which, cut off on its way, would leave its
/// transaction open on a pooled connection (the database client rolls back
/// only the transactions it saw begin). A panic that escapes the future is
/// answered as `Err` with its payload.
pub(crate) struct FinishOnDrop<F: Future<Output: Send + 'static> + Send + 'static> {
    future: Option<Pin<Box<F>>>,
    /// What it is, for the warning when its runtime is gone.
    what: &'static str,
}

impl<F: Future<Output: Send + 'static> + Send + 'static> FinishOnDrop<F> {
    pub(crate) fn new(what: &'static str, future: F) -> Self {
        Self {
            future: Some(Box::pin(future)),
            what,
        }
    }
}

impl<F: Future<Output: Send + 'static> + Send + 'static> Future for FinishOnDrop<F> {
    type Output = Result<F::Output, Box<dyn Any + Send>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(future) = self.future.as_mut() else {
            return Poll::Ready(Err(Box::new("polled after it ended")));
        };
        let polled = std::panic::catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(cx)));
        let output = match polled {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(output)) => Ok(output),
            Err(panic) => Err(panic),
        };
        self.future = None;
        Poll::Ready(output)
    }
}

impl<F: Future<Output: Send + 'static> + Send + 'static> Drop for FinishOnDrop<F> {
    fn drop(&mut self) {
        if let Some(future) = self.future.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn(future)),
                // The runtime is gone: so would a task of its own be.
                Err(_) => tracing::warn!(
                    "idem: {} was dropped with its runtime before it ended",
                    self.what
                ),
            }
        }
    }
}
