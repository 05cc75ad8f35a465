//! The app's event API and the forwarder.
//!
//! `POST /events` on the admin listener takes one CloudEvents-shaped JSON event or an array of
//! them, appends them to the spool (fsync) and answers `202` with their ids — or `429` with
//! `Retry-After` when the spool is past its limit (never a silent loss). The forwarder publishes
//! spooled events to the control plane's bus in spool order (so in order per key), retrying with
//! jittered backoff; the bus drops duplicates by id, so a crash between publish and cursor
//! update only re-sends.

use crate::{events::spool::SpoolError, shared::Shared};

use axum::{
    Json,
    body::Bytes,
    extract::State,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use mesh_proto::{names, v1};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;

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
    mesh_runtime::error_response(status, code, message)
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
                format!("event {i}: topic {:?} must be {}", c.topic, names::TOPIC_RULE),
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayQuery {
    #[serde(default)]
    from: u64,
    #[serde(default)]
    limit: Option<u32>,
}

/// `GET /events/{topic}?from=OFFSET&limit=N`: the app reads a topic back from the bus (as this
/// sidecar's mesh identity), oldest first: `{"events": [...]}`, each as
/// [`mesh_proto::delivery_json`]. The first control plane that answers serves it.
pub async fn replay(
    State(s): State<Arc<Shared>>,
    axum::extract::Path(topic): axum::extract::Path<String>,
    query: Result<axum::extract::Query<ReplayQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    use futures::StreamExt;
    let q = match query {
        Ok(axum::extract::Query(q)) => q,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()),
    };
    if !names::is_topic(&topic) {
        return refuse(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!("topic {topic:?} must be {}", names::TOPIC_RULE),
        );
    }
    let req = v1::ReplayRequest {
        topic,
        from_offset: Some(q.from),
        from_time_unix_ms: None,
        limit: q.limit.unwrap_or(mesh_proto::DEFAULT_REPLAY_LIMIT).min(10_000),
    };
    let mut last = String::from("no control plane is configured");
    for url in &s.config.control_plane {
        let mut client = match crate::events::forwarder::connect_events(&s.dialer, url).await {
            Ok(c) => c,
            Err(e) => {
                last = format!("{url}: {e}");
                continue;
            }
        };
        match client.replay(req.clone()).await {
            Ok(stream) => {
                let read: Result<Vec<_>, _> = stream
                    .into_inner()
                    .map(|d| d.map(|d| mesh_proto::delivery_json(&d)))
                    .collect::<Vec<_>>()
                    .await
                    .into_iter()
                    .collect();
                match read {
                    Ok(events) => return Json(json!({ "events": events })).into_response(),
                    // Part of a replay is not the replay: the next control plane, or the error.
                    Err(status) => last = format!("{url}: {}", status.message()),
                }
            }
            Err(status) => last = format!("{url}: {}", status.message()),
        }
    }
    refuse(
        StatusCode::BAD_GATEWAY,
        "bus_unreachable",
        format!("cannot read the topic from the bus ({last}); retry when the control plane is back"),
    )
}
