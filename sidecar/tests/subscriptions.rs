//! Subscriptions: events from the bus delivered to the app by webhook — retried, in order per
//! key, poison events dead-lettered, paused while the app is unhealthy.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::{get, post},
};
use futures::StreamExt;
use mesh_proto::{policy::ServicePolicy, v1};
use mesh_testkit::{TestCp, TestSidecar, WAIT, eventually};
use sidecar::events::subscription::Subscription;
use tokio_util::sync::CancellationToken;

/// An app with a webhook at `/hooks`: answers 500 to every `fail_every`-th delivery (0: never)
/// and always to the event `poison`; records what it accepted.
#[derive(Clone, Default)]
struct Hooks {
    accepted: Arc<Mutex<Vec<(String, String, String)>>>,
    calls: Arc<AtomicU64>,
    probes: Arc<AtomicU64>,
    fail_every: u64,
    healthy: Arc<AtomicBool>,
}

async fn hook(State(h): State<Hooks>, headers: HeaderMap, body: String) -> StatusCode {
    let n = h.calls.fetch_add(1, Ordering::SeqCst) + 1;
    let header = |k: &str| headers.get(k).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let id = header("ce-id");
    if id == "poison" || (h.fail_every > 0 && n % h.fail_every == 0) {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    h.accepted.lock().unwrap().push((id, header("ce-subject"), body));
    StatusCode::NO_CONTENT
}

async fn health(State(h): State<Hooks>) -> StatusCode {
    h.probes.fetch_add(1, Ordering::SeqCst);
    if h.healthy.load(Ordering::SeqCst) { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }
}

impl Hooks {
    async fn start(fail_every: u64, stop: CancellationToken) -> (Hooks, std::net::SocketAddr) {
        let h = Hooks { fail_every, healthy: Arc::new(AtomicBool::new(true)), ..Default::default() };
        let app = axum::Router::new()
            .route("/hooks", post(hook))
            .route("/healthz", get(health))
            .with_state(h.clone());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(l, app).with_graceful_shutdown(stop.cancelled_owned()).await.unwrap();
        });
        (h, addr)
    }

    fn accepted(&self) -> Vec<(String, String, String)> {
        self.accepted.lock().unwrap().clone()
    }
}

fn subscription(max_attempts: u32) -> Subscription {
    Subscription {
        max_attempts,
        backoff_base: Duration::from_millis(5),
        backoff_max: Duration::from_millis(20),
        ..Subscription::parse("markets=/hooks").unwrap()
    }
}

fn ev(id: &str, key: &str) -> v1::Event {
    v1::Event {
        id: id.into(),
        topic: "markets".into(),
        key: key.into(),
        r#type: "TradeExecuted".into(),
        data: format!("{{\"id\":\"{id}\"}}").into_bytes(),
        content_type: "application/json".into(),
        ..Default::default()
    }
}

async fn topic(cp: &TestCp, topic: &str) -> Vec<v1::Event> {
    let req =
        v1::ReplayRequest { topic: topic.into(), from_offset: Some(0), limit: 10_000, ..Default::default() };
    let s = v1::events_client::EventsClient::new(cp.channel().await).replay(req).await.unwrap().into_inner();
    s.filter_map(|d| async { d.ok()?.event }).collect().await
}

/// Publishes 40 events over 4 keys with a poison event among them to a subscriber that fails
/// every third delivery; returns (app, dead-lettered events, ids published).
async fn deliver_through_failures(max_attempts: u32) -> (Hooks, Vec<v1::Event>, Vec<String>) {
    let stop = CancellationToken::new();
    let cp = TestCp::start().await;
    let (hooks, app) = Hooks::start(3, stop.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = TestSidecar::config(&cp.url(), "ledger", "l1", app, dir.path());
    cfg.subscriptions = vec![subscription(max_attempts)];
    let _sc = TestSidecar::start(cfg).await;
    let mut events: Vec<v1::Event> =
        (0..40).map(|i| ev(&format!("e{i:02}"), &format!("k{}", i % 4))).collect();
    events.insert(17, ev("poison", "k1"));
    let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
    let mut bus = v1::events_client::EventsClient::new(cp.channel().await);
    for chunk in events.chunks(7) {
        bus.publish(v1::PublishRequest { events: chunk.to_vec() }).await.unwrap();
    }
    // Everything is settled once the last event was accepted or dead-lettered.
    eventually(WAIT, "every event is delivered or dead-lettered", || async {
        let done: Vec<String> = hooks
            .accepted()
            .into_iter()
            .map(|(id, _, _)| id)
            .chain(topic(&cp, "markets.dead-letter").await.into_iter().map(|e| e.id))
            .collect();
        done.contains(&"e39".to_string())
    })
    .await;
    let dead = topic(&cp, "markets.dead-letter").await;
    stop.cancel();
    (hooks, dead, ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_subscriber_gets_every_event_in_order_per_key_and_poison_is_dead_lettered() {
    let (hooks, dead, ids) = deliver_through_failures(4).await;
    let accepted = hooks.accepted();
    let mut got: Vec<String> = accepted.iter().map(|(id, _, _)| id.clone()).collect();
    // In order: deliveries are one at a time in offset order, so the accepted sequence is the
    // published one minus the poison event.
    let want: Vec<String> = ids.iter().filter(|id| *id != "poison").cloned().collect();
    assert_eq!(got, want, "every event, once accepted each, in order");
    for k in 0..4 {
        let key = format!("k{k}");
        let seq: Vec<&String> =
            accepted.iter().filter(|(_, kk, _)| *kk == key).map(|(id, _, _)| id).collect();
        assert!(seq.windows(2).all(|w| w[0] < w[1]), "order per key {key}: {seq:?}");
    }
    assert_eq!(accepted[0].2, "{\"id\":\"e00\"}", "the event's data is the body");
    assert!(hooks.calls.load(Ordering::SeqCst) > 44, "failures were retried");
    assert_eq!(dead.len(), 1, "only the poison event is dead-lettered: {dead:?}");
    let p = &dead[0];
    assert_eq!(p.id, "poison");
    assert_eq!(p.attributes["deadletter_topic"], "markets");
    assert_eq!(p.attributes["deadletter_attempts"], "4");
    assert!(p.attributes["deadletter_reason"].contains("500"), "{:?}", p.attributes);
    got.sort();
    got.dedup();
    assert_eq!(got.len(), 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_control_without_retries_failed_deliveries_never_reach_the_app() {
    let (hooks, dead, _) = deliver_through_failures(1).await;
    let accepted = hooks.accepted().len();
    assert!(accepted < 40, "with one attempt the app misses events, got {accepted}");
    assert_eq!(accepted + dead.len(), 41, "each event is accepted or dead-lettered, none lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_pauses_while_the_app_is_unhealthy() {
    let stop = CancellationToken::new();
    let cp = TestCp::start().await;
    let mut policy = ServicePolicy::default();
    policy.health.probe_interval = Duration::from_millis(100);
    policy.health.probe_timeout = Duration::from_millis(100);
    policy.health.healthy_threshold = 1;
    policy.health.unhealthy_threshold = 1;
    cp.set_policy("ledger", &policy).await;
    let (hooks, app) = Hooks::start(0, stop.clone()).await;
    hooks.healthy.store(false, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = TestSidecar::config(&cp.url(), "ledger", "l1", app, dir.path());
    cfg.subscriptions = vec![subscription(3)];
    let sc = TestSidecar::start(cfg).await;
    eventually(WAIT, "the sidecar has the policy and finds the app unhealthy", || async {
        let (_, m) = mesh_testkit::get(sc.admin, "admin", "/metrics").await;
        m.contains("mesh_sidecar_app_healthy 0") && m.contains("mesh_sidecar_policy_version")
    })
    .await;
    let mut bus = v1::events_client::EventsClient::new(cp.channel().await);
    bus.publish(v1::PublishRequest { events: (0..5).map(|i| ev(&format!("e{i}"), "k")).collect() })
        .await
        .unwrap();
    // While unhealthy (five more failed probes): no delivery is tried, so none fails and none is
    // dead-lettered.
    let probes = hooks.probes.load(Ordering::SeqCst);
    eventually(WAIT, "five more probes", || async { hooks.probes.load(Ordering::SeqCst) >= probes + 5 })
        .await;
    assert_eq!(hooks.calls.load(Ordering::SeqCst), 0, "nothing delivered to an unhealthy app");
    hooks.healthy.store(true, Ordering::SeqCst);
    eventually(WAIT, "delivery resumes once the app is healthy", || async { hooks.accepted().len() == 5 })
        .await;
    assert_eq!(hooks.calls.load(Ordering::SeqCst), 5, "no failed attempts");
    assert!(topic(&cp, "markets.dead-letter").await.is_empty());
    stop.cancel();
}
