//! Following the shared store: every replica applies what any replica wrote to its own registry,
//! policies and token table; and the secrets every replica must share (the mesh root, the admin
//! token) are made once, sealed, by whichever replica starts first.

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, SystemTime},
};

use mesh_proto::{
    etcd::mvccpb::{KeyValue, event::EventType},
    prost::Message,
    unix_ms, v1,
};
use tokio::{sync::oneshot, time::Instant};

use super::{Cluster, Update, seal::SealKey, strip};
use crate::{error::Error, state::State};

/// How long start-up waits for the first full read of the shared state.
const FIRST_READ: Duration = Duration::from_secs(30);

/// What one followed prefix does with its keys.
#[derive(Clone, Copy)]
enum Kind {
    Policies,
    Instances,
    Heartbeats,
    Tokens,
    Proxies,
    Edges,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Kind::Policies => "policies/",
            Kind::Instances => "instances/",
            Kind::Heartbeats => "heartbeats/",
            Kind::Tokens => "tokens/",
            Kind::Proxies => "proxies/",
            Kind::Edges => "edges/",
        }
    }
}

/// Starts following every shared prefix and returns once each was read in full, so the replica
/// serves only what the store holds. `grace`: what instances read at start get before they can
/// expire (time for their sidecars to reach a replica).
pub(crate) async fn follow(state: &Arc<State>, cluster: &Arc<Cluster>, grace: Duration) -> Result<(), Error> {
    let mut first = Vec::new();
    for kind in [Kind::Tokens, Kind::Policies, Kind::Instances, Kind::Heartbeats, Kind::Proxies, Kind::Edges]
    {
        let (tx, rx) = oneshot::channel();
        first.push(rx);
        let prefix = cluster.key(kind.prefix());
        let mut updates = cluster.etcd.follow(&prefix, state.shutdown.clone());
        let (state, cluster) = (state.clone(), cluster.clone());
        mesh_runtime::spawn(tracing::info_span!("etcd_apply", prefix = kind.prefix()), async move {
            let mut tx = Some(tx);
            let mut grace = grace;
            while let Some(update) = updates.recv().await {
                apply(&state, &cluster, kind, &prefix, update, grace);
                if let Some(tx) = tx.take() {
                    let _ = tx.send(());
                    grace = Duration::ZERO;
                }
            }
        });
    }
    let all = futures::future::join_all(first);
    match tokio::time::timeout(FIRST_READ, all).await {
        Ok(_) => Ok(()),
        Err(_) => Err(Error::Config(format!(
            "cannot read the shared state from etcd within {FIRST_READ:?}: are the --etcd-endpoints up?"
        ))),
    }
}

fn apply(state: &State, cluster: &Cluster, kind: Kind, prefix: &str, update: Update, grace: Duration) {
    let now = Instant::now();
    match update {
        Update::Snapshot { kvs, revision } => {
            let mut kept = HashSet::new();
            match kind {
                Kind::Tokens => cluster.tokens.clear(),
                Kind::Proxies => cluster.proxies.clear(),
                _ => {}
            }
            for kv in kvs.iter().filter(|_| !matches!(kind, Kind::Edges)) {
                // (An edge batch is a delta: read whole, it was applied when it arrived.)
                if let (Kind::Instances, Some((s, i))) =
                    (kind, strip(&kv.key, prefix).and_then(|r| r.split_once('/')))
                {
                    kept.insert((s.to_string(), i.to_string()));
                }
                put(state, cluster, kind, prefix, kv, now, grace);
            }
            if let Kind::Instances = kind {
                state.registry.retain_stored(&kept, revision, now);
            }
        }
        Update::Events { events, .. } => {
            for e in events {
                let Some(kv) = e.kv else { continue };
                if e.r#type == EventType::Delete as i32 {
                    delete(state, cluster, kind, prefix, &kv, now);
                } else {
                    put(state, cluster, kind, prefix, &kv, now, Duration::ZERO);
                }
            }
        }
    }
}

fn put(
    state: &State,
    cluster: &Cluster,
    kind: Kind,
    prefix: &str,
    kv: &KeyValue,
    now: Instant,
    grace: Duration,
) {
    let Some(rest) = strip(&kv.key, prefix) else { return };
    match kind {
        Kind::Policies => match v1::VersionedPolicy::decode(kv.value.as_slice()) {
            Ok(vp) => {
                let vp = v1::VersionedPolicy { version: kv.version as u64, ..vp };
                if let Err(e) = state.policies.apply_stored(vp) {
                    tracing::error!(error = %e, service = rest, "a policy in etcd does not validate: kept the previous one");
                }
            }
            Err(e) => tracing::error!(error = %e, service = rest, "a policy in etcd is not a policy record"),
        },
        Kind::Instances => {
            let Some((service, id)) = rest.split_once('/') else { return };
            match v1::Instance::decode(kv.value.as_slice()) {
                Ok(i) => state.registry.apply_stored(service, id, Some(i), kv.mod_revision, now, grace),
                Err(e) => {
                    tracing::error!(error = %e, service, id, "an instance in etcd is not an instance record")
                }
            }
        }
        Kind::Heartbeats => match serde_json::from_slice::<super::Batch>(&kv.value) {
            Ok(batch) => state.registry.apply_heartbeats(rest, &batch, now, unix_ms(SystemTime::now())),
            Err(e) => tracing::warn!(error = %e, replica = rest, "a heartbeat batch in etcd is not JSON"),
        },
        Kind::Tokens => {
            cluster.tokens.insert(rest.to_string(), String::from_utf8_lossy(&kv.value).into_owned());
        }
        Kind::Edges if cluster.is_own(rest) => {}
        Kind::Edges => match v1::EdgeReport::decode(kv.value.as_slice()) {
            Ok(report) => {
                let mut by_proxy: std::collections::BTreeMap<(String, String), Vec<v1::EdgeDelta>> =
                    Default::default();
                for d in report.edges {
                    by_proxy.entry((d.node.clone(), d.caller.clone())).or_default().push(d);
                }
                for ((node, caller), edges) in by_proxy {
                    state.topology.record(&node, &caller, &v1::EdgeReport { edges }, now);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, replica = rest, "an edge batch in etcd is not an edge report")
            }
        },
        // This replica's own list: it knows its proxies first hand (at 100,000 proxies, decoding
        // its own 8 MB back after every change cost more than writing it).
        Kind::Proxies if cluster.is_own(rest) => {}
        Kind::Proxies => match v1::ProxyStatusResponse::decode(kv.value.as_slice()) {
            Ok(r) => {
                cluster.proxies.insert(rest.to_string(), r.proxies);
            }
            Err(e) => {
                tracing::warn!(error = %e, replica = rest, "a proxy list in etcd is not a proxy status record")
            }
        },
    }
}

fn delete(state: &State, cluster: &Cluster, kind: Kind, prefix: &str, kv: &KeyValue, now: Instant) {
    let Some(rest) = strip(&kv.key, prefix) else { return };
    match kind {
        Kind::Instances => {
            if let Some((service, id)) = rest.split_once('/') {
                state.registry.apply_stored(service, id, None, kv.mod_revision, now, Duration::ZERO);
            }
        }
        Kind::Tokens => {
            cluster.tokens.remove(rest);
        }
        Kind::Proxies => {
            cluster.proxies.remove(rest);
        }
        // A replica's batch goes with its lease; its heartbeats stay folded in.
        Kind::Heartbeats => state.registry.forget_replica(rest),
        Kind::Edges => {}
        // Policies are never deleted (a delete stores the defaults at a new version).
        Kind::Policies => {}
    }
}

/// A secret every replica shares: read from etcd and opened with `seal`, or made with `make`
/// and stored sealed if no replica did so before (a create-if-absent transaction: the first
/// writer wins and everyone uses its value).
pub(crate) async fn sealed_once(
    cluster: &Cluster,
    seal: &SealKey,
    name: &str,
    make: impl Fn() -> Result<Vec<u8>, Error>,
) -> Result<Vec<u8>, Error> {
    let key = cluster.key(name);
    let store = |e: super::EtcdError| Error::Store(e.into());
    loop {
        if let Some(kv) = cluster.etcd.get(&key).await.map_err(store)? {
            let sealed = String::from_utf8_lossy(&kv.value);
            return seal.open(&sealed).map_err(|e| Error::Config(e.to_string()));
        }
        let plain = make()?;
        if cluster.etcd.put_if(&key, seal.seal(&plain).into_bytes(), 0).await.map_err(store)?.is_some() {
            tracing::info!(%key, "stored a new shared secret, sealed");
            return Ok(plain);
        }
        // Another replica stored it first: read theirs.
    }
}
