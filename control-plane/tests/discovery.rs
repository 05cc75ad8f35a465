//! The discovery contract over real gRPC on loopback.

use std::time::Duration;

use futures::StreamExt;
use mesh_proto::v1::{
    self, discovery_client::DiscoveryClient, registry_client::RegistryClient, watch_response::Kind,
};
use mesh_testkit::{TestCp, TestStore, eventually, instance};
use tonic::Streaming;

const WAIT: Duration = Duration::from_secs(10);

async fn watch(cp: &TestCp, services: &[&str]) -> Streaming<v1::WatchResponse> {
    DiscoveryClient::new(cp.channel().await)
        .watch(v1::WatchRequest {
            services: services.iter().map(|s| s.to_string()).collect(),
            node_id: "test".into(),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn next(s: &mut Streaming<v1::WatchResponse>) -> v1::WatchResponse {
    tokio::time::timeout(WAIT, s.next()).await.expect("a discovery message").unwrap().unwrap()
}

fn ids(m: &v1::WatchResponse, service: &str) -> Vec<String> {
    let s = m.services.iter().find(|s| s.service == service).unwrap();
    s.endpoints.iter().map(|e| e.instance_id.clone()).collect()
}

async fn snapshot_first_then_versioned_changes_only_for_watched_services(store: TestStore) {
    let cp = TestCp::start_on(&store, |_| {}).await;
    let mut reg = RegistryClient::new(cp.channel().await);
    reg.register(v1::RegisterRequest { instance: Some(instance("market", "m1", 9001)) }).await.unwrap();

    let mut w = watch(&cp, &["market", "users"]).await;
    let snap = next(&mut w).await;
    assert_eq!(snap.kind(), Kind::Snapshot);
    assert_eq!(ids(&snap, "market"), ["m1"]);
    assert!(ids(&snap, "users").is_empty(), "an unknown service is in the snapshot with no endpoints");
    let e = &snap.services.iter().find(|s| s.service == "market").unwrap().endpoints[0];
    assert_eq!((e.address.as_str(), e.zone.as_str(), e.weight), ("127.0.0.1:9001", "z1", 100));

    // A change to a service nobody here watches sends nothing; a watched one sends an update.
    reg.register(v1::RegisterRequest { instance: Some(instance("other", "o1", 9100)) }).await.unwrap();
    reg.register(v1::RegisterRequest { instance: Some(instance("market", "m2", 9002)) }).await.unwrap();
    let up = next(&mut w).await;
    assert_eq!(up.kind(), Kind::Update);
    assert_eq!(up.services.len(), 1);
    assert_eq!(ids(&up, "market"), ["m1", "m2"]);
    assert!(up.version > snap.version);

    reg.deregister(v1::DeregisterRequest { service: "market".into(), instance_id: "m1".into() })
        .await
        .unwrap();
    let up2 = next(&mut w).await;
    assert_eq!(ids(&up2, "market"), ["m2"]);
    assert!(up2.version > up.version);

    // Reconnecting starts from a fresh snapshot with the current state.
    drop(w);
    let mut w = watch(&cp, &["market"]).await;
    let snap = next(&mut w).await;
    assert_eq!(snap.kind(), Kind::Snapshot);
    assert_eq!(ids(&snap, "market"), ["m2"]);
    assert_eq!(snap.version, up2.version);
}

#[tokio::test]
async fn idle_streams_get_pings() {
    let cp = TestCp::start_with(|c| c.ping_interval = Duration::from_millis(100)).await;
    let mut w = watch(&cp, &["market"]).await;
    assert_eq!(next(&mut w).await.kind(), Kind::Snapshot);
    let ping = next(&mut w).await;
    assert_eq!(ping.kind(), Kind::Ping);
    assert!(ping.services.is_empty());
}

async fn bad_watch_requests_are_refused_with_the_reason(store: TestStore) {
    let cp = TestCp::start_on(&store, |_| {}).await;
    let mut c = DiscoveryClient::new(cp.channel().await);
    let e = c.watch(v1::WatchRequest { services: vec![], node_id: "x".into() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("services"), "{e}");
    let e = c
        .watch(v1::WatchRequest { services: vec!["Not Valid".into()], node_id: "x".into() })
        .await
        .unwrap_err();
    assert!(e.message().contains("Not Valid"), "{e}");
}

#[tokio::test]
async fn thousands_of_watchers_all_see_a_change() {
    const WATCHERS: usize = 2000;
    const CONNECTIONS: usize = 4;
    let cp = TestCp::start().await;
    let mut channels = Vec::new();
    for _ in 0..CONNECTIONS {
        channels.push(cp.channel().await);
    }
    let mut streams = Vec::with_capacity(WATCHERS);
    for i in 0..WATCHERS {
        let mut c = DiscoveryClient::new(channels[i % CONNECTIONS].clone());
        let mut s = c
            .watch(v1::WatchRequest { services: vec!["market".into()], node_id: format!("n{i}") })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(next(&mut s).await.kind(), Kind::Snapshot);
        streams.push(s);
    }
    let mut reg = RegistryClient::new(cp.channel().await);
    reg.register(v1::RegisterRequest { instance: Some(instance("market", "m1", 9001)) }).await.unwrap();
    let got =
        futures::future::join_all(streams.iter_mut().map(|s| async move { ids(&next(s).await, "market") }))
            .await;
    assert!(got.iter().all(|ids| ids == &["m1"]), "every watcher sees the new endpoint");

    let admin = v1::admin_client::AdminClient::new(cp.channel().await);
    let o = admin.clone().overview(v1::OverviewRequest {}).await.unwrap().into_inner();
    assert_eq!(o.discovery_streams as usize, WATCHERS);
    drop(streams);
    eventually(WAIT, "closed streams are no longer counted", || {
        let mut admin = admin.clone();
        async move { admin.overview(v1::OverviewRequest {}).await.unwrap().into_inner().discovery_streams == 0 }
    })
    .await;
}

async fn a_silent_instance_leaves_discovery_after_its_ttl_and_returns_when_it_heartbeats(store: TestStore) {
    let cp = TestCp::start_on(&store, |_| {}).await;
    let ch = cp.channel().await;
    let mut policy = v1::policy_client::PolicyClient::new(ch.clone());
    let mut p = mesh_proto::policy::ServicePolicy::default();
    p.health.heartbeat_interval = Duration::from_millis(100);
    p.health.heartbeat_ttl = Duration::from_millis(300);
    policy
        .set(v1::SetPolicyRequest {
            service: "market".into(),
            policy: Some((&p).into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut reg = RegistryClient::new(ch);
    let t = tokio::time::Instant::now();
    reg.register(v1::RegisterRequest { instance: Some(instance("market", "m1", 9001)) }).await.unwrap();
    let mut w = watch(&cp, &["market"]).await;
    assert_eq!(ids(&next(&mut w).await, "market"), ["m1"]);

    // No heartbeats: gone after the TTL (plus at most one sweep interval), never before it.
    let up = next(&mut w).await;
    assert!(ids(&up, "market").is_empty());
    assert!(t.elapsed() > Duration::from_millis(300), "expired before its TTL: {:?}", t.elapsed());

    // A heartbeat brings it back.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut hb = reg.heartbeat(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    tx.send(v1::HeartbeatRequest { service: "market".into(), instance_id: "m1".into(), health: 1, load: 0 })
        .await
        .unwrap();
    let ack = hb.next().await.unwrap().unwrap();
    assert!(ack.known);
    assert_eq!((ack.heartbeat_interval_ms, ack.ttl_ms), (100, 300));
    assert_eq!(ids(&next(&mut w).await, "market"), ["m1"]);
}

/// `mesh_control_plane_tracked_names{table}` from the admin listener.
async fn tracked(cp: &TestCp, table: &str) -> i64 {
    let (_, text) = mesh_testkit::get(cp.admin, "test", "/metrics").await;
    let prefix = format!("mesh_control_plane_tracked_names{{table=\"{table}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("{prefix} in {text}"))
        .trim()
        .parse()
        .unwrap()
}

/// Issue #15.2 (RELIABILITY S6): watching names nobody registered is bounded per caller, and
/// leaves nothing behind once the streams end.
#[tokio::test]
async fn watched_names_nobody_registered_are_bounded_and_forgotten_when_the_watch_ends() {
    let cp = TestCp::start().await;
    let mut reg = RegistryClient::new(cp.channel().await);
    reg.register(v1::RegisterRequest { instance: Some(instance("market", "m1", 9001)) }).await.unwrap();
    let base = tracked(&cp, "registry").await;
    assert_eq!(base, 1, "only the registered service");

    let per_stream = control_plane::api::MAX_WATCHED_SERVICES;
    let streams_to_fill = control_plane::watch_limits::MAX_NAMES_PER_CALLER / per_stream;
    let mut open = Vec::new();
    for i in 0..streams_to_fill {
        let names: Vec<String> = (0..per_stream).map(|j| format!("ghost-{i}-{j}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut w = watch(&cp, &refs).await;
        assert_eq!(next(&mut w).await.kind(), Kind::Snapshot);
        open.push(w);
    }
    assert_eq!(tracked(&cp, "registry").await, base + (streams_to_fill * per_stream) as i64);
    // One more distinct name is past the caller's bound; a name it already holds is not.
    let err = DiscoveryClient::new(cp.channel().await)
        .watch(v1::WatchRequest { services: vec!["ghost-extra".into()], node_id: "t".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
    assert!(err.message().contains("distinct services"), "{}", err.message());
    let mut again = watch(&cp, &["ghost-0-0", "ghost-1-1"]).await;
    assert_eq!(next(&mut again).await.kind(), Kind::Snapshot);

    drop(open);
    drop(again);
    eventually(WAIT, "every watched name is forgotten", || async { tracked(&cp, "registry").await == base })
        .await;
    // The registered service is still there and still watchable.
    let mut w = watch(&cp, &["market"]).await;
    assert_eq!(ids(&next(&mut w).await, "market"), ["m1"]);
}

mesh_testkit::on_both_stores!(
    snapshot_first_then_versioned_changes_only_for_watched_services,
    bad_watch_requests_are_refused_with_the_reason,
    a_silent_instance_leaves_discovery_after_its_ttl_and_returns_when_it_heartbeats,
);
