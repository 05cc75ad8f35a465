//! Issue #19.6: the Grafana dashboards the deploy stack provisions load, and a real Prometheus
//! (Debian's) scraping a running mesh answers **every** PromQL expression in them with data;
//! `promtool check config` accepts the deploy stack's Prometheus configuration.

use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;

use crate::local::LocalMesh;

fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Every PromQL expression of every dashboard, with where it is.
fn expressions() -> Vec<(String, String)> {
    let dir = root().join("deploy/grafana/dashboards");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let d: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{} does not load: {e}", path.display()));
        assert!(d["uid"].is_string() && d["title"].is_string(), "{}: uid and title", path.display());
        for p in d["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().unwrap() {
                let at = format!(
                    "{} / {}",
                    path.file_name().unwrap().to_string_lossy(),
                    p["title"].as_str().unwrap()
                );
                out.push((at, t["expr"].as_str().unwrap().to_string()));
            }
        }
    }
    assert!(out.len() >= 15, "the dashboards have their panels: {out:?}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_returns_data_from_a_real_prometheus_scraping_the_mesh() {
    let (Some(prometheus), Some(promtool)) =
        (crate::deploy::program("prometheus"), crate::deploy::program("promtool"))
    else {
        return;
    };
    let checked = std::process::Command::new(&promtool)
        .args(["check", "config", "--syntax-only"])
        .arg(root().join("deploy/prometheus/prometheus.yml"))
        .output()
        .unwrap();
    assert!(checked.status.success(), "{}", String::from_utf8_lossy(&checked.stdout));
    let exprs = expressions();

    let mesh = LocalMesh::start(&[]);
    let gw: std::net::SocketAddr = mesh.gateway().trim_start_matches("http://").parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let targets: Vec<String> = mesh
        .metrics_urls()
        .iter()
        .map(|u| format!("\"{}\"", u.trim_start_matches("http://").trim_end_matches("/metrics")))
        .collect();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!("global: {{ scrape_interval: 1s }}\nscrape_configs:\n  - job_name: mesh\n    static_configs: [{{ targets: [{}] }}]\n", targets.join(", ")),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut server = tokio::process::Command::new(&prometheus)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let prom: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let query = |q: String| async move {
        let path = format!("/api/v1/query?query={}", url_encode(&q));
        let (status, body) = mesh_testkit::get(prom, "prometheus", &path).await;
        (status, serde_json::from_str::<Value>(&body).unwrap_or(Value::Null))
    };
    // Traffic through the edge while Prometheus scrapes, so every rate has samples to work on.
    let traffic = tokio::spawn(async move {
        loop {
            mesh_testkit::request(gw, "GET", "example.com", "/api/markets", &[], Bytes::new()).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    mesh_testkit::eventually(
        Duration::from_secs(60),
        "Prometheus scrapes every part of the mesh",
        || async {
            let (_, v) = query("sum(up)".into()).await;
            v["data"]["result"][0]["value"][1].as_str() == Some(&targets.len().to_string())
        },
    )
    .await;
    for (at, expr) in &exprs {
        mesh_testkit::eventually(Duration::from_secs(60), &format!("{at}: {expr} returns data"), || async {
            let (status, v) = query(expr.clone()).await;
            assert_eq!((status, &v["status"]), (200, &Value::from("success")), "{at}: {expr}: {v}");
            v["data"]["result"].as_array().is_some_and(|r| !r.is_empty())
        })
        .await;
    }
    traffic.abort();
    let _ = server.kill().await;
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
