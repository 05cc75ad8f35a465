//! Gateway routes: a path prefix to a service, with an optional rewrite.

use std::sync::Arc;

use http::{Request, Response, StatusCode, Uri, header};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::{
    gateway::auth::AuthMode,
    http::{body::Body, errors::error_response},
    upstream::{Upstream, Upstreams},
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
    /// Whether the route needs an end-user token (default: the gateway's `--auth`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthMode>,
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
        let r = Route { prefix: prefix.to_string(), service: service.to_string(), rewrite, auth: None };
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

    pub(crate) fn matches(&self, path: &str) -> bool {
        path.strip_prefix(self.prefix.trim_end_matches('/'))
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/') || self.prefix.ends_with('/'))
    }
}

/// Where a request goes.
pub struct Routed {
    pub upstream: Arc<Upstream>,
    /// The matched gateway route's auth mode, if it names one.
    pub auth: Option<AuthMode>,
}

/// The upstream of the service a request is for and, in gateway mode, the matched route's auth
/// mode; in gateway mode also rewrites the path.
pub fn route(
    routes: Option<&[Route]>,
    upstreams: &Upstreams,
    req: &mut Request<Incoming>,
) -> Result<Routed, Box<Response<Body>>> {
    let Some(routes) = routes else {
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
        return Ok(Routed { upstream: upstreams.get_or_add(host), auth: None });
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
    Ok(Routed { upstream: upstreams.get_or_add(&route.service), auth: route.auth })
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
