//! The embedded event bus: a durable, append-only log per topic in the control plane's redb
//! file, deduplicated by event id, read by offset, consumed by groups with committed offsets.
//!
//! Publishing to a topic is serialised per topic: each event either already exists (same id:
//! a duplicate, answered with its original offset) or gets the next offset; the new events and
//! their ids commit in one transaction (fsync) before the publisher hears back. Subscribers
//! follow a `watch` of the topic's head offset. Delivery is at-least-once: a group resumes from
//! its last committed offset.
//!
//! Not yet here (event forwarding milestone): retention by age and size, replay from a time
//! index (replay from a time scans), NATS JetStream as the alternative backend.

use std::{collections::HashMap, sync::Arc};

use dashmap::DashMap;
use mesh_proto::{names, prost::Message, v1};
use tokio::sync::{Mutex, watch};

use crate::store::{Store, StoreError};

/// Largest event accepted (data plus attributes).
pub const MAX_EVENT_BYTES: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("event {index}: {reason}")]
    Invalid { index: usize, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

struct Topic {
    /// Serialises offset assignment and dedup for this topic.
    append: Mutex<()>,
    /// The next offset (the number of events so far).
    head: watch::Sender<u64>,
}

pub struct Bus {
    store: Store,
    topics: DashMap<String, Arc<Topic>>,
}

impl Bus {
    pub fn new(store: Store) -> Result<Self, StoreError> {
        let topics = DashMap::new();
        for (name, head) in store.bus_heads()? {
            topics.insert(name, Arc::new(Topic { append: Mutex::new(()), head: watch::channel(head).0 }));
        }
        Ok(Bus { store, topics })
    }

    fn topic(&self, name: &str) -> Arc<Topic> {
        self.topics
            .entry(name.to_string())
            .or_insert_with(|| Arc::new(Topic { append: Mutex::new(()), head: watch::channel(0).0 }))
            .clone()
    }

    /// Appends `events` (each to its own topic, in order per topic); durable before it returns.
    pub async fn publish(&self, events: Vec<v1::Event>) -> Result<Vec<v1::PublishResult>, BusError> {
        for (index, e) in events.iter().enumerate() {
            let bad = |reason: String| Err(BusError::Invalid { index, reason });
            if !names::is_topic(&e.topic) {
                return bad(format!("topic {:?}: 1..=128 characters of a-z, 0-9, '.', '_' and '-'", e.topic));
            }
            if e.id.is_empty() || e.id.len() > 200 {
                return bad("id: 1..=200 characters, unique per topic (duplicates are dropped)".into());
            }
            if e.encoded_len() > MAX_EVENT_BYTES {
                return bad(format!("larger than {MAX_EVENT_BYTES} bytes"));
            }
        }
        let mut results: Vec<Option<v1::PublishResult>> = vec![None; events.len()];
        let mut by_topic: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, e) in events.iter().enumerate() {
            by_topic.entry(e.topic.as_str()).or_default().push(i);
        }
        for (name, indexes) in by_topic {
            let topic = self.topic(name);
            let _serial = topic.append.lock().await;
            let mut next = *topic.head.borrow();
            let mut fresh: HashMap<&str, u64> = HashMap::new();
            let mut entries = Vec::new();
            for i in indexes {
                let e = &events[i];
                let existing = match fresh.get(e.id.as_str()) {
                    Some(o) => Some(*o),
                    None => self.store.bus_lookup(name, &e.id)?,
                };
                results[i] = Some(match existing {
                    Some(offset) => v1::PublishResult { id: e.id.clone(), offset, duplicate: true },
                    None => {
                        fresh.insert(e.id.as_str(), next);
                        entries.push((next, e.id.clone(), e.encode_to_vec()));
                        next += 1;
                        v1::PublishResult { id: e.id.clone(), offset: next - 1, duplicate: false }
                    }
                });
            }
            if !entries.is_empty() {
                self.store.bus_append(name, entries).await?;
                topic.head.send_replace(next);
            }
        }
        Ok(results.into_iter().flatten().collect())
    }

    /// Up to `limit` deliveries of `topic` from `from` on.
    pub fn read(&self, topic: &str, from: u64, limit: usize) -> Result<Vec<v1::Delivery>, StoreError> {
        let rows = self.store.bus_read(topic, from, limit)?;
        Ok(rows
            .into_iter()
            .filter_map(|(offset, bytes)| {
                v1::Event::decode(bytes.as_slice())
                    .ok()
                    .map(|event| v1::Delivery { event: Some(event), offset })
            })
            .collect())
    }

    /// The topic's head (next offset), now and as it grows.
    pub fn watch(&self, topic: &str) -> watch::Receiver<u64> {
        self.topic(topic).head.subscribe()
    }

    pub fn committed(&self, topic: &str, group: &str) -> Result<u64, StoreError> {
        Ok(self.store.bus_committed(topic, group)?.unwrap_or(0))
    }

    /// Durably records that `group` consumed `topic` below `next`.
    pub async fn commit(&self, topic: &str, group: &str, next: u64) -> Result<(), StoreError> {
        self.store.bus_commit(topic, group, next).await
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
        let bus = Bus::new(store).unwrap();
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
            bus.read("markets", 0, 10).unwrap().into_iter().map(|d| d.event.unwrap().id).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert_eq!(bus.read("markets", 2, 10).unwrap().len(), 1);
        bus.commit("markets", "g1", 2).await.unwrap();
        let bad = bus.publish(vec![ev("Bad Topic", "z", "")]).await.unwrap_err();
        assert!(bad.to_string().contains("topic"), "{bad}");
        drop(bus);

        let (store, _) = Store::open(dir.path()).unwrap();
        let bus = Bus::new(store).unwrap();
        assert_eq!(*bus.watch("markets").borrow(), 3, "the head is restored");
        assert_eq!(bus.committed("markets", "g1").unwrap(), 2);
        let r = bus.publish(vec![ev("markets", "a", "m1"), ev("markets", "d", "m1")]).await.unwrap();
        assert_eq!(
            r.iter().map(|r| (r.offset, r.duplicate)).collect::<Vec<_>>(),
            [(0, true), (3, false)],
            "dedup survives a restart"
        );
    }
}
