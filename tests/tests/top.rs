//! `meshctl top` against `meshctl up`: after traffic through the gateway, the gateway → market
//! service edge and the market service show up — once as JSON, and live in a pseudo-terminal
//! (`script`), redrawn in place.

use std::process::Command;

use mesh_testkit::{WAIT, bin, eventually};
use serde_json::Value;

use crate::local::LocalMesh;

#[tokio::test(flavor = "multi_thread")]
async fn top_shows_the_services_and_edges_that_carried_traffic() {
    let env = [("MESH_EDGE_REPORT_INTERVAL", "200ms")];
    let mesh = tokio::task::block_in_place(|| LocalMesh::start(&env));
    let gw: std::net::SocketAddr = mesh.gateway().trim_start_matches("http://").parse().unwrap();
    eventually(WAIT, "the gateway routes to market-service", || async {
        mesh_testkit::request(gw, "GET", "example.com", "/api/markets", &[], Default::default()).await.0
            == 200
    })
    .await;
    for _ in 0..10 {
        let (status, _) =
            mesh_testkit::request(gw, "GET", "example.com", "/api/markets", &[], Default::default()).await;
        assert_eq!(status, 200);
    }
    eventually(WAIT, "meshctl top lists the gateway → market-service edge", || async {
        let out = mesh.meshctl(&["-o", "json", "top", "--once"]);
        let top: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        top["edges"].as_array().into_iter().flatten().any(|e| {
            e["caller"] == "gateway"
                && e["callee"] == "market-service"
                && e["last_minute"]["requests"].as_u64().unwrap_or(0) >= 10
        })
    })
    .await;

    // Live, in a pseudo-terminal: the table is redrawn (home, clear) every interval.
    let quote = |p: &std::path::Path| format!("'{}'", p.display());
    let command = format!(
        "{} --control-plane {} --ca-file {} --admin-token-file {} top --interval 200ms",
        quote(&bin("meshctl")),
        mesh.address("control-plane"),
        quote(&mesh.state.join("control-plane/ca.pem")),
        quote(&mesh.state.join("control-plane/admin.token")),
    );
    let out_file = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new("script")
        .args(["-q", "-f", "-c", &command])
        .arg(out_file.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("script (util-linux) runs a command in a pseudo-terminal");
    eventually(WAIT, "meshctl top redraws its table in the terminal", || async {
        let text = std::fs::read_to_string(out_file.path()).unwrap_or_default();
        text.matches("\x1b[H\x1b[2J").count() >= 2
            && text.contains("market-service")
            && text.contains("RPS (1m)")
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
}
