//! A sidecar's mesh identity: certified with its service's bootstrap token, renewed at two
//! thirds of the certificate's lifetime; a token for another service gets nothing.

use std::time::Duration;

use mesh_proto::v1;
use mesh_testkit::{Backend, TestCp, TestSidecar, WAIT, eventually, get, metric};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_is_certified_for_its_service_and_renews_before_expiry() {
    // The control plane's API as deployed: TLS, the sidecar authenticated by its certificate
    // (whose short lifetime also applies to the API's own certificate here).
    let cp = TestCp::start_with(|c| {
        c.cert_ttl = Duration::from_secs(3);
        c.insecure_api = false;
    })
    .await;
    let app = Backend::start("market").await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = TestSidecar::config(&cp.url(), "market", "m1", app.addr, dir.path());
    cfg.identity_token = Some(cp.token("market").await);
    cfg.control_plane_ca = Some(cp.ca_pem());
    let sc = TestSidecar::start(cfg).await;
    eventually(WAIT, "m1 registered over the TLS API with its certificate", || async {
        cp.endpoints("market").await == ["m1"]
    })
    .await;
    // It waited for its certificate before opening a session: nothing was refused.
    let refused =
        mesh_testkit::http_metric(cp.admin, "mesh_control_plane_api_refused_total{code=\"unauthenticated\"}");
    assert_eq!(refused.await, 0.0);
    eventually(WAIT, "a certificate for spiffe://mesh.local/service/market", || async {
        get(sc.admin, "admin", "/config").await.1.contains("spiffe://mesh.local/service/market")
    })
    .await;
    // 3 s certificates renew 2 s after issue: two renewals within a few seconds.
    eventually(WAIT, "two renewals", || async {
        metric(&get(sc.admin, "admin", "/metrics").await.1, "mesh_sidecar_certificate_rotations_total") >= 2.0
    })
    .await;
    let m = get(sc.admin, "admin", "/metrics").await.1;
    let expiry = metric(&m, "mesh_sidecar_certificate_expiry_timestamp_seconds");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(
        expiry > now - 1.0 && expiry <= now + 4.0,
        "the current certificate expires soon after now: {expiry} vs {now}"
    );
    assert_eq!(metric(&m, "mesh_sidecar_certificate_failures_total"), 0.0);
    // The control plane's proxy-status shows the node's identity, expiry and rotations.
    let status = v1::admin_client::AdminClient::new(cp.channel().await)
        .proxy_status(v1::ProxyStatusRequest { service: "market".into() })
        .await
        .unwrap()
        .into_inner();
    let p = status.proxies.iter().find(|p| p.node_id == "m1").expect("m1 in proxy-status");
    assert_eq!(p.spiffe_id, "spiffe://mesh.local/service/market");
    assert!(p.certificates_issued >= 3, "{p:?}");
    assert!(p.certificate_expires_unix_ms as f64 / 1000.0 > now - 1.0, "{p:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_for_another_service_gets_no_certificate() {
    let cp = TestCp::start().await;
    let app = Backend::start("market").await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = TestSidecar::config(&cp.url(), "market", "m1", app.addr, dir.path());
    cfg.identity_token = Some(cp.token("payments").await);
    let sc = TestSidecar::start(cfg).await;
    eventually(WAIT, "the CA refuses", || async {
        metric(&get(sc.admin, "admin", "/metrics").await.1, "mesh_sidecar_certificate_failures_total") >= 1.0
    })
    .await;
    let config = get(sc.admin, "admin", "/config").await.1;
    assert!(config.contains("\"identity\":null"), "{config}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_certificate_a_sidecar_cannot_register_and_says_why() {
    let cp = TestCp::start_secure().await;
    let app = Backend::start("market").await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = TestSidecar::config(&cp.url(), "market", "m1", app.addr, dir.path());
    cfg.control_plane_ca = Some(cp.ca_pem());
    let sc = TestSidecar::start(cfg).await;
    eventually(WAIT, "the refusal in /config", || async {
        get(sc.admin, "admin", "/config").await.1.contains("no credential to")
    })
    .await;
    assert!(cp.endpoints("market").await.is_empty(), "not registered");
    let (status, ready) = get(sc.admin, "admin", "/ready").await;
    assert_eq!(status, 503, "{ready}");
}
