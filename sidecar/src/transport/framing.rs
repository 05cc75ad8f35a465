//! What hyper's HTTP/1.1 parser hides from the handler: a request head that carries both
//! `Content-Length` and `Transfer-Encoding`, or `Content-Length` more than once. hyper reads such a
//! message safely (the chunked framing wins and the connection closes; equal lengths merge), but
//! the gateway refuses them outright, as request-smuggling probes. [`Framed`] watches the bytes
//! hyper reads from a gateway connection — never changing them — follows each message's framing
//! as hyper does (head, then a `Content-Length` body or chunks), and queues one verdict per
//! request head in the connection's [`FramingLog`]; the edge takes one verdict per request, in
//! order. An HTTP/2 connection, or anything it cannot follow, turns it off (no verdicts: every
//! request passes).

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Verdicts of a connection's request heads, oldest first: the smuggling rule a head broke.
#[derive(Debug, Default)]
pub struct FramingLog(Mutex<VecDeque<Option<&'static str>>>);

impl FramingLog {
    /// The verdict of the connection's next request (`None`: nothing wrong, or not followed).
    pub fn next(&self) -> Option<&'static str> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).pop_front().flatten()
    }

    fn push(&self, verdict: Option<&'static str>) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push_back(verdict);
    }
}

/// Longest request head followed (hyper refuses longer ones itself).
const MAX_HEAD: usize = 64 * 1024;
/// Longest chunk-size or trailer line followed.
const MAX_LINE: usize = 8 * 1024;

#[derive(Debug)]
enum State {
    Head,
    Body(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkEnd(u8),
    Trailers,
    Off,
}

/// Follows HTTP/1.1 message framing over the bytes of one connection.
#[derive(Debug)]
pub struct Scanner {
    state: State,
    line: Vec<u8>,
    log: Arc<FramingLog>,
}

impl Scanner {
    pub fn new(log: Arc<FramingLog>) -> Self {
        Scanner { state: State::Head, line: Vec::new(), log }
    }

    /// Takes the next bytes the parser read.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match self.state {
                State::Off => return,
                State::Body(n) => {
                    let take = (bytes.len() as u64).min(n);
                    bytes = &bytes[take as usize..];
                    self.state = if n == take { State::Head } else { State::Body(n - take) };
                }
                State::ChunkData(n) => {
                    let take = (bytes.len() as u64).min(n);
                    bytes = &bytes[take as usize..];
                    self.state = if n == take { State::ChunkEnd(2) } else { State::ChunkData(n - take) };
                }
                State::ChunkEnd(k) => {
                    let take = bytes.len().min(usize::from(k));
                    bytes = &bytes[take..];
                    self.state = if usize::from(k) == take {
                        State::ChunkSize
                    } else {
                        State::ChunkEnd(k - take as u8)
                    };
                }
                State::Head if self.line.is_empty() && bytes.starts_with(b"\r\n") => {
                    // Empty lines before a request line are ignored (RFC 9112 §2.2).
                    bytes = &bytes[2..];
                }
                State::Head | State::ChunkSize | State::Trailers => {
                    let (limit, end): (usize, &[u8]) = if matches!(self.state, State::Head) {
                        (MAX_HEAD, b"\r\n\r\n")
                    } else {
                        (MAX_LINE, b"\r\n")
                    };
                    // Search the line so far (from just before the new bytes) for its end.
                    let from = self.line.len().saturating_sub(end.len() - 1);
                    let room = (limit + end.len()).saturating_sub(self.line.len());
                    self.line.extend_from_slice(&bytes[..bytes.len().min(room)]);
                    let found = self.line[from..].windows(end.len()).position(|w| w == end);
                    let (used, done) = match found {
                        Some(at) => {
                            let line_end = from + at + end.len();
                            let used = bytes.len().min(room) - (self.line.len() - line_end);
                            self.line.truncate(line_end);
                            (used, true)
                        }
                        None if self.line.len() > limit => {
                            self.state = State::Off;
                            return;
                        }
                        None => (bytes.len(), false),
                    };
                    bytes = &bytes[used..];
                    if done {
                        let line = std::mem::take(&mut self.line);
                        self.state = match self.state {
                            State::Head => self.head(&line),
                            State::ChunkSize => chunk_size(&line),
                            _ if line == b"\r\n" => State::Head,
                            _ => State::Trailers,
                        };
                    }
                }
            }
        }
    }

    /// A complete head: its verdict, and how its body is framed.
    fn head(&mut self, head: &[u8]) -> State {
        if head.starts_with(b"PRI * HTTP/2.0") {
            return State::Off;
        }
        let text = String::from_utf8_lossy(head);
        let mut lengths = Vec::new();
        let mut codings: Option<String> = None;
        for line in text.split("\r\n").skip(1) {
            let Some((name, value)) = line.split_once(':') else { continue };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                lengths.push(value.to_string());
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                codings = Some(match codings {
                    Some(c) => format!("{c},{value}"),
                    None => value.to_string(),
                });
            }
        }
        let verdict = match (&codings, lengths.len()) {
            (Some(_), n) if n > 0 => Some("smuggling_cl_te"),
            (_, n) if n > 1 => Some("smuggling_content_length"),
            _ => None,
        };
        self.log.push(verdict);
        match (codings, lengths.first()) {
            (Some(c), _)
                if c.rsplit(',').next().is_some_and(|l| l.trim().eq_ignore_ascii_case("chunked")) =>
            {
                State::ChunkSize
            }
            // Any other coding: the parser refuses the message and closes.
            (Some(_), _) => State::Off,
            (None, Some(len)) => match len.split(',').next().unwrap_or("").trim().parse::<u64>() {
                Ok(0) => State::Head,
                Ok(n) => State::Body(n),
                Err(_) => State::Off,
            },
            (None, None) => State::Head,
        }
    }
}

fn chunk_size(line: &[u8]) -> State {
    let text = String::from_utf8_lossy(line);
    let size = text.trim_end().split(';').next().unwrap_or("").trim();
    match u64::from_str_radix(size, 16) {
        Ok(0) => State::Trailers,
        Ok(n) => State::ChunkData(n),
        Err(_) => State::Off,
    }
}

/// A connection whose reads are followed by a [`Scanner`].
pub struct Framed<S> {
    inner: S,
    scanner: Scanner,
}

impl<S> Framed<S> {
    pub fn new(inner: S, log: Arc<FramingLog>) -> Self {
        Framed { inner, scanner: Scanner::new(log) }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Framed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let this = &mut *self;
            this.scanner.feed(&buf.filled()[before..]);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Framed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Verdicts for `wire` fed in pieces of `step` bytes.
    fn verdicts(wire: &[u8], step: usize) -> Vec<Option<&'static str>> {
        let log = Arc::new(FramingLog::default());
        let mut s = Scanner::new(log.clone());
        for piece in wire.chunks(step) {
            s.feed(piece);
        }
        let mut out = Vec::new();
        while let Some(v) = log.0.lock().unwrap().pop_front() {
            out.push(v);
        }
        out
    }

    #[test]
    fn each_head_of_a_pipelined_connection_gets_its_verdict_across_any_split() {
        let wire = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n\
POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n\
POST /d HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc\
POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
GET /f HTTP/1.1\r\nHost: x\r\n\r\n";
        let want = vec![None, None, None, Some("smuggling_content_length"), Some("smuggling_cl_te"), None];
        for step in [1, 2, 3, 7, 64, wire.len()] {
            assert_eq!(verdicts(wire, step), want, "fed {step} bytes at a time");
            // An empty line before a request line is skipped, as the parser does.
            assert_eq!(verdicts(&[&b"\r\n"[..], wire].concat(), step.max(2)), want, "after a CRLF, {step}");
        }
    }

    #[test]
    fn http2_and_unfollowable_framing_turn_it_off() {
        assert!(verdicts(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nGET / HTTP/1.1\r\n\r\n", 5).is_empty());
        let gzip = b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\nGET / HTTP/1.1\r\n\r\n";
        assert_eq!(verdicts(gzip, 4), vec![None], "the parser refuses it and closes");
        let huge = vec![b'a'; MAX_HEAD + 10];
        assert!(verdicts(&huge, 1000).is_empty());
    }
}
