//! Issue #19.5: CloudEvents 1.0 through the mesh as the official Python SDK produces and reads
//! them — structured, batch and binary mode into `POST /events`; every optional and extension
//! attribute, a time with an offset, JSON, text and binary data (`data_base64`) — delivered to a
//! subscriber by webhook and parsed back with the SDK, attribute for attribute, byte for byte.

use std::{
    process::Stdio,
    sync::{Arc, Mutex},
};

use axum::{extract::State, http::HeaderMap, routing::post};
use bytes::Bytes;
use mesh_testkit::{TestCp, TestSidecar, WAIT, eventually};
use serde_json::{Value, json};
use sidecar::events::subscription::Subscription;
use tokio::io::AsyncWriteExt;

type Received = Arc<Mutex<Vec<Value>>>;

async fn hook(State(r): State<Received>, headers: HeaderMap, body: Bytes) -> axum::http::StatusCode {
    let headers: serde_json::Map<String, Value> =
        headers.iter().map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or_default()))).collect();
    r.lock().unwrap().push(json!({"headers": headers, "body_b64": mesh_runtime::base64(&body)}));
    axum::http::StatusCode::NO_CONTENT
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cloudevents_sdk_reads_back_exactly_what_it_sent_through_the_mesh() {
    let Ok(venv) = std::env::var("MESH_TEST_VENV") else {
        assert!(
            std::env::var("MESH_REQUIRE_POSTGRES").is_err(),
            "MESH_TEST_VENV: scripts/test-deps installs the SDK"
        );
        eprintln!("skipped: no MESH_TEST_VENV (run scripts/test-deps)");
        return;
    };
    let python = std::path::Path::new(&venv).join("bin/python");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cloudevents_sdk.py");

    let received: Received = Arc::default();
    let app = axum::Router::new()
        .route("/hooks", post(hook))
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_addr = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(
        axum::serve(listener, app).with_graceful_shutdown(stop.clone().cancelled_owned()).into_future(),
    );

    let cp = TestCp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = TestSidecar::config(&cp.url(), "ledger", "l1", app_addr, dir.path());
    cfg.subscriptions = vec![Subscription::parse("sdk-events=/hooks").unwrap()];
    let sc = TestSidecar::start(cfg).await;

    let produced = std::process::Command::new(&python).arg(&script).arg("produce").output().unwrap();
    assert!(produced.status.success(), "{}", String::from_utf8_lossy(&produced.stderr));
    let requests: Vec<Value> = serde_json::from_slice(&produced.stdout).unwrap();
    for r in &requests {
        let headers: Vec<(&str, &str)> = r["headers"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str().unwrap()))
            .collect();
        let body = Bytes::from(mesh_runtime::base64_decode(r["body_b64"].as_str().unwrap()).unwrap());
        let (status, answer) =
            mesh_testkit::request(sc.admin, "POST", "admin", "/events", &headers, body).await;
        assert_eq!(status, 202, "{r}: {answer}");
    }
    eventually(WAIT, "all six events delivered", || async { received.lock().unwrap().len() >= 6 }).await;

    let deliveries = Value::Array(received.lock().unwrap().clone()).to_string();
    sdk(&python, &script, "check", &deliveries).await;
    // Read back from the bus as CloudEvents JSON (what `meshctl events replay -o json` prints).
    let (status, page) =
        mesh_testkit::request(sc.admin, "GET", "admin", "/events/sdk-events", &[], Bytes::new()).await;
    assert_eq!(status, 200, "{page}");
    sdk(&python, &script, "replayed", &page).await;
    stop.cancel();
    let _ = server.await;
}

/// Runs the SDK script's `mode` on `input`; fails the test with its report unless it passes.
async fn sdk(python: &std::path::Path, script: &std::path::Path, mode: &str, input: &str) {
    let mut child = tokio::process::Command::new(python)
        .arg(script)
        .arg(mode)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).await.unwrap();
    let out = child.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "{mode}: {}{}\ninput: {input}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
