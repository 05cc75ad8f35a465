//! The admin listener: `/metrics`, `/live`, `/ready`, `/config`; on a gateway also
//! `/gateway/routes` (the routes in force), `/gateway/blocks` (clients blocked now) and
//! `DELETE /gateway/blocks/{ip}` (lift a block).

use std::sync::{Arc, atomic::Ordering};

use axum::{
    Json, Router,
    extract::{Path, State},
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use serde_json::json;

use crate::{config::Mode, events::api, gateway::edge::Edge, identity, metrics::Metrics, shared::Shared};

pub fn router(shared: Arc<Shared>, edge: Option<Arc<Edge>>) -> Router {
    let gateway = match edge {
        Some(edge) => Router::new()
            .route("/gateway/routes", get(routes))
            .route("/gateway/blocks", get(blocks))
            .route("/gateway/blocks/{ip}", axum::routing::delete(unblock))
            .with_state(edge),
        None => Router::new(),
    };
    Router::new()
        .route("/metrics", get(metrics))
        .route("/live", get(|| async { Json(json!({"status": "live"})) }))
        .route("/ready", get(ready))
        .route("/config", get(config))
        .route("/cache/invalidate", axum::routing::post(invalidate))
        .route("/events", axum::routing::post(api::publish))
        .route("/events/{topic}", get(api::replay))
        .fallback(|| async {
            mesh_runtime::error_response(
                StatusCode::NOT_FOUND,
                "not_found",
                "try /metrics, /ready, /live or /config",
            )
        })
        .with_state(shared)
        .merge(gateway)
}

/// The routes in force, in precedence order, and the `gateway` policy version they came from
/// (0: the gateway's own `--route`s).
async fn routes(State(edge): State<Arc<Edge>>) -> impl IntoResponse {
    let table = edge.routes();
    Json(json!({ "version": table.version, "routes": table.routes }))
}

async fn blocks(State(edge): State<Arc<Edge>>) -> impl IntoResponse {
    Json(json!({ "blocks": edge.ip_filter.blocks(tokio::time::Instant::now()) }))
}

async fn unblock(State(edge): State<Arc<Edge>>, Path(ip): Path<String>) -> axum::response::Response {
    let Ok(addr) = ip.parse::<std::net::IpAddr>() else {
        return mesh_runtime::error_response(
            StatusCode::BAD_REQUEST,
            "invalid_address",
            format!("{ip:?} is not an IPv4 or IPv6 address"),
        )
        .into_response();
    };
    if edge.ip_filter.unblock(addr) {
        tracing::info!(client = %addr, "block lifted by an operator");
        Json(json!({ "unblocked": addr })).into_response()
    } else {
        mesh_runtime::error_response(StatusCode::NOT_FOUND, "not_blocked", format!("{addr} is not blocked"))
            .into_response()
    }
}

async fn metrics(State(s): State<Arc<Shared>>, headers: axum::http::HeaderMap) -> impl IntoResponse {
    let m = &s.metrics;
    for up in s.upstreams.all() {
        let set = up.endpoints();
        m.endpoints.get_or_create(&vec![("service", up.name.clone())]).set(set.endpoints.len() as i64);
        let now = tokio::time::Instant::now();
        for e in &set.endpoints {
            let labels = vec![("service", up.name.clone()), ("endpoint", e.info.id.clone())];
            m.endpoint_inflight.get_or_create(&labels).set(e.inflight() as i64);
            m.endpoint_breaker_open.get_or_create(&labels).set(i64::from(e.breaker.is_open(now)));
        }
        m.policy_version.get_or_create(&vec![("service", up.name.clone())]).set(up.policy().version as i64);
        let (entries, bytes) = up.cache.size();
        m.cache_entries.get_or_create(&vec![("service", up.name.clone())]).set(entries as i64);
        m.cache_bytes.get_or_create(&vec![("service", up.name.clone())]).set(bytes as i64);
    }
    if let Some(own) = &s.config.service {
        m.policy_version.get_or_create(&vec![("service", own.clone())]).set(s.own_policy.borrow().0 as i64);
    }
    m.app_healthy.set(i64::from(*s.app_healthy.borrow()));
    if let Ok(outbox) = &s.outbox {
        let spool = outbox.spool.lock().unwrap_or_else(|p| p.into_inner());
        m.spool_pending.set(spool.pending() as i64);
        m.spool_bytes.set(spool.pending_bytes() as i64);
        let now = mesh_proto::unix_ms(std::time::SystemTime::now());
        m.spool_oldest_age_seconds.set((spool.oldest_age_ms(now) / 1000) as i64);
        m.spool_commits.set(spool.commits() as i64);
    }
    let accept = headers.get(header::ACCEPT).and_then(|a| a.to_str().ok());
    let (kind, body) = mesh_runtime::exposition::negotiate(accept, m.render());
    ([(header::CONTENT_TYPE, kind)], body)
}

/// Ready when the app is healthy (sidecar mode) and configuration came from the control plane
/// or from the snapshot.
async fn ready(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    let app_ok = s.config.mode == Mode::Gateway || *s.app_healthy.borrow();
    let config_ok = s.cp.synced.load(Ordering::Relaxed) || s.cp.from_snapshot.load(Ordering::Relaxed);
    let mut reasons = Vec::new();
    if !app_ok {
        reasons.push("the local app does not pass its health probe");
    }
    if !config_ok {
        reasons.push("no configuration yet: the control plane has not answered and there is no snapshot");
    }
    if s.mtls() && s.identity.current().is_none() {
        reasons.push("no mesh certificate yet: the CA has not certified this sidecar");
    }
    if s.stopping.is_cancelled() {
        reasons.push("shutting down");
    }
    let status = if reasons.is_empty() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(json!({"ready": reasons.is_empty(), "reasons": reasons})))
}

async fn config(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    let c = &s.config;
    let now = tokio::time::Instant::now();
    let (own_version, own_policy) = s.own_policy.borrow().clone();
    let upstreams: Vec<_> = s
        .upstreams
        .all()
        .iter()
        .map(|u| {
            let set = u.endpoints();
            let p = u.policy();
            json!({
                "service": u.name,
                "source": u.source(),
                "endpoints_version": set.version,
                "endpoints": set.endpoints.iter().map(|e| json!({
                    "id": e.info.id, "address": e.info.address, "zone": e.info.zone, "weight": e.info.weight,
                    "inflight": e.inflight(), "latency_ewma_ms": e.latency_estimate().as_secs_f64() * 1000.0,
                    "breaker": if e.breaker.is_open(now) { "open" } else { e.breaker.state(now).name() },
                })).collect::<Vec<_>>(),
                "policy_version": p.version,
                "cache": { "entries": u.cache.size().0, "bytes": u.cache.size().1 },
                "counters": counters(&s.metrics, &u.name),
                "policy": *p.policy,
            })
        })
        .collect();
    Json(json!({
        "mode": c.mode,
        "service": c.service,
        "instance_id": c.instance_id,
        "advertise_addr": c.advertise_addr,
        "control_plane": {
            "urls": c.control_plane,
            "current": *s.cp.url.lock().unwrap_or_else(|p| p.into_inner()),
            "address": s.cp.address.lock().unwrap_or_else(|p| p.into_inner()).map(|a| a.to_string()),
            "connected": s.cp.connected.load(Ordering::Relaxed),
            "registered": s.cp.registered.load(Ordering::Relaxed),
            "last_error": *s.cp.last_error.lock().unwrap_or_else(|p| p.into_inner()),
        },
        "app_healthy": *s.app_healthy.borrow(),
        "identity": s.identity.current().map(|c| json!({
            "spiffe_id": c.id.spiffe_id,
            "expires": humantime::format_rfc3339_seconds(c.id.expires).to_string(),
            "renews": humantime::format_rfc3339_seconds(identity::renew_at(&c.id)).to_string(),
        })),
        "mtls": c.identity_token.is_some(),
        "rate_limited": c.service.as_ref().map_or(0, |svc| s.metrics.rate_limited.get_or_create(&vec![("service", svc.clone())]).get()),
        "own_policy": { "version": own_version, "policy": *own_policy },
        "tracing": {
            "otlp_endpoint": c.otlp_endpoint,
            "exporting": s.telemetry.is_on(),
            "sampling": f64::from(s.sampling.parts_per_million()) / 1_000_000.0,
        },
        "upstreams": upstreams,
    }))
}

#[derive(serde::Deserialize)]
struct Invalidate {
    service: String,
    #[serde(default)]
    prefix: String,
}

/// Drops a service's cached answers whose path starts with `prefix` (all with an empty prefix).
async fn invalidate(
    State(s): State<Arc<Shared>>,
    q: Result<axum::extract::Query<Invalidate>, axum::extract::rejection::QueryRejection>,
) -> impl IntoResponse {
    let Ok(axum::extract::Query(q)) = q else {
        return mesh_runtime::error_response(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "name ?service=NAME and optionally &prefix=/path",
        );
    };
    match s.upstreams.get(&q.service) {
        None => mesh_runtime::error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("this sidecar has no upstream {}", q.service),
        ),
        Some(up) => {
            let n = up.cache.invalidate(&q.prefix);
            Json(json!({"service": q.service, "prefix": q.prefix, "invalidated": n})).into_response()
        }
    }
}

/// The resilience and cache counters of one upstream (the same series /metrics shows).
fn counters(m: &Metrics, service: &str) -> serde_json::Value {
    let one = |f: &prometheus_client::metrics::family::Family<
        Vec<(&'static str, String)>,
        prometheus_client::metrics::counter::Counter,
    >| { f.get_or_create(&vec![("service", service.to_string())]).get() };
    let cache = |result: &str| {
        m.cache.get_or_create(&vec![("service", service.to_string()), ("result", result.to_string())]).get()
    };
    json!({
        "retries": one(&m.retries),
        "retry_budget_exhausted": one(&m.retry_budget_exhausted),
        "overload_rejections": one(&m.overload_rejections),
        "cache_hits": cache("hit"),
        "cache_misses": cache("miss"),
        "cache_stale": cache("stale"),
    })
}
