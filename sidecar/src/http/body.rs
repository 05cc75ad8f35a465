//! The body type every proxied request and response has, and bodies that hold a guard.

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt, combinators::UnsyncBoxBody};
use std::{
    pin::Pin,
    task::{Context, Poll},
};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every body the proxies handle: streamed, never buffered whole.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

pub fn boxed<B>(b: B) -> Body
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    b.map_err(Into::into).boxed_unsync()
}

pub fn empty() -> Body {
    boxed(http_body_util::Empty::new())
}

/// Reads a whole body of at most `limit` bytes (trailers are dropped).
pub async fn collect_up_to<B>(mut body: B, limit: usize) -> Result<Bytes, String>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                return Err(format!("the body is larger than {limit} bytes"));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

/// A response body that holds a guard (an endpoint's in-flight slot, the app's load unit) until
/// the body ends, so streams count as load for as long as they are open.
pub struct Tracked<B, G> {
    inner: B,
    slot: Option<G>,
}

impl<B, G> Tracked<B, G> {
    pub fn new(inner: B, guard: G) -> Self {
        Self { inner, slot: Some(guard) }
    }
}

impl<B: HttpBody + Unpin, G: Unpin> HttpBody for Tracked<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.slot = None;
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
