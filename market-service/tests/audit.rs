//! Signed audit checkpoints: an untouched log verifies; an event changed with its chain
//! recomputed, or a market's last events deleted, is named by `market-service audit verify`
//! (the real binary) and by `GET /audit/verify` — reading the checkpoints back from the bus, so
//! deleting the database's own copy hides nothing.

use std::process::Command;

use mesh_testkit::{WAIT, eventually};
use serde_json::{Value, json};

use crate::support::{ADMIN, Svc, databases};

/// `GET /audit/verify` as the operator.
async fn verify_online(s: &Svc) -> Value {
    let (st, v) = s.call("GET", "/audit/verify", &[("authorization", ADMIN)], Value::Null).await;
    assert_eq!(st, 200, "{v}");
    v
}

/// `market-service audit verify` on `url` with the key file; (exit code, report).
fn verify_offline(url: &str, key: &std::path::Path, extra: &[&str]) -> (i32, Value) {
    let out = Command::new(mesh_testkit::bin("market-service"))
        .args(["audit", "verify", "--database-url", url, "--audit-key-file"])
        .arg(key)
        .args(extra)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let v = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("{e}: {text} {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code().unwrap_or(-1), v)
}

/// Trades one share at a time, waiting after each until a checkpoint signs the market at the
/// trade's version, so versions 2.. of the market are each signed.
async fn trade_and_checkpoint(s: &Svc, id: &str, n: usize) {
    let store = market_service::store::Store::connect(&s.url).await.unwrap();
    for _ in 0..n {
        let (st, t) = s.buy_one("alice", id).await;
        assert_eq!(st, 201, "{t}");
        let version = t["market_version"].as_u64().unwrap();
        eventually(WAIT, "a checkpoint signs the trade", || async {
            let signed = market_service::audit::parse(&store.checkpoints().await.unwrap()).unwrap();
            signed
                .iter()
                .any(|c| c.body.heads.get(&format!("market-{id}")).is_some_and(|h| h.version == version))
        })
        .await;
    }
    store.close().await;
}

/// Writes an event's content and chain fields over the stored row (what an insider with the
/// database can do).
async fn overwrite(store: &market_service::store::Store, e: &market_service::store::Recorded) {
    let sql = format!(
        "UPDATE events SET payload = '{}', prev_hash = '{}', hash = '{}' WHERE seq = {}",
        e.payload.replace('\'', "''"),
        e.prev_hash,
        e.hash,
        e.seq
    );
    store.execute_unchecked(sql).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewritten_or_cut_log_is_named_and_an_untouched_one_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("audit.key");
    for url in databases(&dir).await {
        let s = Svc::start_with(&url, |c| {
            c.audit_key_file = Some(key.clone());
            c.checkpoint_interval = std::time::Duration::from_millis(20);
        })
        .await;
        s.account("alice", "1000").await;
        let id = s.market("alice", 3_600_000).await;
        trade_and_checkpoint(&s, &id, 4).await;
        let aggregate = format!("market-{id}");

        // Negative control: untouched, it verifies — online and with the binary.
        let v = verify_online(&s).await;
        assert_eq!(v["report"]["valid"], true, "{v}");
        let (code, r) = verify_offline(&url, &key, &[]);
        assert_eq!((code, &r["report"]["valid"]), (0, &json!(true)), "{r}");

        // An admin's rebuild is recorded, with who did it.
        let (st, _) =
            s.call("POST", "/admin/projections/rebuild", &[("authorization", ADMIN)], Value::Null).await;
        assert_eq!(st, 200);
        let store = market_service::store::Store::connect(&url).await.unwrap();
        let ops = store.stream("operations-log").await.unwrap();
        assert!(
            ops.iter()
                .any(|e| e.event_type == "ProjectionsRebuilt" && e.payload.contains("\"by\":\"operator\""))
        );

        // An insider changes version 3 (a trade) and recomputes the chain from there: every
        // hash links, so the chain alone sees nothing…
        let original = store.stream(&aggregate).await.unwrap();
        let mut events = original.clone();
        events[2].payload = events[2].payload.replace("\"shares\":\"1.000000\"", "\"shares\":\"0.000001\"");
        let mut prev = events[1].hash.clone();
        for e in events.iter_mut().skip(2) {
            e.prev_hash = prev.clone();
            e.hash = market_service::store::chain_hash(&prev, e);
            prev = e.hash.clone();
            overwrite(&store, e).await;
        }
        assert!(market_service::store::verify_chain(&store.stream(&aggregate).await.unwrap()).is_ok());
        // …but the signed checkpoints do: the aggregate and the version.
        let (code, r) = verify_offline(&url, &key, &[]);
        let d = &r["report"]["first_divergence"];
        assert_eq!(
            (code, d["aggregate"].as_str(), d["version"].as_u64()),
            (1, Some(aggregate.as_str()), Some(3)),
            "{r}"
        );
        assert_eq!(verify_online(&s).await["report"]["first_divergence"], *d);

        // Put it back as it was (it verifies again), then cut the market's last two events.
        s.stop().await;
        for e in &original {
            overwrite(&store, e).await;
        }
        assert_eq!(verify_offline(&url, &key, &[]).0, 0);
        let cut = format!("DELETE FROM events WHERE aggregate_id = '{aggregate}' AND version > 3");
        store.execute_unchecked(cut).await.unwrap();
        let (code, r) = verify_offline(&url, &key, &[]);
        let d = &r["report"]["first_divergence"];
        assert_eq!(
            (code, d["aggregate"].as_str(), d["version"].as_u64()),
            (1, Some(aggregate.as_str()), Some(4)),
            "{r}"
        );
        assert!(d["reason"].as_str().unwrap().contains("deleted"), "{r}");
        // A key that did not sign them is not trusted.
        let other = dir.path().join("other.key");
        market_service::audit::Signer::load_or_create(&other).unwrap();
        let (code, r) = verify_offline(&url, &other, &[]);
        assert_eq!(code, 1, "{r}");
        assert!(r["report"]["first_divergence"]["reason"].as_str().unwrap().contains("not trusted"), "{r}");
        store.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_on_the_bus_catch_a_cut_the_database_copy_hides() {
    let (_cp, _sc, _sdir, admin) = crate::support::bus_and_sidecar().await;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("audit.key");
    let url = format!("sqlite://{}/market.db", dir.path().display());
    let s = Svc::start_with(&url, |c| {
        c.sidecar_admin = Some(admin.clone());
        c.audit_key_file = Some(key.clone());
        c.checkpoint_interval = std::time::Duration::from_millis(20);
    })
    .await;
    s.account("alice", "1000").await;
    let id = s.market("alice", 3_600_000).await;
    trade_and_checkpoint(&s, &id, 2).await;
    eventually(WAIT, "the checkpoints reach the bus and verify from there", || async {
        // Every event signed, by at least one checkpoint per trade (each trade waited for its
        // own); the opening events may share the first trade's checkpoint, as the clock falls.
        let v = verify_online(&s).await;
        let r = &v["report"];
        v["source"] == "bus"
            && r["valid"] == true
            && r["events_not_yet_checkpointed"] == 0
            && r["checkpoints"].as_u64() >= Some(2)
    })
    .await;
    s.stop().await;
    // The insider cuts the market's last trade and the checkpoints that signed it from the
    // database: its own copy now agrees with the cut log…
    let store = market_service::store::Store::connect(&url).await.unwrap();
    store
        .execute_unchecked(format!("DELETE FROM events WHERE aggregate_id = 'market-{id}' AND version = 3"))
        .await
        .unwrap();
    let signed_it = market_service::audit::parse(&store.checkpoints().await.unwrap())
        .unwrap()
        .into_iter()
        .find(|c| c.body.heads.get(&format!("market-{id}")).is_some_and(|h| h.version == 3))
        .expect("a checkpoint signed the trade")
        .body
        .number;
    store.execute_unchecked(format!("DELETE FROM checkpoints WHERE number >= {signed_it}")).await.unwrap();
    let (code, r) = verify_offline(&url, &key, &[]);
    assert_eq!((code, &r["source"]), (0, &json!("database")), "the database's copy is fooled: {r}");
    // …but not the bus.
    let (code, r) = verify_offline(&url, &key, &["--sidecar-admin", &admin]);
    let d = &r["report"]["first_divergence"];
    assert_eq!(
        (code, &r["source"], d["aggregate"].as_str()),
        (1, &json!("bus"), Some(format!("market-{id}").as_str())),
        "{r}"
    );
    assert!(d["reason"].as_str().unwrap().contains("deleted"), "{r}");
    store.close().await;
}
