//! What the integration tests share: the service on a loopback port (in process), the databases
//! to run against, and the checks every concurrency test ends with.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use bytes::Bytes;
use market_service::{Config, domain::Micro};
use mesh_testkit::{WAIT, eventually, request};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const ADMIN: &str = "Bearer test-admin";

pub struct Svc {
    pub addr: SocketAddr,
    pub url: String,
    pub stop: CancellationToken,
    pub task: Option<JoinHandle<Result<(), market_service::store::StoreError>>>,
}

impl Svc {
    pub async fn start(url: &str, snapshot_every: u64) -> Svc {
        Self::start_with(url, |c| c.snapshot_every = snapshot_every).await
    }

    pub async fn start_with(url: &str, tune: impl FnOnce(&mut Config)) -> Svc {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut c = Config::new(url);
        c.admin_token = Some("test-admin".into());
        c.close_interval = Duration::from_millis(50);
        tune(&mut c);
        let stop = CancellationToken::new();
        let task = tokio::spawn(market_service::run(c, listener, stop.clone()));
        let svc = Svc { addr, url: url.to_string(), stop, task: Some(task) };
        eventually(WAIT, "the service answers /healthz", || async { svc.get("/healthz").await.0 == 200 })
            .await;
        svc
    }

    pub async fn call(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Value,
    ) -> (u16, Value) {
        let raw = if body.is_null() { String::new() } else { body.to_string() };
        self.raw(method, path, headers, raw).await
    }

    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: String,
    ) -> (u16, Value) {
        let mut h = vec![("content-type", "application/json")];
        h.extend_from_slice(headers);
        let (status, text) = request(self.addr, method, "market-service", path, &h, Bytes::from(body)).await;
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// A call as the end user the gateway verified (what its sidecar hands the service).
    pub async fn act(&self, user: &str, method: &str, path: &str, body: Value) -> (u16, Value) {
        self.call(method, path, &[("x-mesh-user", user)], body).await
    }

    /// `user` buys one share of outcome 0 of market `id`.
    pub async fn buy_one(&self, user: &str, id: &str) -> (u16, Value) {
        let body = json!({"outcome": 0, "side": "buy", "shares": "1"});
        self.act(user, "POST", &format!("/markets/{id}/trades"), body).await
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.call("GET", path, &[], Value::Null).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call("POST", path, &[], body).await
    }

    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            tokio::time::timeout(WAIT, t).await.unwrap().unwrap().unwrap();
        }
    }

    pub async fn account(&self, id: &str, grant: &str) {
        assert_eq!(self.act(id, "POST", "/accounts", json!({"name": id})).await.0, 201);
        let (s, b) = self
            .call(
                "POST",
                &format!("/accounts/{id}/grants"),
                &[("authorization", ADMIN)],
                json!({"amount": grant}),
            )
            .await;
        assert_eq!(s, 200, "{b}");
    }

    pub async fn balance(&self, account: &str) -> i64 {
        let (_, a) =
            self.call("GET", &format!("/accounts/{account}"), &[("authorization", ADMIN)], Value::Null).await;
        Micro::parse(a["balance"].as_str().unwrap_or_else(|| panic!("{a}"))).unwrap().0
    }

    pub async fn market(&self, creator: &str, close_in_ms: u64) -> String {
        let close = market_service::service::now_ms() + close_in_ms;
        let (s, b) = self
            .act(creator, "POST", "/markets", json!({"question": "Will it rain?", "category": "weather", "outcomes": ["yes", "no"], "close_time_ms": close, "liquidity": "100"}))
            .await;
        assert_eq!(s, 201, "{b}");
        b["id"].as_str().unwrap().to_string()
    }
}

impl Drop for Svc {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The databases to run against: a fresh SQLite file, and a fresh PostgreSQL database when one
/// is configured.
pub async fn databases(dir: &tempfile::TempDir) -> Vec<String> {
    let mut urls = vec![format!("sqlite://{}/market.db", dir.path().display())];
    match std::env::var("MESH_TEST_POSTGRES_URL") {
        Ok(base) => urls.push(fresh_postgres(&base).await),
        Err(_) if std::env::var("MESH_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") => {
            panic!(
                "MESH_REQUIRE_POSTGRES=1 but MESH_TEST_POSTGRES_URL is not set (scripts/test-deps starts one)"
            )
        }
        Err(_) => {}
    }
    urls
}

pub async fn fresh_postgres(base: &str) -> String {
    sqlx::any::install_default_drivers();
    let name = format!("t_{}", uuid::Uuid::now_v7().simple());
    let pool = sqlx::AnyPool::connect(base).await.unwrap_or_else(|e| panic!("cannot reach {base}: {e}"));
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&pool).await.unwrap();
    pool.close().await;
    let (prefix, _) = base.rsplit_once('/').unwrap();
    format!("{prefix}/{name}")
}

/// What every concurrency test ends with, against the log itself: each market's versions are
/// contiguous and its chain verifies, snapshot plus tail equals a full replay, every accepted
/// trade is in the log once and nothing else is, every trade's market and account events are
/// both there (no command half applied), balances equal a sequential replay of the log, and the
/// money granted is all in accounts or market pools. After a `crashed` run, the log may also
/// hold trades whose answer the crash lost (committed, never acknowledged) — but every one it
/// holds is whole.
pub async fn check_log(
    url: &str,
    svc: &Svc,
    markets: &[String],
    accepted: &[String],
    granted: i64,
    crashed: bool,
) {
    let store = market_service::store::Store::connect(url).await.unwrap();
    let mut trade_ids = Vec::new();
    for m in markets {
        let events = store.stream(&market_service::service::market_id(m)).await.unwrap();
        let versions: Vec<u64> = events.iter().map(|e| e.version).collect();
        assert_eq!(versions, (1..=events.len() as u64).collect::<Vec<_>>(), "versions contiguous");
        trade_ids
            .extend(events.iter().filter(|e| e.event_type == "TradeExecuted").map(|e| e.event_id.clone()));
        assert!(market_service::store::verify_chain(&events).is_ok());
        // Snapshot + tail (every 5 events) equals the full replay.
        let decoded: Vec<market_service::domain::MarketEvent> =
            events.iter().map(|e| serde_json::from_str(&e.payload).unwrap()).collect();
        let full = market_service::domain::Market::replay(None, m, &decoded);
        let (markets_svc, _) = market_service::service::Markets::new(store.clone(), 5, Default::default());
        assert_eq!(markets_svc.load_market(m).await.unwrap(), full);
    }
    let mut sorted = trade_ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), trade_ids.len(), "no trade recorded twice");
    let mut accepted_sorted = accepted.to_vec();
    accepted_sorted.sort();
    if crashed {
        let logged: std::collections::BTreeSet<&String> = sorted.iter().collect();
        let lost: Vec<&String> = accepted_sorted.iter().filter(|t| !logged.contains(t)).collect();
        assert!(lost.is_empty(), "acknowledged trades missing from the log: {lost:?}");
    } else {
        assert_eq!(sorted, accepted_sorted, "every accepted trade is in the log, and nothing else");
    }

    // Balances equal a sequential replay of the log, and money is conserved.
    let mut balances: BTreeMap<String, i64> = BTreeMap::new();
    let mut pools = 0i64;
    for e in store.after(0, 100_000).await.unwrap() {
        let v: Value = serde_json::from_str(&e.payload).unwrap();
        let amount = |k: &str| Micro::parse(v[k].as_str().unwrap()).unwrap().0;
        match e.event_type.as_str() {
            "FundsGranted" | "FundsCredited" => {
                *balances.entry(e.aggregate_id.clone()).or_default() += amount("amount")
            }
            "FundsDebited" => *balances.entry(e.aggregate_id.clone()).or_default() -= amount("amount"),
            "MarketCreated" => pools += amount("subsidy"),
            "TradeExecuted" => pools += amount("cost"),
            _ => {}
        }
    }
    for (acc, bal) in &balances {
        let id = acc.strip_prefix("account-").unwrap();
        assert_eq!(svc.balance(id).await, *bal, "{id}");
    }
    assert_eq!(balances.values().sum::<i64>() + pools, Micro::units(granted).0, "money conserved");
    let debited: std::collections::BTreeSet<String> = store
        .after(0, 1_000_000)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.event_type == "FundsDebited" && !e.causation_id.is_empty())
        .map(|e| e.causation_id)
        .collect();
    for t in &sorted {
        assert!(debited.contains(t), "trade {t} has its market event but no debit");
    }
    store.close().await;
}

/// A control plane and the market service's sidecar (only its event API matters: its app
/// address is never used), with the sidecar's admin URL; both stop when dropped.
pub async fn bus_and_sidecar() -> (mesh_testkit::TestCp, mesh_testkit::TestSidecar, tempfile::TempDir, String)
{
    let cp = mesh_testkit::TestCp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let sc = mesh_testkit::TestSidecar::start(mesh_testkit::TestSidecar::config(
        &cp.url(),
        "market-service",
        "ms-1",
        "127.0.0.1:9".parse().unwrap(),
        dir.path(),
    ))
    .await;
    let admin = format!("http://{}", sc.admin);
    (cp, sc, dir, admin)
}
