//! What every part of the sidecar shares ([`Shared`]): the config, the upstreams, the own
//! policy, the app's health, metrics, the control-plane status, the snapshot writer, the event
//! outbox and the mesh identity.

use crate::{
    config::{Config, Mode},
    endpoint::local_app::LocalApp,
    events::{outbox::Outbox, spool::Spool},
    identity::cell::{self, IdentityCell},
    metrics::Metrics,
    upstream::{
        Source, Upstreams,
        dns::Dns,
        snapshot::{PolicyRecord, Snapshot, SnapshotWriter, UpstreamRecord},
    },
};

use mesh_proto::policy::ServicePolicy;
use mesh_runtime::telemetry::{Sampling, Telemetry};
use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, AtomicUsize, Ordering},
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Connection state toward the control plane, for `/config` and `/ready`.
#[derive(Default)]
pub struct ControlStatus {
    pub url: Mutex<String>,
    /// The address the current URL's name resolved to and the session uses (none: the URL
    /// names an address, or the system resolves it at connect time).
    pub address: Mutex<Option<std::net::SocketAddr>>,
    pub connected: AtomicBool,
    pub registered: AtomicBool,
    pub synced: AtomicBool,
    pub from_snapshot: AtomicBool,
    pub last_error: Mutex<String>,
}

/// What every part of the sidecar shares.
pub struct Shared {
    pub config: Config,
    pub upstreams: Arc<Upstreams>,
    pub own_policy: watch::Sender<(u64, Arc<ServicePolicy>)>,
    pub app_healthy: watch::Sender<bool>,
    /// Inbound requests in flight (the load reported in heartbeats).
    pub load: Arc<AtomicUsize>,
    pub metrics: Arc<Metrics>,
    pub cp: ControlStatus,
    pub snapshot: Arc<SnapshotWriter>,
    pub dns: Dns,
    /// The local app (sidecar mode): inbound requests, probes and event deliveries reach it.
    pub app: Option<LocalApp>,
    /// Cancelled when shutdown begins.
    pub stopping: CancellationToken,
    /// The app's event spool and forwarder wake-up (or why the spool could not open).
    pub outbox: Result<Outbox, String>,
    /// This sidecar's certified mesh identity, once it has one (shared with the upstreams'
    /// TLS connectors).
    pub identity: Arc<IdentityCell>,
    /// How to reach the control plane: TLS presenting the current certificate, when it has a CA.
    pub dialer: mesh_proto::dial::Dialer,
    /// Where this sidecar's spans go (off unless an OTLP endpoint is configured)…
    pub telemetry: Telemetry,
    /// …and the share of new traces it samples (the own service's policy, `tracing.sampling`).
    pub sampling: Arc<Sampling>,
    /// Operators' taps on this proxy's service.
    pub tap: Arc<crate::control::tap::Tap>,
    /// At the edge: what each route's calls came to, for the topology reports.
    pub route_edges: Arc<crate::upstream::edge::RouteEdges>,
    /// The outbound proxy, once built (operators' calls go out through it).
    pub outbound: std::sync::OnceLock<Arc<crate::outbound::Outbound>>,
}

impl Shared {
    /// The shared state for `config`, and the channel announcing upstreams met for the first
    /// time (for the control loop).
    pub fn new(
        config: Config,
        telemetry: Telemetry,
    ) -> (Arc<Shared>, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let identity = Arc::new(IdentityCell::default());
        let metrics = Metrics::new();
        let (upstreams, added) =
            Upstreams::new(config.identity_token.is_some().then(|| identity.clone()), metrics.clone());
        let own = config.service.clone().unwrap_or_else(|| mesh_proto::gateway::GATEWAY_SERVICE.into());
        let tap = Arc::new(crate::control::tap::Tap::new(config.instance_id.clone(), own));
        let shared = Arc::new(Shared {
            upstreams: Arc::new(upstreams),
            own_policy: watch::channel((0, Arc::new(ServicePolicy::default()))).0,
            app_healthy: watch::channel(config.mode == Mode::Gateway).0,
            load: Arc::default(),
            metrics,
            cp: ControlStatus::default(),
            snapshot: SnapshotWriter::new(config.data_dir.clone()),
            dns: Dns::new(config.dns_server),
            app: config.app_addr.as_ref().map(LocalApp::new),
            stopping: CancellationToken::new(),
            outbox: Spool::open(&config.data_dir.join("spool"), config.spool_max_bytes, config.spool_max_age)
                .map(Outbox::new)
                .map_err(|e| e.to_string()),
            dialer: cell::control_plane_dialer(config.control_plane_ca.clone(), identity.clone()),
            identity,
            config,
            telemetry,
            sampling: Arc::new(Sampling::new(mesh_runtime::telemetry::default_sampling())),
            tap,
            route_edges: Default::default(),
            outbound: Default::default(),
        });
        (shared, added)
    }

    /// The service name this sidecar's certificate is for, and whose policy is its own: the
    /// gateway's is `gateway` (that policy carries its routes).
    pub fn identity_service(&self) -> String {
        self.config.service.clone().unwrap_or_else(|| mesh_proto::gateway::GATEWAY_SERVICE.into())
    }

    /// Whether traffic between sidecars is mutual TLS (this sidecar has an identity token).
    pub fn mtls(&self) -> bool {
        self.config.identity_token.is_some()
    }

    pub(crate) fn take_snapshot(&self) -> Snapshot {
        let (v, p) = self.own_policy.borrow().clone();
        let own_policy = (v > 0).then(|| PolicyRecord { version: v, policy: (*p).clone() });
        let upstreams = self
            .upstreams
            .all()
            .into_iter()
            .filter(|u| u.source() != Source::None)
            .map(|u| {
                let set = u.endpoints();
                let p = u.policy();
                let policy =
                    (p.version > 0).then(|| PolicyRecord { version: p.version, policy: (*p.policy).clone() });
                (
                    u.name.clone(),
                    UpstreamRecord { endpoints_version: set.version, endpoints: set.infos(), policy },
                )
            })
            .collect();
        Snapshot { own_policy, upstreams }
    }

    pub(crate) fn restore(&self, snap: Snapshot) {
        if let Some(own) = snap.own_policy {
            self.own_policy.send_replace((own.version, Arc::new(own.policy)));
        }
        for (name, rec) in snap.upstreams {
            let up = self.upstreams.get_or_add(&name);
            if let Some(p) = rec.policy {
                self.dns.sync(&up, p.policy.external.as_ref());
                up.set_policy(p.version, p.policy);
            }
            up.set_endpoints(rec.endpoints_version, rec.endpoints, Source::Snapshot);
        }
        self.cp.from_snapshot.store(true, Ordering::Relaxed);
    }
}
