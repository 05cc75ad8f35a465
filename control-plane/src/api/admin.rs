//! `mesh.v1.Admin`: the management view of services, instances and the control plane.

use crate::{
    api::{Api, BoxStream},
    auth::Caller,
    state::State,
    tap::Taps,
};

use mesh_proto::v1;
use tokio::time::Instant;
use tonic::{Request, Response, Status, Streaming};

/// How long `Check` waits for a sidecar's probe (its own probe timeout is the policy's).
const PROBE_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// How long `Call` waits for the proxy's answer (the service's own timeouts are its policy's).
const CALL_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);

/// One proxy session's state.
struct Session {
    state: std::sync::Arc<crate::state::State>,
    service: String,
    taps: tokio::sync::watch::Receiver<crate::tap::TapSet>,
    inbound: Streaming<v1::ProxyReport>,
    commands: tokio::sync::mpsc::Receiver<v1::ProxyCommand>,
    _guard: crate::tap::SessionGuard,
}

#[tonic::async_trait]
impl v1::admin_server::Admin for Api {
    type TapStream = BoxStream<v1::TapRecord>;

    /// Live request metadata from `service`'s proxies until the caller goes away.
    async fn tap(&self, req: Request<v1::TapRequest>) -> Result<Response<Self::TapStream>, Status> {
        self.admin(&req, "tap requests")?;
        let r = req.into_inner();
        mesh_proto::names::check_service(&r.service)
            .map_err(|e| Status::invalid_argument(format!("service: {e}")))?;
        let (rx, guard) = self.0.taps.start(&r);
        let stream = futures::stream::unfold((rx, guard), |(mut rx, guard)| async move {
            let record = rx.recv().await?;
            Some((Ok(record), (rx, guard)))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    /// Probes a service's instances (or one) now, through their sidecars' sessions.
    async fn check(&self, req: Request<v1::CheckRequest>) -> Result<Response<v1::CheckResponse>, Status> {
        self.admin(&req, "check instances")?;
        let r = req.into_inner();
        mesh_proto::names::check_service(&r.service)
            .map_err(|e| Status::invalid_argument(format!("service: {e}")))?;
        let instances: Vec<String> = self
            .0
            .registry
            .get_service(&r.service, Instant::now())
            .map(|s| s.instances.into_iter().map(|i| i.id).collect())
            .unwrap_or_default();
        let wanted: Vec<String> =
            instances.into_iter().filter(|id| r.instance_id.is_empty() || *id == r.instance_id).collect();
        if wanted.is_empty() {
            let which = if r.instance_id.is_empty() { String::new() } else { format!(" {}", r.instance_id) };
            return Err(Status::not_found(format!("{} has no registered instance{which}", r.service)));
        }
        let taps = &self.0.taps;
        let checks = wanted.iter().map(|id| async {
            match taps.probe(id, &r.service, PROBE_WITHIN).await {
                Ok(result) => {
                    v1::InstanceCheck { instance_id: id.clone(), result: Some(result), error: String::new() }
                }
                Err(error) => v1::InstanceCheck { instance_id: id.clone(), result: None, error },
            }
        });
        Ok(Response::new(v1::CheckResponse { instances: futures::future::join_all(checks).await }))
    }

    /// Sends a request to a service through a proxy, as its app would.
    async fn call(&self, req: Request<v1::CallRequest>) -> Result<Response<v1::CallResponse>, Status> {
        self.admin(&req, "call a service through the mesh")?;
        let r = req.into_inner();
        mesh_proto::names::check_service(&r.service)
            .map_err(|e| Status::invalid_argument(format!("service: {e}")))?;
        if !r.path.starts_with('/') {
            return Err(Status::invalid_argument(format!("path {:?} must start with /", r.path)));
        }
        if r.method.parse::<axum::http::Method>().is_err() || r.method.is_empty() {
            return Err(Status::invalid_argument(format!("method {:?} is not an HTTP method", r.method)));
        }
        let command = v1::CallCommand {
            id: 0,
            service: r.service,
            method: r.method,
            path: r.path,
            headers: r.headers,
            body: r.body,
        };
        let (via, result) =
            self.0.taps.call(&r.via, command, CALL_WITHIN).await.map_err(Status::unavailable)?;
        match result.response {
            Some(mut resp) if result.error.is_empty() => {
                resp.via = via;
                Ok(Response::new(resp))
            }
            _ => Err(Status::unavailable(format!("proxy {via} could not send it: {}", result.error))),
        }
    }

    type ProxySessionStream = BoxStream<v1::ProxyCommand>;

    /// A proxy's on-demand session: its first message names its node and service (a sidecar
    /// may only name its own); it is told the taps on its service whenever they change and the
    /// probes to run, and its tap records and probe results go where they are awaited.
    async fn proxy_session(
        &self,
        req: Request<Streaming<v1::ProxyReport>>,
    ) -> Result<Response<Self::ProxySessionStream>, Status> {
        use v1::{proxy_command, proxy_report::Kind};
        let caller = self.member(&req, "open a proxy session")?;
        let mut inbound = req.into_inner();
        let Some(v1::ProxyReport { kind: Some(Kind::Hello(hello)) }) = inbound.message().await? else {
            return Err(Status::invalid_argument(
                "the first message is hello, naming the proxy's node and service",
            ));
        };
        if let Caller::Service(own) = &caller
            && *own != hello.service
        {
            return Err(self.refused(Status::permission_denied(format!(
                "{caller} may not act as {}: a sidecar speaks only for its own service",
                hello.service
            ))));
        }
        let service = hello.service;
        let (commands, guard) = self.0.taps.connect(&hello.node_id, &service);
        let (state, mut taps) = (self.0.clone(), self.0.taps.watch());
        taps.mark_changed();
        let session = Session { state, service, taps, inbound, commands, _guard: guard };
        let stream = futures::stream::unfold(session, |mut s| async move {
            loop {
                tokio::select! {
                    _ = s.state.shutdown.cancelled() => return None,
                    changed = s.taps.changed() => {
                        changed.ok()?;
                        let control = Taps::control(&s.taps.borrow_and_update(), &s.service);
                        let command = v1::ProxyCommand { kind: Some(proxy_command::Kind::Taps(control)) };
                        return Some((Ok(command), s));
                    }
                    command = s.commands.recv() => return Some((Ok(command?), s)),
                    report = s.inbound.message() => match report {
                        Ok(Some(v1::ProxyReport { kind: Some(Kind::Tap(r)) })) => Taps::deliver(&s.taps.borrow(), &s.service, r),
                        Ok(Some(v1::ProxyReport { kind: Some(Kind::Probe(r)) })) => s.state.taps.answered(r.id, Kind::Probe(r)),
                        Ok(Some(v1::ProxyReport { kind: Some(Kind::Call(r)) })) => s.state.taps.answered(r.id, Kind::Call(r)),
                        Ok(Some(_)) => {}
                        _ => return None,
                    },
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

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

    async fn topology(
        &self,
        req: Request<v1::TopologyRequest>,
    ) -> Result<Response<v1::TopologyResponse>, Status> {
        self.admin(&req, "read the topology")?;
        Ok(Response::new(self.0.topology.snapshot(Instant::now())))
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
        let mut proxies = local_proxies(s, &filter);
        if let Some(c) = s.store.cluster() {
            // The other replicas' proxies, as they last wrote them to etcd.
            let now = Instant::now();
            for mut p in c.remote_proxies().into_iter().filter(|p| filter.is_empty() || p.service == filter) {
                p.last_heartbeat_age_ms =
                    s.registry.heartbeat_age(&p.service, &p.node_id, now).map(|d| d.as_millis() as u64);
                p.connected_ms =
                    mesh_proto::unix_ms(std::time::SystemTime::now()).saturating_sub(p.connected_ms);
                for st in &mut p.policies {
                    st.current_version = s.policies.current(&st.service).version;
                }
                proxies.push(p);
            }
            proxies.sort_by(|a, b| (&a.service, &a.node_id).cmp(&(&b.service, &b.node_id)));
        }
        Ok(Response::new(v1::ProxyStatusResponse { proxies }))
    }
}

// ---- Events (the embedded bus) ---------------------------------------------------------------

/// The proxies connected to this control plane, with their sync state.
pub(crate) fn local_proxies(s: &State, filter: &str) -> Vec<v1::ProxyStatus> {
    proxy_statuses(s, filter, false)
}

/// This replica's proxies as it writes them to etcd for the others: only what changes when
/// something happens (when the connection started on the wall clock instead of its age; no
/// heartbeat age, no current version), so an unchanged list is not written again.
pub(crate) fn proxies_report(s: &State) -> Vec<v1::ProxyStatus> {
    proxy_statuses(s, "", true)
}

/// The proxies (sorted by service, then node id); `for_report`: as [`proxies_report`] says.
fn proxy_statuses(s: &State, filter: &str, for_report: bool) -> Vec<v1::ProxyStatus> {
    let now = Instant::now();
    let replica = s.store.cluster().map(|c| c.replica.clone()).unwrap_or_default();
    s.proxies
        .snapshot()
        .into_iter()
        .filter(|p| filter.is_empty() || p.service == filter)
        .map(|p| {
            let cert = s.proxies.cert(&p.node_id).unwrap_or_default();
            v1::ProxyStatus {
                spiffe_id: cert.spiffe_id,
                certificate_expires_unix_ms: cert.expires_unix_ms,
                certificates_issued: cert.issued,
                last_heartbeat_age_ms: (!for_report)
                    .then(|| s.registry.heartbeat_age(&p.service, &p.node_id, now))
                    .flatten()
                    .map(|d| d.as_millis() as u64),
                connected_ms: if for_report {
                    p.connected_unix_ms
                } else {
                    now.saturating_duration_since(p.connected_at).as_millis() as u64
                },
                policies: p
                    .policies
                    .iter()
                    .map(|(svc, st)| v1::PolicySyncStatus {
                        service: svc.clone(),
                        current_version: if for_report { 0 } else { s.policies.current(svc).version },
                        acked_version: st.acked_version,
                        nacked_version: st.nacked_version,
                        nack_reason: st.nack_reason.clone(),
                        last_ack_latency_ms: st.last_ack_latency_ms,
                    })
                    .collect(),
                node_id: p.node_id,
                service: p.service,
                peer: p.peer,
                replica: replica.clone(),
            }
        })
        .collect()
}
