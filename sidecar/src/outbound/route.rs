//! Which upstream a request is for: by authority in sidecar mode; in gateway mode by the
//! routes ([`Route`], defined and validated in `mesh_proto::gateway`, shaped like the Gateway
//! API's HTTPRoute rules) in precedence order, the first that matches winning, with its rewrite.

use std::sync::Arc;

use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, header};
pub use mesh_proto::gateway::Route;
use serde_json::json;

use crate::{
    http::{body::Body, errors::error_response},
    upstream::{Upstream, Upstreams},
};

fn matches_path(r: &Route, path: &str) -> bool {
    if let Some(exact) = &r.path {
        return path == exact;
    }
    path.strip_prefix(r.prefix.trim_end_matches('/'))
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/') || r.prefix.ends_with('/'))
}

/// Whether a request is route `r`'s.
pub(crate) fn matches(r: &Route, method: &Method, path: &str, host: &str, headers: &HeaderMap) -> bool {
    matches_path(r, path)
        && (r.methods.is_empty() || r.methods.iter().any(|m| m.eq_ignore_ascii_case(method.as_str())))
        && (r.hosts.is_empty() || r.hosts.iter().any(|h| h.eq_ignore_ascii_case(host)))
        && r.headers
            .iter()
            .all(|(n, v)| headers.get(n.as_str()).is_some_and(|h| h.as_bytes() == v.as_bytes()))
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
    let Some(index) = routes.iter().position(|r| matches(r, req.method(), path, host, req.headers())) else {
        return Err(Box::new(error_response(
            StatusCode::NOT_FOUND,
            "no_route",
            format!("no route for {} {path}", req.method()),
            json!({ "path": path }),
        )));
    };
    let route = &routes[index];
    if let Some(rewrite) = &route.rewrite {
        let matched = route.matched_path().trim_end_matches('/').len();
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
        let m = |r: &Route, p: &str| matches(r, &Method::GET, p, "h", &HeaderMap::new());
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
        Route::sort(&mut routes);
        let pick = |method: Method, path: &str, host: &str, h: &[(&'static str, &'static str)]| {
            let mut headers = HeaderMap::new();
            for (n, v) in h {
                headers.insert(*n, http::HeaderValue::from_static(v));
            }
            routes.iter().find(|r| matches(r, &method, path, host, &headers)).map(|r| r.service.as_str())
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
}
