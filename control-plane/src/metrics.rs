//! Control-plane metrics: counters and gauges updated where things happen, rendered in the
//! Prometheus / OpenMetrics text format by the admin listener. Registry sizes are gauges set
//! just before each scrape from the registry itself, so they can never drift.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

/// How many recent push→ACK latencies the Stats call summarises.
const RECENT_ACKS: usize = 4096;

pub struct Metrics {
    pub registrations: Counter,
    pub deregistrations: Counter,
    pub heartbeats: Counter,
    pub expirations: Counter,
    pub self_preservation_holds: Counter,
    pub discovery_messages: Counter,
    pub policy_pushes: Counter,
    pub policy_acks: Counter,
    pub policy_nacks: Counter,
    pub discovery_streams: Gauge,
    pub policy_streams: Gauge,
    pub heartbeat_streams: Gauge,
    pub services: Gauge,
    pub instances: Family<[(&'static str, &'static str); 1], Gauge>,
    pub policies: Gauge,
    /// Registry entries and policy channels held (registered, configured or watched).
    pub tracked: Family<[(&'static str, &'static str); 1], Gauge>,
    pub api_handshake_failures: Counter,
    pub api_refused: Family<[(&'static str, &'static str); 1], Counter>,
    /// 1 while this control plane expires and deregisters instances (always with the embedded
    /// store; the elected replica with etcd).
    pub sweeper: Gauge,
    ack_latency: Histogram,
    recent_acks: Mutex<VecDeque<f64>>,
    registry: Registry,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("mesh_control_plane");
        let m = Metrics {
            registrations: Counter::default(),
            deregistrations: Counter::default(),
            heartbeats: Counter::default(),
            expirations: Counter::default(),
            self_preservation_holds: Counter::default(),
            discovery_messages: Counter::default(),
            policy_pushes: Counter::default(),
            policy_acks: Counter::default(),
            policy_nacks: Counter::default(),
            discovery_streams: Gauge::default(),
            policy_streams: Gauge::default(),
            heartbeat_streams: Gauge::default(),
            services: Gauge::default(),
            instances: Family::default(),
            policies: Gauge::default(),
            tracked: Family::default(),
            api_handshake_failures: Counter::default(),
            api_refused: Family::default(),
            sweeper: Gauge::default(),
            ack_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            recent_acks: Mutex::new(VecDeque::with_capacity(RECENT_ACKS)),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register("registrations", "Instance registrations", m.registrations.clone());
        r.register(
            "sweeper",
            "1 while this control plane expires and deregisters instances (with --store etcd, the elected replica)",
            m.sweeper.clone(),
        );
        r.register(
            "deregistrations",
            "Instance deregistrations (explicit and after expiry)",
            m.deregistrations.clone(),
        );
        r.register("heartbeats", "Heartbeats received", m.heartbeats.clone());
        r.register("expirations", "Instances expired for missing their TTL", m.expirations.clone());
        r.register(
            "self_preservation_holds",
            "Instances past their TTL kept registered by self-preservation",
            m.self_preservation_holds.clone(),
        );
        r.register("discovery_messages", "Discovery messages sent to watchers", m.discovery_messages.clone());
        r.register("policy_pushes", "Policy versions pushed to proxies", m.policy_pushes.clone());
        r.register("policy_acks", "Policy pushes acknowledged", m.policy_acks.clone());
        r.register("policy_nacks", "Policy pushes refused by proxies", m.policy_nacks.clone());
        r.register("discovery_streams", "Open discovery watch streams", m.discovery_streams.clone());
        r.register("policy_streams", "Open policy streams", m.policy_streams.clone());
        r.register("heartbeat_streams", "Open heartbeat streams", m.heartbeat_streams.clone());
        r.register("services", "Services with at least one registered instance", m.services.clone());
        r.register("instances", "Registered instances by state (routable or not)", m.instances.clone());
        r.register("policies", "Services with an explicit policy", m.policies.clone());
        r.register(
            "tracked_names",
            "Service names the control plane holds state for (registered, configured or watched), by table",
            m.tracked.clone(),
        );
        r.register(
            "api_handshake_failures",
            "TLS handshakes on the gRPC listener that failed (plaintext, bad or foreign certificates)",
            m.api_handshake_failures.clone(),
        );
        r.register(
            "api_refused",
            "API calls refused by authorization, by code (unauthenticated, permission_denied)",
            m.api_refused.clone(),
        );
        r.register(
            "policy_ack_latency_seconds",
            "Time from a policy push to its ACK or NACK",
            m.ack_latency.clone(),
        );
        Arc::new(Metrics { registry, ..m })
    }

    pub fn observe_ack_latency(&self, d: Duration) {
        self.ack_latency.observe(d.as_secs_f64());
        let mut recent = self.recent_acks.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == RECENT_ACKS {
            recent.pop_front();
        }
        recent.push_back(d.as_secs_f64() * 1000.0);
    }

    /// (p50, p99, max) in milliseconds over the recent ACKs; zeros when there were none.
    pub fn ack_latency_summary_ms(&self) -> (f64, f64, f64) {
        let mut v: Vec<f64> =
            self.recent_acks.lock().unwrap_or_else(|p| p.into_inner()).iter().copied().collect();
        if v.is_empty() {
            return (0.0, 0.0, 0.0);
        }
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        (at(0.5), at(0.99), v[v.len() - 1])
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
