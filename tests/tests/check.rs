//! Issue #20.4 (`meshctl check`): a running mesh passes every check; a certificate closer to
//! expiry than asked, a sidecar that NACKed a policy, or no control plane, fails — naming what
//! and what to do — with exit 1.

use crate::local::LocalMesh;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshctl_check_passes_a_healthy_mesh_and_names_what_fails() {
    let mesh = LocalMesh::start(&[]);
    mesh_testkit::eventually(mesh_testkit::WAIT, "every check passes", || async {
        let out = mesh.meshctl(&["check"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        out.status.success()
            && ["control plane", "instances", "proxies", "convergence", "certificates", "event bus"]
                .iter()
                .all(|c| text.lines().any(|l| l.starts_with("ok") && l.contains(c)))
    })
    .await;
    // `meshctl up` sets the market service's policy once its processes run: a check between
    // that and the gateway's ACK fails convergence, rightly. Eventually only the margin fails.
    let failed_checks = || {
        let out = mesh.meshctl(&["-o", "json", "check", "--cert-margin", "1000d"]);
        assert_eq!(out.status.code(), Some(1));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let failed: Vec<String> = v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["ok"] == false)
            .map(|c| c["check"].as_str().unwrap().to_string())
            .collect();
        (failed, v)
    };
    mesh_testkit::eventually(mesh_testkit::WAIT, "only the certificate margin fails", || async {
        failed_checks().0 == ["certificates"]
    })
    .await;
    let (_, v) = failed_checks();
    assert!(
        v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["ok"] == true || !c["fix"].as_str().unwrap().is_empty())
    );

    // A sidecar that NACKs: the gateway's data directory becomes a file (its open files kept),
    // so it cannot make the next policy of the service it calls durable and refuses it.
    let gateway_dir = mesh.state.join("gateway");
    std::fs::rename(&gateway_dir, mesh.state.join("gateway.moved")).unwrap();
    std::fs::write(&gateway_dir, b"").unwrap();
    let policy = mesh.state.join("retries.yaml");
    std::fs::write(&policy, "retry: { max_attempts: 3 }\n").unwrap();
    let set = mesh.meshctl(&["policy", "set", "market-service", "-f", policy.to_str().unwrap()]);
    assert!(set.status.success(), "{set:?}");
    mesh_testkit::eventually(mesh_testkit::WAIT, "check names the gateway's NACK", || async {
        let out = mesh.meshctl(&["check"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        out.status.code() == Some(1)
            && text.lines().any(|l| {
                l.starts_with("FAIL")
                    && l.contains("convergence")
                    && l.contains("gateway NACKed market-service")
                    && l.contains("durable")
            })
    })
    .await;

    let nowhere = std::process::Command::new(mesh_testkit::bin("meshctl"))
        .args(["--control-plane", "https://127.0.0.1:1", "check"])
        .output()
        .unwrap();
    assert_eq!(nowhere.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&nowhere.stdout).contains("FAIL  control plane"), "{nowhere:?}");
}
