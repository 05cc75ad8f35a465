//! The event bus behind `mesh.v1.Events`: a durable, append-only log per topic, deduplicated
//! by event id, read by offset, consumed by groups with committed offsets, trimmed by age and
//! size. Two logs implement it:
//!
//! - **embedded** (default): the control plane's redb file. Publishing to a topic is serialised
//!   per topic: each event either already exists (same id: a duplicate, answered with its
//!   original offset) or gets the next offset; the new events, their ids and the topic's head
//!   commit in one transaction (fsync) before the publisher hears back. Dedup covers every
//!   retained event.
//! - **nats** (`crate::bus_nats`): NATS JetStream, one stream per topic, the offset being the
//!   stream sequence − 1, dedup through the `Nats-Msg-Id` header (within the stream's duplicate
//!   window), group offsets in a stream of their own.
//!
//! Subscribers follow a `watch` of the topic's head offset. Delivery is at-least-once: a group
//! resumes from its last committed offset; one subscriber of a group receives at a time.

pub(crate) mod embedded;
pub mod error;
pub(crate) mod nats;
pub mod retention;

use crate::{
    bus::{embedded::append_embedded, error::BusError, nats::NatsLog, retention::Retention},
    store::{Store, StoreError},
};

use dashmap::DashMap;
use mesh_proto::{names, prost::Message, v1};
use std::{collections::HashMap, sync::Arc, time::Duration};
use tokio::sync::{Mutex, OwnedMutexGuard, watch};

/// Largest event accepted (data plus attributes).
pub const MAX_EVENT_BYTES: usize = 256 * 1024;

/// Largest batch read from the log at once.
pub const READ_BATCH: usize = 256;

struct Topic {
    /// Serialises offset assignment and dedup for this topic.
    append: Mutex<()>,
    /// The next offset (the number of events so far).
    head: watch::Sender<u64>,
}

impl Topic {
    fn new(head: u64) -> Arc<Topic> {
        Arc::new(Topic { append: Mutex::new(()), head: watch::channel(head).0 })
    }
}

enum Log {
    Embedded(Store),
    Nats(Box<NatsLog>),
}

pub struct Bus {
    log: Log,
    retention: Retention,
    topics: DashMap<String, Arc<Topic>>,
    groups: DashMap<(String, String), Arc<Mutex<()>>>,
}

/// Checks what every log requires of published events.
fn validate(events: &[v1::Event]) -> Result<(), BusError> {
    for (index, e) in events.iter().enumerate() {
        let bad = |reason: String| Err(BusError::Invalid { index, reason });
        if !names::is_topic(&e.topic) {
            return bad(format!("topic {:?}: {}", e.topic, names::TOPIC_RULE));
        }
        if e.id.is_empty() || e.id.len() > 200 {
            return bad("id: 1..=200 characters, unique per topic (duplicates are dropped)".into());
        }
        if e.encoded_len() > MAX_EVENT_BYTES {
            return bad(format!("larger than {MAX_EVENT_BYTES} bytes"));
        }
    }
    Ok(())
}

impl Bus {
    /// The bus in the control plane's own store.
    pub fn embedded(store: Store, retention: Retention) -> Result<Self, StoreError> {
        let topics = DashMap::new();
        for (name, head) in store.bus_heads()? {
            topics.insert(name, Topic::new(head));
        }
        Ok(Bus { log: Log::Embedded(store), retention, topics, groups: DashMap::new() })
    }

    /// The bus on NATS JetStream at `url` (streams are created on first use with `retention`).
    pub async fn nats(url: &str, retention: Retention) -> Result<Self, BusError> {
        let log = NatsLog::connect(url, retention).await?;
        Ok(Bus { log: Log::Nats(Box::new(log)), retention, topics: DashMap::new(), groups: DashMap::new() })
    }

    pub fn kind(&self) -> &'static str {
        match self.log {
            Log::Embedded(_) => "embedded",
            Log::Nats(_) => "nats",
        }
    }

    async fn topic(&self, name: &str) -> Result<Arc<Topic>, BusError> {
        if let Some(t) = self.topics.get(name) {
            return Ok(t.clone());
        }
        let head = match &self.log {
            Log::Embedded(_) => 0,
            Log::Nats(n) => n.head(name).await?,
        };
        Ok(self.topics.entry(name.to_string()).or_insert_with(|| Topic::new(head)).clone())
    }

    /// Appends `events` (each to its own topic, in order per topic); durable before it returns.
    pub async fn publish(&self, events: Vec<v1::Event>) -> Result<Vec<v1::PublishResult>, BusError> {
        validate(&events)?;
        let mut results: Vec<Option<v1::PublishResult>> = vec![None; events.len()];
        let mut by_topic: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, e) in events.iter().enumerate() {
            by_topic.entry(e.topic.as_str()).or_default().push(i);
        }
        for (name, indexes) in by_topic {
            let topic = self.topic(name).await?;
            let _serial = topic.append.lock().await;
            let batch: Vec<&v1::Event> = indexes.iter().map(|i| &events[*i]).collect();
            let (answers, head) = match &self.log {
                Log::Embedded(store) => {
                    let head = *topic.head.borrow();
                    append_embedded(store, name, head, &batch).await?
                }
                Log::Nats(n) => n.publish(name, &batch).await?,
            };
            for (i, r) in indexes.into_iter().zip(answers) {
                results[i] = Some(r);
            }
            topic.head.send_if_modified(|h| {
                let grew = head > *h;
                *h = (*h).max(head);
                grew
            });
        }
        Ok(results.into_iter().flatten().collect())
    }

    /// Up to `limit` deliveries of `topic` from `from` on (events dropped by retention are
    /// skipped).
    pub async fn read(&self, topic: &str, from: u64, limit: usize) -> Result<Vec<v1::Delivery>, BusError> {
        let rows = match &self.log {
            Log::Embedded(store) => store.bus_read(topic, from, limit)?,
            Log::Nats(n) => n.read(topic, from, limit).await?,
        };
        Ok(rows
            .into_iter()
            .filter_map(|(offset, bytes)| {
                v1::Event::decode(bytes.as_slice())
                    .ok()
                    .map(|event| v1::Delivery { event: Some(event), offset })
            })
            .collect())
    }

    /// The first offset at or after `time_ms` (a scan: there is no time index).
    pub async fn offset_at(&self, topic: &str, time_ms: u64) -> Result<u64, BusError> {
        let mut from = 0;
        loop {
            let batch = self.read(topic, from, READ_BATCH).await?;
            let Some(last) = batch.last().map(|d| d.offset) else { return Ok(from) };
            if let Some(d) =
                batch.iter().find(|d| d.event.as_ref().is_some_and(|e| e.time_unix_ms >= time_ms))
            {
                return Ok(d.offset);
            }
            from = last + 1;
        }
    }

    /// The topic's head (next offset), now and as it grows.
    pub async fn watch(&self, topic: &str) -> Result<watch::Receiver<u64>, BusError> {
        Ok(self.topic(topic).await?.head.subscribe())
    }

    /// Where `group` resumes `topic`, if it ever committed.
    pub async fn committed(&self, topic: &str, group: &str) -> Result<Option<u64>, BusError> {
        match &self.log {
            Log::Embedded(store) => Ok(store.bus_committed(topic, group)?),
            Log::Nats(n) => n.committed(topic, group).await,
        }
    }

    /// Durably records that `group` consumed `topic` below `next`.
    pub async fn commit(&self, topic: &str, group: &str, next: u64) -> Result<(), BusError> {
        match &self.log {
            Log::Embedded(store) => Ok(store.bus_commit(topic, group, next).await?),
            Log::Nats(n) => n.commit(topic, group, next).await,
        }
    }

    /// Waits until no other subscriber of `group` reads `topic`; held while this one does.
    pub async fn lease(&self, topic: &str, group: &str) -> OwnedMutexGuard<()> {
        let lock = self.groups.entry((topic.to_string(), group.to_string())).or_default().clone();
        lock.lock_owned().await
    }

    /// Periodic upkeep until `stop`: the embedded log drops events past the retention limits;
    /// the NATS log (whose streams trim themselves) refreshes heads other control planes moved.
    pub async fn maintain(&self, every: Duration, stop: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let names: Vec<(String, Arc<Topic>)> =
                self.topics.iter().map(|t| (t.key().clone(), t.value().clone())).collect();
            for (name, topic) in names {
                match &self.log {
                    Log::Embedded(store) => {
                        let now = mesh_proto::unix_ms(std::time::SystemTime::now());
                        match store.bus_trim(&name, self.retention, now).await {
                            Ok(0) => {}
                            Ok(n) => {
                                tracing::info!(topic = %name, dropped = n, "retention dropped old events")
                            }
                            Err(e) => tracing::warn!(topic = %name, error = %e, "applying retention failed"),
                        }
                    }
                    Log::Nats(n) => match n.head(&name).await {
                        Ok(head) => {
                            topic.head.send_if_modified(|h| {
                                let grew = head > *h;
                                *h = (*h).max(head);
                                grew
                            });
                        }
                        Err(e) => tracing::warn!(topic = %name, error = %e, "reading the stream head failed"),
                    },
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(topic: &str, id: &str, key: &str) -> v1::Event {
        v1::Event {
            id: id.into(),
            topic: topic.into(),
            key: key.into(),
            data: id.as_bytes().to_vec(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn offsets_are_contiguous_per_topic_duplicates_dropped_and_state_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let bus = Bus::embedded(store, Retention::default()).unwrap();
        let r = bus
            .publish(vec![
                ev("markets", "a", "m1"),
                ev("markets", "b", "m1"),
                ev("audit", "x", "k"),
                ev("markets", "a", "m1"),
            ])
            .await
            .unwrap();
        let got: Vec<(u64, bool)> = r.iter().map(|r| (r.offset, r.duplicate)).collect();
        assert_eq!(got, [(0, false), (1, false), (0, false), (0, true)]);
        let again = bus.publish(vec![ev("markets", "b", "m1"), ev("markets", "c", "m1")]).await.unwrap();
        assert_eq!(
            again.iter().map(|r| (r.offset, r.duplicate)).collect::<Vec<_>>(),
            [(1, true), (2, false)]
        );
        let ids: Vec<String> =
            bus.read("markets", 0, 10).await.unwrap().into_iter().map(|d| d.event.unwrap().id).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert_eq!(bus.read("markets", 2, 10).await.unwrap().len(), 1);
        bus.commit("markets", "g1", 2).await.unwrap();
        let bad = bus.publish(vec![ev("Bad Topic", "z", "")]).await.unwrap_err();
        assert!(bad.to_string().contains("topic"), "{bad}");
        drop(bus);

        let (store, _) = Store::open(dir.path()).unwrap();
        let bus = Bus::embedded(store, Retention::default()).unwrap();
        assert_eq!(*bus.watch("markets").await.unwrap().borrow(), 3, "the head is restored");
        assert_eq!(bus.committed("markets", "g1").await.unwrap(), Some(2));
        let r = bus.publish(vec![ev("markets", "a", "m1"), ev("markets", "d", "m1")]).await.unwrap();
        assert_eq!(
            r.iter().map(|r| (r.offset, r.duplicate)).collect::<Vec<_>>(),
            [(0, true), (3, false)],
            "dedup survives a restart"
        );
    }

    #[tokio::test]
    async fn retention_by_age_drops_events_older_than_the_limit_by_their_time() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let bus = Bus::embedded(store.clone(), Retention::default()).unwrap();
        let hour = 3_600_000;
        let mut old = ev("t", "old", "k");
        old.time_unix_ms = 10 * hour;
        let mut new = ev("t", "new", "k");
        new.time_unix_ms = 12 * hour;
        bus.publish(vec![old, new]).await.unwrap();
        let keep_90_minutes = Retention { max_age: std::time::Duration::from_secs(5400), max_bytes: 0 };
        assert_eq!(store.bus_trim("t", keep_90_minutes, 12 * hour + 1).await.unwrap(), 1);
        let left: Vec<String> =
            bus.read("t", 0, 10).await.unwrap().into_iter().map(|d| d.event.unwrap().id).collect();
        assert_eq!(left, ["new"]);
        // Its id is forgotten with it: the same id is a new event now.
        let again = bus.publish(vec![ev("t", "old", "k")]).await.unwrap();
        assert_eq!((again[0].offset, again[0].duplicate), (2, false));
    }
}
