//! CORS per route (the Fetch standard's CORS protocol): allowed origins (exact, `*`, or a
//! wildcard subdomain such as `https://*.example.com`), methods, headers, credentials, max-age.
//! A preflight is answered at the edge; an origin, method or header that is not allowed gets no
//! CORS headers at all (a preflight: 403 naming why), so the browser refuses it.

use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
pub use mesh_proto::gateway::CorsSpec;
use serde_json::json;

use crate::http::{body::Body, errors::error_response};

/// The behaviour of a route's [`CorsSpec`].
pub trait Cors {
    fn origin_allowed(&self, origin: &str) -> bool;
    fn preflight(&self, method: &Method, headers: &HeaderMap) -> Option<Response<Body>>;
    fn decorate(&self, origin: Option<&HeaderValue>, headers: &mut HeaderMap);
}

impl Cors for CorsSpec {
    /// Whether a page from `origin` may call this route.
    fn origin_allowed(&self, origin: &str) -> bool {
        self.allow_origins.iter().any(|allowed| {
            allowed == "*"
                || allowed.eq_ignore_ascii_case(origin)
                || allowed.split_once("://*.").is_some_and(|(scheme, domain)| {
                    origin.split_once("://").is_some_and(|(s, host)| {
                        s.eq_ignore_ascii_case(scheme)
                            && host.len() > domain.len() + 1
                            && host[host.len() - domain.len()..].eq_ignore_ascii_case(domain)
                            && host.as_bytes()[host.len() - domain.len() - 1] == b'.'
                    })
                })
        })
    }

    /// A CORS preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) answered
    /// here, or `None` when the request is not one.
    fn preflight(&self, method: &Method, headers: &HeaderMap) -> Option<Response<Body>> {
        if method != Method::OPTIONS {
            return None;
        }
        let origin = headers.get(header::ORIGIN)?;
        let wanted = headers.get(header::ACCESS_CONTROL_REQUEST_METHOD)?;
        let refuse = |why: String| {
            let mut r = error_response(StatusCode::FORBIDDEN, "cors_refused", why, json!({ "rule": "cors" }));
            r.headers_mut().insert(header::VARY, HeaderValue::from_static("Origin"));
            Some(r)
        };
        let o = origin.to_str().unwrap_or("");
        if !self.origin_allowed(o) {
            return refuse(format!("origin {o:?} may not call this route"));
        }
        let m = wanted.to_str().unwrap_or("");
        if !method_allowed(self, m) {
            return refuse(format!("method {m:?} is not allowed from other origins on this route"));
        }
        let asked =
            headers.get(header::ACCESS_CONTROL_REQUEST_HEADERS).and_then(|v| v.to_str().ok()).unwrap_or("");
        if let Some(h) = asked.split(',').map(str::trim).find(|h| !h.is_empty() && !header_allowed(self, h)) {
            return refuse(format!("request header {h:?} is not allowed from other origins on this route"));
        }
        let mut r = Response::new(crate::http::body::empty());
        *r.status_mut() = StatusCode::NO_CONTENT;
        let h = r.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow_origin(self, origin));
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, wanted.clone());
        if !asked.is_empty()
            && let Ok(v) = HeaderValue::from_str(asked)
        {
            h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v);
        }
        if self.allow_credentials {
            h.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
        }
        if let Some(age) = self.max_age {
            h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from(age));
        }
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
        Some(r)
    }

    /// Adds the CORS headers of an actual (not preflight) request's answer, when its origin is
    /// allowed.
    fn decorate(&self, origin: Option<&HeaderValue>, headers: &mut HeaderMap) {
        headers.append(header::VARY, HeaderValue::from_static("Origin"));
        let Some(origin) = origin.filter(|o| self.origin_allowed(o.to_str().unwrap_or(""))) else { return };
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow_origin(self, origin));
        if self.allow_credentials {
            headers.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
        }
        if !self.expose_headers.is_empty()
            && let Ok(v) = HeaderValue::from_str(&self.expose_headers.join(", "))
        {
            headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, v);
        }
    }
}

fn method_allowed(spec: &CorsSpec, m: &str) -> bool {
    if spec.allow_methods.is_empty() {
        return matches!(m, "GET" | "HEAD" | "POST");
    }
    spec.allow_methods.iter().any(|a| a.eq_ignore_ascii_case(m))
}

fn header_allowed(spec: &CorsSpec, h: &str) -> bool {
    spec.allow_headers.iter().any(|a| a == "*" && !spec.allow_credentials || a.eq_ignore_ascii_case(h))
}

/// The origin header value to answer with: the request's own (or `*` when any origin may
/// call and no credentials are involved).
fn allow_origin(spec: &CorsSpec, origin: &HeaderValue) -> HeaderValue {
    if !spec.allow_credentials && spec.allow_origins.iter().any(|o| o == "*") {
        HeaderValue::from_static("*")
    } else {
        origin.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> CorsSpec {
        CorsSpec {
            allow_origins: vec!["https://app.example.com".into(), "https://*.example.org".into()],
            allow_methods: vec!["GET".into(), "POST".into(), "PATCH".into()],
            allow_headers: vec!["content-type".into(), "authorization".into()],
            expose_headers: vec!["x-cache".into()],
            allow_credentials: true,
            max_age: Some(600),
        }
    }

    fn preflight(origin: &str, method: &str, headers: &str) -> Response<Body> {
        let mut h = HeaderMap::new();
        h.insert(header::ORIGIN, origin.parse().unwrap());
        h.insert(header::ACCESS_CONTROL_REQUEST_METHOD, method.parse().unwrap());
        if !headers.is_empty() {
            h.insert(header::ACCESS_CONTROL_REQUEST_HEADERS, headers.parse().unwrap());
        }
        spec().preflight(&Method::OPTIONS, &h).expect("a preflight")
    }

    #[test]
    fn origins_match_exactly_or_by_subdomain_wildcard() {
        let s = spec();
        assert!(s.origin_allowed("https://app.example.com"));
        assert!(s.origin_allowed("https://eu.example.org") && s.origin_allowed("https://a.b.example.org"));
        assert!(!s.origin_allowed("https://example.org"), "the wildcard is for subdomains only");
        assert!(!s.origin_allowed("https://evilexample.org"));
        assert!(!s.origin_allowed("http://eu.example.org"), "the scheme counts");
        assert!(!s.origin_allowed("https://app.example.com.evil.net"));
        assert!(!s.origin_allowed("null"));
    }

    #[test]
    fn preflights_are_answered_at_the_edge_and_refused_without_cors_headers() {
        let ok = preflight("https://eu.example.org", "PATCH", "Content-Type, Authorization");
        assert_eq!(ok.status(), 204);
        let h = ok.headers();
        assert_eq!(h["access-control-allow-origin"], "https://eu.example.org");
        assert_eq!(h["access-control-allow-methods"], "PATCH");
        assert_eq!(h["access-control-allow-credentials"], "true");
        assert_eq!(h["access-control-max-age"], "600");
        for bad in [
            preflight("https://evil.example.net", "GET", ""),
            preflight("https://app.example.com", "DELETE", ""),
            preflight("https://app.example.com", "GET", "x-secret"),
        ] {
            assert_eq!(bad.status(), 403);
            assert!(!bad.headers().contains_key("access-control-allow-origin"));
        }
        assert!(spec().preflight(&Method::GET, &HeaderMap::new()).is_none());
    }

    #[test]
    fn answers_carry_cors_headers_only_for_allowed_origins() {
        let mut h = HeaderMap::new();
        spec().decorate(Some(&HeaderValue::from_static("https://app.example.com")), &mut h);
        assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
        assert_eq!(h["access-control-expose-headers"], "x-cache");
        let mut h = HeaderMap::new();
        spec().decorate(Some(&HeaderValue::from_static("https://evil.example.net")), &mut h);
        assert!(!h.contains_key("access-control-allow-origin"));
        assert_eq!(h["vary"], "Origin");
    }
}
