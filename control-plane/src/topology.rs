//! Observed topology: the proxies' edge reports (deltas since their previous report) summed per
//! edge (caller, callee and, at the edge, the gateway route) into time slots, read back over the last minute and the last ten. An edge nobody
//! reported within the longer window is gone — a dead proxy's edges age out with its last
//! report.

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
    time::Duration,
};

use mesh_proto::{
    topology::{EDGE_BUCKETS, quantile_ms},
    v1,
};
use tokio::time::Instant;

/// Slots in the long window; the short one is its tenth.
const SLOTS: u64 = 60;

/// Counts summed over a slot or a window.
#[derive(Debug, Clone, Default)]
struct Counts {
    requests: u64,
    successes: u64,
    cached: u64,
    limited: u64,
    buckets: [u64; EDGE_BUCKETS],
}

impl Counts {
    fn add(&mut self, d: &v1::EdgeDelta) {
        self.add_counts(d.requests, d.successes, d.cached, d.limited, &d.latency_buckets);
    }

    fn add_counts(&mut self, requests: u64, successes: u64, cached: u64, limited: u64, buckets: &[u64]) {
        self.requests += requests;
        self.successes += successes.min(requests);
        self.cached += cached.min(requests);
        self.limited += limited.min(requests);
        for (mine, theirs) in self.buckets.iter_mut().zip(buckets) {
            *mine += theirs;
        }
    }

    fn merge(&mut self, other: &Counts) {
        self.add_counts(other.requests, other.successes, other.cached, other.limited, &other.buckets);
    }

    fn stats(&self, window: Duration) -> v1::WindowStats {
        v1::WindowStats {
            requests: self.requests,
            rps: self.requests as f64 / window.as_secs_f64(),
            success_rate: if self.requests == 0 { 1.0 } else { self.successes as f64 / self.requests as f64 },
            p50_ms: quantile_ms(&self.buckets, 0.50),
            p95_ms: quantile_ms(&self.buckets, 0.95),
            p99_ms: quantile_ms(&self.buckets, 0.99),
            cached_share: share(self.cached, self.requests),
            limited_share: share(self.limited, self.requests),
        }
    }
}

fn share(part: u64, of: u64) -> f64 {
    if of == 0 { 0.0 } else { part as f64 / of as f64 }
}

#[derive(Debug, Default)]
struct Edge {
    /// (slot number, what was reported in it), oldest first.
    slots: VecDeque<(u64, Counts)>,
    last_seen: Option<Instant>,
    /// Proxies (node ids) that reported it, with their last report's slot and open breakers.
    reporters: HashMap<String, (u64, u32)>,
}

/// Every edge's slots. `slot` is the long window's tenth of a tenth: 10 s for the default
/// windows of one and ten minutes.
pub struct Topology {
    edges: Mutex<HashMap<(String, String, String), Edge>>,
    slot: Duration,
    epoch: Instant,
}

impl Topology {
    pub fn new(slot: Duration) -> Self {
        Self { edges: Mutex::default(), slot: slot.max(Duration::from_millis(1)), epoch: Instant::now() }
    }

    fn slot_at(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.epoch).as_nanos() / self.slot.as_nanos()) as u64
    }

    /// Adds a proxy's report. `caller` is the service the proxy acts as (the report's own
    /// claim is not trusted); bounded by the report's size, which the proxy bounds.
    pub fn record(&self, node: &str, caller: &str, report: &v1::EdgeReport, now: Instant) {
        let slot = self.slot_at(now);
        let mut edges = self.edges.lock().unwrap_or_else(|p| p.into_inner());
        for d in report.edges.iter().filter(|d| d.requests > 0 && !d.callee.is_empty()) {
            let e = edges.entry((caller.to_string(), d.callee.clone(), d.route.clone())).or_default();
            match e.slots.back_mut() {
                Some((s, c)) if *s == slot => c.add(d),
                _ => {
                    let mut c = Counts::default();
                    c.add(d);
                    e.slots.push_back((slot, c));
                }
            }
            e.last_seen = Some(now);
            e.reporters.insert(node.to_string(), (slot, d.open_breakers));
        }
        Self::age(&mut edges, slot);
    }

    /// Drops slots older than the long window, and edges left without any.
    fn age(edges: &mut HashMap<(String, String, String), Edge>, slot: u64) {
        let oldest = slot.saturating_sub(SLOTS - 1);
        edges.retain(|_, e| {
            while e.slots.front().is_some_and(|(s, _)| *s < oldest) {
                e.slots.pop_front();
            }
            e.reporters.retain(|_, (s, _)| *s >= oldest);
            !e.slots.is_empty()
        });
    }

    /// Every edge and every called service over the last minute and the last ten (windows of
    /// 6 and 60 slots), busiest first.
    pub fn snapshot(&self, now: Instant) -> v1::TopologyResponse {
        let slot = self.slot_at(now);
        let mut edges = self.edges.lock().unwrap_or_else(|p| p.into_inner());
        Self::age(&mut edges, slot);
        let (short, long) = (self.slot * (SLOTS as u32 / 10), self.slot * SLOTS as u32);
        let mut services: HashMap<&str, (Counts, Counts)> = HashMap::new();
        let mut out: Vec<v1::EdgeStats> = Vec::with_capacity(edges.len());
        for ((caller, callee, route), e) in edges.iter() {
            let (mut recent, mut all) = (Counts::default(), Counts::default());
            for (s, c) in &e.slots {
                all.merge(c);
                if *s + SLOTS / 10 > slot {
                    recent.merge(c);
                }
            }
            let svc = services.entry(callee.as_str()).or_default();
            svc.0.merge(&recent);
            svc.1.merge(&all);
            out.push(v1::EdgeStats {
                caller: caller.clone(),
                callee: callee.clone(),
                last_minute: Some(recent.stats(short)),
                last_ten_minutes: Some(all.stats(long)),
                last_seen_ms_ago: e
                    .last_seen
                    .map_or(0, |t| now.saturating_duration_since(t).as_millis() as u64),
                reporters: e.reporters.len() as u32,
                open_breakers: e.reporters.values().map(|(_, open)| open).sum(),
                route: route.clone(),
            });
        }
        let rps = |w: &Option<v1::WindowStats>| w.as_ref().map_or(0.0, |w| w.rps);
        out.sort_by(|a, b| {
            rps(&b.last_ten_minutes)
                .total_cmp(&rps(&a.last_ten_minutes))
                .then_with(|| (&a.caller, &a.callee, &a.route).cmp(&(&b.caller, &b.callee, &b.route)))
        });
        let mut services: Vec<v1::ServiceStats> = services
            .into_iter()
            .map(|(name, (recent, all))| v1::ServiceStats {
                service: name.to_string(),
                inbound_last_minute: Some(recent.stats(short)),
                inbound_last_ten_minutes: Some(all.stats(long)),
            })
            .collect();
        services.sort_by(|a, b| {
            rps(&b.inbound_last_ten_minutes)
                .total_cmp(&rps(&a.inbound_last_ten_minutes))
                .then_with(|| a.service.cmp(&b.service))
        });
        v1::TopologyResponse { edges: out, services }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(callee: &str, requests: u64, successes: u64) -> v1::EdgeReport {
        let mut latency_buckets = vec![0; EDGE_BUCKETS];
        latency_buckets[3] = requests;
        v1::EdgeReport {
            edges: vec![v1::EdgeDelta {
                caller: "forged".into(),
                callee: callee.into(),
                requests,
                successes,
                latency_buckets,
                cached: requests / 4,
                limited: 1,
                open_breakers: 1,
                route: String::new(),
                node: String::new(),
            }],
        }
    }

    #[tokio::test(start_paused = true)]
    async fn reports_sum_into_windows_and_age_out() {
        let t = Topology::new(Duration::from_secs(10));
        let start = Instant::now();
        t.record("web-1", "web", &report("market", 60, 57), start);
        t.record("web-2", "web", &report("market", 40, 40), start);
        let s = t.snapshot(start);
        assert_eq!(s.edges.len(), 1);
        let e = &s.edges[0];
        assert_eq!(
            (e.caller.as_str(), e.callee.as_str(), e.reporters),
            ("web", "market", 2),
            "the session's service, not the report's claim"
        );
        let m = e.last_minute.unwrap();
        assert_eq!(m.requests, 100);
        assert!((m.rps - 100.0 / 60.0).abs() < 1e-9);
        assert!((m.success_rate - 0.97).abs() < 1e-9);
        assert!(m.p50_ms > 5.0 && m.p99_ms <= 10.0, "{m:?}");
        assert!((m.cached_share - 0.25).abs() < 1e-9 && (m.limited_share - 0.02).abs() < 1e-9, "{m:?}");
        assert_eq!(e.open_breakers, 2, "each caller's latest view, summed");
        assert_eq!(s.services[0].service, "market");
        // Two minutes on: out of the last minute, still in the last ten.
        let later = start + Duration::from_secs(120);
        let s = t.snapshot(later);
        assert_eq!(s.edges[0].last_minute.unwrap().requests, 0);
        assert_eq!(s.edges[0].last_ten_minutes.unwrap().requests, 100);
        assert_eq!(s.edges[0].last_seen_ms_ago, 120_000);
        // Past ten minutes with no report: gone.
        assert!(t.snapshot(start + Duration::from_secs(601)).edges.is_empty());
    }
}
