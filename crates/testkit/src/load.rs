//! Steady load through a proxy, counting answers by status and backend.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{
    client::HttpClient,
    eventually::{WAIT, eventually},
};

/// Steady closed-loop load: `tasks` keep-alive clients each sending `GET path` with
/// `Host: host` back to back until stopped, counting successes and recording failures.
pub struct Load {
    ok: Arc<AtomicU64>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    pub fn start(addr: SocketAddr, host: &str, path: &str, tasks: usize) -> Self {
        let (ok, failures, stop) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(std::sync::Mutex::new(Vec::new())),
            CancellationToken::new(),
        );
        let tasks = (0..tasks)
            .map(|_| {
                let (ok, failures, stop, host, path) =
                    (ok.clone(), failures.clone(), stop.clone(), host.to_string(), path.to_string());
                tokio::spawn(async move {
                    let client = HttpClient::default();
                    while !stop.is_cancelled() {
                        let (status, body) = client.get(addr, &host, &path).await;
                        if status == 200 {
                            ok.fetch_add(1, Ordering::Relaxed);
                        } else {
                            failures
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push(format!("{status}: {body}"));
                        }
                    }
                })
            })
            .collect();
        Self { ok, failures, stop, tasks }
    }

    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Waits until `n` more requests than now have succeeded.
    pub async fn wait_more(&self, n: u64, what: &str) {
        let target = self.ok() + n;
        eventually(WAIT, what, || async { self.ok() >= target }).await;
    }

    /// Stops the clients and fails the test if any request failed; returns the successes.
    pub async fn stop_expecting_no_failures(self) -> u64 {
        let (ok, failures) = self.stop().await;
        assert!(
            failures.is_empty(),
            "{} of {} requests failed, e.g. {:?}",
            failures.len(),
            ok + failures.len() as u64,
            &failures[..failures.len().min(5)]
        );
        ok
    }

    /// Stops the clients; returns (successes, failures).
    pub async fn stop(mut self) -> (u64, Vec<String>) {
        self.stop.cancel();
        for t in std::mem::take(&mut self.tasks) {
            let _ = t.await;
        }
        let failures = std::mem::take(&mut *self.failures.lock().unwrap_or_else(|p| p.into_inner()));
        (self.ok(), failures)
    }
}
