//! `control-plane`: flags → tracing → restore state → bind → serve until SIGTERM / SIGINT →
//! drain with a deadline → exit code.
//!
//! Once both listeners are bound it prints one JSON line on stdout,
//! `{"event":"listening","grpc":"127.0.0.1:7070","admin":"127.0.0.1:7071","tls":true}`, which `meshctl up`
//! and the tests read to learn the ports (pass port 0 to let the OS choose). Logs go to stderr.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use control_plane::{
    BusBackend, Config, ControlPlane, EtcdStore, StoreBackend, bus::retention::Retention, config,
};
use tokio::net::TcpListener;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum StoreKind {
    /// redb file in --data-dir: one control plane.
    Embedded,
    /// etcd (--etcd-endpoints), shared by several control-plane replicas; needs --bus nats.
    Etcd,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum BusKind {
    /// The control plane's own store.
    Embedded,
    /// NATS JetStream (--nats-url).
    Nats,
}

#[derive(Debug, Parser)]
#[command(version, about = "Opinion Market Mesh control plane: registry, discovery, policy, management API")]
struct Args {
    /// gRPC listener (all mesh.v1 services, grpc.health.v1, reflection).
    #[arg(long, env = "MESH_GRPC_ADDR", default_value = config::GRPC_ADDR)]
    grpc_addr: SocketAddr,
    /// Admin HTTP listener (/metrics, /healthz).
    #[arg(long, env = "MESH_ADMIN_ADDR", default_value = config::ADMIN_ADDR)]
    admin_addr: SocketAddr,
    /// Where state is kept.
    #[arg(long, env = "MESH_DATA_DIR", default_value = config::DATA_DIR)]
    data_dir: PathBuf,
    /// Storage backend.
    #[arg(long, env = "MESH_STORE", value_enum, default_value = "embedded")]
    store: StoreKind,
    /// etcd members for --store etcd (http:// or https://), comma-separated.
    #[arg(long, env = "MESH_ETCD_ENDPOINTS", value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    etcd_endpoints: Vec<String>,
    /// Every key of this mesh in etcd lives under this prefix.
    #[arg(long, env = "MESH_ETCD_PREFIX", default_value = "/mesh")]
    etcd_prefix: String,
    /// CA certificate (PEM) that etcd's https:// endpoints chain to.
    #[arg(long, env = "MESH_ETCD_CA_FILE")]
    etcd_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's client-cert auth, with --etcd-key-file.
    #[arg(long, env = "MESH_ETCD_CERT_FILE", requires = "etcd_key_file")]
    etcd_cert_file: Option<PathBuf>,
    #[arg(long, env = "MESH_ETCD_KEY_FILE", requires = "etcd_cert_file")]
    etcd_key_file: Option<PathBuf>,
    /// etcd user (etcd's auth), with --etcd-password-file.
    #[arg(long, env = "MESH_ETCD_USER", requires = "etcd_password_file")]
    etcd_user: Option<String>,
    #[arg(long, env = "MESH_ETCD_PASSWORD_FILE", requires = "etcd_user")]
    etcd_password_file: Option<PathBuf>,
    /// Deadline of each etcd call: a write etcd cannot commit (no quorum) fails after this.
    #[arg(long, env = "MESH_ETCD_TIMEOUT", default_value = "3s", value_parser = duration)]
    etcd_timeout: humantime::Duration,
    /// This replica's name in etcd (default: a new id per start).
    #[arg(long, env = "MESH_REPLICA")]
    replica: Option<String>,
    /// With --store etcd: the key (64 hex digits, the same file on every replica) that seals
    /// the mesh root and the admin token in etcd. Not needed with --ca-cert/--ca-key and
    /// --admin-token-file.
    #[arg(long, env = "MESH_CA_SEAL_KEY_FILE")]
    ca_seal_key_file: Option<PathBuf>,
    /// Event bus: embedded (in the data dir) or nats (JetStream at --nats-url).
    #[arg(long, env = "MESH_BUS", value_enum, default_value = "embedded")]
    bus: BusKind,
    /// NATS server for --bus nats (JetStream enabled: nats-server -js).
    #[arg(long, env = "MESH_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// The bus drops events older than this (0: keep by age forever).
    #[arg(long, env = "MESH_BUS_RETENTION_AGE", default_value_t = Retention::DEFAULT.max_age.into(), value_parser = duration)]
    bus_retention_age: humantime::Duration,
    /// Per topic, the bus drops its oldest events beyond this many bytes (0: no limit).
    #[arg(long, env = "MESH_BUS_RETENTION_BYTES", default_value_t = Retention::DEFAULT.max_bytes)]
    bus_retention_bytes: u64,
    /// How often the embedded bus applies retention.
    #[arg(long, env = "MESH_BUS_MAINTENANCE_INTERVAL", default_value_t = config::BUS_MAINTENANCE_INTERVAL.into(), value_parser = duration)]
    bus_maintenance_interval: humantime::Duration,
    /// The mesh's SPIFFE trust domain: identities are spiffe://<domain>/service/<name>.
    #[arg(long, env = "MESH_TRUST_DOMAIN", default_value = config::TRUST_DOMAIN)]
    trust_domain: String,
    /// The operator's root certificate (PEM) for the mesh CA; with --ca-key. Default: a root
    /// created on first start in --data-dir (ca.pem, ca-key.pem).
    #[arg(long, env = "MESH_CA_CERT", requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// The root's private key (PEM).
    #[arg(long, env = "MESH_CA_KEY", requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// Lifetime of the certificates the CA issues.
    #[arg(long, env = "MESH_CERT_TTL", default_value_t = config::CERT_TTL.into(), value_parser = duration)]
    cert_ttl: humantime::Duration,
    /// Serve the gRPC API in plaintext without authentication: anyone who reaches it is admin.
    /// For a throwaway local run only; the default is TLS, sidecars authenticated by their
    /// certificates and meshctl by the admin token.
    #[arg(long, env = "MESH_INSECURE_API")]
    insecure_api: bool,
    /// A name (DNS or IP) the API's certificate carries, besides localhost and 127.0.0.1: the
    /// host in the URL sidecars and meshctl use (repeat for several).
    #[arg(long = "api-name", env = "MESH_API_NAMES", value_delimiter = ',')]
    api_names: Vec<String>,
    /// The admin token (at least 16 characters) in a file. Default: admin.token in --data-dir,
    /// created on first start, readable by the owner only.
    #[arg(long, env = "MESH_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// Idle discovery streams get a ping this often.
    #[arg(long, env = "MESH_PING_INTERVAL", default_value_t = config::PING_INTERVAL.into(), value_parser = duration)]
    ping_interval: humantime::Duration,
    /// How often heartbeat TTLs are checked.
    #[arg(long, env = "MESH_SWEEP_INTERVAL", default_value_t = config::SWEEP_INTERVAL.into(), value_parser = duration)]
    sweep_interval: humantime::Duration,
    /// After a restart, stored instances get this long (on top of their TTL) to heartbeat again.
    #[arg(long, env = "MESH_RESTART_GRACE", default_value_t = config::RESTART_GRACE.into(), value_parser = duration)]
    restart_grace: humantime::Duration,
    /// How long in-flight calls may take to finish after SIGTERM.
    #[arg(long, env = "MESH_DRAIN_TIMEOUT", default_value_t = config::DRAIN_TIMEOUT.into(), value_parser = duration)]
    drain_timeout: humantime::Duration,
    /// Export spans of the unary gRPC calls over OTLP/gRPC to this collector
    /// (`http://host:4317`); the standard `OTEL_*` variables apply (`OTEL_TRACES_SAMPLER_ARG`:
    /// the share of calls without a caller's trace that are sampled).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "MESH_LOG", default_value = "info")]
    log: String,
    /// How logs are written to stderr: text, or json (one object per line, with the request's
    /// trace id).
    #[arg(long, env = "MESH_LOG_FORMAT", default_value = "text")]
    log_format: mesh_runtime::LogFormat,
}

/// `--store etcd`'s settings, with the files they name read.
fn etcd_store(args: &Args) -> anyhow::Result<EtcdStore> {
    let read = |flag: &str, path: &PathBuf| {
        std::fs::read_to_string(path).with_context(|| format!("cannot read {flag} {}", path.display()))
    };
    let ca_pem = args.etcd_ca_file.as_ref().map(|p| read("--etcd-ca-file", p)).transpose()?;
    let client_cert = match (&args.etcd_cert_file, &args.etcd_key_file) {
        (Some(c), Some(k)) => Some((read("--etcd-cert-file", c)?, read("--etcd-key-file", k)?)),
        _ => None,
    };
    let user = match (&args.etcd_user, &args.etcd_password_file) {
        (Some(u), Some(p)) => Some((u.clone(), read("--etcd-password-file", p)?.trim().to_string())),
        _ => None,
    };
    if client_cert.is_some() && ca_pem.is_none() {
        anyhow::bail!(
            "--etcd-cert-file needs --etcd-ca-file: a client certificate is only sent over https://"
        );
    }
    let replica = args.replica.clone().unwrap_or_else(|| {
        let id = uuid::Uuid::now_v7().simple().to_string();
        format!("cp-{}", &id[id.len() - 8..])
    });
    Ok(EtcdStore {
        options: control_plane::etcd::EtcdOptions {
            endpoints: args.etcd_endpoints.clone(),
            ca_pem,
            client_cert,
            user,
            timeout: args.etcd_timeout.into(),
        },
        prefix: args.etcd_prefix.clone(),
        replica,
        seal_key_file: args.ca_seal_key_file.clone(),
    })
}

/// A duration flag (`250ms`, `15s`, `7d`), shown in `--help` as it parses.
fn duration(s: &str) -> Result<humantime::Duration, String> {
    mesh_runtime::parse_duration(s).map(Into::into)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let log = args.log.clone();
    mesh_runtime::main(&log, args.log_format, None, run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut config = Config::new(&args.data_dir);
    if let StoreKind::Etcd = args.store {
        config.store = StoreBackend::Etcd(Box::new(etcd_store(&args)?));
    }
    config.ping_interval = args.ping_interval.into();
    config.sweep_interval = args.sweep_interval.into();
    config.restart_grace = args.restart_grace.into();
    config.bus = match args.bus {
        BusKind::Embedded => BusBackend::Embedded,
        BusKind::Nats => BusBackend::Nats(args.nats_url.clone()),
    };
    config.retention =
        Retention { max_age: args.bus_retention_age.into(), max_bytes: args.bus_retention_bytes };
    config.bus_maintenance_interval = args.bus_maintenance_interval.into();
    config.trust_domain = args.trust_domain.clone();
    config.ca_files = args.ca_cert.clone().zip(args.ca_key.clone());
    config.cert_ttl = args.cert_ttl.into();
    config.insecure_api = args.insecure_api;
    config.api_names = args.api_names.clone();
    config.admin_token_file = args.admin_token_file.clone();
    config.otlp_endpoint = args.otlp_endpoint.clone();
    let cp = ControlPlane::open(config).await?;
    let grpc = TcpListener::bind(args.grpc_addr)
        .await
        .with_context(|| format!("cannot listen on --grpc-addr {}", args.grpc_addr))?;
    let admin = TcpListener::bind(args.admin_addr)
        .await
        .with_context(|| format!("cannot listen on --admin-addr {}", args.admin_addr))?;
    let (grpc_addr, admin_addr) = (grpc.local_addr()?, admin.local_addr()?);
    println!(
        "{}",
        serde_json::json!({"event": "listening", "grpc": grpc_addr, "admin": admin_addr, "tls": !args.insecure_api})
    );
    tracing::info!(grpc = %grpc_addr, admin = %admin_addr, "control plane serving");

    mesh_runtime::serve_until_signal("control plane", Some(args.drain_timeout.into()), |stop| {
        cp.serve(grpc, admin, stop)
    })
    .await
    .map_err(|e| anyhow::anyhow!(e))
}
