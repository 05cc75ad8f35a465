//! The spool and its group-commit writer: appends from the publish API share one fsync.

use crate::events::spool::{Spool, SpoolError};

use mesh_proto::v1;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// The spool, its group-commit writer and the forwarder's wake-up.
pub struct Outbox {
    pub spool: Arc<Mutex<Spool>>,
    pub wake: Notify,
    appends: std::sync::mpsc::Sender<Append>,
}

/// One publish waiting for the group commit.
struct Append {
    events: Vec<v1::Event>,
    done: tokio::sync::oneshot::Sender<Result<Vec<u64>, SpoolError>>,
}

impl Outbox {
    /// Wraps `spool` and starts its writer thread, which commits whatever publishes are waiting
    /// together (one write, one fsync) and stops when the outbox is dropped.
    pub fn new(spool: Spool) -> Outbox {
        let spool = Arc::new(Mutex::new(spool));
        let (appends, queue) = std::sync::mpsc::channel::<Append>();
        let writer = spool.clone();
        // A thread, not a task: fsync blocks. It logs inside the span of whoever opened the spool.
        let span = tracing::info_span!(parent: tracing::Span::current(), "event_committer");
        let spawned = std::thread::Builder::new().name("spool-writer".into()).spawn(move || {
            let _span = span.enter();
            while let Ok(first) = queue.recv() {
                let mut group = vec![first];
                while group.len() < 1024
                    && let Ok(more) = queue.try_recv()
                {
                    group.push(more);
                }
                let batches: Vec<&[v1::Event]> = group.iter().map(|a| a.events.as_slice()).collect();
                let now = mesh_proto::unix_ms(std::time::SystemTime::now());
                let results = writer.lock().unwrap_or_else(|p| p.into_inner()).append_group(&batches, now);
                for (a, r) in group.into_iter().zip(results) {
                    let _ = a.done.send(r);
                }
            }
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the spool writer thread: publishing will fail");
        }
        Outbox { spool, wake: Notify::new(), appends }
    }

    /// Appends `events` durably (group-committed with concurrent publishes).
    pub(crate) async fn append(&self, events: Vec<v1::Event>) -> Result<Vec<u64>, SpoolError> {
        let (done, answer) = tokio::sync::oneshot::channel();
        let stopped = || SpoolError::Io {
            path: "spool".into(),
            source: std::io::Error::other("the spool writer stopped"),
        };
        self.appends.send(Append { events, done }).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}
