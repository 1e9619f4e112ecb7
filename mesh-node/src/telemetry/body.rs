//! Bodies that measure themselves as they stream, for the request metrics: sizes, the gRPC
//! status in trailers, and when the last byte went. Nothing is buffered; a frame passes
//! through with one addition and, for trailers, one header lookup.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use hyper::{
    HeaderMap,
    body::{Body, Frame, SizeHint},
};

/// How a measured response body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    /// Body bytes that passed.
    pub bytes: u64,
    /// The gRPC status, from the trailers (or from the head, given at the start).
    pub grpc_status: Option<u32>,
    pub how: End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The last frame passed.
    Complete,
    /// The body failed (the upstream reset or closed mid-answer).
    Failed,
    /// Dropped before its end: the client went away.
    Dropped,
}

/// `grpc-status` in a head or trailers.
pub fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers.get("grpc-status")?.to_str().ok()?.trim().parse().ok()
}

/// A response body that calls `on_end` once, when its last frame has passed, it failed, or
/// it was dropped unfinished.
pub struct Metered<B, F: FnOnce(Ended)> {
    inner: B,
    bytes: u64,
    grpc_status: Option<u32>,
    on_end: Option<F>,
}

impl<B: Body, F: FnOnce(Ended)> Metered<B, F> {
    /// `grpc_status`: what the response head said (a trailers-only answer); trailers
    /// override it.
    pub fn new(inner: B, grpc_status: Option<u32>, on_end: F) -> Self {
        let mut metered = Metered { inner, bytes: 0, grpc_status, on_end: Some(on_end) };
        if metered.inner.is_end_stream() {
            metered.end(End::Complete);
        }
        metered
    }
}

impl<B, F: FnOnce(Ended)> Metered<B, F> {
    fn end(&mut self, how: End) {
        if let Some(on_end) = self.on_end.take() {
            on_end(Ended { bytes: self.bytes, grpc_status: self.grpc_status, how });
        }
    }
}

impl<B, F> Body for Metered<B, F>
where
    B: Body<Data = Bytes> + Unpin,
    F: FnOnce(Ended) + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                } else if let Some(trailers) = frame.trailers_ref()
                    && let Some(status) = grpc_status(trailers)
                {
                    self.grpc_status = Some(status);
                }
                if self.inner.is_end_stream() {
                    self.end(End::Complete);
                }
            }
            Poll::Ready(None) => self.end(End::Complete),
            Poll::Ready(Some(Err(_))) => self.end(End::Failed),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B, F: FnOnce(Ended)> Drop for Metered<B, F> {
    fn drop(&mut self) {
        self.end(End::Dropped);
    }
}

/// A request body that adds the bytes it passes to a shared count (read when the answer
/// ends: a body still streaming by then counts what had passed).
pub struct Counted<B> {
    inner: B,
    count: Arc<AtomicU64>,
}

impl<B> Counted<B> {
    pub fn new(inner: B, count: Arc<AtomicU64>) -> Self {
        Counted { inner, count }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use http_body_util::{BodyExt, Full, StreamBody};

    use super::*;

    #[tokio::test]
    async fn counts_bytes_and_reads_the_grpc_status_from_trailers() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "14".parse().unwrap());
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
            Ok(Frame::data(Bytes::from_static(b"hello"))),
            Ok(Frame::data(Bytes::from_static(b" world"))),
            Ok(Frame::trailers(trailers)),
        ];
        let seen = Arc::new(Mutex::new(None));
        let s = Arc::clone(&seen);
        let body = Metered::new(StreamBody::new(tokio_stream::iter(frames)), Some(0), move |e| {
            *s.lock().unwrap() = Some(e);
        });
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.trailers().and_then(grpc_status), Some(14));
        assert_eq!(
            *seen.lock().unwrap(),
            Some(Ended { bytes: 11, grpc_status: Some(14), how: End::Complete })
        );
    }

    #[tokio::test]
    async fn a_body_dropped_unfinished_ends_incomplete_and_an_empty_one_at_once() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = Arc::clone(&seen);
        let body =
            Metered::new(Full::new(Bytes::from_static(b"abc")), None, move |e| s.lock().unwrap().push(e));
        drop(body);
        let s = Arc::clone(&seen);
        let empty = Metered::new(Full::new(Bytes::new()), Some(5), move |e| s.lock().unwrap().push(e));
        assert_eq!(seen.lock().unwrap().len(), 2, "an empty body ends when it is made");
        drop(empty);
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                Ended { bytes: 0, grpc_status: None, how: End::Dropped },
                Ended { bytes: 0, grpc_status: Some(5), how: End::Complete },
            ]
        );
    }

    #[tokio::test]
    async fn counted_adds_what_passes() {
        let count = Arc::new(AtomicU64::new(0));
        Counted::new(Full::new(Bytes::from_static(b"12345678")), Arc::clone(&count)).collect().await.unwrap();
        assert_eq!(count.load(Ordering::Relaxed), 8);
    }
}
