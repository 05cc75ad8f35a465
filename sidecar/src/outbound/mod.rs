//! Outbound: the local app (or, in gateway mode, the outside world) → the mesh.
//!
//! The request path: trace ids → route (by authority in sidecar mode, by path prefix in gateway
//! mode) → the upstream's endpoints (discovery, DNS or snapshot) → the policy's balancer →
//! forward on a pooled connection with the policy's timeouts → stream the response back while
//! the endpoint's in-flight slot stays held.

pub(crate) mod balance;
pub(crate) mod breaker;
pub(crate) mod cache;
pub(crate) mod limit;
pub(crate) mod retry;
pub mod route;
pub(crate) mod window;

use std::{sync::Arc, time::Duration};

use crate::control::tap::{Seen, Tap};
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use mesh_runtime::telemetry::{KeyValue, Sampling, Telemetry};
use serde_json::json;
use tokio::time::Instant;
use tracing::Instrument;

use crate::{
    endpoint::forward::forward,
    gateway::edge::Edge,
    http::{
        body::{Body, Tracked, boxed, collect_up_to},
        errors::{error_response, for_grpc},
        headers::is_grpc,
        trace,
    },
    metrics::Metrics,
    outbound::retry::backoff,
    upstream::{AppliedPolicy, Upstream, Upstreams, endpoint::Endpoint},
};

pub struct Outbound {
    pub upstreams: Arc<Upstreams>,
    pub metrics: Arc<Metrics>,
    /// How long a request for a service seen for the first time waits for its endpoints.
    pub discovery_wait: Duration,
    /// Gateway mode: the edge — routes and their middleware (identity, IP lists, screening,
    /// CORS, rate limits, access log). Sidecar mode: `None` (requests go by authority).
    pub edge: Option<Arc<Edge>>,
    /// Where spans go, and the share of new traces sampled.
    pub telemetry: Telemetry,
    pub sampling: Arc<Sampling>,
    /// Count each call for the topology reports (off when they are).
    pub count_edges: bool,
    /// Operators' taps on this proxy's service.
    pub tap: Arc<Tap>,
    /// Gateway mode: each route's calls, counted per route for the topology reports.
    pub route_edges: Arc<crate::upstream::edge::RouteEdges>,
}

impl Outbound {
    pub fn new(upstreams: Arc<Upstreams>, metrics: Arc<Metrics>, discovery_wait: Duration) -> Self {
        Self {
            upstreams,
            metrics,
            discovery_wait,
            edge: None,
            telemetry: Telemetry::default(),
            sampling: Arc::new(Sampling::all()),
            count_edges: true,
            tap: Arc::default(),
            route_edges: Arc::default(),
        }
    }

    pub async fn handle(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        peer: std::net::SocketAddr,
        framing: Option<Arc<crate::transport::framing::FramingLog>>,
    ) -> Response<Body> {
        let t = trace::propagate(req.headers_mut(), &self.sampling);
        let direction = if self.edge.is_some() { "gateway" } else { "outbound" };
        let mut server = t.server_span(&self.telemetry, &req, direction);
        let hop = t.hop(&self.telemetry, server.as_ref());
        let span = tracing::info_span!(
            "request", direction, method = %req.method(), path = %req.uri().path(),
            request_id = %t.request_id, trace_id = %t.trace_id, service = tracing::field::Empty,
        );
        let grpc = is_grpc(req.headers());
        let resp = async move {
            match self.edge.clone() {
                Some(edge) => {
                    let mut visit = edge.visit(peer, &req, &t, framing.as_deref());
                    let resp = match edge.admit(&self.upstreams, req, &mut visit).await {
                        Ok((req, up)) => {
                            // Counted by route for the topology reports, unless they are off.
                            let counters = self.count_edges.then(|| {
                                let route = visit.route_name().unwrap_or("-").to_string();
                                self.route_edges.entry((route, up.name.clone())).or_default().clone()
                            });
                            let (resp, endpoint) =
                                self.forward(direction, &up, req, &hop, counters.as_deref()).await;
                            visit.served_by(&up.name, endpoint.as_ref().map(|e| e.info.id.as_str()));
                            resp
                        }
                        Err(resp) => {
                            self.metrics.request_counter(direction, "-", "-", resp.status().as_u16()).inc();
                            resp
                        }
                    };
                    edge.finish(visit, resp)
                }
                None => {
                    let up = match route::route(None, &self.upstreams, &mut req) {
                        Ok(routed) => routed.upstream,
                        Err(resp) => return *resp,
                    };
                    self.forward(direction, &up, req, &hop, None).await.0
                }
            }
        }
        .instrument(span)
        .await;
        if let Some(mut s) = server.take() {
            // The cache's decision: answered from it (`hit`, `stale`), or fetched (`miss`).
            if let Some(cache) = resp.headers().get("x-cache").and_then(|v| v.to_str().ok()) {
                s.set(KeyValue::new("mesh.cache", cache.to_string()));
            }
            s.status(resp.status().as_u16(), true);
            s.end();
        }
        if grpc { for_grpc(resp) } else { resp }
    }

    /// Sends a routed request to its upstream, counting it and its latency.
    async fn forward<B>(
        &self,
        direction: &'static str,
        up: &Upstream,
        req: Request<B>,
        hop: &trace::Hop,
        counters: Option<&crate::upstream::edge::EdgeCounters>,
    ) -> (Response<Body>, Option<Arc<Endpoint>>)
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
        B::Error: Into<crate::http::body::BoxError> + std::fmt::Display,
    {
        let started = Instant::now();
        let service = up.name.as_str();
        tracing::Span::current().record("service", service);
        let tapped = self.tap.on().then(|| (req.method().to_string(), req.uri().path().to_string()));
        let (resp, endpoint) = self.send(up, req, hop).await;
        let status = resp.status().as_u16();
        let took = started.elapsed();
        if self.count_edges {
            let cached = resp.headers().get("x-cache").is_some_and(|v| v != "miss");
            counters.unwrap_or(&up.edge).record(status, took, cached);
        }
        if let Some((method, path)) = &tapped {
            self.tap.record(&Seen {
                direction,
                caller: if direction == "gateway" { "" } else { &self.tap.service },
                method,
                path,
                status,
                latency: took,
                endpoint: endpoint.as_ref().map_or("-", |e| e.info.id.as_str()),
                trace_id: hop.trace_id.as_str(),
            });
        }
        match &endpoint {
            Some(e) => e
                .counters
                .get(status, || self.metrics.request_counter(direction, service, &e.info.id, status))
                .inc(),
            None => self.metrics.request_counter(direction, service, "-", status).inc(),
        };
        up.latency.get_or_init(|| self.metrics.latency_histogram(direction, service)).observe(
            took.as_secs_f64(),
            Some(crate::metrics::TraceExemplar(hop.trace_id)),
            None,
        );
        tracing::debug!(status, endpoint = endpoint.as_ref().map(|e| e.info.id.as_str()), ?took, "response");
        (resp, endpoint)
    }

    /// Answers from the cache when the policy allows, otherwise fetches (single flight on a
    /// cache miss) and keeps what may be kept. Returns the response and the endpoint, if any.
    async fn send<B>(
        &self,
        up: &Upstream,
        req: Request<B>,
        hop: &trace::Hop,
    ) -> (Response<Body>, Option<Arc<Endpoint>>)
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
        B::Error: Into<crate::http::body::BoxError> + std::fmt::Display,
    {
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
        let cp = &applied.policy.cache;
        let cacheable = {
            let creq = cache::Request {
                method: req.method(),
                path_and_query: path_and_query(&req),
                headers: req.headers(),
                since: None,
            };
            cache::Cache::applies(cp, &creq)
                && self.upstreams.invalidation_ready(cp)
                && req.extensions().get::<crate::gateway::edge::NoCache>().is_none()
        };
        if !cacheable {
            // A change through this cache drops what it changed, before the caller hears back.
            let written =
                (!cp.ttl.is_zero() && !is_safe(req.method())).then(|| path_and_query(&req).to_string());
            let (resp, endpoint) = self.fetch(up, &applied, req, hop).await;
            if let Some(path) = written
                && resp.status().as_u16() < 400
            {
                up.cache.invalidate_written(&path);
            }
            return (resp, endpoint);
        }
        // The request moves on to the upstream: what the cache keys on is kept aside.
        let pq = path_and_query(&req).to_string();
        let (method, headers) = (req.method().clone(), req.headers().clone());
        let creq = cache::Request {
            method: &method,
            path_and_query: &pq,
            headers: &headers,
            since: Some(up.cache.generation()),
        };
        let keys = up.cache.keys(cp, &creq);
        let mut stale = None;
        let mut leader = false;
        loop {
            match up.cache.lookup(&keys, Instant::now()) {
                cache::Lookup::Fresh(e) => return (self.cached(service, &e, "hit"), None),
                cache::Lookup::Stale(e) => stale = Some(e),
                cache::Lookup::Miss => {}
            }
            if leader {
                break;
            }
            match up.cache.join(&keys[0]) {
                None => leader = true,
                Some(mut landed) => {
                    let _ = landed.wait_for(|done| *done).await;
                }
            }
        }
        let (resp, endpoint) = self.fetch(up, &applied, req, hop).await;
        let failed = resp.status().is_server_error();
        let answer = if resp.status() == StatusCode::OK {
            let (parts, body) = resp.into_parts();
            match collect_up_to(body, cache::MAX_ENTRY_BYTES).await {
                Ok(bytes) => {
                    up.cache.store(cp, &creq, parts.status, &parts.headers, &bytes, Instant::now());
                    let mut r = Response::from_parts(parts, boxed(Full::new(bytes)));
                    r.headers_mut().remove(header::CONTENT_LENGTH);
                    r.headers_mut().insert("x-cache", http::HeaderValue::from_static("miss"));
                    self.metrics
                        .cache
                        .get_or_create(&vec![("service", service.to_string()), ("result", "miss".into())])
                        .inc();
                    r
                }
                Err(e) => error_response(
                    StatusCode::BAD_GATEWAY,
                    "upstream_failed",
                    format!("reading the answer of {service} failed: {e}"),
                    json!({ "service": service }),
                ),
            }
        } else if let (true, Some(e)) = (failed, &stale) {
            tracing::debug!(%service, "upstream failed: serving a stale cached answer (stale-if-error)");
            self.cached(service, e, "stale")
        } else {
            resp
        };
        up.cache.land(&keys[0]);
        (answer, endpoint)
    }

    fn cached(&self, service: &str, e: &cache::Entry, result: &'static str) -> Response<Body> {
        self.metrics
            .cache
            .get_or_create(&vec![("service", service.to_string()), ("result", result.into())])
            .inc();
        let mut r = Response::new(boxed(Full::new(e.body.clone())));
        *r.status_mut() = e.status;
        *r.headers_mut() = e.headers.clone();
        r.headers_mut().remove(header::CONTENT_LENGTH);
        r.headers_mut().insert("x-cache", http::HeaderValue::from_static(result));
        r
    }

    /// Forwards to one endpoint of `up` under the policy's concurrency limit, retrying by
    /// policy: [`limit`] → [`retry::Attempts`] (the body kept for a replay) → [`balance`] →
    /// [`forward`] → [`breaker`] → [`retry::decide`]. Returns the response and the endpoint that
    /// answered, if any.
    async fn fetch<B>(
        &self,
        up: &Upstream,
        applied: &AppliedPolicy,
        req: Request<B>,
        hop: &trace::Hop,
    ) -> (Response<Body>, Option<Arc<Endpoint>>)
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
        B::Error: Into<crate::http::body::BoxError> + std::fmt::Display,
    {
        let service = up.name.as_str();
        let policy = &applied.policy;
        let retry = &policy.retry;
        let started = Instant::now();
        let deadline = (!policy.timeout.request.is_zero()).then(|| started + policy.timeout.request);

        let permit = match limit::admit(&applied.limiter, service, &self.metrics).await {
            Ok(p) => p,
            Err(resp) => return (resp, None),
        };
        let hash_key = balance::hash_key(&policy.load_balancer, req.headers());
        let (mut parts, body) = req.into_parts();
        let mut attempts = match retry::Attempts::prepare(retry, &parts, body).await {
            Ok(a) => a,
            Err(e) => {
                let resp = error_response(
                    StatusCode::BAD_REQUEST,
                    "body_failed",
                    format!("reading the request body failed: {e}"),
                    json!({ "service": service }),
                );
                return (resp, None);
            }
        };
        up.budget.request(started, retry);

        let mut tried: Vec<Arc<Endpoint>> = Vec::new();
        loop {
            let Some((set, endpoint)) = balance::choose(up, policy, hash_key.as_deref(), &mut tried) else {
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
            let mut r = attempts.next_request(&mut parts);
            let mut attempt = hop.attempt(&mut r, &endpoint.info.address, attempts.made() - 1);
            if let Some(a) = attempt.as_mut() {
                a.set(KeyValue::new("mesh.service", service.to_string()));
                a.set(KeyValue::new("mesh.endpoint", endpoint.info.id.clone()));
            }
            let sent = Instant::now();
            let slot = endpoint.start();
            let result =
                forward(&applied.clients, r, &authority, retry::per_try(retry, deadline, sent)).await;
            // One clock read for everything that follows the answer.
            let done = Instant::now();
            let class = retry::classify(&result);
            let failed = result.as_ref().map_or(true, |resp| resp.status().is_server_error());
            balance::record(
                &set,
                &endpoint,
                failed,
                done.saturating_duration_since(sent),
                done,
                policy,
                service,
                &self.metrics,
            );
            let decision = retry::decide(class, retry, &attempts, deadline, done, &up.budget);
            if let Some(mut a) = attempt {
                match &result {
                    Ok(resp) => a.status(resp.status().as_u16(), false),
                    Err(e) => {
                        a.set(KeyValue::new("error.type", e.code()));
                        a.fail(e.to_string());
                    }
                }
                if endpoint.breaker.is_open(done) {
                    a.set(KeyValue::new("mesh.breaker", "open"));
                }
                a.set(KeyValue::new("mesh.retry", decision.as_str()));
                a.end();
            }
            match decision {
                retry::Decision::Retry => {
                    self.metrics.retries.get_or_create(&vec![("service", service.to_string())]).inc();
                    tracing::debug!(endpoint = %endpoint.info.id, attempt = attempts.made(), class = ?class, "retrying on another endpoint");
                    drop(slot);
                    tried.push(endpoint);
                    let wait = backoff(retry, attempts.made());
                    let wait =
                        deadline.map_or(wait, |d| wait.min(d.saturating_duration_since(Instant::now())));
                    tokio::time::sleep(wait).await;
                    continue;
                }
                retry::Decision::BudgetExhausted => {
                    self.metrics
                        .retry_budget_exhausted
                        .get_or_create(&vec![("service", service.to_string())])
                        .inc();
                }
                retry::Decision::Done => {}
            }
            return match result {
                Ok(resp) => {
                    let mut resp = resp.map(|b| boxed(Tracked::new(b, (slot, permit))));
                    resp.extensions_mut().insert(AttemptsMade(attempts.made()));
                    (resp, Some(endpoint))
                }
                Err(e) => {
                    let attempt = attempts.made();
                    tracing::warn!(endpoint = %endpoint.info.id, error = %e, attempt, "request to endpoint failed");
                    let mut resp = error_response(
                        e.status(),
                        e.code(),
                        e.to_string(),
                        json!({ "service": service, "endpoint": endpoint.info.id, "attempts": attempt }),
                    );
                    resp.extensions_mut().insert(AttemptsMade(attempt));
                    (resp, Some(endpoint))
                }
            };
        }
    }
}

/// How many attempts an answer took (a response extension, for operators' calls).
#[derive(Debug, Clone, Copy)]
pub struct AttemptsMade(pub u32);

impl Outbound {
    /// An operator's call (the management API's `POST /api/v1/call/{service}`): sent to
    /// `service` as this proxy's app would send it — mesh identity, discovery, the service's
    /// policy — with the endpoint that answered.
    pub async fn call(
        &self,
        service: &str,
        mut req: Request<Body>,
    ) -> (Response<Body>, Option<Arc<Endpoint>>) {
        let up = self.upstreams.get_or_add(service);
        let t = trace::propagate(req.headers_mut(), &self.sampling);
        let hop = t.hop(&self.telemetry, None);
        self.forward("call", &up, req, &hop, None).await
    }
}

fn path_and_query<B>(req: &Request<B>) -> &str {
    req.uri().path_and_query().map_or("/", |p| p.as_str())
}

/// GET, HEAD, OPTIONS and TRACE change nothing (RFC 9110 §9.2.1).
fn is_safe(m: &http::Method) -> bool {
    matches!(*m, http::Method::GET | http::Method::HEAD | http::Method::OPTIONS | http::Method::TRACE)
}
