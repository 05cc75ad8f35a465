//! Group commit under load: 64 traders at once on one hot market and on 32 markets, through two
//! instances on one database (as `meshctl up` runs them), SQLite and PostgreSQL; and a SIGKILL
//! of the real binary in the middle of it.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use mesh_testkit::{Process, WAIT, eventually};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::support::{Svc, check_log, databases};

const TRADERS: usize = 64;
const GRANT: i64 = 10_000;

/// Opens and funds `t0`…`t63` and `maker`, all at once; returns the money granted.
async fn traders(svc: &Svc) -> i64 {
    svc.account("maker", "100000").await;
    futures::future::join_all(
        (0..TRADERS).map(|t| async move { svc.account(&format!("t{t}"), &GRANT.to_string()).await }),
    )
    .await;
    100_000 + GRANT * TRADERS as i64
}

/// Every trader trades `each` times at once (trader t on market `(t + n) % markets`, through
/// `svcs[t % len]`), unpinned: the service decides in order whatever raced. Returns the ids of
/// the trades acknowledged; stops a trader at its first failure when `until_failure`, panics
/// on one otherwise.
async fn storm(
    svcs: &[&Svc],
    markets: &[String],
    each: usize,
    accepted: &Mutex<Vec<String>>,
    until_failure: bool,
) {
    futures::future::join_all((0..TRADERS).map(|t| async move {
        let svc = svcs[t % svcs.len()];
        for n in 0..each {
            let m = &markets[(t + n) % markets.len()];
            let (status, body) = svc
                .act(
                    &format!("t{t}"),
                    "POST",
                    &format!("/markets/{m}/trades"),
                    json!({"outcome": n % 2, "side": "buy", "shares": "0.5"}),
                )
                .await;
            match status {
                201 => accepted.lock().unwrap().push(body["trade_id"].as_str().unwrap().to_string()),
                _ if until_failure => return,
                other => panic!("trade refused: {other} {body}"),
            }
        }
    }))
    .await;
}

/// (batches, commands, the most decisions of one command) of the instance's committer.
async fn batches(svc: &Svc) -> (u64, u64, u64) {
    let (_, h) = svc.get("/healthz").await;
    let n = |k: &str| h["group_commit"][k].as_u64().unwrap();
    (n("batches"), n("commands"), n("most_decisions"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_traders_on_a_hot_market_and_on_many_lose_and_duplicate_nothing() {
    let dir = tempfile::tempdir().unwrap();
    for url in databases(&dir).await {
        let a = Svc::start(&url, 20).await;
        let b = Svc::start(&url, 20).await;
        let granted = traders(&a).await;
        let hot = vec![a.market("maker", 3_600_000).await];
        let mut many = Vec::new();
        for _ in 0..32 {
            many.push(a.market("maker", 3_600_000).await);
        }
        let accepted = Mutex::new(Vec::new());
        storm(&[&a, &b], &hot, 4, &accepted, false).await;
        storm(&[&a, &b], &many, 4, &accepted, false).await;
        let accepted = accepted.into_inner().unwrap();
        assert_eq!(accepted.len(), 2 * 4 * TRADERS);
        let all: Vec<String> = hot.iter().chain(&many).cloned().collect();
        check_log(&url, &b, &all, &accepted, granted, false).await;
        // The hot market's version is its creation plus every trade on it, decided in order.
        assert_eq!(a.get(&format!("/markets/{}", hot[0])).await.1["version"], 1 + 4 * TRADERS as u64);
        let ((ba, ca, da), (bb, cb, db)) = (batches(&a).await, batches(&b).await);
        assert!(ca + cb >= 2 * 4 * TRADERS as u64, "every trade went through a committer");
        assert!(
            ba + bb < ca + cb,
            "64 callers at once shared commits: {ba}+{bb} batches for {ca}+{cb} commands"
        );
        // A trade that lost a race to the other instance was decided again under the write lock.
        assert!(da.max(db) <= 2, "a trade was decided {} times", da.max(db));
        a.stop().await;
        b.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_mid_batch_loses_no_acknowledged_trade_and_half_applies_none() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("admin.token");
    std::fs::write(&token, "test-admin").unwrap();
    for url in databases(&dir).await {
        let start = || {
            let args: Vec<String> = ["--listen", "127.0.0.1:0", "--database-url", &url, "--log", "error"]
                .iter()
                .map(|s| s.to_string())
                .chain(["--admin-token-file".to_string(), token.display().to_string()])
                .collect();
            let p = Process::start("market-service", &args);
            let svc =
                Svc { addr: p.addr("http"), url: url.clone(), stop: CancellationToken::new(), task: None };
            (p, svc)
        };
        let (process, svc) = start();
        eventually(WAIT, "the service answers", || async { svc.get("/healthz").await.0 == 200 }).await;
        let granted = traders(&svc).await;
        let markets = vec![svc.market("maker", 3_600_000).await, svc.market("maker", 3_600_000).await];
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let killed = {
            let (accepted, svcs) = (accepted.clone(), [&svc]);
            let storm = storm(&svcs, &markets, 1_000, &accepted, true);
            let kill = async {
                eventually(WAIT, "300 trades acknowledged", || async {
                    accepted.lock().unwrap().len() >= 300
                })
                .await;
                process.kill9();
            };
            tokio::time::timeout(Duration::from_secs(120), futures::future::join(storm, kill)).await
        };
        assert!(killed.is_ok(), "the storm ended once the service died");
        let accepted = accepted.lock().unwrap().clone();
        // Started again on what the crash left: it serves, and the log holds every
        // acknowledged trade whole.
        let (_process, svc) = start();
        eventually(WAIT, "the service answers after the crash", || async {
            svc.get("/healthz").await.0 == 200
        })
        .await;
        let (_, h) = svc.get("/healthz").await;
        assert_eq!(h["unreadable_aggregates"], Value::Object(Default::default()), "{h}");
        check_log(&url, &svc, &markets, &accepted, granted, true).await;
    }
}
