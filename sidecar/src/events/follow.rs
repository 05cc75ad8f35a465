//! Following a topic from the control plane's bus: reconnects with backoff, resumes from the
//! group's committed offset (or, without a group, after the last handled event).

use crate::{events::forwarder::connect_events, shared::Shared};

use mesh_proto::v1;
use mesh_runtime::{Backoff, Rotation};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub(crate) type EventsClient = v1::events_client::EventsClient<tonic::transport::Channel>;

/// What a follower does with each delivery: true when handled (and to be committed), false
/// to stop following.
pub(crate) trait Handle: Send {
    fn handle(&mut self, client: &mut EventsClient, d: v1::Delivery) -> impl Future<Output = bool> + Send;

    /// The bus took the subscription: every event from here on will be delivered.
    fn positioned(&mut self) {}
}

/// Why following a topic ended.
enum Ended {
    Stopped,
    Failed(String),
}

/// Follows `start.topic` from the first reachable control plane, calling `handle` for each
/// delivery in order and committing it (when `start.group` is set) once `handle` returns true;
/// `false` ends the stream (to stop). Reconnects with backoff, resuming from the group's
/// committed offset, or, without a group, after the last handled offset.
pub(crate) async fn follow(
    shared: &Shared,
    mut start: v1::SubscribeStart,
    stop: &CancellationToken,
    handle: &mut impl Handle,
) {
    let mut urls = Rotation::new(&shared.config.control_plane);
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let url = urls.next_url();
        let ended = tokio::select! {
            _ = stop.cancelled() => return,
            r = follow_once(&shared.dialer, url, &start, handle, &mut backoff) => r,
        };
        let reason = match ended {
            (Ended::Stopped, _) => return,
            (Ended::Failed(reason), next) => {
                if start.group.is_empty()
                    && let Some(n) = next
                {
                    start.from_offset = Some(n);
                }
                reason
            }
        };
        let wait = backoff.next_delay();
        tracing::warn!(topic = %start.topic, error = %reason, retry_in = ?wait, "event subscription interrupted");
        if !Backoff::sleep(wait, stop).await {
            return;
        }
    }
}

/// One subscription stream; returns why it ended and the offset after the last handled event.
async fn follow_once(
    dialer: &mesh_proto::dial::Dialer,
    url: &str,
    start: &v1::SubscribeStart,
    handle: &mut impl Handle,
    backoff: &mut Backoff,
) -> (Ended, Option<u64>) {
    let mut client = match connect_events(dialer, url).await {
        Ok(c) => c,
        Err(e) => return (Ended::Failed(e), None),
    };
    let (tx, rx) = mpsc::channel(64);
    let first = v1::SubscribeRequest { kind: Some(v1::subscribe_request::Kind::Start(start.clone())) };
    if tx.send(first).await.is_err() {
        return (Ended::Failed("subscription channel closed".into()), None);
    }
    let mut deliveries = match client.subscribe(tokio_stream::wrappers::ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(s) => return (Ended::Failed(format!("control plane refused the subscription: {s}")), None),
    };
    handle.positioned();
    let mut next = None;
    loop {
        let d = match deliveries.message().await {
            Ok(Some(d)) => d,
            Ok(None) => return (Ended::Failed("the control plane closed the subscription".into()), next),
            Err(s) => return (Ended::Failed(format!("subscription failed: {s}")), next),
        };
        backoff.reset();
        let offset = d.offset;
        if !handle.handle(&mut client, d).await {
            return (Ended::Stopped, next);
        }
        next = Some(offset + 1);
        if !start.group.is_empty() {
            let commit = v1::SubscribeRequest {
                kind: Some(v1::subscribe_request::Kind::Commit(v1::SubscribeCommit { offset: offset + 1 })),
            };
            if tx.send(commit).await.is_err() {
                return (Ended::Failed("subscription stream closed".into()), next);
            }
        }
    }
}
