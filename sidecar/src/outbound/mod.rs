//! Outbound: the local app (or, in gateway mode, the outside world) → the mesh.
//!
//! The request path: trace ids → route (by authority in sidecar mode, by path prefix in gateway
//! mode) → the upstream's endpoints (discovery, DNS or snapshot) → the policy's balancer →
//! forward on a pooled connection with the policy's timeouts → stream the response back while
//! the endpoint's in-flight slot stays held.

pub mod breaker;
pub mod cache;
pub mod limit;
pub mod retry;
pub mod route;
pub mod window;

use crate::http::body::Body;
use crate::http::body::Tracked;
use crate::http::body::boxed;
use crate::http::errors::error_response;
use crate::metrics::Metrics;
use crate::outbound::retry::classify;
use crate::outbound::route::Route;
use crate::upstream::AppliedPolicy;
use crate::upstream::Upstream;
use crate::upstream::Upstreams;
use crate::upstream::endpoint::Endpoint;
use crate::upstream::set::EndpointSet;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, Uri, header};
use http_body::Body as _;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use mesh_proto::policy::CircuitBreakerPolicy;
use serde_json::json;
use std::{sync::Arc, time::Duration};
use tokio::time::Instant;
use tracing::Instrument;

pub struct Outbound {
    pub upstreams: Arc<Upstreams>,
    pub metrics: Arc<Metrics>,
    /// Gateway mode: routes by path prefix, longest first. Sidecar mode: `None` (by authority).
    pub routes: Option<Vec<Route>>,
    /// How long a request for a service seen for the first time waits for its endpoints.
    pub discovery_wait: Duration,
    /// The largest request body accepted (0: no limit): a larger `Content-Length` is refused with
    /// 413 before any of the body is read (the gateway sets it).
    pub max_request_body: u64,
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
        Self { upstreams, metrics, routes, discovery_wait, max_request_body: 0 }
    }

    /// 413 for a declared body over the limit, answered before any of it is read.
    fn too_large(&self, req: &Request<Incoming>) -> Option<Response<Body>> {
        let declared = req.headers().get(http::header::CONTENT_LENGTH)?.to_str().ok()?.parse::<u64>().ok()?;
        (self.max_request_body > 0 && declared > self.max_request_body).then(|| {
            self.metrics.request_counter("gateway", "-", "-", 413).inc();
            let mut resp = error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!(
                    "the request body ({declared} bytes) is larger than this gateway accepts ({} bytes)",
                    self.max_request_body
                ),
                json!({ "limit": self.max_request_body, "content_length": declared }),
            );
            // The unread body cannot share the connection with a next request.
            resp.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
            resp
        })
    }

    pub async fn handle(self: Arc<Self>, mut req: Request<Incoming>) -> Response<Body> {
        let t = crate::http::trace::propagate(req.headers_mut());
        let direction = if self.routes.is_some() { "gateway" } else { "outbound" };
        let span = tracing::info_span!(
            "request", direction, method = %req.method(), path = %req.uri().path(),
            request_id = %t.request_id, trace_id = %t.trace_id, service = tracing::field::Empty,
        );
        let grpc = crate::http::headers::is_grpc(req.headers());
        let resp = async move {
            let started = Instant::now();
            if let Some(resp) = self.too_large(&req) {
                return resp;
            }
            let up = match self.route(&mut req) {
                Ok(up) => up,
                Err(resp) => return *resp,
            };
            let service = up.name.as_str();
            tracing::Span::current().record("service", service);
            let (resp, endpoint) = self.send(&up, req).await;
            let status = resp.status().as_u16();
            let took = started.elapsed();
            match &endpoint {
                Some(e) => e
                    .counters
                    .get(status, || self.metrics.request_counter(direction, service, &e.info.id, status))
                    .inc(),
                None => self.metrics.request_counter(direction, service, "-", status).inc(),
            };
            up.latency
                .get_or_init(|| self.metrics.latency_histogram(direction, service))
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
        .await;
        if grpc { crate::http::errors::for_grpc(resp) } else { resp }
    }

    /// The upstream of the service a request is for; in gateway mode also rewrites its path.
    fn route(&self, req: &mut Request<Incoming>) -> Result<Arc<Upstream>, Box<Response<Body>>> {
        let Some(routes) = &self.routes else {
            let host = req
                .uri()
                .host()
                .or_else(|| {
                    let h = req.headers().get(header::HOST)?.to_str().ok()?;
                    Some(h.rsplit_once(':').map_or(h, |(host, _)| host))
                })
                .unwrap_or_default();
            if !mesh_proto::names::is_service_name(host) {
                return Err(Box::new(error_response(
                    StatusCode::BAD_REQUEST,
                    "unknown_authority",
                    format!(
                        "cannot tell which service this request is for: authority {host:?} is not a mesh service name (send Host: <service> or use this sidecar as HTTP_PROXY)"
                    ),
                    json!({ "authority": host }),
                )));
            }
            return Ok(self.upstreams.get_or_add(host));
        };
        let path = req.uri().path();
        let Some(route) = routes.iter().find(|r| r.matches(path)) else {
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
        Ok(self.upstreams.get_or_add(&route.service))
    }

    /// Answers from the cache when the policy allows, otherwise fetches (single flight on a
    /// cache miss) and keeps what may be kept. Returns the response and the endpoint, if any.
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
        let cp = &applied.policy.cache;
        let cacheable = {
            let creq = crate::outbound::cache::Request {
                method: req.method(),
                path_and_query: path_and_query(&req),
                headers: req.headers(),
            };
            crate::outbound::cache::Cache::applies(cp, &creq) && self.upstreams.invalidation_ready(cp)
        };
        if !cacheable {
            return self.fetch(up, &applied, req).await;
        }
        // The request moves on to the upstream: what the cache keys on is kept aside.
        let pq = path_and_query(&req).to_string();
        let (method, headers) = (req.method().clone(), req.headers().clone());
        let creq =
            crate::outbound::cache::Request { method: &method, path_and_query: &pq, headers: &headers };
        let keys = up.cache.keys(cp, &creq);
        let mut stale = None;
        let mut leader = false;
        loop {
            match up.cache.lookup(&keys, Instant::now()) {
                crate::outbound::cache::Lookup::Fresh(e) => return (self.cached(service, &e, "hit"), None),
                crate::outbound::cache::Lookup::Stale(e) => stale = Some(e),
                crate::outbound::cache::Lookup::Miss => {}
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
        let (resp, endpoint) = self.fetch(up, &applied, req).await;
        let failed = resp.status().is_server_error();
        let answer = if resp.status() == StatusCode::OK {
            let (parts, body) = resp.into_parts();
            match crate::http::body::collect_up_to(body, crate::outbound::cache::MAX_ENTRY_BYTES).await {
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

    fn cached(
        &self,
        service: &str,
        e: &crate::outbound::cache::Entry,
        result: &'static str,
    ) -> Response<Body> {
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
    /// policy. Returns the response and the endpoint that answered, if any.
    async fn fetch(
        &self,
        up: &Upstream,
        applied: &AppliedPolicy,
        req: Request<Incoming>,
    ) -> (Response<Body>, Option<Arc<Endpoint>>) {
        let service = up.name.as_str();
        let policy = &applied.policy;
        let started = Instant::now();
        let deadline = (!policy.timeout.request.is_zero()).then(|| started + policy.timeout.request);

        // Fail fast beyond the service's concurrency limit: no unbounded queue.
        let permit = match applied.limiter.acquire().await {
            Ok(p) => p,
            Err(o) => {
                self.metrics.overload_rejections.get_or_create(&vec![("service", service.to_string())]).inc();
                let resp = error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "overloaded",
                    format!(
                        "service {service} is at its concurrency limit ({} in flight, {} waiting): refused at once",
                        o.in_flight, o.pending
                    ),
                    json!({ "service": service }),
                );
                return (resp, None);
            }
        };

        let hash_key = policy
            .load_balancer
            .hash_header
            .as_deref()
            .and_then(|h| req.headers().get(h))
            .map(|v| v.as_bytes().to_vec());
        let (mut parts, body) = req.into_parts();
        let retry = &policy.retry;
        let idempotent = matches!(
            parts.method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
        ) || parts.headers.contains_key(&crate::inbound::idempotency::IDEMPOTENCY_KEY);
        let mut attempts_allowed = if idempotent { retry.max_attempts.max(1) } else { 1 };
        // Keep the body for a retry only when it is known to be small enough.
        let mut body = Some(body);
        let mut replay: Option<Bytes> = None;
        if attempts_allowed > 1 {
            let hint = body.as_ref().map(|b| b.size_hint().upper()).unwrap_or(Some(0));
            match hint {
                // No body (a GET, say): nothing to read or keep.
                Some(0) if body.as_ref().is_some_and(|b| b.is_end_stream()) => {
                    body = None;
                    replay = Some(Bytes::new());
                }
                Some(n) if n <= retry.max_body_bytes => match body.take().map(|b| b.collect()) {
                    Some(collected) => match collected.await {
                        Ok(c) => replay = Some(c.to_bytes()),
                        Err(e) => {
                            let resp = error_response(
                                StatusCode::BAD_REQUEST,
                                "body_failed",
                                format!("reading the request body failed: {e}"),
                                json!({ "service": service }),
                            );
                            return (resp, None);
                        }
                    },
                    None => attempts_allowed = 1,
                },
                _ => attempts_allowed = 1,
            }
        }
        up.budget.request(started, retry);

        let mut tried: Vec<Arc<Endpoint>> = Vec::new();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let set = up.endpoints();
            let now = Instant::now();
            let mut avoid: Vec<Arc<Endpoint>> = tried.clone();
            avoid.extend(set.endpoints.iter().filter(|e| e.breaker.is_open(now)).cloned());
            let Some(endpoint) =
                set.pick(policy.load_balancer.algorithm, up.round_robin(), hash_key.as_deref(), &avoid)
            else {
                let resp = error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no_endpoints",
                    format!("service {service} has no healthy endpoints"),
                    json!({ "service": service }),
                );
                return (resp, None);
            };
            // A half-open endpoint takes only its probes; panic mode (everything open) ignores breakers.
            let all_open = set.endpoints.iter().all(|e| e.breaker.is_open(now));
            if !all_open && !endpoint.breaker.admit(now, &policy.circuit_breaker) && set.endpoints.len() > 1 {
                tried.push(endpoint.clone());
                if tried.len() < set.endpoints.len() {
                    attempt -= 1;
                    continue;
                }
            }
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
            let attempt_body = match &replay {
                Some(bytes) if bytes.is_empty() => crate::http::body::empty(),
                Some(bytes) => boxed(Full::new(bytes.clone())),
                None => body.take().map(boxed).unwrap_or_else(crate::http::body::empty),
            };
            let mut r = Request::new(attempt_body);
            *r.method_mut() = parts.method.clone();
            *r.version_mut() = parts.version;
            if attempt >= attempts_allowed {
                // No attempt comes after this one: the request's parts move instead of copying.
                *r.uri_mut() = std::mem::take(&mut parts.uri);
                *r.headers_mut() = std::mem::take(&mut parts.headers);
            } else {
                *r.uri_mut() = parts.uri.clone();
                *r.headers_mut() = parts.headers.clone();
            }
            let sent = Instant::now();
            let left = deadline.map(|d| d.saturating_duration_since(sent));
            let per_try = match (left, (!retry.per_try_timeout.is_zero()).then_some(retry.per_try_timeout)) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let slot = endpoint.start();
            let result = crate::endpoint::forward::forward(&applied.clients, r, &authority, per_try).await;
            // One clock read for everything that follows the answer.
            let done = Instant::now();
            let took = done.saturating_duration_since(sent);
            let class = classify(&result);
            let failed = match &result {
                Ok(resp) => resp.status().is_server_error(),
                Err(_) => true,
            };
            endpoint.observe(if failed { took.max(Duration::from_secs(1)) } else { took }, done);
            if endpoint.breaker.record(failed, done, &policy.circuit_breaker) {
                self.maybe_eject(&set, &endpoint, service, &policy.circuit_breaker);
            }
            let retryable = class.is_some_and(|c| retry.retry_on.contains(&c));
            let time_left = deadline.is_none_or(|d| done < d);
            if retryable && attempt < attempts_allowed && time_left {
                if up.budget.try_retry(done, retry) {
                    self.metrics.retries.get_or_create(&vec![("service", service.to_string())]).inc();
                    tracing::debug!(endpoint = %endpoint.info.id, attempt, class = ?class, "retrying on another endpoint");
                    drop(slot);
                    tried.push(endpoint);
                    let wait = crate::outbound::retry::backoff(retry, attempt);
                    let wait =
                        deadline.map_or(wait, |d| wait.min(d.saturating_duration_since(Instant::now())));
                    tokio::time::sleep(wait).await;
                    continue;
                }
                self.metrics
                    .retry_budget_exhausted
                    .get_or_create(&vec![("service", service.to_string())])
                    .inc();
            }
            return match result {
                Ok(resp) => (resp.map(|b| boxed(Tracked::new(b, (slot, permit)))), Some(endpoint)),
                Err(e) => {
                    tracing::warn!(endpoint = %endpoint.info.id, error = %e, attempt, "request to endpoint failed");
                    let resp = error_response(
                        e.status(),
                        e.code(),
                        e.to_string(),
                        json!({ "service": service, "endpoint": endpoint.info.id, "attempts": attempt }),
                    );
                    (resp, Some(endpoint))
                }
            };
        }
    }

    /// Opens `endpoint`'s breaker unless that would eject more than the policy's share of the
    /// set or its last available endpoint.
    fn maybe_eject(
        &self,
        set: &EndpointSet,
        endpoint: &Arc<Endpoint>,
        service: &str,
        p: &CircuitBreakerPolicy,
    ) {
        let now = Instant::now();
        let open = set.endpoints.iter().filter(|e| e.breaker.is_open(now)).count();
        let total = set.endpoints.len();
        let within_share = (open + 1) * 100 <= p.max_ejection_percent as usize * total;
        if within_share && open + 1 < total {
            let d = endpoint.breaker.open(now, p);
            self.metrics
                .breaker_openings
                .get_or_create(&vec![
                    ("service", service.to_string()),
                    ("endpoint", endpoint.info.id.clone()),
                ])
                .inc();
            tracing::warn!(%service, endpoint = %endpoint.info.id, open_for = ?d, "circuit opened: endpoint ejected");
        } else {
            tracing::debug!(%service, endpoint = %endpoint.info.id, open, total, "not ejecting: at the max-ejection share or the last endpoint");
        }
    }
}

fn path_and_query<B>(req: &Request<B>) -> &str {
    req.uri().path_and_query().map_or("/", |p| p.as_str())
}
