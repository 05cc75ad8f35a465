//! The embedded event bus over real gRPC.

mod support;

use std::time::Duration;

use futures::StreamExt;
use mesh_proto::v1::{self, events_client::EventsClient, subscribe_request::Kind};
use support::TestCp;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

fn ev(id: &str, time: u64) -> v1::Event {
    v1::Event {
        id: id.into(),
        topic: "markets".into(),
        key: "m1".into(),
        time_unix_ms: time,
        data: id.as_bytes().to_vec(),
        ..Default::default()
    }
}

async fn subscribe(
    cp: &TestCp,
    group: &str,
) -> (mpsc::Sender<v1::SubscribeRequest>, tonic::Streaming<v1::Delivery>) {
    let (tx, rx) = mpsc::channel(8);
    let start = v1::SubscribeStart {
        topic: "markets".into(),
        group: group.into(),
        from_offset: None,
        from_time_unix_ms: None,
    };
    tx.send(v1::SubscribeRequest { kind: Some(Kind::Start(start)) }).await.unwrap();
    let s =
        EventsClient::new(cp.channel().await).subscribe(ReceiverStream::new(rx)).await.unwrap().into_inner();
    (tx, s)
}

async fn next_id(s: &mut tonic::Streaming<v1::Delivery>) -> (String, u64) {
    let d =
        tokio::time::timeout(Duration::from_secs(10), s.next()).await.expect("a delivery").unwrap().unwrap();
    (d.event.unwrap().id, d.offset)
}

#[tokio::test]
async fn publish_dedups_and_a_group_resumes_from_its_committed_offset() {
    let cp = TestCp::start().await;
    let mut bus = EventsClient::new(cp.channel().await);
    let r = bus
        .publish(v1::PublishRequest { events: vec![ev("a", 10), ev("b", 20), ev("a", 10)] })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.results.iter().map(|r| (r.offset, r.duplicate)).collect::<Vec<_>>(),
        [(0, false), (1, false), (0, true)]
    );

    let (tx, mut s) = subscribe(&cp, "g1").await;
    assert_eq!(next_id(&mut s).await, ("a".into(), 0));
    assert_eq!(next_id(&mut s).await, ("b".into(), 1));
    // Live: a new event reaches the open subscription.
    bus.publish(v1::PublishRequest { events: vec![ev("c", 30)] }).await.unwrap();
    assert_eq!(next_id(&mut s).await, ("c".into(), 2));
    // Commit past "b" only, then reconnect: "c" comes again (at-least-once), "a" and "b" do not.
    tx.send(v1::SubscribeRequest { kind: Some(Kind::Commit(v1::SubscribeCommit { offset: 2 })) })
        .await
        .unwrap();
    support::eventually(Duration::from_secs(10), "the commit is stored", || async {
        let (_tx2, mut again) = subscribe(&cp, "g1").await;
        next_id(&mut again).await.0 == "c"
    })
    .await;

    let replay = |from_offset: Option<u64>, from_time: Option<u64>| {
        let mut bus = bus.clone();
        async move {
            let req = v1::ReplayRequest {
                topic: "markets".into(),
                from_offset,
                from_time_unix_ms: from_time,
                limit: 0,
            };
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

#[tokio::test]
async fn published_events_survive_a_restart() {
    let cp = TestCp::start().await;
    let mut bus = EventsClient::new(cp.channel().await);
    bus.publish(v1::PublishRequest { events: vec![ev("a", 1), ev("b", 2)] }).await.unwrap();
    let dir = cp.stop().await;
    let cp = TestCp::start_in(dir, |_| {}).await;
    let mut bus = EventsClient::new(cp.channel().await);
    let r =
        bus.publish(v1::PublishRequest { events: vec![ev("b", 2), ev("c", 3)] }).await.unwrap().into_inner();
    assert_eq!(
        r.results.iter().map(|r| (r.offset, r.duplicate)).collect::<Vec<_>>(),
        [(1, true), (2, false)]
    );
}
