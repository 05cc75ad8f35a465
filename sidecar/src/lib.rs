//! The Opinion Market Mesh sidecar: the proxy beside each service instance, or, in gateway
//! mode, the platform's edge.
//!
//! - [`outbound`]: app → mesh. Routes by authority (or path prefix in gateway mode), balances
//!   over the upstream's endpoints by policy, forwards on pooled connections, streams bodies.
//! - [`inbound`]: mesh → app. Strips forged `x-mesh-*` headers, forwards to `--app-addr`.
//! - [`upstream`]: endpoints, policies and the six balancers.
//! - [`control`]: registration, heartbeats, discovery and policy streams, reconnect backoff.
//! - [`snapshot`]: the fail-static snapshot in the data dir.
//! - [`probe`], [`dns`], [`admin`], [`metrics`], [`trace`], [`server`], [`proxy`].
//!
//! [`run`] takes bound listeners and a shutdown token, so tests run the real sidecar on port 0.

pub mod admin;
pub mod cache;
pub mod control;
pub mod deadline;
pub mod dns;
pub mod events;
pub mod idempotency;
pub mod identity;
pub mod inbound;
pub mod metrics;
pub mod net;
pub mod outbound;
pub mod pool;
pub mod probe;
pub mod proxy;
pub mod resilience;
pub mod server;
pub mod snapshot;
pub mod spool;
pub mod subscribe;
pub mod tls;
pub mod trace;
pub mod upstream;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use mesh_proto::policy::ServicePolicy;
use serde::{Deserialize, Serialize};
use tokio::{net::TcpListener, sync::watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

use crate::{
    inbound::Inbound,
    metrics::Metrics,
    outbound::{Outbound, Route},
    server::Handler,
    snapshot::{PolicyRecord, Snapshot, SnapshotWriter, UpstreamRecord},
    upstream::{Source, Upstreams},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Beside one service instance: inbound, outbound, registration.
    Sidecar,
    /// The platform's edge: routes public requests by path prefix into the mesh.
    Gateway,
}

/// Sidecar settings, parsed once by the binary.
#[derive(Debug, Clone)]
pub struct Config {
    pub mode: Mode,
    /// The service this sidecar serves (sidecar mode).
    pub service: Option<String>,
    pub instance_id: String,
    /// The local app (sidecar mode): TCP, or its Unix socket.
    pub app_addr: Option<mesh_runtime::LocalAddr>,
    /// Control-plane gRPC URLs, tried in turn.
    pub control_plane: Vec<String>,
    /// The address registered for other sidecars to reach this instance's inbound listener.
    pub advertise_addr: String,
    pub data_dir: PathBuf,
    pub zone: String,
    pub version: String,
    pub metadata: HashMap<String, String>,
    pub weight: u32,
    /// Services the app calls, watched from the start (others are added on first use).
    pub upstreams: Vec<String>,
    /// Gateway routes.
    pub routes: Vec<Route>,
    /// How long a request for a service met for the first time waits for its endpoints.
    pub discovery_wait: Duration,
    /// After SIGTERM and deregistration, keep serving this long so callers learn of it.
    pub drain_delay: Duration,
    /// Then stop accepting and give open requests this long to finish.
    pub drain_timeout: Duration,
    /// How long an HTTP/1 client may take to send a request head, or keep a connection idle.
    pub header_read_timeout: Duration,
    /// Gateway mode: the largest request body (0: no limit); a larger `Content-Length` is 413.
    pub max_request_body: u64,
    /// How long the inbound proxy answers a repeated `Idempotency-Key` with the first response.
    pub idempotency_window: Duration,
    /// The spool refuses new events (429) past this many pending bytes…
    pub spool_max_bytes: u64,
    /// …or while its oldest pending event is older than this.
    pub spool_max_age: Duration,
    /// Events delivered to the app by webhook.
    pub subscriptions: Vec<subscribe::Subscription>,
    /// The service's bootstrap token: with it the sidecar gets (and renews) its certificate
    /// from the mesh CA.
    pub identity_token: Option<String>,
    /// The mesh root (PEM) that an `https://` control plane's certificate must chain to.
    pub control_plane_ca: Option<String>,
}

/// Connection state toward the control plane, for `/config` and `/ready`.
#[derive(Default)]
pub struct ControlStatus {
    pub url: Mutex<String>,
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
    pub dns: dns::Dns,
    /// The local app (sidecar mode): inbound requests, probes and event deliveries reach it.
    pub app: Option<proxy::LocalApp>,
    /// Cancelled when shutdown begins.
    pub stopping: CancellationToken,
    /// The app's event spool and forwarder wake-up (or why the spool could not open).
    pub outbox: Result<events::Outbox, String>,
    /// This sidecar's certified mesh identity, once it has one (shared with the upstreams'
    /// TLS connectors).
    pub identity: Arc<identity::IdentityCell>,
    /// How to reach the control plane: TLS presenting the current certificate, when it has a CA.
    pub dialer: mesh_proto::dial::Dialer,
}

impl Shared {
    /// The shared state for `config`, and the channel announcing upstreams met for the first
    /// time (for the control loop).
    pub fn new(config: Config) -> (Arc<Shared>, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let identity = Arc::new(identity::IdentityCell::default());
        let metrics = Metrics::new();
        let (upstreams, added) =
            Upstreams::new(config.identity_token.is_some().then(|| identity.clone()), metrics.clone());
        let shared = Arc::new(Shared {
            upstreams: Arc::new(upstreams),
            own_policy: watch::channel((0, Arc::new(ServicePolicy::default()))).0,
            app_healthy: watch::channel(config.mode == Mode::Gateway).0,
            load: Arc::default(),
            metrics,
            cp: ControlStatus::default(),
            snapshot: SnapshotWriter::new(config.data_dir.clone()),
            dns: dns::Dns::default(),
            app: config.app_addr.as_ref().map(proxy::LocalApp::new),
            stopping: CancellationToken::new(),
            outbox: spool::Spool::open(
                &config.data_dir.join("spool"),
                config.spool_max_bytes,
                config.spool_max_age,
            )
            .map(events::Outbox::new)
            .map_err(|e| e.to_string()),
            dialer: identity::control_plane_dialer(config.control_plane_ca.clone(), identity.clone()),
            identity,
            config,
        });
        (shared, added)
    }

    /// The service name this sidecar's certificate is for (`gateway` for the gateway).
    pub fn identity_service(&self) -> String {
        self.config.service.clone().unwrap_or_else(|| "gateway".into())
    }

    /// Whether traffic between sidecars is mutual TLS (this sidecar has an identity token).
    pub fn mtls(&self) -> bool {
        self.config.identity_token.is_some()
    }

    fn take_snapshot(&self) -> Snapshot {
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

    fn restore(&self, snap: Snapshot) {
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

/// Bound listeners: `inbound` only in sidecar mode.
/// The gateway's default limit on a request body: 1 MiB.
pub const MAX_REQUEST_BODY: u64 = 1024 * 1024;

pub struct Listeners {
    pub inbound: Option<TcpListener>,
    /// The app's way into the mesh (TCP, or its Unix socket); the public listener in gateway mode.
    pub outbound: mesh_runtime::LocalListener,
    /// The admin API for the local app on its own (Unix) socket, besides `admin`.
    pub app_api: Option<mesh_runtime::LocalListener>,
    pub admin: TcpListener,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Snapshot(String),
    #[error("admin listener failed: {0}")]
    Admin(std::io::Error),
}

/// Runs the sidecar until `shutdown`, then: deregister, keep serving for `drain_delay`, stop
/// accepting, drain open requests for at most `drain_timeout`, stop the background tasks.
pub async fn run(config: Config, listeners: Listeners, shutdown: CancellationToken) -> Result<(), Error> {
    if config.mode == Mode::Sidecar
        && (config.service.is_none() || config.app_addr.is_none() || listeners.inbound.is_none())
    {
        return Err(Error::Config("sidecar mode needs --service, --app-addr and an inbound listener".into()));
    }
    if config.control_plane.is_empty() {
        return Err(Error::Config("name at least one control plane (--control-plane)".into()));
    }
    let (shared, added) = Shared::new(config);
    let (upstreams, metrics) = (shared.upstreams.clone(), shared.metrics.clone());
    match snapshot::load(&shared.config.data_dir).map_err(Error::Snapshot)? {
        Some(snap) => {
            tracing::info!(
                upstreams = snap.upstreams.len(),
                "serving from the snapshot until the control plane answers"
            );
            shared.restore(snap);
        }
        None => tracing::info!("no snapshot: waiting for the control plane"),
    }
    let routed =
        shared.config.routes.iter().filter(|_| shared.config.mode == Mode::Gateway).map(|r| &r.service);
    for name in shared.config.upstreams.iter().chain(routed) {
        upstreams.get_or_add(name);
    }

    // Every start-up error comes before the first task is spawned, so none is left running.
    if let Err(e) = &shared.outbox {
        return Err(Error::Config(format!("cannot open the event spool: {e}")));
    }
    let background = CancellationToken::new();
    let serving = CancellationToken::new();
    let tasks = TaskTracker::new();
    tasks.spawn(
        shared
            .snapshot
            .clone()
            .run(
                {
                    let s = shared.clone();
                    move || s.take_snapshot()
                },
                background.clone(),
            )
            .instrument(tracing::info_span!("snapshot")),
    );
    tasks.spawn(
        control::run(shared.clone(), added, background.clone()).instrument(tracing::info_span!("control")),
    );
    tasks.spawn(
        events::forward(shared.clone(), background.clone())
            .instrument(tracing::info_span!("event_forwarder")),
    );
    if let Some(token) = shared.config.identity_token.clone() {
        tasks.spawn(
            identity::run(shared.clone(), token, background.clone())
                .instrument(tracing::info_span!("identity")),
        );
    }
    for sub in shared.config.subscriptions.iter().filter(|_| shared.config.mode == Mode::Sidecar) {
        tasks.spawn(subscribe::deliver(shared.clone(), sub.clone(), background.clone()));
    }
    tasks.spawn(
        subscribe::invalidate_caches(shared.clone(), Duration::from_secs(1), background.clone())
            .instrument(tracing::info_span!("cache_invalidation")),
    );
    if let (Mode::Sidecar, Some(app)) = (shared.config.mode, shared.app.clone()) {
        tasks.spawn(
            probe::run(app, shared.own_policy.subscribe(), shared.app_healthy.clone(), background.clone())
                .instrument(tracing::info_span!("probe")),
        );
    }

    let drain = shared.config.drain_timeout;
    let header_timeout = shared.config.header_read_timeout;
    let routes = (shared.config.mode == Mode::Gateway).then(|| shared.config.routes.clone());
    let mut outbound =
        Outbound::new(upstreams.clone(), metrics.clone(), routes, shared.config.discovery_wait);
    if shared.config.mode == Mode::Gateway {
        outbound.max_request_body = shared.config.max_request_body;
    }
    let outbound = Arc::new(outbound);
    let handler: Handler = Arc::new(move |req, _| server::boxed_in_place(|| outbound.clone().handle(req)));
    let name = if shared.config.mode == Mode::Gateway { "gateway" } else { "outbound" };
    let mut servers = vec![tokio::spawn(server::serve(
        listeners.outbound,
        handler,
        serving.clone(),
        drain,
        name,
        None,
        header_timeout,
    ))];
    if let (Some(listener), Some(app), Some(service)) =
        (listeners.inbound, shared.app.clone(), &shared.config.service)
    {
        let mut inbound = Inbound::new(
            service.clone(),
            app,
            shared.own_policy.subscribe(),
            metrics.clone(),
            shared.load.clone(),
            shared.config.idempotency_window,
        );
        inbound.mtls = shared.mtls();
        let inbound = Arc::new(inbound);
        let handler: Handler =
            Arc::new(move |req, peer| server::boxed_in_place(|| inbound.clone().handle(req, peer.clone())));
        let tls = shared.mtls().then(|| shared.identity.clone());
        servers.push(tokio::spawn(server::serve(
            listener,
            handler,
            serving.clone(),
            drain,
            "inbound",
            tls,
            header_timeout,
        )));
    }
    let admin = tokio::spawn(
        mesh_runtime::serve_http(
            listeners.admin.into(),
            admin::router(shared.clone()),
            background.clone().cancelled_owned(),
        )
        .instrument(tracing::info_span!("admin")),
    );
    if let Some(listener) = listeners.app_api {
        // The same API for the local app on its own socket; it stops with the admin listener.
        tasks.spawn(
            mesh_runtime::serve_http(
                listener,
                admin::router(shared.clone()),
                background.clone().cancelled_owned(),
            )
            .instrument(tracing::info_span!("app_api")),
        );
    }

    shutdown.cancelled().await;
    shared.stopping.cancel();
    tracing::info!("shutting down: deregistering, then draining");
    control::deregister(&shared, Duration::from_secs(2)).await;
    tokio::time::sleep(shared.config.drain_delay).await;
    serving.cancel();
    for s in servers {
        let _ = s.await;
    }
    background.cancel();
    shared.dns.stop_all();
    tasks.close();
    tasks.wait().await;
    admin.await.map_err(|e| Error::Admin(std::io::Error::other(e)))?.map_err(Error::Admin)?;
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue #15.5: a start-up error leaves no task behind (the snapshot writer used to be
    /// spawned before the spool was checked, and waited forever on a token nobody cancelled).
    #[tokio::test]
    async fn a_start_up_error_leaves_no_task_running() {
        let dir = tempfile::tempdir().unwrap();
        // The spool's directory is a file: opening the spool fails.
        std::fs::write(dir.path().join("spool"), b"").unwrap();
        let config = crate::control::tests::config(dir.path());
        let bind = || async { TcpListener::bind("127.0.0.1:0").await.unwrap() };
        let listeners = Listeners {
            inbound: Some(bind().await),
            outbound: bind().await.into(),
            app_api: None,
            admin: bind().await,
        };
        let tasks = || tokio::runtime::Handle::current().metrics().num_alive_tasks();
        let before = tasks();
        let err = run(config, listeners, CancellationToken::new()).await.unwrap_err();
        assert!(err.to_string().contains("spool"), "{err}");
        assert_eq!(tasks(), before, "a task was left running");
    }
}
