//! The gateway's security middleware over real sockets: a gateway in front of a sidecar and its
//! backend, routes with per-route rate limits, CORS, limits and threat screening, the client's
//! address taken from `X-Forwarded-For` of a trusted proxy (loopback here), automatic blocks,
//! and an access log read back line by line.

use std::time::Duration;

use bytes::Bytes;
use mesh_testkit::{Backend, TestCp, TestSidecar, WAIT, eventually, get, request, request_full};
use serde_json::Value;
use sidecar::{
    gateway::{
        access_log::Sink,
        ip_filter::{AutoBlock, IpRule},
    },
    outbound::route::Route,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::edge_auth::{auth_config, es256, seen, token, write_jwks};

const ROUTES: &str = r#"
- { name: by-subject, prefix: /limited, service: api, rate_limit: { requests_per_second: 1, burst: 2, key: subject } }
- { name: by-ip, prefix: /by-ip, service: api, rate_limit: { requests_per_second: 1, burst: 2, key: ip } }
- name: cors
  prefix: /cors
  service: api
  cors:
    allow_origins: [https://app.example.com, "https://*.example.org"]
    allow_methods: [GET, POST]
    allow_headers: [content-type, authorization]
    allow_credentials: true
    max_age: 600
- { name: strict, prefix: /strict, service: api, threats: block, limits: { body: 100, uri: 200, headers: 20 } }
- { name: exact, path: /exact, methods: [GET], service: api }
- { name: rest, prefix: /, service: api }
"#;

/// A raw HTTP/1.1 exchange (for shapes a client library will not send): the status line and
/// the body.
async fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> (String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await.expect("an answer, not a hang");
    let text = String::from_utf8_lossy(&out).into_owned();
    // The status line and the headers; the body.
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.to_string(), body.to_string())
}

fn from(ip: &str) -> (&'static str, String) {
    ("x-forwarded-for", ip.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_limits_screens_blocks_and_logs_every_request() {
    let cp = TestCp::start().await;
    cp.set_policy("api", &mesh_testkit::fast_policy()).await;
    let app = Backend::start("api").await;
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let api = TestSidecar::start(TestSidecar::config(&cp.url(), "api", "a1", app.addr, dirs[0].path())).await;
    let jwks = dirs[2].path().join("jwks.json");
    let (key, jwk) = es256("k1");
    write_jwks(&jwks, &[&jwk]);
    let routes: Vec<Route> = serde_yaml_ng::from_str(ROUTES).unwrap();
    let mut cfg = TestSidecar::gateway_config(&cp.url(), routes, dirs[1].path());
    cfg.edge_auth = Some(auth_config(&jwks));
    // Loopback is the trusted proxy: each test client names its address in X-Forwarded-For.
    cfg.edge.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
    cfg.edge.deny = vec![IpRule::parse("192.0.2.0/24").unwrap()];
    cfg.edge.auto_block =
        AutoBlock { after: 3, window: Duration::from_secs(60), block_for: Duration::from_secs(1) };
    let log_file = dirs[1].path().join("access.log");
    cfg.access_log = Sink::File(log_file.clone());
    let gateway = TestSidecar::start(cfg).await;
    let gw = gateway.outbound;
    eventually(WAIT, "the gateway reaches api", || async {
        request(gw, "GET", "edge", "/ping", &[], Bytes::new()).await.0 == 200
    })
    .await;

    // Rate limits by subject: alice's burst is hers; bob (and anyone else) has his own.
    let bearer = |sub: &str| format!("Bearer {}", token(&key, "k1", sub, 600));
    let (alice, bob) = (bearer("alice"), bearer("bob"));
    for left in ["1", "0"] {
        let (st, h, _) =
            request_full(gw, "GET", "edge", "/limited", &[("authorization", &alice)], Bytes::new()).await;
        assert_eq!(st, 200);
        assert_eq!(h["ratelimit-policy"], "\"by-subject\";q=2;w=2");
        assert!(h["ratelimit"].to_str().unwrap().contains(&format!("r={left}")), "{h:?}");
    }
    let (st, h, body) =
        request_full(gw, "GET", "edge", "/limited", &[("authorization", &alice)], Bytes::new()).await;
    assert_eq!(st, 429, "{body}");
    assert!(h["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    assert!(h["ratelimit"].to_str().unwrap().starts_with("\"by-subject\";r=0"));
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["error"], "rate_limited");
    assert_eq!(request(gw, "GET", "edge", "/limited", &[("authorization", &bob)], Bytes::new()).await.0, 200);

    // By address: one client's burst, then 429; another address is not held back.
    let one = from("203.0.113.1");
    for _ in 0..2 {
        assert_eq!(request(gw, "GET", "edge", "/by-ip", &[(one.0, &one.1)], Bytes::new()).await.0, 200);
    }
    assert_eq!(request(gw, "GET", "edge", "/by-ip", &[(one.0, &one.1)], Bytes::new()).await.0, 429);
    let two = from("203.0.113.2");
    assert_eq!(request(gw, "GET", "edge", "/by-ip", &[(two.0, &two.1)], Bytes::new()).await.0, 200);

    // CORS: a preflight from an allowed origin is answered here; any other gets no CORS headers.
    let preflight = |origin: &'static str, method: &'static str| async move {
        request_full(
            gw,
            "OPTIONS",
            "edge",
            "/cors/x",
            &[
                ("origin", origin),
                ("access-control-request-method", method),
                ("access-control-request-headers", "content-type"),
            ],
            Bytes::new(),
        )
        .await
    };
    let hits = app.hits();
    let (st, h, _) = preflight("https://eu.example.org", "POST").await;
    assert_eq!(st, 204);
    assert_eq!(h["access-control-allow-origin"], "https://eu.example.org");
    assert_eq!(h["access-control-allow-credentials"], "true");
    assert_eq!(h["access-control-max-age"], "600");
    for (origin, method) in [("https://evil.example.net", "POST"), ("https://app.example.com", "DELETE")] {
        let (st, h, body) = preflight(origin, method).await;
        assert_eq!(st, 403, "{body}");
        assert!(!h.contains_key("access-control-allow-origin"), "{origin} {method}");
    }
    assert_eq!(app.hits(), hits, "preflights are the edge's to answer");
    let (_, h, _) =
        request_full(gw, "GET", "edge", "/cors/x", &[("origin", "https://app.example.com")], Bytes::new())
            .await;
    assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
    let (_, h, _) =
        request_full(gw, "GET", "edge", "/cors/x", &[("origin", "https://evil.example.net")], Bytes::new())
            .await;
    assert!(!h.contains_key("access-control-allow-origin"));

    // Content-Length with Transfer-Encoding, in either order, behind an innocent request on the
    // same connection: the innocent one is served, the ambiguous one refused naming its rule, and
    // the request hidden after its chunked body never reaches the app.
    for (i, (first, second)) in [
        ("Content-Length: 40", "Transfer-Encoding: chunked"),
        ("Transfer-Encoding: chunked", "Content-Length: 40"),
    ]
    .into_iter()
    .enumerate()
    {
        let hits = app.hits();
        let wire = format!(
            "GET /ok HTTP/1.1\r\nHost: e\r\nX-Forwarded-For: 203.0.113.{}\r\n\r\n\
             POST /x HTTP/1.1\r\nHost: e\r\nX-Forwarded-For: 203.0.113.{}\r\n{first}\r\n{second}\r\n\r\n0\r\n\r\n\
             GET /smuggled HTTP/1.1\r\nHost: e\r\n\r\n",
            90 + i,
            90 + i
        );
        let (status, body) = raw(gw, wire.as_bytes()).await;
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        assert!(body.contains("HTTP/1.1 400") && body.contains("smuggling_cl_te"), "{body}");
        assert_eq!(body.matches("HTTP/1.1 ").count(), 1, "no third answer: {body}");
        assert_eq!(app.hits(), hits + 1, "only the innocent request reached the app");
    }
    // The other smuggling shapes and unnormalised paths, on the wire: each refused by its rule.
    let shapes: [(&[u8], &str); 8] = [
        (
            b"POST /x HTTP/1.1\r\nHost: e\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab",
            "smuggling_content_length",
        ),
        (b"POST /x HTTP/1.1\r\nHost: e\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", "400"),
        (b"POST /x HTTP/1.1\r\nHost: e\r\nContent-Length: +1\r\n\r\na", "400"),
        (b"POST /x HTTP/1.1\r\nHost: e\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", "400"),
        (b"GET /a/../secret HTTP/1.1\r\nHost: e\r\nConnection: close\r\n\r\n", "path_not_normalised"),
        (b"GET /a/%2e%2e/secret HTTP/1.1\r\nHost: e\r\nConnection: close\r\n\r\n", "path_not_normalised"),
        (b"GET /a%2fb HTTP/1.1\r\nHost: e\r\nConnection: close\r\n\r\n", "path_not_normalised"),
        (b"TRACE / HTTP/1.1\r\nHost: e\r\nConnection: close\r\n\r\n", "\"method\""),
    ];
    for (i, (bytes, rule)) in shapes.into_iter().enumerate() {
        let hits = app.hits();
        // From a client address of its own (strikes add up per client).
        let text = String::from_utf8_lossy(bytes).replacen(
            "Host: e\r\n",
            &format!("Host: e\r\nX-Forwarded-For: 203.0.113.{}\r\n", 100 + i),
            1,
        );
        let (status, body) = raw(gw, text.as_bytes()).await;
        assert!(status.starts_with("HTTP/1.1 4"), "{}: {status}", String::from_utf8_lossy(bytes));
        assert!(
            status.contains(rule) || body.contains(rule),
            "{}: {status} {body}",
            String::from_utf8_lossy(bytes)
        );
        assert_eq!(app.hits(), hits, "nothing of it reached the app");
        if rule == "\"method\"" {
            let head = status.to_ascii_lowercase();
            assert!(
                head.contains("allow: get, head, post, put, delete, patch, options"),
                "a 405 names the methods: {status}"
            );
        }
    }

    // Limits: the gateway's and a route's own.
    let long = format!("/strict/{}", "a".repeat(300));
    assert_eq!(request(gw, "GET", "edge", &long, &[], Bytes::new()).await.0, 414);
    assert_eq!(request(gw, "GET", "edge", &format!("/{}", "a".repeat(9000)), &[], Bytes::new()).await.0, 414);
    let many: Vec<(String, String)> = (0..25).map(|i| (format!("x-h{i}"), "v".to_string())).collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(request(gw, "GET", "edge", "/strict", &many, Bytes::new()).await.0, 431);
    assert_eq!(request(gw, "GET", "edge", "/ok", &many, Bytes::new()).await.0, 200, "the default is 100");
    assert_eq!(request(gw, "POST", "edge", "/strict", &[], Bytes::from(vec![b'x'; 200])).await.0, 413);
    // `exact` takes GET /exact only: a POST falls through to the catch-all (the log says which).
    assert_eq!(request(gw, "POST", "edge", "/exact", &[], Bytes::new()).await.0, 200);
    assert_eq!(request(gw, "GET", "edge", "/exact", &[], Bytes::new()).await.0, 200);

    // Threats: blocked on the strict route, detected (logged, counted, passed) elsewhere.
    let probe = "/strict?q=1%27%20OR%20%271%27%3D%271";
    let (st, body) = request(gw, "GET", "edge", probe, &[], Bytes::new()).await;
    assert_eq!(
        (st, serde_json::from_str::<Value>(&body).unwrap()["rule"].as_str()),
        (403, Some("sqli")),
        "{body}"
    );
    let xss = br#"{"question":"<script>alert(1)</script>"}"#;
    let (st, body) = request(
        gw,
        "POST",
        "edge",
        "/strict",
        &[("content-type", "application/json")],
        Bytes::from_static(xss),
    )
    .await;
    assert_eq!(
        (st, serde_json::from_str::<Value>(&body).unwrap()["rule"].as_str()),
        (403, Some("xss")),
        "{body}"
    );
    let (st, _) = request(
        gw,
        "POST",
        "edge",
        "/detected",
        &[("content-type", "application/json")],
        Bytes::from_static(xss),
    )
    .await;
    assert_eq!(st, 200, "detect mode lets it through");
    let (_, m) = get(gateway.admin, "admin", "/metrics").await;
    assert!(m.contains(r#"mesh_sidecar_edge_detections_total{rule="xss"} 1"#), "{m}");

    // The app learns the client from the forwarding headers the edge sets.
    let (_, body) = request(
        gw,
        "GET",
        "edge",
        "/who",
        &[("x-forwarded-for", "203.0.113.9"), ("forwarded", "for=6.6.6.6")],
        Bytes::new(),
    )
    .await;
    let h = seen(&body);
    assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(h["forwarded"], "for=203.0.113.9;proto=http");
    assert_eq!(h["x-forwarded-proto"], "http");

    // IP lists, and an automatic block after three strikes that lifts after its TTL.
    let denied = from("192.0.2.44");
    let (st, body) = request(gw, "GET", "edge", "/ok", &[(denied.0, &denied.1)], Bytes::new()).await;
    assert_eq!(
        (st, serde_json::from_str::<Value>(&body).unwrap()["rule"].as_str()),
        (403, Some("ip_denied"))
    );
    let mallory = from("198.51.100.66");
    for _ in 0..3 {
        assert_eq!(
            request(gw, "GET", "edge", "/strict?q=%3Cscript%3E", &[(mallory.0, &mallory.1)], Bytes::new())
                .await
                .0,
            403
        );
    }
    let (st, h, body) =
        request_full(gw, "GET", "edge", "/ok", &[(mallory.0, &mallory.1)], Bytes::new()).await;
    assert_eq!(
        (st, serde_json::from_str::<Value>(&body).unwrap()["rule"].as_str()),
        (429, Some("ip_blocked")),
        "{body}"
    );
    assert!(h.contains_key("retry-after"));
    let (_, blocks) = get(gateway.admin, "admin", "/gateway/blocks").await;
    assert!(blocks.contains("198.51.100.66") && blocks.contains("xss"), "{blocks}");
    assert_eq!(
        request(gw, "GET", "edge", "/ok", &[(one.0, &one.1)], Bytes::new()).await.0,
        200,
        "only that client"
    );
    eventually(WAIT, "the block lifts after its TTL", || async {
        request(gw, "GET", "edge", "/ok", &[(mallory.0, &mallory.1)], Bytes::new()).await.0 == 200
    })
    .await;
    let (_, m) = get(gateway.admin, "admin", "/metrics").await;
    assert!(m.contains("mesh_sidecar_edge_blocks_total 1"), "{m}");
    // An operator lifts a block at once.
    for _ in 0..3 {
        request(gw, "GET", "edge", "/a%2fb", &[(mallory.0, &mallory.1)], Bytes::new()).await;
    }
    assert_eq!(request(gw, "GET", "edge", "/ok", &[(mallory.0, &mallory.1)], Bytes::new()).await.0, 429);
    let (st, _) =
        request(gateway.admin, "DELETE", "admin", "/gateway/blocks/198.51.100.66", &[], Bytes::new()).await;
    assert_eq!(st, 200);
    assert_eq!(request(gw, "GET", "edge", "/ok", &[(mallory.0, &mallory.1)], Bytes::new()).await.0, 200);
    assert_eq!(
        request(gateway.admin, "DELETE", "admin", "/gateway/blocks/nope", &[], Bytes::new()).await.0,
        400
    );

    // Every answer of the edge says nosniff; every request left one JSON line in the log.
    let (_, h, _) = request_full(gw, "GET", "edge", "/last", &[], Bytes::new()).await;
    assert_eq!(h["x-content-type-options"], "nosniff");
    // Lines are written in the order requests finish: the last one's means all are there.
    eventually(WAIT, "the access log is written", || async {
        std::fs::read_to_string(&log_file).unwrap_or_default().contains("\"path\":\"/last\"")
    })
    .await;
    let text = std::fs::read_to_string(&log_file).unwrap();
    let lines: Vec<Value> =
        text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
    for l in &lines {
        for field in [
            "time",
            "client_ip",
            "method",
            "path",
            "status",
            "bytes_in",
            "bytes_out",
            "duration_ms",
            "request_id",
            "trace_id",
        ] {
            assert!(!l[field].is_null(), "{field} in {l}");
        }
        for field in ["subject", "route", "service", "endpoint", "rule"] {
            assert!(l.get(field).is_some(), "{field} in {l}");
        }
    }
    let find = |pred: &dyn Fn(&Value) -> bool| lines.iter().find(|l| pred(l)).cloned();
    let alice_line = find(&|l| l["subject"] == "alice").expect("alice's requests");
    assert_eq!(
        (alice_line["route"].as_str(), alice_line["service"].as_str()),
        (Some("by-subject"), Some("api"))
    );
    assert!(alice_line["bytes_out"].as_u64().unwrap() > 0);
    assert!(find(&|l| l["rule"] == "rate_limited" && l["status"] == 429).is_some());
    assert!(
        find(&|l| l["rule"] == "xss" && l["status"] == 200 && l["path"] == "/detected").is_some(),
        "detect mode logs its rule"
    );
    assert!(find(&|l| l["rule"] == "ip_blocked" && l["client_ip"] == "198.51.100.66").is_some());
    assert!(find(&|l| l["rule"] == "path_not_normalised").is_some());
    assert!(find(&|l| l["path"] == "/exact" && l["method"] == "GET" && l["route"] == "exact").is_some());
    assert!(find(&|l| l["path"] == "/exact" && l["method"] == "POST" && l["route"] == "rest").is_some());
    drop((gateway, api));
}

/// Routes are a control-plane resource: set through the `gateway` policy, validated naming the
/// field, pushed live and ACKed, and kept by a gateway restarted while the control plane is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_set_on_the_control_plane_serve_live_and_survive_its_outage() {
    use mesh_proto::{gateway::GatewayPolicy, policy::ServicePolicy, v1};
    let cp = TestCp::start().await;
    for s in ["api", "web"] {
        cp.set_policy(s, &mesh_testkit::fast_policy()).await;
    }
    let (api_app, web_app) = (Backend::start("api").await, Backend::start("web").await);
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let _api =
        TestSidecar::start(TestSidecar::config(&cp.url(), "api", "a1", api_app.addr, dirs[0].path())).await;
    let _web =
        TestSidecar::start(TestSidecar::config(&cp.url(), "web", "w1", web_app.addr, dirs[1].path())).await;
    // Started with its own route only.
    let cfg = TestSidecar::gateway_config(&cp.url(), vec![Route::parse("/=api").unwrap()], dirs[2].path());
    let gateway = TestSidecar::start(cfg.clone()).await;
    let gw = gateway.outbound;
    eventually(WAIT, "the gateway's own route serves", || async {
        mesh_testkit::backend_of(&request(gw, "GET", "edge", "/web/x", &[], Bytes::new()).await.1) == "api"
    })
    .await;

    let routes: GatewayPolicy = serde_yaml_ng::from_str(
        "routes:\n  - { name: web, prefix: /web, service: web, rewrite: / }\n  - { name: api, prefix: /, service: api }\n",
    )
    .unwrap();
    let version = cp.set_policy("gateway", &ServicePolicy { gateway: routes, ..Default::default() }).await;
    eventually(WAIT, "the new route serves without a restart", || async {
        mesh_testkit::backend_of(&request(gw, "GET", "edge", "/web/x", &[], Bytes::new()).await.1) == "web"
    })
    .await;
    let (_, in_force) = get(gateway.admin, "admin", "/gateway/routes").await;
    let in_force: Value = serde_json::from_str(&in_force).unwrap();
    assert_eq!(in_force["version"], version, "{in_force}");
    // The gateway ACKed it: the control plane's proxy status says so.
    let admin = || async { v1::admin_client::AdminClient::new(cp.channel().await) };
    eventually(WAIT, "the gateway ACKs the routes", || async {
        let status =
            admin().await.proxy_status(v1::ProxyStatusRequest::default()).await.unwrap().into_inner();
        status.proxies.iter().any(|p| {
            p.node_id == "gateway"
                && p.policies.iter().any(|s| s.service == "gateway" && s.acked_version == version)
        })
    })
    .await;

    // An invalid route is refused naming the field, and nothing changes.
    let bad: GatewayPolicy =
        serde_yaml_ng::from_str("routes: [{ prefix: /x, service: Not_A_Service }]").unwrap();
    let refused = v1::policy_client::PolicyClient::new(cp.channel().await)
        .set(v1::SetPolicyRequest {
            service: "gateway".into(),
            policy: Some((&ServicePolicy { gateway: bad, ..Default::default() }).into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("gateway.routes[0].service"), "{}", refused.message());
    assert_eq!(
        mesh_testkit::backend_of(&request(gw, "GET", "edge", "/web/x", &[], Bytes::new()).await.1),
        "web"
    );

    // IP lists pushed the same way: an allow list without loopback shuts this client out.
    let with_ips: GatewayPolicy = serde_yaml_ng::from_str(
        "routes:\n  - { name: web, prefix: /web, service: web, rewrite: / }\n  - { name: api, prefix: /, service: api }\nip_allow: [10.0.0.0/8]\n",
    )
    .unwrap();
    cp.set_policy("gateway", &ServicePolicy { gateway: with_ips.clone(), ..Default::default() }).await;
    eventually(WAIT, "the pushed allow list applies", || async {
        request(gw, "GET", "edge", "/web/x", &[], Bytes::new()).await.1.contains("ip_not_allowed")
    })
    .await;
    let version = cp
        .set_policy(
            "gateway",
            &ServicePolicy { gateway: GatewayPolicy { ip_allow: vec![], ..with_ips }, ..Default::default() },
        )
        .await;
    eventually(WAIT, "and lifts when it is removed", || async {
        request(gw, "GET", "edge", "/web/x", &[], Bytes::new()).await.0 == 200
    })
    .await;

    // The control plane goes away and the gateway restarts: it serves the routes it last ACKed.
    cp.stop().await;
    gateway.stop().await;
    let gateway = TestSidecar::start(cfg).await;
    let (status, body) = request(gateway.outbound, "GET", "edge", "/web/x", &[], Bytes::new()).await;
    assert_eq!((status, mesh_testkit::backend_of(&body).as_str()), (200, "web"), "{body}");
    let (_, in_force) = get(gateway.admin, "admin", "/gateway/routes").await;
    assert!(in_force.contains(&format!("\"version\":{version}")), "{in_force}");
}

/// No input makes the edge answer 5xx, hang or crash: seeded random and mutated requests —
/// methods, targets, headers, framing, bodies and tokens — sent raw. `MESH_FUZZ_CASES` sets the
/// count (300 here; RELIABILITY.md has the long run), `MESH_FUZZ_SEED` replays a run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_and_mutated_requests_never_get_a_5xx_a_hang_or_a_crash() {
    use rand::{Rng, SeedableRng, rngs::StdRng};
    let cases: usize = std::env::var("MESH_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    let seed: u64 =
        std::env::var("MESH_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("fuzzing the edge: {cases} cases, MESH_FUZZ_SEED={seed}");
    let cp = TestCp::start().await;
    cp.set_policy("api", &mesh_testkit::fast_policy()).await;
    let app = Backend::start("api").await;
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let _api =
        TestSidecar::start(TestSidecar::config(&cp.url(), "api", "a1", app.addr, dirs[0].path())).await;
    let jwks = dirs[2].path().join("jwks.json");
    let (key, jwk) = es256("k1");
    write_jwks(&jwks, &[&jwk]);
    let mut cfg =
        TestSidecar::gateway_config(&cp.url(), serde_yaml_ng::from_str(ROUTES).unwrap(), dirs[1].path());
    cfg.edge_auth = Some(auth_config(&jwks));
    cfg.edge.auto_block.after = 0; // every case must reach the checks, not a block
    let gateway = TestSidecar::start(cfg).await;
    let gw = gateway.outbound;
    eventually(WAIT, "the gateway reaches api", || async {
        request(gw, "GET", "edge", "/ping", &[], Bytes::new()).await.0 == 200
    })
    .await;

    let fives = || async {
        let (_, m) = get(gateway.admin, "admin", "/metrics").await;
        m.lines().filter(|l| l.contains("status=\"5")).map(str::to_string).collect::<Vec<_>>()
    };
    let before = fives().await;
    let good = token(&key, "k1", "alice", 600);
    let mut rng = StdRng::seed_from_u64(seed);
    let pick = |rng: &mut StdRng, xs: &[&str]| xs[rng.random_range(0..xs.len())].to_string();
    let noise =
        |rng: &mut StdRng, n: usize, printable: bool| -> String {
            (0..rng.random_range(0..n))
                .map(|_| {
                    if printable {
                        rng.random_range(0x20u8..0x7f) as char
                    } else {
                        rng.random::<u8>() as char
                    }
                })
                .collect()
        };
    for case in 0..cases {
        let method = pick(
            &mut rng,
            &[
                "GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD", "TRACE", "CONNECT", "BREW",
                "get", "G\tET",
            ],
        );
        let mut target = pick(
            &mut rng,
            &[
                "/",
                "/limited",
                "/by-ip/x",
                "/cors/a",
                "/strict",
                "/exact",
                "/a/../b",
                "/%2e%2e/",
                "/%2F",
                "//x",
                "*",
                "http://edge/abs",
                "/a?b=c&d",
            ],
        );
        if rng.random_bool(0.4) {
            target.push_str(&noise(&mut rng, 40, true).replace([' ', '\r', '\n'], "%20"));
        }
        if rng.random_bool(0.05) {
            target.push_str(&"a".repeat(rng.random_range(8000..20000)));
        }
        let mut headers =
            vec![format!("Host: {}", pick(&mut rng, &["edge", "", "a:b:c", "x.example.com:99999"]))];
        let mut t = good.clone();
        match rng.random_range(0..8) {
            0 => {}
            1 => t.replace_range(t.len() - 3.., &noise(&mut rng, 4, true)),
            2 => t = format!("eyJhbGciOiJub25lIn0.{}.", t.split('.').nth(1).unwrap_or_default()),
            3 => t = noise(&mut rng, 200, true),
            4 => t = t.replace('.', ""),
            5 => t = format!("{t}.{t}"),
            _ => t.clear(),
        }
        if !t.is_empty() {
            headers.push(format!(
                "Authorization: {} {t}",
                pick(&mut rng, &["Bearer", "bearer", "Basic", "Bearer  "])
            ));
        }
        let body = match rng.random_range(0..5) {
            0 => String::new(),
            1 => noise(&mut rng, 300, false),
            2 => r#"{"q":"1' OR '1'='1","x":"<script>"}"#.to_string(),
            3 => "x".repeat(rng.random_range(0..3000)),
            _ => serde_json::json!({"outcome": 0, "side": "buy", "shares": noise(&mut rng, 10, true)})
                .to_string(),
        };
        match rng.random_range(0..6) {
            0 => headers.push(format!("Content-Length: {}", body.len())),
            1 => headers.push(format!("Content-Length: {}", rng.random_range(0..5000))),
            2 => headers.push("Transfer-Encoding: chunked".into()),
            3 => {
                headers.push(format!("Content-Length: {}", body.len()));
                headers.push("Transfer-Encoding: chunked".into());
            }
            4 => headers.push(format!("Content-Length: {}, {}", body.len(), body.len())),
            _ => {}
        }
        for _ in 0..rng.random_range(0..6) {
            let name = pick(
                &mut rng,
                &[
                    "Origin",
                    "X-Forwarded-For",
                    "X-Mesh-User",
                    "Content-Type",
                    "X-Api-Key",
                    "Cookie",
                    "Access-Control-Request-Method",
                    "Forwarded",
                ],
            );
            let printable = rng.random_bool(0.8);
            headers.push(format!("{name}: {}", noise(&mut rng, 60, printable)));
        }
        if rng.random_bool(0.05) {
            headers.extend((0..rng.random_range(100..200)).map(|i| format!("X-Many-{i}: v")));
        }
        headers.push("Connection: close".into());
        let head = format!("{method} {target} HTTP/1.1\r\n{}\r\n\r\n", headers.join("\r\n"));
        let mut wire = head.into_bytes();
        wire.extend_from_slice(body.as_bytes());
        // A 5xx the edge gave, or no answer in time, fails the case; a closed connection (the
        // parser refusing the bytes outright) does not.
        let mut s = tokio::net::TcpStream::connect(gw).await.unwrap();
        let _ = s.write_all(&wire).await;
        let _ = s.shutdown().await;
        let mut out = Vec::new();
        let read = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
        let shown = String::from_utf8_lossy(&wire[..wire.len().min(300)]).into_owned();
        assert!(read.is_ok(), "case {case} (MESH_FUZZ_SEED={seed}) hung: {shown:?}");
        let answer = String::from_utf8_lossy(&out);
        let status: u16 = answer.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        assert!(status < 500, "case {case} (MESH_FUZZ_SEED={seed}): {shown:?}\n→ {answer}");
    }
    // Still serving.
    assert_eq!(request(gw, "GET", "edge", "/ok", &[], Bytes::new()).await.0, 200);
    assert_eq!(fives().await, before, "no 5xx counted (MESH_FUZZ_SEED={seed})");
}

/// A self-signed certificate for `localhost`: (cert PEM, key PEM, cert DER).
fn localhost_cert() -> (String, String, Vec<u8>) {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    (c.cert.pem(), c.signing_key.serialize_pem(), c.cert.der().to_vec())
}

/// A TLS connection to the gateway trusting `trusted`, offering h2 and http/1.1: the stream, the
/// protocol chosen, and the certificate the gateway showed.
async fn tls_connect(
    addr: std::net::SocketAddr,
    trusted: &[&[u8]],
) -> (tokio_rustls::client::TlsStream<tokio::net::TcpStream>, Option<Vec<u8>>, Vec<u8>) {
    let mut roots = rustls::RootCertStore::empty();
    for der in trusted {
        roots.add(rustls::pki_types::CertificateDer::from(der.to_vec())).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg)).connect(name, tcp).await.unwrap();
    let (alpn, shown) = {
        let c = tls.get_ref().1;
        (c.alpn_protocol().map(<[u8]>::to_vec), c.peer_certificates().unwrap()[0].to_vec())
    };
    (tls, alpn, shown)
}

/// TLS on the public listener: HTTP/2 and HTTP/1.1 by ALPN, HSTS on every answer, the app told
/// `X-Forwarded-Proto: https`, and a renewed certificate served without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_public_listener_speaks_tls_with_hsts_and_reloads_its_certificate() {
    use http_body_util::BodyExt;
    use sidecar::transport::public_tls::PublicTlsFiles;
    let cp = TestCp::start().await;
    cp.set_policy("api", &mesh_testkit::fast_policy()).await;
    let app = Backend::start("api").await;
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let _api =
        TestSidecar::start(TestSidecar::config(&cp.url(), "api", "a1", app.addr, dirs[0].path())).await;
    let (cert, key) = (dirs[1].path().join("tls.crt"), dirs[1].path().join("tls.key"));
    let (pem, key_pem, der1) = localhost_cert();
    std::fs::write(&cert, pem).unwrap();
    std::fs::write(&key, key_pem).unwrap();
    let mut cfg =
        TestSidecar::gateway_config(&cp.url(), vec![Route::parse("/=api").unwrap()], dirs[1].path());
    cfg.public_tls = Some(PublicTlsFiles { cert: cert.clone(), key: key.clone() });
    cfg.tls_reload = Duration::from_millis(100);
    let gateway = TestSidecar::start(cfg).await;
    let gw = gateway.outbound;
    assert_eq!(
        request(gw, "GET", "edge", "/ok", &[], Bytes::new()).await.0,
        0,
        "no plaintext on a TLS listener"
    );

    // HTTP/1.1.
    let http1 = || async {
        let (mut s, _, _) = tls_connect(gw, &[&der1]).await;
        s.write_all(b"GET /who HTTP/1.1\r\nHost: edge\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    };
    eventually(WAIT, "the gateway reaches api over its TLS listener", || async {
        http1().await.starts_with("HTTP/1.1 200")
    })
    .await;
    let answer = http1().await;
    let lower = answer.to_ascii_lowercase();
    assert!(lower.contains("strict-transport-security: max-age=31536000; includesubdomains"), "{answer}");
    assert!(lower.contains("x-content-type-options: nosniff"), "{answer}");
    assert!(answer.contains("\"x-forwarded-proto\":\"https\""), "{answer}");

    // HTTP/2, chosen by ALPN.
    let (s, alpn, shown) = tls_connect(gw, &[&der1]).await;
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(shown, der1);
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(s),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req =
        http::Request::get("https://localhost/who").body(http_body_util::Empty::<Bytes>::new()).unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("strict-transport-security"));
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("\"x-forwarded-proto\":\"https\""));

    // A renewed certificate: new connections get it, without a restart.
    let (pem2, key2, der2) = localhost_cert();
    let tmp = dirs[1].path().join("tls.tmp");
    std::fs::write(&tmp, key2).unwrap();
    std::fs::rename(&tmp, &key).unwrap();
    std::fs::write(&tmp, pem2).unwrap();
    std::fs::rename(&tmp, &cert).unwrap();
    eventually(WAIT, "the renewed certificate is served", || async {
        tls_connect(gw, &[&der1, &der2]).await.2 == der2
    })
    .await;
}

/// A route with `cache: false` is never answered from the gateway's cache, whatever the
/// service's cache policy; the other routes to the service are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_can_turn_the_gateway_cache_off() {
    let cp = TestCp::start().await;
    let mut policy = mesh_testkit::fast_policy();
    policy.cache.ttl = Duration::from_secs(60);
    cp.set_policy("api", &policy).await;
    let app = Backend::start("api").await;
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let _api =
        TestSidecar::start(TestSidecar::config(&cp.url(), "api", "a1", app.addr, dirs[0].path())).await;
    let routes: Vec<Route> = serde_yaml_ng::from_str(
        "[{ prefix: /fresh, service: api, rewrite: /, cache: false }, { prefix: /, service: api }]",
    )
    .unwrap();
    let gateway = TestSidecar::start(TestSidecar::gateway_config(&cp.url(), routes, dirs[1].path())).await;
    let gw = gateway.outbound;
    eventually(WAIT, "the cached route answers from the cache", || async {
        request_full(gw, "GET", "edge", "/page", &[], Bytes::new())
            .await
            .1
            .get("x-cache")
            .is_some_and(|v| v == "hit")
    })
    .await;
    let hits = app.hits();
    for _ in 0..3 {
        let (status, h, _) = request_full(gw, "GET", "edge", "/fresh/page", &[], Bytes::new()).await;
        assert_eq!(status, 200);
        assert!(h.get("x-cache").is_none(), "{h:?}");
    }
    assert_eq!(app.hits(), hits + 3, "every request of the uncached route reached the app");
}
