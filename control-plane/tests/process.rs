//! The real `control-plane` binary: durability across SIGKILL, graceful shutdown on SIGTERM,
//! standard gRPC health and reflection, and the admin HTTP listener.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use mesh_proto::{
    policy::ServicePolicy,
    v1::{self, policy_client::PolicyClient, registry_client::RegistryClient},
};
use mesh_testkit::{CpProcess, channel, http_get, instance};
use tonic::transport::Endpoint;

/// Writers register instances and set policies as fast as they can while the control plane is
/// killed with SIGKILL at a different moment each cycle; after every restart each acknowledged
/// write must be there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_write_is_lost_across_sigkill() {
    let cycles: u32 = std::env::var("MESH_KILL_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(8);
    let dir = tempfile::tempdir().unwrap();
    let acked_instances: Arc<Mutex<Vec<String>>> = Arc::default();
    let acked_policies: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let acked_events: Arc<Mutex<Vec<String>>> = Arc::default();

    {
        // Instances of this service never expire, so only deregistration could remove them.
        let cp = CpProcess::start(dir.path());
        let mut p = ServicePolicy::default();
        p.health.heartbeat_ttl = Duration::ZERO;
        PolicyClient::new(channel(cp.grpc).await)
            .set(v1::SetPolicyRequest {
                service: "persist".into(),
                policy: Some((&p).into()),
                ..Default::default()
            })
            .await
            .unwrap();
        cp.kill9();
    }

    for cycle in 0..cycles {
        let cp = CpProcess::start(dir.path());
        let url = cp.url();
        let mut writers = Vec::new();
        for w in 0..4 {
            let (url, acked_instances, acked_policies, acked_events) =
                (url.clone(), acked_instances.clone(), acked_policies.clone(), acked_events.clone());
            writers.push(tokio::spawn(async move {
                let Ok(ch) = Endpoint::from_shared(url).unwrap().connect().await else { return };
                let mut reg = RegistryClient::new(ch.clone());
                let mut pol = PolicyClient::new(ch.clone());
                let mut bus = v1::events_client::EventsClient::new(ch);
                for seq in 0.. {
                    let id = format!("c{cycle}-w{w}-{seq}");
                    if reg
                        .register(v1::RegisterRequest { instance: Some(instance("persist", &id, 9000)) })
                        .await
                        .is_err()
                    {
                        return;
                    }
                    // The same id as an event: acknowledged means it is in the log after any crash.
                    let event = v1::Event {
                        id: id.clone(),
                        topic: "persist".into(),
                        key: format!("w{w}"),
                        ..Default::default()
                    };
                    if bus.publish(v1::PublishRequest { events: vec![event] }).await.is_err() {
                        acked_instances.lock().unwrap().push(id);
                        return;
                    }
                    acked_events.lock().unwrap().push(id.clone());
                    acked_instances.lock().unwrap().push(id);
                    let mut p = ServicePolicy::default();
                    p.retry.max_attempts = seq % 10;
                    let svc = format!("policy-w{w}");
                    match pol
                        .set(v1::SetPolicyRequest {
                            service: svc.clone(),
                            policy: Some((&p).into()),
                            ..Default::default()
                        })
                        .await
                    {
                        Ok(r) => {
                            acked_policies.lock().unwrap().insert(svc, r.into_inner().policy.unwrap().version)
                        }
                        Err(_) => return,
                    };
                }
            }));
        }
        // A different point in the write stream every cycle.
        tokio::time::sleep(Duration::from_millis(40 + (u64::from(cycle) * 37) % 160)).await;
        cp.kill9();
        for w in writers {
            w.await.unwrap();
        }

        let cp = CpProcess::start(dir.path());
        let ch = channel(cp.grpc).await;
        let stored = RegistryClient::new(ch.clone())
            .get_service(v1::GetServiceRequest { name: "persist".into() })
            .await
            .unwrap()
            .into_inner();
        let present: std::collections::HashSet<_> = stored.instances.iter().map(|i| i.id.clone()).collect();
        let acked = acked_instances.lock().unwrap().clone();
        let lost: Vec<_> = acked.iter().filter(|id| !present.contains(*id)).collect();
        assert!(lost.is_empty(), "cycle {cycle}: acknowledged registrations lost: {lost:?}");
        // Restored instances are in discovery (a fresh TTL, not expired by the restart).
        assert!(stored.instances.iter().all(|i| i.health() == v1::HealthStatus::Healthy));
        let log: std::collections::HashSet<String> = v1::events_client::EventsClient::new(ch.clone())
            .replay(v1::ReplayRequest {
                topic: "persist".into(),
                from_offset: Some(0),
                from_time_unix_ms: None,
                limit: 10_000,
            })
            .await
            .unwrap()
            .into_inner()
            .map(|d| d.unwrap().event.unwrap().id)
            .collect()
            .await;
        let events = acked_events.lock().unwrap().clone();
        let lost: Vec<_> = events.iter().filter(|id| !log.contains(*id)).collect();
        assert!(lost.is_empty(), "cycle {cycle}: acknowledged events lost: {lost:?}");
        let mut pol = PolicyClient::new(ch);
        let policies = acked_policies.lock().unwrap().clone();
        for (svc, version) in policies {
            let cur = pol.get(v1::GetPolicyRequest { service: svc.clone() }).await.unwrap().into_inner();
            assert!(
                cur.version >= version,
                "cycle {cycle}: {svc} acknowledged at v{version}, found v{}",
                cur.version
            );
        }
        cp.kill9();
    }
    let total = acked_instances.lock().unwrap().len();
    eprintln!(
        "{} acknowledged events, all in the log after every restart",
        acked_events.lock().unwrap().len()
    );
    eprintln!(
        "{cycles} SIGKILL cycles, {total} acknowledged registrations and {} policy services checked after each",
        acked_policies.lock().unwrap().len()
    );
    assert!(total as u32 >= cycles, "writes were acknowledged at all");
}

#[tokio::test]
async fn sigterm_ends_open_streams_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let cp = CpProcess::start(dir.path());
    let ch = channel(cp.grpc).await;
    let mut watch = v1::discovery_client::DiscoveryClient::new(ch.clone())
        .watch(v1::WatchRequest { services: vec!["market".into()], node_id: "t".into() })
        .await
        .unwrap()
        .into_inner();
    watch.next().await.unwrap().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut hb = RegistryClient::new(ch)
        .heartbeat(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();

    mesh_testkit::signal(cp.pid(), nix::sys::signal::Signal::SIGTERM);
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(_)) = watch.next().await {}
        while let Some(Ok(_)) = hb.next().await {}
    })
    .await;
    assert!(ended.is_ok(), "streams end on shutdown");
    drop(tx);
    let status = tokio::task::spawn_blocking(move || cp.wait()).await.unwrap();
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test]
async fn standard_health_and_reflection_describe_the_api() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let dir = tempfile::tempdir().unwrap();
    let cp = CpProcess::start(dir.path());
    let ch = channel(cp.grpc).await;

    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    for svc in ["", "mesh.v1.Registry", "mesh.v1.Policy"] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest { service: svc.into() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status(), tonic_health::pb::health_check_response::ServingStatus::Serving, "{svc}");
    }

    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = ServerReflectionClient::new(ch)
        .server_reflection_info(futures::stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        resp.next().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for want in
        ["mesh.v1.Registry", "mesh.v1.Discovery", "mesh.v1.Policy", "mesh.v1.Admin", "grpc.health.v1.Health"]
    {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
}

/// Every line of the exposition (the Prometheus text format, the default) is a comment
/// (`# HELP`, `# TYPE`) or a sample `name{labels} value` with a valid metric name and a numeric
/// value; no OpenMetrics `# EOF`.
fn assert_valid_exposition(text: &str) {
    let lines: Vec<&str> = text.lines().collect();
    assert!(!lines.contains(&"# EOF"), "the Prometheus text format has no # EOF");
    for line in lines {
        if let Some(rest) = line.strip_prefix("# ") {
            assert!(
                rest.starts_with("HELP ") || rest.starts_with("TYPE ") || rest == "EOF",
                "bad comment: {line}"
            );
            continue;
        }
        let (name_labels, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
        let name = name_labels.split('{').next().unwrap();
        assert!(
            !name.is_empty()
                && name.chars().next().unwrap().is_ascii_alphabetic()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name: {line}"
        );
        if name_labels.contains('{') {
            assert!(name_labels.ends_with('}'), "unclosed labels: {line}");
        }
        assert!(value.parse::<f64>().is_ok() || value == "+Inf" || value == "NaN", "bad value: {line}");
    }
}

#[tokio::test]
async fn metrics_and_healthz() {
    let dir = tempfile::tempdir().unwrap();
    let cp = CpProcess::start(dir.path());
    let ch = channel(cp.grpc).await;
    RegistryClient::new(ch.clone())
        .register(v1::RegisterRequest { instance: Some(instance("market", "m1", 9001)) })
        .await
        .unwrap();

    let (status, body) = http_get(cp.admin, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, r#"{"status":"serving"}"#));
    let (status, body) = http_get(cp.admin, "/nope").await;
    assert_eq!(status, 404);
    assert!(body.contains("error"));
    // The one error shape of every HTTP listener: a code and a message saying what to do.
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"], "not_found", "{body}");
    assert!(v["message"].as_str().is_some_and(|m| m.contains("/metrics")), "{body}");

    let (status, text) = http_get(cp.admin, "/metrics").await;
    assert_eq!(status, 200);
    assert_valid_exposition(&text);
    for want in [
        "mesh_control_plane_registrations_total 1",
        "mesh_control_plane_services 1",
        r#"mesh_control_plane_instances{state="routable"} 1"#,
        "mesh_control_plane_policy_ack_latency_seconds_count",
        "mesh_control_plane_heartbeats_total",
        "mesh_control_plane_discovery_streams 0",
    ] {
        assert!(text.contains(want), "{want} missing from:\n{text}");
    }
}
