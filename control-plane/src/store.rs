//! Durable state of the control plane in one redb file (`<data-dir>/control-plane.redb`).
//!
//! Tables hold protobuf-encoded records (a stable, versioned encoding): policies by service,
//! registered instances by `service/id`, and a boot epoch that keeps versions increasing across
//! restarts. Heartbeats are deliberately not stored: a restart gives every instance a fresh TTL.
//!
//! Writes go through one writer thread that commits whatever has queued up in a single
//! transaction with redb's `Immediate` durability (fsync) — group commit — and only then
//! answers each caller. Nothing is acknowledged before it is on disk, and a registration storm
//! costs a few fsyncs instead of one per instance.

use std::{path::Path, sync::Arc, thread::JoinHandle};

use mesh_proto::{
    prost::{self, Message},
    v1,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use crate::{bus::retention::Retention, etcd::Cluster};

const POLICIES: TableDefinition<&str, &[u8]> = TableDefinition::new("policies");
const INSTANCES: TableDefinition<&str, &[u8]> = TableDefinition::new("instances");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Event bus: `topic/offset(20 digits)` → encoded `v1::Event`.
const BUS_EVENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("bus_events");
/// `topic/event id` → offset (big-endian), for deduplication.
const BUS_IDS: TableDefinition<&str, &[u8]> = TableDefinition::new("bus_ids");
/// `topic/group` → committed offset (big-endian): the next offset the group will read.
const BUS_OFFSETS: TableDefinition<&str, &[u8]> = TableDefinition::new("bus_offsets");
/// Event bus: `topic` → next offset (u64 BE), so offsets never repeat after retention empties
/// a topic.
const BUS_HEADS: TableDefinition<&str, &[u8]> = TableDefinition::new("bus_heads");
/// Bootstrap tokens: SHA-256 of the token (hex) → the service it may certify.
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
const EPOCH_KEY: &str = "epoch";
/// redb page cache.
const CACHE_BYTES: usize = 4 * 1024 * 1024;
/// Most writes committed in one transaction.
const MAX_BATCH: usize = 4096;

/// A storage failure: what failed and the underlying cause.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot open the control-plane database {path}: {source} (is another control plane using this --data-dir?)"
    )]
    Open { path: String, source: Box<redb::DatabaseError> },
    #[error("control-plane database {op} failed: {message}")]
    Db { op: &'static str, message: String },
    #[error("control-plane database holds a corrupt {what} record {key:?}: {source}")]
    Corrupt { what: &'static str, key: String, source: prost::DecodeError },
    #[error("the shared store (etcd): {0}")]
    Etcd(#[from] crate::etcd::EtcdError),
}

fn db_err<E: std::fmt::Display>(op: &'static str) -> impl FnOnce(E) -> StoreError {
    move |e| StoreError::Db { op, message: e.to_string() }
}

/// Everything the control plane persisted, as read at start.
#[derive(Debug, Default)]
pub struct Loaded {
    /// This process's boot epoch (incremented and persisted by [`Store::open`]).
    pub epoch: u64,
    pub policies: Vec<v1::VersionedPolicy>,
    pub instances: Vec<v1::Instance>,
}

enum Op {
    Put(TableDefinition<'static, &'static str, &'static [u8]>, String, Vec<u8>),
    Delete(TableDefinition<'static, &'static str, &'static [u8]>, String),
}

/// Operations committed together (in the same transaction as the rest of their batch).
struct Write {
    ops: Vec<Op>,
    done: oneshot::Sender<Result<(), String>>,
}

struct Inner {
    tx: Option<mpsc::UnboundedSender<Write>>,
    writer: Option<JoinHandle<()>>,
    db: Arc<Database>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue ends the writer; joining it releases the file before we return.
        self.tx.take();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

/// Handle to the database; cheap to clone. With `--store etcd` it also holds the link to the
/// shared store, where policies, instances and tokens go instead (see [`crate::etcd`]).
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
    cluster: Option<Arc<Cluster>>,
}

impl Store {
    /// Opens (creating if needed) the database in `dir`, bumps the boot epoch and loads everything.
    pub fn open(dir: &Path) -> Result<(Store, Loaded), StoreError> {
        std::fs::create_dir_all(dir).map_err(db_err("creating the data directory"))?;
        let path = dir.join("control-plane.redb");
        // Everything is read once at start and served from memory, so redb's page cache (1 GiB
        // by default) would only grow with what we write.
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|e| StoreError::Open { path: path.display().to_string(), source: Box::new(e) })?;
        let epoch = {
            let tx = db.begin_write().map_err(db_err("begin"))?;
            let epoch = {
                let mut meta = tx.open_table(META).map_err(db_err("open meta"))?;
                let epoch =
                    meta.get(EPOCH_KEY).map_err(db_err("read epoch"))?.map(|v| v.value()).unwrap_or(0) + 1;
                meta.insert(EPOCH_KEY, epoch).map_err(db_err("write epoch"))?;
                epoch
            };
            tx.open_table(POLICIES).map_err(db_err("open policies"))?;
            tx.open_table(INSTANCES).map_err(db_err("open instances"))?;
            tx.open_table(BUS_EVENTS).map_err(db_err("open bus events"))?;
            tx.open_table(BUS_IDS).map_err(db_err("open bus ids"))?;
            tx.open_table(BUS_OFFSETS).map_err(db_err("open bus offsets"))?;
            tx.open_table(BUS_HEADS).map_err(db_err("open bus heads"))?;
            tx.open_table(TOKENS).map_err(db_err("open tokens"))?;
            tx.commit().map_err(db_err("commit"))?;
            epoch
        };
        let db = Arc::new(db);
        let policies = load_table(&db, POLICIES, "policy")?;
        let instances = load_table(&db, INSTANCES, "instance")?;
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn({
                let db = db.clone();
                move || writer(db, rx)
            })
            .map_err(db_err("starting the writer thread"))?;
        let inner = Inner { tx: Some(tx), writer: Some(writer), db };
        Ok((Store { inner: Arc::new(inner), cluster: None }, Loaded { epoch, policies, instances }))
    }

    /// This store with policies, instances and tokens kept in etcd through `cluster`.
    pub fn shared(self, cluster: Arc<Cluster>) -> Store {
        Store { cluster: Some(cluster), ..self }
    }

    /// The shared store, with `--store etcd`.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    pub async fn put_policy(&self, p: &v1::VersionedPolicy) -> Result<(), StoreError> {
        self.write(Op::Put(POLICIES, p.service.clone(), p.encode_to_vec())).await
    }

    pub async fn put_instance(&self, i: &v1::Instance) -> Result<(), StoreError> {
        self.write(Op::Put(INSTANCES, instance_key(&i.service, &i.id), i.encode_to_vec())).await
    }

    pub async fn delete_instance(&self, service: &str, id: &str) -> Result<(), StoreError> {
        self.write(Op::Delete(INSTANCES, instance_key(service, id))).await
    }

    /// Queues one write and waits until the transaction holding it is durable.
    async fn write(&self, op: Op) -> Result<(), StoreError> {
        self.write_all(vec![op]).await
    }

    /// Queues writes that commit together and waits until they are durable.
    async fn write_all(&self, ops: Vec<Op>) -> Result<(), StoreError> {
        let (done, rx) = oneshot::channel();
        let closed = || StoreError::Db { op: "write", message: "the store is closed".into() };
        self.inner.tx.as_ref().ok_or_else(closed)?.send(Write { ops, done }).map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?.map_err(|message| StoreError::Db { op: "commit", message })
    }
}

fn bus_key(topic: &str, offset: u64) -> String {
    format!("{topic}/{offset:020}")
}

impl Store {
    /// Appends events (offset, id, encoded, time) to `topic` with their ids and the topic's new
    /// head, atomically.
    pub async fn bus_append(
        &self,
        topic: &str,
        entries: Vec<(u64, String, Vec<u8>, u64)>,
        head: u64,
    ) -> Result<(), StoreError> {
        let mut ops = Vec::with_capacity(entries.len() * 2 + 1);
        for (offset, id, bytes, _) in entries {
            ops.push(Op::Put(BUS_EVENTS, bus_key(topic, offset), bytes));
            ops.push(Op::Put(BUS_IDS, format!("{topic}/{id}"), offset.to_be_bytes().to_vec()));
        }
        ops.push(Op::Put(BUS_HEADS, topic.to_string(), head.to_be_bytes().to_vec()));
        self.write_all(ops).await
    }

    /// Drops `topic`'s oldest events (and their dedup ids) while they are older than the
    /// retention age (by event time) or the topic holds more than its byte limit; returns how
    /// many went.
    pub async fn bus_trim(
        &self,
        topic: &str,
        retention: Retention,
        now_ms: u64,
    ) -> Result<usize, StoreError> {
        let rows = self.bus_read(topic, 0, usize::MAX)?;
        let mut total: u64 = rows.iter().map(|(_, b)| b.len() as u64).sum();
        let cutoff = now_ms.saturating_sub(retention.max_age.as_millis() as u64);
        let mut ops = Vec::new();
        for (offset, bytes) in &rows {
            let event = mesh_proto::v1::Event::decode(bytes.as_slice()).unwrap_or_default();
            let too_old = !retention.max_age.is_zero() && event.time_unix_ms < cutoff;
            let too_big = retention.max_bytes > 0 && total > retention.max_bytes;
            if !too_old && !too_big {
                break;
            }
            total -= bytes.len() as u64;
            ops.push(Op::Delete(BUS_EVENTS, bus_key(topic, *offset)));
            ops.push(Op::Delete(BUS_IDS, format!("{topic}/{}", event.id)));
        }
        let dropped = ops.len() / 2;
        if !ops.is_empty() {
            self.write_all(ops).await?;
        }
        Ok(dropped)
    }

    /// Records that `group` has consumed `topic` up to (not including) `next`.
    pub async fn bus_commit(&self, topic: &str, group: &str, next: u64) -> Result<(), StoreError> {
        self.write(Op::Put(BUS_OFFSETS, format!("{topic}/{group}"), next.to_be_bytes().to_vec())).await
    }

    fn get_u64(&self, table: TableDefinition<&str, &[u8]>, key: &str) -> Result<Option<u64>, StoreError> {
        let tx = self.inner.db.begin_read().map_err(db_err("begin read"))?;
        let t = tx.open_table(table).map_err(db_err("open table"))?;
        Ok(t.get(key)
            .map_err(db_err("read"))?
            .and_then(|v| v.value().try_into().ok().map(u64::from_be_bytes)))
    }

    /// The offset an event id was stored at, if it was.
    pub fn bus_lookup(&self, topic: &str, id: &str) -> Result<Option<u64>, StoreError> {
        self.get_u64(BUS_IDS, &format!("{topic}/{id}"))
    }

    /// Stores a bootstrap token's hash for `service`.
    pub async fn token_add(&self, hash: &str, service: &str) -> Result<(), StoreError> {
        if let Some(c) = &self.cluster {
            c.etcd.put(&c.token_key(hash), service.as_bytes().to_vec(), 0).await?;
            c.tokens.insert(hash.to_string(), service.to_string());
            return Ok(());
        }
        self.write(Op::Put(TOKENS, hash.to_string(), service.as_bytes().to_vec())).await
    }

    /// The service a token hash is valid for.
    pub fn token_service(&self, hash: &str) -> Result<Option<String>, StoreError> {
        if let Some(c) = &self.cluster {
            return Ok(c.tokens.get(hash).map(|s| s.clone()));
        }
        let tx = self.inner.db.begin_read().map_err(db_err("begin read"))?;
        let t = tx.open_table(TOKENS).map_err(db_err("open table"))?;
        Ok(t.get(hash).map_err(db_err("read"))?.map(|v| String::from_utf8_lossy(v.value()).into_owned()))
    }

    /// Deletes every token of `service`; returns how many.
    pub async fn tokens_revoke(&self, service: &str) -> Result<usize, StoreError> {
        if let Some(c) = &self.cluster {
            let hashes: Vec<String> =
                c.tokens.iter().filter(|e| e.value() == service).map(|e| e.key().clone()).collect();
            for h in &hashes {
                c.etcd.delete(&c.token_key(h)).await?;
                c.tokens.remove(h);
            }
            return Ok(hashes.len());
        }
        let hashes: Vec<String> = {
            let tx = self.inner.db.begin_read().map_err(db_err("begin read"))?;
            let t = tx.open_table(TOKENS).map_err(db_err("open table"))?;
            let mut out = Vec::new();
            for row in t.iter().map_err(db_err("iterate"))? {
                let (k, v) = row.map_err(db_err("read row"))?;
                if v.value() == service.as_bytes() {
                    out.push(k.value().to_string());
                }
            }
            out
        };
        let n = hashes.len();
        if n > 0 {
            self.write_all(hashes.into_iter().map(|h| Op::Delete(TOKENS, h)).collect()).await?;
        }
        Ok(n)
    }

    pub fn bus_committed(&self, topic: &str, group: &str) -> Result<Option<u64>, StoreError> {
        self.get_u64(BUS_OFFSETS, &format!("{topic}/{group}"))
    }

    /// Up to `limit` events of `topic` from offset `from` on, in order.
    pub fn bus_read(&self, topic: &str, from: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let tx = self.inner.db.begin_read().map_err(db_err("begin read"))?;
        let t = tx.open_table(BUS_EVENTS).map_err(db_err("open table"))?;
        let (lo, hi) = (bus_key(topic, from), bus_key(topic, u64::MAX));
        let mut out = Vec::new();
        for row in t.range(lo.as_str()..=hi.as_str()).map_err(db_err("range"))?.take(limit) {
            let (k, v) = row.map_err(db_err("read row"))?;
            let offset = k.value().rsplit('/').next().and_then(|o| o.parse().ok()).unwrap_or(0);
            out.push((offset, v.value().to_vec()));
        }
        Ok(out)
    }

    /// The next offset of every topic that ever had events.
    pub fn bus_heads(&self) -> Result<std::collections::HashMap<String, u64>, StoreError> {
        let tx = self.inner.db.begin_read().map_err(db_err("begin read"))?;
        let mut heads = std::collections::HashMap::new();
        let h = tx.open_table(BUS_HEADS).map_err(db_err("open table"))?;
        for row in h.iter().map_err(db_err("iterate"))? {
            let (k, v) = row.map_err(db_err("read row"))?;
            if let Ok(b) = <[u8; 8]>::try_from(v.value()) {
                heads.insert(k.value().to_string(), u64::from_be_bytes(b));
            }
        }
        let t = tx.open_table(BUS_EVENTS).map_err(db_err("open table"))?;
        for row in t.iter().map_err(db_err("iterate"))? {
            let (k, _) = row.map_err(db_err("read row"))?;
            if let Some((topic, offset)) = k.value().rsplit_once('/')
                && let Ok(o) = offset.parse::<u64>()
            {
                let h = heads.entry(topic.to_string()).or_insert(0);
                *h = (*h).max(o + 1);
            }
        }
        Ok(heads)
    }
}

/// The writer thread: one transaction per batch of whatever is queued, then every caller hears.
fn writer(db: Arc<Database>, mut rx: mpsc::UnboundedReceiver<Write>) {
    let _span = tracing::info_span!("store_writer").entered();
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        let result = commit(&db, &batch).map_err(|e| {
            tracing::error!(error = %e, writes = batch.len(), "commit failed; writes refused");
            e.to_string()
        });
        for w in batch {
            let _ = w.done.send(result.clone());
        }
    }
}

fn commit(db: &Database, batch: &[Write]) -> Result<(), StoreError> {
    let tx = db.begin_write().map_err(db_err("begin"))?;
    for op in batch.iter().flat_map(|w| &w.ops) {
        match op {
            Op::Put(table, k, v) => {
                tx.open_table(*table)
                    .map_err(db_err("open table"))?
                    .insert(k.as_str(), v.as_slice())
                    .map_err(db_err("insert"))?;
            }
            Op::Delete(table, k) => {
                tx.open_table(*table)
                    .map_err(db_err("open table"))?
                    .remove(k.as_str())
                    .map_err(db_err("remove"))?;
            }
        }
    }
    tx.commit().map_err(db_err("commit"))
}

fn load_table<M: Message + Default>(
    db: &Database,
    table: TableDefinition<&str, &[u8]>,
    what: &'static str,
) -> Result<Vec<M>, StoreError> {
    let tx = db.begin_read().map_err(db_err("begin read"))?;
    let t = tx.open_table(table).map_err(db_err("open table"))?;
    let mut out = Vec::new();
    for row in t.iter().map_err(db_err("iterate"))? {
        let (k, v) = row.map_err(db_err("read row"))?;
        let msg = M::decode(v.value()).map_err(|source| StoreError::Corrupt {
            what,
            key: k.value().to_string(),
            source,
        })?;
        out.push(msg);
    }
    Ok(out)
}

fn instance_key(service: &str, id: &str) -> String {
    format!("{service}/{id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_survive_reopen_and_epoch_increases() {
        let dir = tempfile::tempdir().unwrap();
        let (store, loaded) = Store::open(dir.path()).unwrap();
        assert_eq!(loaded.epoch, 1);
        let inst = v1::Instance {
            service: "svc".into(),
            id: "a".into(),
            address: "127.0.0.1:1".into(),
            ..Default::default()
        };
        store.put_instance(&inst).await.unwrap();
        store.put_instance(&v1::Instance { id: "b".into(), ..inst.clone() }).await.unwrap();
        store.delete_instance("svc", "b").await.unwrap();
        store
            .put_policy(&v1::VersionedPolicy { service: "svc".into(), version: 7, ..Default::default() })
            .await
            .unwrap();
        drop(store);

        let (_, loaded) = Store::open(dir.path()).unwrap();
        assert_eq!(loaded.epoch, 2);
        assert_eq!(loaded.instances, vec![inst]);
        assert_eq!(loaded.policies[0].version, 7);
    }

    #[tokio::test]
    async fn concurrent_writes_are_group_committed_and_all_durable() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let writes = (0..500).map(|n| {
            let store = store.clone();
            async move {
                let i = v1::Instance { service: "svc".into(), id: format!("i{n}"), ..Default::default() };
                store.put_instance(&i).await
            }
        });
        for r in futures::future::join_all(writes).await {
            r.unwrap();
        }
        drop(store);
        let (_, loaded) = Store::open(dir.path()).unwrap();
        assert_eq!(loaded.instances.len(), 500);
    }
}
