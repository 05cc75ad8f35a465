//! Issue #18.4: the market service's OpenAPI document as users' tools read it —
//! `openapi-spec-validator` accepts it, and schemathesis (`--checks all`, a bounded number of
//! examples per operation) finds nothing against the running service, reached as a client
//! reaches it: through `meshctl up`'s gateway, with a token from its issuer.

use std::{process::Command, time::Duration};

use mesh_testkit::{WAIT, bin, eventually, get};

use crate::local::LocalMesh;

/// Examples per operation: enough to reach every operation's statuses, bounded for CI.
const EXAMPLES: &str = "25";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_market_api_description_passes_the_stock_validator_and_schemathesis() {
    let Some(venv) = crate::deploy::validator("st").and_then(|st| st.parent().map(|d| d.to_path_buf()))
    else {
        return;
    };
    // The edge's automatic block of a client after repeated refusals is off: schemathesis sends
    // nothing but refusable requests from one address.
    let mesh = LocalMesh::start(&[("MESH_BLOCK_AFTER", "0")]);
    let dir = tempfile::tempdir().unwrap();
    let gateway = mesh.gateway();
    let gw: std::net::SocketAddr = gateway.trim_start_matches("http://").parse().unwrap();

    // The whole API behind the gateway (meshctl up publishes only /api/…): one route to the
    // service, its screening off so what schemathesis sends reaches the service.
    let routes = dir.path().join("routes.yaml");
    std::fs::write(&routes, "routes:\n  - { prefix: /, service: market-service, threats: off }\n").unwrap();
    let set = mesh.meshctl(&["gateway", "set", "-f", routes.to_str().unwrap()]);
    assert!(set.status.success(), "{}", String::from_utf8_lossy(&set.stderr));
    eventually(WAIT, "the gateway serves the API description", || async {
        get(gw, "example.com", "/openapi.json").await.0 == 200
    })
    .await;
    let doc = dir.path().join("openapi.json");
    std::fs::write(&doc, get(gw, "example.com", "/openapi.json").await.1).unwrap();

    let validated = Command::new(venv.join("openapi-spec-validator")).arg(&doc).output().unwrap();
    assert!(
        validated.status.success(),
        "openapi-spec-validator: {}{}",
        String::from_utf8_lossy(&validated.stdout),
        String::from_utf8_lossy(&validated.stderr)
    );

    let alice = Command::new(bin("meshctl"))
        .args(["token", "issue", "--sub", "alice", "--ttl", "10m", "--dir"])
        .arg(&mesh.state)
        .output()
        .unwrap();
    let alice = String::from_utf8(alice.stdout).unwrap().trim().to_string();
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemathesis/schemathesis.toml");
    let run = tokio::process::Command::new(venv.join("st"))
        .arg("--config-file")
        .arg(&config)
        .args(["run", &format!("{gateway}/openapi.json"), "--checks", "all", "--max-examples", EXAMPLES])
        .args(["--seed", "1", "--no-color", "-H", &format!("Authorization: Bearer {alice}")])
        .current_dir(dir.path())
        .kill_on_drop(true)
        .output();
    let out =
        tokio::time::timeout(Duration::from_secs(600), run).await.expect("schemathesis finished").unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        report.contains("Tested: 22") || report.contains("Selected: 22/22"),
        "every operation was tested:\n{report}"
    );
}
