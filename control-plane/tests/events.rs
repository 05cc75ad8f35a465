//! The event bus contract over real gRPC, run against both logs: the embedded one and NATS
//! JetStream (a real `nats-server -js` named by `MESH_TEST_NATS_URL`; scripts/test-deps starts
//! one). Without that variable the NATS half reports itself skipped — unless
//! `MESH_REQUIRE_NATS=1` (CI), where it fails.

use std::time::Duration;

use control_plane::BusBackend;
use futures::StreamExt;
use mesh_proto::v1::{self, events_client::EventsClient, subscribe_request::Kind};
use mesh_testkit::TestCp;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// The contract, once per log.
macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(#[tokio::test]
            async fn $name() {
                super::$name(control_plane::BusBackend::Embedded).await
            })*
        }
        mod nats {
            $(#[tokio::test]
            async fn $name() {
                if let Some(url) = mesh_testkit::test_nats_url() {
                    super::$name(control_plane::BusBackend::Nats(url)).await
                }
            })*
        }
    };
}

contract!(
    publish_dedups_and_a_group_resumes_from_its_committed_offset,
    published_events_survive_a_restart,
    one_subscriber_of_a_group_receives_at_a_time,
    from_end_delivers_only_new_events,
    retention_drops_the_oldest_events_and_offsets_keep_growing,
    a_group_draining_a_backlog_while_committing_gets_each_event_once,
);

/// A topic no other test (or earlier run against the same NATS server) uses.
fn fresh_topic() -> String {
    format!("markets.{}", uuid::Uuid::now_v7().simple())
}

async fn start(bus: &BusBackend, tune: impl FnOnce(&mut control_plane::Config)) -> TestCp {
    let bus = bus.clone();
    TestCp::start_with(move |c| {
        c.bus = bus;
        // JetStream reserves each stream's byte limit up front: keep the test streams small.
        c.retention.max_bytes = 16 << 20;
        tune(c);
    })
    .await
}

fn ev(topic: &str, id: &str, time: u64) -> v1::Event {
    v1::Event {
        id: id.into(),
        topic: topic.into(),
        key: "m1".into(),
        time_unix_ms: time,
        data: id.as_bytes().to_vec(),
        ..Default::default()
    }
}

async fn subscribe(
    cp: &TestCp,
    start: v1::SubscribeStart,
) -> (mpsc::Sender<v1::SubscribeRequest>, tonic::Streaming<v1::Delivery>) {
    let (tx, rx) = mpsc::channel(8);
    tx.send(v1::SubscribeRequest { kind: Some(Kind::Start(start)) }).await.unwrap();
    let s =
        EventsClient::new(cp.channel().await).subscribe(ReceiverStream::new(rx)).await.unwrap().into_inner();
    (tx, s)
}

fn group_start(topic: &str, group: &str) -> v1::SubscribeStart {
    v1::SubscribeStart { topic: topic.into(), group: group.into(), ..Default::default() }
}

/// Ends a subscription the way a client that is done does: closes its side and waits for the
/// server to end the stream, which it does after handling every commit sent before.
async fn leave(tx: mpsc::Sender<v1::SubscribeRequest>, mut s: tonic::Streaming<v1::Delivery>) {
    drop(tx);
    while let Some(Ok(_)) = tokio::time::timeout(Duration::from_secs(10), s.next()).await.expect("the end") {}
}

async fn next_id(s: &mut tonic::Streaming<v1::Delivery>) -> (String, u64) {
    let d =
        tokio::time::timeout(Duration::from_secs(10), s.next()).await.expect("a delivery").unwrap().unwrap();
    (d.event.unwrap().id, d.offset)
}

async fn publish_dedups_and_a_group_resumes_from_its_committed_offset(backend: BusBackend) {
    let cp = start(&backend, |_| {}).await;
    let t = fresh_topic();
    let mut bus = EventsClient::new(cp.channel().await);
    let r = bus
        .publish(v1::PublishRequest { events: vec![ev(&t, "a", 10), ev(&t, "b", 20), ev(&t, "a", 10)] })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.results.iter().map(|r| (r.offset, r.duplicate)).collect::<Vec<_>>(),
        [(0, false), (1, false), (0, true)]
    );

    let (tx, mut s) = subscribe(&cp, group_start(&t, "g1")).await;
    assert_eq!(next_id(&mut s).await, ("a".into(), 0));
    assert_eq!(next_id(&mut s).await, ("b".into(), 1));
    // Live: a new event reaches the open subscription.
    bus.publish(v1::PublishRequest { events: vec![ev(&t, "c", 30)] }).await.unwrap();
    assert_eq!(next_id(&mut s).await, ("c".into(), 2));
    // Commit past "b" only, then reconnect: "c" comes again (at-least-once), "a" and "b" do not.
    tx.send(v1::SubscribeRequest { kind: Some(Kind::Commit(v1::SubscribeCommit { offset: 2 })) })
        .await
        .unwrap();
    leave(tx, s).await;
    let (_tx2, mut again) = subscribe(&cp, group_start(&t, "g1")).await;
    assert_eq!(next_id(&mut again).await.0, "c");

    let replay = |from_offset: Option<u64>, from_time: Option<u64>| {
        let (mut bus, topic) = (bus.clone(), t.clone());
        async move {
            let req = v1::ReplayRequest { topic, from_offset, from_time_unix_ms: from_time, limit: 0 };
            let s = bus.replay(req).await.unwrap().into_inner();
            s.map(|d| d.unwrap().event.unwrap().id).collect::<Vec<_>>().await
        }
    };
    assert_eq!(replay(Some(1), None).await, ["b", "c"]);
    assert_eq!(replay(None, Some(25)).await, ["c"]);
    let e = bus
        .publish(v1::PublishRequest {
            events: vec![v1::Event { topic: "Bad".into(), id: "x".into(), ..Default::default() }],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
}

async fn published_events_survive_a_restart(backend: BusBackend) {
    let cp = start(&backend, |_| {}).await;
    let t = fresh_topic();
    let mut bus = EventsClient::new(cp.channel().await);
    bus.publish(v1::PublishRequest { events: vec![ev(&t, "a", 1), ev(&t, "b", 2)] }).await.unwrap();
    let dir = cp.stop().await;
    let cp = TestCp::start_in(dir, |c| c.bus = backend).await;
    let mut bus = EventsClient::new(cp.channel().await);
    let r = bus
        .publish(v1::PublishRequest { events: vec![ev(&t, "b", 2), ev(&t, "c", 3)] })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.results.iter().map(|r| (r.offset, r.duplicate)).collect::<Vec<_>>(),
        [(1, true), (2, false)]
    );
}

async fn one_subscriber_of_a_group_receives_at_a_time(backend: BusBackend) {
    let cp = start(&backend, |_| {}).await;
    let t = fresh_topic();
    let mut bus = EventsClient::new(cp.channel().await);
    bus.publish(v1::PublishRequest { events: vec![ev(&t, "a", 1)] }).await.unwrap();
    let (tx1, mut first) = subscribe(&cp, group_start(&t, "workers")).await;
    assert_eq!(next_id(&mut first).await.0, "a");
    tx1.send(v1::SubscribeRequest { kind: Some(Kind::Commit(v1::SubscribeCommit { offset: 1 })) })
        .await
        .unwrap();
    // The second subscriber's call returns only once it holds the group (a spawned task here).
    let (tx2, rx2) = mpsc::channel(8);
    tx2.send(v1::SubscribeRequest { kind: Some(Kind::Start(group_start(&t, "workers"))) }).await.unwrap();
    let mut standby = {
        let mut client = EventsClient::new(cp.channel().await);
        tokio::spawn(async move { client.subscribe(ReceiverStream::new(rx2)).await.unwrap().into_inner() })
    };
    bus.publish(v1::PublishRequest { events: vec![ev(&t, "b", 2)] }).await.unwrap();
    assert_eq!(next_id(&mut first).await.0, "b", "the group's reader gets the new event");
    // Negative control: the standby is not admitted while the first is there.
    let waiting = tokio::time::timeout(Duration::from_millis(300), &mut standby).await;
    assert!(waiting.is_err(), "a second subscriber of the group must wait");
    // Nothing past "a" was committed: once the first leaves, the standby takes over from "b".
    leave(tx1, first).await;
    let mut second = tokio::time::timeout(Duration::from_secs(10), standby).await.expect("admitted").unwrap();
    assert_eq!(next_id(&mut second).await, ("b".into(), 1));
    drop(tx2);
    // Another group is independent.
    let (_tx3, mut other) = subscribe(&cp, group_start(&t, "auditors")).await;
    assert_eq!(next_id(&mut other).await.0, "a");
}

async fn from_end_delivers_only_new_events(backend: BusBackend) {
    let cp = start(&backend, |_| {}).await;
    let t = fresh_topic();
    let mut bus = EventsClient::new(cp.channel().await);
    bus.publish(v1::PublishRequest { events: vec![ev(&t, "old", 1)] }).await.unwrap();
    let start = v1::SubscribeStart { topic: t.clone(), from_end: true, ..Default::default() };
    let (_tx, mut s) = subscribe(&cp, start).await;
    // The start is applied when the server reads it; publish until a new event arrives.
    let mut n = 0;
    let got = loop {
        n += 1;
        bus.publish(v1::PublishRequest { events: vec![ev(&t, &format!("new{n}"), 2)] }).await.unwrap();
        if let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(200), s.next()).await {
            break d.unwrap().event.unwrap().id;
        }
        assert!(n < 50, "no delivery from the end");
    };
    assert!(got.starts_with("new"), "from_end must skip the old event, got {got}");
}

async fn retention_drops_the_oldest_events_and_offsets_keep_growing(backend: BusBackend) {
    let cp = start(&backend, |c| {
        c.retention =
            control_plane::bus::retention::Retention { max_age: Duration::ZERO, max_bytes: 8 * 1024 };
        c.bus_maintenance_interval = Duration::from_millis(50);
    })
    .await;
    let t = fresh_topic();
    let mut bus = EventsClient::new(cp.channel().await);
    for i in 0..20 {
        let mut e = ev(&t, &format!("e{i}"), 1);
        e.data = vec![b'x'; 1024];
        bus.publish(v1::PublishRequest { events: vec![e] }).await.unwrap();
    }
    let retained = || {
        let (mut bus, topic) = (bus.clone(), t.clone());
        async move {
            let req = v1::ReplayRequest { topic, from_offset: Some(0), from_time_unix_ms: None, limit: 0 };
            let s = bus.replay(req).await.unwrap().into_inner();
            s.map(|d| d.unwrap().offset).collect::<Vec<_>>().await
        }
    };
    mesh_testkit::eventually(Duration::from_secs(10), "the oldest events are dropped", || async {
        let offsets = retained().await;
        !offsets.is_empty() && offsets.len() < 12 && offsets[0] > 0
    })
    .await;
    let offsets = retained().await;
    assert_eq!(*offsets.last().unwrap(), 19, "the newest events stay");
    assert!(offsets.windows(2).all(|w| w[1] == w[0] + 1), "what stays is contiguous: {offsets:?}");
    let r = bus.publish(v1::PublishRequest { events: vec![ev(&t, "e20", 1)] }).await.unwrap().into_inner();
    assert_eq!(r.results[0].offset, 20, "offsets never go back");
}

async fn a_group_draining_a_backlog_while_committing_gets_each_event_once(backend: BusBackend) {
    let cp = start(&backend, |_| {}).await;
    let t = fresh_topic();
    let mut bus = EventsClient::new(cp.channel().await);
    let total = 8_000u64;
    for chunk in (0..total).collect::<Vec<_>>().chunks(500) {
        let events = chunk.iter().map(|i| ev(&t, &format!("e{i}"), 1)).collect();
        bus.publish(v1::PublishRequest { events }).await.unwrap();
    }
    // A subscriber that commits every event as it goes, through a small request buffer: the
    // bus must keep reading commits while it streams the backlog.
    let (tx, mut s) = subscribe(&cp, group_start(&t, "drain")).await;
    let mut offsets = Vec::new();
    while (offsets.len() as u64) < total {
        let d = tokio::time::timeout(Duration::from_secs(20), s.next())
            .await
            .expect("the backlog flows")
            .unwrap()
            .unwrap();
        offsets.push(d.offset);
        tx.send(v1::SubscribeRequest {
            kind: Some(Kind::Commit(v1::SubscribeCommit { offset: d.offset + 1 })),
        })
        .await
        .unwrap();
    }
    assert_eq!(offsets, (0..total).collect::<Vec<_>>(), "each event once, in order");
    leave(tx, s).await;
    let (_tx, mut again) = subscribe(&cp, group_start(&t, "drain")).await;
    bus.publish(v1::PublishRequest { events: vec![ev(&t, "last", 1)] }).await.unwrap();
    assert_eq!(next_id(&mut again).await, ("last".into(), total), "resumes after the last commit");
}

/// Two control planes on one NATS server: an event published through one reaches a
/// subscriber of the other (its heads are refreshed from the streams).
#[tokio::test]
async fn nats_control_planes_share_the_bus() {
    let Some(url) = mesh_testkit::test_nats_url() else { return };
    let backend = BusBackend::Nats(url);
    let fast = |c: &mut control_plane::Config| c.bus_maintenance_interval = Duration::from_millis(50);
    let (a, b) = (start(&backend, fast).await, start(&backend, fast).await);
    let t = fresh_topic();
    let mut bus_a = EventsClient::new(a.channel().await);
    bus_a.publish(v1::PublishRequest { events: vec![ev(&t, "first", 1)] }).await.unwrap();
    let (_tx, mut s) = subscribe(&b, group_start(&t, "g")).await;
    assert_eq!(next_id(&mut s).await, ("first".into(), 0));
    bus_a.publish(v1::PublishRequest { events: vec![ev(&t, "second", 2)] }).await.unwrap();
    assert_eq!(
        next_id(&mut s).await,
        ("second".into(), 1),
        "a live event published through the other control plane"
    );
}

/// Issue #15.10: a replay returns everything asked for, however much (it used to stop silently
/// at 10,000), read from the bus a page at a time.
#[tokio::test]
async fn a_replay_returns_every_event_asked_for_past_ten_thousand() {
    let cp = TestCp::start().await;
    let t = fresh_topic();
    let mut bus = EventsClient::new(cp.channel().await);
    const N: u64 = 10_050;
    for chunk in (0..N).collect::<Vec<_>>().chunks(1000) {
        let events = chunk.iter().map(|i| ev(&t, &format!("e{i}"), *i)).collect();
        bus.publish(v1::PublishRequest { events }).await.unwrap();
    }
    let count = |limit: u32, from_offset: Option<u64>| {
        let (mut bus, topic) = (bus.clone(), t.clone());
        async move {
            let req = v1::ReplayRequest { topic, from_offset, from_time_unix_ms: None, limit };
            let s = bus.replay(req).await.unwrap().into_inner();
            let offsets: Vec<u64> = s.map(|d| d.unwrap().offset).collect().await;
            assert!(offsets.windows(2).all(|w| w[1] == w[0] + 1), "in order, no gap");
            offsets.len() as u64
        }
    };
    assert_eq!(count(1_000_000, None).await, N);
    assert_eq!(count(10_020, None).await, 10_020);
    assert_eq!(count(1_000_000, Some(10_000)).await, 50);
}
