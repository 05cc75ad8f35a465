//! The Opinion Market Mesh sidecar: the proxy beside each service instance, or, in gateway
//! mode, the platform's edge.
//!
//! Laid out by the request path:
//! - `server`: accepting (HTTP/1.1, h2c or mutual TLS) and draining; `http`: bodies, headers,
//!   refusals, trace context.
//! - [`outbound`]: app → mesh — route, cache, concurrency limit, balance, forward, retry,
//!   breakers; each a file, `fetch` their composition.
//! - `inbound`: mesh → app — authorization, rate limits, idempotency, the app's socket.
//! - [`endpoint`]: connection pools and forwarding; `upstream`: endpoints, applied policies,
//!   DNS, the fail-static snapshot.
//! - [`transport`]: TCP and mutual TLS; [`identity`]: the certificate and its renewal.
//! - `control`: registration, heartbeats, the discovery and policy streams, the app's health.
//! - [`events`]: the publish API, spool and forwarder; webhooks and cache invalidation.
//! - `admin`, `metrics`; [`config`]: every setting and its default.
//!
//! [`run`] takes a [`Config`], bound listeners and a shutdown token, so tests run the real
//! sidecar on port 0.

pub(crate) mod admin;
pub mod config;
pub(crate) mod control;
pub mod endpoint;
pub mod events;
pub mod gateway;
pub(crate) mod http;
pub mod identity;
pub(crate) mod inbound;
pub(crate) mod metrics;
pub mod outbound;
pub(crate) mod server;
pub(crate) mod shared;
pub mod transport;
pub(crate) mod upstream;

pub use config::{Config, Mode};

use crate::{
    control::{probe, registration, session},
    events::{forwarder, invalidation, webhook},
    gateway::{access_log::AccessLog, auth::EdgeAuth, edge::Edge},
    inbound::Inbound,
    outbound::Outbound,
    server::{Handler, Listen, ServerTls},
    shared::Shared,
    transport::public_tls::PublicTls,
    upstream::snapshot,
};

use mesh_runtime::{Backoff, spawn, spawn_tracked, telemetry::Telemetry};
use std::{sync::Arc, time::Duration};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// How often the gateway drops idle rate-limit keys and expired blocks.
const EDGE_SWEEP_EVERY: Duration = Duration::from_secs(10);

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
    let telemetry =
        Telemetry::start(config.service.as_deref().unwrap_or("gateway"), config.otlp_endpoint.as_deref())
            .map_err(Error::Config)?;
    let (shared, added) = Shared::new(config, telemetry);
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
    let edge_auth = match (&shared.config.edge_auth, shared.config.mode) {
        (Some(cfg), Mode::Gateway) => Some(Arc::new(
            EdgeAuth::load(cfg.clone()).await.map_err(|e| Error::Config(format!("end-user tokens: {e}")))?,
        )),
        _ => None,
    };
    let background = CancellationToken::new();
    let edge = match shared.config.mode {
        Mode::Gateway => {
            let c = &shared.config;
            let log =
                AccessLog::start(&c.access_log, c.access_log_sample, metrics.access_log_dropped.clone())
                    .map_err(|e| Error::Config(format!("--access-log {:?}: {e}", c.access_log)))?;
            let edge = Edge::new(
                c.edge.clone(),
                c.public_tls.is_some(),
                edge_auth.clone(),
                c.routes.clone(),
                log,
                metrics.clone(),
            )
            .map_err(|e| Error::Config(format!("gateway routes: {e}")))?;
            Some(Arc::new(edge))
        }
        Mode::Sidecar => None,
    };
    let public_tls = match (&shared.config.public_tls, shared.config.mode) {
        (Some(files), Mode::Gateway) => Some(Arc::new(
            PublicTls::load(files.clone())
                .map_err(|e| Error::Config(format!("--tls-cert / --tls-key: {e}")))?,
        )),
        _ => None,
    };
    let serving = CancellationToken::new();
    let tasks = TaskTracker::new();
    spawn_tracked(
        &tasks,
        tracing::info_span!("snapshot"),
        shared.snapshot.clone().run(
            {
                let s = shared.clone();
                move || s.take_snapshot()
            },
            background.clone(),
        ),
    );
    spawn_tracked(
        &tasks,
        tracing::info_span!("control"),
        session::run(shared.clone(), added, background.clone()),
    );
    spawn_tracked(
        &tasks,
        tracing::info_span!("event_forwarder"),
        forwarder::forward(shared.clone(), background.clone()),
    );
    if let Some(token) = shared.config.identity_token.clone() {
        spawn_tracked(
            &tasks,
            tracing::info_span!("identity"),
            identity::run(shared.clone(), token, background.clone()),
        );
    }
    for sub in shared.config.subscriptions.iter().filter(|_| shared.config.mode == Mode::Sidecar) {
        spawn_tracked(
            &tasks,
            tracing::info_span!("webhook", topic = %sub.topic),
            webhook::deliver(shared.clone(), sub.clone(), background.clone()),
        );
    }
    spawn_tracked(
        &tasks,
        tracing::info_span!("cache_invalidation"),
        invalidation::invalidate_caches(shared.clone(), Duration::from_secs(1), background.clone()),
    );
    if let (Mode::Sidecar, Some(app)) = (shared.config.mode, shared.app.clone()) {
        spawn_tracked(
            &tasks,
            tracing::info_span!("probe"),
            probe::run(app, shared.own_policy.subscribe(), shared.app_healthy.clone(), background.clone()),
        );
    }

    // The share of new traces sampled follows the own service's policy.
    let (stop, mut policy, sampling) =
        (background.clone(), shared.own_policy.subscribe(), shared.sampling.clone());
    spawn_tracked(&tasks, tracing::info_span!("trace_sampling"), async move {
        let default = mesh_runtime::telemetry::default_sampling();
        loop {
            let share = policy.borrow_and_update().1.tracing.sampling;
            sampling.set(share.map_or(default, |r| r.parts_per_million()));
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = policy.changed() => if changed.is_err() { return },
            }
        }
    });
    if let Some(auth) = edge_auth.clone() {
        let stop = background.clone();
        spawn_tracked(&tasks, tracing::info_span!("jwks_refresh"), async move {
            while Backoff::sleep(auth.refresh_interval(), &stop).await {
                auth.reload(false).await;
            }
        });
    }

    let drain = shared.config.drain_timeout;
    let header_timeout = shared.config.header_read_timeout;
    let mut outbound = Outbound::new(upstreams.clone(), metrics.clone(), shared.config.discovery_wait);
    if let Some(public) = public_tls.clone() {
        let (stop, every) = (background.clone(), shared.config.tls_reload);
        spawn_tracked(&tasks, tracing::info_span!("public_tls_reload"), async move {
            while Backoff::sleep(every, &stop).await {
                public.reload();
            }
        });
    }
    let public_tls = public_tls.map(ServerTls::Public);
    if let Some(edge) = edge.clone() {
        let (sweeping, stop) = (edge.clone(), background.clone());
        spawn_tracked(&tasks, tracing::info_span!("edge_sweep"), async move {
            while Backoff::sleep(EDGE_SWEEP_EVERY, &stop).await {
                sweeping.sweep();
            }
        });
        // Routes from the control plane (the `gateway` policy, ACKed once durable) or, restored
        // from the snapshot, the last ones it pushed.
        let (stop, mut policy) = (background.clone(), shared.own_policy.subscribe());
        spawn_tracked(&tasks, tracing::info_span!("gateway_routes"), async move {
            loop {
                let (version, p) = policy.borrow_and_update().clone();
                if let Err(e) = edge.apply(version, &p.gateway) {
                    tracing::error!(version, error = %e, "gateway policy not applied; the previous one stays");
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    changed = policy.changed() => if changed.is_err() { return },
                }
            }
        });
    }
    outbound.edge = edge.clone();
    outbound.telemetry = shared.telemetry.clone();
    outbound.sampling = shared.sampling.clone();
    outbound.count_edges = !shared.config.edge_report_interval.is_zero();
    outbound.tap = shared.tap.clone();
    outbound.route_edges = shared.route_edges.clone();
    let outbound = Arc::new(outbound);
    let _ = shared.outbound.set(outbound.clone());
    let handler: Handler = Arc::new(move |req, peer| {
        server::boxed_in_place(|| outbound.clone().handle(req, peer.addr, peer.framing.clone()))
    });
    let gateway = shared.config.mode == Mode::Gateway;
    let name = if shared.config.mode == Mode::Gateway { "gateway" } else { "outbound" };
    let mut servers = vec![spawn(
        tracing::info_span!("listener", name),
        server::serve(
            listeners.outbound,
            handler,
            serving.clone(),
            Listen {
                name,
                drain,
                tls: public_tls,
                header_read_timeout: header_timeout,
                guard_framing: gateway,
            },
        ),
    )];
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
        inbound.trusted_edges = shared.config.trusted_edges.clone();
        inbound.telemetry = shared.telemetry.clone();
        inbound.sampling = shared.sampling.clone();
        inbound.tap = shared.tap.clone();
        let inbound = Arc::new(inbound);
        let handler: Handler =
            Arc::new(move |req, peer| server::boxed_in_place(|| inbound.clone().handle(req, peer.clone())));
        let tls = shared.mtls().then(|| ServerTls::Mesh(shared.identity.clone()));
        servers.push(spawn(
            tracing::info_span!("listener", name = "inbound"),
            server::serve(
                listener,
                handler,
                serving.clone(),
                Listen {
                    name: "inbound",
                    drain,
                    tls,
                    header_read_timeout: header_timeout,
                    guard_framing: false,
                },
            ),
        ));
    }
    let admin = spawn(
        tracing::info_span!("admin"),
        mesh_runtime::serve_http(
            listeners.admin.into(),
            admin::router(shared.clone(), edge.clone()),
            background.clone().cancelled_owned(),
        ),
    );
    if let Some(listener) = listeners.app_api {
        // The same API for the local app on its own socket; it stops with the admin listener.
        spawn_tracked(
            &tasks,
            tracing::info_span!("app_api"),
            mesh_runtime::serve_http(
                listener,
                admin::router(shared.clone(), edge.clone()),
                background.clone().cancelled_owned(),
            ),
        );
    }

    shutdown.cancelled().await;
    shared.stopping.cancel();
    tracing::info!("shutting down: deregistering, then draining");
    registration::deregister(&shared, Duration::from_secs(2)).await;
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
    shared.telemetry.shutdown().await;
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
        let config = crate::config::Config::unit_test(dir.path());
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
