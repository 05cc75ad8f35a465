//! The upstreams this sidecar calls: per service, its endpoints (from discovery, DNS or the
//! snapshot), its applied policy with the connection pool, limiter, budget and cache built from
//! it.

pub mod dns;
pub mod edge;
pub mod endpoint;
pub mod set;
pub mod snapshot;

use crate::{
    endpoint::pool::{Clients, MeshTls},
    identity::cell::IdentityCell,
    metrics::Metrics,
    outbound::{cache::Cache, limit::Limiter, retry::Budget},
    upstream::{
        endpoint::{Endpoint, EndpointInfo},
        set::EndpointSet,
    },
};

use arc_swap::ArcSwap;
use dashmap::DashMap;
use mesh_proto::policy::ServicePolicy;
use serde::Serialize;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock, atomic::AtomicUsize},
    time::Duration,
};
use tokio::sync::watch;

/// A service's policy as applied here, with what is built from it: pooled clients (timeouts)
/// and the concurrency limiter.
pub struct AppliedPolicy {
    pub version: u64,
    pub policy: Arc<ServicePolicy>,
    pub clients: Clients,
    pub limiter: Arc<Limiter>,
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
    pub latency: OnceLock<crate::metrics::Latency>,
    endpoints: ArcSwap<EndpointSet>,
    policy: ArcSwap<AppliedPolicy>,
    rr: AtomicUsize,
    source: Mutex<Source>,
    /// Becomes true with the first endpoint set from any source.
    known: watch::Sender<bool>,
    /// Retries spent against requests seen.
    pub budget: Budget,
    /// Cached answers of this service.
    pub cache: Cache,
    /// Mutual TLS to this service's sidecars (when this sidecar has a mesh identity).
    tls: Option<MeshTls>,
    /// This proxy's calls to the service since its last topology report.
    pub edge: edge::EdgeCounters,
}

impl Upstream {
    pub(crate) fn new(name: &str, identity: Option<&Arc<IdentityCell>>, metrics: &Metrics) -> Self {
        let policy = ServicePolicy::default();
        let tls = identity.map(|identity| MeshTls {
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
                limiter: Arc::new(Limiter::new(&policy.circuit_breaker)),
                policy: Arc::new(policy),
            }),
            rr: AtomicUsize::new(0),
            source: Mutex::new(Source::None),
            known: watch::channel(false).0,
            budget: Default::default(),
            cache: Default::default(),
            tls,
            edge: Default::default(),
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
            Arc::new(Limiter::new(n))
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
    identity: Option<Arc<IdentityCell>>,
    /// Where the upstreams count what they do (multiplexed requests).
    metrics: Arc<Metrics>,
}

impl Upstreams {
    /// The upstreams of a sidecar; `identity` makes calls to other sidecars mutual TLS.
    pub fn new(
        identity: Option<Arc<IdentityCell>>,
        metrics: Arc<Metrics>,
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
