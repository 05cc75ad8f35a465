//! Events from the bus, delivered to the local app and to the response cache.
//!
//! - **Webhooks.** Each [`Subscription`] (from the sidecar's config) follows its topic as its
//!   consumer group and POSTs every event to the app in CloudEvents binary mode (`ce-*`
//!   headers, the data as the body), one at a time, so in order per key. A `2xx` answer commits
//!   the event; anything else (or no answer within `timeout`) is retried with jittered backoff;
//!   after `max_attempts` the event is published to the dead-letter topic with the reason and
//!   then committed. Delivery waits while the app's health probe fails. Delivery is
//!   at-least-once: a crash between the app's answer and the commit delivers the event again.
//! - **Cache invalidation.** For every topic an upstream's cache policy names in
//!   `invalidate_on`, the sidecar follows the topic from its head (no group: it keeps the offset
//!   in memory and resumes from it after a reconnect) and drops the entries whose path starts
//!   with the rule's prefix, `{key}` replaced by the event's key.

use std::{collections::HashMap, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use mesh_proto::{names, policy::human_duration, v1};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{Shared, control::Backoff, events::connect_events};

type EventsClient = v1::events_client::EventsClient<tonic::transport::Channel>;

/// A webhook subscription of the local app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subscription {
    pub topic: String,
    /// The app's path that receives each event as a POST.
    pub path: String,
    /// Consumer group; default: the service name (its instances share the group's offset and
    /// one of them receives at a time).
    #[serde(default)]
    pub group: Option<String>,
    /// Deliveries of one event before it goes to the dead-letter topic. Default 5.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Default `<topic>.dead-letter`.
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
    /// How long the app has to answer one delivery. Default 10s.
    #[serde(default = "default_timeout", with = "human_duration")]
    pub timeout: Duration,
    /// First retry delay (full jitter, doubling up to `backoff_max`). Default 100ms.
    #[serde(default = "default_backoff_base", with = "human_duration")]
    pub backoff_base: Duration,
    /// Default 10s.
    #[serde(default = "default_backoff_max", with = "human_duration")]
    pub backoff_max: Duration,
}

fn default_max_attempts() -> u32 {
    5
}
fn default_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_backoff_base() -> Duration {
    Duration::from_millis(100)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(10)
}

impl Subscription {
    /// `TOPIC=PATH` from the command line, with the defaults for the rest.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (topic, path) = s
            .split_once('=')
            .ok_or_else(|| format!("--subscribe {s:?}: expected TOPIC=PATH, e.g. markets=/events"))?;
        Ok(Subscription {
            topic: topic.trim().to_string(),
            path: path.trim().to_string(),
            group: None,
            max_attempts: default_max_attempts(),
            dead_letter_topic: None,
            timeout: default_timeout(),
            backoff_base: default_backoff_base(),
            backoff_max: default_backoff_max(),
        })
    }

    pub fn validate(&self) -> Result<(), String> {
        let topic_rule = "1..=128 characters of a-z, 0-9, '.', '_' and '-'";
        if !names::is_topic(&self.topic) {
            return Err(format!("subscription topic {:?}: {topic_rule}", self.topic));
        }
        if !self.path.starts_with('/') {
            return Err(format!("subscription to {}: path {:?} must start with '/'", self.topic, self.path));
        }
        if let Some(g) = &self.group
            && !names::is_topic(g)
        {
            return Err(format!("subscription to {}: group {g:?}: {topic_rule}", self.topic));
        }
        if let Some(d) = &self.dead_letter_topic
            && (!names::is_topic(d) || *d == self.topic)
        {
            return Err(format!(
                "subscription to {}: dead_letter_topic {d:?}: {topic_rule}, not the topic itself",
                self.topic
            ));
        }
        if !(1..=100).contains(&self.max_attempts) {
            return Err(format!("subscription to {}: max_attempts must be 1..=100", self.topic));
        }
        if self.timeout.is_zero() || self.backoff_base.is_zero() || self.backoff_max < self.backoff_base {
            return Err(format!(
                "subscription to {}: timeout and backoff_base must be > 0 and backoff_max >= backoff_base",
                self.topic
            ));
        }
        Ok(())
    }

    pub fn dead_letter(&self) -> String {
        self.dead_letter_topic.clone().unwrap_or_else(|| format!("{}.dead-letter", self.topic))
    }
}

/// What a follower does with each delivery: true when handled (and to be committed), false
/// to stop following.
trait Handle: Send {
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
async fn follow(
    shared: &Shared,
    mut start: v1::SubscribeStart,
    stop: &CancellationToken,
    handle: &mut impl Handle,
) {
    let urls = &shared.config.control_plane;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    for attempt in 0usize.. {
        let url = &urls[attempt % urls.len()];
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
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
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

/// Delivers `sub`'s events to the app until `stop`.
pub async fn deliver(shared: Arc<Shared>, sub: Subscription, stop: CancellationToken) {
    let Some(app) = shared.app.clone() else { return };
    let group = sub.group.clone().or_else(|| shared.config.service.clone()).unwrap_or_default();
    let start = v1::SubscribeStart { topic: sub.topic.clone(), group, ..Default::default() };
    let span = tracing::info_span!("subscription", topic = %sub.topic, path = %sub.path);
    let mut webhook = Webhook {
        shared: shared.clone(),
        app,
        labels: vec![("topic", sub.topic.clone())],
        group: start.group.clone(),
        sub,
        stop: stop.clone(),
    };
    follow(&shared, start, &stop, &mut webhook).instrument(span).await
}

struct Webhook {
    shared: Arc<Shared>,
    app: crate::proxy::LocalApp,
    sub: Subscription,
    group: String,
    labels: Vec<(&'static str, String)>,
    stop: CancellationToken,
}

impl Handle for Webhook {
    async fn handle(&mut self, client: &mut EventsClient, d: v1::Delivery) -> bool {
        let Some(event) = d.event else { return true };
        let (m, sub, stop) = (&self.shared.metrics, &self.sub, &self.stop);
        let mut backoff = Backoff::new(sub.backoff_base, sub.backoff_max);
        let mut last_error = String::new();
        for attempt in 1..=sub.max_attempts {
            let mut healthy = self.shared.app_healthy.subscribe();
            tokio::select! {
                _ = stop.cancelled() => return false,
                r = healthy.wait_for(|h| *h) => if r.is_err() { return false },
            }
            match post(&self.app, sub, &event, d.offset).await {
                Ok(()) => {
                    m.events_delivered.get_or_create(&self.labels).inc();
                    return true;
                }
                Err(e) => {
                    m.event_delivery_failures.get_or_create(&self.labels).inc();
                    tracing::debug!(id = %event.id, attempt, error = %e, "delivery failed");
                    last_error = e;
                }
            }
            if attempt < sub.max_attempts {
                tokio::select! {
                    _ = stop.cancelled() => return false,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
        tracing::warn!(id = %event.id, error = %last_error, "event dead-lettered");
        let stored = dead_letter(client, sub, &self.group, event, d.offset, &last_error, stop).await;
        if stored {
            m.events_dead_lettered.get_or_create(&self.labels).inc();
        }
        stored
    }
}

async fn post(
    app: &crate::proxy::LocalApp,
    sub: &Subscription,
    e: &v1::Event,
    offset: u64,
) -> Result<(), String> {
    let time =
        humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(e.time_unix_ms))
            .to_string();
    let mut req = http::Request::post(sub.path.as_str())
        .header(
            http::header::CONTENT_TYPE,
            if e.content_type.is_empty() { "application/json" } else { &e.content_type },
        )
        .header("ce-specversion", "1.0")
        .header("ce-id", &e.id)
        .header("ce-source", &e.source)
        .header("ce-type", &e.r#type)
        .header("ce-time", time)
        .header("ce-topic", &e.topic)
        .header("x-mesh-event-offset", offset.to_string());
    for (name, value) in
        [("ce-subject", &e.key), ("ce-correlationid", &e.correlation_id), ("ce-causationid", &e.causation_id)]
    {
        if !value.is_empty() {
            req = req.header(name, value);
        }
    }
    let req = req
        .body(crate::proxy::boxed(Full::new(Bytes::from(e.data.clone()))))
        .map_err(|e| format!("invalid event header: {e}"))?;
    let resp = tokio::time::timeout(sub.timeout, async {
        let resp = app.send(req, None).await.map_err(|e| format!("cannot reach the app: {e}"))?;
        let status = resp.status();
        // Read the answer so the connection can be reused.
        let _ = resp.into_body().collect().await;
        Ok::<_, String>(status)
    })
    .await
    .map_err(|_| format!("the app did not answer within {:?}", sub.timeout))??;
    if resp.is_success() { Ok(()) } else { Err(format!("the app answered {resp}")) }
}

/// Publishes `event` to the subscription's dead-letter topic (retrying until it is stored or
/// `stop`); false when stopped first.
async fn dead_letter(
    client: &mut EventsClient,
    sub: &Subscription,
    group: &str,
    mut event: v1::Event,
    offset: u64,
    reason: &str,
    stop: &CancellationToken,
) -> bool {
    event.attributes.insert("deadletter_topic".into(), event.topic.clone());
    event.attributes.insert("deadletter_group".into(), group.to_string());
    event.attributes.insert("deadletter_offset".into(), offset.to_string());
    event.attributes.insert("deadletter_attempts".into(), sub.max_attempts.to_string());
    event.attributes.insert("deadletter_reason".into(), reason.chars().take(500).collect());
    event.topic = sub.dead_letter();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        match client.publish(v1::PublishRequest { events: vec![event.clone()] }).await {
            Ok(_) => return true,
            Err(s) => {
                tracing::warn!(error = %s, "publishing to the dead-letter topic failed; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return false,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
    }
}

/// Keeps one follower per topic named by an upstream's cache `invalidate_on` rules, and drops
/// matching entries as their events pass. Rechecks the policies every `every`. A cache naming
/// a topic serves nothing until that topic's follower is positioned.
pub async fn invalidate_caches(shared: Arc<Shared>, every: Duration, stop: CancellationToken) {
    let mut followers: HashMap<String, CancellationToken> = HashMap::new();
    loop {
        let mut wanted: Vec<String> = shared
            .upstreams
            .all()
            .iter()
            .flat_map(|u| {
                u.policy().policy.cache.invalidate_on.iter().map(|r| r.topic.clone()).collect::<Vec<_>>()
            })
            .collect();
        wanted.sort();
        wanted.dedup();
        followers.retain(|topic, token| {
            let keep = wanted.contains(topic);
            if !keep {
                token.cancel();
            }
            keep
        });
        for topic in wanted {
            if followers.contains_key(&topic) {
                continue;
            }
            let token = stop.child_token();
            followers.insert(topic.clone(), token.clone());
            let s = shared.clone();
            let span = tracing::info_span!("cache_invalidation", topic = %topic);
            tokio::spawn(
                async move {
                    let start =
                        v1::SubscribeStart { topic: topic.clone(), from_end: true, ..Default::default() };
                    let mut invalidator =
                        Invalidator { shared: s.clone(), topic: topic.clone(), live: false };
                    follow(&s, start, &token, &mut invalidator).await;
                    if invalidator.live {
                        s.upstreams.set_topic_live(&topic, false);
                        s.metrics.cache_invalidation_followers.dec();
                    }
                }
                .instrument(span),
            );
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

struct Invalidator {
    shared: Arc<Shared>,
    topic: String,
    /// Positioned once: from then on it resumes from its last offset, missing nothing.
    live: bool,
}

impl Handle for Invalidator {
    async fn handle(&mut self, _: &mut EventsClient, d: v1::Delivery) -> bool {
        if let Some(e) = d.event {
            invalidate_for(&self.shared, &e);
        }
        true
    }

    /// The first time: entries kept before (while this topic was not followed) may have missed
    /// their invalidation, so they go; then the caches that name the topic may serve again.
    fn positioned(&mut self) {
        if self.live {
            return;
        }
        self.live = true;
        for up in self.shared.upstreams.all() {
            if up.policy().policy.cache.invalidate_on.iter().any(|r| r.topic == self.topic) {
                up.cache.invalidate("");
            }
        }
        self.shared.upstreams.set_topic_live(&self.topic, true);
        self.shared.metrics.cache_invalidation_followers.inc();
    }
}

/// Drops, in every upstream whose cache policy names `e.topic`, the entries its rules select.
pub fn invalidate_for(shared: &Shared, e: &v1::Event) {
    for up in shared.upstreams.all() {
        let policy = up.policy();
        for rule in policy.policy.cache.invalidate_on.iter().filter(|r| r.topic == e.topic) {
            let prefix = rule.prefix_for(&e.key);
            let n = up.cache.invalidate(&prefix);
            shared
                .metrics
                .cache_invalidations
                .get_or_create(&vec![("service", up.name.clone()), ("topic", e.topic.clone())])
                .inc_by(n as u64);
            tracing::debug!(service = %up.name, %prefix, dropped = n, "cache entries invalidated by an event");
        }
    }
}
