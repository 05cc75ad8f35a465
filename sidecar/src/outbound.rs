//! Outbound: the local app (or, in gateway mode, the outside world) → the mesh.
//!
//! The request path: trace ids → route (by authority in sidecar mode, by path prefix in gateway
//! mode) → the upstream's endpoints (discovery, DNS or snapshot) → the policy's balancer →
//! forward on a pooled connection with the policy's timeouts → stream the response back while
//! the endpoint's in-flight slot stays held.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use http::{Request, Response, StatusCode, Uri, header};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::time::Instant;
use tracing::Instrument;

use crate::{
    metrics::Metrics,
    proxy::{self, Body, Tracked, boxed, error_response},
    trace,
    upstream::{Endpoint, Upstream, Upstreams},
};

/// A gateway route: requests whose path starts with `prefix` go to `service`, with the prefix
/// replaced by `rewrite` when set (`/api/markets/7` → `/markets/7` for prefix `/api/markets`,
/// rewrite `/markets`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub prefix: String,
    pub service: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<String>,
}

impl Route {
    /// `PREFIX=SERVICE` or `PREFIX=SERVICE,REWRITE`.
    pub fn parse(s: &str) -> Result<Route, String> {
        let (prefix, rest) =
            s.split_once('=').ok_or_else(|| format!("route {s:?}: expected PREFIX=SERVICE[,REWRITE]"))?;
        let (service, rewrite) = match rest.split_once(',') {
            Some((svc, rw)) => (svc, Some(rw.to_string())),
            None => (rest, None),
        };
        let r = Route { prefix: prefix.to_string(), service: service.to_string(), rewrite };
        r.validate()?;
        Ok(r)
    }

    pub fn validate(&self) -> Result<(), String> {
        if !self.prefix.starts_with('/') || self.rewrite.as_deref().is_some_and(|r| !r.starts_with('/')) {
            return Err(format!("route {}: prefix and rewrite must start with '/'", self.prefix));
        }
        if !mesh_proto::names::is_service_name(&self.service) {
            return Err(format!(
                "route {}: service {:?} must be {}",
                self.prefix,
                self.service,
                mesh_proto::names::SERVICE_NAME_RULE
            ));
        }
        Ok(())
    }

    fn matches(&self, path: &str) -> bool {
        path.strip_prefix(self.prefix.trim_end_matches('/'))
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/') || self.prefix.ends_with('/'))
    }
}

pub struct Outbound {
    pub upstreams: Arc<Upstreams>,
    pub metrics: Arc<Metrics>,
    /// Gateway mode: routes by path prefix, longest first. Sidecar mode: `None` (by authority).
    pub routes: Option<Vec<Route>>,
    /// How long a request for a service seen for the first time waits for its endpoints.
    pub discovery_wait: Duration,
}

impl Outbound {
    pub fn new(
        upstreams: Arc<Upstreams>,
        metrics: Arc<Metrics>,
        routes: Option<Vec<Route>>,
        discovery_wait: Duration,
    ) -> Self {
        let routes = routes.map(|mut r| {
            r.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
            r
        });
        Self { upstreams, metrics, routes, discovery_wait }
    }

    pub async fn handle(self: Arc<Self>, mut req: Request<Incoming>, _peer: SocketAddr) -> Response<Body> {
        let t = trace::propagate(req.headers_mut());
        let direction = if self.routes.is_some() { "gateway" } else { "outbound" };
        let span = tracing::info_span!(
            "request", direction, method = %req.method(), path = %req.uri().path(),
            request_id = %t.request_id, trace_id = %t.trace_id, service = tracing::field::Empty,
        );
        async move {
            let started = Instant::now();
            let service = match self.route(&mut req) {
                Ok(s) => s,
                Err(resp) => return *resp,
            };
            tracing::Span::current().record("service", service.as_str());
            let up = self.upstreams.get_or_add(&service);
            let (resp, endpoint) = self.send(&up, req).await;
            let status = resp.status().as_u16();
            let took = started.elapsed();
            match &endpoint {
                Some(e) => e
                    .counters
                    .get(status, || self.metrics.request_counter(direction, &service, &e.info.id, status))
                    .inc(),
                None => self.metrics.request_counter(direction, &service, "-", status).inc(),
            };
            up.latency
                .get_or_init(|| self.metrics.latency_histogram(direction, &service))
                .observe(took.as_secs_f64());
            tracing::debug!(
                status,
                endpoint = endpoint.as_ref().map(|e| e.info.id.as_str()),
                ?took,
                "response"
            );
            resp
        }
        .instrument(span)
        .await
    }

    /// The service a request is for; in gateway mode also rewrites its path.
    fn route(&self, req: &mut Request<Incoming>) -> Result<String, Box<Response<Body>>> {
        let Some(routes) = &self.routes else {
            let host = req
                .uri()
                .host()
                .map(str::to_string)
                .or_else(|| {
                    let h = req.headers().get(header::HOST)?.to_str().ok()?;
                    Some(h.rsplit_once(':').map_or(h, |(host, _)| host).to_string())
                })
                .unwrap_or_default();
            if !mesh_proto::names::is_service_name(&host) {
                return Err(Box::new(error_response(
                    StatusCode::BAD_REQUEST,
                    "unknown_authority",
                    format!(
                        "cannot tell which service this request is for: authority {host:?} is not a mesh service name (send Host: <service> or use this sidecar as HTTP_PROXY)"
                    ),
                    json!({ "authority": host }),
                )));
            }
            return Ok(host);
        };
        let path = req.uri().path().to_string();
        let Some(route) = routes.iter().find(|r| r.matches(&path)) else {
            return Err(Box::new(error_response(
                StatusCode::NOT_FOUND,
                "no_route",
                format!("no route for path {path}"),
                json!({ "path": path }),
            )));
        };
        if let Some(rewrite) = &route.rewrite {
            let rest = &path[route.prefix.trim_end_matches('/').len()..];
            let new_path = format!("{}{}", rewrite.trim_end_matches('/'), rest);
            let new_path = if new_path.is_empty() { "/".to_string() } else { new_path };
            let pq = match req.uri().query() {
                Some(q) => format!("{new_path}?{q}"),
                None => new_path,
            };
            if let Ok(uri) = pq.parse::<Uri>() {
                *req.uri_mut() = uri;
            }
        }
        Ok(route.service.clone())
    }

    /// Forwards to one endpoint of `up`. Returns the response and the endpoint chosen, if any.
    async fn send(&self, up: &Upstream, req: Request<Incoming>) -> (Response<Body>, Option<Arc<Endpoint>>) {
        let service = up.name.as_str();
        if up.endpoints().version == 0
            && up.endpoints().endpoints.is_empty()
            && !up.wait_known(self.discovery_wait).await
        {
            let resp = error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "unknown_service",
                format!(
                    "service {service} is unknown: the control plane has not reported it (and no snapshot has it)"
                ),
                json!({ "service": service }),
            );
            return (resp, None);
        }
        let applied = up.policy();
        let policy = &applied.policy;
        let set = up.endpoints();
        let hash_key = policy
            .load_balancer
            .hash_header
            .as_deref()
            .and_then(|h| req.headers().get(h))
            .map(|v| v.as_bytes().to_vec());
        let Some(endpoint) =
            set.pick(policy.load_balancer.algorithm, up.round_robin(), hash_key.as_deref(), &[])
        else {
            let resp = error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_endpoints",
                format!("service {service} has no healthy endpoints"),
                json!({ "service": service }),
            );
            return (resp, None);
        };
        let Some(authority) = endpoint.authority.clone() else {
            let resp = error_response(
                StatusCode::BAD_GATEWAY,
                "bad_endpoint",
                format!(
                    "endpoint {} of {service} has an unusable address {:?}",
                    endpoint.info.id, endpoint.info.address
                ),
                json!({ "service": service, "endpoint": endpoint.info.id }),
            );
            return (resp, Some(endpoint));
        };
        let slot = endpoint.start();
        let timeout = (!policy.timeout.request.is_zero()).then_some(policy.timeout.request);
        let started = Instant::now();
        let req = req.map(boxed);
        match proxy::forward(&applied.clients, req, &authority, timeout).await {
            Ok(resp) => {
                endpoint.observe(started.elapsed());
                let resp = resp.map(|b| boxed(Tracked::new(b, slot)));
                (resp, Some(endpoint))
            }
            Err(e) => {
                endpoint.observe(started.elapsed().max(Duration::from_secs(1)));
                tracing::warn!(endpoint = %endpoint.info.id, error = %e, "request to endpoint failed");
                let resp = error_response(
                    e.status(),
                    e.code(),
                    e.to_string(),
                    json!({ "service": service, "endpoint": endpoint.info.id }),
                );
                (resp, Some(endpoint))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse_and_match_on_segment_boundaries() {
        let r = Route::parse("/api/markets=market-service,/markets").unwrap();
        assert_eq!(r.rewrite.as_deref(), Some("/markets"));
        assert!(r.matches("/api/markets"));
        assert!(r.matches("/api/markets/7"));
        assert!(!r.matches("/api/marketsx"));
        assert!(Route::parse("api=svc").is_err());
        assert!(Route::parse("/api=Bad_Svc").is_err());
        assert!(Route::parse("/api").is_err());
    }
}
