//! The market service: opinion markets with an LMSR market maker, event-sourced.
//!
//! - [`domain`]: pure rules (no I/O): money, LMSR, the market and account aggregates, commands.
//! - [`store`]: the event store on SQLite or PostgreSQL (expected-version appends, hash chain,
//!   snapshots, outbox, idempotency records).
//! - [`service`]: the commands, decided against a view of the [`projection`] and committed in
//!   batches by the committer (`commit`: one transaction and one fsync for many commands).
//! - [`projection`]: every market and account in memory, updated as each batch commits.
//! - [`api`]: the HTTP JSON API, its OpenAPI description generated from the handlers and the
//!   answer types ([`views`]).
//!
//! [`run`] takes a bound listener and a shutdown token; the binary is a thin shell around it.

pub(crate) mod api;
pub mod audit;
pub(crate) mod commit;
pub mod domain;
pub mod projection;
pub mod publisher;
pub mod refusal;
pub mod service;
pub mod store;
pub mod traced;
pub mod views;

use std::{sync::Arc, time::Duration};

use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{service::Markets, store::Store};

#[derive(Debug, Clone)]
pub struct Config {
    /// `sqlite://PATH` or `postgres://…`.
    pub database_url: String,
    /// Bearer token for grants, admin resolution and projection rebuilds (none: those refused).
    pub admin_token: Option<String>,
    /// Take a snapshot of an aggregate every this many events.
    pub snapshot_every: u64,
    /// How often markets past their close time are closed.
    pub close_interval: Duration,
    /// The sidecar's admin URL: when set, the outbox is published to its event API.
    pub sidecar_admin: Option<String>,
    /// The Ed25519 key that signs audit checkpoints (created if missing); none: no checkpoints.
    pub audit_key_file: Option<std::path::PathBuf>,
    /// Where spans go over OTLP/gRPC; none: no spans are exported.
    pub otlp_endpoint: Option<String>,
    /// How often a checkpoint is signed (when the log moved).
    pub checkpoint_interval: Duration,
}

impl Config {
    pub fn new(database_url: impl Into<String>) -> Self {
        Self {
            database_url: database_url.into(),
            admin_token: None,
            snapshot_every: 50,
            close_interval: Duration::from_secs(1),
            sidecar_admin: None,
            audit_key_file: None,
            checkpoint_interval: Duration::from_secs(10),
            otlp_endpoint: None,
        }
    }
}

/// Connects, migrates, builds the projection, then serves until `shutdown`.
pub async fn run(
    config: Config,
    listener: impl Into<mesh_runtime::LocalListener>,
    shutdown: CancellationToken,
) -> Result<(), store::StoreError> {
    let listener = listener.into();
    let signer = match &config.audit_key_file {
        None => None,
        Some(path) => Some(Arc::new(audit::Signer::load_or_create(path).map_err(store::StoreError::Config)?)),
    };
    let store = Store::connect(&config.database_url).await?;
    let telemetry =
        mesh_runtime::telemetry::Telemetry::start("market-service", config.otlp_endpoint.as_deref())
            .map_err(store::StoreError::Config)?;
    let (markets, mut due) = Markets::new(store.clone(), config.snapshot_every, telemetry.clone());
    let seq = markets.read().await?.seq;
    tracing::info!(backend = ?store.backend(), events = seq, "projection built from the log");
    let tasks = TaskTracker::new();
    let stop = CancellationToken::new();

    mesh_runtime::spawn_tracked(&tasks, tracing::info_span!("snapshotter"), {
        let (markets, stop) = (markets.clone(), stop.clone());
        async move {
            loop {
                let first = tokio::select! {
                    _ = stop.cancelled() => return,
                    id = due.recv() => match id { Some(id) => id, None => return },
                };
                // Everything due by now, in one transaction.
                let mut ids = vec![first];
                while let Ok(id) = due.try_recv() {
                    ids.push(id);
                }
                ids.sort_unstable();
                ids.dedup();
                if let Err(e) = markets.snapshot(&ids).await {
                    tracing::warn!(aggregates = ids.len(), error = %e, "snapshots failed; the next ones will catch up");
                }
            }
        }
    });
    mesh_runtime::spawn_tracked(&tasks, tracing::info_span!("closer"), {
        let markets = markets.clone();
        periodically(stop.clone(), config.close_interval, move || {
            let markets = markets.clone();
            async move {
                // Closing also keeps the projection caught up with other instances' writes.
                match markets.close_due().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(closed = n, "markets closed at their close time"),
                    Err(e) => tracing::warn!(error = %e, "closing due markets failed; will retry"),
                }
            }
        })
    });
    if let Some(signer) = signer.clone() {
        tracing::info!(key = %signer.public, every = ?config.checkpoint_interval, "signing audit checkpoints");
        let store = store.clone();
        let sign = move || {
            let (store, signer) = (store.clone(), signer.clone());
            async move {
                match audit::checkpoint(&store, &signer).await {
                    Ok(Some(n)) => tracing::debug!(checkpoint = n, "audit checkpoint signed"),
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "signing the audit checkpoint failed; will retry"),
                }
            }
        };
        mesh_runtime::spawn_tracked(
            &tasks,
            tracing::info_span!("checkpointer"),
            periodically(stop.clone(), config.checkpoint_interval, sign),
        );
    }
    if let Some(admin) = config.sidecar_admin.clone() {
        mesh_runtime::spawn_tracked(
            &tasks,
            tracing::info_span!("outbox_publisher"),
            publisher::run(store.clone(), admin, stop.clone()),
        );
    }
    let app = api::router(Arc::new(api::AppState {
        markets: markets.clone(),
        admin_token: config.admin_token.clone(),
        signer,
        sidecar_admin: config.sidecar_admin.clone(),
        telemetry: telemetry.clone(),
    }));
    let served = mesh_runtime::serve_http(listener, app, shutdown.cancelled_owned()).await;
    stop.cancel();
    tasks.close();
    tasks.wait().await;
    store.close().await;
    telemetry.shutdown().await;
    served.map_err(|e| store::StoreError::Db(format!("HTTP server failed: {e}")))
}

/// Runs `round` every `every` until `stop`.
async fn periodically<F, Fut>(stop: CancellationToken, every: Duration, mut round: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        round().await;
    }
}
