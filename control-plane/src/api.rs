//! The gRPC services of `mesh.v1`: thin handlers that validate, call the registry or policy
//! store, and convert errors into a `Status` that names the problem.
//!
//! Long-lived streams (heartbeat, discovery watch, policy) end when the server shuts down, so a
//! graceful shutdown never waits on them.

use std::{collections::HashSet, pin::Pin, sync::Arc, time::Duration};

use futures::{FutureExt, Stream, StreamExt, stream};
use mesh_proto::{names, policy::ServicePolicy, v1};
use prometheus_client::metrics::gauge::Gauge;
use tokio::time::{Instant, Sleep};
use tokio_stream::{StreamMap, wrappers::WatchStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    auth::Caller,
    metrics::Metrics,
    policy::{Policies, PolicyEntry, PolicyError},
    proxies::{Proxies, ProxyHandle},
    registry::{Endpoints, Registry, RegistryError},
};

/// Events a replay returns when the request names no limit.
pub const DEFAULT_REPLAY_LIMIT: u32 = 1000;

/// Most services one discovery watch or policy stream may follow.
pub const MAX_WATCHED_SERVICES: usize = 256;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Everything the handlers share.
pub struct State {
    /// Who may call what.
    pub auth: crate::auth::Auth,
    pub registry: Registry,
    pub bus: crate::bus::Bus,
    pub ca: crate::ca::Ca,
    pub store: crate::store::Store,
    pub policies: Arc<Policies>,
    pub metrics: Arc<Metrics>,
    pub proxies: Proxies,
    /// What each caller watches, bounded (see [`crate::watch_limits`]).
    pub watch_limits: Arc<crate::watch_limits::WatchLimits>,
    pub started: Instant,
    pub data_dir: String,
    pub ping_interval: Duration,
    pub shutdown: CancellationToken,
}

/// All four services over one shared state.
#[derive(Clone)]
pub struct Api(pub Arc<State>);

/// Authorization (see [`crate::auth`]), counting what it refuses.
impl Api {
    fn refused(&self, s: Status) -> Status {
        refused(&self.0, s)
    }

    fn admin<T>(&self, req: &Request<T>, what: &str) -> Result<(), Status> {
        self.0.auth.admin(req, what).map_err(|s| self.refused(s))
    }

    fn member<T>(&self, req: &Request<T>, what: &str) -> Result<Caller, Status> {
        self.0.auth.member(req, what).map_err(|s| self.refused(s))
    }

    fn as_service<T>(&self, req: &Request<T>, service: &str, what: &str) -> Result<Caller, Status> {
        self.0.auth.as_service(req, service, what).map_err(|s| self.refused(s))
    }
}

pub(crate) fn refused(state: &State, s: Status) -> Status {
    let code = match s.code() {
        tonic::Code::Unauthenticated => "unauthenticated",
        _ => "permission_denied",
    };
    state.metrics.api_refused.get_or_create(&[("code", code)]).inc();
    tracing::info!(code, reason = %s.message(), "API call refused");
    s
}

impl From<RegistryError> for Status {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Invalid(m) => Status::invalid_argument(m),
            RegistryError::Store(e) => store_status(e),
        }
    }
}

impl From<PolicyError> for Status {
    fn from(e: PolicyError) -> Self {
        match e {
            PolicyError::BadService(_) => Status::invalid_argument(e.to_string()),
            PolicyError::VersionMismatch { .. } => Status::failed_precondition(e.to_string()),
            PolicyError::Store(e) => store_status(e),
        }
    }
}

fn store_status(e: crate::store::StoreError) -> Status {
    tracing::error!(error = %e, "storage write failed");
    Status::unavailable(format!("{e}; nothing was changed, retry later"))
}

/// Decrements a gauge when the stream holding it is dropped.
struct GaugeGuard(Gauge);

impl GaugeGuard {
    fn new(g: &Gauge) -> Self {
        g.inc();
        Self(g.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn check_services(list: &[String]) -> Result<Vec<String>, Status> {
    if list.is_empty() || list.len() > MAX_WATCHED_SERVICES {
        return Err(Status::invalid_argument(format!(
            "services: name 1..={MAX_WATCHED_SERVICES} services, got {}",
            list.len()
        )));
    }
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(list.len());
    for s in list {
        if !names::is_service_name(s) {
            return Err(Status::invalid_argument(format!(
                "services: {s:?} must be {}",
                names::SERVICE_NAME_RULE
            )));
        }
        if seen.insert(s.as_str()) {
            out.push(s.clone());
        }
    }
    Ok(out)
}

// ---- Registry ------------------------------------------------------------------------------

#[tonic::async_trait]
impl v1::registry_server::Registry for Api {
    async fn register(
        &self,
        req: Request<v1::RegisterRequest>,
    ) -> Result<Response<v1::RegisterResponse>, Status> {
        let service = req.get_ref().instance.as_ref().map(|i| i.service.clone());
        let service = service.ok_or_else(|| Status::invalid_argument("instance: required"))?;
        self.as_service(&req, &service, "register an instance")?;
        let inst = req.into_inner().instance.ok_or_else(|| Status::invalid_argument("instance: required"))?;
        Ok(Response::new(self.0.registry.register(inst, Instant::now()).await?))
    }

    type HeartbeatStream = BoxStream<v1::HeartbeatResponse>;

    async fn heartbeat(
        &self,
        req: Request<Streaming<v1::HeartbeatRequest>>,
    ) -> Result<Response<Self::HeartbeatStream>, Status> {
        let caller = self.member(&req, "send heartbeats")?;
        let state = self.0.clone();
        let guard = GaugeGuard::new(&state.metrics.heartbeat_streams);
        let out = req.into_inner().take_until(state.shutdown.clone().cancelled_owned()).map(move |msg| {
            let _open = &guard;
            let hb = msg?;
            caller.may_act_as(&hb.service, "heartbeat").map_err(|s| refused(&state, s))?;
            Ok(state.registry.heartbeat(&hb, Instant::now()))
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn deregister(
        &self,
        req: Request<v1::DeregisterRequest>,
    ) -> Result<Response<v1::DeregisterResponse>, Status> {
        self.as_service(&req, &req.get_ref().service, "deregister an instance")?;
        let r = req.into_inner();
        let existed = self.0.registry.deregister(&r.service, &r.instance_id).await?;
        let version = self.0.registry.watch(&r.service).borrow().version;
        Ok(Response::new(v1::DeregisterResponse { existed, version }))
    }

    async fn list_services(
        &self,
        req: Request<v1::ListServicesRequest>,
    ) -> Result<Response<v1::ListServicesResponse>, Status> {
        self.member(&req, "list services")?;
        Ok(Response::new(v1::ListServicesResponse { services: self.0.registry.list_services() }))
    }

    async fn get_service(
        &self,
        req: Request<v1::GetServiceRequest>,
    ) -> Result<Response<v1::GetServiceResponse>, Status> {
        self.member(&req, "read the registry")?;
        let name = req.into_inner().name;
        self.0
            .registry
            .get_service(&name, Instant::now())
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("service {name:?} has no registered instances")))
    }
}

// ---- Discovery -----------------------------------------------------------------------------

struct WatchState {
    updates: StreamMap<String, WatchStream<Arc<Endpoints>>>,
    ping: Pin<Box<Sleep>>,
    ping_interval: Duration,
    version: u64,
    state: Arc<State>,
    _lease: crate::watch_limits::Lease,
    _open: GaugeGuard,
}

/// A watch that ends lets go of its names: entries nobody else needs are forgotten.
impl Drop for WatchState {
    fn drop(&mut self) {
        let registry = &self.state.registry;
        release_all(&mut self.updates, |name| registry.release(name));
    }
}

/// Drops every receiver in `updates` first (so they no longer count as watchers), then hands
/// each name to `release`.
fn release_all<T>(updates: &mut StreamMap<String, T>, release: impl Fn(&str)) {
    let names: Vec<String> = updates.keys().cloned().collect();
    *updates = StreamMap::new();
    for name in names {
        release(&name);
    }
}

impl WatchState {
    async fn next(mut self) -> Option<(Result<v1::WatchResponse, Status>, Self)> {
        use v1::watch_response::Kind;
        let msg = tokio::select! {
            _ = self.state.shutdown.cancelled() => return None,
            Some((_, first)) = self.updates.next() => {
                // Coalesce whatever else is ready into the same message.
                let mut services = vec![first.to_wire()];
                while let Some(Some((_, more))) = self.updates.next().now_or_never() {
                    services.push(more.to_wire());
                }
                self.version = services.iter().map(|s| s.version).fold(self.version, u64::max);
                v1::WatchResponse { kind: Kind::Update.into(), version: self.version, services }
            }
            _ = &mut self.ping => v1::WatchResponse { kind: Kind::Ping.into(), version: self.version, services: vec![] },
        };
        self.ping.as_mut().reset(Instant::now() + self.ping_interval);
        self.state.metrics.discovery_messages.inc();
        Some((Ok(msg), self))
    }
}

#[tonic::async_trait]
impl v1::discovery_server::Discovery for Api {
    type WatchStream = BoxStream<v1::WatchResponse>;

    async fn watch(&self, req: Request<v1::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let caller = self.member(&req, "watch endpoints")?;
        let req = req.into_inner();
        let services = check_services(&req.services)?;
        let s = &self.0;
        let lease = s.watch_limits.acquire(&caller.to_string(), &services)?;
        let mut updates = StreamMap::with_capacity(services.len());
        let mut snapshot = Vec::with_capacity(services.len());
        for name in services {
            let mut rx = s.registry.watch(&name);
            snapshot.push(rx.borrow_and_update().to_wire());
            updates.insert(name, WatchStream::from_changes(rx));
        }
        let version = snapshot.iter().map(|e| e.version).max().unwrap_or(0);
        tracing::debug!(node = %req.node_id, services = snapshot.len(), "discovery watch opened");
        let first = v1::WatchResponse {
            kind: v1::watch_response::Kind::Snapshot.into(),
            version,
            services: snapshot,
        };
        s.metrics.discovery_messages.inc();
        let state = WatchState {
            updates,
            ping: Box::pin(tokio::time::sleep(s.ping_interval)),
            ping_interval: s.ping_interval,
            version,
            state: s.clone(),
            _lease: lease,
            _open: GaugeGuard::new(&s.metrics.discovery_streams),
        };
        let out = stream::once(async move { Ok(first) }).chain(stream::unfold(state, WatchState::next));
        Ok(Response::new(Box::pin(out)))
    }
}

// ---- Policy --------------------------------------------------------------------------------

struct PolicySession {
    caller: Caller,
    inbound: Streaming<v1::PolicyStreamRequest>,
    updates: StreamMap<String, WatchStream<Arc<PolicyEntry>>>,
    queue: std::collections::VecDeque<v1::PolicyPush>,
    proxy: ProxyHandle,
    seq: u64,
    subscribed: bool,
    state: Arc<State>,
    lease: Option<crate::watch_limits::Lease>,
    _open: GaugeGuard,
}

/// A policy stream that ends lets go of its names, as a discovery watch does.
impl Drop for PolicySession {
    fn drop(&mut self) {
        let policies = &self.state.policies;
        release_all(&mut self.updates, |name| policies.release(name));
    }
}

impl PolicySession {
    fn push(&mut self, entry: &PolicyEntry) {
        self.seq += 1;
        let nonce = format!("{}-{}", self.proxy.id(), self.seq);
        self.proxy.with(|p| {
            let s = p.policies.entry(entry.service.clone()).or_default();
            s.pushed_version = entry.version;
            s.pushed_nonce = nonce.clone();
            s.pushed_at = Some(Instant::now());
        });
        self.state.metrics.policy_pushes.inc();
        self.queue.push_back(v1::PolicyPush {
            service: entry.service.clone(),
            version: entry.version,
            nonce,
            policy: Some(entry.policy.as_ref().into()),
            is_default: entry.is_default,
        });
    }

    fn subscribe(&mut self, sub: v1::PolicySubscribe) -> Result<(), Status> {
        let wanted = check_services(&sub.services)?;
        if !sub.service.is_empty() {
            self.caller
                .may_act_as(&sub.service, "subscribe to policies")
                .map_err(|s| refused(&self.state, s))?;
        }
        if !sub.service.is_empty() && !names::is_service_name(&sub.service) {
            return Err(Status::invalid_argument(format!(
                "service: {:?} must be {}",
                sub.service,
                names::SERVICE_NAME_RULE
            )));
        }
        match &mut self.lease {
            Some(lease) => lease.replace(&wanted)?,
            None => self.lease = Some(self.state.watch_limits.acquire(&self.caller.to_string(), &wanted)?),
        }
        self.proxy.with(|p| {
            p.node_id = sub.node_id.clone();
            p.service = sub.service.clone();
            p.policies.retain(|k, _| wanted.contains(k));
        });
        let stale: Vec<String> = self.updates.keys().filter(|k| !wanted.contains(k)).cloned().collect();
        for k in stale {
            self.updates.remove(&k);
            self.state.policies.release(&k);
        }
        for name in wanted {
            if self.updates.contains_key(&name) {
                continue;
            }
            let mut rx = self.state.policies.watch(&name);
            let entry = rx.borrow_and_update().clone();
            self.push(&entry);
            self.updates.insert(name, WatchStream::from_changes(rx));
        }
        self.subscribed = true;
        Ok(())
    }

    fn ack(&mut self, service: &str, version: u64, nonce: &str, nack_reason: Option<String>) {
        let now = Instant::now();
        let latency = self.proxy.with(|p| {
            let s = p.policies.get_mut(service)?;
            let latency = (s.pushed_nonce == nonce).then(|| s.pushed_at.map(|t| now - t)).flatten();
            match &nack_reason {
                None => s.acked_version = s.acked_version.max(version),
                Some(reason) => {
                    s.nacked_version = version;
                    s.nack_reason = reason.clone();
                }
            }
            if let Some(l) = latency {
                s.last_ack_latency_ms = l.as_secs_f64() * 1000.0;
            }
            latency
        });
        if let Some(l) = latency {
            self.state.metrics.observe_ack_latency(l);
        }
        match nack_reason {
            None => self.state.metrics.policy_acks.inc(),
            Some(reason) => {
                tracing::warn!(%service, version, node = %self.proxy.with(|p| p.node_id.clone()), %reason, "proxy refused a policy push (NACK); it keeps its previous policy");
                self.state.metrics.policy_nacks.inc()
            }
        };
    }

    fn handle(&mut self, req: v1::PolicyStreamRequest) -> Result<(), Status> {
        use v1::policy_stream_request::Kind;
        match req.kind {
            Some(Kind::Subscribe(s)) => self.subscribe(s),
            Some(_) if !self.subscribed => {
                Err(Status::failed_precondition("send subscribe before ack or nack"))
            }
            Some(Kind::Ack(a)) => {
                self.ack(&a.service, a.version, &a.nonce, None);
                Ok(())
            }
            Some(Kind::Nack(n)) => {
                self.ack(&n.service, n.version, &n.nonce, Some(n.reason));
                Ok(())
            }
            None => Err(Status::invalid_argument("kind: one of subscribe, ack or nack is required")),
        }
    }

    async fn next(mut self) -> Option<(Result<v1::PolicyPush, Status>, Self)> {
        loop {
            if let Some(push) = self.queue.pop_front() {
                return Some((Ok(push), self));
            }
            tokio::select! {
                _ = self.state.shutdown.cancelled() => return None,
                msg = self.inbound.next() => match msg {
                    None | Some(Err(_)) => return None,
                    Some(Ok(req)) => if let Err(status) = self.handle(req) {
                        return Some((Err(status), self));
                    },
                },
                Some((_, entry)) = self.updates.next(), if !self.updates.is_empty() => self.push(&entry),
            }
        }
    }
}

#[tonic::async_trait]
impl v1::policy_server::Policy for Api {
    async fn get(&self, req: Request<v1::GetPolicyRequest>) -> Result<Response<v1::VersionedPolicy>, Status> {
        self.member(&req, "read a policy")?;
        let service = req.into_inner().service;
        names::check_service(&service).map_err(PolicyError::BadService)?;
        Ok(Response::new(self.0.policies.current(&service).to_wire()))
    }

    async fn set(
        &self,
        req: Request<v1::SetPolicyRequest>,
    ) -> Result<Response<v1::SetPolicyResponse>, Status> {
        self.admin(&req, "set a policy")?;
        let r = req.into_inner();
        let policy = ServicePolicy::try_from(r.policy.unwrap_or_default())
            .map_err(|e| Status::invalid_argument(format!("invalid policy for {}: {e}", r.service)))?;
        let out = self.0.policies.set(&r.service, policy, r.expected_version, r.dry_run).await?;
        Ok(Response::new(v1::SetPolicyResponse {
            policy: Some(out.entry.to_wire()),
            changes: out.changes,
            applied: out.applied,
        }))
    }

    async fn delete(
        &self,
        req: Request<v1::DeletePolicyRequest>,
    ) -> Result<Response<v1::DeletePolicyResponse>, Status> {
        self.admin(&req, "delete a policy")?;
        let service = req.into_inner().service;
        let deleted = self.0.policies.delete(&service).await?;
        let version = deleted.unwrap_or_else(|| self.0.policies.current(&service).version);
        Ok(Response::new(v1::DeletePolicyResponse { existed: deleted.is_some(), version }))
    }

    async fn list(
        &self,
        req: Request<v1::ListPoliciesRequest>,
    ) -> Result<Response<v1::ListPoliciesResponse>, Status> {
        self.member(&req, "list policies")?;
        let policies = self.0.policies.list().iter().map(|p| p.to_wire()).collect();
        Ok(Response::new(v1::ListPoliciesResponse { policies }))
    }

    type StreamStream = BoxStream<v1::PolicyPush>;

    async fn stream(
        &self,
        req: Request<Streaming<v1::PolicyStreamRequest>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let caller = self.member(&req, "stream policies")?;
        let peer = crate::auth::remote_addr(&req).map(|a| a.to_string()).unwrap_or_default();
        let state = self.0.clone();
        let session = PolicySession {
            caller,
            inbound: req.into_inner(),
            updates: StreamMap::new(),
            queue: Default::default(),
            proxy: state.proxies.connect(peer, Instant::now()),
            seq: 0,
            subscribed: false,
            lease: None,
            _open: GaugeGuard::new(&state.metrics.policy_streams),
            state,
        };
        Ok(Response::new(Box::pin(stream::unfold(session, PolicySession::next))))
    }
}

// ---- Admin ---------------------------------------------------------------------------------

#[tonic::async_trait]
impl v1::admin_server::Admin for Api {
    async fn overview(
        &self,
        req: Request<v1::OverviewRequest>,
    ) -> Result<Response<v1::OverviewResponse>, Status> {
        self.admin(&req, "read the overview")?;
        let s = &self.0;
        let (services, instances, healthy) = s.registry.counts();
        Ok(Response::new(v1::OverviewResponse {
            server_version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_ms: s.started.elapsed().as_millis() as u64,
            services: services as u32,
            instances: instances as u32,
            healthy_instances: healthy as u32,
            policies: s.policies.list().len() as u32,
            discovery_streams: s.metrics.discovery_streams.get() as u32,
            policy_streams: s.metrics.policy_streams.get() as u32,
            heartbeat_streams: s.metrics.heartbeat_streams.get() as u32,
            registry_version: s.registry.revisions().current(),
            data_dir: s.data_dir.clone(),
        }))
    }

    async fn stats(&self, req: Request<v1::StatsRequest>) -> Result<Response<v1::StatsResponse>, Status> {
        self.admin(&req, "read statistics")?;
        let m = &self.0.metrics;
        let (p50, p99, max) = m.ack_latency_summary_ms();
        Ok(Response::new(v1::StatsResponse {
            registrations_total: m.registrations.get(),
            deregistrations_total: m.deregistrations.get(),
            heartbeats_total: m.heartbeats.get(),
            expirations_total: m.expirations.get(),
            self_preservation_holds_total: m.self_preservation_holds.get(),
            discovery_messages_total: m.discovery_messages.get(),
            policy_pushes_total: m.policy_pushes.get(),
            policy_acks_total: m.policy_acks.get(),
            policy_nacks_total: m.policy_nacks.get(),
            ack_latency_p50_ms: p50,
            ack_latency_p99_ms: p99,
            ack_latency_max_ms: max,
        }))
    }

    async fn proxy_status(
        &self,
        req: Request<v1::ProxyStatusRequest>,
    ) -> Result<Response<v1::ProxyStatusResponse>, Status> {
        self.admin(&req, "read proxy status")?;
        let filter = req.into_inner().service;
        let s = &self.0;
        let now = Instant::now();
        let proxies = s
            .proxies
            .snapshot()
            .into_iter()
            .filter(|p| filter.is_empty() || p.service == filter)
            .map(|p| {
                let cert = s.proxies.cert(&p.node_id).unwrap_or_default();
                v1::ProxyStatus {
                    spiffe_id: cert.spiffe_id,
                    certificate_expires_unix_ms: cert.expires_unix_ms,
                    certificates_issued: cert.issued,
                    last_heartbeat_age_ms: s
                        .registry
                        .heartbeat_age(&p.service, &p.node_id, now)
                        .map(|d| d.as_millis() as u64),
                    connected_ms: now.saturating_duration_since(p.connected_at).as_millis() as u64,
                    policies: p
                        .policies
                        .iter()
                        .map(|(svc, st)| v1::PolicySyncStatus {
                            service: svc.clone(),
                            current_version: s.policies.current(svc).version,
                            acked_version: st.acked_version,
                            nacked_version: st.nacked_version,
                            nack_reason: st.nack_reason.clone(),
                            last_ack_latency_ms: st.last_ack_latency_ms,
                        })
                        .collect(),
                    node_id: p.node_id,
                    service: p.service,
                    peer: p.peer,
                }
            })
            .collect();
        Ok(Response::new(v1::ProxyStatusResponse { proxies }))
    }
}

// ---- Events (the embedded bus) ---------------------------------------------------------------

impl From<crate::bus::BusError> for Status {
    fn from(e: crate::bus::BusError) -> Self {
        match e {
            crate::bus::BusError::Invalid { .. } => Status::invalid_argument(e.to_string()),
            crate::bus::BusError::Store(e) => store_status(e),
            crate::bus::BusError::Nats(_) => Status::unavailable(e.to_string()),
        }
    }
}

fn check_topic(topic: &str) -> Result<(), Status> {
    if names::is_topic(topic) {
        return Ok(());
    }
    Err(Status::invalid_argument(format!("topic {topic:?}: {}", names::TOPIC_RULE)))
}

struct Subscription {
    inbound: Streaming<v1::SubscribeRequest>,
    topic: Option<(String, String)>,
    next: u64,
    head: Option<tokio::sync::watch::Receiver<u64>>,
    buffer: std::collections::VecDeque<v1::Delivery>,
    /// The group's committer (which holds the group's lease until it has stored the last
    /// commit).
    commits: Option<tokio::sync::watch::Sender<Option<u64>>>,
    state: Arc<State>,
}

/// Stores a group's latest committed offset in the background, coalescing commits that arrive
/// faster than the store's fsync (so commits never slow deliveries down); when the subscriber
/// leaves it stores the last one and only then releases the group's lease, so the next reader
/// of the group resumes after it.
fn spawn_committer(
    state: Arc<State>,
    topic: String,
    group: String,
    lease: tokio::sync::OwnedMutexGuard<()>,
) -> tokio::sync::watch::Sender<Option<u64>> {
    let (tx, mut rx) = tokio::sync::watch::channel(None::<u64>);
    mesh_runtime::spawn(tracing::info_span!("event_committer", %topic, %group), async move {
        let _lease = lease;
        let mut stored = None;
        loop {
            let left = rx.changed().await.is_err();
            let latest = *rx.borrow_and_update();
            if let Some(offset) = latest
                && Some(offset) != stored
            {
                match state.bus.commit(&topic, &group, offset).await {
                    Ok(()) => stored = Some(offset),
                    Err(e) => {
                        tracing::warn!(%topic, %group, offset, error = %e, "storing a commit failed; the group will see those events again")
                    }
                }
            }
            if left {
                return;
            }
        }
    });
    tx
}

impl Subscription {
    /// Handles a start: waits for the group's lease, then positions the reader.
    async fn start(&mut self, s: v1::SubscribeStart) -> Result<(), Status> {
        check_topic(&s.topic)?;
        if !s.group.is_empty() && !names::is_topic(&s.group) {
            return Err(Status::invalid_argument(format!("group {:?}: {}", s.group, names::TOPIC_RULE)));
        }
        let bus = &self.state.bus;
        // A previous start's committer stores its last commit and releases its lease.
        self.commits = None;
        if !s.group.is_empty() {
            let lease = bus.lease(&s.topic, &s.group).await;
            self.commits = Some(spawn_committer(self.state.clone(), s.topic.clone(), s.group.clone(), lease));
        }
        let head = bus.watch(&s.topic).await?;
        let committed = if s.group.is_empty() { None } else { bus.committed(&s.topic, &s.group).await? };
        self.next = match (s.from_offset, s.from_time_unix_ms, committed) {
            (Some(o), _, _) => o,
            (None, Some(t), _) => bus.offset_at(&s.topic, t).await?,
            (None, None, Some(c)) => c,
            (None, None, None) if s.from_end => *head.borrow(),
            (None, None, None) => 0,
        };
        self.buffer.clear();
        self.head = Some(head);
        self.topic = Some((s.topic, s.group));
        Ok(())
    }

    /// Handles one message from the subscriber (a commit, or a start that re-positions).
    async fn handle(&mut self, msg: v1::SubscribeRequest) -> Result<(), Status> {
        use v1::subscribe_request::Kind;
        match msg.kind {
            Some(Kind::Start(s)) => self.start(s).await,
            Some(Kind::Commit(c)) => {
                if self.topic.is_none() {
                    return Err(Status::failed_precondition("send start before commit"));
                }
                let Some(commits) = &self.commits else {
                    return Err(Status::failed_precondition("commit needs a group in start"));
                };
                commits.send_replace(Some(c.offset));
                Ok(())
            }
            None => Err(Status::invalid_argument("kind: start or commit is required")),
        }
    }

    async fn next(mut self) -> Option<(Result<v1::Delivery, Status>, Self)> {
        loop {
            // Commits are read while deliveries flow, not only once caught up: unread, they
            // back up the subscriber's request stream until the stream fails, and the group
            // would then resume far behind (redelivering everything since).
            while let Some(msg) = self.inbound.next().now_or_never() {
                match msg {
                    None | Some(Err(_)) => return None,
                    Some(Ok(m)) => {
                        if let Err(e) = self.handle(m).await {
                            return Some((Err(e), self));
                        }
                    }
                }
            }
            if let Some(d) = self.buffer.pop_front() {
                return Some((Ok(d), self));
            }
            if let (Some((topic, _)), Some(head)) = (&self.topic, &self.head)
                && self.next < *head.borrow()
            {
                match self.state.bus.read(topic, self.next, crate::bus::READ_BATCH).await {
                    Ok(batch) => {
                        // Past events dropped by retention, or the batch.
                        self.next = batch.last().map_or(*head.borrow(), |last| last.offset + 1);
                        self.buffer.extend(batch);
                        continue;
                    }
                    Err(e) => return Some((Err(e.into()), self)),
                }
            }
            let changed = async {
                match &mut self.head {
                    Some(h) => h.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.state.shutdown.cancelled() => return None,
                ok = changed => if !ok { return None },
                msg = self.inbound.next() => match msg {
                    None | Some(Err(_)) => return None,
                    Some(Ok(m)) => {
                        if let Err(e) = self.handle(m).await {
                            return Some((Err(e), self));
                        }
                    }
                },
            }
        }
    }
}

#[tonic::async_trait]
impl v1::events_server::Events for Api {
    async fn publish(
        &self,
        req: Request<v1::PublishRequest>,
    ) -> Result<Response<v1::PublishResponse>, Status> {
        self.member(&req, "publish events")?;
        let results = self.0.bus.publish(req.into_inner().events).await?;
        Ok(Response::new(v1::PublishResponse { results }))
    }

    type SubscribeStream = BoxStream<v1::Delivery>;

    /// The first message must be a start; it is handled (the group's lease taken, the position
    /// fixed) before the call returns, so a subscriber that got its stream knows it will see
    /// every event published from then on.
    async fn subscribe(
        &self,
        req: Request<Streaming<v1::SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        self.member(&req, "subscribe to events")?;
        let mut inbound = req.into_inner();
        let first = inbound.message().await?;
        let mut sub = Subscription {
            inbound,
            topic: None,
            next: 0,
            head: None,
            buffer: Default::default(),
            commits: None,
            state: self.0.clone(),
        };
        match first {
            Some(v1::SubscribeRequest { kind: Some(v1::subscribe_request::Kind::Start(s)) }) => {
                sub.start(s).await?
            }
            _ => return Err(Status::invalid_argument("the first message of a subscription must be start")),
        }
        Ok(Response::new(Box::pin(stream::unfold(sub, Subscription::next))))
    }

    type ReplayStream = BoxStream<v1::Delivery>;

    async fn replay(&self, req: Request<v1::ReplayRequest>) -> Result<Response<Self::ReplayStream>, Status> {
        self.member(&req, "replay events")?;
        let r = req.into_inner();
        check_topic(&r.topic)?;
        // Any limit is served in full, read page by page as the client takes it (memory stays
        // one page however much is asked for).
        let limit = match r.limit {
            0 => DEFAULT_REPLAY_LIMIT as usize,
            n => n as usize,
        };
        let from = match (r.from_offset, r.from_time_unix_ms) {
            (Some(o), _) => o,
            (None, Some(t)) => self.0.bus.offset_at(&r.topic, t).await?,
            (None, None) => 0,
        };
        let pages = Pages {
            state: self.0.clone(),
            topic: r.topic,
            next: from,
            left: limit,
            page: Default::default(),
        };
        Ok(Response::new(Box::pin(stream::unfold(pages, Pages::next))))
    }
}

/// A replay read from the bus a page at a time.
struct Pages {
    state: Arc<State>,
    topic: String,
    next: u64,
    left: usize,
    page: std::collections::VecDeque<v1::Delivery>,
}

impl Pages {
    /// Deliveries read from the bus per page.
    const SIZE: usize = 1000;

    async fn next(mut self) -> Option<(Result<v1::Delivery, Status>, Self)> {
        if self.left == 0 {
            return None;
        }
        if self.page.is_empty() {
            match self.state.bus.read(&self.topic, self.next, self.left.min(Self::SIZE)).await {
                Ok(page) => self.page = page.into(),
                Err(e) => {
                    self.left = 0;
                    return Some((Err(e.into()), self));
                }
            }
        }
        let d = self.page.pop_front()?;
        self.next = d.offset + 1;
        self.left -= 1;
        Some((Ok(d), self))
    }
}

// ---- Identity (the mesh CA) -----------------------------------------------------------------

/// Tokens are stored as the hex SHA-256 of the token.
fn token_hash(token: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn check_service(service: &str) -> Result<(), Status> {
    names::check_service(service).map_err(Status::invalid_argument)
}

#[tonic::async_trait]
impl v1::identity_server::Identity for Api {
    async fn certify(
        &self,
        req: Request<v1::CertifyRequest>,
    ) -> Result<Response<v1::CertifyResponse>, Status> {
        let r = req.into_inner();
        check_service(&r.service)?;
        let allowed = if r.token.is_empty() {
            None
        } else {
            self.0.store.token_service(&token_hash(&r.token)).map_err(store_status)?
        };
        match allowed {
            None => {
                return Err(Status::unauthenticated(
                    "no valid bootstrap token: create one with `meshctl identity token create SERVICE`",
                ));
            }
            Some(s) if s != r.service => {
                return Err(Status::permission_denied(format!(
                    "this token is for service {s}, not {}",
                    r.service
                )));
            }
            Some(_) => {}
        }
        let (pem, expires) =
            self.0.ca.certify(&r.service, &r.csr_pem, std::time::SystemTime::now()).map_err(|e| match e {
                crate::ca::CaError::Csr(_) => Status::invalid_argument(e.to_string()),
                _ => Status::internal(e.to_string()),
            })?;
        let id = crate::ca::spiffe_id(&self.0.ca.trust_domain, &r.service);
        tracing::info!(service = %r.service, node = %r.node_id, %id, "certificate issued");
        if !r.node_id.is_empty() {
            self.0.proxies.certified(&r.node_id, &id, mesh_proto::unix_ms(expires));
        }
        Ok(Response::new(v1::CertifyResponse {
            certificate_chain_pem: pem,
            trust_anchors_pem: self.0.ca.root_pem.clone(),
            expires_at_unix_ms: mesh_proto::unix_ms(expires),
            spiffe_id: id,
        }))
    }

    async fn create_token(
        &self,
        req: Request<v1::CreateTokenRequest>,
    ) -> Result<Response<v1::CreateTokenResponse>, Status> {
        self.admin(&req, "create a bootstrap token")?;
        let service = req.into_inner().service;
        check_service(&service)?;
        let token =
            crate::auth::random_token().ok_or_else(|| Status::internal("no randomness for a token"))?;
        self.0.store.token_add(&token_hash(&token), &service).await.map_err(store_status)?;
        Ok(Response::new(v1::CreateTokenResponse { token, service }))
    }

    async fn revoke_tokens(
        &self,
        req: Request<v1::RevokeTokensRequest>,
    ) -> Result<Response<v1::RevokeTokensResponse>, Status> {
        self.admin(&req, "revoke bootstrap tokens")?;
        let service = req.into_inner().service;
        check_service(&service)?;
        let n = self.0.store.tokens_revoke(&service).await.map_err(store_status)?;
        Ok(Response::new(v1::RevokeTokensResponse { revoked: n as u32 }))
    }

    async fn trust_bundle(
        &self,
        _: Request<v1::TrustBundleRequest>,
    ) -> Result<Response<v1::TrustBundleResponse>, Status> {
        Ok(Response::new(v1::TrustBundleResponse {
            trust_anchors_pem: self.0.ca.root_pem.clone(),
            trust_domain: self.0.ca.trust_domain.clone(),
        }))
    }
}
