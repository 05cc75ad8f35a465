//! Spans of the market service: a server span per request that arrives in a sampled trace (the
//! sidecar in front of the service always sends one), a span per command under it and, from
//! the committer, a span for the store commit that made the command durable.

use axum::{
    extract::{MatchedPath, Request, State},
    middleware::Next,
    response::Response,
};
use http::{HeaderMap, HeaderValue};
use mesh_runtime::telemetry::{KeyValue, SpanContext, SpanKind, Telemetry, parse_traceparent};

const TRACEPARENT: &str = "traceparent";

/// The caller's trace context, as `traceparent` (and `tracestate`) carry it.
pub fn caller(h: &HeaderMap) -> Option<SpanContext> {
    let p = parse_traceparent(h.get(TRACEPARENT)?.as_bytes())?;
    Some(p.span_context(h.get("tracestate").and_then(|v| v.to_str().ok())))
}

/// Records the server span of a sampled request (`GET /markets/{id}`, by its route) and puts
/// it in the request's `traceparent`, where the handler's commands find their parent.
pub async fn server_span(
    State(telemetry): State<Telemetry>,
    route: Option<MatchedPath>,
    mut req: Request,
    next: Next,
) -> Response {
    let parent = caller(req.headers()).filter(|c| c.is_sampled() && telemetry.is_on());
    let Some(parent) = parent else { return next.run(req).await };
    let method = req.method().to_string();
    let mut attributes = vec![
        KeyValue::new("http.request.method", method.clone()),
        KeyValue::new("url.path", req.uri().path().to_string()),
    ];
    let name = match &route {
        Some(r) => {
            attributes.push(KeyValue::new("http.route", r.as_str().to_string()));
            format!("{method} {}", r.as_str())
        }
        None => method,
    };
    let Some(mut span) = telemetry.span(name, SpanKind::Server, Some(&parent), attributes) else {
        return next.run(req).await;
    };
    if let Ok(v) = HeaderValue::from_bytes(&span.traceparent_bytes()) {
        req.headers_mut().insert(TRACEPARENT, v);
    }
    let resp = next.run(req).await;
    span.status(resp.status().as_u16(), true);
    span.end();
    resp
}
