//! Spans over OTLP, received by the test kit's collector (a real gRPC `TraceService`): a
//! request through two sidecars is one trace with a server span per hop and a client span per
//! attempt (a retry shows as two), an event delivery links to the span that published it, the
//! policy's sampling share decides new traces, and a collector that is down changes nothing
//! for requests.

use std::time::Duration;

use mesh_proto::policy::{Algorithm, Ratio, RetryOn, ServicePolicy};
use mesh_testkit::{
    Backend, CLIENT, CONSUMER, Collector, ReceivedSpan, SERVER, TestCp, TestSidecar, WAIT, eventually,
    fast_policy, request,
};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

struct Traced {
    cp: TestCp,
    collector: Collector,
    failing: Backend,
    web: TestSidecar,
    _market: Vec<TestSidecar>,
    _apps: Vec<Backend>,
    _dirs: Vec<tempfile::TempDir>,
}

/// `web` calling `market`, whose two instances are m0 (answers 503) and m1 (answers 200),
/// taken in turn, a 503 retried once on the other; every sidecar exports to one collector.
async fn traced_mesh(otlp: Option<String>) -> Traced {
    let collector = Collector::start().await;
    let otlp = otlp.unwrap_or_else(|| collector.endpoint());
    let cp = TestCp::start().await;
    let mut policy = fast_policy();
    policy.load_balancer.algorithm = Algorithm::RoundRobin;
    policy.retry.max_attempts = 2;
    policy.retry.retry_on = vec![RetryOn::Status503];
    policy.retry.backoff_base = Duration::from_millis(1);
    policy.circuit_breaker.consecutive_failures = 1000;
    let version = cp.set_policy("market", &policy).await;
    cp.set_policy("web", &fast_policy()).await;
    let (mut dirs, mut market, mut apps) = (Vec::new(), Vec::new(), Vec::new());
    let failing = Backend::start("m0").await;
    failing.status.store(503, std::sync::atomic::Ordering::Relaxed);
    let healthy = Backend::start("m1").await;
    for (i, app) in [failing.addr, healthy.addr].into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = TestSidecar::config(&cp.url(), "market", &format!("m{i}"), app, dir.path());
        cfg.otlp_endpoint = Some(otlp.clone());
        market.push(TestSidecar::start(cfg).await);
        dirs.push(dir);
    }
    apps.push(healthy);
    let web_app = Backend::start("web").await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = TestSidecar::config(&cp.url(), "web", "web-1", web_app.addr, dir.path());
    cfg.upstreams = vec!["market".into()];
    cfg.otlp_endpoint = Some(otlp);
    let web = TestSidecar::start(cfg).await;
    apps.push(web_app);
    dirs.push(dir);
    eventually(WAIT, "web sees both market endpoints on the current policy", || async {
        let c = web.config_json().await;
        let m = c["upstreams"].as_array().unwrap().iter().find(|u| u["service"] == "market").cloned();
        m.is_some_and(|m| m["policy_version"] == version && m["endpoints"].as_array().unwrap().len() == 2)
    })
    .await;
    Traced { cp, collector, failing, web, _market: market, _apps: apps, _dirs: dirs }
}

fn one<'a>(spans: &'a [ReceivedSpan], what: &str, pick: impl Fn(&ReceivedSpan) -> bool) -> &'a ReceivedSpan {
    let found: Vec<_> = spans.iter().filter(|s| pick(s)).collect();
    assert_eq!(found.len(), 1, "one {what} in {spans:#?}");
    found[0]
}

#[tokio::test]
async fn a_request_is_one_trace_with_a_span_per_hop_and_per_attempt() {
    let mesh = traced_mesh(None).await;
    // Requests in one trace each (new parents), until one was retried: round robin starts one
    // of every two on the failing instance.
    let mut retried = None;
    for i in 0..4u32 {
        let trace = format!("{TRACE:.28}{i:04x}");
        let tp = format!("00-{trace}-{CALLER_SPAN}-01");
        let (status, body) =
            request(mesh.web.outbound, "GET", "market", "/work", &[("traceparent", &tp)], Default::default())
                .await;
        assert_eq!(status, 200, "{body}");
        let app_saw: serde_json::Value = serde_json::from_str(&body).unwrap();
        let hits = mesh.failing.hits.load(std::sync::atomic::Ordering::Relaxed);
        if hits > 0 && retried.is_none() {
            retried = Some((trace.clone(), app_saw["headers"]["traceparent"].as_str().unwrap().to_string()));
        }
    }
    let (trace, at_app) = retried.expect("round robin sent a request to the failing instance");
    // web: server + 2 attempts; m0: server + attempt; m1: server + attempt.
    eventually(WAIT, "the retried request's seven spans are exported", || async {
        mesh.collector.trace(&trace).len() >= 7
    })
    .await;
    let spans = mesh.collector.trace(&trace);
    let server = one(&spans, "web server span", |s| s.service == "web" && s.kind == SERVER);
    assert_eq!(server.parent_span_id, CALLER_SPAN, "the caller's span is the first hop's parent");
    assert_eq!(server.attr("mesh.direction"), Some("outbound"));
    assert_eq!(server.attr("http.response.status_code"), Some("200"));
    let mut attempts: Vec<&ReceivedSpan> =
        spans.iter().filter(|s| s.service == "web" && s.kind == CLIENT).collect();
    attempts.sort_by_key(|s| s.start_unix_nano);
    assert_eq!(attempts.len(), 2, "two attempts: {spans:#?}");
    for a in &attempts {
        assert_eq!(a.parent_span_id, server.span_id, "each attempt is a child of the hop's server span");
        assert_eq!(a.attr("mesh.service"), Some("market"));
    }
    let (first, second) = (attempts[0], attempts[1]);
    assert_eq!(first.attr("http.response.status_code"), Some("503"));
    assert_eq!(first.attr("mesh.retry"), Some("retry"));
    assert_eq!(first.status, 2, "a failed attempt is an error");
    assert_eq!(first.attr("http.request.resend_count"), None);
    assert_eq!(second.attr("http.request.resend_count"), Some("1"));
    assert_eq!(second.attr("http.response.status_code"), Some("200"));
    assert_ne!(first.attr("mesh.endpoint"), second.attr("mesh.endpoint"), "the retry went elsewhere");
    // Each attempt is the parent of the server span of the sidecar it reached, whose own
    // attempt at its app is what the app's traceparent names.
    for (attempt, instance) in [(first, "m0"), (second, "m1")] {
        let inbound = one(&spans, "inbound server span", |s| {
            s.kind == SERVER && s.service == "market" && s.parent_span_id == attempt.span_id
        });
        assert_eq!(inbound.attr("mesh.direction"), Some("inbound"), "{instance}");
        let to_app =
            one(&spans, "attempt at the app", |s| s.kind == CLIENT && s.parent_span_id == inbound.span_id);
        assert_eq!(to_app.attr("server.address"), Some("app"));
        if instance == "m1" {
            assert_eq!(at_app, format!("00-{trace}-{}-01", to_app.span_id), "the app is the next hop");
        }
    }
    drop(mesh.cp);
}

#[tokio::test]
async fn the_policy_samples_new_traces_and_callers_keep_their_decision() {
    let mesh = traced_mesh(None).await;
    let mut p = fast_policy();
    p.tracing.sampling = Ratio::new(0.0);
    mesh.cp.set_policy("web", &p).await;
    eventually(WAIT, "web samples by its own policy", || async {
        mesh.web.config_json().await["tracing"]["sampling"] == 0.0
    })
    .await;
    // A new trace at 0 %: propagated, not sampled, nothing recorded.
    let (status, body) = request(mesh.web.outbound, "GET", "market", "/new", &[], Default::default()).await;
    assert_eq!(status, 200, "{body}");
    let app_saw: serde_json::Value = serde_json::from_str(&body).unwrap();
    let tp = app_saw["headers"]["traceparent"].as_str().unwrap().to_string();
    assert!(tp.ends_with("-00"), "not sampled: {tp}");
    // A caller's sampled trace is recorded whatever the share: parent-based.
    let given = format!("00-{TRACE}-{CALLER_SPAN}-01");
    let (status, _) =
        request(mesh.web.outbound, "GET", "market", "/kept", &[("traceparent", &given)], Default::default())
            .await;
    assert_eq!(status, 200);
    eventually(WAIT, "the caller's sampled trace is exported", || async {
        mesh.collector.trace(TRACE).iter().any(|s| s.service == "web" && s.kind == SERVER)
    })
    .await;
    let unsampled = &tp[3..35];
    assert!(mesh.collector.trace(unsampled).is_empty(), "nothing of the unsampled trace");
}

#[tokio::test]
async fn requests_are_unaffected_while_the_collector_is_down() {
    // A port nothing listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mesh = traced_mesh(Some(format!("http://{closed}"))).await;
    mesh.failing.status.store(0, std::sync::atomic::Ordering::Relaxed);
    for i in 0..200 {
        let (status, body) =
            request(mesh.web.outbound, "GET", "market", &format!("/r{i}"), &[], Default::default()).await;
        assert_eq!(status, 200, "request {i}: {body}");
    }
}

/// The event's `traceparent` (the CloudEvents distributed tracing extension) is the span that
/// published it; the subscriber's delivery span is a consumer span linked to it.
#[tokio::test]
async fn an_event_delivery_links_to_the_span_that_published_it() {
    let collector = Collector::start().await;
    let cp = TestCp::start().await;
    cp.set_policy("ledger", &ServicePolicy::default()).await;
    let publisher_app = Backend::start("publisher").await;
    let dir = tempfile::tempdir().unwrap();
    let publisher =
        TestSidecar::start(TestSidecar::config(&cp.url(), "desk", "desk-1", publisher_app.addr, dir.path()))
            .await;
    let hooks = Backend::start("ledger").await;
    let ledger_dir = tempfile::tempdir().unwrap();
    let mut cfg = TestSidecar::config(&cp.url(), "ledger", "ledger-1", hooks.addr, ledger_dir.path());
    cfg.subscriptions = vec![sidecar::events::subscription::Subscription::parse("trades=/hooks").unwrap()];
    cfg.otlp_endpoint = Some(collector.endpoint());
    let _ledger = TestSidecar::start(cfg).await;
    // Published inside a trace, without a traceparent attribute of its own: the request's is
    // carried.
    let given = format!("00-{TRACE}-{CALLER_SPAN}-01");
    let event = r#"{"specversion":"1.0","id":"t-1","source":"desk","type":"TradeExecuted","topic":"trades","data":{"n":1}}"#;
    let (status, body) = request(
        publisher.admin,
        "POST",
        "admin",
        "/events",
        &[("content-type", "application/cloudevents+json"), ("traceparent", &given)],
        event.as_bytes().to_vec().into(),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    eventually(WAIT, "the delivery's span is exported", || async {
        collector.spans().iter().any(|s| s.kind == CONSUMER)
    })
    .await;
    let spans = collector.spans();
    let delivery = one(&spans, "delivery span", |s| s.kind == CONSUMER);
    assert_eq!(delivery.name, "process trades");
    assert_eq!(delivery.service, "ledger");
    assert_eq!(delivery.attr("messaging.message.id"), Some("t-1"));
    assert_eq!(delivery.links, vec![(TRACE.to_string(), CALLER_SPAN.to_string())], "linked to the publisher");
    assert_ne!(delivery.trace_id, TRACE, "a delivery is its own trace, linked, not a child");
}
