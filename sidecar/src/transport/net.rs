//! The proxies' TCP streams: [`Coalesced`] sends a small vectored write as one flat `write`.

use std::{
    cell::RefCell,
    io::{self, IoSlice},
    pin::Pin,
    task::{Context, Poll},
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Vectored writes of at most this many bytes in all are copied into one buffer and written
/// with `write(2)`; larger ones go out as `writev(2)` without a copy.
pub const COALESCE_MAX: usize = 4096;

thread_local! {
    /// The copy buffer of [`Coalesced`]: one per worker thread, not one per connection.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(COALESCE_MAX));
}

/// A stream whose small vectored writes become one flat write. A response's head and a short
/// body arrive from hyper as two buffers, and a TLS record from rustls as a one-element
/// vector. Over loopback here, `writev` of 200 bytes took 130–260 ns longer than `send` (what
/// a flat write becomes) in five of six runs of `bench/writev.sh`, and as long in the sixth;
/// copying 200 bytes costs ~10 ns. Writes larger than [`COALESCE_MAX`] keep `writev`, so bodies
/// are never copied.
/// Measured on the mTLS mesh path at 64 connections, this build against the one before it
/// running at the same time on the same core (`PAIRED=1 bench/variants.sh`): 0–2 % less CPU
/// per request of the pair.
#[derive(Debug)]
pub struct Coalesced<S>(pub S);

impl<S> Coalesced<S> {
    pub fn get_ref(&self) -> &S {
        &self.0
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Coalesced<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Coalesced<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let inner = Pin::new(&mut self.get_mut().0);
        let mut filled = bufs.iter().filter(|b| !b.is_empty());
        let (first, second) = (filled.next(), filled.next());
        let Some(first) = first else { return inner.poll_write(cx, &[]) };
        if second.is_none() {
            return inner.poll_write(cx, first);
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total > COALESCE_MAX {
            return inner.poll_write_vectored(cx, bufs);
        }
        // A partial write reports how many bytes went out, counted across `bufs` in order,
        // exactly as `writev` would.
        SCRATCH.with_borrow_mut(|scratch| {
            scratch.clear();
            for b in bufs {
                scratch.extend_from_slice(b);
            }
            inner.poll_write(cx, scratch)
        })
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Records each write the wrapper passes down: flat (`write`) or vectored (`writev`).
    #[derive(Default)]
    struct Recorder {
        calls: Vec<(&'static str, Vec<u8>)>,
        accept: Option<usize>,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            let n = self.accept.unwrap_or(buf.len()).min(buf.len());
            self.calls.push(("write", buf[..n].to_vec()));
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            let n = self.accept.unwrap_or(all.len()).min(all.len());
            self.calls.push(("writev", all[..n].to_vec()));
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    async fn vectored(w: &mut Coalesced<Recorder>, bufs: &[&[u8]]) -> usize {
        let slices: Vec<IoSlice<'_>> = bufs.iter().map(|b| IoSlice::new(b)).collect();
        std::future::poll_fn(|cx| Pin::new(&mut *w).poll_write_vectored(cx, &slices)).await.unwrap()
    }

    #[tokio::test]
    async fn small_vectored_writes_go_down_flat_and_large_ones_vectored() {
        let mut w = Coalesced(Recorder::default());
        assert_eq!(vectored(&mut w, &[b"HTTP/1.1 200 OK\r\n\r\n", b"", b"body"]).await, 23);
        assert_eq!(vectored(&mut w, &[b"", b"one record"]).await, 10);
        let big = vec![7u8; COALESCE_MAX];
        assert_eq!(vectored(&mut w, &[b"head", &big]).await, COALESCE_MAX + 4);
        let kinds: Vec<_> = w.0.calls.iter().map(|(k, _)| *k).collect();
        assert_eq!(kinds, ["write", "write", "writev"]);
        assert_eq!(w.0.calls[0].1, b"HTTP/1.1 200 OK\r\n\r\nbody");
        assert_eq!(w.0.calls[1].1, b"one record");
    }

    #[tokio::test]
    async fn a_partial_write_counts_bytes_across_the_buffers_in_order() {
        let mut w = Coalesced(Recorder { accept: Some(6), ..Default::default() });
        assert_eq!(vectored(&mut w, &[b"head", b"body"]).await, 6);
        assert_eq!(w.0.calls[0].1, b"headbo");
    }

    #[tokio::test]
    async fn bytes_arrive_unchanged_over_a_real_socket() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, server) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let mut w = Coalesced(client.unwrap());
        let mut r = server.unwrap().0;
        let parts: [&[u8]; 3] = [b"GET / HTTP/1.1\r\n", b"host: a\r\n\r\n", b"x"];
        let slices: Vec<IoSlice<'_>> = parts.iter().map(|b| IoSlice::new(b)).collect();
        assert_eq!(
            w.write_vectored(&slices).await.unwrap(),
            28,
            "an empty loopback socket takes all 28 bytes"
        );
        w.shutdown().await.unwrap();
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"GET / HTTP/1.1\r\nhost: a\r\n\r\nx");
    }
}
