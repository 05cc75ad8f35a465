//! The control plane's admin HTTP listener: `/metrics` (Prometheus / OpenMetrics text) and
//! `/healthz`, open; the JSON management API under `/api/v1`, for the admin token only; the
//! live dashboard at `/`, which signs in with that token.

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
        .route("/", get(dashboard))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .nest("/api/v1", crate::management::router(state.clone()))
        .fallback(|| async {
            mesh_runtime::error_response(
                StatusCode::NOT_FOUND,
                "not_found",
                "try /metrics, /healthz or the management API under /api/v1 (/api/v1/openapi.json)",
            )
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

/// The live dashboard: one page, built into the binary, that reads the management API with the
/// admin token the user signs in with. Its policy lets it load nothing from anywhere else.
async fn dashboard() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("dashboard.html"),
    )
}
