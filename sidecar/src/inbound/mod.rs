//! Inbound: other sidecars → the local app.
//!
//! Every `x-mesh-*` request header a caller sends is removed before the app sees it; the
//! sidecar sets `x-mesh-caller` itself from the caller's verified identity (over mutual TLS;
//! without it the header is never present). The request is forwarded on a pooled connection in
//! the protocol it arrived in, streaming.

pub mod authz;
pub mod idempotency;
pub mod rate_limit;

use crate::{
    endpoint::local_app::LocalApp,
    gateway::auth,
    http::{
        body::{Body, Tracked, boxed, collect_up_to},
        errors::{self, error_response},
        headers::{self, ORIG_PROTO},
        trace,
    },
    inbound::{
        authz::authorized,
        idempotency::{Begin, Idempotency, Stored},
    },
    metrics::{Metrics, StatusCounters},
    server::{Peer, PeerIdentity},
};

use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use mesh_proto::policy::ServicePolicy;
use mesh_runtime::telemetry::{Sampling, Telemetry};
use serde_json::json;
use std::{
    borrow::Cow,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};
use tokio::time::Instant;
use tracing::Instrument;

/// The header carrying the verified caller identity to the app.
pub const CALLER: HeaderName = HeaderName::from_static("x-mesh-caller");

pub struct Inbound {
    pub service: String,
    /// This service's own policy (rate limits apply here, at the receiving side).
    pub policy: tokio::sync::watch::Receiver<(u64, Arc<ServicePolicy>)>,
    rate_limits: rate_limit::RateLimits,
    idempotency: Arc<Idempotency>,
    pub app: LocalApp,
    counters: StatusCounters,
    latency: crate::metrics::Latency,
    pub metrics: Arc<Metrics>,
    /// Requests in flight to the app (reported as load in heartbeats).
    pub inflight: Arc<AtomicUsize>,
    /// Where spans go, and the share of new traces sampled.
    pub telemetry: Telemetry,
    pub sampling: Arc<Sampling>,
    /// Operators' taps on this service.
    pub tap: Arc<crate::control::tap::Tap>,
    /// Callers arrive over mutual TLS with verified identities; authorization applies.
    pub mtls: bool,
    /// Services whose calls may carry a verified end user to the app (the gateway).
    pub trusted_edges: Vec<String>,
}

/// Holds one unit of the app's load until dropped.
struct Load(Arc<AtomicUsize>, Arc<Metrics>);

impl Load {
    fn start(n: &Arc<AtomicUsize>, m: &Arc<Metrics>) -> Load {
        n.fetch_add(1, Ordering::Relaxed);
        m.inbound_inflight.inc();
        Load(n.clone(), m.clone())
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
        self.1.inbound_inflight.dec();
    }
}

impl Inbound {
    pub fn new(
        service: String,
        app: LocalApp,
        policy: tokio::sync::watch::Receiver<(u64, Arc<ServicePolicy>)>,
        metrics: Arc<Metrics>,
        inflight: Arc<AtomicUsize>,
        idempotency_window: Duration,
    ) -> Self {
        let latency = metrics.latency_histogram("inbound", &service);
        Self {
            service,
            policy,
            idempotency: Idempotency::new(idempotency_window),
            rate_limits: Default::default(),
            app,
            counters: Default::default(),
            latency,
            metrics,
            inflight,
            mtls: false,
            trusted_edges: Vec::new(),
            telemetry: Telemetry::default(),
            sampling: Arc::new(Sampling::all()),
            tap: Arc::default(),
        }
    }

    pub async fn handle(self: Arc<Self>, mut req: Request<Incoming>, peer: Peer) -> Response<Body> {
        let t = trace::propagate(req.headers_mut(), &self.sampling);
        let mut server = t.server_span(&self.telemetry, &req, "inbound");
        let hop = t.hop(&self.telemetry, server.as_ref());
        let span = tracing::info_span!(
            "request", direction = "inbound", method = %req.method(), path = %req.uri().path(),
            request_id = %t.request_id, trace_id = %t.trace_id, peer = %peer.addr,
        );
        let grpc = headers::is_grpc(req.headers());
        let tapped = self.tap.on().then(|| (req.method().to_string(), req.uri().path().to_string()));
        let resp = async move {
            let started = Instant::now();
            let verified = peer.identity.as_deref();
            // A peer sidecar carried an HTTP/1.1 request as an HTTP/2 stream: the app gets
            // HTTP/1.1, as it was sent (`strip_mesh_headers` drops the mark).
            if req.version() == http::Version::HTTP_2 && req.headers().contains_key(&ORIG_PROTO) {
                *req.version_mut() = http::Version::HTTP_11;
            }
            // The end user rides along only from a trusted edge, whose identity was verified.
            let edge = verified.and_then(PeerIdentity::service).is_some_and(|s| self.trusted_edges.iter().any(|t| t == s));
            strip_mesh_headers(req.headers_mut(), verified.and_then(PeerIdentity::header), edge);
            let policy = self.policy.borrow().1.clone();
            if self.mtls {
                let refusal = match verified {
                    None => Some("the caller has no mesh identity".to_string()),
                    Some(caller) if !authorized(&policy.authz, caller) => Some(format!(
                        "{} may not call {}: the allowed callers are {:?}",
                        caller.id(),
                        self.service,
                        policy.authz.allowed_callers
                    )),
                    Some(_) => None,
                };
                if let Some(reason) = refusal {
                    self.metrics.authz_denied.get_or_create(&vec![("service", self.service.clone())]).inc();
                    self.counters
                        .get(403, || self.metrics.request_counter("inbound", &self.service, "app", 403))
                        .inc();
                    return error_response(
                        StatusCode::FORBIDDEN,
                        "forbidden",
                        reason,
                        json!({ "service": self.service, "caller": verified.map(PeerIdentity::id) }),
                    );
                }
            }
            // A caller is known by its verified identity, or (without mTLS) by its address; it is
            // only named when a per-caller limit needs it.
            let limits = &policy.rate_limit;
            let caller = match verified {
                Some(caller) => Cow::Borrowed(caller.id()),
                None if limits.per_caller_requests_per_second > 0 => Cow::Owned(peer.addr.ip().to_string()),
                None => Cow::Borrowed(""),
            };
            if let Err(wait) = self.rate_limits.check(&caller, limits, Instant::now()) {
                self.metrics.rate_limited.get_or_create(&vec![("service", self.service.clone())]).inc();
                let mut resp = error_response(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    format!(
                        "{} is over its rate limit; retry in {}ms",
                        self.service,
                        wait.as_millis().max(1)
                    ),
                    json!({ "service": self.service, "retry_after_ms": wait.as_millis() as u64 }),
                );
                let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                resp.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from(secs.max(1)));
                self.counters
                    .get(429, || self.metrics.request_counter("inbound", &self.service, "app", 429))
                    .inc();
                return resp;
            }
            // A repeated Idempotency-Key gets the first answer instead of reaching the app again;
            // the same key with a different request is refused.
            let mut req = req.map(boxed);
            let mut owner = None;
            // From the edge, a key is the end user's (many clients share the edge's identity):
            // an anonymous client's key is left to the app, never shared with other clients.
            let credential = match edge {
                true => req.headers().get(auth::USER),
                false => req.headers().get(http::header::AUTHORIZATION),
            };
            let keyed = req.headers().get(&idempotency::IDEMPOTENCY_KEY).filter(|_| !edge || credential.is_some());
            if let Some(key) = keyed.and_then(|v| v.to_str().ok()) {
                let who = verified.map_or_else(|| peer.addr.ip().to_string(), |c| c.id().to_string());
                let scope = idempotency::scope(
                    &who,
                    credential.map(HeaderValue::as_bytes),
                    req.method(),
                    req.uri().path(),
                    key,
                );
                let (parts, body) = req.into_parts();
                let body = match collect_up_to(body, idempotency::MAX_BODY).await {
                    Ok(body) => body,
                    Err(e) => {
                        return error_response(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "idempotent_body_too_large",
                            format!("a request with an Idempotency-Key carries at most {} bytes: {e}", idempotency::MAX_BODY),
                            json!({ "service": self.service }),
                        );
                    }
                };
                let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                let fingerprint = idempotency::fingerprint(&parts.method, path, &parts.headers, &body);
                req = Request::from_parts(parts, boxed(Full::new(body)));
                loop {
                    match self.idempotency.begin(&scope, fingerprint, Instant::now()) {
                        Begin::Replay(stored) => return replay(&stored),
                        Begin::Wait(mut rx) => match rx.wait_for(|v| v.is_some()).await.map(|v| v.clone()) {
                            Ok(Some(Some(stored))) => return replay(&stored),
                            _ => continue,
                        },
                        Begin::Mismatch => {
                            return error_response(
                                StatusCode::UNPROCESSABLE_ENTITY,
                                "idempotency_key_reused",
                                "this Idempotency-Key was used for a different request (method, path or body); \
                                 use a new key for a new request"
                                    .to_string(),
                                json!({ "service": self.service }),
                            );
                        }
                        Begin::Owner(guard) => {
                            owner = Some(guard);
                            break;
                        }
                    }
                }
            }
            let load = Load::start(&self.inflight, &self.metrics);
            let attempt = hop.attempt(&mut req, "app", 0);
            let result = self.app.send(req, None).await;
            if let Some(mut a) = attempt {
                match &result {
                    Ok(resp) => a.status(resp.status().as_u16(), false),
                    Err(e) => a.fail(e.to_string()),
                }
                a.end();
            }
            let resp = match (result, owner) {
                (Ok(resp), Some(guard)) => {
                    let (parts, body) = resp.into_parts();
                    match collect_up_to(body, idempotency::MAX_BODY).await {
                        Ok(bytes) => {
                            let stored =
                                Stored { status: parts.status, headers: parts.headers.clone(), body: bytes };
                            guard.finish(Some(stored.clone()));
                            drop(load);
                            let mut resp = Response::from_parts(parts, boxed(Full::new(stored.body)));
                            resp.headers_mut().remove(http::header::CONTENT_LENGTH);
                            resp
                        }
                        Err(e) => {
                            drop(guard);
                            error_response(
                                StatusCode::BAD_GATEWAY,
                                "app_body_failed",
                                format!("local app: reading the answer failed: {e}"),
                                json!({ "service": self.service }),
                            )
                        }
                    }
                }
                (Ok(resp), None) => resp.map(|b| boxed(Tracked::new(b, load))),
                (Err(e), _) => {
                    tracing::warn!(error = %e, "the local app did not answer");
                    error_response(
                        e.status(),
                        e.code(),
                        format!("local app: {e}"),
                        json!({ "service": self.service }),
                    )
                }
            };
            let status = resp.status().as_u16();
            self.counters
                .get(status, || self.metrics.request_counter("inbound", &self.service, "app", status))
                .inc();
            self.latency.observe(started.elapsed().as_secs_f64(), Some(crate::metrics::TraceExemplar(t.trace_id)), None);
            if let Some((method, path)) = &tapped {
                self.tap.record(&crate::control::tap::Seen {
                    direction: "inbound",
                    caller: verified.and_then(PeerIdentity::service).unwrap_or(""),
                    method,
                    path,
                    status,
                    latency: started.elapsed(),
                    endpoint: "app",
                    trace_id: t.trace_id.as_str(),
                });
            }
            resp
        }
        .instrument(span)
        .await;
        if let Some(mut s) = server.take() {
            s.status(resp.status().as_u16(), true);
            s.end();
        }
        if grpc { errors::for_grpc(resp) } else { resp }
    }
}

/// The stored first answer to an idempotency key, marked as a replay.
fn replay(stored: &Stored) -> Response<Body> {
    let mut resp = Response::new(boxed(Full::new(stored.body.clone())));
    *resp.status_mut() = stored.status;
    *resp.headers_mut() = stored.headers.clone();
    resp.headers_mut().remove(http::header::CONTENT_LENGTH);
    resp.headers_mut().insert("x-mesh-idempotent-replay", HeaderValue::from_static("true"));
    resp
}

/// Removes every `x-mesh-*` header a caller sent, then sets the caller identity when verified.
pub fn strip_mesh_headers(h: &mut http::HeaderMap, caller: Option<&HeaderValue>, keep_user: bool) {
    let forged: Vec<HeaderName> = h
        .keys()
        .filter(|k| k.as_str().starts_with("x-mesh-"))
        .filter(|k| !(keep_user && (**k == auth::USER || **k == auth::USER_ROLES)))
        .cloned()
        .collect();
    for k in forged {
        h.remove(k);
    }
    if let Some(v) = caller {
        h.insert(CALLER, v.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forged_mesh_headers_never_pass() {
        let mut h = http::HeaderMap::new();
        h.insert(CALLER, HeaderValue::from_static("spiffe://mesh/service/admin"));
        h.insert("x-mesh-anything", HeaderValue::from_static("1"));
        h.insert("x-other", HeaderValue::from_static("1"));
        h.insert(auth::USER, HeaderValue::from_static("mallory"));
        strip_mesh_headers(&mut h, None, false);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-other"]);
        let web = PeerIdentity::new("spiffe://mesh/service/web".into());
        strip_mesh_headers(&mut h, web.header(), false);
        assert_eq!(h[CALLER], "spiffe://mesh/service/web");
        // From a trusted edge the verified end user passes; nothing else of its x-mesh-* does.
        h.insert(auth::USER, HeaderValue::from_static("alice"));
        h.insert("x-mesh-anything", HeaderValue::from_static("1"));
        strip_mesh_headers(&mut h, web.header(), true);
        assert_eq!(h[auth::USER], "alice");
        assert!(!h.contains_key("x-mesh-anything"));
    }
}
