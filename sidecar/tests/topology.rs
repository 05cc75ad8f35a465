//! Observed topology: the proxies report what they called, the control plane sums it into
//! windows — read through `Admin.Topology` and the JSON management API (admin token only) —
//! and a stopped proxy's edges age out.

use std::time::Duration;

use mesh_proto::v1;
use mesh_testkit::{Backend, TestCp, TestSidecar, WAIT, eventually, fast_policy, request};
use sidecar::outbound::route::Route;

async fn topology(cp: &TestCp) -> v1::TopologyResponse {
    v1::admin_client::AdminClient::new(cp.channel().await)
        .topology(v1::TopologyRequest {})
        .await
        .unwrap()
        .into_inner()
}

fn edge<'a>(t: &'a v1::TopologyResponse, caller: &str, callee: &str) -> Option<&'a v1::EdgeStats> {
    t.edges.iter().find(|e| e.caller == caller && e.callee == callee)
}

fn requests(t: &v1::TopologyResponse, caller: &str, callee: &str) -> u64 {
    edge(t, caller, callee).and_then(|e| e.last_ten_minutes).map_or(0, |w| w.requests)
}

#[tokio::test]
async fn edges_count_what_was_sent_and_age_out_when_their_proxy_stops() {
    // 100 ms slots: windows of 0.6 s and 6 s.
    let cp = TestCp::start_with(|c| {
        c.topology_slot = Duration::from_millis(100);
        c.insecure_api = false;
    })
    .await;
    let mut policy = fast_policy();
    policy.cache.ttl = Duration::from_secs(60);
    policy.cache.path_prefixes = vec!["/cached".into()];
    cp.set_policy("market", &policy).await;
    let (market_app, web_app) = (Backend::start("market").await, Backend::start("web").await);
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    // Secure API (the admin token is checked), each proxy certified for its service.
    let secure = |mut c: sidecar::Config| {
        c.edge_report_interval = Duration::from_millis(100);
        c.control_plane_ca = Some(cp.ca_pem());
        c
    };
    let mut market = TestSidecar::config(&cp.url(), "market", "market-1", market_app.addr, dirs[0].path());
    market = secure(market);
    market.identity_token = Some(cp.token("market").await);
    let _market = TestSidecar::start(market).await;
    let mut web = TestSidecar::config(&cp.url(), "web", "web-1", web_app.addr, dirs[1].path());
    web = secure(web);
    web.identity_token = Some(cp.token("web").await);
    web.upstreams = vec!["market".into()];
    let web = TestSidecar::start(web).await;
    let routes = vec![Route::parse("/api=market,/").unwrap()];
    let mut gw = TestSidecar::gateway_config(&cp.url(), routes, dirs[2].path());
    gw = secure(gw);
    gw.identity_token = Some(cp.token("gateway").await);
    let gw = TestSidecar::start(gw).await;

    eventually(WAIT, "web and the gateway route to market", || async {
        let direct = request(web.outbound, "GET", "market", "/warm", &[], Default::default()).await.0;
        let edge = request(gw.outbound, "GET", "example.com", "/api/warm", &[], Default::default()).await.0;
        direct == 200 && edge == 200
    })
    .await;
    // Warm-up requests are in the counts too: read them, then send a known number more.
    eventually(WAIT, "the warm-up is reported", || async {
        let t = topology(&cp).await;
        requests(&t, "web", "market") > 0 && requests(&t, "gateway", "market") > 0
    })
    .await;
    let before = topology(&cp).await;
    let (web_before, gw_before) =
        (requests(&before, "web", "market"), requests(&before, "gateway", "market"));
    for i in 0..37 {
        let (status, body) =
            request(web.outbound, "GET", "market", &format!("/w{i}"), &[], Default::default()).await;
        assert_eq!(status, 200, "{body}");
    }
    market_app.status.store(503, std::sync::atomic::Ordering::Relaxed);
    for i in 0..23 {
        request(gw.outbound, "GET", "example.com", &format!("/api/g{i}"), &[], Default::default()).await;
    }
    eventually(WAIT, "the topology counts exactly what was sent", || async {
        let t = topology(&cp).await;
        requests(&t, "web", "market") == web_before + 37
            && requests(&t, "gateway", "market") >= gw_before + 23
    })
    .await;
    let t = topology(&cp).await;
    assert_eq!(requests(&t, "web", "market"), web_before + 37, "±0");
    assert_eq!(
        requests(&t, "gateway", "market"),
        gw_before + 23,
        "±0 (the 503s were not retried: GETs to one endpoint)"
    );
    let g = edge(&t, "gateway", "market").unwrap().last_ten_minutes.unwrap();
    let failed = 23.0 / (gw_before + 23) as f64;
    assert!((g.success_rate - (1.0 - failed)).abs() < 1e-9, "the 503s are failures: {g:?}");
    let market_stats = t.services.iter().find(|s| s.service == "market").unwrap();
    assert_eq!(market_stats.inbound_last_ten_minutes.unwrap().requests, web_before + 37 + gw_before + 23);
    let at_edge = edge(&t, "gateway", "market").unwrap();
    assert_eq!((at_edge.open_breakers, at_edge.route.as_str()), (0, "/api"), "the gateway counts by route");
    assert_eq!(edge(&t, "web", "market").unwrap().route, "", "a sidecar's calls have no route");

    // Answers from web's cache count as cached: one miss, then hits.
    market_app.status.store(0, std::sync::atomic::Ordering::Relaxed);
    for _ in 0..10 {
        let (status, body) = request(web.outbound, "GET", "market", "/cached", &[], Default::default()).await;
        assert_eq!(status, 200, "{body}");
    }
    eventually(WAIT, "the cached answers are reported", || async {
        requests(&topology(&cp).await, "web", "market") == web_before + 47
    })
    .await;
    let w = edge(&topology(&cp).await, "web", "market").unwrap().last_ten_minutes.unwrap();
    assert_eq!((w.cached_share * w.requests as f64).round() as u64, 9, "{w:?}");
    assert_eq!(w.limited_share, 0.0);

    // The JSON management API: the admin token only.
    let admin = cp.admin;
    let (status, body) = request(admin, "GET", "cp", "/api/v1/topology", &[], Default::default()).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("\"error\":\"unauthenticated\""), "{body}");
    let wrong = [("authorization", "Bearer not-the-token")];
    let (status, body) = request(admin, "GET", "cp", "/api/v1/topology", &wrong, Default::default()).await;
    assert_eq!((status, body.contains("\"error\":\"forbidden\"")), (403, true), "{body}");
    let token = format!("Bearer {}", cp.admin_token());
    let auth = [("authorization", token.as_str())];
    let (status, body) = request(admin, "GET", "cp", "/api/v1/topology", &auth, Default::default()).await;
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let web_edge = json["edges"].as_array().unwrap().iter().find(|e| e["caller"] == "web").unwrap();
    assert_eq!(web_edge["last_ten_minutes"]["requests"], web_before + 47);
    let (status, body) = request(admin, "GET", "cp", "/api/v1/nothing", &auth, Default::default()).await;
    assert_eq!((status, body.contains("not_found")), (404, true), "{body}");
    let (status, _) = request(admin, "GET", "cp", "/healthz", &[], Default::default()).await;
    assert_eq!(status, 200, "/healthz stays open");

    // web stops: its edge ages out of the windows (6 s here).
    web.stop().await;
    // The gateway keeps calling meanwhile: its edge stays.
    eventually(Duration::from_secs(20), "web's edge ages out", || async {
        request(gw.outbound, "GET", "example.com", "/api/still", &[], Default::default()).await;
        edge(&topology(&cp).await, "web", "market").is_none()
    })
    .await;
    assert!(edge(&topology(&cp).await, "gateway", "market").is_some(), "the gateway still reports");
}
