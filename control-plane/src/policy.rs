//! The policy store: one validated [`ServicePolicy`] per service, versioned, persisted, and
//! published on a per-service `watch` channel that the `Policy.Stream` handlers follow.
//!
//! A service without a policy runs on the defaults at version 0. `Set` and `Delete` give the
//! service the next version (a delete stores a "defaults" record so versions never go back).

use std::{sync::Arc, time::SystemTime};

use dashmap::DashMap;
use mesh_proto::{names, policy::ServicePolicy, prost::Message, unix_ms, v1};
use tokio::sync::watch;

use crate::store::{Store, StoreError};

/// The policy a service runs on, with its version.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyEntry {
    pub service: String,
    pub version: u64,
    pub policy: Arc<ServicePolicy>,
    pub is_default: bool,
    pub updated_at_unix_ms: u64,
}

impl PolicyEntry {
    fn defaults(service: &str) -> Self {
        Self {
            service: service.to_string(),
            version: 0,
            policy: Arc::default(),
            is_default: true,
            updated_at_unix_ms: 0,
        }
    }

    pub fn to_wire(&self) -> v1::VersionedPolicy {
        v1::VersionedPolicy {
            service: self.service.clone(),
            version: self.version,
            policy: Some(self.policy.as_ref().into()),
            is_default: self.is_default,
            updated_at_unix_ms: self.updated_at_unix_ms,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// What a service name must be (from `names::check_service`).
    #[error("{0}")]
    BadService(String),
    #[error(
        "policy for {service} is at version {current}, not the expected {expected}: get it again and retry"
    )]
    VersionMismatch { service: String, current: u64, expected: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The outcome of a `Set`.
pub struct SetOutcome {
    pub entry: Arc<PolicyEntry>,
    pub changes: Vec<v1::FieldChange>,
    pub applied: bool,
}

pub struct Policies {
    channels: DashMap<String, watch::Sender<Arc<PolicyEntry>>>,
    store: Store,
    /// Serialises writers so versions and disk order agree (policy writes are rare).
    writes: tokio::sync::Mutex<()>,
}

impl Policies {
    /// Restores stored policies. A stored policy that no longer validates is an error: the
    /// operator must know rather than have the mesh silently fall back to defaults.
    pub fn new(store: Store, stored: Vec<v1::VersionedPolicy>) -> Result<Self, StoreError> {
        let channels = DashMap::new();
        for vp in stored {
            let entry = entry_from_wire(vp)?;
            channels.insert(entry.service.clone(), watch::channel(Arc::new(entry)).0);
        }
        Ok(Self { channels, store, writes: tokio::sync::Mutex::new(()) })
    }

    /// Applies a policy another replica wrote (read from the shared store): it takes effect if
    /// it is newer than what this replica has.
    pub fn apply_stored(&self, vp: v1::VersionedPolicy) -> Result<bool, StoreError> {
        let entry = Arc::new(entry_from_wire(vp)?);
        let tx = self
            .channels
            .entry(entry.service.clone())
            .or_insert_with(|| watch::channel(Arc::new(PolicyEntry::defaults(&entry.service))).0)
            .clone();
        Ok(tx.send_if_modified(|cur| {
            if cur.version >= entry.version {
                return false;
            }
            *cur = entry.clone();
            true
        }))
    }

    pub fn current(&self, service: &str) -> Arc<PolicyEntry> {
        match self.channels.get(service) {
            Some(tx) => tx.borrow().clone(),
            None => Arc::new(PolicyEntry::defaults(service)),
        }
    }

    /// The service's policy now and as it changes.
    pub fn watch(&self, service: &str) -> watch::Receiver<Arc<PolicyEntry>> {
        if let Some(tx) = self.channels.get(service) {
            return tx.subscribe();
        }
        self.channels
            .entry(service.to_string())
            .or_insert_with(|| watch::channel(Arc::new(PolicyEntry::defaults(service))).0)
            .subscribe()
    }

    /// Forgets `service`'s channel if it only ever held the defaults (version 0) and nobody
    /// watches it any more: a watch of a name nobody configured leaves nothing behind. A policy
    /// that was ever set or deleted keeps its channel, so its version never goes back.
    pub fn release(&self, service: &str) {
        self.channels.remove_if(service, |_, tx| tx.receiver_count() == 0 && tx.borrow().version == 0);
    }

    /// Channels held (set policies and watched names).
    pub fn tracked(&self) -> usize {
        self.channels.len()
    }

    /// Explicitly set policies (not defaults), sorted by service.
    pub fn list(&self) -> Vec<Arc<PolicyEntry>> {
        let mut out: Vec<_> =
            self.channels.iter().map(|e| e.value().borrow().clone()).filter(|p| !p.is_default).collect();
        out.sort_by(|a, b| a.service.cmp(&b.service));
        out
    }

    /// Stores `policy` (already validated) as the service's next version, unless `dry_run`.
    pub async fn set(
        &self,
        service: &str,
        policy: ServicePolicy,
        expected_version: Option<u64>,
        dry_run: bool,
    ) -> Result<SetOutcome, PolicyError> {
        check_service(service)?;
        let _w = self.writes.lock().await;
        let cur = self.current(service);
        // With a shared store this replica's view may lag: etcd's transaction decides.
        if let Some(expected) =
            expected_version.filter(|e| *e != cur.version && self.store.cluster().is_none())
        {
            return Err(PolicyError::VersionMismatch {
                service: service.into(),
                current: cur.version,
                expected,
            });
        }
        let changes = cur.policy.changes(&policy);
        let next = Arc::new(PolicyEntry {
            service: service.to_string(),
            version: cur.version + 1,
            policy: Arc::new(policy),
            is_default: false,
            updated_at_unix_ms: unix_ms(SystemTime::now()),
        });
        if dry_run {
            return Ok(SetOutcome { entry: next, changes, applied: false });
        }
        let next = self.commit(next, expected_version).await?;
        tracing::info!(%service, version = next.version, changes = changes.len(), "policy set");
        Ok(SetOutcome { entry: next, changes, applied: true })
    }

    /// Reverts the service to the defaults at the next version. `None` if it had no policy.
    pub async fn delete(&self, service: &str) -> Result<Option<u64>, PolicyError> {
        check_service(service)?;
        let _w = self.writes.lock().await;
        let cur = self.current(service);
        if cur.is_default {
            return Ok(None);
        }
        let next = Arc::new(PolicyEntry {
            version: cur.version + 1,
            updated_at_unix_ms: unix_ms(SystemTime::now()),
            ..PolicyEntry::defaults(service)
        });
        let next = self.commit(next, None).await?;
        tracing::info!(%service, version = next.version, "policy deleted: service back on defaults");
        Ok(Some(next.version))
    }

    /// Makes `entry` durable and current. With a shared store etcd decides the version: the
    /// key's own version there (1 on the first write, one more on each), so versions read the same
    /// as with the embedded store and only grow, whichever replica wrote; `expected` (a version
    /// the caller saw) is compared inside etcd's transaction.
    async fn commit(
        &self,
        mut entry: Arc<PolicyEntry>,
        expected: Option<u64>,
    ) -> Result<Arc<PolicyEntry>, PolicyError> {
        if let Some(c) = self.store.cluster() {
            let key = c.policy_key(&entry.service);
            let value = entry.to_wire().encode_to_vec();
            let version = match expected {
                None => c.etcd.put_versioned(&key, value).await.map_err(StoreError::from)? + 1,
                Some(e) => match c.etcd.put_if(&key, value, e as i64).await.map_err(StoreError::from)? {
                    Some(_) => e as i64 + 1,
                    None => {
                        let current = c
                            .etcd
                            .get(&key)
                            .await
                            .map_err(StoreError::from)?
                            .map_or(0, |kv| kv.version as u64);
                        return Err(PolicyError::VersionMismatch {
                            service: entry.service.clone(),
                            current,
                            expected: e,
                        });
                    }
                },
            };
            entry = Arc::new(PolicyEntry { version: version as u64, ..(*entry).clone() });
            self.apply_stored(entry.to_wire())?;
            return Ok(entry);
        }
        self.store.put_policy(&entry.to_wire()).await?;
        let service = entry.service.clone();
        match self.channels.get(&service) {
            Some(tx) => {
                tx.send_replace(entry.clone());
            }
            None => {
                self.channels
                    .entry(service)
                    .or_insert_with(|| watch::channel(entry.clone()).0)
                    .send_replace(entry.clone());
            }
        }
        Ok(entry)
    }
}

/// A stored policy as an entry. A stored policy that no longer validates is an error: the
/// operator must know rather than have the mesh silently fall back to defaults.
fn entry_from_wire(vp: v1::VersionedPolicy) -> Result<PolicyEntry, StoreError> {
    let policy =
        ServicePolicy::try_from(vp.policy.clone().unwrap_or_default()).map_err(|e| StoreError::Db {
            op: "restoring policies",
            message: format!("stored policy of {} is invalid: {e}", vp.service),
        })?;
    Ok(PolicyEntry {
        service: vp.service,
        version: vp.version,
        policy: Arc::new(policy),
        is_default: vp.is_default,
        updated_at_unix_ms: vp.updated_at_unix_ms,
    })
}

fn check_service(service: &str) -> Result<(), PolicyError> {
    names::check_service(service).map_err(PolicyError::BadService)
}

#[cfg(test)]
mod tests {
    use mesh_proto::policy::Algorithm;

    use super::*;

    fn open() -> (tempfile::TempDir, Policies) {
        let dir = tempfile::tempdir().unwrap();
        let (store, loaded) = Store::open(dir.path()).unwrap();
        (dir, Policies::new(store, loaded.policies).unwrap())
    }

    /// Issue #15.2: a channel made by a watch of a name nobody configured goes when the watch
    /// does; one that was ever set stays (its version must never go back).
    #[tokio::test]
    async fn watched_defaults_are_released_and_set_policies_are_kept() {
        let (_dir, p) = open();
        let base = p.tracked();
        let rx = p.watch("ghost");
        p.release("ghost");
        assert_eq!(p.tracked(), base + 1, "still watched");
        drop(rx);
        p.release("ghost");
        assert_eq!(p.tracked(), base, "released");
        p.set("real", ServicePolicy::default(), None, false).await.unwrap();
        let rx = p.watch("real");
        drop(rx);
        p.release("real");
        assert_eq!(p.tracked(), base + 1, "a set policy keeps its channel");
    }

    #[tokio::test]
    async fn versions_increase_through_set_and_delete_and_survive_restart() {
        let (dir, p) = open();
        assert_eq!(p.current("svc").version, 0);
        let mut rx = p.watch("svc");
        let mut pol = ServicePolicy::default();
        pol.load_balancer.algorithm = Algorithm::RoundRobin;
        let out = p.set("svc", pol.clone(), Some(0), false).await.unwrap();
        assert_eq!((out.entry.version, out.applied), (1, true));
        assert_eq!(out.changes.len(), 1);
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().version, 1);

        // Dry run changes nothing.
        let mut other = pol.clone();
        other.retry.max_attempts = 1;
        let dry = p.set("svc", other, None, true).await.unwrap();
        assert_eq!((dry.entry.version, dry.applied), (2, false));
        assert_eq!(p.current("svc").version, 1);
        assert!(!rx.has_changed().unwrap());

        // Compare-and-set.
        let err = p.set("svc", pol.clone(), Some(0), false).await.err().unwrap();
        assert!(matches!(err, PolicyError::VersionMismatch { current: 1, .. }), "{err}");

        assert_eq!(p.delete("svc").await.unwrap(), Some(2));
        assert_eq!(p.delete("svc").await.unwrap(), None);
        assert!(p.list().is_empty());
        p.set("svc", pol.clone(), None, false).await.unwrap();
        drop(p);

        let (store, loaded) = Store::open(dir.path()).unwrap();
        let p = Policies::new(store, loaded.policies).unwrap();
        let cur = p.current("svc");
        assert_eq!((cur.version, cur.policy.as_ref()), (3, &pol));
    }
}
