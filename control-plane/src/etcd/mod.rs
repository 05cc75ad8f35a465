//! `--store etcd`: several control-plane replicas share one etcd cluster.
//!
//! What lives in etcd, under the prefix (`/mesh` by default):
//!
//! | key | value | written by |
//! |---|---|---|
//! | `policies/<service>` | `VersionedPolicy` (protobuf); its version is the key's version in etcd (1, 2, 3… as with the embedded store) | `Set` (a compare-and-set transaction when a version is expected), `Delete` |
//! | `tokens/<sha256>` | the service the bootstrap token certifies | `meshctl identity token` |
//! | `instances/<service>/<id>` | `Instance` (protobuf) with its health: healthy, unhealthy or expired | registration, health changes, the sweeper |
//! | `heartbeats/<replica>` | the heartbeats a replica heard since its last flush (JSON), under its lease | every replica, once per flush interval |
//! | `edges/<replica>` | the edge reports its proxies sent since its last flush (protobuf), under its lease | every replica, when it received some |
//! | `proxies/<replica>/<n>` | the proxies connected to a replica and their ACKs (protobuf), in chunks of at most [`PROXY_CHUNK_BYTES`], under its lease | every replica, the chunks that changed |
//! | `ca/root` | the mesh root certificate and its key, sealed with the key file every replica has | the first replica to start |
//! | `sweeper` (election) | the replica that expires and deregisters instances | etcd's election API, under the replica's lease |
//!
//! Every replica follows these prefixes (a snapshot, then a watch that resumes at the next
//! revision) and applies what any replica wrote to its own registry and policies, which feed its
//! discovery and policy streams as in the embedded store.
//!
//! Heartbeats stay cheap: a sidecar's heartbeat changes memory only; each replica writes one key
//! per flush interval holding every heartbeat it heard since the previous one (one etcd write
//! per replica per interval, whatever the number of instances), stamped with when it was taken,
//! and every replica folds them into its instances' last-heartbeat times. Only a change of
//! health is written at once. The elected sweeper judges heartbeats only up to its *horizon*:
//! the oldest stamp among the live replicas' batches (a replica's heartbeats are known only up to
//! its last stamp). An instance expires once it was silent for longer than its TTL before the
//! horizon, so the TTL stays a lower bound even when a replica's writes are late, etcd has lost
//! its quorum, or the sweeper cannot hear etcd: the horizon stops, and so does expiry. Instance
//! keys carry no lease, so a replica's death expires nothing: its sidecars reconnect to another
//! replica, whose flushes carry their heartbeats from then on; the dead replica's stamp stops
//! counting once its lease is gone (at most [`LEASE_TTL`] after it died).

pub mod client;
pub(crate) mod seal;
pub(crate) mod sync;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
    time::{Duration, SystemTime},
};

use dashmap::DashMap;
use mesh_proto::v1;
use tokio_util::sync::CancellationToken;

pub use client::{Etcd, EtcdError, EtcdOptions, Update};

/// How often a replica writes the heartbeats it heard.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(500);
/// What the sweeper adds to every TTL, for clocks that differ between replicas' hosts.
pub const TTL_MARGIN: Duration = Duration::from_millis(500);

/// One replica's heartbeat batch as it lies in etcd.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Batch {
    /// When it was taken (unix ms): every heartbeat this replica heard before is in this batch
    /// or an earlier one.
    pub at: u64,
    /// `service/id` → when heard (unix ms).
    pub heard: HashMap<String, u64>,
}
/// Edge deltas a replica holds for the others between flushes.
const MAX_RELAYED: usize = 50_000;
/// How much of etcd's history the elected replica keeps (it compacts what is older).
pub const COMPACT_EVERY: Duration = Duration::from_secs(300);
/// The most one etcd value of a replica's proxy list holds: well under etcd's request limit
/// (1.5 MiB by default), so a replica with 100,000 proxies writes about eight values, and a
/// change rewrites only the chunks it touched.
pub const PROXY_CHUNK_BYTES: usize = 1 << 20;
/// The replica's lease (its heartbeat batches and its election key go with it).
pub const LEASE_TTL: Duration = Duration::from_secs(10);

/// One replica's link to the shared store.
pub struct Cluster {
    pub etcd: Etcd,
    prefix: String,
    /// This replica's name (in its heartbeat key and as the sweeper's value).
    pub replica: String,
    lease: AtomicI64,
    /// Whether this replica is the elected sweeper now.
    sweeper: AtomicBool,
    /// Bootstrap-token hashes → service, followed from etcd.
    pub(crate) tokens: DashMap<String, String>,
    /// Heartbeats heard since the last flush: `service/id` → unix ms.
    heard: Mutex<HashMap<String, u64>>,
    /// The proxies connected to each replica, as it last wrote them: `<replica>/<chunk>` → list.
    pub(crate) proxies: DashMap<String, Vec<v1::ProxyStatus>>,
    /// Edge reports from this replica's proxies since the last flush, for the others.
    edges: Mutex<Vec<v1::EdgeDelta>>,
}

impl Cluster {
    pub async fn connect(
        opts: EtcdOptions,
        prefix: &str,
        replica: String,
    ) -> Result<Arc<Cluster>, EtcdError> {
        let etcd = Etcd::connect(opts).await?;
        let version = etcd.status().await?;
        let lease = etcd.grant(LEASE_TTL).await?;
        tracing::info!(%replica, etcd = %version, lease, "joined the etcd cluster");
        Ok(Arc::new(Cluster {
            etcd,
            prefix: prefix.trim_end_matches('/').to_string(),
            replica,
            lease: AtomicI64::new(lease),
            sweeper: AtomicBool::new(false),
            tokens: DashMap::new(),
            heard: Mutex::new(HashMap::new()),
            proxies: DashMap::new(),
            edges: Mutex::new(Vec::new()),
        }))
    }

    pub fn key(&self, rest: &str) -> String {
        format!("{}/{rest}", self.prefix)
    }

    pub fn policy_key(&self, service: &str) -> String {
        self.key(&format!("policies/{service}"))
    }

    pub fn instance_key(&self, service: &str, id: &str) -> String {
        self.key(&format!("instances/{service}/{id}"))
    }

    pub fn token_key(&self, hash: &str) -> String {
        self.key(&format!("tokens/{hash}"))
    }

    /// Whether this replica is the elected sweeper.
    pub fn is_sweeper(&self) -> bool {
        self.sweeper.load(Ordering::Relaxed)
    }

    pub fn lease(&self) -> i64 {
        self.lease.load(Ordering::Relaxed)
    }

    /// Notes a heartbeat for the next flush.
    pub fn heard(&self, service: &str, id: &str) {
        let now = mesh_proto::unix_ms(SystemTime::now());
        self.heard.lock().unwrap_or_else(|p| p.into_inner()).insert(format!("{service}/{id}"), now);
    }

    /// Writes the heartbeats heard since the last flush as this replica's batch, stamped with
    /// when it was taken (also when empty: the stamp says this replica's heartbeats are known up
    /// to then). How many, and the revision written at.
    async fn flush(&self) -> Result<(usize, i64), EtcdError> {
        let batch = std::mem::take(&mut *self.heard.lock().unwrap_or_else(|p| p.into_inner()));
        let n = batch.len();
        let at = mesh_proto::unix_ms(SystemTime::now());
        let value = serde_json::to_vec(&Batch { at, heard: batch.clone() }).unwrap_or_default();
        let key = self.key(&format!("heartbeats/{}", self.replica));
        match self.etcd.put(&key, value, self.lease()).await {
            Ok(rev) => Ok((n, rev)),
            Err(e) => {
                // Written with the next flush: put back what is not newer already.
                let mut heard = self.heard.lock().unwrap_or_else(|p| p.into_inner());
                for (k, t) in batch {
                    heard.entry(k).or_insert(t);
                }
                Err(e)
            }
        }
    }

    /// Queues what proxy `node` (of `caller`) reported, for the other replicas' topology.
    pub fn relay_edges(&self, node: &str, caller: &str, report: &v1::EdgeReport) {
        let mut edges = self.edges.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded: a replica that cannot write keeps at most this many until it can.
        let room = MAX_RELAYED.saturating_sub(edges.len());
        edges.extend(report.edges.iter().take(room).map(|d| v1::EdgeDelta {
            caller: caller.to_string(),
            node: node.to_string(),
            ..d.clone()
        }));
    }

    /// Writes the edge reports received since the last flush (the other replicas add them to
    /// their topology as they arrive; deltas add up exactly).
    async fn flush_edges(&self) -> Result<i64, EtcdError> {
        let edges = std::mem::take(&mut *self.edges.lock().unwrap_or_else(|p| p.into_inner()));
        if edges.is_empty() {
            return Ok(0);
        }
        let value = mesh_proto::prost::Message::encode_to_vec(&v1::EdgeReport { edges });
        self.etcd.put(&self.key(&format!("edges/{}", self.replica)), value, self.lease()).await
    }

    /// The proxies connected to the other replicas (a replica never keeps its own list: see
    /// [`Cluster::is_own`]).
    pub fn remote_proxies(&self) -> Vec<v1::ProxyStatus> {
        self.proxies.iter().flat_map(|e| e.value().clone()).collect()
    }

    /// Whether a per-replica key (`<replica>` or `<replica>/…`, after its prefix) is this
    /// replica's own.
    pub fn is_own(&self, rest: &str) -> bool {
        rest.split('/').next() == Some(self.replica.as_str())
    }

    /// Writes the chunks of `report` (this replica's proxies) that changed since they were last
    /// written (all of them when the lease they were written under is gone), and deletes the
    /// chunks past its end. `last`: the lease and the chunks as written.
    async fn report(
        &self,
        report: Vec<v1::ProxyStatus>,
        last: &mut (i64, Vec<Vec<u8>>),
    ) -> Result<i64, EtcdError> {
        let lease = self.lease();
        if last.0 != lease {
            *last = (lease, Vec::new());
        }
        let (kept, chunks) = (&mut last.1, proxy_chunks(report, PROXY_CHUNK_BYTES));
        let key = |i: usize| self.key(&format!("proxies/{}/{i}", self.replica));
        let mut rev = 0;
        let n = chunks.len();
        for (i, chunk) in chunks.into_iter().enumerate() {
            if kept.get(i) == Some(&chunk) {
                continue;
            }
            rev = self.etcd.put(&key(i), chunk.clone(), lease).await?;
            match kept.get_mut(i) {
                Some(c) => *c = chunk,
                None => kept.push(chunk),
            }
        }
        while kept.len() > n {
            rev = self.etcd.delete(&key(kept.len() - 1)).await?;
            kept.pop();
        }
        Ok(rev)
    }

    /// Keeps the lease alive (taking a new one if it was lost), flushes heartbeats and writes
    /// `report()` (this replica's proxies) when it changes, until `stop`; then gives the lease
    /// back so this replica's keys and leadership go at once. The elected replica also compacts
    /// etcd's history every [`COMPACT_EVERY`], keeping that long.
    pub async fn run(
        self: Arc<Self>,
        stop: CancellationToken,
        report: impl Fn() -> Vec<v1::ProxyStatus> + Send,
    ) {
        let keeper = {
            let me = self.clone();
            let stop = stop.clone();
            mesh_runtime::spawn(tracing::info_span!("etcd_lease"), async move {
                while !stop.is_cancelled() {
                    let lease = me.lease();
                    if let Err(e) = me.etcd.keep_alive(lease, LEASE_TTL / 3, stop.clone()).await {
                        tracing::warn!(error = %e, "the replica's etcd lease was lost; taking a new one");
                        me.sweeper.store(false, Ordering::Relaxed);
                        match me.etcd.grant(LEASE_TTL).await {
                            Ok(l) => me.lease.store(l, Ordering::Relaxed),
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot take a new etcd lease; retrying");
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            }
                        }
                    }
                }
            })
        };
        let elector = {
            let me = self.clone();
            let stop = stop.clone();
            mesh_runtime::spawn(tracing::info_span!("etcd_election"), async move { me.elect(stop).await })
        };
        let mut tick = tokio::time::interval(FLUSH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reported = (0, Vec::new());
        // (when, revision): the revision history is kept back to.
        let mut compact_to: Option<(tokio::time::Instant, i64)> = None;
        let mut revision = 0;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {
                    match self.flush().await {
                        Ok((_, rev)) => revision = revision.max(rev),
                        Err(e) => tracing::warn!(error = %e, "cannot write this replica's heartbeats to etcd; will retry"),
                    }
                    match self.report(report(), &mut reported).await {
                        Ok(rev) => revision = revision.max(rev),
                        Err(e) => tracing::warn!(error = %e, "cannot write this replica's proxies to etcd; will retry"),
                    }
                    if let Err(e) = self.flush_edges().await {
                        tracing::debug!(error = %e, "cannot relay edge reports to the other replicas; dropped");
                    }
                    let now = tokio::time::Instant::now();
                    match compact_to {
                        Some((at, rev)) if now.duration_since(at) >= COMPACT_EVERY => {
                            if self.is_sweeper() && rev > 0 {
                                match self.etcd.compact(rev).await {
                                    Ok(()) => tracing::info!(revision = rev, "compacted etcd's history"),
                                    Err(e) => tracing::debug!(error = %e, "etcd compaction skipped"),
                                }
                            }
                            compact_to = Some((now, revision));
                        }
                        None => compact_to = Some((now, revision)),
                        Some(_) => {}
                    }
                }
            }
        }
        let _ = self.flush().await;
        let _ = keeper.await;
        let _ = elector.await;
        self.sweeper.store(false, Ordering::Relaxed);
        if let Err(e) = self.etcd.revoke(self.lease()).await {
            tracing::warn!(error = %e, "cannot give back the etcd lease; it expires by itself");
        }
    }

    /// Campaigns to be the sweeper; once elected, stays until the lease is lost, then again.
    async fn elect(&self, stop: CancellationToken) {
        let name = self.key("sweeper");
        while !stop.is_cancelled() {
            let lease = self.lease();
            let Some(leader) = self.etcd.campaign(&name, lease, &self.replica, &stop).await else { return };
            tracing::info!(replica = %self.replica, "elected: this replica expires and deregisters instances");
            self.sweeper.store(true, Ordering::Relaxed);
            // Leadership lasts as long as the lease it was won with.
            while !stop.is_cancelled() && self.lease() == lease {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
            self.sweeper.store(false, Ordering::Relaxed);
            if stop.is_cancelled() {
                let _ = self.etcd.resign(leader).await;
                return;
            }
            tracing::warn!("lost the sweeper's lease: campaigning again");
        }
    }

    /// The elected sweeper's name, if any.
    pub async fn sweeper_name(&self) -> Result<Option<String>, EtcdError> {
        self.etcd.leader(&self.key("sweeper")).await
    }
}

/// `proxies` encoded as proxy-status records of at most `limit` bytes each (one proxy larger
/// than that goes alone); none for no proxies.
pub fn proxy_chunks(proxies: Vec<v1::ProxyStatus>, limit: usize) -> Vec<Vec<u8>> {
    use mesh_proto::prost::Message;
    let mut chunks = Vec::new();
    let mut chunk = v1::ProxyStatusResponse::default();
    let mut size = 0;
    for p in proxies {
        // The field's tag and length prefix around each proxy: at most 1 + 5 bytes.
        let len = p.encoded_len() + 6;
        if size + len > limit && !chunk.proxies.is_empty() {
            chunks.push(std::mem::take(&mut chunk).encode_to_vec());
            size = 0;
        }
        size += len;
        chunk.proxies.push(p);
    }
    if !chunk.proxies.is_empty() {
        chunks.push(chunk.encode_to_vec());
    }
    chunks
}

/// A key's last path segment(s) after `prefix`.
pub fn strip<'a>(key: &'a [u8], prefix: &str) -> Option<&'a str> {
    std::str::from_utf8(key).ok()?.strip_prefix(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::prost::Message;

    fn proxy(i: usize) -> v1::ProxyStatus {
        v1::ProxyStatus {
            node_id: format!("node-{i}"),
            service: format!("svc-{}", i % 7),
            peer: "127.0.0.1:40000".into(),
            spiffe_id: format!("spiffe://mesh.local/ns/default/sa/svc-{}", i % 7),
            policies: vec![v1::PolicySyncStatus {
                service: "svc".into(),
                acked_version: 3,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_large_proxy_list_is_cut_into_values_etcd_accepts_and_reads_back_whole() {
        let proxies: Vec<_> = (0..20_000).map(proxy).collect();
        let whole = v1::ProxyStatusResponse { proxies: proxies.clone() }.encoded_len();
        let limit = 256 * 1024;
        let chunks = proxy_chunks(proxies.clone(), limit);
        assert!(chunks.len() >= whole / limit, "{} chunks for {whole} bytes", chunks.len());
        let mut back = Vec::new();
        for c in &chunks {
            assert!(c.len() <= limit, "a chunk of {} bytes", c.len());
            back.extend(v1::ProxyStatusResponse::decode(c.as_slice()).unwrap().proxies);
        }
        assert_eq!(back, proxies);
        // A change to one proxy changes one chunk: the others are not written again.
        let mut changed = proxies;
        changed[12_345].policies[0].acked_version = 4;
        let again = proxy_chunks(changed, limit);
        assert_eq!(again.len(), chunks.len());
        assert_eq!(again.iter().zip(&chunks).filter(|(a, b)| a != b).count(), 1);
        assert!(proxy_chunks(Vec::new(), limit).is_empty());
        assert_eq!(proxy_chunks(vec![proxy(1)], 1).len(), 1, "one proxy larger than the limit goes alone");
    }
}
