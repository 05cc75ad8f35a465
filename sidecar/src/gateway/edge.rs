//! The edge's request path, in order: the client's address ([`client`]) → IP lists and blocks
//! ([`ip_filter`]) → request shape and the gateway's limits ([`screen`]) → the route → the
//! route's limits → a CORS preflight answered here ([`cors`]) → the end-user token ([`auth`]) →
//! the route's rate limit ([`rate_limit`]) → the body read (up to the route's limit) and threat
//! screening of query and body → forwarding headers → the mesh. On the way back: CORS and
//! rate-limit headers, `X-Content-Type-Options`, and the access-log line ([`access_log`]) once
//! the body is sent.
//!
//! A refusal is a JSON error naming its rule; the rules that mark a hostile client (screening
//! and bad tokens) are strikes towards an automatic block.
//!
//! [`client`]: super::client
//! [`ip_filter`]: super::ip_filter
//! [`screen`]: super::screen
//! [`cors`]: super::cors
//! [`auth`]: super::auth
//! [`rate_limit`]: super::rate_limit
//! [`access_log`]: super::access_log

use std::{net::IpAddr, sync::Arc};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body::Body as HttpBody;
use http_body_util::Full;
use hyper::body::Incoming;
use ipnet::IpNet;
use mesh_proto::gateway::GatewayPolicy;
use serde_json::json;
use tokio::time::Instant;

use crate::{
    gateway::{
        access_log::{self, AccessLog, Logged, Record},
        auth::{EdgeAuth, USER, strip_user},
        client,
        cors::Cors,
        ip_filter::{AutoBlock, Denied, IpFilter, IpRule},
        rate_limit::RouteLimiter,
        screen::{self, Limits, Rule, ThreatMode, threats},
    },
    http::{
        body::{Body, boxed, collect_up_to},
        errors::error_response,
        trace::TraceContext,
    },
    metrics::Metrics,
    outbound::route::{self, Route},
    transport::framing::FramingLog,
    upstream::{Upstream, Upstreams},
};

/// Marks a request whose route turned the gateway's cache off (`cache: false`).
#[derive(Debug, Clone, Copy)]
pub struct NoCache;

/// The gateway's edge settings (the routes carry their own).
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    /// Limits of routes that set none (and of requests before they are routed).
    pub limits: Limits,
    /// Threat screening of routes that name no mode.
    pub threats: ThreatMode,
    /// Peers whose `X-Forwarded-For` names the client.
    pub trusted_proxies: Vec<IpNet>,
    pub allow: Vec<IpRule>,
    pub deny: Vec<IpRule>,
    pub auto_block: AutoBlock,
    /// Over TLS, answers carry `Strict-Transport-Security` with this max-age (0: none).
    pub hsts_max_age: u64,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        EdgeConfig {
            limits: Limits::DEFAULT,
            threats: ThreatMode::Detect,
            trusted_proxies: Vec::new(),
            allow: Vec::new(),
            deny: Vec::new(),
            auto_block: AutoBlock {
                after: 20,
                window: std::time::Duration::from_secs(60),
                block_for: std::time::Duration::from_secs(600),
            },
            hsts_max_age: 365 * 86_400,
        }
    }
}

/// The routes in force and each one's rate limiter (by index), swapped whole when the control
/// plane pushes new ones; a request keeps the table it started with.
pub struct RouteTable {
    /// In precedence order.
    pub routes: Vec<Route>,
    limiters: Vec<Option<RouteLimiter>>,
    /// The `gateway` policy version they came from (0: the gateway's own `--route`s).
    pub version: u64,
}

impl RouteTable {
    /// The table of `routes` (sorted here).
    pub fn new(mut routes: Vec<Route>, version: u64) -> Result<RouteTable, String> {
        Route::sort(&mut routes);
        let limiters = routes
            .iter()
            .map(|r| r.rate_limit.as_ref().map(|spec| RouteLimiter::new(r.label(), spec)).transpose())
            .collect::<Result<_, _>>()?;
        Ok(RouteTable { routes, limiters, version })
    }
}

pub struct Edge {
    pub auth: Option<Arc<EdgeAuth>>,
    config: EdgeConfig,
    table: ArcSwap<RouteTable>,
    /// The routes the gateway was started with: in force while the control plane names none.
    own_routes: Vec<Route>,
    pub ip_filter: IpFilter,
    access_log: Option<Arc<AccessLog>>,
    metrics: Arc<Metrics>,
    /// The public listener speaks TLS: answers carry HSTS, the app is told `https`.
    tls: bool,
    hsts_value: HeaderValue,
}

/// One request's trip through the edge.
pub struct Visit {
    started: Instant,
    peer: IpAddr,
    client: IpAddr,
    record: Record,
    table: Arc<RouteTable>,
    route: Option<usize>,
    origin: Option<HeaderValue>,
    /// The route's rate limiter said this many may follow at once.
    rate_remaining: Option<u32>,
    /// Answered here (a refusal or a preflight), not by a service.
    refused: bool,
    /// The request's body has not been read (a refusal then closes the connection: the unread
    /// body cannot share it with a next request).
    unread_body: bool,
    /// The smuggling rule this request's head broke, as the connection's framing saw it.
    framing: Option<&'static str>,
}

impl Visit {
    /// The route the request took (once admitted).
    pub fn route_name(&self) -> Option<&str> {
        self.route.and_then(|i| self.table.routes.get(i)).map(|r| r.label())
    }

    /// The service that answered, and its endpoint, for the log.
    pub fn served_by(&mut self, service: &str, endpoint: Option<&str>) {
        self.record.service = Some(service.to_string());
        self.record.endpoint = endpoint.map(str::to_string);
    }
}

/// Is this a rule that marks a hostile client?
fn strikes(rule: &str) -> bool {
    rule.starts_with("smuggling")
        || rule.starts_with("token_") && rule != "token_missing"
        || matches!(rule, "path_not_normalised" | "method" | "sqli" | "xss")
}

impl Edge {
    /// The edge (`tls`: its listener speaks TLS), serving `routes` (the gateway's own) until
    /// the control plane pushes others.
    pub fn new(
        config: EdgeConfig,
        tls: bool,
        auth: Option<Arc<EdgeAuth>>,
        routes: Vec<Route>,
        access_log: Option<Arc<AccessLog>>,
        metrics: Arc<Metrics>,
    ) -> Result<Edge, String> {
        let table = ArcSwap::from_pointee(RouteTable::new(routes.clone(), 0)?);
        let ip_filter = IpFilter::new(config.allow.clone(), config.deny.clone(), config.auto_block);
        let hsts_value =
            HeaderValue::from_str(&format!("max-age={}; includeSubDomains", config.hsts_max_age))
                .map_err(|e| e.to_string())?;
        Ok(Edge { auth, config, table, own_routes: routes, ip_filter, access_log, metrics, tls, hsts_value })
    }

    /// The routes in force.
    pub fn routes(&self) -> Arc<RouteTable> {
        self.table.load_full()
    }

    /// Puts `gateway` policy `version` in force: its routes (none: the gateway's own again) and
    /// its IP lists. A route whose limiter cannot be built is an error and nothing changes.
    pub fn apply(&self, version: u64, policy: &GatewayPolicy) -> Result<(), String> {
        if self.table.load().version == version {
            return Ok(());
        }
        let routes = if policy.routes.is_empty() { self.own_routes.clone() } else { policy.routes.clone() };
        let table = RouteTable::new(routes, version)?;
        tracing::info!(
            version,
            routes = table.routes.len(),
            from_control_plane = !policy.routes.is_empty(),
            ip_allow = policy.ip_allow.len(),
            ip_deny = policy.ip_deny.len(),
            "gateway policy in force"
        );
        self.table.store(Arc::new(table));
        self.ip_filter.set_pushed(policy.ip_allow.clone(), policy.ip_deny.clone());
        Ok(())
    }

    /// Starts a request's visit: who it is from, what it asks.
    pub fn visit(
        &self,
        peer: std::net::SocketAddr,
        req: &Request<Incoming>,
        t: &TraceContext,
        framing: Option<&FramingLog>,
    ) -> Visit {
        let client = client::client_ip(peer.ip(), req.headers(), &self.config.trusted_proxies);
        Visit {
            started: Instant::now(),
            peer: peer.ip(),
            client,
            record: Record {
                time: access_log::now(),
                client_ip: client.to_string(),
                subject: None,
                method: req.method().to_string(),
                path: req.uri().path().to_string(),
                route: None,
                service: None,
                endpoint: None,
                status: 0,
                bytes_in: 0,
                bytes_out: 0,
                duration_ms: 0.0,
                request_id: t.request_id.to_string(),
                trace_id: t.trace_id.to_string(),
                rule: None,
            },
            table: self.table.load_full(),
            route: None,
            origin: req.headers().get(header::ORIGIN).cloned(),
            rate_remaining: None,
            refused: false,
            unread_body: !req.body().is_end_stream(),
            // Taken for every request, so each connection's verdicts stay in step.
            framing: framing.and_then(FramingLog::next),
        }
    }

    /// A refusal by `rule`: counted, a strike when it marks a hostile client, and answered as
    /// a JSON error naming the rule.
    fn refuse(&self, v: &mut Visit, rule: Rule) -> Response<Body> {
        let mut resp = error_response(rule.status, rule.rule, rule.message, json!({ "rule": rule.rule }));
        if rule.status == StatusCode::METHOD_NOT_ALLOWED {
            // RFC 9110 §15.5.6: a 405 says which methods are.
            resp.headers_mut().insert(header::ALLOW, HeaderValue::from_static(screen::ALLOWED));
        }
        self.refused_with(v, rule.rule, resp)
    }

    fn refused_with(&self, v: &mut Visit, rule: &'static str, resp: Response<Body>) -> Response<Body> {
        v.refused = true;
        v.record.rule = Some(rule);
        self.metrics.edge_refusals.get_or_create(&vec![("rule", rule.to_string())]).inc();
        if strikes(rule) && self.ip_filter.strike(v.client, rule, Instant::now()) {
            self.metrics.edge_blocks.inc();
            tracing::warn!(client = %v.client, rule, "client blocked after repeated refusals");
        }
        resp
    }

    /// Everything from a request's arrival to its forwarding: the request to send on and its
    /// upstream, or the answer given here.
    pub async fn admit(
        &self,
        upstreams: &Upstreams,
        req: Request<Incoming>,
        v: &mut Visit,
    ) -> Result<(Request<Body>, Arc<Upstream>), Response<Body>> {
        if let Err(denied) = self.ip_filter.check(v.client, Instant::now()) {
            let (status, message) = match denied {
                Denied::Blocked(left) => (
                    StatusCode::TOO_MANY_REQUESTS,
                    format!(
                        "this client is blocked for {} s after repeated refused requests",
                        left.as_secs().max(1)
                    ),
                ),
                _ => (StatusCode::FORBIDDEN, "this client address may not call this gateway".to_string()),
            };
            let mut resp = error_response(status, denied.rule(), message, json!({ "rule": denied.rule() }));
            if let Denied::Blocked(left) = denied {
                resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(left.as_secs().max(1)));
            }
            return Err(self.refused_with(v, denied.rule(), resp));
        }
        if let Some(rule) = v.framing {
            v.unread_body = true;
            return Err(self.refuse(v, screen::smuggling_refusal(rule)));
        }
        let pq = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_string();
        if let Err(rule) = screen::request_shape(req.method(), &pq, req.headers(), &self.config.limits) {
            return Err(self.refuse(v, rule));
        }
        let mut req = req;
        let table = v.table.clone();
        let routed = route::route(Some(&table.routes), upstreams, &mut req).map_err(|resp| {
            v.refused = true;
            v.record.rule = Some("no_route");
            *resp
        })?;
        let index = routed.route.unwrap_or_default();
        let r = &table.routes[index];
        v.route = Some(index);
        v.record.route = Some(r.label().to_string());
        let limits = r.limits.unwrap_or_default().or(self.config.limits);
        if let Err(rule) = screen::route_limits(&pq, req.headers(), &limits)
            .and_then(|()| screen::declared_body(req.headers(), &limits))
        {
            return Err(self.refuse(v, rule));
        }
        if let Some(cors) = &r.cors
            && let Some(answer) = cors.preflight(req.method(), req.headers())
        {
            v.refused = true;
            if answer.status() == StatusCode::FORBIDDEN {
                return Err(self.refused_with(v, "cors", answer));
            }
            return Err(answer);
        }
        // The edge: no client names the end user; only a verified token does.
        match &self.auth {
            Some(auth) => {
                let mode = r.auth.unwrap_or(auth.default_mode());
                if let Err((rule, resp)) = auth.authenticate(req.headers_mut(), mode).await {
                    return Err(self.refused_with(v, rule, *resp));
                }
            }
            None => strip_user(req.headers_mut()),
        }
        v.record.subject = req.headers().get(USER).and_then(|u| u.to_str().ok()).map(str::to_string);
        if let Some(limiter) = &table.limiters[index] {
            match limiter.check(limiter.key(req.headers(), v.record.subject.as_deref(), v.client)) {
                Ok(admitted) => v.rate_remaining = Some(admitted.remaining),
                Err(limited) => {
                    let secs =
                        limited.retry_after.as_secs() + u64::from(limited.retry_after.subsec_nanos() > 0);
                    let mut resp = error_response(
                        StatusCode::TOO_MANY_REQUESTS,
                        "rate_limited",
                        format!("this route's rate limit is used up; retry in {secs} s"),
                        json!({ "rule": "rate_limited", "retry_after_seconds": secs }),
                    );
                    resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
                    limiter.headers(resp.headers_mut(), 0, limited.retry_after);
                    return Err(self.refused_with(v, "rate_limited", resp));
                }
            }
        }
        let (mut parts, body) = req.into_parts();
        let body = if body.is_end_stream() {
            Bytes::new()
        } else {
            match collect_up_to(body, usize::try_from(limits.body).unwrap_or(usize::MAX)).await {
                Ok(b) => {
                    v.unread_body = false;
                    b
                }
                Err(e) if e.contains("larger than") => {
                    return Err(self.refuse(v, screen::body_too_large(limits.body, None)));
                }
                Err(e) => {
                    let rule = Rule {
                        status: StatusCode::BAD_REQUEST,
                        rule: "body_failed",
                        message: format!("reading the request body failed: {e}"),
                    };
                    return Err(self.refuse(v, rule));
                }
            }
        };
        v.record.bytes_in = body.len() as u64;
        let mode = r.threats.unwrap_or(self.config.threats);
        if mode != ThreatMode::Off {
            let textual =
                parts.headers.get(header::CONTENT_TYPE).and_then(|c| c.to_str().ok()).is_none_or(|c| {
                    let c = c.to_ascii_lowercase();
                    c.contains("json") || c.contains("form") || c.starts_with("text/") || c.contains("xml")
                });
            let hit = parts
                .uri
                .query()
                .and_then(|q| threats::scan(q.as_bytes()))
                .or_else(|| if textual { threats::scan(&body) } else { None });
            if let Some((rule, signature)) = hit {
                let rule: &'static str = rule;
                if mode == ThreatMode::Block {
                    let refusal = Rule {
                        status: StatusCode::FORBIDDEN,
                        rule,
                        message: format!("the request matches the {rule} signature {signature:?}"),
                    };
                    return Err(self.refuse(v, refusal));
                }
                tracing::info!(client = %v.client, rule, signature, "threat signature matched (detect mode; the request goes on)");
                self.metrics.edge_detections.get_or_create(&vec![("rule", rule.to_string())]).inc();
                v.record.rule = Some(rule);
            }
        }
        client::set_forwarded(&mut parts.headers, v.peer, v.client, &self.config.trusted_proxies, self.tls);
        if r.cache == Some(false) {
            parts.extensions.insert(NoCache);
        }
        let body = if body.is_empty() { crate::http::body::empty() } else { boxed(Full::new(body)) };
        Ok((Request::from_parts(parts, body), routed.upstream))
    }

    /// The answer on its way out: CORS and rate-limit headers, `X-Content-Type-Options`, and the
    /// access-log line once the body is sent.
    pub fn finish(&self, mut v: Visit, mut resp: Response<Body>) -> Response<Body> {
        let table = v.table.clone();
        let route = v.route.map(|i| &table.routes[i]);
        let h = resp.headers_mut();
        if let Some(cors) = route.and_then(|r| r.cors.as_ref())
            && !v.refused
        {
            cors.decorate(v.origin.as_ref(), h);
        }
        if let (Some(remaining), Some(Some(limiter))) =
            (v.rate_remaining, v.route.map(|i| &table.limiters[i]))
        {
            limiter.headers(h, remaining, limiter.reset_after(remaining));
        }
        if let Some(r) = route {
            for name in [header::LOCATION, header::CONTENT_LOCATION] {
                let public = h.get(&name).and_then(|l| l.to_str().ok()).and_then(|l| r.public_location(l));
                if let Some(v) = public.and_then(|p| HeaderValue::from_str(&p).ok()) {
                    h.insert(name, v);
                }
            }
        }
        h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        if self.tls && self.config.hsts_max_age > 0 {
            h.insert(header::STRICT_TRANSPORT_SECURITY, self.hsts_value.clone());
        }
        if v.refused && v.unread_body {
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        v.record.status = resp.status().as_u16();
        match &self.access_log {
            Some(log) if log.wanted(v.record.rule.is_some() || v.refused) => {
                let (parts, body) = resp.into_parts();
                Response::from_parts(parts, Logged::wrap(body, log.clone(), v.record, v.started))
            }
            _ => resp,
        }
    }

    /// The periodic sweep: idle rate-limit keys and expired blocks dropped; gauges set.
    pub fn sweep(&self) {
        let now = Instant::now();
        self.ip_filter.sweep(now);
        self.metrics.edge_blocked_clients.set(self.ip_filter.blocks(now).len() as i64);
        let mut keys = 0;
        for l in self.table.load().limiters.iter().flatten() {
            l.sweep();
            keys += l.keys();
        }
        self.metrics.edge_rate_limit_keys.set(keys as i64);
    }
}
