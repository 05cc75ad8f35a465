//! The app's event API and the forwarder.
//!
//! `POST /events` on the admin listener takes CloudEvents 1.0 in structured, batch or binary
//! mode ([`cloudevent`]; the bus topic in the `topic` extension), appends them to the spool (fsync) and answers `202` with their ids — or `429` with
//! `Retry-After` when the spool is past its limit (never a silent loss). The forwarder publishes
//! spooled events to the control plane's bus in spool order (so in order per key), retrying with
//! jittered backoff; the bus drops duplicates by id, so a crash between publish and cursor
//! update only re-sends.

use crate::{
    events::{cloudevent, spool::SpoolError},
    shared::Shared,
};

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

fn refuse(status: StatusCode, code: &str, message: String) -> Response {
    mesh_runtime::error_response(status, code, message)
}

pub async fn publish(State(s): State<Arc<Shared>>, headers: http::HeaderMap, body: Bytes) -> Response {
    let Ok(outbox) = &s.outbox else {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "no_spool", "this sidecar has no event spool".into());
    };
    let source = s.config.service.clone().unwrap_or_default();
    let mut events = match cloudevent::parse(&headers, &body, &source) {
        Ok(events) => events,
        Err(r) => {
            let code = if r.attribute == "body" { "invalid_body" } else { "invalid" };
            let mut resp = refuse(StatusCode::BAD_REQUEST, code, r.message);
            if let Ok(v) = HeaderValue::from_str(&r.attribute) {
                resp.headers_mut().insert("x-mesh-attribute", v);
            }
            return resp;
        }
    };
    carry_trace(&headers, &mut events);
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

/// An event published inside a trace (the request's `traceparent`) without a trace of its own
/// carries the request's: the CloudEvents distributed tracing extension, which deliveries link
/// back to. One it already has is kept.
fn carry_trace(headers: &http::HeaderMap, events: &mut [v1::Event]) {
    let Some(tp) = headers.get("traceparent").and_then(|v| v.to_str().ok()) else { return };
    if mesh_runtime::telemetry::parse_traceparent(tp.as_bytes()).is_none() {
        return;
    }
    let state = headers.get("tracestate").and_then(|v| v.to_str().ok()).filter(|s| !s.is_empty());
    for e in events.iter_mut().filter(|e| !e.attributes.contains_key("traceparent")) {
        e.attributes.insert("traceparent".into(), tp.to_string());
        if let Some(s) = state {
            e.attributes.insert("tracestate".into(), s.to_string());
        }
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
            Ok(stream) => match mesh_proto::replay_json(stream.into_inner()).await {
                Ok(events) => return Json(json!({ "events": events })).into_response(),
                // Part of a replay is not the replay: the next control plane, or the error.
                Err(status) => last = format!("{url}: {}", status.message()),
            },
            Err(status) => last = format!("{url}: {}", status.message()),
        }
    }
    refuse(
        StatusCode::BAD_GATEWAY,
        "bus_unreachable",
        format!("cannot read the topic from the bus ({last}); retry when the control plane is back"),
    )
}
