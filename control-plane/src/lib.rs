//! The Opinion Market Mesh control plane.
//!
//! - [`registry`]: instances, heartbeats, TTL expiry with self-preservation, deregistration; one
//!   `watch` channel per service feeds discovery.
//! - [`policy`]: versioned per-service policies, persisted and pushed.
//! - [`store`]: the redb file in the data dir; fsync before anything is acknowledged.
//! - [`api`]: the gRPC handlers (`Registry`, `Discovery`, `Policy`, `Events`, `Admin`).
//! - [`bus`]: the event bus (embedded in the store, or [`bus_nats`] on NATS JetStream).
//! - [`http`]: the admin HTTP listener (`/metrics`, `/healthz`).
//! - [`cli`]: `meshctl`, a thin client of the API.
//!
//! [`ControlPlane::open`] restores state from a data dir; [`ControlPlane::serve`] takes bound
//! listeners and a shutdown token, so tests run it on port 0 exactly as the binary does.

pub mod api;
pub mod auth;
pub mod bus;
pub mod bus_nats;
pub mod ca;
pub mod cli;
pub mod http;
pub mod metrics;
pub mod policy;
pub mod proxies;
pub mod registry;
pub mod store;
pub mod tls;
pub mod watch_limits;

use std::{path::PathBuf, sync::Arc, time::Duration};

use mesh_proto::v1;
use tokio::{net::TcpListener, time::Instant};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

use crate::{
    api::Api, metrics::Metrics, policy::Policies, proxies::Proxies, registry::Registry, store::Store,
};

/// Control-plane settings (the binary fills these from flags and `MESH_*` variables).
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the redb file lives.
    pub data_dir: PathBuf,
    /// Idle discovery streams get a PING this often.
    pub ping_interval: Duration,
    /// How often TTLs are checked: expiry happens at most this long after the TTL passed.
    pub sweep_interval: Duration,
    /// HTTP/2 streams one connection may open (discovery + policy streams of many proxies).
    pub max_concurrent_streams: u32,
    /// After a restart, restored instances do not expire before this has passed (on top of
    /// their TTL): time for every sidecar to reconnect through its backoff.
    pub restart_grace: Duration,
    /// Where the event bus keeps its log.
    pub bus: BusBackend,
    /// How long and how much of each topic the bus keeps.
    pub retention: bus::Retention,
    /// How often the bus applies retention (embedded) or refreshes heads (NATS).
    pub bus_maintenance_interval: Duration,
    /// The mesh's SPIFFE trust domain.
    pub trust_domain: String,
    /// The operator's own root (certificate, key); default: created in the data dir.
    pub ca_files: Option<(PathBuf, PathBuf)>,
    /// Lifetime of the certificates the CA issues.
    pub cert_ttl: Duration,
    /// Serve the gRPC API in plaintext with no authentication (a throwaway local run only).
    pub insecure_api: bool,
    /// Names (DNS or IP) the API's certificate carries besides `localhost` and `127.0.0.1`.
    pub api_names: Vec<String>,
    /// The admin token's file; default `admin.token` in the data dir, created on first start.
    pub admin_token_file: Option<PathBuf>,
    /// TLS handshakes in progress at once on the gRPC listener; connections beyond are closed at
    /// once, so clients that connect and never finish a handshake cannot pile up.
    pub max_pending_handshakes: usize,
}

/// The event bus's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusBackend {
    /// In the control plane's redb file (default).
    Embedded,
    /// NATS JetStream at this URL.
    Nats(String),
}

impl Config {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            ping_interval: Duration::from_secs(15),
            sweep_interval: Duration::from_millis(50),
            max_concurrent_streams: 16_384,
            restart_grace: Duration::from_secs(15),
            bus: BusBackend::Embedded,
            retention: bus::Retention::default(),
            bus_maintenance_interval: Duration::from_secs(60),
            trust_domain: "mesh.local".into(),
            ca_files: None,
            cert_ttl: Duration::from_secs(24 * 3600),
            insecure_api: false,
            api_names: Vec::new(),
            admin_token_file: None,
            max_pending_handshakes: 1024,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("event bus: {0}")]
    Bus(#[from] bus::BusError),
    #[error("certificate authority: {0}")]
    Ca(#[from] ca::CaError),
    #[error("admin token file {path}: {reason}")]
    AdminToken { path: String, reason: String },
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("admin HTTP server failed: {0}")]
    Admin(#[source] std::io::Error),
}

pub struct ControlPlane {
    config: Config,
    state: Arc<api::State>,
}

impl ControlPlane {
    /// Opens the data dir and restores policies and instances (each instance with a fresh TTL);
    /// connects to NATS when the bus lives there.
    pub async fn open(config: Config) -> Result<Self, Error> {
        let (store, loaded) = Store::open(&config.data_dir)?;
        let metrics = Metrics::new();
        let policies = Arc::new(Policies::new(store.clone(), loaded.policies)?);
        let bus = match &config.bus {
            BusBackend::Embedded => bus::Bus::embedded(store.clone(), config.retention)?,
            BusBackend::Nats(url) => bus::Bus::nats(url, config.retention).await?,
        };
        tracing::info!(
            epoch = loaded.epoch,
            instances = loaded.instances.len(),
            policies = policies.list().len(),
            bus = bus.kind(),
            data_dir = %config.data_dir.display(),
            "state restored"
        );
        let store_handle = store.clone();
        let registry = Registry::new(
            store,
            policies.clone(),
            metrics.clone(),
            loaded.epoch,
            loaded.instances,
            Instant::now(),
            config.restart_grace,
        );
        let ca =
            ca::Ca::open(&config.data_dir, config.ca_files.clone(), &config.trust_domain, config.cert_ttl)?;
        let auth = if config.insecure_api {
            tracing::warn!(
                "the gRPC API is plaintext and unauthenticated (--insecure-api): anyone who reaches it is admin"
            );
            auth::Auth::open()
        } else {
            let token = auth::admin_token(&config.data_dir, config.admin_token_file.as_deref())?;
            auth::Auth::enforcing(&token, &config.trust_domain)
        };
        let state = Arc::new(api::State {
            auth,
            registry,
            bus,
            ca,
            store: store_handle,
            policies,
            metrics,
            proxies: Proxies::default(),
            watch_limits: Default::default(),
            started: Instant::now(),
            data_dir: config.data_dir.display().to_string(),
            ping_interval: config.ping_interval,
            shutdown: CancellationToken::new(),
        });
        Ok(Self { config, state })
    }

    /// Serves gRPC on `grpc` and admin HTTP on `admin` until `shutdown` is cancelled, then ends
    /// every stream and drains.
    pub async fn serve(
        self,
        grpc: TcpListener,
        admin: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        let state = self.state;
        let tasks = TaskTracker::new();
        // Streams follow the server's own token, so cancelling it ends them and lets the
        // gRPC server's graceful shutdown finish.
        let own = state.shutdown.clone();
        mesh_runtime::spawn_tracked(&tasks, tracing::info_span!("shutdown_relay"), {
            let (shutdown, own) = (shutdown.clone(), own.clone());
            async move {
                shutdown.cancelled().await;
                own.cancel();
            }
        });

        mesh_runtime::spawn_tracked(
            &tasks,
            tracing::info_span!("sweeper"),
            sweeper(state.clone(), self.config.sweep_interval),
        );
        mesh_runtime::spawn_tracked(&tasks, tracing::info_span!("bus_maintenance"), {
            let (state, every) = (state.clone(), self.config.bus_maintenance_interval);
            async move { state.bus.maintain(every, state.shutdown.clone()).await }
        });

        let admin_task = mesh_runtime::spawn_tracked(&tasks, tracing::info_span!("admin_http"), {
            let router = http::router(state.clone());
            let own = own.clone();
            async move { axum::serve(admin, router).with_graceful_shutdown(own.cancelled_owned()).await }
        });

        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        for name in [
            "",
            "mesh.v1.Registry",
            "mesh.v1.Discovery",
            "mesh.v1.Policy",
            "mesh.v1.Admin",
            "mesh.v1.Events",
            "mesh.v1.Identity",
        ] {
            health_reporter.set_service_status(name, tonic_health::ServingStatus::Serving).await;
        }
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(mesh_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| Error::Admin(std::io::Error::other(e)))?;
        // The API's description is for the mesh's members and the admin, like the API itself;
        // grpc.health.v1 stays open to any TLS client, as liveness probes carry no credential.
        let reflection = {
            let state = state.clone();
            tonic::service::interceptor::InterceptedService::new(reflection, move |req: tonic::Request<()>| {
                state.auth.member(&req, "list the API by reflection").map_err(|s| api::refused(&state, s))?;
                Ok(req)
            })
        };

        let api = Api(state.clone());
        let router = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(20)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .max_concurrent_streams(Some(self.config.max_concurrent_streams))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(v1::registry_server::RegistryServer::new(api.clone()))
            .add_service(v1::discovery_server::DiscoveryServer::new(api.clone()))
            .add_service(v1::policy_server::PolicyServer::new(api.clone()))
            .add_service(v1::events_server::EventsServer::new(api.clone()))
            .add_service(v1::identity_server::IdentityServer::new(api.clone()))
            .add_service(v1::admin_server::AdminServer::new(api));
        let grpc_result = if self.config.insecure_api {
            router
                .serve_with_incoming_shutdown(TcpListenerStream::new(grpc), own.clone().cancelled_owned())
                .instrument(tracing::info_span!("grpc"))
                .await
        } else {
            let tls = tls::server_config(state.clone(), &self.config.api_names)?;
            let incoming =
                tls::incoming(grpc, tls, state.clone(), self.config.max_pending_handshakes, own.clone());
            router
                .serve_with_incoming_shutdown(incoming, own.clone().cancelled_owned())
                .instrument(tracing::info_span!("grpc", tls = true))
                .await
        };
        own.cancel();
        health_reporter.set_not_serving::<v1::registry_server::RegistryServer<Api>>().await;
        tasks.close();
        let admin_result = admin_task.await.map_err(|e| Error::Admin(std::io::Error::other(e)))?;
        tasks.wait().await;
        grpc_result?;
        admin_result.map_err(Error::Admin)
    }

    pub fn state(&self) -> &Arc<api::State> {
        &self.state
    }
}

async fn sweeper(state: Arc<api::State>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = tick.tick() => {
                if let Err(e) = state.registry.sweep_and_deregister(Instant::now()).await {
                    tracing::error!(error = %e, "deregistering expired instances failed; will retry");
                }
            }
        }
    }
}
