//! The gateway's access log: one JSON object per line per request (time, client, subject,
//! method, path, route, service, endpoint, status, bytes in and out, duration, request and
//! trace ids, the refusal rule if any), written when the response has been sent (its body
//! ended or was abandoned), to stdout or a file, off, or sampled (refusals always kept).
//!
//! Lines are appended to a bounded buffer that one writer thread writes out in batches, so a
//! slow disk never holds a request; lines that do not fit are counted
//! (`mesh_sidecar_access_log_dropped_total`), not waited for.

use std::{
    io::Write,
    path::PathBuf,
    pin::Pin,
    sync::{Arc, Condvar, Mutex},
    task::{Context, Poll},
    time::SystemTime,
};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use serde::Serialize;
use tokio::time::Instant;

use crate::http::body::{Body, BoxError};

/// Where the lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    Off,
    Stdout,
    File(PathBuf),
}

impl std::str::FromStr for Sink {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Sink::Off),
            "stdout" | "-" => Ok(Sink::Stdout),
            "" => Err("--access-log: off, stdout or a file path".into()),
            path => Ok(Sink::File(path.into())),
        }
    }
}

/// One request, as logged.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub time: String,
    pub client_ip: String,
    pub subject: Option<String>,
    pub method: String,
    pub path: String,
    pub route: Option<String>,
    pub service: Option<String>,
    pub endpoint: Option<String>,
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration_ms: f64,
    pub request_id: String,
    pub trace_id: String,
    /// The screening, CORS, rate-limit, IP or authentication rule that refused (or, in detect
    /// mode, flagged) the request.
    pub rule: Option<&'static str>,
}

/// Bytes of lines held for the writer at most; past it, lines are dropped and counted.
const MAX_PENDING: usize = 4 * 1024 * 1024;
/// The writer wakes at least this often (and sooner when a batch fills).
const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_millis(100);
/// A batch this large wakes the writer at once.
const BATCH: usize = 256 * 1024;

/// The lines waiting for the writer, and whether the log was dropped.
struct Pending {
    lines: Mutex<(Vec<u8>, bool)>,
    ready: Condvar,
}

pub struct AccessLog {
    pending: Arc<Pending>,
    /// The share of successful requests logged (refusals are always).
    sample: f64,
    dropped: prometheus_client::metrics::counter::Counter,
}

impl AccessLog {
    /// The log, with its writer on a thread of its own that wakes every 100 ms (or when a batch
    /// fills) and writes what accumulated: a request only appends its line to a buffer — no
    /// wake-up per line — and a blocked stdout or a slow disk never holds a runtime worker. The
    /// thread writes what is left and ends once the log is dropped. `None` when off.
    pub fn start(
        sink: &Sink,
        sample: f64,
        dropped: prometheus_client::metrics::counter::Counter,
    ) -> std::io::Result<Option<Arc<AccessLog>>> {
        let mut out: Box<dyn Write + Send> = match sink {
            Sink::Off => return Ok(None),
            Sink::Stdout => Box::new(std::io::stdout()),
            Sink::File(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)?;
                }
                Box::new(std::fs::OpenOptions::new().create(true).append(true).open(path)?)
            }
        };
        let pending = Arc::new(Pending {
            lines: Mutex::new((Vec::with_capacity(BATCH), false)),
            ready: Condvar::new(),
        });
        let shared = pending.clone();
        std::thread::Builder::new().name("access-log".into()).spawn(move || {
            let mut batch = Vec::with_capacity(BATCH);
            loop {
                let closed = {
                    let guard = shared.lines.lock().unwrap_or_else(|p| p.into_inner());
                    let (mut guard, _) = shared
                        .ready
                        .wait_timeout_while(guard, FLUSH_EVERY, |(lines, closed)| lines.len() < BATCH && !*closed)
                        .unwrap_or_else(|p| p.into_inner());
                    std::mem::swap(&mut guard.0, &mut batch);
                    guard.1
                };
                if !batch.is_empty() {
                    if let Err(e) = out.write_all(&batch).and_then(|()| out.flush()) {
                        tracing::warn!(error = %e, "the access log cannot be written; lines are lost until it can");
                    }
                    batch.clear();
                }
                if closed {
                    return;
                }
            }
        })?;
        Ok(Some(Arc::new(AccessLog { pending, sample: sample.clamp(0.0, 1.0), dropped })))
    }

    /// Whether a request with this outcome is logged.
    pub fn wanted(&self, refused: bool) -> bool {
        refused || self.sample >= 1.0 || rand::random::<f64>() < self.sample
    }

    fn write(&self, r: &Record) {
        let mut lines = self.pending.lines.lock().unwrap_or_else(|p| p.into_inner());
        if lines.0.len() >= MAX_PENDING {
            drop(lines);
            self.dropped.inc();
            return;
        }
        if serde_json::to_writer(&mut lines.0, r).is_ok() {
            lines.0.push(b'\n');
        }
        if lines.0.len() >= BATCH {
            self.pending.ready.notify_one();
        }
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        self.pending.lines.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
        self.pending.ready.notify_one();
    }
}

/// A response body that counts what it sends and writes the request's line when it ends or is
/// dropped.
pub struct Logged {
    inner: Body,
    log: Arc<AccessLog>,
    record: Option<Box<Record>>,
    started: Instant,
}

impl Logged {
    pub fn wrap(inner: Body, log: Arc<AccessLog>, record: Record, started: Instant) -> Body {
        crate::http::body::boxed(Logged { inner, log, record: Some(Box::new(record)), started })
    }

    fn finish(&mut self) {
        if let Some(mut r) = self.record.take() {
            r.duration_ms = self.started.elapsed().as_secs_f64() * 1000.0;
            self.log.write(&r);
        }
    }
}

impl HttpBody for Logged {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(r)) = (frame.data_ref(), self.record.as_mut()) {
                    r.bytes_out += data.len() as u64;
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.finish(),
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

impl Drop for Logged {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The time now as the log writes it.
pub fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}
