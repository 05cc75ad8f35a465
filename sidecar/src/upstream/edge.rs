//! What this proxy saw of one edge (its service calling an upstream) since its last report to
//! the control plane: requests, successes and a latency histogram, as atomics (one add per
//! request, no lock); [`EdgeCounters::take`] swaps them out for the report.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use mesh_proto::{
    topology::{EDGE_BUCKETS, bucket_of},
    v1,
};

/// The gateway's calls by route: (route name, service) → what they came to.
pub type RouteEdges = dashmap::DashMap<(String, String), std::sync::Arc<EdgeCounters>>;

#[derive(Debug, Default)]
pub struct EdgeCounters {
    requests: AtomicU64,
    successes: AtomicU64,
    cached: AtomicU64,
    limited: AtomicU64,
    buckets: [AtomicU64; EDGE_BUCKETS],
}

impl EdgeCounters {
    /// One answer: its status (0 when none came), how long it took, and whether it came from
    /// this proxy's cache.
    pub fn record(&self, status: u16, took: Duration, cached: bool) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if status != 0 && status < 500 {
            self.successes.fetch_add(1, Ordering::Relaxed);
        }
        if cached {
            self.cached.fetch_add(1, Ordering::Relaxed);
        }
        if status == 429 {
            self.limited.fetch_add(1, Ordering::Relaxed);
        }
        self.buckets[bucket_of(took.as_secs_f64() * 1000.0)].fetch_add(1, Ordering::Relaxed);
    }

    /// What was counted since the last call (`None` when nothing was), as a report's delta;
    /// `open_breakers`: the callee's endpoints with an open breaker now.
    pub fn take(&self, caller: &str, callee: &str, open_breakers: u32) -> Option<v1::EdgeDelta> {
        let requests = self.requests.swap(0, Ordering::Relaxed);
        if requests == 0 {
            return None;
        }
        Some(v1::EdgeDelta {
            caller: caller.to_string(),
            callee: callee.to_string(),
            requests,
            successes: self.successes.swap(0, Ordering::Relaxed),
            latency_buckets: self.buckets.iter().map(|b| b.swap(0, Ordering::Relaxed)).collect(),
            cached: self.cached.swap(0, Ordering::Relaxed),
            limited: self.limited.swap(0, Ordering::Relaxed),
            open_breakers,
            route: String::new(),
            node: String::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_until_taken() {
        let e = EdgeCounters::default();
        assert_eq!(e.take("web", "market", 0), None);
        e.record(200, Duration::from_millis(3), true);
        e.record(503, Duration::from_millis(30), false);
        e.record(0, Duration::from_secs(60), false);
        e.record(429, Duration::from_millis(1), false);
        let d = e.take("web", "market", 1).unwrap();
        assert_eq!((d.requests, d.successes, d.cached, d.limited, d.open_breakers), (4, 2, 1, 1, 1));
        assert_eq!(d.latency_buckets.iter().sum::<u64>(), 4);
        assert_eq!(d.latency_buckets[EDGE_BUCKETS - 1], 1);
        assert_eq!(e.take("web", "market", 0), None, "taken means reset");
    }
}
