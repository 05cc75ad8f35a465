//! `meshctl tap` against `meshctl up`: while it runs, a request sent through the gateway shows
//! up — from the market service's sidecars, with its trace id and caller — within a
//! second; `--path` filters; request bodies never do; without the admin token there is no tap.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use mesh_testkit::{WAIT, bin, eventually, request};
use serde_json::Value;

use crate::local::LocalMesh;

/// `meshctl -o json tap ARGS`: its records, read on a thread, as they come.
fn tap(mesh: &LocalMesh, args: &[&str]) -> (std::process::Child, mpsc::Receiver<Value>) {
    let mut child = Command::new(bin("meshctl"))
        .args(["--control-plane", &mesh.address("control-plane"), "--ca-file"])
        .arg(mesh.state.join("control-plane/ca.pem"))
        .arg("--admin-token-file")
        .arg(mesh.state.join("control-plane/admin.token"))
        .args(["-o", "json", "tap"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&line) {
                let _ = tx.send(v);
            }
        }
    });
    (child, rx)
}

#[tokio::test(flavor = "multi_thread")]
async fn tap_shows_a_request_within_a_second() {
    let mesh = tokio::task::block_in_place(|| LocalMesh::start(&[]));
    let gw: std::net::SocketAddr = mesh.gateway().trim_start_matches("http://").parse().unwrap();
    eventually(WAIT, "the gateway routes to market-service", || async {
        request(gw, "GET", "example.com", "/api/markets", &[], Default::default()).await.0 == 200
    })
    .await;
    let (mut child, records) = tap(&mesh, &["market-service", "--path", "/markets"]);
    // The tap reaches the proxies asynchronously: requests until one is seen.
    let traced = |n: u32| format!("00-{:032x}-00f067aa0ba902b7-01", 0xabc000 + n);
    let mut n = 0;
    eventually(WAIT, "the tap is on at the market service's sidecars", || {
        n += 1;
        let tp = traced(n);
        let records = &records;
        async move {
            request(
                gw,
                "GET",
                "example.com",
                "/api/markets",
                &[("traceparent", tp.as_str())],
                Default::default(),
            )
            .await;
            std::iter::from_fn(|| records.recv_timeout(Duration::from_millis(200)).ok()).count() > 0
        }
    })
    .await;
    while records.try_recv().is_ok() {}

    // Now a request with its own trace: seen within a second, from the inbound side, with the
    // caller's identity and no body.
    let tp = traced(999);
    let trace = &tp[3..35];
    let sent = Instant::now();
    let (status, _) = request(
        gw,
        "POST",
        "example.com",
        "/api/markets",
        &[("traceparent", tp.as_str()), ("content-type", "application/json")],
        "{\"secret\":\"do-not-tap\"}".into(),
    )
    .await;
    assert!(status >= 400, "an anonymous write with a stray field is refused — and still tapped: {status}");
    let record = loop {
        let r = records.recv_timeout(Duration::from_secs(1)).expect("the request's record within a second");
        if r["trace_id"] == trace {
            break r;
        }
    };
    assert!(sent.elapsed() < Duration::from_secs(1), "{:?}", sent.elapsed());
    assert_eq!(record["service"], "market-service");
    assert_eq!(record["direction"], "inbound");
    assert_eq!(record["caller"], "gateway", "the verified caller");
    assert_eq!((record["method"].as_str(), record["path"].as_str()), (Some("POST"), Some("/markets")));
    assert_eq!(record["status"], status);
    assert!(record["node_id"].as_str().unwrap().starts_with("market-service-"), "{record}");
    assert!(!record.to_string().contains("do-not-tap"), "never a body: {record}");
    // `--path /markets` keeps other paths out.
    request(gw, "GET", "example.com", "/api/accounts/me", &[], Default::default()).await;
    let later: Vec<Value> =
        std::iter::from_fn(|| records.recv_timeout(Duration::from_millis(300)).ok()).collect();
    assert!(later.iter().all(|r| r["path"].as_str().unwrap_or("").starts_with("/markets")), "{later:?}");
    let _ = child.kill();
    let _ = child.wait();

    // Admins only: a bad token is refused with the reason.
    let refused = Command::new(bin("meshctl"))
        .args(["--control-plane", &mesh.address("control-plane"), "--ca-file"])
        .arg(mesh.state.join("control-plane/ca.pem"))
        .arg("--admin-token-file")
        .arg("/dev/null")
        .args(["tap", "market-service"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
}
