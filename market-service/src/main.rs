//! `market-service`: flags → tracing → bind → `market_service::run` until SIGTERM / SIGINT.
//! Prints `{"event":"listening","http":"…"}` on stdout once bound; logs go to stderr.

use std::{process::ExitCode, time::Duration};

use anyhow::Context;
use clap::Parser;
use mesh_runtime::parse_duration;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Opinion markets with an LMSR market maker, event-sourced on SQLite or PostgreSQL"
)]
struct Args {
    /// HTTP listener (only its sidecar should reach it): host:port, or unix:/path for a Unix
    /// domain socket only this user can open (mode 0600) — then nobody else on the host can
    /// reach the service past its sidecar.
    #[arg(long, env = "MESH_LISTEN", default_value = "127.0.0.1:8081")]
    listen: mesh_runtime::LocalAddr,
    /// sqlite://PATH (created if missing) or postgres://USER@HOST:PORT/DB.
    #[arg(long, env = "MESH_DATABASE_URL", default_value = "sqlite://.mesh/market.db")]
    database_url: String,
    /// A file holding the operator's bearer token for grants, admin resolution and projection
    /// rebuilds (a secret: read from a file, never given on the command line). Without it those
    /// are refused.
    #[arg(long, env = "MESH_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<std::path::PathBuf>,
    /// Snapshot an aggregate every N events.
    #[arg(long, env = "MESH_SNAPSHOT_EVERY", default_value_t = 50)]
    snapshot_every: u64,
    /// How often markets past their close time are closed.
    #[arg(long, env = "MESH_CLOSE_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    close_interval: Duration,
    /// The sidecar's admin URL (its event API): the outbox is published there.
    #[arg(long, env = "MESH_SIDECAR_ADMIN")]
    sidecar_admin: Option<String>,
    #[arg(long, env = "MESH_LOG", default_value = "info")]
    log: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let log = args.log.clone();
    mesh_runtime::main(&log, None, run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    if let Some(path) = args.database_url.strip_prefix("sqlite://")
        && let Some(dir) = std::path::Path::new(path.split('?').next().unwrap_or(path)).parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let listener = mesh_runtime::LocalListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on --listen {}", args.listen))?;
    println!("{}", serde_json::json!({"event": "listening", "http": listener.local_addr()?.to_string()}));
    let admin_token = match &args.admin_token_file {
        None => None,
        Some(path) => {
            Some(mesh_runtime::read_secret(path).map_err(|e| anyhow::anyhow!("--admin-token-file: {e}"))?)
        }
    };
    let config = market_service::Config {
        database_url: args.database_url,
        admin_token,
        snapshot_every: args.snapshot_every,
        close_interval: args.close_interval,
        sidecar_admin: args.sidecar_admin,
    };
    mesh_runtime::serve_until_signal("market service", None, |stop| {
        market_service::run(config, listener, stop)
    })
    .await
    .map_err(|e| anyhow::anyhow!(e))
}
