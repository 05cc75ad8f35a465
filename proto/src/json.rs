//! The JSON shape of the management views, one for every reader: `meshctl -o json` and the
//! control plane's JSON management API (`/api/v1`) print the same objects.

use serde_json::{Value, json};

use crate::v1;

pub fn health_name(h: v1::HealthStatus) -> &'static str {
    match h {
        v1::HealthStatus::Healthy => "healthy",
        v1::HealthStatus::Unhealthy => "unhealthy",
        v1::HealthStatus::Expired => "expired",
        v1::HealthStatus::Unspecified => "unknown",
    }
}

pub fn service_summary(s: &v1::ServiceSummary) -> Value {
    json!({"name": s.name, "instances": s.instances, "healthy": s.healthy, "policy_version": s.policy_version})
}

pub fn instance(i: &v1::Instance) -> Value {
    json!({
        "id": i.id, "address": i.address, "zone": i.zone, "version": i.version, "metadata": i.metadata,
        "weight": i.weight, "health": health_name(i.health()), "load": i.load,
        "last_heartbeat_age_ms": i.last_heartbeat_age_ms,
    })
}

pub fn proxy_status(p: &v1::ProxyStatus) -> Value {
    json!({
        "node_id": p.node_id, "service": p.service, "peer": p.peer, "connected_ms": p.connected_ms,
        "last_heartbeat_age_ms": p.last_heartbeat_age_ms,
        "spiffe_id": p.spiffe_id, "certificate_expires_unix_ms": p.certificate_expires_unix_ms,
        "certificates_issued": p.certificates_issued, "replica": p.replica,
        "policies": p.policies.iter().map(|s| json!({
            "service": s.service, "current_version": s.current_version, "acked_version": s.acked_version,
            "nacked_version": s.nacked_version, "nack_reason": s.nack_reason, "last_ack_latency_ms": s.last_ack_latency_ms,
        })).collect::<Vec<_>>(),
    })
}

pub fn overview(o: &v1::OverviewResponse) -> Value {
    json!({
        "server_version": o.server_version, "uptime_ms": o.uptime_ms, "services": o.services,
        "instances": o.instances, "healthy_instances": o.healthy_instances, "policies": o.policies,
        "discovery_streams": o.discovery_streams, "policy_streams": o.policy_streams,
        "heartbeat_streams": o.heartbeat_streams, "registry_version": o.registry_version, "data_dir": o.data_dir,
    })
}

pub fn stats(s: &v1::StatsResponse) -> Value {
    json!({
        "registrations_total": s.registrations_total, "deregistrations_total": s.deregistrations_total,
        "heartbeats_total": s.heartbeats_total, "expirations_total": s.expirations_total,
        "self_preservation_holds_total": s.self_preservation_holds_total,
        "discovery_messages_total": s.discovery_messages_total, "policy_pushes_total": s.policy_pushes_total,
        "policy_acks_total": s.policy_acks_total, "policy_nacks_total": s.policy_nacks_total,
        "ack_latency_p50_ms": s.ack_latency_p50_ms, "ack_latency_p99_ms": s.ack_latency_p99_ms,
        "ack_latency_max_ms": s.ack_latency_max_ms,
    })
}

fn window(w: Option<&v1::WindowStats>) -> Value {
    let w = w.cloned().unwrap_or_default();
    json!({"requests": w.requests, "rps": w.rps, "success_rate": w.success_rate,
           "p50_ms": w.p50_ms, "p95_ms": w.p95_ms, "p99_ms": w.p99_ms,
           "cached_share": w.cached_share, "limited_share": w.limited_share})
}

pub fn topology(t: &v1::TopologyResponse) -> Value {
    json!({
        "services": t.services.iter().map(|s| json!({
            "service": s.service,
            "inbound_last_minute": window(s.inbound_last_minute.as_ref()),
            "inbound_last_ten_minutes": window(s.inbound_last_ten_minutes.as_ref()),
        })).collect::<Vec<_>>(),
        "edges": t.edges.iter().map(|e| json!({
            "caller": e.caller, "callee": e.callee, "route": e.route,
            "last_minute": window(e.last_minute.as_ref()),
            "last_ten_minutes": window(e.last_ten_minutes.as_ref()),
            "last_seen_ms_ago": e.last_seen_ms_ago, "reporters": e.reporters,
            "open_breakers": e.open_breakers,
        })).collect::<Vec<_>>(),
    })
}

/// An on-demand probe of one instance: its app's answer and latency, or why there was none.
pub fn instance_check(c: &v1::InstanceCheck) -> Value {
    match &c.result {
        Some(r) => json!({
            "instance_id": c.instance_id, "healthy": r.healthy, "status": r.status,
            "latency_ms": r.latency_ms, "path": r.path, "error": r.error,
        }),
        None => json!({"instance_id": c.instance_id, "healthy": false, "error": c.error}),
    }
}
