//! Event forwarding: app → sidecar spool (fsync, 202) → control-plane bus, surviving a dead bus
//! and a killed sidecar.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use mesh_proto::v1;
use mesh_testkit::{Backend, Process, TestSidecar, WAIT, eventually, request};
use serde_json::json;

/// Every event of `topic` in the bus: (id, key) in offset order.
async fn log(grpc: std::net::SocketAddr, topic: &str) -> Vec<(String, String)> {
    let Ok(ch) = tonic::transport::Endpoint::from_shared(format!("http://{grpc}")).unwrap().connect().await
    else {
        return vec![];
    };
    let req = v1::ReplayRequest {
        topic: topic.into(),
        from_offset: Some(0),
        from_time_unix_ms: None,
        limit: 10_000,
    };
    match v1::events_client::EventsClient::new(ch).replay(req).await {
        Ok(s) => {
            s.into_inner().filter_map(|d| async { d.ok()?.event }).map(|e| (e.id, e.key)).collect().await
        }
        Err(_) => vec![],
    }
}

async fn publish(admin: std::net::SocketAddr, events: serde_json::Value) -> (u16, String) {
    request(
        admin,
        "POST",
        "admin",
        "/events",
        &[("content-type", "application/json")],
        Bytes::from(events.to_string()),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_survive_a_dead_bus_in_order_per_key_without_duplicates() {
    let cp_dir = tempfile::tempdir().unwrap();
    let cp = Process::start("control-plane", &mesh_testkit::control_plane_args(cp_dir.path(), "127.0.0.1:0"));
    let grpc = cp.addr("grpc");
    let app = Backend::start("market").await;
    let dir = tempfile::tempdir().unwrap();
    let sc = TestSidecar::start(TestSidecar::config(
        &format!("http://{grpc}"),
        "market",
        "m1",
        app.addr,
        dir.path(),
    ))
    .await;

    let (status, body) = publish(
        sc.admin,
        json!({"specversion": "1.0", "topic": "markets", "id": "e-0", "subject": "k0", "type": "MarketCreated", "data": {"n": 0}}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    eventually(WAIT, "the first event reaches the bus", || async { log(grpc, "markets").await.len() == 1 })
        .await;

    // The bus dies; the app keeps publishing (batches of 5 over 5 keys) and every publish is accepted.
    cp.kill9();
    for b in 0..20 {
        let batch: Vec<_> = (0..5).map(|i| json!({"specversion": "1.0", "type": "MarketTraded", "topic": "markets", "id": format!("e-{}", 1 + b * 5 + i), "subject": format!("k{i}"), "data": {"n": b}})).collect();
        let (status, body) = publish(sc.admin, json!(batch)).await;
        assert_eq!(status, 202, "{body}");
    }
    // Negative control: an app publishing straight to the bus (no spool) has nowhere to put
    // the same events while it is down.
    let direct = async {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
            .unwrap()
            .connect()
            .await
            .ok()?;
        let e = v1::Event { id: "direct-1".into(), topic: "markets".into(), ..Default::default() };
        v1::events_client::EventsClient::new(ch).publish(v1::PublishRequest { events: vec![e] }).await.ok()
    };
    assert!(direct.await.is_none(), "without the spool the event is refused while the bus is down");
    // A retried publish of ids already sent is accepted and later dropped by the bus as a duplicate.
    publish(sc.admin, json!({"specversion": "1.0", "type": "MarketTraded", "topic": "markets", "id": "e-7", "subject": "k1"})).await;
    let (_, metrics) = mesh_testkit::get(sc.admin, "admin", "/metrics").await;
    assert!(metrics.contains("mesh_sidecar_spool_pending 101"), "{metrics}");

    let _cp =
        Process::start("control-plane", &mesh_testkit::control_plane_args(cp_dir.path(), &grpc.to_string()));
    eventually(WAIT, "the spool drains into the bus", || async { log(grpc, "markets").await.len() == 101 })
        .await;
    let events = log(grpc, "markets").await;
    let mut ids: Vec<&str> = events.iter().map(|(id, _)| id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 101, "0 lost, 0 duplicated");
    for k in 0..5 {
        let key = format!("k{k}");
        let seq: Vec<u64> =
            events.iter().filter(|(_, kk)| *kk == key).map(|(id, _)| id[2..].parse().unwrap()).collect();
        assert!(seq.windows(2).all(|w| w[0] < w[1]), "order per key {key}: {seq:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_sidecar_delivers_its_spool_after_restart() {
    let cp_dir = tempfile::tempdir().unwrap();
    let cp = Process::start("control-plane", &mesh_testkit::control_plane_args(cp_dir.path(), "127.0.0.1:0"));
    let grpc = cp.addr("grpc");
    cp.kill9(); // the bus is down while the events are published
    let app = Backend::start("market").await;
    let dir = tempfile::tempdir().unwrap();
    let args = mesh_testkit::sidecar_args("market", "m1", app.addr, &format!("http://{grpc}"), dir.path());
    let sc = Process::start("sidecar", &args);
    let admin = sc.addr("admin");
    for i in 0..10 {
        let (status, _) =
            publish(admin, json!({"specversion": "1.0", "type": "Audited", "topic": "audit", "id": format!("a-{i}"), "subject": "x"})).await;
        assert_eq!(status, 202);
    }
    sc.kill9();
    let _cp =
        Process::start("control-plane", &mesh_testkit::control_plane_args(cp_dir.path(), &grpc.to_string()));
    let _sc = Process::start("sidecar", &args);
    eventually(Duration::from_secs(20), "the restarted sidecar forwards its spool", || async {
        log(grpc, "audit").await.len() == 10
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_events_are_refused_with_the_reason() {
    let cp = mesh_testkit::TestCp::start().await;
    let app = Backend::start("market").await;
    let dir = tempfile::tempdir().unwrap();
    let sc = TestSidecar::start(TestSidecar::config(&cp.url(), "market", "m1", app.addr, dir.path())).await;
    let ok = |extra: serde_json::Value| {
        let mut e = json!({"specversion": "1.0", "id": "x", "type": "T", "topic": "t"});
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                e.as_object_mut().unwrap().remove(k);
            } else {
                e[k] = v.clone();
            }
        }
        e
    };
    for (body, want) in [
        (ok(json!({"topic": null})), "topic is required"),
        (ok(json!({"topic": "Bad Topic"})), "topic"),
        (ok(json!({"time": "yesterday"})), "RFC 3339"),
        (ok(json!({"specversion": "0.3"})), "specversion"),
        (ok(json!({"specversion": null})), "specversion is required"),
        (ok(json!({"type": null})), "type is required"),
        (ok(json!({"id": null})), "id is required"),
        (ok(json!({"Unknown": 1})), "not a CloudEvents attribute name"),
        (ok(json!({"data": 1, "data_base64": "AA=="})), "data or data_base64"),
        (json!([]), "1..=1000"),
    ] {
        let (status, resp) = publish(sc.admin, body.clone()).await;
        assert_eq!(status, 400, "{body}: {resp}");
        assert!(resp.contains(want), "{body}: {resp}");
    }
}
