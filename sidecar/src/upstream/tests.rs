use mesh_proto::policy::Algorithm;
use tokio::time::Instant;

use super::*;
use crate::upstream::{endpoint::EndpointInfo, set::EndpointSet};

fn info(id: &str, weight: u32) -> EndpointInfo {
    EndpointInfo {
        id: id.into(),
        address: format!("127.0.0.1:{}", 1000 + id.len()),
        zone: String::new(),
        weight,
    }
}

fn set(weights: &[(&str, u32)]) -> EndpointSet {
    EndpointSet::new(1, weights.iter().map(|(id, w)| Arc::new(Endpoint::new(info(id, *w)))).collect())
}

fn counts(
    s: &EndpointSet,
    algo: Algorithm,
    n: usize,
    key: impl Fn(usize) -> Option<Vec<u8>>,
) -> HashMap<String, usize> {
    let rr = AtomicUsize::new(0);
    let mut out = HashMap::new();
    for i in 0..n {
        let e = s.pick(algo, &rr, key(i).as_deref(), &[]).unwrap();
        *out.entry(e.info.id.clone()).or_default() += 1;
    }
    out
}

#[test]
fn round_robin_is_exactly_even() {
    let s = set(&[("a", 100), ("b", 100), ("c", 100)]);
    let c = counts(&s, Algorithm::RoundRobin, 300, |_| None);
    assert_eq!((c["a"], c["b"], c["c"]), (100, 100, 100));
}

#[test]
fn random_and_least_connections_spread_over_all() {
    let s = set(&[("a", 100), ("b", 100), ("c", 100)]);
    for algo in [Algorithm::Random, Algorithm::LeastConnections, Algorithm::P2cPeakEwma] {
        let c = counts(&s, algo, 3000, |_| None);
        for id in ["a", "b", "c"] {
            assert!(c[id] > 700 && c[id] < 1300, "{algo:?}: {c:?}");
        }
    }
}

#[test]
fn least_connections_picks_the_least_loaded() {
    let s = set(&[("a", 100), ("b", 100), ("c", 100)]);
    let _busy: Vec<_> = [0, 0, 1].iter().map(|i| s.endpoints[*i].start()).collect();
    let rr = AtomicUsize::new(0);
    for _ in 0..50 {
        assert_eq!(s.pick(Algorithm::LeastConnections, &rr, None, &[]).unwrap().info.id, "c");
    }
}

#[test]
fn weighted_follows_the_weights() {
    let s = set(&[("a", 100), ("b", 300), ("c", 600)]);
    let c = counts(&s, Algorithm::Weighted, 10_000, |_| None);
    assert!((800..1200).contains(&c["a"]), "{c:?}");
    assert!((2600..3400).contains(&c["b"]), "{c:?}");
    assert!((5500..6500).contains(&c["c"]), "{c:?}");
}

#[test]
fn consistent_hash_is_sticky_and_spreads_keys() {
    let s = set(&[("a", 100), ("b", 100), ("c", 100)]);
    let rr = AtomicUsize::new(0);
    for user in 0..50 {
        let key = format!("user-{user}");
        let first = s.pick(Algorithm::ConsistentHash, &rr, Some(key.as_bytes()), &[]).unwrap();
        for _ in 0..5 {
            let again = s.pick(Algorithm::ConsistentHash, &rr, Some(key.as_bytes()), &[]).unwrap();
            assert!(Arc::ptr_eq(&first, &again));
        }
    }
    let c = counts(&s, Algorithm::ConsistentHash, 3000, |i| Some(format!("user-{i}").into_bytes()));
    for id in ["a", "b", "c"] {
        assert!(c[id] > 600, "{c:?}");
    }
    // Removing one endpoint moves only the keys that were on it.
    let two = EndpointSet::new(2, s.endpoints[..2].to_vec());
    for user in 0..200 {
        let key = format!("user-{user}");
        let before = s.pick(Algorithm::ConsistentHash, &rr, Some(key.as_bytes()), &[]).unwrap();
        let after = two.pick(Algorithm::ConsistentHash, &rr, Some(key.as_bytes()), &[]).unwrap();
        if before.info.id != "c" {
            assert!(Arc::ptr_eq(&before, &after), "{key} moved needlessly");
        }
    }
}

#[test]
fn p2c_prefers_the_fast_endpoint() {
    let s = set(&[("fast", 100), ("slow1", 100), ("slow2", 100)]);
    s.endpoints[0].observe(Duration::from_millis(1), Instant::now());
    s.endpoints[1].observe(Duration::from_millis(50), Instant::now());
    s.endpoints[2].observe(Duration::from_millis(50), Instant::now());
    let c = counts(&s, Algorithm::P2cPeakEwma, 3000, |_| None);
    // The fast one wins every pair it is in: 2/3 of all picks.
    assert!(c["fast"] > 1900, "{c:?}");
}

#[tokio::test(start_paused = true)]
async fn a_slow_sample_decays_so_the_endpoint_is_tried_again() {
    let s = set(&[("a", 100), ("b", 100)]);
    s.endpoints[0].observe(Duration::from_millis(500), Instant::now());
    s.endpoints[1].observe(Duration::from_millis(5), Instant::now());
    let rr = AtomicUsize::new(0);
    assert_eq!(s.pick(Algorithm::P2cPeakEwma, &rr, None, &[]).unwrap().info.id, "b");
    // Nothing new is learned about either; a minute later the old peak no longer dominates.
    tokio::time::advance(Duration::from_secs(60)).await;
    s.endpoints[1].observe(Duration::from_millis(5), Instant::now());
    assert_eq!(s.pick(Algorithm::P2cPeakEwma, &rr, None, &[]).unwrap().info.id, "a");
}

#[test]
fn p2c_tries_a_new_endpoint_once_then_waits_for_its_answer() {
    let s = set(&[("known", 100), ("new", 100)]);
    s.endpoints[0].observe(Duration::from_millis(2), Instant::now());
    let rr = AtomicUsize::new(0);
    let first = s.pick(Algorithm::P2cPeakEwma, &rr, None, &[]).unwrap();
    assert_eq!(first.info.id, "new", "an unmeasured idle endpoint is tried");
    let _out = first.start();
    assert_eq!(s.pick(Algorithm::P2cPeakEwma, &rr, None, &[]).unwrap().info.id, "known");
}

#[test]
fn avoid_skips_endpoints_unless_none_would_remain() {
    let s = set(&[("a", 100), ("b", 100)]);
    let rr = AtomicUsize::new(0);
    let a = s.endpoints[0].clone();
    for algo in [Algorithm::RoundRobin, Algorithm::Random, Algorithm::P2cPeakEwma, Algorithm::Weighted] {
        for _ in 0..20 {
            assert_eq!(s.pick(algo, &rr, None, std::slice::from_ref(&a)).unwrap().info.id, "b");
        }
    }
    let all = s.endpoints.clone();
    assert!(s.pick(Algorithm::RoundRobin, &rr, None, &all).is_some());
    assert!(EndpointSet::default().pick(Algorithm::RoundRobin, &rr, None, &[]).is_none());
}

#[test]
fn endpoints_that_stay_keep_their_state_across_updates() {
    let up = Upstream::new("svc", None, &crate::metrics::Metrics::new());
    up.set_endpoints(1, vec![info("a", 100), info("b", 100)], Source::Discovery);
    let a = up.endpoints().endpoints[0].clone();
    let _guard = a.start();
    up.set_endpoints(2, vec![info("a", 100), info("c", 100)], Source::Discovery);
    let set = up.endpoints();
    assert!(Arc::ptr_eq(&set.endpoints[0], &a));
    assert_eq!(set.endpoints[0].inflight(), 1);
    assert_eq!(set.version, 2);
}
