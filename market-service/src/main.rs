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
    /// The Ed25519 key (a file, created owner-only if missing) that signs audit checkpoints,
    /// published to the bus; without it none are signed.
    #[arg(long, env = "MESH_AUDIT_KEY_FILE")]
    audit_key_file: Option<std::path::PathBuf>,
    /// How often an audit checkpoint is signed (when the log moved).
    #[arg(long, env = "MESH_CHECKPOINT_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    checkpoint_interval: Duration,
    /// Export spans over OTLP/gRPC to this collector (`http://host:4317`); the standard `OTEL_*`
    /// variables apply. Requests are traced when their caller's trace is sampled.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    #[arg(long, env = "MESH_LOG", default_value = "info")]
    log: String,
    /// How logs are written to stderr: text, or json (one object per line, with the request's
    /// trace id).
    #[arg(long, env = "MESH_LOG_FORMAT", default_value = "text")]
    log_format: mesh_runtime::LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// The audit trail.
    #[command(subcommand)]
    Audit(Audit),
}

#[derive(Debug, clap::Subcommand)]
enum Audit {
    /// Checks the database against the signed checkpoints: exit 0 when it verifies, 1 naming
    /// the first divergence, 2 when it cannot check.
    Verify(VerifyArgs),
}

#[derive(Debug, clap::Args)]
struct VerifyArgs {
    /// The database to check: sqlite://PATH or postgres://…
    #[arg(long, env = "MESH_DATABASE_URL", default_value = "sqlite://.mesh/market.db")]
    database_url: String,
    /// The public key (hex) the checkpoints must be signed with…
    #[arg(long, required_unless_present = "audit_key_file")]
    public_key: Option<String>,
    /// …or the signing key file, whose public key it is.
    #[arg(long, env = "MESH_AUDIT_KEY_FILE")]
    audit_key_file: Option<std::path::PathBuf>,
    /// Read the checkpoints back from the bus through this sidecar's admin URL…
    #[arg(long, env = "MESH_SIDECAR_ADMIN", conflicts_with = "checkpoints")]
    sidecar_admin: Option<String>,
    /// …or from a file of checkpoints, one JSON object per line (`-`: stdin). Without either,
    /// the database's own copy is used (and an insider could have cut it).
    #[arg(long)]
    checkpoints: Option<std::path::PathBuf>,
}

fn main() -> ExitCode {
    let mut args = Args::parse();
    let log = args.log.clone();
    match args.command.take() {
        Some(Command::Audit(Audit::Verify(v))) => {
            let mut valid = false;
            let code = mesh_runtime::main("warn", args.log_format, None, async {
                valid = verify(v).await?;
                Ok::<_, anyhow::Error>(())
            });
            match (code == ExitCode::SUCCESS, valid) {
                (true, true) => ExitCode::SUCCESS,
                (true, false) => ExitCode::from(1),
                (false, _) => ExitCode::from(2),
            }
        }
        None => mesh_runtime::main(&log, args.log_format, None, run(args)),
    }
}

/// `market-service audit verify`: prints the report (JSON); whether the log verified.
async fn verify(v: VerifyArgs) -> anyhow::Result<bool> {
    use std::io::Read;
    let key = match (&v.public_key, &v.audit_key_file) {
        (Some(k), _) => k.trim().to_string(),
        (None, Some(path)) => {
            if !path.exists() {
                anyhow::bail!("--audit-key-file {}: no such file", path.display());
            }
            market_service::audit::Signer::load_or_create(path).map_err(|e| anyhow::anyhow!(e))?.public
        }
        (None, None) => anyhow::bail!("name the trusted key: --public-key HEX or --audit-key-file FILE"),
    };
    let store = market_service::store::Store::connect(&v.database_url).await?;
    let (source, bodies) = match (&v.sidecar_admin, &v.checkpoints) {
        (Some(admin), _) => {
            let events = market_service::publisher::read_topic(admin, market_service::audit::TOPIC)
                .await
                .map_err(|e| anyhow::anyhow!("reading the checkpoints from the bus: {e}"))?;
            ("bus", events.iter().map(ToString::to_string).collect::<Vec<_>>())
        }
        (None, Some(path)) => {
            let mut text = String::new();
            if path.as_os_str() == "-" {
                std::io::stdin().read_to_string(&mut text)?;
            } else {
                text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
            }
            ("file", text.lines().filter(|l| !l.trim().is_empty()).map(str::to_string).collect())
        }
        (None, None) => ("database", store.checkpoints().await?),
    };
    let checkpoints = market_service::audit::parse(&bodies).map_err(|e| anyhow::anyhow!(e))?;
    let report = market_service::audit::verify(&store, &checkpoints, &[key]).await?;
    store.close().await;
    println!("{}", serde_json::json!({"source": source, "report": report}));
    Ok(report.valid)
}

async fn run(args: Args) -> anyhow::Result<()> {
    if let Some(path) = args.database_url.strip_prefix("sqlite://")
        && let Some(dir) = std::path::Path::new(path.split('?').next().unwrap_or(path)).parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // The audit key exists before this instance answers (a second instance started after it
    // reads the same key instead of racing to write one).
    if let Some(path) = &args.audit_key_file {
        market_service::audit::Signer::load_or_create(path)
            .map_err(|e| anyhow::anyhow!("--audit-key-file: {e}"))?;
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
        audit_key_file: args.audit_key_file,
        checkpoint_interval: args.checkpoint_interval,
        otlp_endpoint: args.otlp_endpoint,
    };
    mesh_runtime::serve_until_signal("market service", None, |stop| {
        market_service::run(config, listener, stop)
    })
    .await
    .map_err(|e| anyhow::anyhow!(e))
}
