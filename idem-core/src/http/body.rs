//! [`ResponseBody`]: the body of every response the layer answers with —
//! the inner service's own (passed through), a stored one (replayed), or a
//! stream copied on its way to the client.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;

/// A boxed error of a response body.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The frames of a response being streamed to its client while the layer
/// copies them.
pub(crate) type FrameSender = mpsc::Sender<Result<Frame<Bytes>, BoxError>>;

/// The body of the responses of an [`IdempotencyService`](super::IdempotencyService):
/// the inner service's body as it came, or one the layer made (a replay, a
/// problem, a response it streams through while copying it).
///
/// It is an [`http_body::Body`] of [`Bytes`] with boxed errors, as axum,
/// hyper and tonic take.
pub struct ResponseBody<B> {
    kind: Kind<B>,
}

enum Kind<B> {
    /// The inner service's body, unread.
    Inner(Pin<Box<B>>),
    /// A whole body (and its trailers) in memory.
    Full {
        data: Option<Bytes>,
        trailers: Option<HeaderMap>,
    },
    /// The frames the layer forwards while it copies them.
    Stream(mpsc::Receiver<Result<Frame<Bytes>, BoxError>>),
}

impl<B> ResponseBody<B> {
    pub(crate) fn inner(body: B) -> Self {
        Self {
            kind: Kind::Inner(Box::pin(body)),
        }
    }

    pub(crate) fn full(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        Self {
            kind: Kind::Full {
                data: (!data.is_empty()).then_some(data),
                trailers,
            },
        }
    }

    /// A body streamed from the frames sent to the returned sender. At most
    /// a few frames wait in between: a slow client slows the copy, and a
    /// response is never held whole.
    pub(crate) fn stream() -> (FrameSender, Self) {
        let (sender, receiver) = mpsc::channel(4);
        let body = Self {
            kind: Kind::Stream(receiver),
        };
        (sender, body)
    }
}

impl<B> From<Bytes> for ResponseBody<B> {
    fn from(data: Bytes) -> Self {
        Self::full(data, None)
    }
}

impl<B> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Inner(_) => "inner",
            Kind::Full { .. } => "full",
            Kind::Stream(_) => "stream",
        };
        f.debug_struct("ResponseBody").field("kind", &kind).finish()
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().kind {
            Kind::Inner(body) => body.as_mut().poll_frame(cx).map(|frame| {
                frame.map(|frame| match frame {
                    Ok(frame) => {
                        Ok(frame.map_data(|mut data| data.copy_to_bytes(data.remaining())))
                    }
                    Err(error) => Err(error.into()),
                })
            }),
            Kind::Full { data, trailers } => Poll::Ready(match data.take() {
                Some(data) => Some(Ok(Frame::data(data))),
                None => trailers.take().map(|t| Ok(Frame::trailers(t))),
            }),
            Kind::Stream(frames) => frames.poll_recv(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner(body) => body.is_end_stream(),
            Kind::Full { data, trailers } => data.is_none() && trailers.is_none(),
            Kind::Stream(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner(body) => body.size_hint(),
            Kind::Full { data, trailers } => {
                let len = data.as_ref().map_or(0, |d| d.len() as u64);
                // With trailers, no exact size: an HTTP/1.1 server sends a
                // body of known size with `Content-Length`, which has no
                // room for trailers, and one of unknown size chunked, with
                // them.
                if trailers.as_ref().is_some_and(|t| !t.is_empty()) {
                    let mut hint = SizeHint::new();
                    hint.set_lower(len);
                    hint
                } else {
                    SizeHint::with_exact(len)
                }
            }
            Kind::Stream(_) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt as _;

    use super::*;

    #[test]
    fn a_full_body_without_trailers_has_its_exact_size() {
        let body: ResponseBody<http_body_util::Empty<Bytes>> =
            ResponseBody::full(Bytes::from_static(b"abc"), None);
        assert_eq!(body.size_hint().exact(), Some(3));
    }

    #[tokio::test]
    async fn a_full_body_sends_its_data_then_its_trailers() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("9"));
        let body: ResponseBody<http_body_util::Empty<Bytes>> =
            ResponseBody::full(Bytes::from_static(b"abc"), Some(trailers.clone()));
        assert_eq!(
            (body.size_hint().lower(), body.size_hint().exact()),
            (3, None),
            "sent chunked over HTTP/1.1, where trailers have room"
        );
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.trailers(), Some(&trailers));
        assert_eq!(collected.to_bytes(), "abc");
    }
}
