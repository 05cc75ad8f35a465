//! Gateway routes, shaped like the Kubernetes Gateway API's HTTPRoute rules: a match (path
//! prefix or exact path, methods, headers, hosts), an optional path rewrite, the target service,
//! and the route's edge middleware (auth mode, rate limit, CORS, size limits, threat screening).
//!
//! Precedence (as HTTPRoute's): an exact path before a prefix, a longer path before a shorter,
//! then the route with more conditions (method, headers, host); the first that matches wins.

use std::{collections::BTreeMap, sync::Arc};

use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, header};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::{
    gateway::{
        auth::AuthMode,
        cors::CorsSpec,
        rate_limit::RateLimitSpec,
        screen::{Limits, ThreatMode},
    },
    http::{body::Body, errors::error_response},
    upstream::{Upstream, Upstreams},
};

/// A gateway route: requests whose path starts with `prefix` (or equals `path`) and that meet
/// every other condition go to `service`, with the matched prefix replaced by `rewrite` when set
/// (`/api/markets/7` → `/markets/7` for prefix `/api/markets`, rewrite `/markets`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// A name for logs, metrics and rate-limit headers (default: the path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Path prefix, matched on segment boundaries.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
    /// Exact path (instead of `prefix`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Methods the route takes (any when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Headers that must be present with exactly these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Host names the route answers (any when empty; the port is ignored).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    pub service: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<String>,
    /// Whether the route needs an end-user token (default: the gateway's `--auth`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cors: Option<CorsSpec>,
    /// Size limits (zero fields: the gateway's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
    /// SQL-injection and XSS screening of the query and body (default: the gateway's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threats: Option<ThreatMode>,
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
        let r =
            Route { prefix: prefix.to_string(), service: service.to_string(), rewrite, ..Route::default() };
        r.validate()?;
        Ok(r)
    }

    /// The route's name: its own, else its path.
    pub fn label(&self) -> &str {
        self.name.as_deref().or(self.path.as_deref()).unwrap_or(&self.prefix)
    }

    /// Checks every field; a refusal names the route and the field.
    pub fn validate(&self) -> Result<(), String> {
        let at = |field: &str, why: String| format!("route {}: {field}: {why}", self.label());
        match (&self.path, self.prefix.is_empty()) {
            (Some(_), false) => return Err(at("path", "give a prefix or an exact path, not both".into())),
            (None, true) => return Err(at("prefix", "give a path prefix (or an exact path)".into())),
            _ => {}
        }
        let path = self.path.as_deref().unwrap_or(&self.prefix);
        if !path.starts_with('/') {
            return Err(at(
                if self.path.is_some() { "path" } else { "prefix" },
                "must start with '/'".into(),
            ));
        }
        if self.rewrite.as_deref().is_some_and(|r| !r.starts_with('/')) {
            return Err(at("rewrite", "must start with '/'".into()));
        }
        if !mesh_proto::names::is_service_name(&self.service) {
            return Err(at(
                "service",
                format!("{:?} must be {}", self.service, mesh_proto::names::SERVICE_NAME_RULE),
            ));
        }
        for m in &self.methods {
            Method::from_bytes(m.as_bytes()).map_err(|_| at("methods", format!("{m:?} is not a method")))?;
        }
        for (name, value) in &self.headers {
            http::HeaderName::try_from(name.as_str())
                .map_err(|_| at("headers", format!("{name:?} is not a header name")))?;
            http::HeaderValue::try_from(value.as_str())
                .map_err(|_| at("headers", format!("{value:?} is not a header value")))?;
        }
        if let Some(h) = self.hosts.iter().find(|h| h.is_empty() || h.contains(['/', ' '])) {
            return Err(at("hosts", format!("{h:?} is not a host name")));
        }
        if let Some(rl) = &self.rate_limit {
            rl.validate().map_err(|e| at("rate_limit", e))?;
        }
        if let Some(c) = &self.cors {
            c.validate().map_err(|e| at("cors", e))?;
        }
        Ok(())
    }

    fn matches_path(&self, path: &str) -> bool {
        if let Some(exact) = &self.path {
            return path == exact;
        }
        path.strip_prefix(self.prefix.trim_end_matches('/'))
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/') || self.prefix.ends_with('/'))
    }

    /// Whether a request is this route's.
    pub(crate) fn matches(&self, method: &Method, path: &str, host: &str, headers: &HeaderMap) -> bool {
        self.matches_path(path)
            && (self.methods.is_empty()
                || self.methods.iter().any(|m| m.eq_ignore_ascii_case(method.as_str())))
            && (self.hosts.is_empty() || self.hosts.iter().any(|h| h.eq_ignore_ascii_case(host)))
            && self
                .headers
                .iter()
                .all(|(n, v)| headers.get(n.as_str()).is_some_and(|h| h.as_bytes() == v.as_bytes()))
    }

    /// Sorts routes by precedence (first match wins).
    pub fn sort(routes: &mut [Route]) {
        routes.sort_by_key(|r| {
            let conditions =
                usize::from(!r.methods.is_empty()) + r.headers.len() + usize::from(!r.hosts.is_empty());
            (
                r.path.is_none(),
                std::cmp::Reverse(r.path.as_deref().unwrap_or(&r.prefix).len()),
                std::cmp::Reverse(conditions),
            )
        });
    }
}

/// The host a request names (its URI's, else `Host`), without the port.
fn host_of<B>(req: &Request<B>) -> &str {
    req.uri()
        .host()
        .or_else(|| {
            let h = req.headers().get(header::HOST)?.to_str().ok()?;
            Some(h.rsplit_once(':').map_or(h, |(host, _)| host))
        })
        .unwrap_or_default()
}

/// Where a request goes.
pub struct Routed {
    pub upstream: Arc<Upstream>,
    /// Gateway mode: the index of the matched route.
    pub route: Option<usize>,
}

/// The upstream of the service a request is for and, in gateway mode, the matched route; in
/// gateway mode also rewrites the path.
pub fn route<B>(
    routes: Option<&[Route]>,
    upstreams: &Upstreams,
    req: &mut Request<B>,
) -> Result<Routed, Box<Response<Body>>> {
    let host = host_of(req);
    let Some(routes) = routes else {
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
        return Ok(Routed { upstream: upstreams.get_or_add(host), route: None });
    };
    let path = req.uri().path();
    let Some(index) = routes.iter().position(|r| r.matches(req.method(), path, host, req.headers())) else {
        return Err(Box::new(error_response(
            StatusCode::NOT_FOUND,
            "no_route",
            format!("no route for {} {path}", req.method()),
            json!({ "path": path }),
        )));
    };
    let route = &routes[index];
    if let Some(rewrite) = &route.rewrite {
        let matched = route.path.as_deref().unwrap_or(&route.prefix).trim_end_matches('/').len();
        let new_path = format!("{}{}", rewrite.trim_end_matches('/'), &path[matched..]);
        let new_path = if new_path.is_empty() { "/".to_string() } else { new_path };
        let pq = match req.uri().query() {
            Some(q) => format!("{new_path}?{q}"),
            None => new_path,
        };
        if let Ok(uri) = pq.parse::<Uri>() {
            *req.uri_mut() = uri;
        }
    }
    Ok(Routed { upstream: upstreams.get_or_add(&route.service), route: Some(index) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse_and_match_on_segment_boundaries() {
        let r = Route::parse("/api/markets=market-service,/markets").unwrap();
        assert_eq!(r.rewrite.as_deref(), Some("/markets"));
        let m = |r: &Route, p: &str| r.matches(&Method::GET, p, "h", &HeaderMap::new());
        assert!(m(&r, "/api/markets"));
        assert!(m(&r, "/api/markets/7"));
        assert!(!m(&r, "/api/marketsx"));
        assert!(Route::parse("api=svc").is_err());
        assert!(Route::parse("/api=Bad_Svc").is_err());
        assert!(Route::parse("/api").is_err());
    }

    #[test]
    fn exact_paths_methods_headers_and_hosts_match_with_httproute_precedence() {
        let yaml = r#"
- { prefix: /api, service: general }
- { prefix: /api, service: writes, methods: [POST, PATCH] }
- { path: /api/health, service: health }
- { prefix: /api, service: beta, headers: { x-beta: "1" } }
- { prefix: /api/markets, service: markets, hosts: [markets.example.com] }
"#;
        let mut routes: Vec<Route> = serde_yaml_ng::from_str(yaml).unwrap();
        routes.iter().for_each(|r| r.validate().unwrap());
        Route::sort(&mut routes);
        let pick = |method: Method, path: &str, host: &str, h: &[(&'static str, &'static str)]| {
            let mut headers = HeaderMap::new();
            for (n, v) in h {
                headers.insert(*n, http::HeaderValue::from_static(v));
            }
            routes.iter().find(|r| r.matches(&method, path, host, &headers)).map(|r| r.service.as_str())
        };
        assert_eq!(pick(Method::GET, "/api/health", "x", &[]), Some("health"));
        assert_eq!(pick(Method::GET, "/api/health/deep", "x", &[]), Some("general"), "exact is exact");
        assert_eq!(pick(Method::POST, "/api/x", "x", &[]), Some("writes"));
        assert_eq!(pick(Method::GET, "/api/x", "x", &[("x-beta", "1")]), Some("beta"));
        assert_eq!(pick(Method::GET, "/api/x", "x", &[("x-beta", "2")]), Some("general"));
        assert_eq!(pick(Method::GET, "/api/markets/1", "Markets.Example.com", &[]), Some("markets"));
        assert_eq!(pick(Method::GET, "/api/markets/1", "other", &[]), Some("general"));
        assert_eq!(pick(Method::GET, "/other", "x", &[]), None);
    }

    #[test]
    fn an_invalid_route_is_refused_naming_the_field() {
        let bad = |yaml: &str| {
            let r: Route = serde_yaml_ng::from_str(yaml).unwrap();
            r.validate().unwrap_err()
        };
        assert!(bad("{ prefix: api, service: s }").contains("prefix"));
        assert!(bad("{ prefix: /a, path: /b, service: s }").contains("path"));
        assert!(bad("{ service: s }").contains("prefix"));
        assert!(bad("{ prefix: /a, service: S_1 }").contains("service"));
        assert!(bad("{ prefix: /a, service: s, methods: [\"G T\"] }").contains("methods"));
        assert!(
            bad("{ prefix: /a, service: s, rate_limit: { requests_per_second: 0 } }").contains("rate_limit")
        );
        assert!(bad("{ prefix: /a, service: s, cors: { allow_origins: [nope] } }").contains("cors"));
        assert!(serde_yaml_ng::from_str::<Route>("{ prefix: /a, service: s, colour: red }").is_err());
    }
}
