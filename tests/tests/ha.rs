//! Issue #21: `meshctl up --store etcd --replicas 3` runs a local HA mesh — etcd, NATS, three
//! control-plane replicas, sidecars spread over them — and the mesh keeps serving through the
//! gateway when a replica is SIGKILLed.

use std::time::Duration;

use crate::local::LocalMesh;
use mesh_testkit::{Load, WAIT, eventually};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshctl_up_runs_three_replicas_on_etcd_and_survives_losing_one() {
    if mesh_testkit::etcd_binary().is_none() {
        return;
    }
    let mesh =
        tokio::task::block_in_place(|| LocalMesh::start_up(&["--store", "etcd", "--replicas", "3"], &[]));
    for p in ["etcd", "nats", "control-plane", "control-plane-2", "control-plane-3", "gateway"] {
        assert!(mesh.pid(p) > 0, "{p} runs");
    }
    let gw: std::net::SocketAddr = mesh.gateway().trim_start_matches("http://").parse().unwrap();
    let (status, _) = mesh_testkit::get(gw, "example.com", "/api/markets").await;
    assert_eq!(status, 200);

    // Every replica shows every proxy (two sidecars and the gateway), whichever it is on.
    let replicas: Vec<String> =
        ["control-plane", "control-plane-2", "control-plane-3"].iter().map(|p| mesh.address(p)).collect();
    for url in &replicas {
        eventually(WAIT, "every replica lists the three proxies", || async {
            let out = tokio::task::block_in_place(|| mesh.meshctl_at(url, &["-o", "json", "proxy-status"]));
            let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            let proxies = v.as_array().cloned().unwrap_or_default();
            let replicas_used: std::collections::BTreeSet<String> =
                proxies.iter().filter_map(|p| p["replica"].as_str().map(str::to_string)).collect();
            proxies.len() == 3 && replicas_used.len() == 3
        })
        .await;
    }

    // The first replica dies under load: no request through the edge fails, and `meshctl up`
    // restarts it.
    let load = Load::start(gw, "example.com", "/api/markets", 2);
    load.wait_more(100, "requests before the kill").await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(mesh.pid("control-plane")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    load.wait_more(300, "requests after the kill").await;
    let url = replicas[1].clone();
    eventually(Duration::from_secs(30), "the instances stay healthy on the other replicas", || async {
        let out = tokio::task::block_in_place(|| {
            mesh.meshctl_at(&url, &["-o", "json", "instances", "market-service"])
        });
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let healthy = v.as_array().into_iter().flatten().filter(|i| i["health"] == "healthy").count();
        healthy == 2
    })
    .await;
    assert!(load.stop_expecting_no_failures().await >= 400);
}
