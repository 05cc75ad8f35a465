//! Issue #19.3: every Prometheus endpoint of a running mesh passes `promtool check metrics`
//! (the Prometheus text format, answered by default), and answers OpenMetrics to a scraper that
//! asks for it.

use std::io::Write;

use crate::local::LocalMesh;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metrics_endpoint_passes_promtool_and_speaks_openmetrics_when_asked() {
    let Some(promtool) = crate::deploy::program("promtool") else { return };
    let mesh = LocalMesh::start(&[]);
    let urls = mesh.metrics_urls();
    // A traced request through the edge: its trace id becomes an exemplar of the latency
    // histograms of the hops it crossed.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let gw: std::net::SocketAddr = mesh.gateway().trim_start_matches("http://").parse().unwrap();
    let traced = [("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")];
    let (status, _) =
        mesh_testkit::request(gw, "GET", "example.com", "/api/markets", &traced, Default::default()).await;
    assert_eq!(status, 200);
    let mut exemplars = 0;
    assert_eq!(urls.len(), 4, "the control plane, two sidecars and the gateway: {urls:?}");
    for url in &urls {
        let addr: std::net::SocketAddr =
            url.trim_start_matches("http://").trim_end_matches("/metrics").parse().unwrap();
        let (status, headers, text) =
            mesh_testkit::request_full(addr, "GET", "admin", "/metrics", &[], Default::default()).await;
        assert_eq!(status, 200, "{url}");
        assert!(headers["content-type"].to_str().unwrap().starts_with("text/plain; version=0.0.4"), "{url}");
        let check = std::process::Command::new(&promtool)
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .output_with_stdin(text.as_bytes());
        assert!(check.0.success(), "promtool check metrics {url}:\n{}", check.1);

        let asked = [("accept", "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5")];
        let (_, headers, om) =
            mesh_testkit::request_full(addr, "GET", "admin", "/metrics", &asked, Default::default()).await;
        assert!(
            headers["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"),
            "{url}"
        );
        assert!(om.ends_with("# EOF\n"), "{url}: an OpenMetrics exposition ends with # EOF");
        let exemplar = format!("# {{trace_id=\"{trace}\"}}");
        if om
            .lines()
            .any(|l| l.starts_with("mesh_sidecar_request_duration_seconds_bucket") && l.contains(&exemplar))
        {
            exemplars += 1;
        }
        assert!(!text.contains(&exemplar), "{url}: no exemplars in the Prometheus text format");
    }
    assert!(
        exemplars >= 2,
        "the gateway's and the market sidecar's latency buckets name the trace ({exemplars})"
    );
}

/// Runs a command with `input` on its stdin: (status, stdout and stderr).
trait WithStdin {
    fn output_with_stdin(&mut self, input: &[u8]) -> (std::process::ExitStatus, String);
}

impl WithStdin for std::process::Command {
    fn output_with_stdin(&mut self, input: &[u8]) -> (std::process::ExitStatus, String) {
        let mut child =
            self.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status,
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    }
}
