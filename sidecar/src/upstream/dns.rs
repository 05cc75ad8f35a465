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

pub struct Dns {
    /// `--dns-server`: resolve with it instead of the system's configuration.
    server: Option<std::net::SocketAddr>,
    resolver: std::sync::OnceLock<Option<TokioResolver>>,
    running: DashMap<String, (ExternalService, tokio::task::AbortHandle)>,
}

impl Dns {
    pub fn new(server: Option<std::net::SocketAddr>) -> Dns {
        Dns { server, resolver: Default::default(), running: Default::default() }
    }

    fn resolver(&self) -> Option<TokioResolver> {
        self.resolver
            .get_or_init(|| {
                let builder = match self.server {
                    Some(server) => {
                        use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
                        let on = |mut c: ConnectionConfig| {
                            c.port = server.port();
                            c
                        };
                        let ns = NameServerConfig::new(
                            server.ip(),
                            true,
                            vec![on(ConnectionConfig::udp()), on(ConnectionConfig::tcp())],
                        );
                        let config = ResolverConfig::from_parts(None, vec![], vec![ns]);
                        Ok(TokioResolver::builder_with_config(config, Default::default()))
                    }
                    None => TokioResolver::builder_tokio(),
                };
                match builder {
                    Ok(b) => Some(b.build().ok()?),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read the system DNS configuration; names will not resolve");
                        None
                    }
                }
            })
            .clone()
    }

    /// Every address `host` resolves to, sorted (so every sidecar sees one order and spreads
    /// over it by its own offset). Empty when it does not resolve.
    pub async fn addresses(&self, host: &str) -> Vec<std::net::IpAddr> {
        let Some(resolver) = self.resolver() else { return vec![] };
        match resolver.lookup_ip(host).await {
            Ok(lookup) => {
                let mut ips: Vec<std::net::IpAddr> = lookup.iter().collect();
                ips.sort();
                ips.dedup();
                ips
            }
            Err(e) => {
                tracing::debug!(error = %e, %host, "name did not resolve");
                vec![]
            }
        }
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
