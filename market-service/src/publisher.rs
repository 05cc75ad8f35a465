//! The outbox publisher: drains events committed to the outbox (in the same transaction as the
//! change they describe) to the sidecar's event API, oldest first, and marks them published once
//! the sidecar has spooled them (202). A failure keeps them for the next round; a crash between
//! the 202 and the mark re-sends them, and the bus drops them as duplicates by event id.

use std::{path::PathBuf, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::{service::now_ms, store::Store};

/// Rows sent per request.
const BATCH: i64 = 200;

/// The sidecar's event API: `http://host:port` or `unix:/path`, over one kept connection.
struct Sidecar {
    target: Target,
    conn: Option<http1::SendRequest<Full<Bytes>>>,
}

enum Target {
    Tcp(String),
    Unix(PathBuf),
}

impl Sidecar {
    fn new(sidecar_admin: &str) -> Self {
        let target = match sidecar_admin.strip_prefix("unix:") {
            Some(path) => Target::Unix(path.into()),
            None => {
                Target::Tcp(sidecar_admin.trim_start_matches("http://").trim_end_matches('/').to_string())
            }
        };
        Self { target, conn: None }
    }

    /// POSTs `body` to `/events`; (status, body) of the answer.
    async fn post(&mut self, body: Bytes) -> Result<(http::StatusCode, Bytes), String> {
        self.call(http::Method::POST, "/events", body).await
    }

    async fn call(
        &mut self,
        method: http::Method,
        path: &str,
        body: Bytes,
    ) -> Result<(http::StatusCode, Bytes), String> {
        let mut conn = match self.conn.take() {
            Some(mut c) => match c.ready().await {
                Ok(()) => c,
                Err(_) => self.connect().await?, // the sidecar closed it: a new one
            },
            None => self.connect().await?,
        };
        let host = match &self.target {
            Target::Tcp(a) => a.as_str(),
            Target::Unix(_) => "localhost",
        };
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, host)
            .header("content-type", "application/json")
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        let resp = conn.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp.into_body().collect().await.map(|b| b.to_bytes()).map_err(|e| e.to_string())?;
        self.conn = Some(conn);
        Ok((status, body))
    }

    async fn connect(&self) -> Result<http1::SendRequest<Full<Bytes>>, String> {
        let (tx, conn) = match &self.target {
            Target::Tcp(addr) => {
                let s = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("{addr}: {e}"))?;
                let _ = s.set_nodelay(true);
                let (tx, conn) = http1::handshake(TokioIo::new(s)).await.map_err(|e| e.to_string())?;
                (tx, futures::future::Either::Left(conn))
            }
            Target::Unix(path) => {
                let s = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(|e| format!("unix:{}: {e}", path.display()))?;
                let (tx, conn) = http1::handshake(TokioIo::new(s)).await.map_err(|e| e.to_string())?;
                (tx, futures::future::Either::Right(conn))
            }
        };
        // The connection lives until `tx` is dropped (the publisher stops or reconnects).
        mesh_runtime::spawn(tracing::info_span!("sidecar_connection"), async move {
            let _ = conn.await;
        });
        Ok(tx)
    }
}

/// Every event of `topic` on the bus, oldest first, read back through the sidecar
/// (`GET /events/{topic}`): the `data` of each.
pub async fn read_topic(sidecar_admin: &str, topic: &str) -> Result<Vec<Value>, String> {
    const PAGE: u64 = 1000;
    let mut sidecar = Sidecar::new(sidecar_admin);
    let (mut out, mut from) = (Vec::new(), 0);
    loop {
        let path = format!("/events/{topic}?from={from}&limit={PAGE}");
        let (status, body) = tokio::time::timeout(
            Duration::from_secs(30),
            sidecar.call(http::Method::GET, &path, Bytes::new()),
        )
        .await
        .map_err(|_| format!("{sidecar_admin} did not answer within 30s"))??;
        if !status.is_success() {
            return Err(format!(
                "{sidecar_admin}{path} answered {status}: {}",
                String::from_utf8_lossy(&body)
            ));
        }
        let page: Value = serde_json::from_slice(&body).map_err(|e| format!("{sidecar_admin}{path}: {e}"))?;
        let events = page["events"].as_array().cloned().unwrap_or_default();
        let n = events.len() as u64;
        from = events.last().and_then(|e| e["offset"].as_u64()).map_or(from, |o| o + 1);
        out.extend(events.into_iter().map(|e| e["data"].clone()));
        if n < PAGE {
            return Ok(out);
        }
    }
}

/// Runs until `stop`, posting to the sidecar's `/events` (`http://host:port` or `unix:/path`).
pub async fn run(store: Store, sidecar_admin: String, stop: CancellationToken) {
    let mut sidecar = Sidecar::new(&sidecar_admin);
    let mut failures = 0u32;
    loop {
        let sent = publish_once(&store, &mut sidecar, &sidecar_admin).await;
        if sent.is_ok() {
            failures = 0;
        }
        let wait = match sent {
            Ok(n) if n as i64 == BATCH => Duration::ZERO,
            Ok(_) => Duration::from_millis(200),
            Err(e) => {
                failures += 1;
                let wait = Duration::from_millis(200 * 2u64.pow(failures.min(5)));
                tracing::warn!(error = %e, retry_in = ?wait, "publishing the outbox failed; the events stay in it");
                wait
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

async fn publish_once(store: &Store, sidecar: &mut Sidecar, url: &str) -> Result<usize, String> {
    let rows = store.outbox_pending(BATCH).await.map_err(|e| e.to_string())?;
    if rows.is_empty() {
        return Ok(0);
    }
    let events: Vec<Value> = rows
        .iter()
        .map(|r| {
            let mut event = json!({
                "specversion": "1.0",
                "topic": r.topic,
                "id": r.event_id,
                "source": "market-service",
                "type": r.event_type,
                "subject": r.key,
                "data": serde_json::from_str::<Value>(&r.payload).unwrap_or(Value::Null),
            });
            // CloudEvents distributed tracing: the trade (or other command) that caused it.
            if let Some(tp) = &r.traceparent {
                event["traceparent"] = json!(tp);
            }
            event
        })
        .collect();
    let body = Bytes::from(Value::Array(events).to_string());
    let (status, answer) = tokio::time::timeout(Duration::from_secs(10), sidecar.post(body))
        .await
        .map_err(|_| format!("{url} did not answer within 10s"))?
        .map_err(|e| format!("{url}: {e}"))?;
    if status != http::StatusCode::ACCEPTED {
        return Err(format!("{url} answered {status}: {}", String::from_utf8_lossy(&answer)));
    }
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    store.mark_published(&ids, now_ms() as i64).await.map_err(|e| e.to_string())?;
    Ok(rows.len())
}
