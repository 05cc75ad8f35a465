//! Group commit. Every command of this instance goes through one committer task: it takes what
//! is queued (up to [`MAX_BATCH`] commands), decides each in order against the projection plus
//! what the earlier ones changed (so a hot market's trades are decided one after another in
//! memory), writes them all in one transaction — one fsync — and only then updates the
//! projection and answers every caller. While a batch is on its way to disk the next one
//! queues, so the more callers wait, the more each fsync carries.
//!
//! A member that lost a race (another instance wrote one of its aggregates first) is left out of
//! its batch alone and decided again on fresh state — in a round that holds the store's write
//! lock from before its catch-up to its commit, so it cannot lose a second race (without that,
//! two busy instances on a hot market could make one trade lose ten times in a row); a member
//! whose idempotency key turned out to be stored gets that answer. Nobody is answered before
//! the batch holding their command is durable; a batch the database refused is refused to all of
//! its writers, and nothing of it is applied.

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use mesh_runtime::telemetry::{KeyValue, SpanContext, SpanKind, Telemetry};
use serde_json::Value;
use std::time::SystemTime;
use tokio::sync::{RwLock, mpsc, oneshot};

use crate::{
    projection::{Projection, View},
    refusal::{Answer, Refusal},
    store::{Append, Idempotent, Member, Outcome, Store, StoreError},
};

/// Commands per batch (one transaction).
pub const MAX_BATCH: usize = 512;
/// Decisions per command before a lost race is the caller's answer.
pub const MAX_ATTEMPTS: usize = 10;

/// A command: decides its events (and its answer) against the current state.
pub type Decide = Box<dyn FnMut(&View<'_>) -> Result<(Vec<Append>, Answer), Refusal> + Send>;

/// A queued command and whom to answer.
pub struct Pending {
    pub decide: Decide,
    /// (key, request hash) of its `Idempotency-Key`.
    pub idempotency: Option<(String, String)>,
    pub reply: oneshot::Sender<Result<Answer, Refusal>>,
    attempts: usize,
    /// The command's span (the parent of its commit's span), when recorded.
    span: Option<SpanContext>,
    /// The trace its events carry (CloudEvents distributed tracing).
    traceparent: Option<String>,
}

impl Pending {
    pub fn new(
        decide: Decide,
        idempotency: Option<(String, String)>,
        reply: oneshot::Sender<Result<Answer, Refusal>>,
    ) -> Self {
        Self { decide, idempotency, reply, attempts: 0, span: None, traceparent: None }
    }

    /// With the command's span and the trace its events carry.
    pub fn traced(self, span: Option<SpanContext>, traceparent: Option<String>) -> Self {
        Self { span, traceparent, ..self }
    }
}

/// The committer's share of the service: the store, the projection it keeps current, and where
/// to ask for snapshots.
pub struct Committer {
    /// Where the commit spans go.
    pub telemetry: Telemetry,
    pub stats: Arc<Stats>,
    pub store: Store,
    pub projection: Arc<RwLock<Projection>>,
    pub snapshot_every: u64,
    pub snapshots: mpsc::UnboundedSender<String>,
}

/// How much each commit carried: batches written and the commands in them.
#[derive(Debug, Default)]
pub struct Stats {
    pub batches: AtomicU64,
    pub commands: AtomicU64,
    /// The most decisions one committed command took.
    pub most_decisions: AtomicU64,
}

/// What one member of a batch came to before it was written: its answer, its events being in
/// the batch's members (in the same order), or a refusal.
enum Decided {
    Write(Answer),
    Refused(Refusal),
}

impl Committer {
    /// Runs until every sender is gone.
    pub async fn run(self, mut queue: mpsc::Receiver<Pending>) {
        let mut carried: Vec<Pending> = Vec::new();
        loop {
            if carried.is_empty() {
                match queue.recv().await {
                    Some(p) => carried.push(p),
                    None => return,
                }
            }
            while carried.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(p) => carried.push(p),
                    Err(_) => break,
                }
            }
            let batch = std::mem::take(&mut carried);
            carried = self.round(batch).await;
        }
    }

    /// Decides, writes and answers one batch; returns the commands to decide again.
    async fn round(&self, batch: Vec<Pending>) -> Vec<Pending> {
        // A command that lost a race to another instance is decided again with the store's
        // write lock held from before the catch-up to the commit: it cannot lose twice, however
        // busy the other writers are.
        let contended = batch.iter().any(|p| p.attempts > 0);
        let ready = async {
            let lock = match contended {
                true => Some(self.store.lock_writes().await?),
                false => None,
            };
            catch_up(&self.store, &self.projection).await?;
            Ok::<_, StoreError>(lock)
        };
        let lock = match ready.await {
            Ok(lock) => lock,
            Err(e) => {
                let refusal = Refusal::from(e);
                for p in batch {
                    let _ = p.reply.send(Err(refusal.clone()));
                }
                return Vec::new();
            }
        };
        let mut again = Vec::new();
        let mut decided: Vec<(Pending, Decided)> = Vec::with_capacity(batch.len());
        let mut members: Vec<Member> = Vec::with_capacity(batch.len());
        {
            let projection = self.projection.read().await;
            let mut view = View::new(&projection);
            let mut keys = HashSet::new();
            for mut p in batch {
                // A key twice in one batch: the second waits for the first's stored answer.
                if let Some((key, _)) = &p.idempotency
                    && !keys.insert(key.clone())
                {
                    again.push(p);
                    continue;
                }
                p.attempts += 1;
                let d = match (p.decide)(&view) {
                    Ok((appends, answer)) => {
                        view.fold(&appends);
                        let idem = p.idempotency.as_ref().map(|(key, hash)| Idempotent {
                            key: key.clone(),
                            request_hash: hash.clone(),
                            status: answer.0,
                            response: answer.1.to_string(),
                        });
                        members.push(Member { appends, idem, traceparent: p.traceparent.clone() });
                        Decided::Write(answer)
                    }
                    Err(r) => Decided::Refused(r),
                };
                decided.push((p, d));
            }
        }
        let outcomes = if members.is_empty() {
            drop(lock);
            Vec::new()
        } else {
            let started = SystemTime::now();
            let written = self.store.append_batch(&members, true, now_ms() as i64, lock).await;
            self.commit_spans(&decided, members.len(), started, written.as_ref().err());
            match written {
                Ok(o) => {
                    self.stats.batches.fetch_add(1, Ordering::Relaxed);
                    let n = o.iter().filter(|o| matches!(o, Outcome::Committed(_))).count();
                    self.stats.commands.fetch_add(n as u64, Ordering::Relaxed);
                    o
                }
                Err(e) => {
                    // Nothing was written: writers are told so; refusals were decided on state
                    // that included them, so those are decided again.
                    let refusal = Refusal::from(e);
                    for (p, d) in decided {
                        match d {
                            Decided::Write(..) => {
                                let _ = p.reply.send(Err(refusal.clone()));
                            }
                            Decided::Refused(r) => retry_or(&mut again, p, r),
                        }
                    }
                    return again;
                }
            }
        };
        let mut outcomes = members.iter().zip(outcomes);
        let mut replies = Vec::with_capacity(decided.len());
        let mut committed = Vec::new();
        // After a member was left out, later refusals may rest on its effects: decide again.
        let mut dropped = false;
        for (p, d) in decided {
            match d {
                Decided::Refused(r) if dropped => retry_or(&mut again, p, r),
                Decided::Refused(r) => replies.push((p.reply, Err(r))),
                Decided::Write(answer) => match outcomes.next() {
                    Some((member, Outcome::Committed(recorded))) => {
                        self.stats.most_decisions.fetch_max(p.attempts as u64, Ordering::Relaxed);
                        self.snapshots_due(&member.appends);
                        committed.extend(recorded);
                        replies.push((p.reply, Ok(answer)));
                    }
                    Some((_, Outcome::Replayed(stored))) => {
                        dropped = true;
                        replies.push((p.reply, replayed(&p.idempotency, &stored)));
                    }
                    Some((_, Outcome::Retry { aggregate, .. })) => {
                        dropped = true;
                        let r = Refusal::new(
                            409,
                            "version_conflict",
                            format!("too much contention on {aggregate}; retry"),
                        );
                        retry_or(&mut again, p, r);
                    }
                    None => {
                        let r = Refusal::new(
                            500,
                            "internal",
                            "the store answered fewer members than it was given",
                        );
                        replies.push((p.reply, Err(r)));
                    }
                },
            }
        }
        if !committed.is_empty() {
            let mut projection = self.projection.write().await;
            let contiguous = committed.first().is_some_and(|r| r.seq == projection.seq + 1);
            if contiguous {
                for r in &committed {
                    projection.apply(r);
                }
            } else {
                // Another instance wrote in between (or PostgreSQL skipped sequence numbers):
                // fold the log in order, ours included.
                drop(projection);
                if let Err(e) = catch_up(&self.store, &self.projection).await {
                    tracing::warn!(error = %e, "projection behind after a commit; the next read catches up");
                }
            }
        }
        for (reply, answer) in replies {
            let _ = reply.send(answer);
        }
        again
    }

    /// One span per traced command that was in the batch's transaction, each under its
    /// command's span, all with the transaction's start and end.
    fn commit_spans(
        &self,
        decided: &[(Pending, Decided)],
        members: usize,
        started: SystemTime,
        failed: Option<&StoreError>,
    ) {
        if !self.telemetry.is_on() {
            return;
        }
        let ended = SystemTime::now();
        let system = match self.store.backend() {
            crate::store::Backend::Sqlite => "sqlite",
            crate::store::Backend::Postgres => "postgresql",
        };
        for (p, _) in decided.iter().filter(|(_, d)| matches!(d, Decided::Write(_))) {
            let Some(parent) = &p.span else { continue };
            let attributes = vec![
                KeyValue::new("db.system.name", system),
                KeyValue::new("db.operation.name", "append_batch"),
                KeyValue::new("market.batch.commands", members as i64),
            ];
            let span = self.telemetry.span_with(
                "market.commit",
                SpanKind::Internal,
                Some(parent),
                attributes,
                Some(started),
                Vec::new(),
            );
            if let Some(mut s) = span {
                if let Some(e) = failed {
                    s.fail(e.to_string());
                }
                s.end_at(ended);
            }
        }
    }

    fn snapshots_due(&self, appends: &[Append]) {
        for a in appends {
            let before = a.expected_version / self.snapshot_every;
            let after = (a.expected_version + a.events.len() as u64) / self.snapshot_every;
            if after > before {
                let _ = self.snapshots.send(a.aggregate_id.clone());
            }
        }
    }
}

/// Decide `p` again, or answer `last` when it has had its attempts.
fn retry_or(again: &mut Vec<Pending>, p: Pending, last: Refusal) {
    if p.attempts < MAX_ATTEMPTS {
        again.push(p);
    } else {
        let _ = p.reply.send(Err(last));
    }
}

/// The stored answer to a repeated idempotency key, or 422 when the key was used for a
/// different request.
pub fn replayed(idempotency: &Option<(String, String)>, stored: &Idempotent) -> Result<Answer, Refusal> {
    match idempotency {
        Some((_, hash)) if *hash == stored.request_hash => {
            Ok((stored.status, serde_json::from_str(&stored.response).unwrap_or(Value::Null)))
        }
        _ => Err(Refusal::new(
            422,
            "idempotency_key_reused",
            format!(
                "Idempotency-Key {:?} was used for a different request (another method, path or body)",
                stored.key.split_once('/').map_or(stored.key.as_str(), |(_, k)| k)
            ),
        )),
    }
}

pub fn now_ms() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Folds into the projection everything committed after what it holds.
pub async fn catch_up(store: &Store, projection: &RwLock<Projection>) -> Result<(), StoreError> {
    loop {
        let seq = projection.read().await.seq;
        let batch = store.after(seq, 1000).await?;
        if batch.is_empty() {
            return Ok(());
        }
        let mut p = projection.write().await;
        for r in &batch {
            p.apply(r);
        }
    }
}
