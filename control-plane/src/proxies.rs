//! Which proxies hold a policy stream, and how far each is in sync: the data behind
//! `Admin.ProxyStatus` and the push→ACK latency metric.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use dashmap::DashMap;
use tokio::time::Instant;

#[derive(Debug, Clone, Default)]
pub struct SyncState {
    pub pushed_version: u64,
    pub pushed_nonce: String,
    pub pushed_at: Option<Instant>,
    pub acked_version: u64,
    pub nacked_version: u64,
    pub nack_reason: String,
    pub last_ack_latency_ms: f64,
}

#[derive(Debug, Clone)]
pub struct ProxyState {
    pub node_id: String,
    pub service: String,
    pub peer: String,
    pub connected_at: Instant,
    /// The same moment on the wall clock (unix ms), as other replicas are told it: exact, so
    /// an unchanged proxy reads the same at every report.
    pub connected_unix_ms: u64,
    pub policies: BTreeMap<String, SyncState>,
}

/// The last certificate the CA issued to a node.
#[derive(Debug, Clone, Default)]
pub struct IssuedCert {
    pub spiffe_id: String,
    pub expires_unix_ms: u64,
    pub issued: u32,
}

#[derive(Default)]
pub struct Proxies {
    conns: Arc<DashMap<u64, Arc<Mutex<ProxyState>>>>,
    next_id: AtomicU64,
    certs: DashMap<String, IssuedCert>,
}

/// One connected proxy; removed from [`Proxies`] when dropped (the stream ended).
pub struct ProxyHandle {
    id: u64,
    state: Arc<Mutex<ProxyState>>,
    conns: Arc<DashMap<u64, Arc<Mutex<ProxyState>>>>,
}

impl Proxies {
    pub fn connect(&self, peer: String, now: Instant) -> ProxyHandle {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(Mutex::new(ProxyState {
            node_id: String::new(),
            service: String::new(),
            peer,
            connected_at: now,
            connected_unix_ms: mesh_proto::unix_ms(std::time::SystemTime::now()),
            policies: BTreeMap::new(),
        }));
        self.conns.insert(id, state.clone());
        ProxyHandle { id, state, conns: self.conns.clone() }
    }

    /// Copies of every proxy's state, sorted by service then node id.
    pub fn snapshot(&self) -> Vec<ProxyState> {
        let mut v: Vec<ProxyState> =
            self.conns.iter().map(|e| e.value().lock().unwrap_or_else(|p| p.into_inner()).clone()).collect();
        v.sort_by(|a, b| (&a.service, &a.node_id).cmp(&(&b.service, &b.node_id)));
        v
    }

    /// Records a certificate issued to `node_id`.
    pub fn certified(&self, node_id: &str, spiffe_id: &str, expires_unix_ms: u64) {
        let mut e = self.certs.entry(node_id.to_string()).or_default();
        e.spiffe_id = spiffe_id.to_string();
        e.expires_unix_ms = expires_unix_ms;
        e.issued += 1;
    }

    /// The last certificate issued to `node_id`, if any.
    pub fn cert(&self, node_id: &str) -> Option<IssuedCert> {
        self.certs.get(node_id).map(|c| c.clone())
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }
}

impl ProxyHandle {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut ProxyState) -> R) -> R {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        self.conns.remove(&self.id);
    }
}
