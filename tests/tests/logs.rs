//! Issue #19.2: `--log-format json` on every binary — here through `meshctl --log-format json
//! up`, which passes it to every process it starts: each line of each log is one JSON object
//! (time, level, message), no ANSI colours, and a request's lines carry its trace id.

use bytes::Bytes;
use serde_json::Value;

use crate::local::LocalMesh;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_process_logs_json_lines_and_a_request_carries_its_trace_id() {
    let mesh = LocalMesh::start(&[("MESH_LOG_FORMAT", "json"), ("MESH_LOG", "info,sidecar=debug")]);
    let gw: std::net::SocketAddr = mesh.gateway().trim_start_matches("http://").parse().unwrap();
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traceparent = format!("00-{trace}-00f067aa0ba902b7-01");
    mesh_testkit::eventually(
        mesh_testkit::WAIT,
        "the gateway's log has the request, with its trace id",
        || async {
            let (status, _) = mesh_testkit::request(
                gw,
                "GET",
                "example.com",
                "/api/markets",
                &[("traceparent", &traceparent)],
                Bytes::new(),
            )
            .await;
            let log = std::fs::read_to_string(mesh.state.join("logs/gateway.log")).unwrap_or_default();
            status == 200 && log.lines().any(|l| l.contains(trace))
        },
    )
    .await;
    let logs: Vec<_> = std::fs::read_dir(mesh.state.join("logs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "log") && !p.ends_with("gateway-access.log"))
        .collect();
    assert!(logs.len() >= 6, "the control plane, two services, their sidecars, the gateway: {logs:?}");
    for path in &logs {
        let text = std::fs::read_to_string(path).unwrap();
        assert!(!text.contains('\u{1b}'), "{}: no ANSI escapes", path.display());
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{}: {e}: {line}", path.display()));
            assert!(v["timestamp"].is_string() && v["level"].is_string(), "{}: {line}", path.display());
        }
    }
    let gateway = std::fs::read_to_string(mesh.state.join("logs/gateway.log")).unwrap();
    let line: Value = gateway
        .lines()
        .filter(|l| l.contains(trace))
        .map(|l| serde_json::from_str(l).unwrap())
        .next()
        .unwrap();
    assert_eq!(line["span"]["trace_id"], trace, "the request's span names its trace: {line}");
}
