//! The per-service policy model: plain, validated Rust data converted from and to the wire
//! (`mesh.v1.ServicePolicy`) and from YAML / JSON files (`meshctl policy set -f`).
//!
//! Every field has a documented default. For limits, counts and durations an explicit `0`
//! disables the feature. Durations are written as human-readable strings in files (`"250ms"`,
//! `"15s"`) and as whole milliseconds on the wire.
//!
//! Validation errors name the field with its dotted path (`retry.backoff_max`), the same path
//! `meshctl policy diff` prints.

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::field::FieldError;
use crate::{gateway::GatewayPolicy, names, v1};

/// One service's policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServicePolicy {
    pub load_balancer: LoadBalancer,
    pub health: HealthPolicy,
    pub circuit_breaker: CircuitBreakerPolicy,
    pub retry: RetryPolicy,
    pub timeout: TimeoutPolicy,
    pub cache: CachePolicy,
    pub rate_limit: RateLimitPolicy,
    pub authz: AuthzPolicy,
    #[serde(skip_serializing_if = "TracingPolicy::is_default")]
    pub tracing: TracingPolicy,
    /// Set for a service outside the mesh: sidecars resolve `host` with DNS (re-resolved per
    /// record TTL) and balance over the addresses instead of using discovery.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalService>,
    /// The edge's routes (only in the policy of the service `gateway`).
    #[serde(skip_serializing_if = "GatewayPolicy::is_empty")]
    pub gateway: GatewayPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalService {
    /// DNS name or IP address.
    pub host: String,
    pub port: u16,
}

/// How a sidecar picks an endpoint of this service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    RoundRobin,
    Random,
    LeastConnections,
    /// Power of two choices over peak-EWMA latency × in-flight requests (default).
    #[default]
    P2cPeakEwma,
    /// By the instances' registered weights.
    Weighted,
    /// Hash of `hash_header`'s value onto a ring of endpoints.
    ConsistentHash,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoadBalancer {
    /// Default `p2c_peak_ewma`.
    pub algorithm: Algorithm,
    /// Required by `consistent_hash`, refused with any other algorithm.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hash_header: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthPolicy {
    /// Path the sidecar probes on its app. Default `/healthz`.
    pub probe_path: String,
    /// Default 5s; 0 disables probing (the app counts as healthy).
    #[serde(with = "human_duration")]
    pub probe_interval: Duration,
    /// Default 1s; at most `probe_interval`.
    #[serde(with = "human_duration")]
    pub probe_timeout: Duration,
    /// Consecutive good probes before the app counts as healthy. Default 1.
    pub healthy_threshold: u32,
    /// Consecutive bad probes before the app counts as unhealthy. Default 3.
    pub unhealthy_threshold: u32,
    /// How often a sidecar heartbeats. Default 5s, at least 100ms.
    #[serde(with = "human_duration")]
    pub heartbeat_interval: Duration,
    /// An instance with no heartbeat for longer than this expires (a lower bound: never earlier).
    /// Default 15s; 0 disables expiry; otherwise at least twice `heartbeat_interval`.
    #[serde(with = "human_duration")]
    pub heartbeat_ttl: Duration,
    /// An expired instance is deregistered this long after it expired. Default 60s; 0 disables.
    #[serde(with = "human_duration")]
    pub deregister_after: Duration,
    /// Never expire more than this share of a service's instances within one window
    /// (self-preservation). Default 50; 0 disables the guard.
    pub self_preservation_percent: u32,
    /// Default 60s.
    #[serde(with = "human_duration")]
    pub self_preservation_window: Duration,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        Self {
            probe_path: "/healthz".into(),
            probe_interval: Duration::from_secs(5),
            probe_timeout: Duration::from_secs(1),
            healthy_threshold: 1,
            unhealthy_threshold: 3,
            heartbeat_interval: Duration::from_secs(5),
            heartbeat_ttl: Duration::from_secs(15),
            deregister_after: Duration::from_secs(60),
            self_preservation_percent: 50,
            self_preservation_window: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CircuitBreakerPolicy {
    /// Eject an endpoint after this many consecutive failures. Default 5; 0 disables.
    pub consecutive_failures: u32,
    /// Eject an endpoint whose failure rate over the window reaches this. Default 50; 0 disables.
    pub failure_rate_percent: u32,
    /// The failure rate counts only once the window holds this many requests. Default 20.
    pub failure_rate_min_requests: u32,
    /// Default 10s.
    #[serde(with = "human_duration")]
    pub failure_rate_window: Duration,
    /// First ejection time; doubles on each repeated ejection. Default 5s.
    #[serde(with = "human_duration")]
    pub open_duration: Duration,
    /// Cap of the ejection backoff. Default 60s, at least `open_duration`.
    #[serde(with = "human_duration")]
    pub max_open_duration: Duration,
    /// Requests let through a half-open endpoint before it closes again. Default 1.
    pub half_open_probes: u32,
    /// Never eject more than this share of endpoints (and never the last one). Default 50.
    pub max_ejection_percent: u32,
    /// Per service: concurrent requests before new ones wait. Default 1024; 0 = unlimited.
    pub max_concurrent_requests: u32,
    /// Per service: requests that may wait for a slot; beyond, 503 at once. Default 128.
    pub max_pending_requests: u32,
}

impl Default for CircuitBreakerPolicy {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            failure_rate_percent: 50,
            failure_rate_min_requests: 20,
            failure_rate_window: Duration::from_secs(10),
            open_duration: Duration::from_secs(5),
            max_open_duration: Duration::from_secs(60),
            half_open_probes: 1,
            max_ejection_percent: 50,
            max_concurrent_requests: 1024,
            max_pending_requests: 128,
        }
    }
}

/// A class of failure that may be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum RetryOn {
    /// The connection to the endpoint could not be made (nothing was sent).
    #[serde(rename = "connect-failure")]
    ConnectFailure,
    /// The connection was reset before response headers arrived.
    #[serde(rename = "reset")]
    Reset,
    #[serde(rename = "502")]
    Status502,
    #[serde(rename = "503")]
    Status503,
    #[serde(rename = "504")]
    Status504,
    /// gRPC status UNAVAILABLE (14).
    #[serde(rename = "unavailable")]
    Unavailable,
    /// gRPC status RESOURCE_EXHAUSTED (8).
    #[serde(rename = "resource-exhausted")]
    ResourceExhausted,
}

impl RetryOn {
    pub const ALL: [RetryOn; 7] = [
        RetryOn::ConnectFailure,
        RetryOn::Reset,
        RetryOn::Status502,
        RetryOn::Status503,
        RetryOn::Status504,
        RetryOn::Unavailable,
        RetryOn::ResourceExhausted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RetryOn::ConnectFailure => "connect-failure",
            RetryOn::Reset => "reset",
            RetryOn::Status502 => "502",
            RetryOn::Status503 => "503",
            RetryOn::Status504 => "504",
            RetryOn::Unavailable => "unavailable",
            RetryOn::ResourceExhausted => "resource-exhausted",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }

    fn defaults() -> Vec<RetryOn> {
        vec![
            RetryOn::ConnectFailure,
            RetryOn::Reset,
            RetryOn::Status502,
            RetryOn::Status503,
            RetryOn::Status504,
            RetryOn::Unavailable,
        ]
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all, the first included. Default 3; 0 or 1 disables retries; at most 10.
    pub max_attempts: u32,
    /// Deadline of one attempt. Default 0 (only the request timeout applies).
    #[serde(with = "human_duration")]
    pub per_try_timeout: Duration,
    /// Full-jitter exponential backoff: attempt n waits uniform(0, min(max, base × 2ⁿ)).
    /// Default 25ms.
    #[serde(with = "human_duration")]
    pub backoff_base: Duration,
    /// Default 250ms, at least `backoff_base`.
    #[serde(with = "human_duration")]
    pub backoff_max: Duration,
    /// Default: connect-failure, reset, 502, 503, 504, unavailable.
    pub retry_on: Vec<RetryOn>,
    /// Retries may add at most this share of the requests in the window. Default 20.
    pub budget_percent: u32,
    /// …plus this many retries per second regardless of traffic. Default 10.
    pub budget_min_per_second: u32,
    /// Default 10s.
    #[serde(with = "human_duration")]
    pub budget_window: Duration,
    /// Request bodies up to this size are kept for a retry; larger ones are not retried.
    /// Default 65536; 0 retries only requests without a body.
    pub max_body_bytes: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            per_try_timeout: Duration::ZERO,
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
            retry_on: RetryOn::defaults(),
            budget_percent: 20,
            budget_min_per_second: 10,
            budget_window: Duration::from_secs(10),
            max_body_bytes: 64 * 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TimeoutPolicy {
    /// Whole request, retries included. Default 15s; 0 disables.
    #[serde(with = "human_duration")]
    pub request: Duration,
    /// Default 1s; 0 leaves it to the request timeout.
    #[serde(with = "human_duration")]
    pub connect: Duration,
    /// Pooled connections idle this long are closed. Default 60s; 0 disables.
    #[serde(with = "human_duration")]
    pub idle: Duration,
}

impl Default for TimeoutPolicy {
    fn default() -> Self {
        Self {
            request: Duration::from_secs(15),
            connect: Duration::from_secs(1),
            idle: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CachePolicy {
    /// How long a response is fresh unless `Cache-Control` says less. Default 0: caching off.
    #[serde(with = "human_duration")]
    pub ttl: Duration,
    /// Only safe methods: GET and HEAD (the default).
    pub methods: Vec<String>,
    /// Empty (the default) means every path.
    pub path_prefixes: Vec<String>,
    /// Default 10000.
    pub max_entries: u64,
    /// Default 64 MiB.
    pub max_bytes: u64,
    /// Extra request headers that are part of the key (lowercase), besides the response's `Vary`.
    pub key_headers: Vec<String>,
    /// Honour `Cache-Control` (`no-store`, `private`, `max-age`). Default true.
    pub honor_cache_control: bool,
    /// Serve a stale entry this long past its expiry when the upstream fails. Default 0.
    #[serde(with = "human_duration")]
    pub stale_if_error: Duration,
    /// Events that drop entries: each names a topic and a path prefix, in which `{key}` stands
    /// for the event's key (CloudEvents subject). Default none.
    pub invalidate_on: Vec<CacheInvalidation>,
}

/// One cache-invalidation rule: an event on `topic` drops the entries whose path starts with
/// `prefix` (after `{key}` is replaced by the event's key).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheInvalidation {
    pub topic: String,
    pub prefix: String,
}

impl CacheInvalidation {
    /// The path prefix an event with `key` invalidates.
    pub fn prefix_for(&self, key: &str) -> String {
        self.prefix.replace("{key}", key)
    }
}

impl Default for CachePolicy {
    fn default() -> Self {
        Self {
            ttl: Duration::ZERO,
            methods: vec!["GET".into(), "HEAD".into()],
            path_prefixes: Vec::new(),
            max_entries: 10_000,
            max_bytes: 64 * 1024 * 1024,
            key_headers: Vec::new(),
            honor_cache_control: true,
            stale_if_error: Duration::ZERO,
            invalidate_on: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitPolicy {
    /// Token-bucket rate for the whole service. Default 0: off.
    pub requests_per_second: u32,
    /// Bucket size. Default 0: the same as the rate.
    pub burst: u32,
    /// Token-bucket rate per caller identity. Default 0: off.
    pub per_caller_requests_per_second: u32,
    /// Default 0: the same as the per-caller rate.
    pub per_caller_burst: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthzPolicy {
    /// Service names or `spiffe://` ids allowed to call. Empty (the default) means any
    /// authenticated mesh identity.
    pub allowed_callers: Vec<String>,
    /// Let callers without a mesh identity through. Default false (fail-closed).
    pub allow_unauthenticated: bool,
}

/// Spans over OTLP: which share of the traces this service's sidecars start are sampled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TracingPolicy {
    /// 0..=1 (`0.01`: one trace in a hundred). A trace that arrives sampled or not keeps its
    /// caller's decision (parent-based). Unset: the sidecar's `OTEL_TRACES_SAMPLER_ARG`, else 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sampling: Option<Ratio>,
}

impl TracingPolicy {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// A share in 0..=1, kept in parts per million so a policy stays comparable (`Eq`) and two
/// writings of the same share are one value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ratio(u32);

impl Ratio {
    pub const ONE: Ratio = Ratio(1_000_000);

    /// `None` outside 0..=1 (and for NaN).
    pub fn new(share: f64) -> Option<Ratio> {
        (0.0..=1.0).contains(&share).then(|| Ratio((share * 1_000_000.0).round() as u32))
    }

    pub fn parts_per_million(self) -> u32 {
        self.0
    }

    pub fn get(self) -> f64 {
        f64::from(self.0) / 1_000_000.0
    }
}

impl Serialize for Ratio {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(self.get())
    }
}

impl<'de> Deserialize<'de> for Ratio {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let share = f64::deserialize(d)?;
        Ratio::new(share)
            .ok_or_else(|| serde::de::Error::custom(format!("{share} is not a share between 0 and 1")))
    }
}

// ---- validation ----------------------------------------------------------------------------

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);

struct Check {
    prefix: &'static str,
}

impl Check {
    fn err(&self, field: &str, reason: impl Into<String>) -> FieldError {
        FieldError::new(format!("{}.{field}", self.prefix), reason)
    }

    fn range(&self, field: &str, v: u64, lo: u64, hi: u64) -> Result<(), FieldError> {
        if v < lo || v > hi {
            return Err(self.err(field, format!("{v} is out of range: must be {lo}..={hi}")));
        }
        Ok(())
    }

    /// 0, or a whole number of milliseconds in `lo..=hi`.
    fn duration(&self, field: &str, d: Duration, lo: Duration, hi: Duration) -> Result<(), FieldError> {
        if !d.subsec_nanos().is_multiple_of(1_000_000) {
            return Err(self.err(field, "must be a whole number of milliseconds"));
        }
        if d.is_zero() {
            return Ok(());
        }
        if d < lo || d > hi {
            return Err(self.err(
                field,
                format!(
                    "{} is out of range: must be 0 or {}..={}",
                    fmt_duration(d),
                    fmt_duration(lo),
                    fmt_duration(hi)
                ),
            ));
        }
        Ok(())
    }

    fn nonzero(&self, field: &str, d: Duration, why: &str) -> Result<(), FieldError> {
        if d.is_zero() {
            return Err(self.err(field, format!("must be greater than 0 {why}")));
        }
        Ok(())
    }
}

impl ServicePolicy {
    /// Checks every field; the error names the first field out of range.
    pub fn validate(&self) -> Result<(), FieldError> {
        self.load_balancer.validate()?;
        self.health.validate()?;
        self.circuit_breaker.validate()?;
        self.retry.validate()?;
        self.timeout.validate()?;
        self.cache.validate()?;
        self.rate_limit.validate()?;
        self.authz.validate()?;
        self.gateway.validate()?;
        match &self.external {
            Some(e) if !names::is_host_port(&format!("{}:{}", e.host, e.port)) => Err(FieldError::new(
                "external",
                format!("{}:{} is not a DNS name or IP with a port in 1..=65535", e.host, e.port),
            )),
            _ => Ok(()),
        }
    }

    /// Field-by-field differences between two policies, as dotted paths sorted by path.
    pub fn changes(&self, new: &ServicePolicy) -> Vec<v1::FieldChange> {
        let old = serde_json::to_value(self).unwrap_or_default();
        let new = serde_json::to_value(new).unwrap_or_default();
        let mut out = Vec::new();
        diff_values("", &old, &new, &mut out);
        out
    }
}

fn diff_values(path: &str, old: &serde_json::Value, new: &serde_json::Value, out: &mut Vec<v1::FieldChange>) {
    use serde_json::Value;
    // A section that appears or disappears is compared with an empty one: its fields are listed
    // one by one, not as one blob.
    let empty_object = Value::Object(serde_json::Map::new());
    let empty_list = Value::Array(Vec::new());
    let (old, new) = match (old, new) {
        (Value::Null, Value::Object(_)) => (&empty_object, new),
        (Value::Object(_), Value::Null) => (old, &empty_object),
        (Value::Null, Value::Array(b)) if b.iter().any(Value::is_object) => (&empty_list, new),
        (Value::Array(a), Value::Null) if a.iter().any(Value::is_object) => (old, &empty_list),
        _ => (old, new),
    };
    if let (Value::Object(a), Value::Object(b)) = (old, new) {
        let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        for k in keys {
            let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
            diff_values(&p, a.get(k).unwrap_or(&Value::Null), b.get(k).unwrap_or(&Value::Null), out);
        }
    } else if let (Value::Array(a), Value::Array(b)) = (old, new)
        && a.iter().chain(b).any(Value::is_object)
    {
        // Lists of objects (gateway routes) are compared item by item: `gateway.routes[1].service`.
        for i in 0..a.len().max(b.len()) {
            diff_values(
                &format!("{path}[{i}]"),
                a.get(i).unwrap_or(&Value::Null),
                b.get(i).unwrap_or(&Value::Null),
                out,
            );
        }
    } else if old != new {
        let show = |v: &Value| match v {
            Value::Null => "(unset)".to_string(),
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        out.push(v1::FieldChange { field: path.to_string(), old_value: show(old), new_value: show(new) });
    }
}

impl LoadBalancer {
    fn validate(&self) -> Result<(), FieldError> {
        let c = Check { prefix: "load_balancer" };
        match (&self.algorithm, &self.hash_header) {
            (Algorithm::ConsistentHash, None) => {
                Err(c.err("hash_header", "required by consistent_hash: name the request header to hash"))
            }
            (Algorithm::ConsistentHash, Some(h)) if !names::is_header_name(h) => {
                Err(c.err("hash_header", format!("{h:?} is not a lowercase HTTP header name")))
            }
            (Algorithm::ConsistentHash, Some(_)) | (_, None) => Ok(()),
            (_, Some(_)) => Err(c.err("hash_header", "only used by algorithm consistent_hash")),
        }
    }
}

impl HealthPolicy {
    fn validate(&self) -> Result<(), FieldError> {
        let c = Check { prefix: "health" };
        let p = &self.probe_path;
        if !p.starts_with('/') || p.len() > 256 || p.chars().any(|ch| ch.is_whitespace() || ch.is_control()) {
            return Err(c.err(
                "probe_path",
                format!("{p:?} must start with '/', have no spaces and at most 256 characters"),
            ));
        }
        c.duration("probe_interval", self.probe_interval, Duration::from_millis(100), HOUR)?;
        if !self.probe_interval.is_zero() {
            c.nonzero("probe_timeout", self.probe_timeout, "while probing is on")?;
            c.duration("probe_timeout", self.probe_timeout, Duration::from_millis(1), self.probe_interval)?;
        }
        c.range("healthy_threshold", self.healthy_threshold.into(), 1, 100)?;
        c.range("unhealthy_threshold", self.unhealthy_threshold.into(), 1, 100)?;
        c.nonzero("heartbeat_interval", self.heartbeat_interval, "(heartbeats cannot be turned off)")?;
        c.duration(
            "heartbeat_interval",
            self.heartbeat_interval,
            Duration::from_millis(100),
            Duration::from_secs(300),
        )?;
        c.duration("heartbeat_ttl", self.heartbeat_ttl, self.heartbeat_interval * 2, DAY).map_err(|e| {
            FieldError::new(e.field, format!("{} (at least twice heartbeat_interval)", e.reason))
        })?;
        c.duration("deregister_after", self.deregister_after, Duration::from_millis(1), 7 * DAY)?;
        c.range("self_preservation_percent", self.self_preservation_percent.into(), 0, 100)?;
        if self.self_preservation_percent > 0 {
            c.nonzero(
                "self_preservation_window",
                self.self_preservation_window,
                "while self_preservation_percent is set",
            )?;
        }
        c.duration("self_preservation_window", self.self_preservation_window, Duration::from_secs(1), DAY)
    }
}

impl CircuitBreakerPolicy {
    fn validate(&self) -> Result<(), FieldError> {
        let c = Check { prefix: "circuit_breaker" };
        c.range("consecutive_failures", self.consecutive_failures.into(), 0, 10_000)?;
        c.range("failure_rate_percent", self.failure_rate_percent.into(), 0, 100)?;
        if self.failure_rate_percent > 0 {
            c.range("failure_rate_min_requests", self.failure_rate_min_requests.into(), 1, 1_000_000)?;
            c.nonzero("failure_rate_window", self.failure_rate_window, "while failure_rate_percent is set")?;
        }
        c.duration("failure_rate_window", self.failure_rate_window, Duration::from_millis(100), HOUR)?;
        if self.consecutive_failures > 0 || self.failure_rate_percent > 0 {
            c.nonzero("open_duration", self.open_duration, "while ejection is on")?;
            c.range("half_open_probes", self.half_open_probes.into(), 1, 1000)?;
        }
        c.duration("open_duration", self.open_duration, Duration::from_millis(1), HOUR)?;
        if self.max_open_duration < self.open_duration {
            return Err(c.err("max_open_duration", "must be at least open_duration"));
        }
        c.duration("max_open_duration", self.max_open_duration, Duration::from_millis(1), DAY)?;
        c.range("max_ejection_percent", self.max_ejection_percent.into(), 0, 100)?;
        c.range("max_concurrent_requests", self.max_concurrent_requests.into(), 0, 1_000_000)?;
        c.range("max_pending_requests", self.max_pending_requests.into(), 0, 1_000_000)
    }
}

impl RetryPolicy {
    fn validate(&self) -> Result<(), FieldError> {
        let c = Check { prefix: "retry" };
        c.range("max_attempts", self.max_attempts.into(), 0, 10)?;
        c.duration("per_try_timeout", self.per_try_timeout, Duration::from_millis(1), HOUR)?;
        c.duration("backoff_base", self.backoff_base, Duration::from_millis(1), Duration::from_secs(60))?;
        c.duration("backoff_max", self.backoff_max, Duration::from_millis(1), Duration::from_secs(300))?;
        if self.backoff_max < self.backoff_base {
            return Err(c.err("backoff_max", "must be at least backoff_base"));
        }
        if self.retry_on.is_empty() {
            return Err(
                c.err("retry_on", "must name at least one class; set max_attempts: 1 to turn retries off")
            );
        }
        let mut seen = std::collections::BTreeSet::new();
        if let Some(dup) = self.retry_on.iter().find(|r| !seen.insert(**r)) {
            return Err(c.err("retry_on", format!("{} is listed twice", dup.as_str())));
        }
        c.range("budget_percent", self.budget_percent.into(), 0, 100)?;
        c.range("budget_min_per_second", self.budget_min_per_second.into(), 0, 100_000)?;
        c.nonzero("budget_window", self.budget_window, "(the budget needs a window)")?;
        c.duration("budget_window", self.budget_window, Duration::from_secs(1), Duration::from_secs(300))?;
        c.range("max_body_bytes", self.max_body_bytes, 0, 16 * 1024 * 1024)
    }
}

impl TimeoutPolicy {
    fn validate(&self) -> Result<(), FieldError> {
        let c = Check { prefix: "timeout" };
        c.duration("request", self.request, Duration::from_millis(1), HOUR)?;
        c.duration("connect", self.connect, Duration::from_millis(1), Duration::from_secs(300))?;
        c.duration("idle", self.idle, Duration::from_millis(100), DAY)
    }
}

impl CachePolicy {
    fn validate(&self) -> Result<(), FieldError> {
        let c = Check { prefix: "cache" };
        c.duration("ttl", self.ttl, Duration::from_millis(1), 30 * DAY)?;
        if self.methods.is_empty() {
            return Err(c.err("methods", "must name GET, HEAD or both; set ttl: 0 to turn caching off"));
        }
        if let Some(m) = self.methods.iter().find(|m| *m != "GET" && *m != "HEAD") {
            return Err(c.err("methods", format!("{m:?} is not cacheable: only GET and HEAD are")));
        }
        if let Some(p) = self.path_prefixes.iter().find(|p| !p.starts_with('/')) {
            return Err(c.err("path_prefixes", format!("{p:?} must start with '/'")));
        }
        if !self.ttl.is_zero() {
            c.range("max_entries", self.max_entries, 1, 100_000_000)?;
            c.range("max_bytes", self.max_bytes, 1024, 1 << 40)?;
        }
        if let Some(h) = self.key_headers.iter().find(|h| !names::is_header_name(h)) {
            return Err(c.err("key_headers", format!("{h:?} is not a lowercase HTTP header name")));
        }
        c.duration("stale_if_error", self.stale_if_error, Duration::from_millis(1), 30 * DAY)?;
        for (i, rule) in self.invalidate_on.iter().enumerate() {
            if !names::is_topic(&rule.topic) {
                let t = &rule.topic;
                return Err(c.err(
                    &format!("invalidate_on[{i}].topic"),
                    format!("{t:?} is not a topic name: {}", names::TOPIC_RULE),
                ));
            }
            if !rule.prefix.starts_with('/') {
                let p = &rule.prefix;
                return Err(
                    c.err(&format!("invalidate_on[{i}].prefix"), format!("{p:?} must start with '/'"))
                );
            }
        }
        Ok(())
    }
}

impl RateLimitPolicy {
    fn validate(&self) -> Result<(), FieldError> {
        let c = Check { prefix: "rate_limit" };
        c.range("requests_per_second", self.requests_per_second.into(), 0, 10_000_000)?;
        c.range("burst", self.burst.into(), 0, 10_000_000)?;
        c.range("per_caller_requests_per_second", self.per_caller_requests_per_second.into(), 0, 10_000_000)?;
        c.range("per_caller_burst", self.per_caller_burst.into(), 0, 10_000_000)
    }
}

impl AuthzPolicy {
    fn validate(&self) -> Result<(), FieldError> {
        let c = Check { prefix: "authz" };
        match self.allowed_callers.iter().find(|id| !(names::is_service_name(id) || names::is_spiffe_id(id)))
        {
            Some(id) => {
                Err(c.err("allowed_callers", format!("{id:?} is neither a service name nor a spiffe:// id")))
            }
            None => Ok(()),
        }
    }
}

// ---- wire conversions ----------------------------------------------------------------------

fn ms(v: Option<u64>, default: Duration) -> Duration {
    v.map(Duration::from_millis).unwrap_or(default)
}

fn to_ms(d: Duration) -> Option<u64> {
    Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn list_or<T>(v: Vec<T>, default: Vec<T>) -> Vec<T> {
    if v.is_empty() { default } else { v }
}

impl TryFrom<v1::ServicePolicy> for ServicePolicy {
    type Error = FieldError;

    /// Unset fields take their defaults; the result is validated.
    fn try_from(w: v1::ServicePolicy) -> Result<Self, FieldError> {
        let d = ServicePolicy::default();
        let lb = w.load_balancer.unwrap_or_default();
        let algorithm = match v1::LoadBalancerAlgorithm::try_from(lb.algorithm) {
            Ok(v1::LoadBalancerAlgorithm::Unspecified | v1::LoadBalancerAlgorithm::P2cPeakEwma) => {
                Algorithm::P2cPeakEwma
            }
            Ok(v1::LoadBalancerAlgorithm::RoundRobin) => Algorithm::RoundRobin,
            Ok(v1::LoadBalancerAlgorithm::Random) => Algorithm::Random,
            Ok(v1::LoadBalancerAlgorithm::LeastConnections) => Algorithm::LeastConnections,
            Ok(v1::LoadBalancerAlgorithm::Weighted) => Algorithm::Weighted,
            Ok(v1::LoadBalancerAlgorithm::ConsistentHash) => Algorithm::ConsistentHash,
            Err(_) => {
                return Err(FieldError::new(
                    "load_balancer.algorithm",
                    format!("unknown algorithm number {}", lb.algorithm),
                ));
            }
        };
        let h = w.health.unwrap_or_default();
        let cb = w.circuit_breaker.unwrap_or_default();
        let r = w.retry.unwrap_or_default();
        let t = w.timeout.unwrap_or_default();
        let ca = w.cache.unwrap_or_default();
        let rl = w.rate_limit.unwrap_or_default();
        let az = w.authz.unwrap_or_default();
        let mut retry_on = Vec::with_capacity(r.retry_on.len());
        for s in &r.retry_on {
            let class = RetryOn::parse(s).ok_or_else(|| {
                let known: Vec<_> = RetryOn::ALL.iter().map(|c| c.as_str()).collect();
                FieldError::new("retry.retry_on", format!("unknown class {s:?}; known: {}", known.join(", ")))
            })?;
            retry_on.push(class);
        }
        let p = ServicePolicy {
            load_balancer: LoadBalancer { algorithm, hash_header: lb.hash_header },
            health: HealthPolicy {
                probe_path: h.probe_path.unwrap_or(d.health.probe_path),
                probe_interval: ms(h.probe_interval_ms, d.health.probe_interval),
                probe_timeout: ms(h.probe_timeout_ms, d.health.probe_timeout),
                healthy_threshold: h.healthy_threshold.unwrap_or(d.health.healthy_threshold),
                unhealthy_threshold: h.unhealthy_threshold.unwrap_or(d.health.unhealthy_threshold),
                heartbeat_interval: ms(h.heartbeat_interval_ms, d.health.heartbeat_interval),
                heartbeat_ttl: ms(h.heartbeat_ttl_ms, d.health.heartbeat_ttl),
                deregister_after: ms(h.deregister_after_ms, d.health.deregister_after),
                self_preservation_percent: h
                    .self_preservation_percent
                    .unwrap_or(d.health.self_preservation_percent),
                self_preservation_window: ms(
                    h.self_preservation_window_ms,
                    d.health.self_preservation_window,
                ),
            },
            circuit_breaker: CircuitBreakerPolicy {
                consecutive_failures: cb
                    .consecutive_failures
                    .unwrap_or(d.circuit_breaker.consecutive_failures),
                failure_rate_percent: cb
                    .failure_rate_percent
                    .unwrap_or(d.circuit_breaker.failure_rate_percent),
                failure_rate_min_requests: cb
                    .failure_rate_min_requests
                    .unwrap_or(d.circuit_breaker.failure_rate_min_requests),
                failure_rate_window: ms(cb.failure_rate_window_ms, d.circuit_breaker.failure_rate_window),
                open_duration: ms(cb.open_duration_ms, d.circuit_breaker.open_duration),
                max_open_duration: ms(cb.max_open_duration_ms, d.circuit_breaker.max_open_duration),
                half_open_probes: cb.half_open_probes.unwrap_or(d.circuit_breaker.half_open_probes),
                max_ejection_percent: cb
                    .max_ejection_percent
                    .unwrap_or(d.circuit_breaker.max_ejection_percent),
                max_concurrent_requests: cb
                    .max_concurrent_requests
                    .unwrap_or(d.circuit_breaker.max_concurrent_requests),
                max_pending_requests: cb
                    .max_pending_requests
                    .unwrap_or(d.circuit_breaker.max_pending_requests),
            },
            retry: RetryPolicy {
                max_attempts: r.max_attempts.unwrap_or(d.retry.max_attempts),
                per_try_timeout: ms(r.per_try_timeout_ms, d.retry.per_try_timeout),
                backoff_base: ms(r.backoff_base_ms, d.retry.backoff_base),
                backoff_max: ms(r.backoff_max_ms, d.retry.backoff_max),
                retry_on: list_or(retry_on, d.retry.retry_on),
                budget_percent: r.budget_percent.unwrap_or(d.retry.budget_percent),
                budget_min_per_second: r.budget_min_per_second.unwrap_or(d.retry.budget_min_per_second),
                budget_window: ms(r.budget_window_ms, d.retry.budget_window),
                max_body_bytes: r.max_body_bytes.unwrap_or(d.retry.max_body_bytes),
            },
            timeout: TimeoutPolicy {
                request: ms(t.request_ms, d.timeout.request),
                connect: ms(t.connect_ms, d.timeout.connect),
                idle: ms(t.idle_ms, d.timeout.idle),
            },
            cache: CachePolicy {
                ttl: ms(ca.ttl_ms, d.cache.ttl),
                methods: list_or(ca.methods, d.cache.methods),
                path_prefixes: ca.path_prefixes,
                max_entries: ca.max_entries.unwrap_or(d.cache.max_entries),
                max_bytes: ca.max_bytes.unwrap_or(d.cache.max_bytes),
                key_headers: ca.key_headers,
                honor_cache_control: ca.honor_cache_control.unwrap_or(d.cache.honor_cache_control),
                stale_if_error: ms(ca.stale_if_error_ms, d.cache.stale_if_error),
                invalidate_on: ca
                    .invalidate_on
                    .into_iter()
                    .map(|r| CacheInvalidation { topic: r.topic, prefix: r.prefix })
                    .collect(),
            },
            rate_limit: RateLimitPolicy {
                requests_per_second: rl.requests_per_second.unwrap_or_default(),
                burst: rl.burst.unwrap_or_default(),
                per_caller_requests_per_second: rl.per_caller_requests_per_second.unwrap_or_default(),
                per_caller_burst: rl.per_caller_burst.unwrap_or_default(),
            },
            authz: AuthzPolicy {
                allowed_callers: az.allowed_callers,
                allow_unauthenticated: az.allow_unauthenticated.unwrap_or_default(),
            },
            tracing: TracingPolicy {
                sampling: match w.tracing.and_then(|t| t.sampling) {
                    None => None,
                    Some(share) => Some(Ratio::new(share).ok_or_else(|| {
                        FieldError::new("tracing.sampling", format!("{share} is not a share between 0 and 1"))
                    })?),
                },
            },
            external: match w.external {
                None => None,
                Some(e) => Some(ExternalService {
                    port: u16::try_from(e.port)
                        .map_err(|_| FieldError::new("external.port", format!("{} is not a port", e.port)))?,
                    host: e.host,
                }),
            },
            gateway: w.gateway.map(GatewayPolicy::try_from).transpose()?.unwrap_or_default(),
        };
        p.validate()?;
        Ok(p)
    }
}

impl From<&ServicePolicy> for v1::ServicePolicy {
    /// Every field is set explicitly, so the receiver never depends on its own defaults.
    fn from(p: &ServicePolicy) -> Self {
        let algorithm = match p.load_balancer.algorithm {
            Algorithm::RoundRobin => v1::LoadBalancerAlgorithm::RoundRobin,
            Algorithm::Random => v1::LoadBalancerAlgorithm::Random,
            Algorithm::LeastConnections => v1::LoadBalancerAlgorithm::LeastConnections,
            Algorithm::P2cPeakEwma => v1::LoadBalancerAlgorithm::P2cPeakEwma,
            Algorithm::Weighted => v1::LoadBalancerAlgorithm::Weighted,
            Algorithm::ConsistentHash => v1::LoadBalancerAlgorithm::ConsistentHash,
        };
        let (h, cb, r, t, ca, rl, az) =
            (&p.health, &p.circuit_breaker, &p.retry, &p.timeout, &p.cache, &p.rate_limit, &p.authz);
        v1::ServicePolicy {
            load_balancer: Some(v1::LoadBalancer {
                algorithm: algorithm.into(),
                hash_header: p.load_balancer.hash_header.clone(),
            }),
            health: Some(v1::HealthPolicy {
                probe_path: Some(h.probe_path.clone()),
                probe_interval_ms: to_ms(h.probe_interval),
                probe_timeout_ms: to_ms(h.probe_timeout),
                healthy_threshold: Some(h.healthy_threshold),
                unhealthy_threshold: Some(h.unhealthy_threshold),
                heartbeat_interval_ms: to_ms(h.heartbeat_interval),
                heartbeat_ttl_ms: to_ms(h.heartbeat_ttl),
                deregister_after_ms: to_ms(h.deregister_after),
                self_preservation_percent: Some(h.self_preservation_percent),
                self_preservation_window_ms: to_ms(h.self_preservation_window),
            }),
            circuit_breaker: Some(v1::CircuitBreakerPolicy {
                consecutive_failures: Some(cb.consecutive_failures),
                failure_rate_percent: Some(cb.failure_rate_percent),
                failure_rate_min_requests: Some(cb.failure_rate_min_requests),
                failure_rate_window_ms: to_ms(cb.failure_rate_window),
                open_duration_ms: to_ms(cb.open_duration),
                max_open_duration_ms: to_ms(cb.max_open_duration),
                half_open_probes: Some(cb.half_open_probes),
                max_ejection_percent: Some(cb.max_ejection_percent),
                max_concurrent_requests: Some(cb.max_concurrent_requests),
                max_pending_requests: Some(cb.max_pending_requests),
            }),
            retry: Some(v1::RetryPolicy {
                max_attempts: Some(r.max_attempts),
                per_try_timeout_ms: to_ms(r.per_try_timeout),
                backoff_base_ms: to_ms(r.backoff_base),
                backoff_max_ms: to_ms(r.backoff_max),
                retry_on: r.retry_on.iter().map(|c| c.as_str().to_string()).collect(),
                budget_percent: Some(r.budget_percent),
                budget_min_per_second: Some(r.budget_min_per_second),
                budget_window_ms: to_ms(r.budget_window),
                max_body_bytes: Some(r.max_body_bytes),
            }),
            timeout: Some(v1::TimeoutPolicy {
                request_ms: to_ms(t.request),
                connect_ms: to_ms(t.connect),
                idle_ms: to_ms(t.idle),
            }),
            cache: Some(v1::CachePolicy {
                ttl_ms: to_ms(ca.ttl),
                methods: ca.methods.clone(),
                path_prefixes: ca.path_prefixes.clone(),
                max_entries: Some(ca.max_entries),
                max_bytes: Some(ca.max_bytes),
                key_headers: ca.key_headers.clone(),
                honor_cache_control: Some(ca.honor_cache_control),
                stale_if_error_ms: to_ms(ca.stale_if_error),
                invalidate_on: ca
                    .invalidate_on
                    .iter()
                    .map(|r| v1::CacheInvalidation { topic: r.topic.clone(), prefix: r.prefix.clone() })
                    .collect(),
            }),
            rate_limit: Some(v1::RateLimitPolicy {
                requests_per_second: Some(rl.requests_per_second),
                burst: Some(rl.burst),
                per_caller_requests_per_second: Some(rl.per_caller_requests_per_second),
                per_caller_burst: Some(rl.per_caller_burst),
            }),
            authz: Some(v1::AuthzPolicy {
                allowed_callers: az.allowed_callers.clone(),
                allow_unauthenticated: Some(az.allow_unauthenticated),
            }),
            tracing: p.tracing.sampling.map(|r| v1::TracingPolicy { sampling: Some(r.get()) }),
            external: p
                .external
                .as_ref()
                .map(|e| v1::ExternalService { host: e.host.clone(), port: e.port.into() }),
            gateway: (!p.gateway.is_empty()).then(|| (&p.gateway).into()),
        }
    }
}

/// Formats a duration the way policy files write it (`1s 500ms`).
pub fn fmt_duration(d: Duration) -> String {
    if d.is_zero() { "0s".into() } else { humantime::format_duration(d).to_string() }
}

/// Serde for durations as human-readable strings (`"250ms"`, `"15s"`, `"0"`).
pub mod human_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::fmt_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(s.trim())
            .map_err(|e| D::Error::custom(format!("{s:?} is not a duration like \"250ms\" or \"15s\": {e}")))
    }
}

#[cfg(test)]
mod tests;
