//! Choosing the endpoint for one attempt: the policy's balancer over the endpoints whose
//! breaker is closed and that this request has not tried yet; a half-open endpoint takes only
//! its probes; when every breaker is open (panic mode) the breakers are ignored. And what each
//! attempt's outcome teaches the choice: the endpoint's latency, its breaker, and ejection
//! within the policy's share of the set.

use std::{sync::Arc, time::Duration};

use http::HeaderMap;
use mesh_proto::policy::{CircuitBreakerPolicy, LoadBalancer, ServicePolicy};
use tokio::time::Instant;

use crate::{
    metrics::Metrics,
    upstream::{Upstream, endpoint::Endpoint, set::EndpointSet},
};

/// The value of the policy's hash header, for consistent hashing.
pub fn hash_key(lb: &LoadBalancer, headers: &HeaderMap) -> Option<Vec<u8>> {
    lb.hash_header.as_deref().and_then(|h| headers.get(h)).map(|v| v.as_bytes().to_vec())
}

/// The endpoint set now and the endpoint to try, or `None` when no endpoint is left. Endpoints
/// in `tried` (and those a half-open breaker turned away, which are added to it) are avoided
/// while others remain.
pub fn choose(
    up: &Upstream,
    policy: &ServicePolicy,
    hash_key: Option<&[u8]>,
    tried: &mut Vec<Arc<Endpoint>>,
) -> Option<(Arc<EndpointSet>, Arc<Endpoint>)> {
    loop {
        let set = up.endpoints();
        let now = Instant::now();
        let mut avoid: Vec<Arc<Endpoint>> = tried.clone();
        avoid.extend(set.endpoints.iter().filter(|e| e.breaker.is_open(now)).cloned());
        let endpoint = set.pick(policy.load_balancer.algorithm, up.round_robin(), hash_key, &avoid)?;
        // A half-open endpoint takes only its probes; panic mode (everything open) ignores breakers.
        let all_open = set.endpoints.iter().all(|e| e.breaker.is_open(now));
        if !all_open && !endpoint.breaker.admit(now, &policy.circuit_breaker) && set.endpoints.len() > 1 {
            tried.push(endpoint.clone());
            if tried.len() < set.endpoints.len() {
                continue;
            }
        }
        return Some((set, endpoint));
    }
}

/// Records one attempt's outcome at `endpoint`: its latency (a failure counts as at least a
/// second, so the balancers move away from it) and its breaker, which may open.
#[allow(clippy::too_many_arguments)]
pub fn record(
    set: &EndpointSet,
    endpoint: &Arc<Endpoint>,
    failed: bool,
    took: Duration,
    done: Instant,
    policy: &ServicePolicy,
    service: &str,
    metrics: &Metrics,
) {
    endpoint.observe(if failed { took.max(Duration::from_secs(1)) } else { took }, done);
    if endpoint.breaker.record(failed, done, &policy.circuit_breaker) {
        maybe_eject(metrics, set, endpoint, service, &policy.circuit_breaker);
    }
}

/// Opens `endpoint`'s breaker unless that would eject more than the policy's share of the
/// set or its last available endpoint.
fn maybe_eject(
    metrics: &Metrics,
    set: &EndpointSet,
    endpoint: &Arc<Endpoint>,
    service: &str,
    p: &CircuitBreakerPolicy,
) {
    let now = Instant::now();
    let open = set.endpoints.iter().filter(|e| e.breaker.is_open(now)).count();
    let total = set.endpoints.len();
    let within_share = (open + 1) * 100 <= p.max_ejection_percent as usize * total;
    if within_share && open + 1 < total {
        let d = endpoint.breaker.open(now, p);
        metrics
            .breaker_openings
            .get_or_create(&vec![("service", service.to_string()), ("endpoint", endpoint.info.id.clone())])
            .inc();
        tracing::warn!(%service, endpoint = %endpoint.info.id, open_for = ?d, "circuit opened: endpoint ejected");
    } else {
        tracing::debug!(%service, endpoint = %endpoint.info.id, open, total, "not ejecting: at the max-ejection share or the last endpoint");
    }
}

#[cfg(test)]
mod tests {
    use mesh_proto::policy::Algorithm;

    use super::*;
    use crate::upstream::{Source, endpoint::EndpointInfo};

    fn upstream(ids: &[&str]) -> Upstream {
        let up = Upstream::new("svc", None, &Metrics::new());
        let infos = ids
            .iter()
            .enumerate()
            .map(|(i, id)| EndpointInfo {
                id: id.to_string(),
                address: format!("127.0.0.1:{}", 1000 + i),
                zone: String::new(),
                weight: 100,
            })
            .collect();
        up.set_endpoints(1, infos, Source::Discovery);
        up
    }

    fn policy() -> ServicePolicy {
        let mut p = ServicePolicy::default();
        p.load_balancer.algorithm = Algorithm::RoundRobin;
        p.circuit_breaker.half_open_probes = 1;
        p.circuit_breaker.open_duration = Duration::from_secs(10);
        p
    }

    fn ids(tried: &[Arc<Endpoint>]) -> Vec<&str> {
        tried.iter().map(|e| e.info.id.as_str()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn tried_and_open_endpoints_are_avoided_while_others_remain() {
        let (up, p) = (upstream(&["a", "b", "c"]), policy());
        let b = up.endpoints().endpoints[1].clone();
        b.breaker.open(Instant::now(), &p.circuit_breaker);
        let mut tried = vec![up.endpoints().endpoints[0].clone()];
        for _ in 0..10 {
            let (_, e) = choose(&up, &p, None, &mut tried).unwrap();
            assert_eq!(e.info.id, "c", "a was tried and b is open");
        }
        // Everything tried: the balancer may pick again rather than fail.
        tried.push(up.endpoints().endpoints[2].clone());
        assert!(choose(&up, &p, None, &mut tried).is_some());
        assert!(choose(&upstream(&[]), &p, None, &mut Vec::new()).is_none(), "no endpoints at all");
    }

    #[tokio::test(start_paused = true)]
    async fn a_half_open_endpoint_takes_only_its_probes() {
        let (up, p) = (upstream(&["a", "b"]), policy());
        let a = up.endpoints().endpoints[0].clone();
        a.breaker.open(Instant::now(), &p.circuit_breaker);
        tokio::time::advance(Duration::from_secs(11)).await;
        // Due for a probe: the first request to it is the probe; after that it is turned away
        // (and counted as tried) until the probe's outcome is recorded.
        let mut seen = Vec::new();
        for _ in 0..4 {
            let mut tried = Vec::new();
            let (_, e) = choose(&up, &p, None, &mut tried).unwrap();
            seen.push(e.info.id.clone());
            if !tried.is_empty() {
                assert_eq!(ids(&tried), ["a"]);
            }
        }
        assert_eq!(seen.iter().filter(|id| *id == "a").count(), 1, "{seen:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn failures_open_a_breaker_within_the_ejection_share_only() {
        let (up, mut p) = (upstream(&["a", "b"]), policy());
        p.circuit_breaker.consecutive_failures = 1;
        p.circuit_breaker.max_ejection_percent = 50;
        let m = Metrics::new();
        let set = up.endpoints();
        let (a, b) = (set.endpoints[0].clone(), set.endpoints[1].clone());
        let now = Instant::now();
        record(&set, &a, true, Duration::from_millis(5), now, &p, "svc", &m);
        assert!(a.breaker.is_open(now), "half the set may be ejected");
        record(&set, &b, true, Duration::from_millis(5), now, &p, "svc", &m);
        assert!(!b.breaker.is_open(now), "not the last endpoint");
    }
}
