//! The services this sidecar sends traffic to: their endpoints (from discovery, a DNS name, or
//! the fail-static snapshot), their policy, and the pooled clients built from it.
//!
//! Reads on the request path are lock-free (`ArcSwap` loads). An endpoint that stays in the set
//! across updates keeps its identity (`Arc<Endpoint>`), so its in-flight count and latency
//! estimate survive discovery churn.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use dashmap::DashMap;
use mesh_proto::policy::{Algorithm, ServicePolicy};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::{sync::watch, time::Instant};

use crate::proxy::Clients;

/// Latency assumed for an endpoint with no measurement yet (linkerd uses the same idea).
const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// Peak-EWMA decay time.
const EWMA_DECAY: Duration = Duration::from_secs(10);
/// Points per endpoint on the consistent-hash ring.
const RING_POINTS: usize = 64;

/// An endpoint as discovery (or DNS) describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointInfo {
    pub id: String,
    pub address: String,
    #[serde(default)]
    pub zone: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    100
}

/// One endpoint and what the balancers know of it.
#[derive(Debug)]
pub struct Endpoint {
    pub info: EndpointInfo,
    /// `info.address` parsed once (requests are sent here).
    pub authority: Option<http::uri::Authority>,
    inflight: AtomicUsize,
    ewma: Mutex<Ewma>,
    /// This endpoint's request counters by status.
    pub counters: crate::metrics::StatusCounters,
    /// Outlier detection for this endpoint.
    pub breaker: crate::resilience::Breaker,
}

#[derive(Debug)]
struct Ewma {
    nanos: f64,
    at: Instant,
}

impl Endpoint {
    pub fn new(info: EndpointInfo) -> Self {
        let authority = info.address.parse().ok();
        Self {
            info,
            authority,
            inflight: AtomicUsize::new(0),
            ewma: Mutex::new(Ewma { nanos: 0.0, at: Instant::now() }),
            counters: Default::default(),
            breaker: Default::default(),
        }
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Counts a request in flight until the guard drops.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Peak EWMA: a slower sample takes over at once, faster ones pull it down with decay.
    pub fn observe(&self, rtt: Duration, now: Instant) {
        let mut e = self.ewma.lock().unwrap_or_else(|p| p.into_inner());
        let sample = rtt.as_nanos() as f64;
        if sample > e.nanos {
            e.nanos = sample;
        } else {
            let w = (-(now.duration_since(e.at).as_secs_f64()) / EWMA_DECAY.as_secs_f64()).exp();
            e.nanos = e.nanos * w + sample * (1.0 - w);
        }
        e.at = now;
    }

    /// Latency estimate × (in-flight + 1). The estimate decays with time since the last sample,
    /// so an endpoint that once answered slowly is tried again instead of starving. An endpoint
    /// never measured costs nothing while idle (one request learns its latency) and the
    /// conservative default while that request is out.
    fn cost(&self) -> f64 {
        let e = self.ewma.lock().unwrap_or_else(|p| p.into_inner());
        let inflight = self.inflight();
        let rtt = if e.nanos == 0.0 {
            if inflight == 0 {
                return 0.0;
            }
            DEFAULT_RTT.as_nanos() as f64
        } else {
            let idle = Instant::now().duration_since(e.at).as_secs_f64();
            e.nanos * (-idle / EWMA_DECAY.as_secs_f64()).exp()
        };
        rtt * (inflight + 1) as f64
    }

    pub fn latency_estimate(&self) -> Duration {
        Duration::from_nanos(self.ewma.lock().unwrap_or_else(|p| p.into_inner()).nanos as u64)
    }
}

/// Decrements the endpoint's in-flight count when dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Endpoint>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The endpoints of a service at one version.
#[derive(Debug, Default)]
pub struct EndpointSet {
    pub version: u64,
    pub endpoints: Vec<Arc<Endpoint>>,
    ring: OnceLock<Vec<(u64, usize)>>,
}

impl EndpointSet {
    pub fn new(version: u64, endpoints: Vec<Arc<Endpoint>>) -> Self {
        Self { version, endpoints, ring: OnceLock::new() }
    }

    pub fn infos(&self) -> Vec<EndpointInfo> {
        self.endpoints.iter().map(|e| e.info.clone()).collect()
    }

    /// Picks an endpoint, skipping those in `avoid` when another one exists.
    pub fn pick(
        &self,
        algorithm: Algorithm,
        rr: &AtomicUsize,
        hash_key: Option<&[u8]>,
        avoid: &[Arc<Endpoint>],
    ) -> Option<Arc<Endpoint>> {
        let all = &self.endpoints;
        if avoid.is_empty() && all.len() <= 1 {
            return all.first().cloned();
        }
        let candidates: Vec<&Arc<Endpoint>> = if avoid.is_empty() {
            all.iter().collect()
        } else {
            let rest: Vec<_> = all.iter().filter(|e| !avoid.iter().any(|a| Arc::ptr_eq(a, e))).collect();
            if rest.is_empty() { all.iter().collect() } else { rest }
        };
        if candidates.is_empty() {
            return None;
        }
        if candidates.len() == 1 {
            return Some(candidates[0].clone());
        }
        let mut rng = rand::rng();
        let chosen = match algorithm {
            Algorithm::RoundRobin => candidates[rr.fetch_add(1, Ordering::Relaxed) % candidates.len()],
            Algorithm::Random => candidates[rng.random_range(0..candidates.len())],
            Algorithm::LeastConnections => {
                // Lowest in-flight count; ties broken from a random start so load spreads.
                let start = rng.random_range(0..candidates.len());
                (0..candidates.len())
                    .map(|i| candidates[(start + i) % candidates.len()])
                    .min_by_key(|e| e.inflight())
                    .unwrap_or(candidates[0])
            }
            Algorithm::P2cPeakEwma => {
                let a = rng.random_range(0..candidates.len());
                let mut b = rng.random_range(0..candidates.len() - 1);
                if b >= a {
                    b += 1;
                }
                let (ea, eb) = (candidates[a], candidates[b]);
                if ea.cost() <= eb.cost() { ea } else { eb }
            }
            Algorithm::Weighted => {
                let total: u64 = candidates.iter().map(|e| u64::from(e.info.weight.max(1))).sum();
                let mut x = rng.random_range(0..total);
                let mut pick = candidates[candidates.len() - 1];
                for e in &candidates {
                    let w = u64::from(e.info.weight.max(1));
                    if x < w {
                        pick = e;
                        break;
                    }
                    x -= w;
                }
                pick
            }
            Algorithm::ConsistentHash => match hash_key {
                None => candidates[rng.random_range(0..candidates.len())],
                Some(key) => {
                    let ring = self.ring.get_or_init(|| build_ring(all));
                    let h = hash(key);
                    let start = ring.partition_point(|(p, _)| *p < h);
                    // Walk clockwise to the first point whose endpoint is a candidate.
                    (0..ring.len())
                        .map(|i| &all[ring[(start + i) % ring.len()].1])
                        .find(|e| candidates.iter().any(|c| Arc::ptr_eq(c, e)))
                        .unwrap_or(candidates[0])
                }
            },
        };
        Some(chosen.clone())
    }
}

fn hash(bytes: &[u8]) -> u64 {
    // FNV-1a then a 64-bit finaliser: stable across processes and releases, unlike SipHash keys.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

fn build_ring(endpoints: &[Arc<Endpoint>]) -> Vec<(u64, usize)> {
    let mut ring = Vec::with_capacity(endpoints.len() * RING_POINTS);
    for (i, e) in endpoints.iter().enumerate() {
        for p in 0..RING_POINTS {
            ring.push((hash(format!("{}#{p}", e.info.id).as_bytes()), i));
        }
    }
    ring.sort_unstable();
    ring
}

/// A service's policy as applied here, with what is built from it: pooled clients (timeouts)
/// and the concurrency limiter.
pub struct AppliedPolicy {
    pub version: u64,
    pub policy: Arc<ServicePolicy>,
    pub clients: Clients,
    pub limiter: Arc<crate::resilience::Limiter>,
}

/// Where an upstream's endpoints come from right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Not heard of yet.
    None,
    Discovery,
    Snapshot,
    Dns,
}

pub struct Upstream {
    pub name: String,
    /// Time-to-headers histogram of requests to this service (cached family member).
    pub latency: OnceLock<prometheus_client::metrics::histogram::Histogram>,
    endpoints: ArcSwap<EndpointSet>,
    policy: ArcSwap<AppliedPolicy>,
    rr: AtomicUsize,
    source: Mutex<Source>,
    /// Becomes true with the first endpoint set from any source.
    known: watch::Sender<bool>,
    /// Retries spent against requests seen.
    pub budget: crate::resilience::Budget,
    /// Cached answers of this service.
    pub cache: crate::cache::Cache,
    /// Mutual TLS to this service's sidecars (when this sidecar has a mesh identity).
    tls: Option<crate::proxy::MeshTls>,
}

impl Upstream {
    fn new(
        name: &str,
        identity: Option<&Arc<crate::identity::IdentityCell>>,
        metrics: &crate::metrics::Metrics,
    ) -> Self {
        let policy = ServicePolicy::default();
        let tls = identity.map(|identity| crate::proxy::MeshTls {
            identity: identity.clone(),
            service: name.to_string(),
            multiplexed: metrics.multiplexed.get_or_create(&vec![("service", name.to_string())]).clone(),
        });
        Self {
            name: name.to_string(),
            latency: OnceLock::new(),
            endpoints: ArcSwap::from_pointee(EndpointSet::default()),
            policy: ArcSwap::from_pointee(AppliedPolicy {
                version: 0,
                clients: Clients::new(&policy, tls.clone()),
                limiter: Arc::new(crate::resilience::Limiter::new(&policy.circuit_breaker)),
                policy: Arc::new(policy),
            }),
            rr: AtomicUsize::new(0),
            source: Mutex::new(Source::None),
            known: watch::channel(false).0,
            budget: Default::default(),
            cache: Default::default(),
            tls,
        }
    }

    pub fn endpoints(&self) -> Arc<EndpointSet> {
        self.endpoints.load_full()
    }

    pub fn policy(&self) -> Arc<AppliedPolicy> {
        self.policy.load_full()
    }

    pub fn source(&self) -> Source {
        *self.source.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn round_robin(&self) -> &AtomicUsize {
        &self.rr
    }

    /// Replaces the endpoint set, keeping the state of endpoints that stay.
    pub fn set_endpoints(&self, version: u64, infos: Vec<EndpointInfo>, source: Source) {
        let old = self.endpoints.load();
        let by_key: HashMap<(&str, &str), &Arc<Endpoint>> =
            old.endpoints.iter().map(|e| ((e.info.id.as_str(), e.info.address.as_str()), e)).collect();
        let endpoints = infos
            .into_iter()
            .map(|info| match by_key.get(&(info.id.as_str(), info.address.as_str())) {
                Some(e) if e.info == info => (*e).clone(),
                _ => Arc::new(Endpoint::new(info)),
            })
            .collect();
        self.endpoints.store(Arc::new(EndpointSet::new(version, endpoints)));
        *self.source.lock().unwrap_or_else(|p| p.into_inner()) = source;
        self.known.send_replace(true);
    }

    pub fn set_policy(&self, version: u64, policy: ServicePolicy) {
        let old = self.policy.load();
        let same_transport = old.policy.timeout == policy.timeout
            && old.policy.external.is_some() == policy.external.is_some();
        let clients = if same_transport {
            old.clients.clone()
        } else {
            // External services are called in plaintext (or however their URL says), never mTLS.
            Clients::new(&policy, self.tls.clone().filter(|_| policy.external.is_none()))
        };
        let (o, n) = (&old.policy.circuit_breaker, &policy.circuit_breaker);
        let limiter = if (o.max_concurrent_requests, o.max_pending_requests)
            == (n.max_concurrent_requests, n.max_pending_requests)
        {
            old.limiter.clone()
        } else {
            Arc::new(crate::resilience::Limiter::new(n))
        };
        self.policy.store(Arc::new(AppliedPolicy { version, policy: Arc::new(policy), clients, limiter }));
    }

    /// Puts back a policy this upstream had before (a push that could not be made durable).
    pub fn restore(&self, applied: Arc<AppliedPolicy>) {
        self.policy.store(applied);
    }

    /// Waits (at most `within`) until some source has given this service endpoints.
    pub async fn wait_known(&self, within: Duration) -> bool {
        let mut rx = self.known.subscribe();
        tokio::time::timeout(within, rx.wait_for(|k| *k)).await.is_ok_and(|r| r.is_ok())
    }
}

/// Every upstream this sidecar knows, and a channel that tells the control loop about new ones.
pub struct Upstreams {
    map: DashMap<String, Arc<Upstream>>,
    added: tokio::sync::mpsc::UnboundedSender<String>,
    /// Topics whose cache-invalidation follower is positioned on the bus: a cache whose policy
    /// names a topic not in here is bypassed (an entry stored before the follower starts could
    /// miss its invalidation and stay stale for its whole TTL).
    live_topics: std::sync::RwLock<std::collections::HashSet<String>>,
    /// Set when calls to other sidecars are mutual TLS with this identity.
    identity: Option<Arc<crate::identity::IdentityCell>>,
    /// Where the upstreams count what they do (multiplexed requests).
    metrics: Arc<crate::metrics::Metrics>,
}

impl Upstreams {
    /// The upstreams of a sidecar; `identity` makes calls to other sidecars mutual TLS.
    pub fn new(
        identity: Option<Arc<crate::identity::IdentityCell>>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> (Self, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let (added, rx) = tokio::sync::mpsc::unbounded_channel();
        (Self { map: DashMap::new(), added, live_topics: Default::default(), identity, metrics }, rx)
    }

    /// Whether every topic `cache` is invalidated by is followed (true when it names none).
    pub fn invalidation_ready(&self, cache: &mesh_proto::policy::CachePolicy) -> bool {
        cache.invalidate_on.is_empty() || {
            let live = self.live_topics.read().unwrap_or_else(|p| p.into_inner());
            cache.invalidate_on.iter().all(|r| live.contains(&r.topic))
        }
    }

    /// Marks `topic`'s invalidation follower positioned (`true`) or gone (`false`).
    pub fn set_topic_live(&self, topic: &str, live: bool) {
        let mut set = self.live_topics.write().unwrap_or_else(|p| p.into_inner());
        if live {
            set.insert(topic.to_string());
        } else {
            set.remove(topic);
        }
    }

    pub fn get(&self, name: &str) -> Option<Arc<Upstream>> {
        self.map.get(name).map(|u| u.clone())
    }

    /// The upstream, created (and announced to the control loop) on first use.
    pub fn get_or_add(&self, name: &str) -> Arc<Upstream> {
        if let Some(u) = self.get(name) {
            return u;
        }
        let mut created = false;
        let up = self
            .map
            .entry(name.to_string())
            .or_insert_with(|| {
                created = true;
                Arc::new(Upstream::new(name, self.identity.as_ref(), &self.metrics))
            })
            .clone();
        if created {
            let _ = self.added.send(name.to_string());
        }
        up
    }

    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.map.iter().map(|e| e.key().clone()).collect();
        v.sort();
        v
    }

    pub fn all(&self) -> Vec<Arc<Upstream>> {
        let mut v: Vec<Arc<Upstream>> = self.map.iter().map(|e| e.value().clone()).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

#[cfg(test)]
mod tests;
