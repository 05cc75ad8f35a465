//! The JSON management API (`/api/v1` on the admin listener), for the admin token only. Each
//! endpoint calls the gRPC service that answers the same question, with the caller's bearer
//! token as its credential — one implementation of every check — and answers the same JSON
//! objects `meshctl -o json` prints ([`mesh_proto::json`]). Errors are problem details naming
//! the problem, with the gRPC status mapped to its HTTP counterpart.

use std::sync::Arc;

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, Query, Request as HttpRequest, State as AxumState},
    http::{HeaderMap, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
    routing::get,
};
use mesh_proto::{
    json,
    policy::ServicePolicy,
    v1::{
        self, admin_server::Admin, events_server::Events, policy_server::Policy, registry_server::Registry,
    },
};
use serde::Deserialize;
use serde_json::{Value, json};
use tonic::Code;

use crate::{api::Api, state::State};

/// The OpenAPI 3.1 description of this API (checked against the routes and by
/// openapi-spec-validator in the tests).
const OPENAPI: &str = include_str!("management.openapi.json");

pub fn router(state: Arc<State>) -> Router<Arc<State>> {
    Router::new()
        .route("/overview", get(overview))
        .route("/stats", get(stats))
        .route("/topology", get(topology))
        .route("/services", get(services))
        .route("/services/{service}", get(service))
        .route("/services/{service}/check", axum::routing::post(check))
        .route("/proxies", get(proxies))
        .route("/policies", get(policies))
        .route("/policies/{service}", get(get_policy).put(set_policy).delete(delete_policy))
        .route("/events/{topic}", get(replay).post(publish))
        .route("/events/{topic}/tail", get(tail))
        .route("/call/{service}", axum::routing::post(call))
        .route("/stream", get(stream))
        .route("/openapi.json", get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }))
        .fallback(|| async {
            refuse(StatusCode::NOT_FOUND, "not_found", "no such endpoint: see /api/v1/openapi.json".into())
        })
        .method_not_allowed_fallback(|| async {
            refuse(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not take that method: see /api/v1/openapi.json".into(),
            )
        })
        .layer(axum::middleware::from_fn_with_state(state, admin_only))
}

/// The management API is the admin's: 401 without the admin token, 403 with another. The
/// description (`/openapi.json`) is open, like `/healthz`.
async fn admin_only(AxumState(s): AxumState<Arc<State>>, req: HttpRequest, next: Next) -> Response {
    if req.uri().path().ends_with("/openapi.json") {
        return next.run(req).await;
    }
    match s.auth.http_admin(req.headers()) {
        Ok(()) => next.run(req).await,
        Err((status, code, message)) => refuse(status, code, message),
    }
}

fn refuse(status: StatusCode, code: &str, message: String) -> Response {
    mesh_runtime::error_response(status, code, message).into_response()
}

/// A gRPC refusal as its HTTP counterpart, with the service's message.
fn refused(s: tonic::Status) -> Response {
    let (status, code) = match s.code() {
        Code::InvalidArgument | Code::OutOfRange => (StatusCode::BAD_REQUEST, "invalid"),
        Code::NotFound => (StatusCode::NOT_FOUND, "not_found"),
        Code::AlreadyExists | Code::Aborted => (StatusCode::CONFLICT, "conflict"),
        Code::FailedPrecondition => (StatusCode::PRECONDITION_FAILED, "precondition_failed"),
        Code::PermissionDenied => (StatusCode::FORBIDDEN, "forbidden"),
        Code::Unauthenticated => (StatusCode::UNAUTHORIZED, "unauthenticated"),
        Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "resource_exhausted"),
        Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        Code::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    };
    refuse(status, code, s.message().to_string())
}

/// `msg` as a gRPC request carrying the HTTP caller's credential.
fn grpc<T>(headers: &HeaderMap, msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(v) =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())
    {
        req.metadata_mut().insert("authorization", v);
    }
    req
}

type S = AxumState<Arc<State>>;

async fn overview(AxumState(s): S, h: HeaderMap) -> Response {
    match Admin::overview(&Api(s.clone()), grpc(&h, v1::OverviewRequest {})).await {
        Ok(o) => {
            let mut v = json::overview(o.get_ref());
            v["topology"] = json::topology(&s.topology.snapshot(tokio::time::Instant::now()));
            Json(v).into_response()
        }
        Err(e) => refused(e),
    }
}

async fn stats(AxumState(s): S, h: HeaderMap) -> Response {
    match Admin::stats(&Api(s), grpc(&h, v1::StatsRequest {})).await {
        Ok(r) => Json(json::stats(r.get_ref())).into_response(),
        Err(e) => refused(e),
    }
}

/// Which service calls which (the gateway included), per edge and per called service over the
/// last minute and the last ten, busiest first.
async fn topology(AxumState(s): S, h: HeaderMap) -> Response {
    match Admin::topology(&Api(s), grpc(&h, v1::TopologyRequest {})).await {
        Ok(t) => Json(json::topology(t.get_ref())).into_response(),
        Err(e) => refused(e),
    }
}

async fn services(AxumState(s): S, h: HeaderMap) -> Response {
    match Registry::list_services(&Api(s), grpc(&h, v1::ListServicesRequest {})).await {
        Ok(r) => Json(
            json!({"services": r.get_ref().services.iter().map(json::service_summary).collect::<Vec<_>>()}),
        )
        .into_response(),
        Err(e) => refused(e),
    }
}

async fn service(AxumState(s): S, h: HeaderMap, Path(name): Path<String>) -> Response {
    match Registry::get_service(&Api(s), grpc(&h, v1::GetServiceRequest { name: name.clone() })).await {
        Ok(r) => Json(json!({
            "name": name,
            "instances": r.get_ref().instances.iter().map(json::instance).collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(e) => refused(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckQuery {
    #[serde(default)]
    instance: String,
}

/// Probes the service's instances (or `?instance=ID`) now, each through its own sidecar: the
/// app's answer and latency, or why there was none.
async fn check(
    AxumState(s): S,
    h: HeaderMap,
    Path(service): Path<String>,
    q: Result<Query<CheckQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = q else {
        return refuse(StatusCode::BAD_REQUEST, "invalid_query", "the only parameter is ?instance=ID".into());
    };
    match Admin::check(&Api(s), grpc(&h, v1::CheckRequest { service, instance_id: q.instance })).await {
        Ok(r) => Json(
            json!({"instances": r.get_ref().instances.iter().map(json::instance_check).collect::<Vec<_>>()}),
        )
        .into_response(),
        Err(e) => refused(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProxiesQuery {
    #[serde(default)]
    service: String,
}

async fn proxies(
    AxumState(s): S,
    h: HeaderMap,
    q: Result<Query<ProxiesQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = q else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "the only parameter is ?service=NAME".into(),
        );
    };
    match Admin::proxy_status(&Api(s), grpc(&h, v1::ProxyStatusRequest { service: q.service })).await {
        Ok(r) => {
            Json(json!({"proxies": r.get_ref().proxies.iter().map(json::proxy_status).collect::<Vec<_>>()}))
                .into_response()
        }
        Err(e) => refused(e),
    }
}

/// A stored policy in the policy files' shape (durations as `"250ms"`).
fn versioned(p: &v1::VersionedPolicy) -> Value {
    let policy = ServicePolicy::try_from(p.policy.clone().unwrap_or_default()).unwrap_or_default();
    json!({"service": p.service, "version": p.version, "is_default": p.is_default,
           "updated_at_unix_ms": p.updated_at_unix_ms, "policy": policy})
}

async fn policies(AxumState(s): S, h: HeaderMap) -> Response {
    match Policy::list(&Api(s), grpc(&h, v1::ListPoliciesRequest {})).await {
        Ok(r) => Json(json!({"policies": r.get_ref().policies.iter().map(versioned).collect::<Vec<_>>()}))
            .into_response(),
        Err(e) => refused(e),
    }
}

async fn get_policy(AxumState(s): S, h: HeaderMap, Path(service): Path<String>) -> Response {
    match Policy::get(&Api(s), grpc(&h, v1::GetPolicyRequest { service })).await {
        Ok(r) => Json(versioned(r.get_ref())).into_response(),
        Err(e) => refused(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetQuery {
    #[serde(default)]
    dry_run: bool,
    expected_version: Option<u64>,
}

/// Stores a policy (the policy files' shape, as JSON): the stored version and the changes field
/// by field; `?dry_run=true` validates and shows the changes only; `?expected_version=N`
/// refuses (412) unless N is the stored version.
async fn set_policy(
    AxumState(s): S,
    h: HeaderMap,
    Path(service): Path<String>,
    q: Result<Query<SetQuery>, axum::extract::rejection::QueryRejection>,
    body: Bytes,
) -> Response {
    let Ok(Query(q)) = q else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "parameters: ?dry_run=true, ?expected_version=N".into(),
        );
    };
    let policy: ServicePolicy = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            return refuse(StatusCode::BAD_REQUEST, "invalid", format!("the body is not a policy: {e}"));
        }
    };
    if let Err(e) = policy.validate() {
        return refuse(StatusCode::BAD_REQUEST, "invalid", format!("invalid policy for {service}: {e}"));
    }
    let req = v1::SetPolicyRequest {
        service,
        policy: Some((&policy).into()),
        dry_run: q.dry_run,
        expected_version: q.expected_version,
    };
    match Policy::set(&Api(s), grpc(&h, req)).await {
        Ok(r) => {
            let r = r.into_inner();
            let changes: Vec<_> = r
                .changes
                .iter()
                .map(|c| json!({"field": c.field, "old": c.old_value, "new": c.new_value}))
                .collect();
            Json(json!({
                "policy": r.policy.as_ref().map(versioned), "applied": r.applied, "changes": changes,
            }))
            .into_response()
        }
        Err(e) => refused(e),
    }
}

async fn delete_policy(AxumState(s): S, h: HeaderMap, Path(service): Path<String>) -> Response {
    match Policy::delete(&Api(s), grpc(&h, v1::DeletePolicyRequest { service })).await {
        Ok(r) => {
            Json(json!({"existed": r.get_ref().existed, "version": r.get_ref().version})).into_response()
        }
        Err(e) => refused(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayQuery {
    #[serde(default)]
    from: u64,
    limit: Option<u32>,
}

/// A topic read back from an offset, oldest first, each event as CloudEvents JSON.
async fn replay(
    AxumState(s): S,
    h: HeaderMap,
    Path(topic): Path<String>,
    q: Result<Query<ReplayQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = q else {
        return refuse(StatusCode::BAD_REQUEST, "invalid_query", "parameters: ?from=OFFSET, ?limit=N".into());
    };
    let req = v1::ReplayRequest {
        topic,
        from_offset: Some(q.from),
        from_time_unix_ms: None,
        limit: q.limit.unwrap_or(mesh_proto::DEFAULT_REPLAY_LIMIT).min(10_000),
    };
    match Events::replay(&Api(s), grpc(&h, req)).await {
        Ok(stream) => match mesh_proto::replay_json(stream.into_inner()).await {
            Ok(events) => Json(json!({"events": events})).into_response(),
            Err(e) => refused(e),
        },
        Err(e) => refused(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewEvent {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    subject: String,
    #[serde(default = "operator")]
    source: String,
    #[serde(default)]
    data: Value,
}

fn operator() -> String {
    "operator".into()
}

/// Publishes one event (`id`, `type`, optional `subject`, `source` and JSON `data`): its offset,
/// and whether the bus already had that id.
async fn publish(AxumState(s): S, h: HeaderMap, Path(topic): Path<String>, body: Bytes) -> Response {
    let e: NewEvent = match serde_json::from_slice(&body) {
        Ok(e) => e,
        Err(e) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "invalid",
                format!("the body is not an event ({{\"id\", \"type\", \"subject\", \"data\"}}): {e}"),
            );
        }
    };
    let event = v1::Event {
        id: e.id,
        topic,
        source: e.source,
        r#type: e.kind,
        key: e.subject,
        data: e.data.to_string().into_bytes(),
        content_type: "application/json".into(),
        ..Default::default()
    };
    match Events::publish(&Api(s), grpc(&h, v1::PublishRequest { events: vec![event] })).await {
        Ok(r) => {
            let r = r.into_inner();
            let x = r.results.first().cloned().unwrap_or_default();
            (StatusCode::CREATED, Json(json!({"id": x.id, "offset": x.offset, "duplicate": x.duplicate})))
                .into_response()
        }
        Err(e) => refused(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TailQuery {
    from: Option<u64>,
}

/// A live tail of a topic as Server-Sent Events: each event (CloudEvents JSON) as an SSE
/// `data:` line with its offset as the `id:`, from `?from=OFFSET` or from now on; a comment every
/// 15 s keeps idle connections open. Ends when the control plane stops.
async fn tail(
    AxumState(s): S,
    Path(topic): Path<String>,
    q: Result<Query<TailQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = q else {
        return refuse(StatusCode::BAD_REQUEST, "invalid_query", "the only parameter is ?from=OFFSET".into());
    };
    if !mesh_proto::names::is_topic(&topic) {
        let why = format!("topic {topic:?} must be {}", mesh_proto::names::TOPIC_RULE);
        return refuse(StatusCode::BAD_REQUEST, "invalid", why);
    }
    let head = match s.bus.watch(&topic).await {
        Ok(h) => h,
        Err(e) => return refuse(StatusCode::SERVICE_UNAVAILABLE, "bus_unavailable", e.to_string()),
    };
    let next = q.from.unwrap_or_else(|| *head.borrow());
    let stream =
        futures::stream::unfold((s, topic, head, next), |(s, topic, mut head, mut next)| async move {
            loop {
                if next < *head.borrow() {
                    let read = s.bus.read(&topic, next, 100).await.unwrap_or_default();
                    let Some(last) = read.last().map(|d| d.offset) else {
                        // Gone to retention meanwhile: on from the head.
                        next = *head.borrow();
                        continue;
                    };
                    let mut chunk = String::new();
                    for d in &read {
                        chunk.push_str(&format!(
                            "id: {}\ndata: {}\n\n",
                            d.offset,
                            mesh_proto::delivery_json(d)
                        ));
                    }
                    let chunk = Ok::<_, std::convert::Infallible>(Bytes::from(chunk));
                    return Some((chunk, (s, topic, head, last + 1)));
                }
                let keep_alive = Ok(Bytes::from_static(b": keep-alive\n\n"));
                tokio::select! {
                    _ = s.shutdown.cancelled() => return None,
                    changed = head.changed() => if changed.is_err() { return None },
                    _ = tokio::time::sleep(std::time::Duration::from_secs(15)) => {
                        return Some((keep_alive, (s, topic, head, next)));
                    }
                }
            }
        });
    (
        [(header::CONTENT_TYPE, "text/event-stream"), (header::CACHE_CONTROL, "no-cache")],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CallQuery {
    #[serde(default)]
    via: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CallBody {
    #[serde(default = "get_method")]
    method: String,
    path: String,
    #[serde(default)]
    headers: std::collections::HashMap<String, String>,
    /// Sent as is (UTF-8 text).
    #[serde(default)]
    body: String,
}

fn get_method() -> String {
    "GET".into()
}

/// Sends a request to a service through a proxy (`?via=NODE`, else a gateway), as that proxy's
/// app would — its mesh identity, discovery and the service's policy: the answer (status,
/// headers, body), the instance that answered, the attempts and the latency.
async fn call(
    AxumState(s): S,
    h: HeaderMap,
    Path(service): Path<String>,
    q: Result<Query<CallQuery>, axum::extract::rejection::QueryRejection>,
    body: Bytes,
) -> Response {
    let Ok(Query(q)) = q else {
        return refuse(StatusCode::BAD_REQUEST, "invalid_query", "the only parameter is ?via=NODE".into());
    };
    let c: CallBody = match serde_json::from_slice(&body) {
        Ok(c) => c,
        Err(e) => {
            let why =
                format!("the body is not a call ({{\"method\", \"path\", \"headers\", \"body\"}}): {e}");
            return refuse(StatusCode::BAD_REQUEST, "invalid", why);
        }
    };
    let req = v1::CallRequest {
        service,
        via: q.via,
        method: c.method,
        path: c.path,
        headers: c.headers,
        body: c.body.into_bytes(),
    };
    match Admin::call(&Api(s), grpc(&h, req)).await {
        Ok(r) => {
            let r = r.into_inner();
            let mut v = json!({
                "via": r.via, "status": r.status, "headers": r.headers, "endpoint": r.endpoint,
                "attempts": r.attempts, "latency_ms": r.latency_ms,
            });
            match String::from_utf8(r.body) {
                Ok(text) => v["body"] = json!(text),
                Err(e) => v["body_base64"] = json!(mesh_runtime::base64(e.as_bytes())),
            }
            Json(v).into_response()
        }
        Err(e) => refused(e),
    }
}

/// The dashboard's live feed as Server-Sent Events: the overview (with the topology) and the
/// proxies' convergence, every 2 s (the first at once), until the caller goes away.
async fn stream(AxumState(s): S, h: HeaderMap) -> Response {
    let feed = futures::stream::unfold((s, h, true), |(s, h, first)| async move {
        if !first {
            tokio::select! {
                _ = s.shutdown.cancelled() => return None,
                _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
            }
        }
        let api = Api(s.clone());
        let overview = Admin::overview(&api, grpc(&h, v1::OverviewRequest {})).await.ok()?;
        let proxies = Admin::proxy_status(&api, grpc(&h, v1::ProxyStatusRequest::default())).await.ok()?;
        let mut o = json::overview(overview.get_ref());
        o["topology"] = json::topology(&s.topology.snapshot(tokio::time::Instant::now()));
        let snapshot = json!({
            "overview": o,
            "proxies": proxies.get_ref().proxies.iter().map(json::proxy_status).collect::<Vec<_>>(),
        });
        let chunk =
            Ok::<_, std::convert::Infallible>(Bytes::from(format!("event: snapshot\ndata: {snapshot}\n\n")));
        Some((chunk, (s, h, false)))
    });
    (
        [(header::CONTENT_TYPE, "text/event-stream"), (header::CACHE_CONTROL, "no-cache")],
        axum::body::Body::from_stream(feed),
    )
        .into_response()
}
