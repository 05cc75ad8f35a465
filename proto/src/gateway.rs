//! Gateway routes as data: what a route matches, where it goes, and its edge middleware (auth
//! mode, rate limit, CORS, size limits, threat screening) — validated here, so the control
//! plane refuses a bad route naming its field before any gateway sees it, and converted to and
//! from the wire (`mesh.v1.GatewayPolicy`). The gateway (the sidecar's `gateway/`) gives them
//! their behaviour.
//!
//! The shape follows the Kubernetes Gateway API's HTTPRoute: a match (path prefix or exact
//! path, methods, headers, hosts), a path rewrite, one backend service. Precedence as there:
//! an exact path before a prefix, a longer path before a shorter, then more conditions.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{field::FieldError, names, v1};

/// Whether a route needs an end-user token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// No token: 401.
    Required,
    /// A token is verified when present (a bad one is 401); without one the request goes on
    /// anonymous.
    Optional,
    /// Tokens are not looked at (the app still never sees a client's `x-mesh-user`).
    None,
}

/// What to do with a request that matches a threat signature.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ThreatMode {
    /// Not looked for.
    Off,
    /// Logged (the access log's `rule`) and counted; the request goes on.
    #[default]
    Detect,
    /// Refused with 403.
    Block,
}

macro_rules! words {
    ($t:ty, $what:literal, $($word:literal => $v:expr),+) => {
        impl std::str::FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($word => Ok($v),)+
                    other => Err(format!(concat!("{:?} is not ", $what, " (", $($word, " "),+, ")"), other)),
                }
            }
        }
        impl $t {
            pub fn as_str(self) -> &'static str {
                match self { $(v if v == $v => $word,)+ _ => "" }
            }
        }
    };
}

words!(AuthMode, "an auth mode", "required" => AuthMode::Required, "optional" => AuthMode::Optional, "none" => AuthMode::None);
words!(ThreatMode, "a threat mode", "off" => ThreatMode::Off, "detect" => ThreatMode::Detect, "block" => ThreatMode::Block);

/// What a rate limit counts by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateKey {
    /// The verified end user; anonymous requests by their client address.
    Subject,
    /// The client address (`X-Forwarded-For` only from trusted proxies).
    Ip,
    /// The value of a request header (an API key); requests without it by client address.
    Header(http::HeaderName),
}

impl RateKey {
    pub fn parse(s: &str) -> Result<RateKey, String> {
        match s {
            "" | "subject" => Ok(RateKey::Subject),
            "ip" => Ok(RateKey::Ip),
            _ => match s.strip_prefix("header:").map(|h| http::HeaderName::try_from(h.trim())) {
                Some(Ok(h)) => Ok(RateKey::Header(h)),
                _ => Err(format!("{s:?}: subject, ip or header:<name>")),
            },
        }
    }

    pub fn as_string(&self) -> String {
        match self {
            RateKey::Subject => "subject".into(),
            RateKey::Ip => "ip".into(),
            RateKey::Header(h) => format!("header:{h}"),
        }
    }
}

impl Serialize for RateKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.as_string())
    }
}

impl<'de> Deserialize<'de> for RateKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        RateKey::parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// A route's limit: `requests_per_second` sustained, `burst` at once (default: one second's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSpec {
    pub requests_per_second: u32,
    #[serde(default)]
    pub burst: u32,
    #[serde(default = "subject")]
    pub key: RateKey,
}

fn subject() -> RateKey {
    RateKey::Subject
}

impl RateLimitSpec {
    pub fn validate(&self) -> Result<(), String> {
        if self.requests_per_second == 0 {
            return Err("requests_per_second: at least 1".into());
        }
        Ok(())
    }

    /// The burst, defaulted.
    pub fn burst(&self) -> u32 {
        if self.burst == 0 { self.requests_per_second } else { self.burst }
    }
}

/// CORS of a route: allowed origins (exact, `*`, or `scheme://*.domain` for any subdomain),
/// methods, headers, credentials, max-age.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsSpec {
    pub allow_origins: Vec<String>,
    /// Default: GET, HEAD, POST.
    #[serde(default)]
    pub allow_methods: Vec<String>,
    /// Request headers a page may send (case-insensitive).
    #[serde(default)]
    pub allow_headers: Vec<String>,
    /// Response headers a page may read.
    #[serde(default)]
    pub expose_headers: Vec<String>,
    #[serde(default)]
    pub allow_credentials: bool,
    /// How long a browser may cache a preflight's answer, in seconds.
    #[serde(default)]
    pub max_age: Option<u32>,
}

impl CorsSpec {
    pub fn validate(&self) -> Result<(), String> {
        if self.allow_origins.is_empty() {
            return Err("allow_origins: name at least one origin (or \"*\")".into());
        }
        for o in &self.allow_origins {
            let ok = o == "*"
                || o.split_once("://").is_some_and(|(scheme, host)| {
                    matches!(scheme, "http" | "https")
                        && !host.is_empty()
                        && !host.contains('/')
                        && (!host.contains('*') || host.starts_with("*.") && !host[2..].contains('*'))
                });
            if !ok {
                return Err(format!(
                    "allow_origins: {o:?} is not an origin (scheme://host[:port], scheme://*.domain, or *)"
                ));
            }
        }
        if self.allow_credentials && self.allow_origins.iter().any(|o| o == "*") {
            return Err("allow_credentials: not with the origin \"*\" (browsers refuse it)".into());
        }
        for m in &self.allow_methods {
            http::Method::from_bytes(m.as_bytes())
                .map_err(|_| format!("allow_methods: {m:?} is not a method"))?;
        }
        for h in self.allow_headers.iter().chain(&self.expose_headers).filter(|h| *h != "*") {
            http::HeaderName::try_from(h.as_str())
                .map_err(|_| format!("headers: {h:?} is not a header name"))?;
        }
        Ok(())
    }
}

/// Size limits of a request. Zero fields take the gateway's defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Longest request target (path and query), bytes.
    pub uri: usize,
    /// Most header fields.
    pub headers: usize,
    /// Largest total of header names and values, bytes.
    pub header_bytes: usize,
    /// Largest request body, bytes.
    pub body: u64,
}

impl Limits {
    /// The gateway's defaults (what nginx and Envoy ship with, roughly).
    pub const DEFAULT: Limits =
        Limits { uri: 8 * 1024, headers: 100, header_bytes: 32 * 1024, body: 1024 * 1024 };

    /// These limits, with zero fields taken from `base`.
    pub fn or(self, base: Limits) -> Limits {
        let pick = |a: usize, b: usize| if a == 0 { b } else { a };
        Limits {
            uri: pick(self.uri, base.uri),
            headers: pick(self.headers, base.headers),
            header_bytes: pick(self.header_bytes, base.header_bytes),
            body: if self.body == 0 { base.body } else { self.body },
        }
    }
}

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
    /// `false`: the gateway neither answers this route from its cache nor keeps its answers,
    /// whatever the target service's cache policy says (default: the policy decides).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<bool>,
}

impl Route {
    /// `PREFIX=SERVICE` or `PREFIX=SERVICE,REWRITE` (the gateway's `--route`).
    pub fn parse(s: &str) -> Result<Route, String> {
        let (prefix, rest) =
            s.split_once('=').ok_or_else(|| format!("route {s:?}: expected PREFIX=SERVICE[,REWRITE]"))?;
        let (service, rewrite) = match rest.split_once(',') {
            Some((svc, rw)) => (svc, Some(rw.to_string())),
            None => (rest, None),
        };
        let r =
            Route { prefix: prefix.to_string(), service: service.to_string(), rewrite, ..Route::default() };
        r.validate().map_err(|e| e.to_string())?;
        Ok(r)
    }

    /// The route's name: its own, else its path.
    pub fn label(&self) -> &str {
        self.name.as_deref().or(self.path.as_deref()).unwrap_or(&self.prefix)
    }

    /// The path the route matches (its exact path or its prefix).
    pub fn matched_path(&self) -> &str {
        self.path.as_deref().unwrap_or(&self.prefix)
    }

    /// A `Location` (or `Content-Location`) the service answered, in the client's terms: the
    /// rewrite undone (`/markets/7` → `/api/markets/7` for prefix `/api/markets`, rewrite
    /// `/markets`), as a reverse proxy must. `None` when there is nothing to undo: no rewrite, an
    /// absolute URL, or a path outside the rewritten one.
    pub fn public_location(&self, location: &str) -> Option<String> {
        let rewrite = self.rewrite.as_deref()?.trim_end_matches('/');
        if !location.starts_with('/') || location.starts_with("//") {
            return None;
        }
        let rest = location.strip_prefix(rewrite)?;
        if !(rest.is_empty() || rest.starts_with('/') || rest.starts_with('?') || rewrite.is_empty()) {
            return None;
        }
        let public = format!("{}{rest}", self.matched_path().trim_end_matches('/'));
        Some(if public.is_empty() { "/".into() } else { public })
    }

    /// Checks every field; a refusal names the route's field (`prefix`, `rate_limit`, …).
    pub fn validate(&self) -> Result<(), FieldError> {
        let at = |field: &str, why: String| FieldError::new(field, format!("route {}: {why}", self.label()));
        match (&self.path, self.prefix.is_empty()) {
            (Some(_), false) => return Err(at("path", "give a prefix or an exact path, not both".into())),
            (None, true) => return Err(at("prefix", "give a path prefix (or an exact path)".into())),
            _ => {}
        }
        if !self.matched_path().starts_with('/') {
            return Err(at(
                if self.path.is_some() { "path" } else { "prefix" },
                "must start with '/'".into(),
            ));
        }
        if self.rewrite.as_deref().is_some_and(|r| !r.starts_with('/')) {
            return Err(at("rewrite", "must start with '/'".into()));
        }
        if !names::is_service_name(&self.service) {
            return Err(at("service", format!("{:?} must be {}", self.service, names::SERVICE_NAME_RULE)));
        }
        for m in &self.methods {
            http::Method::from_bytes(m.as_bytes())
                .map_err(|_| at("methods", format!("{m:?} is not a method")))?;
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

    /// Sorts routes by precedence (first match wins).
    pub fn sort(routes: &mut [Route]) {
        routes.sort_by_key(|r| {
            let conditions =
                usize::from(!r.methods.is_empty()) + r.headers.len() + usize::from(!r.hosts.is_empty());
            (r.path.is_none(), std::cmp::Reverse(r.matched_path().len()), std::cmp::Reverse(conditions))
        });
    }
}

/// An IP list entry: a network (CIDR, IPv4 or IPv6; a bare address is a /32 or /128), until an
/// optional time. Written `CIDR` or `CIDR@RFC3339`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpRule {
    pub cidr: ipnet::IpNet,
    /// The entry stops applying then.
    pub until: Option<std::time::SystemTime>,
}

impl IpRule {
    /// `CIDR` or `CIDR@RFC3339`.
    pub fn parse(s: &str) -> Result<IpRule, String> {
        let (net, until) = match s.split_once('@') {
            Some((n, t)) => (n, Some(humantime::parse_rfc3339_weak(t).map_err(|e| format!("{s:?}: {e}"))?)),
            None => (s, None),
        };
        let cidr = net
            .parse::<ipnet::IpNet>()
            .or_else(|_| net.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
            .map_err(|_| format!("{net:?} is not an address or CIDR network"))?;
        Ok(IpRule { cidr, until })
    }

    /// Whether the entry covers `ip` at `now`.
    pub fn applies(&self, ip: std::net::IpAddr, now: std::time::SystemTime) -> bool {
        self.live(now) && self.cidr.contains(&ip)
    }

    /// Whether the entry has not expired at `now`.
    pub fn live(&self, now: std::time::SystemTime) -> bool {
        self.until.is_none_or(|u| now < u)
    }
}

impl std::fmt::Display for IpRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.until {
            None => write!(f, "{}", self.cidr),
            Some(t) => write!(f, "{}@{}", self.cidr, humantime::format_rfc3339_seconds(t)),
        }
    }
}

impl Serialize for IpRule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for IpRule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        IpRule::parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// What the control plane holds for the edge, as the policy of the service [`GATEWAY_SERVICE`]
/// carries it: the routes, and IP lists that apply on top of each gateway's own.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayPolicy {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    /// Only these clients may call (with each gateway's `--ip-allow`); empty: everyone.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ip_allow: Vec<IpRule>,
    /// These clients may not call (with each gateway's `--ip-deny`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ip_deny: Vec<IpRule>,
}

/// The service whose policy holds the gateways' routes (the gateways' own mesh identity).
pub const GATEWAY_SERVICE: &str = "gateway";

impl GatewayPolicy {
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty() && self.ip_allow.is_empty() && self.ip_deny.is_empty()
    }

    /// Every route valid, and no two with one name: the error names `gateway.routes[i].field`.
    pub fn validate(&self) -> Result<(), FieldError> {
        let mut names = std::collections::BTreeSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            let at = |e: FieldError| FieldError::new(format!("gateway.routes[{i}].{}", e.field), e.reason);
            r.validate().map_err(at)?;
            if !names.insert(r.label()) {
                return Err(at(FieldError::new("name", format!("two routes are named {:?}", r.label()))));
            }
        }
        Ok(())
    }
}

// ---- wire ----------------------------------------------------------------------------------

fn word<T: std::str::FromStr<Err = String>>(field: &str, s: &str) -> Result<Option<T>, FieldError> {
    if s.is_empty() { Ok(None) } else { s.parse().map(Some).map_err(|e| FieldError::new(field, e)) }
}

impl TryFrom<v1::GatewayRoute> for Route {
    type Error = FieldError;

    fn try_from(r: v1::GatewayRoute) -> Result<Self, FieldError> {
        let rate_limit = match r.rate_limit {
            None => None,
            Some(rl) => Some(RateLimitSpec {
                requests_per_second: rl.requests_per_second,
                burst: rl.burst,
                key: RateKey::parse(&rl.key).map_err(|e| FieldError::new("rate_limit.key", e))?,
            }),
        };
        let size = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        Ok(Route {
            name: (!r.name.is_empty()).then_some(r.name),
            prefix: r.prefix,
            path: r.path,
            methods: r.methods,
            headers: r.headers.into_iter().collect(),
            hosts: r.hosts,
            service: r.service,
            rewrite: r.rewrite,
            auth: word("auth", &r.auth)?,
            rate_limit,
            cors: r.cors.map(|c| CorsSpec {
                allow_origins: c.allow_origins,
                allow_methods: c.allow_methods,
                allow_headers: c.allow_headers,
                expose_headers: c.expose_headers,
                allow_credentials: c.allow_credentials,
                max_age: c.max_age,
            }),
            limits: r.limits.map(|l| Limits {
                uri: size(l.uri),
                headers: size(l.headers),
                header_bytes: size(l.header_bytes),
                body: l.body,
            }),
            threats: word("threats", &r.threats)?,
            cache: r.cache,
        })
    }
}

impl From<&Route> for v1::GatewayRoute {
    fn from(r: &Route) -> Self {
        v1::GatewayRoute {
            name: r.name.clone().unwrap_or_default(),
            prefix: r.prefix.clone(),
            path: r.path.clone(),
            methods: r.methods.clone(),
            headers: r.headers.clone().into_iter().collect(),
            hosts: r.hosts.clone(),
            service: r.service.clone(),
            rewrite: r.rewrite.clone(),
            auth: r.auth.map(|a| a.as_str().to_string()).unwrap_or_default(),
            rate_limit: r.rate_limit.as_ref().map(|rl| v1::RouteRateLimit {
                requests_per_second: rl.requests_per_second,
                burst: rl.burst,
                key: rl.key.as_string(),
            }),
            cors: r.cors.as_ref().map(|c| v1::RouteCors {
                allow_origins: c.allow_origins.clone(),
                allow_methods: c.allow_methods.clone(),
                allow_headers: c.allow_headers.clone(),
                expose_headers: c.expose_headers.clone(),
                allow_credentials: c.allow_credentials,
                max_age: c.max_age,
            }),
            limits: r.limits.map(|l| v1::RouteLimits {
                uri: l.uri as u64,
                headers: l.headers as u64,
                header_bytes: l.header_bytes as u64,
                body: l.body,
            }),
            threats: r.threats.map(|t| t.as_str().to_string()).unwrap_or_default(),
            cache: r.cache,
        }
    }
}

fn ip_rules(field: &str, list: Vec<String>) -> Result<Vec<IpRule>, FieldError> {
    list.iter()
        .enumerate()
        .map(|(i, s)| IpRule::parse(s).map_err(|e| FieldError::new(format!("gateway.{field}[{i}]"), e)))
        .collect()
}

impl TryFrom<v1::GatewayPolicy> for GatewayPolicy {
    type Error = FieldError;

    fn try_from(g: v1::GatewayPolicy) -> Result<Self, FieldError> {
        let (ip_allow, ip_deny) = (ip_rules("ip_allow", g.ip_allow)?, ip_rules("ip_deny", g.ip_deny)?);
        let routes = g
            .routes
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                Route::try_from(r)
                    .map_err(|e| FieldError::new(format!("gateway.routes[{i}].{}", e.field), e.reason))
            })
            .collect::<Result<_, _>>()?;
        Ok(GatewayPolicy { routes, ip_allow, ip_deny })
    }
}

impl From<&GatewayPolicy> for v1::GatewayPolicy {
    fn from(g: &GatewayPolicy) -> Self {
        let strings = |l: &[IpRule]| l.iter().map(ToString::to_string).collect();
        v1::GatewayPolicy {
            routes: g.routes.iter().map(Into::into).collect(),
            ip_allow: strings(&g.ip_allow),
            ip_deny: strings(&g.ip_deny),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = r#"
routes:
  - name: markets
    prefix: /api/markets
    methods: [GET, POST]
    headers: { x-tenant: a }
    hosts: [api.example.com]
    service: market-service
    rewrite: /markets
    auth: required
    rate_limit: { requests_per_second: 10, burst: 20, key: "header:x-api-key" }
    cors: { allow_origins: ["https://*.example.com"], allow_credentials: true, max_age: 600 }
    limits: { body: 65536 }
    threats: block
    cache: false
  - { path: /healthz, service: market-service, auth: none }
ip_allow: [10.0.0.0/8, "2001:db8::/32"]
ip_deny: ["10.9.0.0/16@2030-01-01T00:00:00Z", 10.1.2.3]
"#;

    #[test]
    fn a_location_the_service_answers_is_given_back_in_the_clients_terms() {
        let r = Route {
            prefix: "/api/markets".into(),
            service: "market-service".into(),
            rewrite: Some("/markets".into()),
            ..Route::default()
        };
        assert_eq!(r.public_location("/markets/7/trades/9").as_deref(), Some("/api/markets/7/trades/9"));
        assert_eq!(r.public_location("/markets").as_deref(), Some("/api/markets"));
        assert_eq!(r.public_location("/markets?x=1").as_deref(), Some("/api/markets?x=1"));
        assert_eq!(r.public_location("/marketsfoo"), None, "not under the rewrite");
        assert_eq!(r.public_location("/accounts/me"), None);
        assert_eq!(r.public_location("https://elsewhere/markets/7"), None, "absolute: left alone");
        let root = Route { rewrite: Some("/".into()), ..r.clone() };
        assert_eq!(root.public_location("/markets/7").as_deref(), Some("/api/markets/markets/7"));
        assert_eq!(Route { rewrite: None, ..r }.public_location("/markets/7"), None);
    }

    #[test]
    fn routes_round_trip_through_the_wire_unchanged() {
        let g: GatewayPolicy = serde_yaml_ng::from_str(YAML).unwrap();
        g.validate().unwrap();
        let wire = v1::GatewayPolicy::from(&g);
        assert_eq!(GatewayPolicy::try_from(wire).unwrap(), g);
    }

    #[test]
    fn a_bad_route_is_refused_naming_its_field() {
        let bad = |yaml: &str| {
            let g: GatewayPolicy = serde_yaml_ng::from_str(yaml).unwrap();
            g.validate().unwrap_err().field
        };
        assert_eq!(bad("routes: [{ prefix: api, service: s }]"), "gateway.routes[0].prefix");
        assert_eq!(bad("routes: [{ prefix: /a, path: /b, service: s }]"), "gateway.routes[0].path");
        assert_eq!(bad("routes: [{ service: s }]"), "gateway.routes[0].prefix");
        assert_eq!(
            bad("routes: [{ prefix: /a, service: s }, { prefix: /b, service: S_1 }]"),
            "gateway.routes[1].service"
        );
        assert_eq!(
            bad("routes: [{ prefix: /a, service: s, methods: [\"G T\"] }]"),
            "gateway.routes[0].methods"
        );
        assert_eq!(
            bad("routes: [{ prefix: /a, service: s, rate_limit: { requests_per_second: 0 } }]"),
            "gateway.routes[0].rate_limit"
        );
        assert_eq!(
            bad("routes: [{ prefix: /a, service: s, cors: { allow_origins: [nope] } }]"),
            "gateway.routes[0].cors"
        );
        assert_eq!(
            bad("routes: [{ name: x, prefix: /a, service: s }, { name: x, prefix: /b, service: s }]"),
            "gateway.routes[1].name"
        );
        assert!(serde_yaml_ng::from_str::<Route>("{ prefix: /a, service: s, colour: red }").is_err());
        assert!(serde_yaml_ng::from_str::<GatewayPolicy>("ip_deny: [10.0.0.0/33]").is_err());
        let wire =
            v1::GatewayPolicy { ip_deny: vec!["10.0.0.1".into(), "nope".into()], ..Default::default() };
        assert_eq!(GatewayPolicy::try_from(wire).unwrap_err().field, "gateway.ip_deny[1]");
        let wire = v1::GatewayPolicy {
            routes: vec![v1::GatewayRoute {
                prefix: "/a".into(),
                service: "s".into(),
                auth: "maybe".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(GatewayPolicy::try_from(wire).unwrap_err().field, "gateway.routes[0].auth");
    }

    #[test]
    fn precedence_is_exact_then_longer_then_more_conditions() {
        let mut routes: Vec<Route> = serde_yaml_ng::from_str(
            "[{ prefix: /api, service: a }, { prefix: /api, service: b, methods: [POST] }, { path: /api/x, service: c }, { prefix: /api/long, service: d }]",
        )
        .unwrap();
        Route::sort(&mut routes);
        let order: Vec<&str> = routes.iter().map(|r| r.service.as_str()).collect();
        assert_eq!(order, ["c", "d", "b", "a"]);
    }
}
