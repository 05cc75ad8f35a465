//! Whole-mesh tests: a real control plane, real sidecars and real HTTP backends on loopback.

use std::{collections::HashMap, time::Duration};

use mesh_proto::policy::{Algorithm, ServicePolicy};
use mesh_testkit::{
    Backend, HttpClient, Load, TestCp, TestSidecar, WAIT, backend_of, eventually, fast_policy, get, request,
};

/// Three `market` backends, each behind its own sidecar, and a `web` sidecar whose app calls
/// `market`.
struct Mesh {
    cp: TestCp,
    backends: Vec<Backend>,
    sidecars: Vec<TestSidecar>,
    caller: TestSidecar,
    _caller_app: Backend,
    _dirs: Vec<tempfile::TempDir>,
    _proxies: Vec<mesh_testkit::FaultProxy>,
}

async fn mesh_with(policy: ServicePolicy, weights: &[u32]) -> Mesh {
    mesh_of(policy, weights, None).await
}

/// One `market` instance whose app sits behind a fault-injecting proxy.
async fn mesh_with_fault(policy: ServicePolicy, fault: mesh_testkit::Fault) -> Mesh {
    mesh_of(policy, &[100], Some(fault)).await
}

async fn mesh_of(policy: ServicePolicy, weights: &[u32], fault: Option<mesh_testkit::Fault>) -> Mesh {
    let cp = TestCp::start().await;
    let version = cp.set_policy("market", &policy).await;
    cp.set_policy("web", &fast_policy()).await;
    let mut dirs = Vec::new();
    let (mut backends, mut sidecars) = (Vec::new(), Vec::new());
    let mut proxies = Vec::new();
    for (i, w) in weights.iter().enumerate() {
        let b = Backend::start(&format!("m{i}")).await;
        let dir = tempfile::tempdir().unwrap();
        let app = match fault {
            Some(f) => {
                proxies.push(mesh_testkit::FaultProxy::start(b.addr, f).await);
                proxies[proxies.len() - 1].addr
            }
            None => b.addr,
        };
        let mut cfg = TestSidecar::config(&cp.url(), "market", &format!("m{i}"), app, dir.path());
        cfg.weight = *w;
        sidecars.push(TestSidecar::start(cfg).await);
        backends.push(b);
        dirs.push(dir);
    }
    let app = Backend::start("web").await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = TestSidecar::config(&cp.url(), "web", "web-1", app.addr, dir.path());
    cfg.upstreams = vec!["market".into()];
    let caller = TestSidecar::start(cfg).await;
    dirs.push(dir);
    let mesh = Mesh { cp, backends, sidecars, caller, _caller_app: app, _dirs: dirs, _proxies: proxies };
    mesh.wait_endpoints(weights.len()).await;
    // Endpoints and policy come on separate streams: wait for both before the test's requests.
    eventually(WAIT, "the caller applies the market policy", || async {
        market(&mesh.caller.config_json().await)["policy_version"] == version
    })
    .await;
    mesh
}

impl Mesh {
    async fn wait_endpoints(&self, n: usize) {
        eventually(WAIT, &format!("the caller sees {n} market endpoints"), || async {
            endpoint_ids(&self.caller).await.len() == n
        })
        .await;
    }

    async fn set_algorithm(&self, algorithm: Algorithm, header: Option<&str>) {
        let mut p = fast_policy();
        p.load_balancer.algorithm = algorithm;
        p.load_balancer.hash_header = header.map(str::to_string);
        let v = self.cp.set_policy("market", &p).await;
        eventually(WAIT, "the caller applies the new policy", || async {
            market(&self.caller.config_json().await)["policy_version"] == v
        })
        .await;
    }

    /// `tasks` clients sending `each` requests at once.
    async fn spread_concurrently(&self, tasks: usize, each: usize, path: &str) -> HashMap<String, usize> {
        let all = futures::future::join_all((0..tasks).map(|_| async {
            let client = HttpClient::default();
            let mut got = Vec::new();
            for _ in 0..each {
                let (status, body) = client.get(self.caller.outbound, "market", path).await;
                assert_eq!(status, 200, "{body}");
                got.push(backend_of(&body));
            }
            got
        }))
        .await;
        let mut out = HashMap::new();
        for b in all.into_iter().flatten() {
            *out.entry(b).or_default() += 1;
        }
        out
    }

    async fn spread(&self, n: usize, headers: &[(&str, &str)]) -> HashMap<String, usize> {
        let mut out = HashMap::new();
        for _ in 0..n {
            let (status, body) =
                request(self.caller.outbound, "GET", "market", "/work", headers, Default::default()).await;
            assert_eq!(status, 200, "{body}");
            *out.entry(backend_of(&body)).or_default() += 1;
        }
        out
    }
}

fn market(config: &serde_json::Value) -> serde_json::Value {
    config["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["service"] == "market")
        .cloned()
        .unwrap_or_default()
}

async fn endpoint_ids(s: &TestSidecar) -> Vec<String> {
    let m = market(&s.config_json().await);
    let mut ids: Vec<String> = m["endpoints"]
        .as_array()
        .map(|a| a.iter().map(|e| e["id"].as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_balancer_distributes_over_three_endpoints_and_changes_live() {
    let mesh = mesh_with(fast_policy(), &[100, 100, 400]).await;

    mesh.set_algorithm(Algorithm::RoundRobin, None).await;
    let c = mesh.spread(300, &[]).await;
    assert_eq!((c["m0"], c["m1"], c["m2"]), (100, 100, 100), "round_robin: {c:?}");

    for algo in [Algorithm::Random, Algorithm::LeastConnections] {
        mesh.set_algorithm(algo, None).await;
        let c = mesh.spread(300, &[]).await;
        assert!(c.len() == 3 && c.values().all(|n| *n >= 30), "{algo:?}: {c:?}");
    }
    // p2c weighs latency × in-flight: with equal backends under concurrent load it spreads.
    mesh.set_algorithm(Algorithm::P2cPeakEwma, None).await;
    let c = mesh.spread_concurrently(16, 20, "/work?delay_ms=5").await;
    assert!(c.len() == 3 && c.values().all(|n| *n >= 16), "p2c under load: {c:?}");

    mesh.set_algorithm(Algorithm::Weighted, None).await;
    let c = mesh.spread(600, &[]).await;
    assert!(c["m2"] > 300 && c["m0"] > 40 && c["m1"] > 40, "weighted 1:1:4: {c:?}");

    mesh.set_algorithm(Algorithm::ConsistentHash, Some("x-user")).await;
    for user in ["alice", "bob", "carol", "dave"] {
        let c = mesh.spread(10, &[("x-user", user)]).await;
        assert_eq!(c.len(), 1, "{user} always lands on one endpoint: {c:?}");
    }
    let mut seen = std::collections::HashSet::new();
    for u in 0..60 {
        let user = format!("user-{u}");
        seen.extend(mesh.spread(1, &[("x-user", user.as_str())]).await.into_keys());
    }
    assert_eq!(seen.len(), 3, "keys spread over every endpoint");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_prefers_the_fast_endpoint() {
    let mut p = fast_policy();
    p.load_balancer.algorithm = Algorithm::P2cPeakEwma;
    let mesh = mesh_with(p, &[100, 100, 100]).await;
    mesh.backends[1].delay_ms.store(25, std::sync::atomic::Ordering::Relaxed);
    mesh.backends[2].delay_ms.store(25, std::sync::atomic::Ordering::Relaxed);
    let c = mesh.spread(200, &[]).await;
    // The fast one wins every pair it is in (2/3 of pairs): well above a fair third.
    assert!(c["m0"] > 100, "the fast endpoint takes most requests: {c:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_services_and_bad_authorities_get_json_errors_at_once() {
    let mesh = mesh_with(fast_policy(), &[100]).await;
    let t = tokio::time::Instant::now();
    let (status, body) = get(mesh.caller.outbound, "nobody-here", "/x").await;
    assert_eq!(status, 503, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((v["error"].as_str(), v["service"].as_str()), (Some("no_endpoints"), Some("nobody-here")));
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "answered after one control-plane round trip, not a timeout"
    );

    let (status, body) = get(mesh.caller.outbound, "Not_A_Service", "/x").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("unknown_authority"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_the_policy_timeout_gets_504_with_a_reason() {
    let mut p = fast_policy();
    p.timeout.request = Duration::from_millis(200);
    let mesh = mesh_with(p, &[100]).await;
    let t = tokio::time::Instant::now();
    let (status, body) = get(mesh.caller.outbound, "market", "/slow?delay_ms=3000").await;
    assert_eq!(status, 504, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((v["error"].as_str(), v["service"].as_str()), (Some("timeout"), Some("market")));
    assert!(v["message"].as_str().unwrap().contains("200ms"), "{v}");
    assert!(t.elapsed() < Duration::from_secs(2), "answered at the deadline, not when the app finished");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_carry_trace_context_and_forged_identity_never_reaches_the_app() {
    let mesh = mesh_with(fast_policy(), &[100]).await;
    let (status, body) = request(
        mesh.caller.outbound,
        "GET",
        "market",
        "/who?x=1",
        &[
            ("x-mesh-caller", "spiffe://evil/service/admin"),
            ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ],
        Default::default(),
    )
    .await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let h = &v["headers"];
    assert!(h.get("x-mesh-caller").is_none(), "forged identity stripped: {h}");
    assert!(h["traceparent"].as_str().unwrap().starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
    assert!(!h["traceparent"].as_str().unwrap().contains("00f067aa0ba902b7"), "each hop adds a span");
    assert!(!h["x-request-id"].as_str().unwrap().is_empty());
    assert_eq!(v["path"], "/who");
    assert_eq!(h["host"], "market", "the app sees the service name as Host");

    // HTTP_PROXY users send absolute-form requests.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(mesh.caller.outbound).await.unwrap();
    s.write_all(b"GET http://market/proxied HTTP/1.1\r\nHost: market\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    assert!(buf.starts_with("HTTP/1.1 200"), "{buf}");
    assert!(buf.contains("\"path\":\"/proxied\""), "{buf}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_stops_heartbeating_leaves_within_the_ttl_and_returns() {
    let mesh = mesh_with(fast_policy(), &[100, 100]).await;
    // A third instance runs as the real sidecar binary, so SIGKILL can stop its heartbeats
    // without a deregistration.
    let b = Backend::start("bin").await;
    let dir = tempfile::tempdir().unwrap();
    let args = mesh_testkit::sidecar_args("market", "m-bin", b.addr, &mesh.cp.url(), dir.path());
    let proc = mesh_testkit::Process::start("sidecar", &args);
    mesh.wait_endpoints(3).await;

    let killed = tokio::time::Instant::now();
    proc.kill9();
    mesh.wait_endpoints(2).await;
    let gone = killed.elapsed();
    // TTL 400 ms, sweep 50 ms, then the push to the caller.
    assert!(gone < Duration::from_secs(2), "left rotation {gone:?} after its last heartbeat");
    let c = mesh.spread(20, &[]).await;
    assert!(!c.contains_key("bin"), "{c:?}");

    // It returns on one worker thread (the single-threaded runtime), serves, and drains on
    // SIGTERM: deregistered and exited cleanly.
    let one_worker: Vec<String> =
        args.iter().cloned().chain(["--worker-threads".into(), "1".into()]).collect();
    let proc = mesh_testkit::Process::start("sidecar", &one_worker);
    mesh.wait_endpoints(3).await;
    eventually(WAIT, "the returning instance gets traffic", || async {
        mesh.spread(10, &[]).await.contains_key("bin")
    })
    .await;
    let pid = nix::unistd::Pid::from_raw(proc.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    mesh.wait_endpoints(2).await;
    let status = tokio::task::spawn_blocking(move || {
        let mut proc = proc;
        proc.child.wait().unwrap()
    })
    .await
    .unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_fails_its_probe_leaves_discovery_and_returns() {
    let mesh = mesh_with(fast_policy(), &[100, 100]).await;
    mesh.backends[1].healthy.store(false, std::sync::atomic::Ordering::Relaxed);
    mesh.wait_endpoints(1).await;
    assert_eq!(endpoint_ids(&mesh.caller).await, ["m0"]);
    mesh.backends[1].healthy.store(true, std::sync::atomic::Ordering::Relaxed);
    mesh.wait_endpoints(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_under_load_fails_no_request() {
    let mesh = mesh_with(fast_policy(), &[100, 100]).await;
    let Mesh { sidecars, caller, backends, .. } = &mesh;
    let load = Load::start(caller.outbound, "market", "/work?delay_ms=5", 4);
    eventually(WAIT, "both instances serve", || async { backends.iter().all(|b| b.hits() > 5) }).await;
    let leaving = &sidecars[1];
    leaving.begin_stop();
    eventually(WAIT, "the leaving instance is gone from the caller", || async {
        endpoint_ids(caller).await == ["m0"]
    })
    .await;
    load.wait_more(50, "load keeps flowing").await;
    load.stop_expecting_no_failures().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_routes_by_path_prefix_with_rewrite() {
    let mesh = mesh_with(fast_policy(), &[100]).await;
    let dir = tempfile::tempdir().unwrap();
    let routes = vec![sidecar::outbound::route::Route::parse("/api/markets=market,/markets").unwrap()];
    let gw = TestSidecar::start(TestSidecar::gateway_config(&mesh.cp.url(), routes, dir.path())).await;
    eventually(WAIT, "the gateway routes to market", || async {
        get(gw.outbound, "example.com", "/api/markets/7?x=1").await.0 == 200
    })
    .await;
    let (_, body) = get(gw.outbound, "example.com", "/api/markets/7?x=1").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["path"], "/markets/7");
    let (status, body) = get(gw.outbound, "example.com", "/elsewhere").await;
    assert_eq!(status, 404);
    assert!(body.contains("no_route"), "{body}");
    eventually(WAIT, "the gateway is ready", || async { get(gw.admin, "admin", "/ready").await.0 == 200 })
        .await;
}

/// Issue #15.9: a body declared larger than the gateway's limit is 413 before any of it is read
/// (it used to be streamed to the app until the app hung up: 502 "Broken pipe").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_gateways_limit_is_413_before_it_is_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mesh = mesh_with(fast_policy(), &[100]).await;
    let dir = tempfile::tempdir().unwrap();
    let routes = vec![sidecar::outbound::route::Route::parse("/api/markets=market,/markets").unwrap()];
    let gw = TestSidecar::start(TestSidecar::gateway_config(&mesh.cp.url(), routes, dir.path())).await;
    eventually(WAIT, "the gateway routes to market", || async {
        get(gw.outbound, "example.com", "/api/markets/1").await.0 == 200
    })
    .await;
    let hits = mesh.backends[0].hits();
    // 100 MB declared; only the head and 64 KiB are ever sent.
    let mut s = tokio::net::TcpStream::connect(gw.outbound).await.unwrap();
    s.write_all(b"POST /api/markets HTTP/1.1\r\nHost: example.com\r\nContent-Length: 104857600\r\n\r\n")
        .await
        .unwrap();
    let _ = s.write_all(&[b'x'; 65536]).await;
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut raw)).await.expect("an answer, not a hang");
    let raw = String::from_utf8_lossy(&raw);
    assert!(raw.starts_with("HTTP/1.1 413"), "{raw}");
    assert!(raw.contains("body_too_large") && raw.contains("1048576"), "{raw}");
    assert_eq!(mesh.backends[0].hits(), hits, "nothing reached the app");
    // Negative control: a body under the limit goes through.
    let (status, _) =
        request(gw.outbound, "POST", "example.com", "/api/markets", &[], vec![b'x'; 1000].into()).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_report_state_and_metrics() {
    let mesh = mesh_with(fast_policy(), &[100]).await;
    assert_eq!(mesh.spread(3, &[]).await["m0"], 3);
    // Readiness and the caller's own registration follow its first probe and policy push.
    eventually(WAIT, "the caller is ready", || async {
        get(mesh.caller.admin, "admin", "/ready").await.0 == 200
    })
    .await;
    eventually(WAIT, "the caller is registered", || async {
        mesh.caller.config_json().await["control_plane"]["registered"] == true
    })
    .await;
    assert_eq!(get(mesh.caller.admin, "admin", "/live").await.0, 200);
    let cfg = mesh.caller.config_json().await;
    assert_eq!(cfg["control_plane"]["connected"], true);
    assert_eq!(market(&cfg)["source"], "discovery");
    let (status, text) = get(mesh.caller.admin, "admin", "/metrics").await;
    assert_eq!(status, 200);
    assert!(!text.contains("# EOF"), "Prometheus text by default: {text}");
    for want in [
        r#"mesh_sidecar_requests_total{direction="outbound",service="market",endpoint="m0",status="200"} 3"#,
        "mesh_sidecar_request_duration_seconds_bucket",
        r#"mesh_sidecar_endpoints{service="market"} 1"#,
        "mesh_sidecar_control_plane_connected 1",
        r#"mesh_sidecar_policy_version{service="market"}"#,
        "mesh_sidecar_app_healthy 1",
    ] {
        assert!(text.contains(want), "{want} missing:\n{text}");
    }
    let (_, text) = get(mesh.sidecars[0].admin, "admin", "/metrics").await;
    assert!(text.contains(r#"mesh_sidecar_requests_total{direction="inbound",service="market",endpoint="app",status="200"} 3"#), "{text}");
}

// ---- resilience: each scenario with its negative control -------------------------------------

fn resilient(max_attempts: u32) -> ServicePolicy {
    let mut p = fast_policy();
    p.load_balancer.algorithm = Algorithm::RoundRobin;
    p.retry.max_attempts = max_attempts;
    p.retry.backoff_base = Duration::from_millis(1);
    p.retry.backoff_max = Duration::from_millis(5);
    p
}

/// Sends `n` GETs one after another; returns how many did not get a 200.
async fn failures(mesh: &Mesh, n: usize) -> usize {
    let client = HttpClient::default();
    let mut failed = 0;
    for _ in 0..n {
        if client.get(mesh.caller.outbound, "market", "/work").await.0 != 200 {
            failed += 1;
        }
    }
    failed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_instance_is_invisible_to_clients_with_retries_and_visible_without() {
    for (attempts, expect_errors) in [(3, false), (1, true)] {
        let mesh = mesh_with(resilient(attempts), &[100, 100, 100]).await;
        // The app behind m2 dies; its sidecar still answers (503: connect failed to the app)
        // until its probe marks it unhealthy.
        mesh.backends[2].stop_now();
        let failed = failures(&mesh, 60).await;
        if expect_errors {
            assert!(failed > 0, "negative control: without retries the dead instance shows");
        } else {
            assert_eq!(failed, 0, "retried on another instance");
        }
        // POSTs (with idempotency keys, so they may be retried): each reaches an app at most once.
        let before: u64 = mesh.backends.iter().map(|b| b.hits()).sum();
        let mut ok = 0u64;
        for n in 0..30 {
            let key = format!("post-{attempts}-{n}");
            let (status, _) = request(
                mesh.caller.outbound,
                "POST",
                "market",
                "/orders",
                &[("idempotency-key", key.as_str())],
                Default::default(),
            )
            .await;
            ok += u64::from(status == 200);
        }
        let reached: u64 = mesh.backends.iter().map(|b| b.hits()).sum::<u64>() - before;
        assert_eq!(
            reached, ok,
            "0 duplicated POSTs: every success reached an app exactly once, failures never did"
        );
        if !expect_errors {
            assert_eq!(ok, 30);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stay_within_the_budget_when_everything_fails() {
    // (budget %, floor per second): 20 % with no floor, and a floor so large the budget never binds.
    for (budget, floor, bound) in [(20u32, 0u32, 1.25f64), (20, 100_000, 3.0)] {
        let mut p = resilient(3);
        p.retry.budget_percent = budget;
        p.retry.budget_min_per_second = floor;
        p.circuit_breaker.consecutive_failures = 0; // isolate the budget from ejection
        p.circuit_breaker.failure_rate_percent = 0;
        let mesh = mesh_with(p, &[100, 100, 100]).await;
        for b in &mesh.backends {
            b.status.store(503, std::sync::atomic::Ordering::Relaxed);
        }
        let before: u64 = mesh.backends.iter().map(|b| b.hits()).sum();
        let n = 200;
        assert_eq!(failures(&mesh, n).await, n, "every request fails: all instances answer 503");
        let attempts: u64 = mesh.backends.iter().map(|b| b.hits()).sum::<u64>() - before;
        let ratio = attempts as f64 / n as f64;
        eprintln!("budget {budget} % + {floor}/s: {ratio:.2} attempts per request");
        if floor == 0 {
            assert!(ratio <= bound, "budget 20 %: {attempts} attempts for {n} requests ({ratio:.2})");
        } else {
            assert!(
                ratio > 2.5 && ratio <= bound,
                "negative control, no effective budget: a retry storm ({ratio:.2})"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_concurrency_limit_requests_are_refused_at_once_not_queued() {
    for (limit, expect_rejections) in [(4u32, true), (0, false)] {
        let mut p = resilient(1);
        p.circuit_breaker.max_concurrent_requests = limit;
        p.circuit_breaker.max_pending_requests = 0;
        let mesh = mesh_with(p, &[100]).await;
        let results = futures::future::join_all((0..12).map(|_| async {
            let client = HttpClient::default();
            let t = tokio::time::Instant::now();
            let (status, body) = client.get(mesh.caller.outbound, "market", "/work?delay_ms=400").await;
            (status, body, t.elapsed())
        }))
        .await;
        let rejected: Vec<_> = results.iter().filter(|(s, _, _)| *s == 503).collect();
        if expect_rejections {
            assert_eq!(rejected.len(), 8, "3× over a limit of 4: 8 refused");
            for (_, body, took) in &rejected {
                assert!(body.contains("overloaded"), "{body}");
                assert!(*took < Duration::from_millis(200), "refused at once, not after queueing: {took:?}");
            }
            eprintln!("rejection latency: max {:?}", rejected.iter().map(|r| r.2).max().unwrap());
            assert_eq!(results.iter().filter(|(s, _, _)| *s == 200).count(), 4);
        } else {
            assert!(rejected.is_empty(), "negative control: no limit, nothing refused");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_is_ejected_and_returns_after_recovery() {
    let mut p = resilient(3);
    p.circuit_breaker.consecutive_failures = 3;
    p.circuit_breaker.open_duration = Duration::from_millis(300);
    p.circuit_breaker.max_ejection_percent = 50;
    let mesh = mesh_with(p, &[100, 100, 100]).await;
    mesh.backends[1].status.store(503, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(failures(&mesh, 30).await, 0, "retries hide the failing endpoint");
    let hits_when_ejected = mesh.backends[1].hits();
    assert_eq!(failures(&mesh, 30).await, 0);
    assert!(
        mesh.backends[1].hits() <= hits_when_ejected + 1,
        "ejected: at most a half-open probe reaches it"
    );
    let (_, metrics) = get(mesh.caller.admin, "admin", "/metrics").await;
    assert!(
        metrics.contains(r#"mesh_sidecar_breaker_openings_total{service="market",endpoint="m1"}"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"mesh_sidecar_endpoint_breaker_open{service="market",endpoint="m1"}"#),
        "{metrics}"
    );
    let states: Vec<String> = market(&mesh.caller.config_json().await)["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| format!("{}={}", e["id"].as_str().unwrap(), e["breaker"].as_str().unwrap()))
        .collect();
    assert!(
        states.iter().all(|s| s.ends_with("=closed") || s == "m1=open" || s == "m1=half_open"),
        "{states:?}"
    );

    mesh.backends[1].status.store(0, std::sync::atomic::Ordering::Relaxed);
    eventually(WAIT, "the recovered endpoint gets traffic again", || async {
        let before = mesh.backends[1].hits();
        failures(&mesh, 6).await;
        mesh.backends[1].hits() > before + 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_receiving_sidecar_enforces_its_services_rate_limit_with_429_and_retry_after() {
    for (rps, expect_limited) in [(5u32, true), (0, false)] {
        let mut p = resilient(1);
        p.rate_limit.requests_per_second = rps;
        p.rate_limit.burst = rps;
        let mesh = mesh_with(p, &[100]).await;
        // The policy reaches the instance's own sidecar as its own policy.
        eventually(WAIT, "m0 applies its policy", || async {
            mesh.sidecars[0].config_json().await["own_policy"]["policy"]["rate_limit"]["requests_per_second"]
                == rps
        })
        .await;
        let client = HttpClient::default();
        let mut limited = 0;
        for _ in 0..30 {
            let (status, body) = client.get(mesh.caller.outbound, "market", "/work").await;
            if status == 429 {
                limited += 1;
                assert!(body.contains("rate_limited"), "{body}");
            }
        }
        if expect_limited {
            assert!((20..=25).contains(&limited), "a burst of 5 then ~5/s: {limited} of 30 refused");
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(mesh.caller.outbound).await.unwrap();
            s.write_all(b"GET /work HTTP/1.1\r\nHost: market\r\nConnection: close\r\n\r\n").await.unwrap();
            let mut raw = String::new();
            s.read_to_string(&mut raw).await.unwrap();
            assert!(raw.starts_with("HTTP/1.1 429"), "{raw}");
            assert!(raw.to_ascii_lowercase().contains("retry-after: 1"), "{raw}");
        } else {
            assert_eq!(limited, 0, "negative control: no limit, nothing refused");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_repeated_with_the_same_idempotency_key_reaches_the_app_once() {
    let mesh = mesh_with(resilient(3), &[100]).await;
    let app = &mesh.backends[0];
    let post = |key: Option<&'static str>| async move {
        let headers: Vec<(&str, &str)> = key.map(|k| vec![("idempotency-key", k)]).unwrap_or_default();
        request(
            mesh.caller.outbound,
            "POST",
            "market",
            "/orders?delay_ms=100",
            &headers,
            bytes::Bytes::from_static(b"{\"n\":1}"),
        )
        .await
    };
    let before = app.hits();
    // Concurrent duplicates (one is in flight while the others arrive), then late ones.
    let mut answers = futures::future::join_all((0..4).map(|_| post(Some("order-1")))).await;
    answers.push(post(Some("order-1")).await);
    assert!(
        answers.iter().all(|(s, b)| *s == 200 && *b == answers[0].1),
        "every duplicate gets the first answer"
    );
    assert_eq!(app.hits() - before, 1, "the app saw the request once");

    // Negative control: without a key every POST reaches the app.
    let before = app.hits();
    for _ in 0..3 {
        assert_eq!(post(None).await.0, 200);
    }
    assert_eq!(app.hits() - before, 3);
}

/// Issue #15.3: a key belongs to one client and one request. Another request with the same key
/// is 422 and never gets the first request's answer; another client's key is its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_idempotency_key_with_another_request_is_refused_not_replayed() {
    let mesh = mesh_with(resilient(1), &[100]).await;
    let app = &mesh.backends[0];
    let send = |path: &'static str, body: &'static str, auth: &'static str| async move {
        request(
            mesh.caller.outbound,
            "POST",
            "market",
            path,
            &[("idempotency-key", "k"), ("authorization", auth)],
            bytes::Bytes::from_static(body.as_bytes()),
        )
        .await
    };
    let before = app.hits();
    let alice = send("/markets/m1/trades", r#"{"account":"alice","shares":"1"}"#, "Bearer alice").await;
    assert_eq!(alice.0, 200);
    assert_eq!(
        send("/markets/m1/trades", r#"{"account":"alice","shares":"1"}"#, "Bearer alice").await,
        alice
    );
    assert_eq!(app.hits() - before, 1, "the repeat is a replay");

    for (path, body) in [
        ("/markets/m1/trades", r#"{"account":"bob","shares":"5"}"#),
        ("/markets/m1/trades?fast=1", r#"{"account":"alice","shares":"1"}"#),
    ] {
        let (status, answer) = send(path, body, "Bearer alice").await;
        assert_eq!(status, 422, "{path} {body}: {answer}");
        assert!(answer.contains("idempotency_key_reused"), "{answer}");
        assert!(!answer.contains("alice\",\"shares"), "never the first request's answer: {answer}");
    }
    assert_eq!(app.hits() - before, 1, "refused requests never reach the app");

    // Bob's key is his own: his request reaches the app. So does the key on another path: the
    // app routes it first (its 404 or 405), and its own idempotency record decides.
    let bob = send("/markets/m1/trades", r#"{"account":"bob","shares":"5"}"#, "Bearer bob").await;
    assert_eq!(bob.0, 200);
    assert_eq!(send("/accounts", r#"{"account":"alice","shares":"1"}"#, "Bearer alice").await.0, 200);
    assert_eq!(app.hits() - before, 3);
}

fn cached(ttl_ms: u64) -> ServicePolicy {
    let mut p = resilient(1);
    p.cache.ttl = Duration::from_millis(ttl_ms);
    p.cache.stale_if_error = Duration::from_secs(30);
    p
}

/// GET through the caller with headers: (status, x-cache, backend hit number).
async fn cget(mesh: &Mesh, path: &str, headers: &[(&str, &str)]) -> (u16, String, u64) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(mesh.caller.outbound).await.unwrap();
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: market\r\n{extra}Connection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    let status = raw.split(' ').nth(1).unwrap().parse().unwrap();
    let xc = raw
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("x-cache: ").map(str::to_string))
        .unwrap_or_default();
    let body = raw.split("\r\n\r\n").nth(1).unwrap_or("");
    let hit =
        serde_json::from_str::<serde_json::Value>(body).ok().and_then(|v| v["hit"].as_u64()).unwrap_or(0);
    (status, xc, hit)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_never_serves_across_identities_and_honours_cache_control() {
    let mesh = mesh_with(cached(60_000), &[100]).await;
    let app = &mesh.backends[0];

    let (_, xc1, h1) = cget(&mesh, "/m/1", &[]).await;
    let (_, xc2, h2) = cget(&mesh, "/m/1", &[]).await;
    assert_eq!((xc1.as_str(), xc2.as_str(), h1), ("miss", "hit", h2), "the second is served from the cache");

    // Two identities: 0 answers across them, unless the answer is public.
    let before = app.hits();
    let (_, a1, _) = cget(&mesh, "/m/2", &[("authorization", "Bearer alice")]).await;
    let (_, b1, _) = cget(&mesh, "/m/2", &[("authorization", "Bearer bob")]).await;
    let (_, a2, _) = cget(&mesh, "/m/2", &[("authorization", "Bearer alice")]).await;
    assert_eq!((a1.as_str(), b1.as_str(), a2.as_str()), ("miss", "miss", "hit"));
    assert_eq!(app.hits() - before, 2, "bob never got alice's answer");
    cget(&mesh, "/m/3?cc=public,max-age=60", &[("authorization", "Bearer alice")]).await;
    assert_eq!(
        cget(&mesh, "/m/3?cc=public,max-age=60", &[("authorization", "Bearer bob")]).await.1,
        "hit",
        "public answers are shared"
    );

    // Vary: another language is another entry.
    cget(&mesh, "/m/4?vary=accept-language", &[("accept-language", "en")]).await;
    assert_eq!(cget(&mesh, "/m/4?vary=accept-language", &[("accept-language", "fr")]).await.1, "miss");
    assert_eq!(cget(&mesh, "/m/4?vary=accept-language", &[("accept-language", "en")]).await.1, "hit");

    // no-store and private answers are never kept; a no-cache request bypasses.
    for cc in ["no-store", "private"] {
        let path = format!("/m/5-{cc}?cc={cc}");
        let before = app.hits();
        cget(&mesh, &path, &[]).await;
        assert_eq!(cget(&mesh, &path, &[]).await.1, "miss", "{cc}");
        assert_eq!(app.hits() - before, 2, "{cc}");
    }
    let before = app.hits();
    cget(&mesh, "/m/1", &[("cache-control", "no-cache")]).await;
    assert_eq!(app.hits() - before, 1, "no-cache request reaches the app");

    // Invalidation through the admin API.
    let (status, body) = request(
        mesh.caller.admin,
        "POST",
        "admin",
        "/cache/invalidate?service=market&prefix=/m/1",
        &[],
        Default::default(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"invalidated\":1"), "{body}");
    assert_eq!(cget(&mesh, "/m/1", &[]).await.1, "miss");
    // A write through the cache drops the page it changed (and its parents) before it is
    // answered: the writer reads its own write, whatever the events say.
    assert_eq!(cget(&mesh, "/m/1", &[]).await.1, "hit");
    let (status, _) =
        request(mesh.caller.outbound, "POST", "market", "/m/1/trades", &[], Default::default()).await;
    assert_eq!(status, 200);
    assert_eq!(cget(&mesh, "/m/1", &[]).await.1, "miss", "the POST to /m/1/trades dropped /m/1");
    let counters = market(&mesh.caller.config_json().await)["counters"].clone();
    assert!(
        counters["cache_hits"].as_u64() >= Some(4) && counters["cache_misses"].as_u64() >= Some(5),
        "{counters}"
    );
    let (_, metrics) = get(mesh.caller.admin, "admin", "/metrics").await;
    assert!(
        metrics.contains(r#"mesh_sidecar_cache_requests_total{service="market",result="hit"}"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_on_a_named_topic_drop_the_matching_cache_entries() {
    use mesh_proto::{policy::CacheInvalidation, v1};
    let mut policy = cached(60_000);
    policy.cache.invalidate_on =
        vec![CacheInvalidation { topic: "markets".into(), prefix: "/m/{key}".into() }];
    let mesh = mesh_with(policy, &[100]).await;
    // The cache serves only once the caller follows the topic (no entry can miss its event).
    eventually(WAIT, "the caller follows markets", || async {
        get(mesh.caller.admin, "admin", "/metrics")
            .await
            .1
            .contains("mesh_sidecar_cache_invalidation_followers 1")
    })
    .await;
    for path in ["/m/1", "/m/2"] {
        cget(&mesh, path, &[]).await;
        assert_eq!(cget(&mesh, path, &[]).await.1, "hit", "{path} is cached");
    }
    let bus = v1::events_client::EventsClient::new(mesh.cp.channel().await);
    let publish = |topic: &'static str, key: &'static str| {
        let mut bus = bus.clone();
        async move {
            let id = uuid::Uuid::now_v7().to_string();
            let e = v1::Event { id, topic: topic.into(), key: key.into(), ..Default::default() };
            bus.publish(v1::PublishRequest { events: vec![e] }).await.unwrap();
        }
    };
    // Negative controls: events on another topic, and for another key, drop nothing.
    publish("other", "1").await;
    publish("markets", "2x").await;
    publish("markets", "1").await;
    eventually(WAIT, "the event on markets for key 1 drops /m/1", || async {
        cget(&mesh, "/m/1", &[]).await.1 == "miss"
    })
    .await;
    assert_eq!(cget(&mesh, "/m/2", &[]).await.1, "hit", "another key's entry stays");
    let (_, metrics) = get(mesh.caller.admin, "admin", "/metrics").await;
    assert!(
        metrics.contains(r#"mesh_sidecar_cache_invalidations_total{service="market",topic="markets"}"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_make_one_upstream_request_and_failures_serve_stale() {
    for (ttl, expect_single) in [(300u64, true), (0, false)] {
        let mesh = mesh_with(cached(ttl), &[100]).await;
        let app = &mesh.backends[0];
        let before = app.hits();
        let answers = futures::future::join_all((0..8).map(|_| cget(&mesh, "/slow?delay_ms=200", &[]))).await;
        assert!(answers.iter().all(|(s, _, _)| *s == 200));
        if expect_single {
            assert_eq!(app.hits() - before, 1, "eight concurrent misses, one upstream request");
        } else {
            assert_eq!(app.hits() - before, 8, "negative control: no cache, every request reaches the app");
            continue;
        }
        // After expiry the app fails: the stale answer is served (stale-if-error).
        tokio::time::sleep(Duration::from_millis(350)).await; // let the 300 ms entry expire
        app.status.store(503, std::sync::atomic::Ordering::Relaxed);
        let (status, xc, _) = cget(&mesh, "/slow?delay_ms=200", &[]).await;
        assert_eq!((status, xc.as_str()), (200, "stale"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_faults_never_let_a_request_outlive_its_deadline_or_leak() {
    use mesh_testkit::Fault;
    let deadline = Duration::from_millis(500);
    for fault in [Fault::Blackhole, Fault::Reset, Fault::Delay(Duration::from_secs(3)), Fault::Truncate(40)] {
        let mut p = resilient(1);
        p.timeout.request = deadline;
        p.health.probe_interval = Duration::ZERO; // the app is behind the fault: do not probe through it
        let mesh = mesh_with_fault(p, fault).await;
        let caller = &mesh.caller;

        let started = tokio::time::Instant::now();
        let outcomes = futures::future::join_all((0..5).map(|_| async {
            let t = tokio::time::Instant::now();
            let (status, _) = get(caller.outbound, "market", "/work").await;
            (status, t.elapsed())
        }))
        .await;
        for (status, took) in &outcomes {
            assert!(
                *took < deadline + Duration::from_millis(700),
                "{fault:?}: a request took {took:?} (status {status})"
            );
            assert_ne!(*status, 200, "{fault:?}: the fault must show");
        }
        assert!(started.elapsed() < Duration::from_secs(3), "{fault:?}");
        // Nothing leaks: the caller holds no request to the endpoint any more.
        eventually(WAIT, "no request is left in flight", || async {
            let (_, m) = get(caller.admin, "admin", "/metrics").await;
            m.contains(r#"mesh_sidecar_endpoint_inflight{service="market",endpoint="m0"} 0"#)
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_controls_for_deadlines_and_ejection() {
    use mesh_testkit::Fault;
    // Without a request timeout, a blackholed request outlives any deadline.
    let mut p = resilient(1);
    p.timeout.request = Duration::ZERO;
    p.health.probe_interval = Duration::ZERO;
    let faulty = mesh_with_fault(p, Fault::Blackhole).await;
    let caller = &faulty.caller;
    let hung = tokio::time::timeout(Duration::from_secs(2), get(caller.outbound, "market", "/work")).await;
    assert!(hung.is_err(), "with the protection off the request hangs");

    // Without ejection, a failing endpoint keeps getting its share of traffic.
    let mut p = resilient(3);
    p.circuit_breaker.consecutive_failures = 0;
    p.circuit_breaker.failure_rate_percent = 0;
    let mesh = mesh_with(p, &[100, 100, 100]).await;
    mesh.backends[1].status.store(503, std::sync::atomic::Ordering::Relaxed);
    failures(&mesh, 30).await;
    let before = mesh.backends[1].hits();
    failures(&mesh, 30).await;
    assert!(mesh.backends[1].hits() >= before + 5, "not ejected: it keeps receiving requests");
}
