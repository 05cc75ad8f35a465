//! The service registry: instances, their heartbeats and health, expiry and deregistration.
//!
//! Each service has its own state behind a short `std` mutex and a `watch` channel holding its
//! current discovery view ([`Endpoints`]). Discovery watchers subscribe to the channels
//! of the services they asked for, so a change to one service wakes only its watchers and never
//! takes a registry-wide lock. Versions come from [`Revisions`]: one counter, prefixed by the
//! persisted boot epoch so that they keep increasing across restarts.
//!
//! Entries: a service is tracked while it has instances, a discovery watcher, or a caller
//! holding it; a watch of a name nobody registered leaves nothing behind once it ends
//! ([`Registry::release`]). The sweeper walks only services with instances (`live`), so its cost
//! does not grow with names that are merely watched.
//!
//! Time: every decision takes `now` explicitly ([`tokio::time::Instant`]), so tests can drive it
//! with a paused clock. A TTL is a lower bound: an instance expires only once strictly more than
//! its TTL has passed since its last heartbeat. A restart gives every stored instance a fresh TTL.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use dashmap::DashMap;
use mesh_proto::{names, policy::HealthPolicy, prost::Message, v1};
use tokio::{sync::watch, time::Instant};

use crate::{
    metrics::Metrics,
    policy::Policies,
    store::{Store, StoreError},
};

/// Weight given to instances that register with weight 0.
pub const DEFAULT_WEIGHT: u32 = 100;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid instance: {0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Versions that increase monotonically, also across restarts: `epoch << 40 | counter`.
pub struct Revisions {
    base: u64,
    counter: AtomicU64,
}

impl Revisions {
    pub fn new(epoch: u64) -> Self {
        Self { base: epoch << 40, counter: AtomicU64::new(0) }
    }

    pub fn next(&self) -> u64 {
        self.base | (self.counter.fetch_add(1, Ordering::Relaxed) + 1)
    }

    pub fn current(&self) -> u64 {
        self.base | self.counter.load(Ordering::Relaxed)
    }

    /// With a shared store: versions follow etcd's revision, so they agree in order across
    /// replicas (a sidecar that moves to another replica never sees one go back by more than
    /// the few local changes made within one revision).
    pub fn advance(&self, revision: i64) {
        self.counter.fetch_max((revision.max(0) as u64) << 12, Ordering::Relaxed);
    }
}

/// A service's discovery view: its routable endpoints, shared with the instances they describe.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoints {
    pub service: String,
    pub version: u64,
    pub endpoints: Vec<Arc<v1::Endpoint>>,
}

impl Endpoints {
    pub fn to_wire(&self) -> v1::ServiceEndpoints {
        v1::ServiceEndpoints {
            service: self.service.clone(),
            version: self.version,
            endpoints: self.endpoints.iter().map(|e| (**e).clone()).collect(),
        }
    }
}

struct InstanceState {
    /// Everything registered but the service name; the discovery view shares it.
    endpoint: Arc<v1::Endpoint>,
    /// What the sidecar last reported of its app.
    app_healthy: bool,
    load: u32,
    last_heartbeat: Instant,
    expired_at: Option<Instant>,
    /// Past its TTL but kept by self-preservation.
    held: bool,
    /// Counts as a heartbeat for expiry: restored instances get `grace` for their sidecar to
    /// reconnect, on top of their TTL.
    not_before: Instant,
    /// With a shared store: the etcd revision of the record this state reflects (older watch
    /// events are ignored).
    stored_rev: i64,
    /// When it was last heard from (registered, or a heartbeat here or in another replica's
    /// batch); `None` while known only from the store.
    heard: Option<Instant>,
}

impl InstanceState {
    fn routable(&self) -> bool {
        self.app_healthy && self.expired_at.is_none()
    }

    fn health(&self) -> v1::HealthStatus {
        match (self.expired_at, self.app_healthy) {
            (Some(_), _) => v1::HealthStatus::Expired,
            (None, true) => v1::HealthStatus::Healthy,
            (None, false) => v1::HealthStatus::Unhealthy,
        }
    }

    fn view(&self, service: &str, now: Instant) -> v1::Instance {
        let e = &self.endpoint;
        v1::Instance {
            service: service.to_string(),
            id: e.instance_id.clone(),
            address: e.address.clone(),
            zone: e.zone.clone(),
            version: e.version.clone(),
            metadata: e.metadata.clone(),
            weight: e.weight,
            health: self.health().into(),
            load: self.load,
            last_heartbeat_age_ms: now.saturating_duration_since(self.last_heartbeat).as_millis() as u64,
        }
    }
}

#[derive(Default)]
struct ServiceState {
    instances: BTreeMap<String, InstanceState>,
    /// When instances of this service expired, within the self-preservation window.
    recent_expirations: VecDeque<Instant>,
}

struct Service {
    name: String,
    state: Mutex<ServiceState>,
    /// Serialises durable writes (register, deregister) of this service so disk and memory agree.
    writes: tokio::sync::Mutex<()>,
    endpoints: watch::Sender<Arc<Endpoints>>,
}

impl Service {
    /// A service with no instances and an empty discovery view at version 0.
    fn new(name: &str) -> Arc<Service> {
        let empty = Endpoints { service: name.to_string(), version: 0, endpoints: vec![] };
        Arc::new(Service {
            name: name.to_string(),
            state: Mutex::new(ServiceState::default()),
            writes: tokio::sync::Mutex::new(()),
            endpoints: watch::channel(Arc::new(empty)).0,
        })
    }

    fn lock(&self) -> MutexGuard<'_, ServiceState> {
        // A panic while holding the lock cannot leave the map half-updated in a way that matters
        // more than losing the registry, so recover the guard.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Recomputes the discovery view and publishes it if the routable set changed.
    fn publish(&self, state: &ServiceState, revisions: &Revisions) -> bool {
        let endpoints: Vec<Arc<v1::Endpoint>> =
            state.instances.values().filter(|i| i.routable()).map(|i| i.endpoint.clone()).collect();
        self.endpoints.send_if_modified(|cur| {
            if cur.endpoints == endpoints {
                return false;
            }
            *cur = Arc::new(Endpoints {
                service: self.name.clone(),
                version: revisions.next(),
                endpoints: endpoints.clone(),
            });
            true
        })
    }
}

/// What one sweep did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Instances that passed their TTL and left discovery.
    pub expired: Vec<(String, String)>,
    /// Instances past their TTL kept by self-preservation (newly held in this sweep).
    pub held: Vec<(String, String)>,
    /// Expired instances due for deregistration.
    pub due: Vec<(String, String)>,
}

pub struct Registry {
    services: DashMap<String, Arc<Service>>,
    /// The services with at least one instance (what the sweeper walks). Changed only under the
    /// service's `writes` lock, together with its instances.
    live: DashMap<String, Arc<Service>>,
    store: Store,
    policies: Arc<Policies>,
    revisions: Revisions,
    metrics: Arc<Metrics>,
    /// Added to every TTL before expiry: with a shared store, how late another replica's
    /// heartbeats may arrive (its flush interval).
    ttl_margin: Duration,
    /// With a shared store: instances this replica deleted, by the revision of the deletion,
    /// until the watch delivers that deletion (older records it delivers meanwhile are stale).
    tombstones: DashMap<(String, String), i64>,
    /// With a shared store: up to when each other replica's heartbeats are known (the stamp of
    /// its last batch).
    horizons: DashMap<String, Instant>,
}

impl Registry {
    /// Restores the stored instances, each with a fresh TTL starting at `now` plus `grace`, so
    /// that a control-plane restart expires no instance whose sidecar is still reconnecting
    /// (sidecars back off up to 10 s between attempts).
    pub fn new(
        store: Store,
        policies: Arc<Policies>,
        metrics: Arc<Metrics>,
        epoch: u64,
        stored: Vec<v1::Instance>,
        now: Instant,
        grace: Duration,
    ) -> Self {
        let ttl_margin = if store.cluster().is_some() { crate::etcd::TTL_MARGIN } else { Duration::ZERO };
        let reg = Self {
            services: DashMap::new(),
            live: DashMap::new(),
            store,
            policies,
            revisions: Revisions::new(epoch),
            metrics,
            ttl_margin,
            tombstones: DashMap::new(),
            horizons: DashMap::new(),
        };
        for info in stored {
            let svc = reg.service(&info.service);
            let mut st = svc.lock();
            let mut state = InstanceState::new(info, now);
            state.not_before = now + grace;
            state.heard = None;
            st.instances.insert(state.endpoint.instance_id.clone(), state);
            svc.publish(&st, &reg.revisions);
            reg.live.insert(svc.name.clone(), svc.clone());
        }
        reg
    }

    pub fn revisions(&self) -> &Revisions {
        &self.revisions
    }

    fn service(&self, name: &str) -> Arc<Service> {
        if let Some(s) = self.services.get(name) {
            return s.clone();
        }
        self.services.entry(name.to_string()).or_insert_with(|| Service::new(name)).clone()
    }

    /// Keeps `live` in step with `svc`'s instances (the caller holds `svc.writes`).
    fn track_live(&self, svc: &Arc<Service>, has_instances: bool) {
        if has_instances {
            self.live.entry(svc.name.clone()).or_insert_with(|| svc.clone());
        } else {
            self.live.remove(&svc.name);
        }
    }

    fn health_policy(&self, service: &str) -> HealthPolicy {
        self.policies.current(service).policy.health.clone()
    }

    /// The discovery view of `service`, now and as it changes. The receiver is taken under the
    /// map's lock, so [`Registry::release`] never drops an entry someone is subscribing to.
    pub fn watch(&self, service: &str) -> watch::Receiver<Arc<Endpoints>> {
        if let Some(s) = self.services.get(service) {
            return s.endpoints.subscribe();
        }
        self.services
            .entry(service.to_string())
            .or_insert_with(|| Service::new(service))
            .endpoints
            .subscribe()
    }

    /// Forgets `service` if nothing needs it any more: no instance, no watcher, nobody holding
    /// it. Called when a watcher lets go of it.
    pub fn release(&self, service: &str) {
        self.services.remove_if(service, |_, svc| {
            Arc::strong_count(svc) == 1
                && svc.endpoints.receiver_count() == 0
                && svc.lock().instances.is_empty()
        });
    }

    /// Services tracked (with instances, watched, or both): what watching costs in memory.
    pub fn tracked(&self) -> usize {
        self.services.len()
    }

    /// Registers or replaces an instance; durable before it returns.
    pub async fn register(
        &self,
        mut info: v1::Instance,
        now: Instant,
    ) -> Result<v1::RegisterResponse, RegistryError> {
        validate_instance(&info)?;
        info.health = 0;
        info.load = 0;
        info.last_heartbeat_age_ms = 0;
        let svc = self.service(&info.service);
        let _w = svc.writes.lock().await;
        let stored_rev = self.persist(&info).await?;
        let (view, version) = {
            let mut st = svc.lock();
            let mut state = InstanceState::new(info.clone(), now);
            state.stored_rev = stored_rev;
            let view = state.view(&info.service, now);
            st.instances.insert(info.id.clone(), state);
            svc.publish(&st, &self.revisions);
            (view, svc.endpoints.borrow().version)
        };
        self.track_live(&svc, true);
        self.metrics.registrations.inc();
        tracing::info!(service = %info.service, instance = %info.id, address = %info.address, "registered");
        let h = self.health_policy(&info.service);
        Ok(v1::RegisterResponse {
            instance: Some(view),
            version,
            heartbeat_interval_ms: h.heartbeat_interval.as_millis() as u64,
            ttl_ms: h.heartbeat_ttl.as_millis() as u64,
        })
    }

    /// Renews an instance's TTL and records its reported health and load.
    pub fn heartbeat(&self, hb: &v1::HeartbeatRequest, now: Instant) -> v1::HeartbeatResponse {
        self.metrics.heartbeats.inc();
        let known = match self.services.get(&hb.service).map(|s| s.clone()) {
            None => false,
            Some(svc) => {
                let mut st = svc.lock();
                match st.instances.get_mut(&hb.instance_id) {
                    None => false,
                    Some(i) => {
                        let app_healthy = hb.health() != v1::HealthStatus::Unhealthy;
                        let changed = i.app_healthy != app_healthy || i.expired_at.is_some();
                        if i.expired_at.is_some() {
                            tracing::info!(service = %hb.service, instance = %hb.instance_id, "expired instance heartbeats again: back in discovery");
                        }
                        i.last_heartbeat = now;
                        i.not_before = now;
                        i.heard = Some(now);
                        i.load = hb.load;
                        i.app_healthy = app_healthy;
                        i.expired_at = None;
                        i.held = false;
                        if let Some(c) = self.store.cluster() {
                            c.heard(&hb.service, &hb.instance_id);
                            if changed {
                                // Health changes reach the other replicas at once.
                                self.write_back(&hb.service, &hb.instance_id, i.record(&hb.service));
                            }
                        }
                        if changed {
                            svc.publish(&st, &self.revisions);
                        }
                        true
                    }
                }
            }
        };
        let h = self.health_policy(&hb.service);
        v1::HeartbeatResponse {
            known,
            heartbeat_interval_ms: h.heartbeat_interval.as_millis() as u64,
            ttl_ms: h.heartbeat_ttl.as_millis() as u64,
        }
    }

    /// Writes an instance's record to etcd in the background, if it is still there: how a
    /// change this replica saw reaches the others.
    fn write_back(&self, service: &str, id: &str, record: Vec<u8>) {
        let Some(c) = self.store.cluster() else { return };
        let (c, key) = (c.clone(), c.instance_key(service, id));
        mesh_runtime::spawn(tracing::debug_span!("health_write"), async move {
            if let Err(e) = c.etcd.put_if_exists(&key, record).await {
                tracing::warn!(error = %e, %key, "cannot write a health change to etcd");
            }
        });
    }

    /// Removes an instance at once; durable before it returns. `Ok(false)` if it was unknown.
    pub async fn deregister(&self, service: &str, id: &str) -> Result<bool, RegistryError> {
        let Some(svc) = self.services.get(service).map(|s| s.clone()) else { return Ok(false) };
        let _w = svc.writes.lock().await;
        if !svc.lock().instances.contains_key(id) {
            return Ok(false);
        }
        self.unpersist(service, id).await?;
        let empty = {
            let mut st = svc.lock();
            st.instances.remove(id);
            svc.publish(&st, &self.revisions);
            st.instances.is_empty()
        };
        if empty {
            self.track_live(&svc, false);
        }
        self.metrics.deregistrations.inc();
        tracing::info!(%service, instance = %id, "deregistered");
        drop(_w);
        drop(svc);
        self.release(service);
        Ok(true)
    }

    /// Expires instances past their TTL (within the self-preservation limit) and reports the
    /// expired instances due for deregistration.
    pub fn sweep(&self, now: Instant) -> Sweep {
        let mut out = Sweep::default();
        if self.store.cluster().is_some_and(|c| !c.is_sweeper()) {
            return out; // another replica decides
        }
        let horizon = self.horizon(now);
        let services: Vec<Arc<Service>> = self.live.iter().map(|e| e.value().clone()).collect();
        for svc in services {
            let h = self.health_policy(&svc.name);
            let mut st = svc.lock();
            if st.instances.is_empty() {
                continue; // its last instance left since `live` was read
            }
            let st = &mut *st;
            while st
                .recent_expirations
                .front()
                .is_some_and(|t| now.duration_since(*t) >= h.self_preservation_window)
            {
                st.recent_expirations.pop_front();
            }
            let mut budget = if h.self_preservation_percent == 0 {
                usize::MAX
            } else {
                let cap = (st.instances.len() * h.self_preservation_percent as usize / 100).max(1);
                cap.saturating_sub(st.recent_expirations.len())
            };
            // Oldest heartbeat first, so the longest-silent instances expire first.
            let mut overdue: Vec<(&String, &mut InstanceState)> = st
                .instances
                .iter_mut()
                .filter(|(_, i)| {
                    i.expired_at.is_none()
                        && !h.heartbeat_ttl.is_zero()
                        && horizon.saturating_duration_since(i.last_heartbeat.max(i.not_before))
                            > h.heartbeat_ttl + self.ttl_margin
                })
                .collect();
            overdue.sort_by_key(|(_, i)| i.last_heartbeat);
            let mut changed = false;
            for (id, i) in overdue {
                if budget > 0 {
                    budget -= 1;
                    i.expired_at = Some(now);
                    i.held = false;
                    st.recent_expirations.push_back(now);
                    changed = true;
                    out.expired.push((svc.name.clone(), id.clone()));
                } else if !i.held {
                    i.held = true;
                    out.held.push((svc.name.clone(), id.clone()));
                }
            }
            if !h.deregister_after.is_zero() {
                for (id, i) in &st.instances {
                    if i.expired_at.is_some_and(|t| now.duration_since(t) >= h.deregister_after) {
                        out.due.push((svc.name.clone(), id.clone()));
                    }
                }
            }
            if changed {
                svc.publish(st, &self.revisions);
            }
        }
        for (s, i) in &out.expired {
            tracing::warn!(service = %s, instance = %i, "no heartbeat within the TTL: instance expired and left discovery");
        }
        for (s, i) in &out.held {
            tracing::warn!(service = %s, instance = %i, "instance past its TTL kept by self-preservation (too many of the service's instances expired within the window)");
        }
        self.metrics.expirations.inc_by(out.expired.len() as u64);
        self.metrics.self_preservation_holds.inc_by(out.held.len() as u64);
        out
    }

    /// Sweeps, then deregisters (durably) the instances that have been expired long enough.
    pub async fn sweep_and_deregister(&self, now: Instant) -> Result<Sweep, RegistryError> {
        let sweep = self.sweep(now);
        if let Some(c) = self.store.cluster() {
            // The other replicas learn of each expiry from its record.
            for (service, id) in &sweep.expired {
                let Some(record) = self
                    .services
                    .get(service)
                    .and_then(|svc| svc.lock().instances.get(id).map(|i| i.record(service)))
                else {
                    continue;
                };
                let key = c.instance_key(service, id);
                if let Some(rev) = c.etcd.put_if_exists(&key, record).await.map_err(StoreError::from)? {
                    self.revisions.advance(rev);
                }
            }
        }
        for (service, id) in &sweep.due {
            let Some(svc) = self.services.get(service).map(|s| s.clone()) else { continue };
            let _w = svc.writes.lock().await;
            // It may have come back while we waited.
            if svc.lock().instances.get(id).is_none_or(|i| i.expired_at.is_none()) {
                continue;
            }
            self.unpersist(service, id).await?;
            let empty = {
                let mut st = svc.lock();
                st.instances.remove(id);
                st.instances.is_empty()
            };
            if empty {
                self.track_live(&svc, false);
            }
            self.metrics.deregistrations.inc();
            tracing::info!(%service, instance = %id, "expired instance deregistered");
            drop(_w);
            drop(svc);
            self.release(service);
        }
        Ok(sweep)
    }

    /// Makes a registration durable: the etcd revision it was written at (0 in the embedded
    /// store).
    async fn persist(&self, info: &v1::Instance) -> Result<i64, RegistryError> {
        let Some(c) = self.store.cluster() else {
            self.store.put_instance(info).await?;
            return Ok(0);
        };
        let record = v1::Instance { health: v1::HealthStatus::Healthy.into(), ..info.clone() };
        let key = c.instance_key(&info.service, &info.id);
        let rev = c.etcd.put(&key, record.encode_to_vec(), 0).await.map_err(StoreError::from)?;
        self.revisions.advance(rev);
        Ok(rev)
    }

    async fn unpersist(&self, service: &str, id: &str) -> Result<(), RegistryError> {
        let Some(c) = self.store.cluster() else {
            return Ok(self.store.delete_instance(service, id).await?);
        };
        let rev = c.etcd.delete(&c.instance_key(service, id)).await.map_err(StoreError::from)?;
        self.revisions.advance(rev);
        self.tombstones.insert((service.to_string(), id.to_string()), rev);
        Ok(())
    }

    /// Applies an instance record another replica wrote (or deleted: `None`) at `rev`; older
    /// than what this replica has is ignored. A new instance gets `grace` before it can expire.
    pub fn apply_stored(
        &self,
        service: &str,
        id: &str,
        record: Option<v1::Instance>,
        rev: i64,
        now: Instant,
        grace: Duration,
    ) {
        self.revisions.advance(rev);
        let key = (service.to_string(), id.to_string());
        if let Some(deleted) = self.tombstones.get(&key).map(|t| *t) {
            if rev <= deleted {
                if rev == deleted && record.is_none() {
                    self.tombstones.remove(&key); // every older event came before it
                }
                return;
            }
            self.tombstones.remove(&key);
        }
        let ttl = self.health_policy(service).heartbeat_ttl;
        let svc = self.service(service);
        let mut write_back = None;
        let empty = {
            let mut st = svc.lock();
            if st.instances.get(id).is_some_and(|i| i.stored_rev >= rev) {
                return;
            }
            match record {
                Some(info) => {
                    let health = info.health();
                    let fresh = InstanceState::new(info, now);
                    let i = st.instances.entry(id.to_string()).or_insert_with(|| InstanceState {
                        not_before: now + grace,
                        heard: None,
                        ..InstanceState::new(v1::Instance::default(), now)
                    });
                    i.endpoint = fresh.endpoint;
                    i.stored_rev = rev;
                    i.app_healthy = health != v1::HealthStatus::Unhealthy;
                    let heard_since = i
                        .heard
                        .is_some_and(|t| i.expired_at.is_none() && now.saturating_duration_since(t) <= ttl);
                    if health == v1::HealthStatus::Expired && heard_since {
                        // Expired by what the sweeper knew, but heard within its TTL since (the
                        // sweeper's own write arriving after a heartbeat brought it back, or
                        // another replica's heartbeat it had not folded in yet): it stays, and
                        // its record is written back so every replica sees it alive.
                        write_back = Some(i.record(service));
                    } else if health == v1::HealthStatus::Expired {
                        i.expired_at.get_or_insert(now);
                    } else {
                        if i.expired_at.is_some() {
                            i.last_heartbeat = now; // back: heard by another replica
                        }
                        i.expired_at = None;
                        i.held = false;
                    }
                }
                None => {
                    if st.instances.remove(id).is_none() {
                        return;
                    }
                }
            }
            svc.publish(&st, &self.revisions);
            st.instances.is_empty()
        };
        if let Some(record) = write_back {
            self.write_back(service, id, record);
        }
        self.track_live(&svc, !empty);
        if empty {
            drop(svc);
            self.release(service);
        }
    }

    /// After reading every stored instance at `rev`: forgets those the store no longer has.
    pub fn retain_stored(&self, kept: &std::collections::HashSet<(String, String)>, rev: i64, now: Instant) {
        let gone: Vec<(String, String)> = self
            .live
            .iter()
            .flat_map(|e| {
                let st = e.value().lock();
                st.instances
                    .iter()
                    .filter(|(id, i)| i.stored_rev < rev && !kept.contains(&(e.key().clone(), (*id).clone())))
                    .map(|(id, _)| (e.key().clone(), id.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        for (service, id) in gone {
            self.apply_stored(&service, &id, None, rev, now, Duration::ZERO);
        }
    }

    /// Folds in the heartbeats `replica` heard, and notes that its heartbeats are known up to
    /// the batch's stamp.
    pub fn apply_heartbeats(&self, replica: &str, batch: &crate::etcd::Batch, now: Instant, now_ms: u64) {
        let instant =
            |ms: u64| now.checked_sub(Duration::from_millis(now_ms.saturating_sub(ms))).unwrap_or(now);
        for (key, at_ms) in &batch.heard {
            let Some((service, id)) = key.split_once('/') else { continue };
            let Some(svc) = self.services.get(service).map(|s| s.clone()) else { continue };
            let at = instant(*at_ms);
            let mut st = svc.lock();
            if let Some(i) = st.instances.get_mut(id)
                && at > i.last_heartbeat
            {
                i.last_heartbeat = at;
                i.heard = Some(at);
                i.not_before = at; // heard: a restart's grace is over, as with a local heartbeat
            }
        }
        self.horizons.insert(replica.to_string(), instant(batch.at));
    }

    /// `replica` is gone (its lease expired or it stopped): its stamp no longer holds expiry back.
    pub fn forget_replica(&self, replica: &str) {
        self.horizons.remove(replica);
    }

    /// Up to when every live replica's heartbeats are known: `now` with one control plane; with
    /// a shared store, the oldest stamp among the other replicas' batches. A replica counts until
    /// its batch leaves etcd with its lease — which etcd decides only with a quorum, so a replica
    /// that merely cannot write holds expiry back rather than have its sidecars expire.
    fn horizon(&self, now: Instant) -> Instant {
        let Some(c) = self.store.cluster() else { return now };
        self.horizons.iter().filter(|e| *e.key() != c.replica).map(|e| *e.value()).fold(now, Instant::min)
    }

    pub fn get_service(&self, name: &str, now: Instant) -> Option<v1::GetServiceResponse> {
        let svc = self.services.get(name)?.clone();
        let st = svc.lock();
        if st.instances.is_empty() {
            return None;
        }
        Some(v1::GetServiceResponse {
            name: name.to_string(),
            instances: st.instances.values().map(|i| i.view(name, now)).collect(),
            version: svc.endpoints.borrow().version,
        })
    }

    /// Services with at least one instance or an explicit policy, sorted by name.
    pub fn list_services(&self) -> Vec<v1::ServiceSummary> {
        let mut out: BTreeMap<String, v1::ServiceSummary> = BTreeMap::new();
        for e in self.live.iter() {
            let st = e.value().lock();
            if st.instances.is_empty() {
                continue;
            }
            out.insert(
                e.key().clone(),
                v1::ServiceSummary {
                    name: e.key().clone(),
                    instances: st.instances.len() as u32,
                    healthy: st.instances.values().filter(|i| i.routable()).count() as u32,
                    policy_version: 0,
                },
            );
        }
        for p in self.policies.list() {
            out.entry(p.service.clone())
                .or_insert_with(|| v1::ServiceSummary { name: p.service.clone(), ..Default::default() });
        }
        for s in out.values_mut() {
            s.policy_version = self.policies.current(&s.name).version;
        }
        out.into_values().collect()
    }

    /// (services with instances, instances, routable instances).
    pub fn counts(&self) -> (usize, usize, usize) {
        let (mut services, mut instances, mut healthy) = (0, 0, 0);
        for e in self.live.iter() {
            let st = e.value().lock();
            if !st.instances.is_empty() {
                services += 1;
                instances += st.instances.len();
                healthy += st.instances.values().filter(|i| i.routable()).count();
            }
        }
        (services, instances, healthy)
    }

    /// Time since the last heartbeat of one instance, if registered.
    pub fn heartbeat_age(&self, service: &str, id: &str, now: Instant) -> Option<Duration> {
        let svc = self.services.get(service)?.clone();
        let st = svc.lock();
        st.instances.get(id).map(|i| now.saturating_duration_since(i.last_heartbeat))
    }
}

impl InstanceState {
    /// The record a shared store keeps: the registration and the health all replicas must agree on.
    fn record(&self, service: &str) -> Vec<u8> {
        v1::Instance { load: 0, ..self.view(service, self.last_heartbeat) }.encode_to_vec()
    }

    fn new(info: v1::Instance, now: Instant) -> Self {
        let endpoint = Arc::new(v1::Endpoint {
            instance_id: info.id,
            address: info.address,
            zone: info.zone,
            version: info.version,
            metadata: info.metadata,
            weight: if info.weight == 0 { DEFAULT_WEIGHT } else { info.weight },
        });
        Self {
            endpoint,
            app_healthy: true,
            load: 0,
            last_heartbeat: now,
            expired_at: None,
            held: false,
            not_before: now,
            stored_rev: 0,
            heard: Some(now),
        }
    }
}

fn validate_instance(i: &v1::Instance) -> Result<(), RegistryError> {
    let bad = |m: String| Err(RegistryError::Invalid(m));
    if !names::is_service_name(&i.service) {
        return bad(format!("service {:?}: must be {}", i.service, names::SERVICE_NAME_RULE));
    }
    if !names::is_instance_id(&i.id) {
        return bad(format!("id {:?}: must be {}", i.id, names::INSTANCE_ID_RULE));
    }
    if !names::is_host_port(&i.address) {
        return bad(format!("address {:?}: must be host:port with a port in 1..=65535", i.address));
    }
    if i.zone.len() > 128 || i.version.len() > 128 {
        return bad("zone and version: at most 128 characters each".into());
    }
    if i.metadata.len() > 64
        || i.metadata.iter().any(|(k, v)| k.is_empty() || k.len() > 128 || v.len() > 1024)
    {
        return bad("metadata: at most 64 entries, keys 1..=128 and values up to 1024 characters".into());
    }
    if i.weight > 1_000_000 {
        return bad(format!("weight {}: must be 0..=1000000", i.weight));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
