//! Sidecar metrics in the Prometheus / OpenMetrics text format. Per-request series are updated
//! on the request path; endpoint and policy gauges are set from live state at scrape time.

use std::sync::Arc;

use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter, exemplar::HistogramWithExemplars, family::Family, gauge::Gauge,
        histogram::exponential_buckets,
    },
    registry::Registry,
};

type Labels = Vec<(&'static str, String)>;

/// Request counters of one endpoint (or of the local app) by status, so the request path finds
/// its counter in a short list instead of hashing a label set.
#[derive(Debug, Default)]
pub struct StatusCounters(std::sync::Mutex<Vec<(u16, Counter)>>);

impl StatusCounters {
    /// The counter for `status`, created with `make` on first use.
    pub fn get(&self, status: u16, make: impl FnOnce() -> Counter) -> Counter {
        let mut list = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, c)) = list.iter().find(|(s, _)| *s == status) {
            return c.clone();
        }
        let c = make();
        list.push((status, c.clone()));
        c
    }
}

pub struct Metrics {
    pub requests: Family<Labels, Counter>,
    pub latency: Family<Labels, Latency, fn() -> Latency>,
    pub endpoints: Family<Labels, Gauge>,
    pub endpoint_inflight: Family<Labels, Gauge>,
    pub policy_version: Family<Labels, Gauge>,
    pub control_plane_connected: Gauge,
    pub control_plane_reconnects: Counter,
    pub policy_acks: Counter,
    pub policy_nacks: Counter,
    pub discovery_updates: Counter,
    pub heartbeats: Counter,
    pub app_healthy: Gauge,
    pub retries: Family<Labels, Counter>,
    pub retry_budget_exhausted: Family<Labels, Counter>,
    pub overload_rejections: Family<Labels, Counter>,
    pub breaker_openings: Family<Labels, Counter>,
    pub endpoint_breaker_open: Family<Labels, Gauge>,
    pub rate_limited: Family<Labels, Counter>,
    pub cache: Family<Labels, Counter>,
    pub events_spooled: Counter,
    pub events_forwarded: Counter,
    pub spool_pending: Gauge,
    pub spool_bytes: Gauge,
    pub spool_oldest_age_seconds: Gauge,
    pub spool_commits: Gauge,
    pub events_delivered: Family<Labels, Counter>,
    pub event_delivery_failures: Family<Labels, Counter>,
    pub events_dead_lettered: Family<Labels, Counter>,
    pub cache_invalidations: Family<Labels, Counter>,
    pub cache_invalidation_followers: Gauge,
    pub certificate_expiry: Gauge,
    pub authz_denied: Family<Labels, Counter>,
    pub multiplexed: Family<Labels, Counter>,
    pub certificate_rotations: Counter,
    pub certificate_failures: Counter,
    pub cache_entries: Family<Labels, Gauge>,
    pub cache_bytes: Family<Labels, Gauge>,
    pub inbound_inflight: Gauge,
    /// Gateway: requests refused (or flagged, in detect mode) at the edge, by rule.
    pub edge_refusals: Family<Labels, Counter>,
    /// Gateway: threat signatures matched in detect mode, by rule (the request went on).
    pub edge_detections: Family<Labels, Counter>,
    pub edge_blocks: Counter,
    pub edge_blocked_clients: Gauge,
    pub edge_rate_limit_keys: Gauge,
    pub access_log_dropped: Counter,
    registry: Registry,
}

/// A latency histogram whose buckets each remember the trace of a request that fell into them
/// (OpenMetrics exemplars: a dashboard jumps from a slow bucket to a trace that was slow).
pub type Latency = HistogramWithExemplars<TraceExemplar>;

fn latency_histogram() -> Latency {
    HistogramWithExemplars::new(exponential_buckets(0.0001, 2.0, 18))
}

/// An exemplar's labels: the request's W3C trace id (no allocation per request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceExemplar(pub crate::http::trace::Hex<32>);

impl prometheus_client::encoding::EncodeLabelSet for TraceExemplar {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelSetEncoder,
    ) -> Result<(), std::fmt::Error> {
        [("trace_id", self.0.as_str())].encode(encoder)
    }
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut m = Metrics {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            endpoints: Family::default(),
            endpoint_inflight: Family::default(),
            policy_version: Family::default(),
            control_plane_connected: Gauge::default(),
            control_plane_reconnects: Counter::default(),
            policy_acks: Counter::default(),
            policy_nacks: Counter::default(),
            discovery_updates: Counter::default(),
            heartbeats: Counter::default(),
            app_healthy: Gauge::default(),
            retries: Family::default(),
            retry_budget_exhausted: Family::default(),
            overload_rejections: Family::default(),
            breaker_openings: Family::default(),
            endpoint_breaker_open: Family::default(),
            rate_limited: Family::default(),
            cache: Family::default(),
            events_spooled: Counter::default(),
            events_forwarded: Counter::default(),
            spool_pending: Gauge::default(),
            spool_bytes: Gauge::default(),
            spool_oldest_age_seconds: Gauge::default(),
            spool_commits: Gauge::default(),
            events_delivered: Family::default(),
            event_delivery_failures: Family::default(),
            events_dead_lettered: Family::default(),
            cache_invalidations: Family::default(),
            cache_invalidation_followers: Gauge::default(),
            certificate_expiry: Gauge::default(),
            authz_denied: Family::default(),
            multiplexed: Family::default(),
            certificate_rotations: Counter::default(),
            certificate_failures: Counter::default(),
            cache_entries: Family::default(),
            cache_bytes: Family::default(),
            inbound_inflight: Gauge::default(),
            edge_refusals: Family::default(),
            edge_detections: Family::default(),
            edge_blocks: Counter::default(),
            edge_blocked_clients: Gauge::default(),
            edge_rate_limit_keys: Gauge::default(),
            access_log_dropped: Counter::default(),
            registry: Registry::with_prefix("mesh_sidecar"),
        };
        let r = &mut m.registry;
        r.register("requests", "Requests by direction, service, endpoint and status", m.requests.clone());
        r.register(
            "request_duration_seconds",
            "Time to response headers, by direction and service",
            m.latency.clone(),
        );
        r.register("endpoints", "Endpoints known per upstream service", m.endpoints.clone());
        r.register("endpoint_inflight", "Requests in flight per endpoint", m.endpoint_inflight.clone());
        r.register("policy_version", "Policy version applied (ACKed) per service", m.policy_version.clone());
        r.register(
            "control_plane_connected",
            "1 while the control-plane streams are up",
            m.control_plane_connected.clone(),
        );
        r.register(
            "control_plane_reconnects",
            "Control-plane sessions started",
            m.control_plane_reconnects.clone(),
        );
        r.register("policy_acks", "Policy pushes applied and ACKed", m.policy_acks.clone());
        r.register(
            "policy_nacks",
            "Policy pushes refused (NACKed); the previous policy stays",
            m.policy_nacks.clone(),
        );
        r.register("discovery_updates", "Discovery messages applied", m.discovery_updates.clone());
        r.register("heartbeats", "Heartbeats sent", m.heartbeats.clone());
        r.register("retries", "Retries sent, by service", m.retries.clone());
        r.register(
            "retry_budget_exhausted",
            "Retries refused by the retry budget, by service",
            m.retry_budget_exhausted.clone(),
        );
        r.register(
            "overload_rejections",
            "Requests refused at once at the concurrency limit",
            m.overload_rejections.clone(),
        );
        r.register(
            "breaker_openings",
            "Circuit breaker openings (endpoint ejections)",
            m.breaker_openings.clone(),
        );
        r.register(
            "endpoint_breaker_open",
            "1 while an endpoint's circuit is open",
            m.endpoint_breaker_open.clone(),
        );
        r.register(
            "rate_limited",
            "Inbound requests refused with 429 by the service's rate limits",
            m.rate_limited.clone(),
        );
        r.register("cache_requests", "Cacheable requests by result (hit, miss, stale)", m.cache.clone());
        r.register("cache_entries", "Entries in the response cache", m.cache_entries.clone());
        r.register("cache_bytes", "Bytes held by the response cache", m.cache_bytes.clone());
        r.register("events_spooled", "Events the app published, durably spooled", m.events_spooled.clone());
        r.register("events_forwarded", "Spooled events acknowledged by the bus", m.events_forwarded.clone());
        r.register(
            "spool_pending",
            "Events in the spool not yet acknowledged by the bus",
            m.spool_pending.clone(),
        );
        r.register("spool_bytes", "Bytes of events in the spool not yet acknowledged", m.spool_bytes.clone());
        r.register(
            "spool_oldest_age_seconds",
            "Age of the oldest event in the spool not yet acknowledged by the bus (0 when empty)",
            m.spool_oldest_age_seconds.clone(),
        );
        r.register(
            "spool_commits",
            "Spool group commits (one write and one fsync for every publish waiting) since start",
            m.spool_commits.clone(),
        );
        r.register(
            "events_delivered",
            "Events the app accepted (2xx) from its subscriptions, by topic",
            m.events_delivered.clone(),
        );
        r.register(
            "event_delivery_failures",
            "Event deliveries to the app that failed (retried, then dead-lettered), by topic",
            m.event_delivery_failures.clone(),
        );
        r.register(
            "events_dead_lettered",
            "Events moved to the dead-letter topic after max_attempts, by topic",
            m.events_dead_lettered.clone(),
        );
        r.register(
            "cache_invalidations",
            "Cache entries dropped by events, by service and topic",
            m.cache_invalidations.clone(),
        );
        r.register(
            "cache_invalidation_followers",
            "Topics followed for cache invalidation (positioned on the bus; caches naming others are bypassed)",
            m.cache_invalidation_followers.clone(),
        );
        r.register(
            "certificate_expiry_timestamp_seconds",
            "When the sidecar's mesh certificate expires (Unix seconds; 0 before the first)",
            m.certificate_expiry.clone(),
        );
        r.register(
            "authz_denied",
            "Inbound requests refused with 403 by the service's authorization policy",
            m.authz_denied.clone(),
        );
        r.register(
            "multiplexed_requests",
            "HTTP/1.1 requests to a mesh peer sent as streams of its shared HTTP/2 connection, \
             because its few HTTP/1.1 connections were all busy, by upstream service",
            m.multiplexed.clone(),
        );
        r.register(
            "certificate_rotations",
            "Certificates renewed after the first (at two thirds of their lifetime)",
            m.certificate_rotations.clone(),
        );
        r.register(
            "certificate_failures",
            "Failed attempts to get a certificate from the mesh CA",
            m.certificate_failures.clone(),
        );
        r.register("app_healthy", "1 while the local app passes its health probe", m.app_healthy.clone());
        r.register(
            "inbound_inflight",
            "Inbound requests in flight to the local app",
            m.inbound_inflight.clone(),
        );
        r.register(
            "edge_refusals",
            "Gateway: requests refused at the edge, by rule (screening, IP lists, CORS, rate limits, tokens)",
            m.edge_refusals.clone(),
        );
        r.register(
            "edge_detections",
            "Gateway: threat signatures matched on routes in detect mode (the request went on), by rule",
            m.edge_detections.clone(),
        );
        r.register(
            "edge_blocks",
            "Gateway: clients blocked automatically after repeated refusals",
            m.edge_blocks.clone(),
        );
        r.register("edge_blocked_clients", "Gateway: clients blocked now", m.edge_blocked_clients.clone());
        r.register(
            "edge_rate_limit_keys",
            "Gateway: keys (subjects, API keys, addresses) the route rate limiters track",
            m.edge_rate_limit_keys.clone(),
        );
        r.register(
            "access_log_dropped",
            "Gateway: access-log lines dropped because the writer fell behind",
            m.access_log_dropped.clone(),
        );
        Arc::new(m)
    }

    pub fn request_counter(
        &self,
        direction: &'static str,
        service: &str,
        endpoint: &str,
        status: u16,
    ) -> Counter {
        self.requests
            .get_or_create(&vec![
                ("direction", direction.to_string()),
                ("service", service.to_string()),
                ("endpoint", endpoint.to_string()),
                ("status", status.to_string()),
            ])
            .clone()
    }

    pub fn latency_histogram(&self, direction: &'static str, service: &str) -> Latency {
        self.latency
            .get_or_create(&vec![("direction", direction.to_string()), ("service", service.to_string())])
            .clone()
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}
