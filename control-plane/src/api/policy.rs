//! `mesh.v1.Policy`: get, set and list policies; the push stream with ACK / NACK per version.

use crate::{
    api::{
        Api, BoxStream,
        status::refused,
        streams::{GaugeGuard, check_services, release_all},
    },
    auth::{self, Caller},
    policy::{PolicyEntry, PolicyError},
    proxies::ProxyHandle,
    state::State,
    watch_limits::Lease,
};

use futures::{StreamExt, stream};
use mesh_proto::{names, policy::ServicePolicy, v1};
use std::sync::Arc;
use tokio::time::Instant;
use tokio_stream::{StreamMap, wrappers::WatchStream};
use tonic::{Request, Response, Status, Streaming};

struct PolicySession {
    caller: Caller,
    inbound: Streaming<v1::PolicyStreamRequest>,
    updates: StreamMap<String, WatchStream<Arc<PolicyEntry>>>,
    queue: std::collections::VecDeque<v1::PolicyPush>,
    proxy: ProxyHandle,
    seq: u64,
    subscribed: bool,
    state: Arc<State>,
    lease: Option<Lease>,
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
            Some(Kind::Edges(report)) => {
                // The calls are the session's service's, whatever the report says.
                let (node, service) = self.proxy.with(|p| (p.node_id.clone(), p.service.clone()));
                self.state.topology.record(&node, &service, &report, Instant::now());
                if let Some(c) = self.state.store.cluster() {
                    c.relay_edges(&node, &service, &report);
                }
                Ok(())
            }
            None => Err(Status::invalid_argument("kind: one of subscribe, ack, nack or edges is required")),
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
        let peer = auth::remote_addr(&req).map(|a| a.to_string()).unwrap_or_default();
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
