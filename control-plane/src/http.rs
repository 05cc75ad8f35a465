//! The control plane's admin HTTP listener: `/metrics` (Prometheus / OpenMetrics text) and
//! `/healthz`.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::State as AxumState,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};

use crate::state::State;

pub fn router(state: Arc<State>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .fallback(|| async {
            mesh_runtime::error_response(StatusCode::NOT_FOUND, "not_found", "try /metrics or /healthz")
        })
        .with_state(state)
}

async fn metrics(AxumState(s): AxumState<Arc<State>>, headers: axum::http::HeaderMap) -> impl IntoResponse {
    let (services, instances, healthy) = s.registry.counts();
    s.metrics.services.set(services as i64);
    s.metrics.instances.get_or_create(&[("state", "routable")]).set(healthy as i64);
    s.metrics.instances.get_or_create(&[("state", "not_routable")]).set((instances - healthy) as i64);
    s.metrics.policies.set(s.policies.list().len() as i64);
    s.metrics.tracked.get_or_create(&[("table", "registry")]).set(s.registry.tracked() as i64);
    s.metrics.tracked.get_or_create(&[("table", "policy")]).set(s.policies.tracked() as i64);
    let accept = headers.get(header::ACCEPT).and_then(|a| a.to_str().ok());
    let (kind, body) = mesh_runtime::exposition::negotiate(accept, s.metrics.render());
    ([(header::CONTENT_TYPE, kind)], body)
}

async fn healthz(AxumState(s): AxumState<Arc<State>>) -> impl IntoResponse {
    if s.shutdown.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({"status": "shutting_down"})))
    } else {
        (StatusCode::OK, Json(serde_json::json!({"status": "serving"})))
    }
}
