//! `mesh.v1.Admin`: the management view of services, instances and the control plane.

use crate::api::Api;

use mesh_proto::v1;
use tokio::time::Instant;
use tonic::{Request, Response, Status};

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
