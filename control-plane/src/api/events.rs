//! `mesh.v1.Events`: publish, subscribe (with consumer groups and committed offsets), replay.

use crate::{
    api::{Api, BoxStream, DEFAULT_REPLAY_LIMIT},
    bus::READ_BATCH,
    state::State,
};

use futures::{FutureExt, StreamExt, stream};
use mesh_proto::{names, v1};
use std::sync::Arc;
use tonic::{Request, Response, Status, Streaming};

fn check_topic(topic: &str) -> Result<(), Status> {
    if names::is_topic(topic) {
        return Ok(());
    }
    Err(Status::invalid_argument(format!("topic {topic:?}: {}", names::TOPIC_RULE)))
}

struct Subscription {
    inbound: Streaming<v1::SubscribeRequest>,
    topic: Option<(String, String)>,
    next: u64,
    head: Option<tokio::sync::watch::Receiver<u64>>,
    buffer: std::collections::VecDeque<v1::Delivery>,
    /// The group's committer (which holds the group's lease until it has stored the last
    /// commit).
    commits: Option<tokio::sync::watch::Sender<Option<u64>>>,
    state: Arc<State>,
}

/// Stores a group's latest committed offset in the background, coalescing commits that arrive
/// faster than the store's fsync (so commits never slow deliveries down); when the subscriber
/// leaves it stores the last one and only then releases the group's lease, so the next reader
/// of the group resumes after it.
fn spawn_committer(
    state: Arc<State>,
    topic: String,
    group: String,
    lease: tokio::sync::OwnedMutexGuard<()>,
) -> tokio::sync::watch::Sender<Option<u64>> {
    let (tx, mut rx) = tokio::sync::watch::channel(None::<u64>);
    mesh_runtime::spawn(tracing::info_span!("event_committer", %topic, %group), async move {
        let _lease = lease;
        let mut stored = None;
        loop {
            let left = rx.changed().await.is_err();
            let latest = *rx.borrow_and_update();
            if let Some(offset) = latest
                && Some(offset) != stored
            {
                match state.bus.commit(&topic, &group, offset).await {
                    Ok(()) => stored = Some(offset),
                    Err(e) => {
                        tracing::warn!(%topic, %group, offset, error = %e, "storing a commit failed; the group will see those events again")
                    }
                }
            }
            if left {
                return;
            }
        }
    });
    tx
}

impl Subscription {
    /// Handles a start: waits for the group's lease, then positions the reader.
    async fn start(&mut self, s: v1::SubscribeStart) -> Result<(), Status> {
        check_topic(&s.topic)?;
        if !s.group.is_empty() && !names::is_topic(&s.group) {
            return Err(Status::invalid_argument(format!("group {:?}: {}", s.group, names::TOPIC_RULE)));
        }
        let bus = &self.state.bus;
        // A previous start's committer stores its last commit and releases its lease.
        self.commits = None;
        if !s.group.is_empty() {
            let lease = bus.lease(&s.topic, &s.group).await;
            self.commits = Some(spawn_committer(self.state.clone(), s.topic.clone(), s.group.clone(), lease));
        }
        let head = bus.watch(&s.topic).await?;
        let committed = if s.group.is_empty() { None } else { bus.committed(&s.topic, &s.group).await? };
        self.next = match (s.from_offset, s.from_time_unix_ms, committed) {
            (Some(o), _, _) => o,
            (None, Some(t), _) => bus.offset_at(&s.topic, t).await?,
            (None, None, Some(c)) => c,
            (None, None, None) if s.from_end => *head.borrow(),
            (None, None, None) => 0,
        };
        self.buffer.clear();
        self.head = Some(head);
        self.topic = Some((s.topic, s.group));
        Ok(())
    }

    /// Handles one message from the subscriber (a commit, or a start that re-positions).
    async fn handle(&mut self, msg: v1::SubscribeRequest) -> Result<(), Status> {
        use v1::subscribe_request::Kind;
        match msg.kind {
            Some(Kind::Start(s)) => self.start(s).await,
            Some(Kind::Commit(c)) => {
                if self.topic.is_none() {
                    return Err(Status::failed_precondition("send start before commit"));
                }
                let Some(commits) = &self.commits else {
                    return Err(Status::failed_precondition("commit needs a group in start"));
                };
                commits.send_replace(Some(c.offset));
                Ok(())
            }
            None => Err(Status::invalid_argument("kind: start or commit is required")),
        }
    }

    async fn next(mut self) -> Option<(Result<v1::Delivery, Status>, Self)> {
        loop {
            // Commits are read while deliveries flow, not only once caught up: unread, they
            // back up the subscriber's request stream until the stream fails, and the group
            // would then resume far behind (redelivering everything since).
            while let Some(msg) = self.inbound.next().now_or_never() {
                match msg {
                    None | Some(Err(_)) => return None,
                    Some(Ok(m)) => {
                        if let Err(e) = self.handle(m).await {
                            return Some((Err(e), self));
                        }
                    }
                }
            }
            if let Some(d) = self.buffer.pop_front() {
                return Some((Ok(d), self));
            }
            if let (Some((topic, _)), Some(head)) = (&self.topic, &self.head)
                && self.next < *head.borrow()
            {
                match self.state.bus.read(topic, self.next, READ_BATCH).await {
                    Ok(batch) => {
                        // Past events dropped by retention, or the batch.
                        self.next = batch.last().map_or(*head.borrow(), |last| last.offset + 1);
                        self.buffer.extend(batch);
                        continue;
                    }
                    Err(e) => return Some((Err(e.into()), self)),
                }
            }
            let changed = async {
                match &mut self.head {
                    Some(h) => h.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.state.shutdown.cancelled() => return None,
                ok = changed => if !ok { return None },
                msg = self.inbound.next() => match msg {
                    None | Some(Err(_)) => return None,
                    Some(Ok(m)) => {
                        if let Err(e) = self.handle(m).await {
                            return Some((Err(e), self));
                        }
                    }
                },
            }
        }
    }
}

#[tonic::async_trait]
impl v1::events_server::Events for Api {
    async fn publish(
        &self,
        req: Request<v1::PublishRequest>,
    ) -> Result<Response<v1::PublishResponse>, Status> {
        self.member(&req, "publish events")?;
        let results = self.0.bus.publish(req.into_inner().events).await?;
        Ok(Response::new(v1::PublishResponse { results }))
    }

    type SubscribeStream = BoxStream<v1::Delivery>;

    /// The first message must be a start; it is handled (the group's lease taken, the position
    /// fixed) before the call returns, so a subscriber that got its stream knows it will see
    /// every event published from then on.
    async fn subscribe(
        &self,
        req: Request<Streaming<v1::SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        self.member(&req, "subscribe to events")?;
        let mut inbound = req.into_inner();
        let first = inbound.message().await?;
        let mut sub = Subscription {
            inbound,
            topic: None,
            next: 0,
            head: None,
            buffer: Default::default(),
            commits: None,
            state: self.0.clone(),
        };
        match first {
            Some(v1::SubscribeRequest { kind: Some(v1::subscribe_request::Kind::Start(s)) }) => {
                sub.start(s).await?
            }
            _ => return Err(Status::invalid_argument("the first message of a subscription must be start")),
        }
        Ok(Response::new(Box::pin(stream::unfold(sub, Subscription::next))))
    }

    type ReplayStream = BoxStream<v1::Delivery>;

    async fn replay(&self, req: Request<v1::ReplayRequest>) -> Result<Response<Self::ReplayStream>, Status> {
        self.member(&req, "replay events")?;
        let r = req.into_inner();
        check_topic(&r.topic)?;
        // Any limit is served in full, read page by page as the client takes it (memory stays
        // one page however much is asked for).
        let limit = match r.limit {
            0 => DEFAULT_REPLAY_LIMIT as usize,
            n => n as usize,
        };
        let from = match (r.from_offset, r.from_time_unix_ms) {
            (Some(o), _) => o,
            (None, Some(t)) => self.0.bus.offset_at(&r.topic, t).await?,
            (None, None) => 0,
        };
        let pages = Pages {
            state: self.0.clone(),
            topic: r.topic,
            next: from,
            left: limit,
            page: Default::default(),
        };
        Ok(Response::new(Box::pin(stream::unfold(pages, Pages::next))))
    }
}

/// A replay read from the bus a page at a time.
struct Pages {
    state: Arc<State>,
    topic: String,
    next: u64,
    left: usize,
    page: std::collections::VecDeque<v1::Delivery>,
}

impl Pages {
    /// Deliveries read from the bus per page.
    const SIZE: usize = 1000;

    async fn next(mut self) -> Option<(Result<v1::Delivery, Status>, Self)> {
        if self.left == 0 {
            return None;
        }
        if self.page.is_empty() {
            match self.state.bus.read(&self.topic, self.next, self.left.min(Self::SIZE)).await {
                Ok(page) => self.page = page.into(),
                Err(e) => {
                    self.left = 0;
                    return Some((Err(e.into()), self));
                }
            }
        }
        let d = self.page.pop_front()?;
        self.next = d.offset + 1;
        self.left -= 1;
        Some((Ok(d), self))
    }
}

// ---- Identity (the mesh CA) -----------------------------------------------------------------
