//! Fail-static: the data plane keeps serving when the control plane dies, and a sidecar
//! restarted while it is down serves from its snapshot.

use std::time::Duration;

use mesh_proto::v1;
use mesh_testkit::{
    Backend, Load, Process, TestCp, TestSidecar, WAIT, backend_of, channel, eventually, fast_policy, get,
};

async fn set_policy(addr: std::net::SocketAddr, service: &str) {
    v1::policy_client::PolicyClient::new(channel(addr).await)
        .set(v1::SetPolicyRequest {
            service: service.into(),
            policy: Some((&fast_policy()).into()),
            ..Default::default()
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_sigkill_under_steady_load_fails_no_request_and_streams_reconnect() {
    let cp_dir = tempfile::tempdir().unwrap();
    let cp = Process::start("control-plane", &mesh_testkit::control_plane_args(cp_dir.path(), "127.0.0.1:0"));
    let grpc = cp.addr("grpc");
    let url = format!("http://{grpc}");
    set_policy(grpc, "market").await;
    set_policy(grpc, "web").await;

    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let backends = [Backend::start("m0").await, Backend::start("m1").await];
    let mut sidecars = Vec::new();
    for (i, b) in backends.iter().enumerate() {
        sidecars.push(
            TestSidecar::start(TestSidecar::config(&url, "market", &format!("m{i}"), b.addr, dirs[i].path()))
                .await,
        );
    }
    let app = Backend::start("web").await;
    let mut cfg = TestSidecar::config(&url, "web", "web-1", app.addr, dirs[2].path());
    cfg.upstreams = vec!["market".into()];
    let caller = TestSidecar::start(cfg).await;
    eventually(WAIT, "both market instances serve", || async {
        let _ = get(caller.outbound, "market", "/").await;
        backends.iter().all(|b| b.hits() > 0)
    })
    .await;

    let load = Load::start(caller.outbound, "market", "/work", 4);
    load.wait_more(100, "load flows").await;

    cp.kill9();
    load.wait_more(500, "load keeps flowing with the control plane dead").await;
    // The outage lasts well past the instances' 400 ms TTL (the scenario's length, not a wait;
    // MESH_OUTAGE_SECS=30 for the evidence run).
    let outage: u64 = std::env::var("MESH_OUTAGE_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    tokio::time::sleep(Duration::from_secs(outage)).await;
    eprintln!("outage of {outage}s: {} requests served so far, none failed", load.ok());
    eventually(WAIT, "every sidecar notices", || async {
        caller.config_json().await["control_plane"]["connected"] == false
    })
    .await;

    // Back on the same address: every stream reconnects, nothing was expired by the restart.
    let _cp =
        Process::start("control-plane", &mesh_testkit::control_plane_args(cp_dir.path(), &grpc.to_string()));
    for s in sidecars.iter().chain([&caller]) {
        eventually(WAIT, "sidecar reconnects", || async {
            s.config_json().await["control_plane"]["connected"] == true
        })
        .await;
    }
    load.wait_more(300, "load keeps flowing after the restart").await;
    load.stop_expecting_no_failures().await;
    let after: std::collections::HashSet<String> =
        futures::future::join_all((0..20).map(|_| get(caller.outbound, "market", "/")))
            .await
            .into_iter()
            .map(|(_, b)| backend_of(&b))
            .collect();
    assert_eq!(after.len(), 2, "both instances still in rotation: {after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_restarted_while_the_control_plane_is_down_serves_from_its_snapshot() {
    let cp = TestCp::start().await;
    cp.set_policy("market", &fast_policy()).await;
    cp.set_policy("web", &fast_policy()).await;
    let (bdir, cdir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let backend = Backend::start("m0").await;
    let _market =
        TestSidecar::start(TestSidecar::config(&cp.url(), "market", "m0", backend.addr, bdir.path())).await;
    let app = Backend::start("web").await;
    let mut cfg = TestSidecar::config(&cp.url(), "web", "web-1", app.addr, cdir.path());
    cfg.upstreams = vec!["market".into()];
    let caller = TestSidecar::start(cfg.clone()).await;
    eventually(WAIT, "the caller reaches market", || async {
        get(caller.outbound, "market", "/").await.0 == 200
    })
    .await;

    cp.stop().await;
    caller.stop().await;
    assert!(cdir.path().join("snapshot.json").exists());

    let caller = TestSidecar::start(cfg).await;
    let (status, body) = get(caller.outbound, "market", "/from-snapshot").await;
    assert_eq!((status, backend_of(&body).as_str()), (200, "m0"), "{body}");
    let c = caller.config_json().await;
    let market =
        c["upstreams"].as_array().unwrap().iter().find(|u| u["service"] == "market").unwrap().clone();
    assert_eq!(market["source"], "snapshot");
    assert_eq!(c["control_plane"]["connected"], false);
    let (status, _) = get(caller.admin, "admin", "/ready").await;
    assert_eq!(status, 200, "ready from the snapshot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_services_resolve_through_dns() {
    let cp = TestCp::start().await;
    let backend = Backend::start("outside").await;
    let mut p = fast_policy();
    p.external =
        Some(mesh_proto::policy::ExternalService { host: "localhost".into(), port: backend.addr.port() });
    cp.set_policy("payments", &p).await;
    cp.set_policy("web", &fast_policy()).await;
    let dir = tempfile::tempdir().unwrap();
    let app = Backend::start("web").await;
    let caller =
        TestSidecar::start(TestSidecar::config(&cp.url(), "web", "web-1", app.addr, dir.path())).await;
    eventually(WAIT, "the external service answers", || async {
        get(caller.outbound, "payments", "/charge").await.0 == 200
    })
    .await;
    let c = caller.config_json().await;
    let up = c["upstreams"].as_array().unwrap().iter().find(|u| u["service"] == "payments").unwrap().clone();
    assert_eq!(up["source"], "dns");
    assert_eq!(up["endpoints"][0]["address"], format!("127.0.0.1:{}", backend.addr.port()));
}
