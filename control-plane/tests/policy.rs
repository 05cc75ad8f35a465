//! Policy API and the bidi push stream with ACK / NACK over real gRPC.

use std::time::Duration;

use futures::StreamExt;
use mesh_proto::{
    policy::{Algorithm, ServicePolicy},
    v1::{self, admin_client::AdminClient, policy_client::PolicyClient, policy_stream_request::Kind},
};
use mesh_testkit::{TestCp, TestStore};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

const WAIT: Duration = Duration::from_secs(10);

struct Proxy {
    tx: mpsc::Sender<v1::PolicyStreamRequest>,
    rx: Streaming<v1::PolicyPush>,
}

impl Proxy {
    async fn connect(cp: &TestCp, node: &str, own: &str, services: &[&str]) -> Self {
        let (tx, rx) = mpsc::channel(16);
        tx.send(v1::PolicyStreamRequest {
            kind: Some(Kind::Subscribe(v1::PolicySubscribe {
                node_id: node.into(),
                service: own.into(),
                services: services.iter().map(|s| s.to_string()).collect(),
            })),
        })
        .await
        .unwrap();
        let rx =
            PolicyClient::new(cp.channel().await).stream(ReceiverStream::new(rx)).await.unwrap().into_inner();
        Self { tx, rx }
    }

    async fn next(&mut self) -> v1::PolicyPush {
        tokio::time::timeout(WAIT, self.rx.next()).await.expect("a push").unwrap().unwrap()
    }

    async fn ack(&self, p: &v1::PolicyPush) {
        let kind = Kind::Ack(v1::PolicyAck {
            service: p.service.clone(),
            version: p.version,
            nonce: p.nonce.clone(),
        });
        self.tx.send(v1::PolicyStreamRequest { kind: Some(kind) }).await.unwrap();
    }

    async fn nack(&self, p: &v1::PolicyPush, reason: &str) {
        let kind = Kind::Nack(v1::PolicyNack {
            service: p.service.clone(),
            version: p.version,
            nonce: p.nonce.clone(),
            reason: reason.into(),
        });
        self.tx.send(v1::PolicyStreamRequest { kind: Some(kind) }).await.unwrap();
    }
}

fn rr() -> ServicePolicy {
    let mut p = ServicePolicy::default();
    p.load_balancer.algorithm = Algorithm::RoundRobin;
    p
}

async fn set(cp: &TestCp, service: &str, p: &ServicePolicy) -> v1::SetPolicyResponse {
    PolicyClient::new(cp.channel().await)
        .set(v1::SetPolicyRequest { service: service.into(), policy: Some(p.into()), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
}

async fn status(cp: &TestCp) -> Vec<v1::ProxyStatus> {
    AdminClient::new(cp.channel().await)
        .proxy_status(v1::ProxyStatusRequest::default())
        .await
        .unwrap()
        .into_inner()
        .proxies
}

async fn pushes_carry_versions_and_nonces_and_acks_are_recorded(store: TestStore) {
    let cp = TestCp::start_on(&store, |_| {}).await;
    let mut proxy = Proxy::connect(&cp, "market-1", "market", &["market", "users"]).await;
    // Defaults first, version 0, one push per service.
    let mut first = vec![proxy.next().await, proxy.next().await];
    first.sort_by(|a, b| a.service.cmp(&b.service));
    assert_eq!(
        first.iter().map(|p| (p.service.as_str(), p.version, p.is_default)).collect::<Vec<_>>(),
        [("market", 0, true), ("users", 0, true)]
    );
    for p in &first {
        proxy.ack(p).await;
    }

    let stored = set(&cp, "market", &rr()).await;
    assert!(stored.applied);
    let push = proxy.next().await;
    assert_eq!((push.service.as_str(), push.version, push.is_default), ("market", 1, false));
    assert_ne!(push.nonce, first[0].nonce);
    assert_eq!(ServicePolicy::try_from(push.policy.clone().unwrap()).unwrap(), rr());
    proxy.ack(&push).await;

    mesh_testkit::eventually(WAIT, "proxy-status shows the ACK", || async {
        let st = status(&cp).await;
        st.len() == 1 && st[0].policies.iter().any(|p| p.service == "market" && p.acked_version == 1)
    })
    .await;
    let st = status(&cp).await;
    assert_eq!((st[0].node_id.as_str(), st[0].service.as_str()), ("market-1", "market"));
    let m = st[0].policies.iter().find(|p| p.service == "market").unwrap();
    assert_eq!((m.current_version, m.acked_version), (1, 1));
    assert!(m.last_ack_latency_ms > 0.0);
    let stats = AdminClient::new(cp.channel().await).stats(v1::StatsRequest {}).await.unwrap().into_inner();
    assert_eq!((stats.policy_pushes_total, stats.policy_acks_total), (3, 3));
    assert!(stats.ack_latency_max_ms > 0.0);

    // The stream ends: the proxy leaves proxy-status.
    drop(proxy);
    mesh_testkit::eventually(WAIT, "disconnected proxy removed", || async { status(&cp).await.is_empty() })
        .await;
}

async fn a_nack_is_recorded_with_its_reason_and_the_acked_version_stays(store: TestStore) {
    let cp = TestCp::start_on(&store, |_| {}).await;
    let mut proxy = Proxy::connect(&cp, "n1", "market", &["market"]).await;
    let p0 = proxy.next().await;
    proxy.ack(&p0).await;
    set(&cp, "market", &rr()).await;
    let p1 = proxy.next().await;
    proxy.ack(&p1).await;
    let mut p = rr();
    p.retry.max_attempts = 2;
    set(&cp, "market", &p).await;
    let p2 = proxy.next().await;
    proxy.nack(&p2, "cannot apply: test says no").await;

    mesh_testkit::eventually(WAIT, "proxy-status shows the NACK", || async {
        status(&cp).await[0].policies[0].nacked_version == 2
    })
    .await;
    let s = &status(&cp).await[0].policies[0];
    assert_eq!((s.current_version, s.acked_version, s.nacked_version), (2, 1, 2));
    assert_eq!(s.nack_reason, "cannot apply: test says no");

    // `meshctl check` fails on it, naming the proxy, the policy, the version and the reason,
    // and says what to do.
    // (The control plane serves on this test's runtime: the command is awaited, not blocked on.)
    let out = tokio::process::Command::new(mesh_testkit::bin("meshctl"))
        .args(["--control-plane", &cp.url(), "-o", "json", "check"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let convergence = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "convergence")
        .unwrap_or_else(|| panic!("{report}"));
    assert_eq!(convergence["ok"], false, "{report}");
    assert_eq!(convergence["found"], "n1 NACKed market v2: cannot apply: test says no", "{report}");
    assert!(convergence["fix"].as_str().unwrap().contains("meshctl policy get"), "{report}");
}

async fn an_invalid_policy_is_refused_naming_the_field_and_nothing_changes(store: TestStore) {
    let cp = TestCp::start_on(&store, |_| {}).await;
    set(&cp, "market", &rr()).await;
    let mut proxy = Proxy::connect(&cp, "n1", "market", &["market"]).await;
    assert_eq!(proxy.next().await.version, 1);

    let mut client = PolicyClient::new(cp.channel().await);
    let mut wire = v1::ServicePolicy::from(&rr());
    wire.retry.as_mut().unwrap().max_attempts = Some(99);
    let e = client
        .set(v1::SetPolicyRequest { service: "market".into(), policy: Some(wire), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("retry.max_attempts"), "{e}");

    let e = client
        .set(v1::SetPolicyRequest { service: "Bad Name".into(), policy: None, ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);

    let cur = client.get(v1::GetPolicyRequest { service: "market".into() }).await.unwrap().into_inner();
    assert_eq!(cur.version, 1);
    assert_eq!(ServicePolicy::try_from(cur.policy.unwrap()).unwrap(), rr());
    // Nothing was pushed.
    assert!(tokio::time::timeout(Duration::from_millis(200), proxy.rx.next()).await.is_err());
}

async fn dry_run_returns_the_diff_and_compare_and_set_guards_versions(store: TestStore) {
    let cp = TestCp::start_on(&store, |_| {}).await;
    let mut client = PolicyClient::new(cp.channel().await);
    let dry = client
        .set(v1::SetPolicyRequest {
            service: "market".into(),
            policy: Some((&rr()).into()),
            dry_run: true,
            expected_version: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!dry.applied);
    assert_eq!(dry.changes.len(), 1);
    assert_eq!(dry.changes[0].field, "load_balancer.algorithm");
    assert_eq!(
        (dry.changes[0].old_value.as_str(), dry.changes[0].new_value.as_str()),
        ("p2c_peak_ewma", "round_robin")
    );
    assert_eq!(
        client.get(v1::GetPolicyRequest { service: "market".into() }).await.unwrap().into_inner().version,
        0
    );

    let e = client
        .set(v1::SetPolicyRequest {
            service: "market".into(),
            policy: Some((&rr()).into()),
            dry_run: false,
            expected_version: Some(4),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);

    client
        .set(v1::SetPolicyRequest {
            service: "market".into(),
            policy: Some((&rr()).into()),
            dry_run: false,
            expected_version: Some(0),
        })
        .await
        .unwrap();
    let list = client.list(v1::ListPoliciesRequest {}).await.unwrap().into_inner().policies;
    assert_eq!(list.iter().map(|p| (p.service.as_str(), p.version)).collect::<Vec<_>>(), [("market", 1)]);
    let del = client.delete(v1::DeletePolicyRequest { service: "market".into() }).await.unwrap().into_inner();
    assert_eq!((del.existed, del.version), (true, 2));
    let cur = client.get(v1::GetPolicyRequest { service: "market".into() }).await.unwrap().into_inner();
    assert!(cur.is_default && cur.version == 2);
}

async fn ack_before_subscribe_is_refused(store: TestStore) {
    let cp = TestCp::start_on(&store, |_| {}).await;
    let (tx, rx) = mpsc::channel(4);
    let kind = Kind::Ack(v1::PolicyAck { service: "market".into(), version: 1, nonce: "x".into() });
    tx.send(v1::PolicyStreamRequest { kind: Some(kind) }).await.unwrap();
    let mut s =
        PolicyClient::new(cp.channel().await).stream(ReceiverStream::new(rx)).await.unwrap().into_inner();
    let e = s.next().await.unwrap().unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
}

async fn policies_survive_a_restart(store: TestStore) {
    let cp = TestCp::start_on(&store, |_| {}).await;
    set(&cp, "market", &rr()).await;
    let dir = cp.stop().await;
    let cp = TestCp::start_in(dir, |c| store.apply(c)).await;
    let cur = PolicyClient::new(cp.channel().await)
        .get(v1::GetPolicyRequest { service: "market".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cur.version, 1);
    assert_eq!(ServicePolicy::try_from(cur.policy.unwrap()).unwrap(), rr());
}

mesh_testkit::on_both_stores!(
    pushes_carry_versions_and_nonces_and_acks_are_recorded,
    a_nack_is_recorded_with_its_reason_and_the_acked_version_stays,
    an_invalid_policy_is_refused_naming_the_field_and_nothing_changes,
    dry_run_returns_the_diff_and_compare_and_set_guards_versions,
    ack_before_subscribe_is_refused,
    policies_survive_a_restart,
);
