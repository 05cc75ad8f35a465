//! The app's event API and the forwarder.
//!
//! `POST /events` on the admin listener takes one CloudEvents-shaped JSON event or an array of
//! them, appends them to the spool (fsync) and answers `202` with their ids — or `429` with
//! `Retry-After` when the spool is past its limit (never a silent loss). The forwarder publishes
//! spooled events to the control plane's bus in spool order (so in order per key), retrying with
//! jittered backoff; the bus drops duplicates by id, so a crash between publish and cursor
//! update only re-sends.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Json,
    body::Bytes,
    extract::State,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use mesh_proto::{dial::Dialer, names, v1};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::{
    Shared,
    control::Backoff,
    spool::{Spool, SpoolError},
};

/// The spool, its group-commit writer and the forwarder's wake-up.
pub struct Outbox {
    pub spool: Arc<Mutex<Spool>>,
    pub wake: Notify,
    appends: std::sync::mpsc::Sender<Append>,
}

/// One publish waiting for the group commit.
struct Append {
    events: Vec<v1::Event>,
    done: tokio::sync::oneshot::Sender<Result<Vec<u64>, SpoolError>>,
}

impl Outbox {
    /// Wraps `spool` and starts its writer thread, which commits whatever publishes are waiting
    /// together (one write, one fsync) and stops when the outbox is dropped.
    pub fn new(spool: Spool) -> Outbox {
        let spool = Arc::new(Mutex::new(spool));
        let (appends, queue) = std::sync::mpsc::channel::<Append>();
        let writer = spool.clone();
        let spawned = std::thread::Builder::new().name("spool-writer".into()).spawn(move || {
            while let Ok(first) = queue.recv() {
                let mut group = vec![first];
                while group.len() < 1024
                    && let Ok(more) = queue.try_recv()
                {
                    group.push(more);
                }
                let batches: Vec<&[v1::Event]> = group.iter().map(|a| a.events.as_slice()).collect();
                let now = mesh_proto::unix_ms(std::time::SystemTime::now());
                let results = writer.lock().unwrap_or_else(|p| p.into_inner()).append_group(&batches, now);
                for (a, r) in group.into_iter().zip(results) {
                    let _ = a.done.send(r);
                }
            }
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the spool writer thread: publishing will fail");
        }
        Outbox { spool, wake: Notify::new(), appends }
    }

    /// Appends `events` durably (group-committed with concurrent publishes).
    async fn append(&self, events: Vec<v1::Event>) -> Result<Vec<u64>, SpoolError> {
        let (done, answer) = tokio::sync::oneshot::channel();
        let stopped = || SpoolError::Io {
            path: "spool".into(),
            source: std::io::Error::other("the spool writer stopped"),
        };
        self.appends.send(Append { events, done }).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// One event as the app sends it (CloudEvents attribute names; `topic` names the bus topic).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CloudEvent {
    topic: String,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    specversion: Option<String>,
    #[serde(default)]
    source: String,
    #[serde(rename = "type", default)]
    kind: String,
    /// The ordering key.
    #[serde(default)]
    subject: String,
    /// RFC 3339.
    #[serde(default)]
    time: Option<String>,
    #[serde(default)]
    datacontenttype: Option<String>,
    #[serde(default)]
    data: serde_json::Value,
    #[serde(default)]
    correlationid: String,
    #[serde(default)]
    causationid: String,
}

fn refuse(status: StatusCode, code: &str, message: String) -> Response {
    (status, Json(json!({"error": code, "message": message}))).into_response()
}

pub async fn publish(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    let Ok(outbox) = &s.outbox else {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "no_spool", "this sidecar has no event spool".into());
    };
    let value: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, "invalid_body", format!("not JSON: {e}")),
    };
    let items = match value {
        serde_json::Value::Array(items) => items,
        one => vec![one],
    };
    let mut list = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        match serde_json::from_value::<CloudEvent>(item) {
            Ok(c) => list.push(c),
            Err(e) => {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    "invalid_body",
                    format!("event {i} is not a CloudEvents JSON event: {e}"),
                );
            }
        }
    }
    if list.is_empty() || list.len() > 1000 {
        return refuse(StatusCode::BAD_REQUEST, "invalid_body", "send 1..=1000 events".into());
    }
    let mut events = Vec::with_capacity(list.len());
    for (i, c) in list.into_iter().enumerate() {
        if !names::is_topic(&c.topic) {
            return refuse(
                StatusCode::BAD_REQUEST,
                "invalid",
                format!("event {i}: topic {:?} must be 1..=128 of a-z, 0-9, '.', '_', '-'", c.topic),
            );
        }
        if c.specversion.as_deref().is_some_and(|v| v != "1.0") {
            return refuse(StatusCode::BAD_REQUEST, "invalid", format!("event {i}: specversion must be 1.0"));
        }
        let time = match &c.time {
            None => mesh_proto::unix_ms(std::time::SystemTime::now()),
            Some(t) => match humantime::parse_rfc3339_weak(t) {
                Ok(st) => mesh_proto::unix_ms(st),
                Err(e) => {
                    return refuse(
                        StatusCode::BAD_REQUEST,
                        "invalid",
                        format!("event {i}: time {t:?} is not RFC 3339: {e}"),
                    );
                }
            },
        };
        let id = c.id.filter(|id| !id.is_empty()).unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        if id.len() > 200 {
            return refuse(
                StatusCode::BAD_REQUEST,
                "invalid",
                format!("event {i}: id longer than 200 characters"),
            );
        }
        events.push(v1::Event {
            id,
            topic: c.topic,
            source: if c.source.is_empty() { s.config.service.clone().unwrap_or_default() } else { c.source },
            r#type: c.kind,
            key: c.subject,
            time_unix_ms: time,
            data: if c.data.is_null() { Vec::new() } else { c.data.to_string().into_bytes() },
            content_type: c.datacontenttype.unwrap_or_else(|| "application/json".into()),
            correlation_id: c.correlationid,
            causation_id: c.causationid,
            attributes: Default::default(),
        });
    }
    let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
    match outbox.append(events).await {
        Ok(_) => {
            s.metrics.events_spooled.inc_by(ids.len() as u64);
            outbox.wake.notify_one();
            (StatusCode::ACCEPTED, Json(json!({"ids": ids, "spooled": ids.len()}))).into_response()
        }
        Err(e @ (SpoolError::Full { .. } | SpoolError::TooOld { .. })) => {
            let code = if matches!(e, SpoolError::Full { .. }) { "spool_full" } else { "spool_stale" };
            let mut r = refuse(StatusCode::TOO_MANY_REQUESTS, code, e.to_string());
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
        Err(e) => refuse(StatusCode::SERVICE_UNAVAILABLE, "spool_failed", e.to_string()),
    }
}

/// A client of the control plane's event bus at `url`.
pub async fn connect_events(
    dialer: &Dialer,
    url: &str,
) -> Result<v1::events_client::EventsClient<tonic::transport::Channel>, String> {
    let ep = Dialer::endpoint(url).map_err(|e| e.to_string())?.connect_timeout(Duration::from_secs(3));
    let ch = dialer.connect(ep).await.map_err(|e| e.to_string())?;
    Ok(v1::events_client::EventsClient::new(ch))
}

/// Publishes spooled events to the bus until `stop`.
pub async fn forward(shared: Arc<Shared>, stop: CancellationToken) {
    let Ok(outbox) = &shared.outbox else { return };
    let urls = shared.config.control_plane.clone();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut client: Option<v1::events_client::EventsClient<tonic::transport::Channel>> = None;
    let mut attempt = 0usize;
    loop {
        let spool = outbox.spool.clone();
        let batch =
            tokio::task::spawn_blocking(move || spool.lock().unwrap_or_else(|p| p.into_inner()).peek(256))
                .await;
        let batch = match batch {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "reading the event spool failed");
                Vec::new()
            }
            Err(_) => Vec::new(),
        };
        if batch.is_empty() {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = outbox.wake.notified() => continue,
                _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
            }
        }
        if client.is_none() {
            let url = &urls[attempt % urls.len()];
            attempt += 1;
            client = connect_events(&shared.dialer, url).await.ok();
        }
        let n = batch.len() as u64;
        let sent = match &mut client {
            Some(c) => c.publish(v1::PublishRequest { events: batch }).await.map_err(|s| s.to_string()),
            None => Err("cannot reach the control plane".into()),
        };
        match sent {
            Ok(_) => {
                backoff.reset();
                let spool = outbox.spool.clone();
                match tokio::task::spawn_blocking(move || {
                    spool.lock().unwrap_or_else(|p| p.into_inner()).ack(n)
                })
                .await
                {
                    Ok(Ok(())) => {
                        shared.metrics.events_forwarded.inc_by(n);
                    }
                    other => tracing::error!(
                        ?other,
                        "recording forwarded events failed; they will be sent again (the bus drops duplicates)"
                    ),
                }
            }
            Err(e) => {
                client = None;
                let wait = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?wait, "forwarding events to the bus failed; they stay in the spool");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}
