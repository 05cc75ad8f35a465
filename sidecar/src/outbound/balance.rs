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
