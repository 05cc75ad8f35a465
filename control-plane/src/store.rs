//! Durable state of the control plane in one redb file (`<data-dir>/control-plane.redb`).
//!
//! Tables hold protobuf-encoded records (a stable, versioned encoding): policies by service,
//! registered instances by `service/id`, and a boot epoch that keeps versions increasing across
//! restarts. Every write is its own transaction committed with redb's default `Immediate`
//! durability (fsync) before the caller acknowledges anything. Writes run on the blocking pool.
//! Heartbeats are deliberately not stored: a restart gives every instance a fresh TTL instead.

use std::{path::Path, sync::Arc};

use mesh_proto::prost::{self, Message};
use mesh_proto::v1;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

const POLICIES: TableDefinition<&str, &[u8]> = TableDefinition::new("policies");
const INSTANCES: TableDefinition<&str, &[u8]> = TableDefinition::new("instances");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const EPOCH_KEY: &str = "epoch";

/// A storage failure: what failed and the underlying cause.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot open the control-plane database {path}: {source} (is another control plane using this --data-dir?)"
    )]
    Open { path: String, source: Box<redb::DatabaseError> },
    #[error("control-plane database {op} failed: {source}")]
    Db { op: &'static str, source: Box<dyn std::error::Error + Send + Sync> },
    #[error("control-plane database holds a corrupt {what} record {key:?}: {source}")]
    Corrupt { what: &'static str, key: String, source: prost::DecodeError },
}

fn db_err<E: std::error::Error + Send + Sync + 'static>(op: &'static str) -> impl FnOnce(E) -> StoreError {
    move |e| StoreError::Db { op, source: Box::new(e) }
}

/// Everything the control plane persisted, as read at start.
#[derive(Debug, Default)]
pub struct Loaded {
    /// This process's boot epoch (incremented and persisted by [`Store::open`]).
    pub epoch: u64,
    pub policies: Vec<v1::VersionedPolicy>,
    pub instances: Vec<v1::Instance>,
}

/// Handle to the database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
}

impl Store {
    /// Opens (creating if needed) the database in `dir`, bumps the boot epoch and loads everything.
    pub fn open(dir: &Path) -> Result<(Store, Loaded), StoreError> {
        std::fs::create_dir_all(dir).map_err(db_err("creating the data directory"))?;
        let path = dir.join("control-plane.redb");
        let db = Database::create(&path)
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
            tx.commit().map_err(db_err("commit"))?;
            epoch
        };
        let store = Store { db: Arc::new(db) };
        let policies = store.load_table(POLICIES, "policy")?;
        let instances = store.load_table(INSTANCES, "instance")?;
        Ok((store, Loaded { epoch, policies, instances }))
    }

    fn load_table<M: Message + Default>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        what: &'static str,
    ) -> Result<Vec<M>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err("begin read"))?;
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

    pub async fn put_policy(&self, p: &v1::VersionedPolicy) -> Result<(), StoreError> {
        self.put(POLICIES, p.service.clone(), p.encode_to_vec()).await
    }

    pub async fn put_instance(&self, i: &v1::Instance) -> Result<(), StoreError> {
        self.put(INSTANCES, instance_key(&i.service, &i.id), i.encode_to_vec()).await
    }

    pub async fn delete_instance(&self, service: &str, id: &str) -> Result<(), StoreError> {
        let db = self.db.clone();
        let key = instance_key(service, id);
        blocking(move || {
            let tx = db.begin_write().map_err(db_err("begin"))?;
            tx.open_table(INSTANCES)
                .map_err(db_err("open instances"))?
                .remove(key.as_str())
                .map_err(db_err("remove"))?;
            tx.commit().map_err(db_err("commit"))
        })
        .await
    }

    async fn put(
        &self,
        table: TableDefinition<'static, &'static str, &'static [u8]>,
        key: String,
        value: Vec<u8>,
    ) -> Result<(), StoreError> {
        let db = self.db.clone();
        blocking(move || {
            let tx = db.begin_write().map_err(db_err("begin"))?;
            tx.open_table(table)
                .map_err(db_err("open table"))?
                .insert(key.as_str(), value.as_slice())
                .map_err(db_err("insert"))?;
            tx.commit().map_err(db_err("commit"))
        })
        .await
    }
}

fn instance_key(service: &str, id: &str) -> String {
    format!("{service}/{id}")
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f).await.map_err(db_err("blocking task"))?
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
}
