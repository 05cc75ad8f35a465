//! The fail-static snapshot: the last applied endpoints and policies, in
//! `<data-dir>/snapshot.json`, so a sidecar restarted while the control plane is down serves
//! what it last knew.
//!
//! Writes are atomic (temporary file, fsync, rename, fsync of the directory). A writer task
//! coalesces requests: whoever asks for a save waits until a snapshot taken after its request
//! is on disk and learns whether it got there, so a policy is ACKed only once it is durable
//! here (and NACKed when the write failed, after [`WRITE_ATTEMPTS`] tries).

use crate::upstream::endpoint::EndpointInfo;

use mesh_proto::policy::ServicePolicy;
use serde::{Deserialize, Serialize};
use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

pub const FILE: &str = "snapshot.json";

/// Tries of one snapshot write before its waiters are told it failed.
pub const WRITE_ATTEMPTS: u32 = 3;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyRecord {
    pub version: u64,
    pub policy: ServicePolicy,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpstreamRecord {
    pub endpoints_version: u64,
    pub endpoints: Vec<EndpointInfo>,
    pub policy: Option<PolicyRecord>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub own_policy: Option<PolicyRecord>,
    pub upstreams: BTreeMap<String, UpstreamRecord>,
}

/// Reads the snapshot; `Ok(None)` when there is none. A damaged file is an error naming it.
pub fn load(dir: &Path) -> Result<Option<Snapshot>, String> {
    let path = dir.join(FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            format!("snapshot {} is damaged ({e}); move it away to start without it", path.display())
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read snapshot {}: {e}", path.display())),
    }
}

/// Writes atomically: readers see the old or the new snapshot, never a torn one.
pub fn write(dir: &Path, snap: &Snapshot) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(snap).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(FILE))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Coalescing snapshot writer.
pub struct SnapshotWriter {
    dir: PathBuf,
    requested: AtomicU64,
    notify: Notify,
    /// The newest generation written, and how the write went (an error names the path and cause).
    saved: watch::Sender<(u64, Result<(), Arc<str>>)>,
}

impl SnapshotWriter {
    pub fn new(dir: PathBuf) -> Arc<Self> {
        Arc::new(Self {
            dir,
            requested: AtomicU64::new(0),
            notify: Notify::new(),
            saved: watch::channel((0, Ok(()))).0,
        })
    }

    /// Asks for a save and waits until a snapshot taken after this call was written: `Ok` once
    /// it is durable, the reason when the write failed (or the writer has stopped).
    pub async fn save(&self) -> Result<(), Arc<str>> {
        let generation = self.requested.fetch_add(1, Ordering::SeqCst) + 1;
        self.notify.notify_one();
        let mut rx = self.saved.subscribe();
        match rx.wait_for(|(g, _)| *g >= generation).await {
            Ok(done) => done.1.clone(),
            Err(_) => Err(Arc::from("the snapshot writer has stopped")),
        }
    }

    /// The writer task: takes a snapshot with `take` whenever asked, until `stop`.
    pub async fn run(self: Arc<Self>, take: impl Fn() -> Snapshot + Send + 'static, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.notify.notified() => {}
            }
            let generation = self.requested.load(Ordering::SeqCst);
            let snap = Arc::new(take());
            let mut result = Ok(());
            for attempt in 1..=WRITE_ATTEMPTS {
                let (dir, snap) = (self.dir.clone(), snap.clone());
                result = match tokio::task::spawn_blocking(move || write(&dir, &snap)).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(format!("writing the snapshot in {} failed: {e}", self.dir.display())),
                    Err(e) => Err(format!("the snapshot task failed: {e}")),
                };
                match &result {
                    Ok(()) => break,
                    Err(e) => tracing::error!(error = %e, attempt, "snapshot write failed"),
                }
                if attempt < WRITE_ATTEMPTS {
                    tokio::time::sleep(std::time::Duration::from_millis(50 << attempt)).await;
                }
            }
            // Waiters learn the outcome: serving goes on when the disk fails, but nothing that
            // waited on this write is acknowledged as durable.
            let _previous = self.saved.send_replace((generation, result.map_err(Arc::from)));
        }
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // Tests spawn plain tasks.
mod tests {
    use super::*;

    #[tokio::test]
    async fn saves_are_atomic_and_awaited() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
        let w = SnapshotWriter::new(dir.path().to_path_buf());
        let stop = CancellationToken::new();
        let snap = Snapshot {
            own_policy: Some(PolicyRecord { version: 3, policy: ServicePolicy::default() }),
            upstreams: BTreeMap::new(),
        };
        let task = tokio::spawn(w.clone().run(
            {
                let s = snap.clone();
                move || s.clone()
            },
            stop.clone(),
        ));
        w.save().await.unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(snap));
        assert!(!dir.path().join("snapshot.json.tmp").exists());
        stop.cancel();
        task.await.unwrap();

        std::fs::write(dir.path().join(FILE), b"{\"own_pol").unwrap();
        assert!(load(dir.path()).unwrap_err().contains("damaged"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_write_is_reported_to_whoever_waited() {
        let dir = tempfile::tempdir().unwrap();
        // The data dir is a file: every write fails.
        let blocked = dir.path().join("not-a-dir");
        std::fs::write(&blocked, b"").unwrap();
        let w = SnapshotWriter::new(blocked);
        let stop = CancellationToken::new();
        let task = tokio::spawn(w.clone().run(Snapshot::default, stop.clone()));
        let err = w.save().await.unwrap_err();
        assert!(err.contains("not-a-dir"), "{err}");
        stop.cancel();
        task.await.unwrap();
    }
}
