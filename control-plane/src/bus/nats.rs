//! The event bus on NATS JetStream (`--bus nats --nats-url …`), for scale.
//!
//! - One file-backed stream per topic, `MESH_EV_<topic>` capturing `mesh.ev.<topic>`, with the
//!   bus's retention as `max_age` / `max_bytes` and a duplicate window of [`DEDUP_WINDOW`].
//!   An event's offset is its stream sequence − 1, so offsets are contiguous per topic like the
//!   embedded log's.
//! - Dedup through the message id: each event is published with `Nats-Msg-Id` = its id; the
//!   server answers a duplicate with the original's sequence.
//! - Group offsets: the `MESH_BUS_OFFSETS` stream keeps the last message per subject
//!   `mesh.offsets.<topic>.<group>` (8 bytes, big-endian). Debian's nats-server 2.9 has streams
//!   and consumers but no working key-value buckets, so this is the bucket, by hand.
//!
//! Topic and group names may contain `.` and `_`; in stream names and subject tokens they are
//! escaped (`_` → `_u`, `.` → `_d`) so distinct names never collide.

use crate::bus::{error::BusError, retention::Retention};

use async_nats::jetstream::{
    self,
    message::PublishMessage,
    stream::{self, LastRawMessageErrorKind, StorageType},
};
use bytes::Bytes;
use dashmap::DashMap;
use mesh_proto::{prost::Message, v1};
use std::time::Duration;

/// How long JetStream remembers message ids for dedup.
pub const DEDUP_WINDOW: Duration = Duration::from_secs(3600);

const OFFSETS_STREAM: &str = "MESH_BUS_OFFSETS";

fn nats_err(what: &str) -> impl FnOnce(String) -> BusError + '_ {
    move |e| BusError::Nats(format!("{what}: {e}"))
}

/// `_` → `_u`, `.` → `_d`: an injective map into names without dots.
fn escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for c in name.chars() {
        match c {
            '_' => out.push_str("_u"),
            '.' => out.push_str("_d"),
            c => out.push(c),
        }
    }
    out
}

fn stream_name(topic: &str) -> String {
    format!("MESH_EV_{}", escape(topic))
}

fn subject(topic: &str) -> String {
    format!("mesh.ev.{}", escape(topic))
}

pub struct NatsLog {
    js: jetstream::Context,
    retention: Retention,
    /// Streams known to exist.
    streams: DashMap<String, stream::Stream>,
    offsets: stream::Stream,
}

impl NatsLog {
    pub async fn connect(url: &str, retention: Retention) -> Result<Self, BusError> {
        let client = async_nats::ConnectOptions::new()
            .name("mesh-control-plane")
            .connection_timeout(Duration::from_secs(5))
            .connect(url)
            .await
            .map_err(|e| {
                BusError::Nats(format!("cannot connect to {url}: {e} (is nats-server -js running?)"))
            })?;
        let js = jetstream::new(client);
        let offsets = js
            .get_or_create_stream(stream::Config {
                name: OFFSETS_STREAM.into(),
                subjects: vec!["mesh.offsets.>".into()],
                max_messages_per_subject: 1,
                storage: StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| nats_err("creating the offsets stream")(e.to_string()))?;
        Ok(NatsLog { js, retention, streams: DashMap::new(), offsets })
    }

    /// The topic's stream, created on first use when `create`.
    async fn stream(&self, topic: &str, create: bool) -> Result<Option<stream::Stream>, BusError> {
        if let Some(s) = self.streams.get(topic) {
            return Ok(Some(s.clone()));
        }
        let name = stream_name(topic);
        let found = if create {
            let config = stream::Config {
                name: name.clone(),
                subjects: vec![subject(topic)],
                max_age: self.retention.max_age,
                max_bytes: if self.retention.max_bytes == 0 { -1 } else { self.retention.max_bytes as i64 },
                duplicate_window: DEDUP_WINDOW,
                storage: StorageType::File,
                ..Default::default()
            };
            Some(
                self.js
                    .get_or_create_stream(config)
                    .await
                    .map_err(|e| nats_err("creating a stream")(e.to_string()))?,
            )
        } else {
            match self.js.get_stream(&name).await {
                Ok(s) => Some(s),
                Err(e)
                    if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
                        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
                {
                    None
                }
                Err(e) => return Err(nats_err("looking up a stream")(e.to_string())),
            }
        };
        if let Some(s) = &found {
            self.streams.insert(topic.to_string(), s.clone());
        }
        Ok(found)
    }

    /// The topic's next offset (0 before its first event).
    pub async fn head(&self, topic: &str) -> Result<u64, BusError> {
        let Some(s) = self.stream(topic, false).await? else { return Ok(0) };
        let info = s.get_info().await.map_err(|e| nats_err("reading stream info")(e.to_string()))?;
        Ok(info.state.last_sequence)
    }

    /// Publishes `batch` in order (pipelined, acknowledged in order); results and the new head.
    pub async fn publish(
        &self,
        topic: &str,
        batch: &[&v1::Event],
    ) -> Result<(Vec<v1::PublishResult>, u64), BusError> {
        self.stream(topic, true).await?;
        let subject = subject(topic);
        let mut pending = Vec::with_capacity(batch.len());
        for e in batch {
            let msg =
                PublishMessage::build().payload(Bytes::from(e.encode_to_vec())).message_id(e.id.as_str());
            let ack = self
                .js
                .send_publish(subject.clone(), msg)
                .await
                .map_err(|e| nats_err("publishing")(e.to_string()))?;
            pending.push((e.id.clone(), ack));
        }
        let mut results = Vec::with_capacity(batch.len());
        let mut head = 0;
        for (id, ack) in pending {
            let ack = ack.await.map_err(|e| nats_err("waiting for the publish ack")(e.to_string()))?;
            head = head.max(ack.sequence);
            results.push(v1::PublishResult {
                id,
                offset: ack.sequence.saturating_sub(1),
                duplicate: ack.duplicate,
            });
        }
        Ok((results, head))
    }

    /// Up to `limit` events from offset `from` on.
    pub async fn read(&self, topic: &str, from: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, BusError> {
        let Some(s) = self.stream(topic, false).await? else { return Ok(Vec::new()) };
        let info = s.get_info().await.map_err(|e| nats_err("reading stream info")(e.to_string()))?;
        let (first, last) = (info.state.first_sequence.max(1), info.state.last_sequence);
        let mut out = Vec::new();
        let mut seq = (from + 1).max(first);
        while seq <= last && out.len() < limit {
            match s.get_raw_message(seq).await {
                Ok(m) => out.push((seq - 1, m.payload.to_vec())),
                // Dropped by retention since the info was read.
                Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {}
                Err(e) => return Err(nats_err("reading an event")(e.to_string())),
            }
            seq += 1;
        }
        Ok(out)
    }

    fn offset_subject(topic: &str, group: &str) -> String {
        format!("mesh.offsets.{}.{}", escape(topic), escape(group))
    }

    pub async fn committed(&self, topic: &str, group: &str) -> Result<Option<u64>, BusError> {
        match self.offsets.get_last_raw_message_by_subject(&Self::offset_subject(topic, group)).await {
            Ok(m) => Ok(<[u8; 8]>::try_from(m.payload.as_ref()).ok().map(u64::from_be_bytes)),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(nats_err("reading a group offset")(e.to_string())),
        }
    }

    pub async fn commit(&self, topic: &str, group: &str, next: u64) -> Result<(), BusError> {
        let ack = self
            .js
            .publish(Self::offset_subject(topic, group), Bytes::copy_from_slice(&next.to_be_bytes()))
            .await
            .map_err(|e| nats_err("committing a group offset")(e.to_string()))?;
        ack.await.map_err(|e| nats_err("committing a group offset")(e.to_string()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_is_injective_and_dot_free() {
        let names = ["a.b", "a_b", "a_db", "a__b", "a._b", "a_.b", "ab"];
        let escaped: std::collections::HashSet<String> = names.iter().map(|n| escape(n)).collect();
        assert_eq!(escaped.len(), names.len());
        assert!(escaped.iter().all(|e| !e.contains('.')));
        assert_eq!(stream_name("markets.v1"), "MESH_EV_markets_dv1");
    }
}
