//! External services: a policy with `external: {host, port}` makes the sidecar resolve `host`
//! (hickory-resolver: /etc/hosts, then the system's DNS configuration) and balance over the
//! addresses, re-resolving when the records' TTL runs out. A failed lookup keeps the last
//! addresses and retries with backoff.

use crate::upstream::{Source, Upstream, endpoint::EndpointInfo};

use dashmap::DashMap;
use hickory_resolver::TokioResolver;
use mesh_proto::policy::ExternalService;
use std::{sync::Arc, time::Duration};
use tokio::time::Instant;

const MIN_REFRESH: Duration = Duration::from_secs(1);

const MAX_REFRESH: Duration = Duration::from_secs(300);

#[derive(Default)]
pub struct Dns {
    resolver: std::sync::OnceLock<Option<TokioResolver>>,
    running: DashMap<String, (ExternalService, tokio::task::AbortHandle)>,
}

impl Dns {
    fn resolver(&self) -> Option<TokioResolver> {
        self.resolver
            .get_or_init(|| match TokioResolver::builder_tokio() {
                Ok(b) => Some(b.build().ok()?),
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the system DNS configuration; external services will not resolve");
                    None
                }
            })
            .clone()
    }

    /// Starts, restarts or stops resolution for `up` to match its policy's `external`.
    pub fn sync(&self, up: &Arc<Upstream>, external: Option<&ExternalService>) {
        if let Some(cur) = self.running.get(&up.name)
            && Some(&cur.0) == external
        {
            return;
        }
        if let Some((_, (_, handle))) = self.running.remove(&up.name) {
            handle.abort();
        }
        let (Some(ext), Some(resolver)) = (external.cloned(), external.and_then(|_| self.resolver())) else {
            return;
        };
        let task = mesh_runtime::spawn(
            tracing::info_span!("dns", service = %up.name, host = %ext.host),
            resolve_loop(up.clone(), ext.clone(), resolver),
        );
        self.running.insert(up.name.clone(), (ext, task.abort_handle()));
    }

    pub fn stop_all(&self) {
        for e in self.running.iter() {
            e.value().1.abort();
        }
        self.running.clear();
    }
}

async fn resolve_loop(up: Arc<Upstream>, ext: ExternalService, resolver: TokioResolver) {
    let mut failures = 0u32;
    let mut version = 0u64;
    loop {
        let wait = match resolver.lookup_ip(ext.host.as_str()).await {
            Ok(lookup) => {
                failures = 0;
                let mut infos: Vec<EndpointInfo> = lookup
                    .iter()
                    .map(|ip| {
                        let address = std::net::SocketAddr::new(ip, ext.port).to_string();
                        EndpointInfo {
                            id: format!("dns:{address}"),
                            address,
                            zone: String::new(),
                            weight: 100,
                        }
                    })
                    .collect();
                infos.sort_by(|a, b| a.id.cmp(&b.id));
                infos.dedup();
                version += 1;
                tracing::debug!(service = %up.name, host = %ext.host, addresses = infos.len(), "resolved");
                up.set_endpoints(version, infos, Source::Dns);
                // hickory states a record's lifetime as a std Instant.
                #[allow(clippy::disallowed_types)]
                let now = std::time::Instant::now();
                lookup.valid_until().saturating_duration_since(now).clamp(MIN_REFRESH, MAX_REFRESH)
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(service = %up.name, host = %ext.host, error = %e, "DNS lookup failed; keeping the last addresses");
                (MIN_REFRESH * 2u32.saturating_pow(failures.min(8))).min(MAX_REFRESH)
            }
        };
        tokio::time::sleep_until(Instant::now() + wait).await;
    }
}
