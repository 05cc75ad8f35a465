//! The control plane's live dashboard in a real headless browser (Debian's chromium through
//! selenium, `tests/dashboard/dashboard.py`) against `meshctl up`: after traffic through the
//! gateway it shows both services, the edge between them and the convergence table; an event
//! published while it is open appears in its live tail; it signs in with the admin token only;
//! it fits a phone; it loads nothing from outside loopback. Screenshots are written to
//! `target/test-artifacts/`.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
};

use mesh_testkit::{WAIT, eventually, request};
use serde_json::json;

use crate::local::LocalMesh;

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_shows_the_mesh_live_in_a_real_browser() {
    let Some(python) = crate::deploy::validator("python") else { return };
    let mesh = tokio::task::block_in_place(|| LocalMesh::start(&[("MESH_EDGE_REPORT_INTERVAL", "200ms")]));
    let cp = crate::management::admin_listener(&mesh);
    let token =
        std::fs::read_to_string(mesh.state.join("control-plane/admin.token")).unwrap().trim().to_string();
    let gw: std::net::SocketAddr = mesh.gateway().trim_start_matches("http://").parse().unwrap();
    eventually(WAIT, "the gateway routes to market-service", || async {
        request(gw, "GET", "example.com", "/api/markets", &[], Default::default()).await.0 == 200
    })
    .await;
    for _ in 0..20 {
        assert_eq!(request(gw, "GET", "example.com", "/api/markets", &[], Default::default()).await.0, 200);
    }
    let (status, page, _) = {
        let (s, h, b) = mesh_testkit::request_full(cp, "GET", "cp", "/", &[], Default::default()).await;
        (s, b, h)
    };
    assert_eq!(status, 200);
    assert!(
        !page.contains("http://") && !page.contains("https://") && !page.contains("//cdn"),
        "nothing from outside"
    );

    let shots = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&shots).unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboard/dashboard.py");
    let mut child = Command::new(python)
        .arg(script)
        .arg(format!("http://{cp}/"))
        .arg(&token)
        .arg(&shots)
        .arg("dash-1")
        .args(["gateway", "market-service", "in sync", "market-service-1", "policy of"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let ready = tokio::task::block_in_place(|| {
        for line in lines.by_ref() {
            let line = line.unwrap();
            seen.push(line.clone());
            if line == "ready" {
                return true;
            }
            if line.starts_with("FAIL") {
                return false;
            }
        }
        false
    });
    if ready {
        // Published while the page is open: the live tail must show it.
        let event = json!({"id": "dash-1", "type": "Announced", "subject": "all", "data": {}});
        let auth = format!("Bearer {token}");
        let (status, body) = request(
            cp,
            "POST",
            "cp",
            "/api/v1/events/market-events",
            &[("authorization", &auth), ("content-type", "application/json")],
            event.to_string().into(),
        )
        .await;
        assert_eq!(status, 201, "{body}");
    }
    let out = tokio::task::block_in_place(|| {
        seen.extend(lines.map_while(Result::ok));
        child.wait_with_output().unwrap()
    });
    assert!(
        ready && out.status.success(),
        "the dashboard in chromium:\n{}\n{}",
        seen.join("\n"),
        String::from_utf8_lossy(&out.stderr)
    );
    for step in ["sign-in ok", "tail ok", "screenshots ok", "loopback only ok", "live ok"] {
        assert!(seen.iter().any(|l| l == step), "{step}: {seen:?}");
    }
    assert!(shots.join("dashboard-1280x800.png").exists());
}
