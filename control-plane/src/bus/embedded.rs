//! The embedded log: events in the control plane's redb file, deduplicated by id.

use crate::{bus::error::BusError, store::Store};

use mesh_proto::{prost::Message, v1};
use std::collections::HashMap;

/// Appends to the embedded log: dedup against stored ids, next offsets from `head`.
pub(crate) async fn append_embedded(
    store: &Store,
    topic: &str,
    head: u64,
    batch: &[&v1::Event],
) -> Result<(Vec<v1::PublishResult>, u64), BusError> {
    let mut next = head;
    let mut fresh: HashMap<&str, u64> = HashMap::new();
    let mut entries = Vec::new();
    let mut results = Vec::with_capacity(batch.len());
    for e in batch {
        let existing = match fresh.get(e.id.as_str()) {
            Some(o) => Some(*o),
            None => store.bus_lookup(topic, &e.id)?,
        };
        results.push(match existing {
            Some(offset) => v1::PublishResult { id: e.id.clone(), offset, duplicate: true },
            None => {
                fresh.insert(e.id.as_str(), next);
                entries.push((next, e.id.clone(), e.encode_to_vec(), e.time_unix_ms));
                next += 1;
                v1::PublishResult { id: e.id.clone(), offset: next - 1, duplicate: false }
            }
        });
    }
    if !entries.is_empty() {
        store.bus_append(topic, entries, next).await?;
    }
    Ok((results, next))
}
