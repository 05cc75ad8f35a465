//! What the streaming services share: the gauge of open streams, the checked list of watched
//! services, and releasing a stream's watch leases.

use crate::api::MAX_WATCHED_SERVICES;

use mesh_proto::names;
use prometheus_client::metrics::gauge::Gauge;
use std::collections::HashSet;
use tokio_stream::StreamMap;
use tonic::Status;

/// Decrements a gauge when the stream holding it is dropped.
pub(crate) struct GaugeGuard(Gauge);

impl GaugeGuard {
    pub(crate) fn new(g: &Gauge) -> Self {
        g.inc();
        Self(g.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

pub(crate) fn check_services(list: &[String]) -> Result<Vec<String>, Status> {
    if list.is_empty() || list.len() > MAX_WATCHED_SERVICES {
        return Err(Status::invalid_argument(format!(
            "services: name 1..={MAX_WATCHED_SERVICES} services, got {}",
            list.len()
        )));
    }
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(list.len());
    for s in list {
        if !names::is_service_name(s) {
            return Err(Status::invalid_argument(format!(
                "services: {s:?} must be {}",
                names::SERVICE_NAME_RULE
            )));
        }
        if seen.insert(s.as_str()) {
            out.push(s.clone());
        }
    }
    Ok(out)
}

// ---- Registry ------------------------------------------------------------------------------

/// Drops every receiver in `updates` first (so they no longer count as watchers), then hands
/// each name to `release`.
pub(crate) fn release_all<T>(updates: &mut StreamMap<String, T>, release: impl Fn(&str)) {
    let names: Vec<String> = updates.keys().cloned().collect();
    *updates = StreamMap::new();
    for name in names {
        release(&name);
    }
}
