//! An upstream's endpoint set, and the six balancers that pick from it (round robin, random,
//! least connections, power of two choices on latency, weighted, consistent hash on a ring).

use crate::upstream::endpoint::{Endpoint, EndpointInfo};

use mesh_proto::policy::Algorithm;
use rand::Rng;
use std::sync::{
    Arc, OnceLock,
    atomic::{AtomicUsize, Ordering},
};

/// Points per endpoint on the consistent-hash ring.
const RING_POINTS: usize = 64;

/// The endpoints of a service at one version.
#[derive(Debug, Default)]
pub struct EndpointSet {
    pub version: u64,
    pub endpoints: Vec<Arc<Endpoint>>,
    ring: OnceLock<Vec<(u64, usize)>>,
}

impl EndpointSet {
    pub fn new(version: u64, endpoints: Vec<Arc<Endpoint>>) -> Self {
        Self { version, endpoints, ring: OnceLock::new() }
    }

    pub fn infos(&self) -> Vec<EndpointInfo> {
        self.endpoints.iter().map(|e| e.info.clone()).collect()
    }

    /// Picks an endpoint, skipping those in `avoid` when another one exists.
    pub fn pick(
        &self,
        algorithm: Algorithm,
        rr: &AtomicUsize,
        hash_key: Option<&[u8]>,
        avoid: &[Arc<Endpoint>],
    ) -> Option<Arc<Endpoint>> {
        let all = &self.endpoints;
        if avoid.is_empty() && all.len() <= 1 {
            return all.first().cloned();
        }
        let candidates: Vec<&Arc<Endpoint>> = if avoid.is_empty() {
            all.iter().collect()
        } else {
            let rest: Vec<_> = all.iter().filter(|e| !avoid.iter().any(|a| Arc::ptr_eq(a, e))).collect();
            if rest.is_empty() { all.iter().collect() } else { rest }
        };
        if candidates.is_empty() {
            return None;
        }
        if candidates.len() == 1 {
            return Some(candidates[0].clone());
        }
        let mut rng = rand::rng();
        let chosen = match algorithm {
            Algorithm::RoundRobin => candidates[rr.fetch_add(1, Ordering::Relaxed) % candidates.len()],
            Algorithm::Random => candidates[rng.random_range(0..candidates.len())],
            Algorithm::LeastConnections => {
                // Lowest in-flight count; ties broken from a random start so load spreads.
                let start = rng.random_range(0..candidates.len());
                (0..candidates.len())
                    .map(|i| candidates[(start + i) % candidates.len()])
                    .min_by_key(|e| e.inflight())
                    .unwrap_or(candidates[0])
            }
            Algorithm::P2cPeakEwma => {
                let a = rng.random_range(0..candidates.len());
                let mut b = rng.random_range(0..candidates.len() - 1);
                if b >= a {
                    b += 1;
                }
                let (ea, eb) = (candidates[a], candidates[b]);
                if ea.cost() <= eb.cost() { ea } else { eb }
            }
            Algorithm::Weighted => {
                let total: u64 = candidates.iter().map(|e| u64::from(e.info.weight.max(1))).sum();
                let mut x = rng.random_range(0..total);
                let mut pick = candidates[candidates.len() - 1];
                for e in &candidates {
                    let w = u64::from(e.info.weight.max(1));
                    if x < w {
                        pick = e;
                        break;
                    }
                    x -= w;
                }
                pick
            }
            Algorithm::ConsistentHash => match hash_key {
                None => candidates[rng.random_range(0..candidates.len())],
                Some(key) => {
                    let ring = self.ring.get_or_init(|| build_ring(all));
                    let h = hash(key);
                    let start = ring.partition_point(|(p, _)| *p < h);
                    // Walk clockwise to the first point whose endpoint is a candidate.
                    (0..ring.len())
                        .map(|i| &all[ring[(start + i) % ring.len()].1])
                        .find(|e| candidates.iter().any(|c| Arc::ptr_eq(c, e)))
                        .unwrap_or(candidates[0])
                }
            },
        };
        Some(chosen.clone())
    }
}

fn hash(bytes: &[u8]) -> u64 {
    // FNV-1a then a 64-bit finaliser: stable across processes and releases, unlike SipHash keys.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

fn build_ring(endpoints: &[Arc<Endpoint>]) -> Vec<(u64, usize)> {
    let mut ring = Vec::with_capacity(endpoints.len() * RING_POINTS);
    for (i, e) in endpoints.iter().enumerate() {
        for p in 0..RING_POINTS {
            ring.push((hash(format!("{}#{p}", e.info.id).as_bytes()), i));
        }
    }
    ring.sort_unstable();
    ring
}
