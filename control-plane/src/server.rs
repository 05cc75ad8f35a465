//! The control plane as one server: [`ControlPlane::open`] restores state from a data dir;
//! [`ControlPlane::serve`] takes bound listeners and a shutdown token, so tests run it on port 0
//! exactly as the binary does.

use crate::{
    api::{Api, status::refused},
    auth, bus, ca,
    config::{BusBackend, Config, StoreBackend},
    error::Error,
    etcd::{Cluster, seal::SealKey, sync::sealed_once},
    http,
    metrics::Metrics,
    policy::Policies,
    proxies::Proxies,
    registry::Registry,
    state::State,
    store::Store,
    transport,
};

use mesh_proto::v1;
use std::{sync::Arc, time::Duration};
use tokio::{net::TcpListener, time::Instant};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

pub struct ControlPlane {
    config: Config,
    state: Arc<State>,
}

impl ControlPlane {
    /// Opens the data dir and restores policies and instances (each instance with a fresh TTL);
    /// connects to NATS when the bus lives there.
    pub async fn open(config: Config) -> Result<Self, Error> {
        let (store, loaded) = Store::open(&config.data_dir)?;
        let (store, loaded, cluster) = match &config.store {
            StoreBackend::Embedded => (store, loaded, None),
            StoreBackend::Etcd(e) => {
                if !matches!(config.bus, BusBackend::Nats(_)) {
                    return Err(Error::Config(
                        "--store etcd needs an event bus every replica shares: add --bus nats --nats-url URL \
                         (the embedded bus lives in one replica's data dir)"
                            .into(),
                    ));
                }
                let cluster = Cluster::connect(e.options.clone(), &e.prefix, e.replica.clone())
                    .await
                    .map_err(|e| Error::Store(e.into()))?;
                // Everything comes from etcd: nothing is restored from the data dir.
                (store.shared(cluster.clone()), Default::default(), Some(cluster))
            }
        };
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
        let seal = match (&config.store, &cluster) {
            (StoreBackend::Etcd(e), Some(_))
                if config.ca_files.is_none() || config.admin_token_file.is_none() =>
            {
                let path = e.seal_key_file.as_ref().ok_or_else(|| {
                    Error::Config(
                        "--store etcd shares the mesh root and the admin token through etcd, sealed with \
                         --ca-seal-key-file (64 hex digits, the same file on every replica); or give \
                         --ca-cert/--ca-key and --admin-token-file to every replica"
                            .into(),
                    )
                })?;
                Some(SealKey::read(path).map_err(|e| Error::Config(e.to_string()))?)
            }
            _ => None,
        };
        let ca = match (&cluster, &seal, &config.ca_files) {
            (Some(c), Some(seal), None) => {
                let root = sealed_once(c, seal, "ca/root", || {
                    let (cert, key) = ca::new_root(&config.trust_domain)?;
                    Ok(serde_json::to_vec(&serde_json::json!({"cert": cert, "key": key})).unwrap_or_default())
                })
                .await?;
                let root: serde_json::Value = serde_json::from_slice(&root)
                    .map_err(|e| Error::Config(format!("the shared root in etcd: {e}")))?;
                let (cert, key) =
                    (root["cert"].as_str().unwrap_or_default(), root["key"].as_str().unwrap_or_default());
                // Beside the data dir as with one control plane: what meshctl and sidecars trust.
                ca::write_file(&config.data_dir.join("ca.pem"), cert)?;
                ca::Ca::from_pems(cert, key, &config.trust_domain, config.cert_ttl)?
            }
            _ => ca::Ca::open(
                &config.data_dir,
                config.ca_files.clone(),
                &config.trust_domain,
                config.cert_ttl,
            )?,
        };
        let auth = if config.insecure_api {
            tracing::warn!(
                "the gRPC API is plaintext and unauthenticated (--insecure-api): anyone who reaches it is admin"
            );
            auth::Auth::open()
        } else {
            let token = match (&cluster, &seal, &config.admin_token_file) {
                (Some(c), Some(seal), None) => {
                    let token = sealed_once(c, seal, "admin/token", || {
                        mesh_runtime::random_token()
                            .map(String::into_bytes)
                            .ok_or_else(|| Error::Config("no randomness for a token".into()))
                    })
                    .await?;
                    let token = String::from_utf8_lossy(&token).into_owned();
                    let path = config.data_dir.join("admin.token");
                    ca::write_private(&path, &format!("{token}\n"))?;
                    token
                }
                _ => auth::admin_token(&config.data_dir, config.admin_token_file.as_deref())?,
            };
            auth::Auth::enforcing(&token, &config.trust_domain)
        };
        let state = Arc::new(State {
            auth,
            registry,
            bus,
            ca: Arc::new(ca),
            store: store_handle,
            policies,
            metrics,
            proxies: Proxies::default(),
            topology: crate::topology::Topology::new(config.topology_slot),
            taps: Default::default(),
            watch_limits: Default::default(),
            started: Instant::now(),
            data_dir: config.data_dir.display().to_string(),
            ping_interval: config.ping_interval,
            shutdown: CancellationToken::new(),
        });
        if let Some(c) = &cluster {
            crate::etcd::sync::follow(&state, c, config.restart_grace).await?;
            tracing::info!(
                replica = %c.replica,
                instances = state.registry.counts().1,
                policies = state.policies.list().len(),
                "shared state read from etcd"
            );
        }
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

        if let Some(c) = state.store.cluster() {
            let report = {
                let state = state.clone();
                move || crate::api::admin::proxies_report(&state)
            };
            mesh_runtime::spawn_tracked(
                &tasks,
                tracing::info_span!("etcd_replica"),
                c.clone().run(own.clone(), report),
            );
        }
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
        // Reflection in both versions: v1, and v1alpha, which grpcurl and grpcio-reflection's
        // clients still ask for.
        let describe = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(mesh_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection = describe().build_v1().map_err(|e| Error::Admin(std::io::Error::other(e)))?;
        let reflection_alpha =
            describe().build_v1alpha().map_err(|e| Error::Admin(std::io::Error::other(e)))?;
        // The API's description is for the mesh's members and the admin, like the API itself;
        // grpc.health.v1 stays open to any TLS client, as liveness probes carry no credential.
        let members_only = {
            let state = state.clone();
            move |req: tonic::Request<()>| {
                state.auth.member(&req, "list the API by reflection").map_err(|s| refused(&state, s))?;
                Ok(req)
            }
        };
        let reflection =
            tonic::service::interceptor::InterceptedService::new(reflection, members_only.clone());
        let reflection_alpha =
            tonic::service::interceptor::InterceptedService::new(reflection_alpha, members_only);

        let telemetry =
            mesh_runtime::telemetry::Telemetry::start("control-plane", self.config.otlp_endpoint.as_deref())
                .map_err(Error::Telemetry)?;
        let api = Api(state.clone());
        let router = tonic::transport::Server::builder()
            .layer(crate::traced::TraceLayer::new(telemetry.clone()))
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(20)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .max_concurrent_streams(Some(self.config.max_concurrent_streams))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_alpha)
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
            let tls = transport::tls::server_config(state.ca.clone(), &self.config.api_names)?;
            let incoming = transport::tls::incoming(
                grpc,
                tls,
                state.metrics.api_handshake_failures.clone(),
                self.config.max_pending_handshakes,
                own.clone(),
            );
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
        telemetry.shutdown().await;
        grpc_result?;
        admin_result.map_err(Error::Admin)
    }

    pub fn state(&self) -> &Arc<State> {
        &self.state
    }
}

async fn sweeper(state: Arc<State>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = tick.tick() => {
                let sweeping = state.store.cluster().is_none_or(|c| c.is_sweeper());
                state.metrics.sweeper.set(i64::from(sweeping));
                if let Err(e) = state.registry.sweep_and_deregister(Instant::now()).await {
                    tracing::error!(error = %e, "deregistering expired instances failed; will retry");
                }
            }
        }
    }
}
