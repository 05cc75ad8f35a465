//! `meshctl`, a thin client of the control-plane API, plus helpers the binaries share
//! (tracing setup, signal handling, duration parsing).
//!
//! Output is a table by default or JSON with `-o json`. Every failure is one line naming what
//! failed — the unreachable address or the refused field — and a non-zero exit.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::{Parser, Subcommand, ValueEnum};
use futures::StreamExt;
use mesh_proto::dial::{DialError, Dialer};
use mesh_proto::{policy::ServicePolicy, v1};
use serde_json::{Value, json};
use tonic::transport::Channel;

/// `println!` that ignores a closed stdout (`meshctl … | head`) instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `print!` counterpart of [`out!`].
macro_rules! out_raw {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($arg)*);
    }};
}

mod up;

#[derive(Debug, Parser)]
#[command(name = "meshctl", version, about = "Operate an Opinion Market Mesh control plane")]
pub struct Args {
    /// Control-plane gRPC address (`http://` only for a control plane run with --insecure-api).
    #[arg(long, global = true, env = "MESH_CONTROL_PLANE", default_value = "https://127.0.0.1:7070")]
    pub control_plane: String,
    /// The mesh root certificate the control plane's TLS certificate must chain to (its data
    /// dir's ca.pem).
    #[arg(long, global = true, env = "MESH_CA_FILE", default_value = ".mesh/control-plane/ca.pem")]
    pub ca_file: PathBuf,
    /// The admin token (its data dir's admin.token): sent with every call to an https:// URL.
    #[arg(
        long,
        global = true,
        env = "MESH_ADMIN_TOKEN_FILE",
        default_value = ".mesh/control-plane/admin.token"
    )]
    pub admin_token_file: PathBuf,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value = "table")]
    pub output: Output,
    /// Log filter for meshctl's own diagnostics (stderr).
    #[arg(long, global = true, env = "MESH_LOG", default_value = "warn")]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Services with their instance counts and policy versions.
    Services,
    /// Instances of one service with health, load and heartbeat age.
    Instances { service: String },
    /// Read, change or compare a service's policy.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Every proxy holding a policy stream and whether it has ACKed the current versions.
    ProxyStatus {
        /// Only proxies of this service.
        service: Option<String>,
    },
    /// Sizes, streams and uptime of the control plane.
    Overview,
    /// Counters since start and push→ACK latency.
    Stats,
    /// Publish to, replay or follow a topic of the embedded event bus.
    #[command(subcommand)]
    Events(EventsCommand),
    /// The mesh CA: bootstrap tokens for sidecars, and the trust bundle.
    #[command(subcommand)]
    Identity(IdentityCommand),
    /// One sidecar's view: its upstreams, endpoints, breaker states and cache (from its admin
    /// listener, e.g. 127.0.0.1:4191).
    Sidecar { admin: String },
    /// Run a local mesh on loopback with embedded storage until Ctrl-C.
    Up(up::UpArgs),
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Print the policy (YAML in table mode) with its version.
    Get { service: String },
    /// Validate and store a policy from a YAML or JSON file; it is pushed to every proxy.
    Set {
        service: String,
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Validate and show the changes without storing anything.
        #[arg(long)]
        dry_run: bool,
        /// Refuse unless the stored version is this one (compare-and-set).
        #[arg(long)]
        expected_version: Option<u64>,
        /// Change only the fields the file names, keeping every other field as stored (without
        /// it, fields the file leaves out go back to their defaults). Compare-and-set against
        /// the version it read, so a concurrent change is refused, not lost.
        #[arg(long)]
        merge: bool,
    },
    /// Show what `set` would change, field by field.
    Diff {
        service: String,
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// As `set --merge` would apply it.
        #[arg(long)]
        merge: bool,
    },
    /// Put the service back on the default policy.
    Delete { service: String },
    /// Every service with an explicit policy.
    List,
}

#[derive(Debug, Subcommand)]
pub enum IdentityCommand {
    /// Bootstrap tokens: a sidecar presents one to get its service's certificate.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Print the trust anchors (the mesh root, PEM) and the trust domain.
    Bundle {
        /// Write the PEM to this file instead (what --control-plane-ca and --ca-file read).
        #[arg(long)]
        write: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token for SERVICE; it is printed once (only its hash is stored).
    Create {
        service: String,
        /// Write the token to this file (owner-only) instead of printing it: what a sidecar's
        /// --identity-token-file reads.
        #[arg(long)]
        write: Option<PathBuf>,
    },
    /// Revoke every token of SERVICE (certificates already issued stay valid until they expire).
    Revoke { service: String },
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Publish one event (CloudEvents-shaped); a repeated id is a duplicate and dropped.
    Publish {
        topic: String,
        /// JSON (or any text) carried as the event's data.
        #[arg(long, default_value = "{}")]
        data: String,
        #[arg(long, default_value = "")]
        key: String,
        #[arg(long = "type", default_value = "meshctl.event")]
        kind: String,
        /// Event id (default: a new UUID v7).
        #[arg(long)]
        id: Option<String>,
    },
    /// Print stored events from an offset or a time.
    Replay {
        topic: String,
        #[arg(long)]
        from_offset: Option<u64>,
        /// RFC 3339 (2026-11-25T10:00:00Z) or Unix milliseconds.
        #[arg(long, value_parser = parse_time)]
        from_time: Option<u64>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Follow a topic until Ctrl-C; with --group, resume from and commit the group's offset.
    Tail {
        topic: String,
        #[arg(long, default_value = "")]
        group: String,
        #[arg(long)]
        from_offset: Option<u64>,
        /// RFC 3339 (2026-11-25T10:00:00Z) or Unix milliseconds.
        #[arg(long, value_parser = parse_time)]
        from_time: Option<u64>,
        /// Without an offset, a time or the group's committed offset, start at the newest
        /// event instead of the oldest retained one.
        #[arg(long)]
        from_end: bool,
        /// Stop after this many events (default: run until Ctrl-C).
        #[arg(long)]
        count: Option<u64>,
    },
}

/// A time given as Unix milliseconds or RFC 3339.
fn parse_time(s: &str) -> Result<u64, String> {
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(ms);
    }
    humantime::parse_rfc3339_weak(s)
        .map(mesh_proto::unix_ms)
        .map_err(|e| format!("{s:?} is neither Unix milliseconds nor RFC 3339 (2026-11-25T10:00:00Z): {e}"))
}

/// A meshctl failure, printed as one line.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot reach the control plane at {addr}: {cause} (is it running? `meshctl up` starts one)")]
    Unreachable { addr: String, cause: String },
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Input(String),
}

impl CliError {
    fn from_status(s: tonic::Status, addr: &str) -> Self {
        match s.code() {
            tonic::Code::Unavailable if s.message().contains("transport") || s.message().is_empty() => {
                CliError::Unreachable { addr: addr.to_string(), cause: s.message().to_string() }
            }
            // What a plaintext client sees when the server speaks TLS and drops the connection
            // (which of these depends on when the close arrives).
            tonic::Code::Internal | tonic::Code::Unknown | tonic::Code::Cancelled
                if addr.starts_with("http://") =>
            {
                CliError::Unreachable {
                    addr: addr.to_string(),
                    cause: format!(
                        "{}; if the control plane serves TLS (its default), use an https:// URL",
                        s.message()
                    ),
                }
            }
            code => CliError::Refused(format!("{}: {}", code_name(code), s.message())),
        }
    }
}

fn code_name(code: tonic::Code) -> String {
    format!("{code:?}").chars().fold(String::new(), |mut acc, c| {
        if c.is_uppercase() && !acc.is_empty() {
            acc.push(' ');
        }
        acc.push(c.to_ascii_lowercase());
        acc
    })
}

/// Where the control plane is and how to prove who we are to it.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: String,
    /// The mesh root, for an `https://` URL.
    pub ca_file: PathBuf,
    /// The admin token, sent when the file exists.
    pub admin_token_file: PathBuf,
}

/// Sends the admin token (when there is one) with every call.
#[derive(Clone)]
pub struct AdminToken(pub Option<tonic::metadata::AsciiMetadataValue>);

impl tonic::service::Interceptor for AdminToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A channel to the control plane that carries the admin token.
pub type CpChannel = tonic::service::interceptor::InterceptedService<Channel, AdminToken>;

fn read_file(path: &Path, flag: &str) -> Result<Option<String>, CliError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CliError::Input(format!("cannot read {flag} {}: {e}", path.display()))),
    }
}

pub async fn connect(t: &Target) -> Result<CpChannel, CliError> {
    let addr = &t.url;
    let endpoint = Dialer::endpoint(addr)
        .map_err(|e| {
            CliError::Input(format!("--control-plane {addr:?} is not a URL like https://127.0.0.1:7070: {e}"))
        })?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(30));
    let dialer = if addr.starts_with("https://") {
        let ca = read_file(&t.ca_file, "--ca-file")?.ok_or_else(|| {
            CliError::Input(format!(
                "the control plane at {addr} is served over TLS and --ca-file {} does not exist: give \
                 the mesh root (the control plane's data dir holds it as ca.pem)",
                t.ca_file.display()
            ))
        })?;
        Dialer::trusting(&ca)
            .map_err(|e| CliError::Input(format!("--ca-file {}: {e}", t.ca_file.display())))?
    } else {
        Dialer::plaintext()
    };
    // The token goes only where TLS protects it: an `http://` control plane runs with
    // --insecure-api and needs none.
    let token_file = if addr.starts_with("https://") {
        read_file(&t.admin_token_file, "--admin-token-file")?
    } else {
        None
    };
    let token = match token_file {
        Some(token) => Some(format!("Bearer {}", token.trim()).parse().map_err(|_| {
            CliError::Input(format!("--admin-token-file {}: not a token", t.admin_token_file.display()))
        })?),
        None => None,
    };
    let ch = dialer.connect(endpoint).await.map_err(|e| match e {
        DialError::Connect(_, cause) => CliError::Unreachable { addr: addr.to_string(), cause },
        other => CliError::Input(other.to_string()),
    })?;
    Ok(tonic::service::interceptor::InterceptedService::new(ch, AdminToken(token)))
}

pub async fn run(args: Args) -> Result<(), CliError> {
    match args.command {
        Command::Up(up) => return up::run(up, args.output).await,
        Command::Sidecar { admin } => return sidecar(&admin, args.output).await,
        _ => {}
    }
    let addr = args.control_plane.clone();
    let ch = connect(&Target {
        url: addr.clone(),
        ca_file: args.ca_file.clone(),
        admin_token_file: args.admin_token_file.clone(),
    })
    .await?;
    let st = |s: tonic::Status| CliError::from_status(s, &addr);
    let out = args.output;
    match args.command {
        Command::Services => {
            let r = v1::registry_client::RegistryClient::new(ch)
                .list_services(v1::ListServicesRequest {})
                .await
                .map_err(st)?
                .into_inner();
            let rows = r
                .services
                .iter()
                .map(|s| {
                    vec![
                        s.name.clone(),
                        s.instances.to_string(),
                        s.healthy.to_string(),
                        s.policy_version.to_string(),
                    ]
                })
                .collect();
            let js = r.services.iter().map(|s| json!({"name": s.name, "instances": s.instances, "healthy": s.healthy, "policy_version": s.policy_version})).collect();
            emit(out, &["SERVICE", "INSTANCES", "HEALTHY", "POLICY"], rows, Value::Array(js));
        }
        Command::Instances { service } => {
            let r = v1::registry_client::RegistryClient::new(ch)
                .get_service(v1::GetServiceRequest { name: service })
                .await
                .map_err(st)?
                .into_inner();
            let health = |i: &v1::Instance| health_name(i.health());
            let rows = r
                .instances
                .iter()
                .map(|i| {
                    vec![
                        i.id.clone(),
                        i.address.clone(),
                        dash(&i.zone),
                        dash(&i.version),
                        health(i).into(),
                        i.load.to_string(),
                        format!("{:.1}s", i.last_heartbeat_age_ms as f64 / 1000.0),
                    ]
                })
                .collect();
            let js = r.instances.iter().map(|i| json!({
                "id": i.id, "address": i.address, "zone": i.zone, "version": i.version, "metadata": i.metadata,
                "weight": i.weight, "health": health(i), "load": i.load, "last_heartbeat_age_ms": i.last_heartbeat_age_ms,
            })).collect();
            emit(
                out,
                &["ID", "ADDRESS", "ZONE", "VERSION", "HEALTH", "LOAD", "LAST HEARTBEAT"],
                rows,
                Value::Array(js),
            );
        }
        Command::Policy(cmd) => policy(cmd, ch, out, &addr).await?,
        Command::Events(cmd) => events(cmd, ch, out, &addr).await?,
        Command::Identity(cmd) => identity(cmd, ch, out, &addr).await?,
        Command::ProxyStatus { service } => {
            let r = v1::admin_client::AdminClient::new(ch)
                .proxy_status(v1::ProxyStatusRequest { service: service.unwrap_or_default() })
                .await
                .map_err(st)?
                .into_inner();
            let mut rows = Vec::new();
            let mut js = Vec::new();
            for p in &r.proxies {
                let hb = p
                    .last_heartbeat_age_ms
                    .map(|ms| format!("{:.1}s ago", ms as f64 / 1000.0))
                    .unwrap_or("-".into());
                let now = mesh_proto::unix_ms(std::time::SystemTime::now());
                let cert = match p.certificate_expires_unix_ms {
                    0 => "-".to_string(),
                    exp if exp <= now => format!("EXPIRED ({} issued)", p.certificates_issued),
                    exp => format!(
                        "expires in {} ({} issued)",
                        humantime::format_duration(std::time::Duration::from_secs((exp - now) / 1000)),
                        p.certificates_issued
                    ),
                };
                for s in &p.policies {
                    let state = if s.nacked_version == s.current_version
                        && s.current_version > 0
                        && s.acked_version < s.current_version
                    {
                        format!("NACKED: {}", s.nack_reason)
                    } else if s.acked_version == s.current_version {
                        "SYNCED".into()
                    } else {
                        "STALE".into()
                    };
                    rows.push(vec![
                        dash(&p.node_id),
                        dash(&p.service),
                        s.service.clone(),
                        s.current_version.to_string(),
                        s.acked_version.to_string(),
                        state,
                        format!("{:.1}ms", s.last_ack_latency_ms),
                        hb.clone(),
                        cert.clone(),
                    ]);
                }
                js.push(json!({
                    "node_id": p.node_id, "service": p.service, "peer": p.peer, "connected_ms": p.connected_ms,
                    "last_heartbeat_age_ms": p.last_heartbeat_age_ms,
                    "spiffe_id": p.spiffe_id, "certificate_expires_unix_ms": p.certificate_expires_unix_ms,
                    "certificates_issued": p.certificates_issued,
                    "policies": p.policies.iter().map(|s| json!({
                        "service": s.service, "current_version": s.current_version, "acked_version": s.acked_version,
                        "nacked_version": s.nacked_version, "nack_reason": s.nack_reason, "last_ack_latency_ms": s.last_ack_latency_ms,
                    })).collect::<Vec<_>>(),
                }));
            }
            emit(
                out,
                &[
                    "NODE",
                    "SERVICE",
                    "POLICY OF",
                    "CURRENT",
                    "ACKED",
                    "STATE",
                    "ACK LATENCY",
                    "HEARTBEAT",
                    "CERTIFICATE",
                ],
                rows,
                Value::Array(js),
            );
        }
        Command::Overview => {
            let o = v1::admin_client::AdminClient::new(ch)
                .overview(v1::OverviewRequest {})
                .await
                .map_err(st)?
                .into_inner();
            let js = json!({
                "server_version": o.server_version, "uptime_ms": o.uptime_ms, "services": o.services,
                "instances": o.instances, "healthy_instances": o.healthy_instances, "policies": o.policies,
                "discovery_streams": o.discovery_streams, "policy_streams": o.policy_streams,
                "heartbeat_streams": o.heartbeat_streams, "registry_version": o.registry_version, "data_dir": o.data_dir,
            });
            emit_kv(out, js);
        }
        Command::Stats => {
            let s = v1::admin_client::AdminClient::new(ch)
                .stats(v1::StatsRequest {})
                .await
                .map_err(st)?
                .into_inner();
            let js = json!({
                "registrations_total": s.registrations_total, "deregistrations_total": s.deregistrations_total,
                "heartbeats_total": s.heartbeats_total, "expirations_total": s.expirations_total,
                "self_preservation_holds_total": s.self_preservation_holds_total,
                "discovery_messages_total": s.discovery_messages_total, "policy_pushes_total": s.policy_pushes_total,
                "policy_acks_total": s.policy_acks_total, "policy_nacks_total": s.policy_nacks_total,
                "ack_latency_p50_ms": s.ack_latency_p50_ms, "ack_latency_p99_ms": s.ack_latency_p99_ms,
                "ack_latency_max_ms": s.ack_latency_max_ms,
            });
            emit_kv(out, js);
        }
        Command::Up(_) | Command::Sidecar { .. } => unreachable!("handled above"),
    }
    Ok(())
}

async fn policy(cmd: PolicyCommand, ch: CpChannel, out: Output, addr: &str) -> Result<(), CliError> {
    let st = |s: tonic::Status| CliError::from_status(s, addr);
    let mut client = v1::policy_client::PolicyClient::new(ch);
    match cmd {
        PolicyCommand::Get { service } => {
            let vp = client.get(v1::GetPolicyRequest { service }).await.map_err(st)?.into_inner();
            let policy = ServicePolicy::try_from(vp.policy.clone().unwrap_or_default()).map_err(|e| {
                CliError::Refused(format!("the control plane sent a policy meshctl cannot read: {e}"))
            })?;
            match out {
                Output::Json => print_json(&json!({
                    "service": vp.service, "version": vp.version, "is_default": vp.is_default,
                    "updated_at_unix_ms": vp.updated_at_unix_ms, "policy": policy,
                })),
                Output::Table => {
                    let origin = if vp.is_default { " (defaults)" } else { "" };
                    out!("# {} policy version {}{origin}", vp.service, vp.version);
                    out_raw!("{}", serde_yaml_ng::to_string(&policy).unwrap_or_default());
                }
            }
        }
        PolicyCommand::Set { service, file, dry_run, expected_version, merge } => {
            let (policy, expected_version) = match merge {
                false => (read_policy_file(&file)?, expected_version),
                true => {
                    let (policy, read) = merged_policy(&mut client, &service, &file, &st).await?;
                    (policy, expected_version.or(Some(read)))
                }
            };
            let r = client
                .set(v1::SetPolicyRequest {
                    service: service.clone(),
                    policy: Some((&policy).into()),
                    dry_run,
                    expected_version,
                })
                .await
                .map_err(st)?
                .into_inner();
            let version = r.policy.as_ref().map(|p| p.version).unwrap_or_default();
            match out {
                Output::Json => print_json(&json!({
                    "service": service, "version": version, "applied": r.applied, "changes": changes_json(&r.changes),
                })),
                Output::Table => {
                    if r.applied {
                        out!(
                            "policy for {service} stored as version {version} ({} changes); pushing to proxies",
                            r.changes.len()
                        );
                    } else {
                        out!("dry run: policy for {service} is valid and would become version {version}");
                    }
                    print_changes(&r.changes);
                }
            }
        }
        PolicyCommand::Diff { service, file, merge } => {
            let policy = match merge {
                false => read_policy_file(&file)?,
                true => merged_policy(&mut client, &service, &file, &st).await?.0,
            };
            let r = client
                .set(v1::SetPolicyRequest {
                    service,
                    policy: Some((&policy).into()),
                    dry_run: true,
                    expected_version: None,
                })
                .await
                .map_err(st)?
                .into_inner();
            match out {
                Output::Json => print_json(&changes_json(&r.changes)),
                Output::Table if r.changes.is_empty() => out!("no changes"),
                Output::Table => print_changes(&r.changes),
            }
        }
        PolicyCommand::Delete { service } => {
            let r = client
                .delete(v1::DeletePolicyRequest { service: service.clone() })
                .await
                .map_err(st)?
                .into_inner();
            match out {
                Output::Json => {
                    print_json(&json!({"service": service, "existed": r.existed, "version": r.version}))
                }
                Output::Table if r.existed => {
                    out!("policy for {service} deleted: defaults pushed as version {}", r.version)
                }
                Output::Table => out!("{service} had no policy: it already runs on the defaults"),
            }
        }
        PolicyCommand::List => {
            let r = client.list(v1::ListPoliciesRequest {}).await.map_err(st)?.into_inner();
            let rows = r
                .policies
                .iter()
                .map(|p| vec![p.service.clone(), p.version.to_string(), p.updated_at_unix_ms.to_string()])
                .collect();
            let js = r.policies.iter().map(|p| json!({"service": p.service, "version": p.version, "updated_at_unix_ms": p.updated_at_unix_ms})).collect();
            emit(out, &["SERVICE", "VERSION", "UPDATED (UNIX MS)"], rows, Value::Array(js));
        }
    }
    Ok(())
}

/// `meshctl sidecar ADMIN`: fetches the sidecar's `/config` over plain HTTP/1.1.
async fn sidecar(admin: &str, out: Output) -> Result<(), CliError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // `127.0.0.1:4191`, or a URL as `meshctl up` prints it (`http://127.0.0.1:4191/config`).
    let addr = admin.trim_start_matches("http://").split('/').next().unwrap_or_default();
    let unreachable = |cause: String| {
        CliError::Input(format!(
            "cannot reach the sidecar admin listener at {addr}: {cause} (`meshctl up` prints each \
             sidecar's admin URL, http://…/config)"
        ))
    };
    let mut s = tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| unreachable("timed out".into()))?
        .map_err(|e| unreachable(e.to_string()))?;
    s.write_all(format!("GET /config HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.map_err(|e| unreachable(e.to_string()))?;
    let text = String::from_utf8_lossy(&raw);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let cfg: Value = serde_json::from_str(body).map_err(|e| {
        CliError::Refused(format!(
            "{addr} did not answer /config with JSON ({e}): is it a sidecar's admin address?"
        ))
    })?;
    if out == Output::Json {
        print_json(&cfg);
        return Ok(());
    }
    let cp = &cfg["control_plane"];
    out!(
        "{} {} ({}), control plane {} {}",
        cfg["mode"].as_str().unwrap_or("?"),
        cfg["instance_id"].as_str().unwrap_or("?"),
        cfg["service"].as_str().unwrap_or("gateway"),
        cp["current"].as_str().unwrap_or("?"),
        if cp["connected"] == true { "connected" } else { "DISCONNECTED (serving the last known state)" }
    );
    let mut rows = Vec::new();
    for u in cfg["upstreams"].as_array().into_iter().flatten() {
        let svc = u["service"].as_str().unwrap_or("?").to_string();
        let cache = format!("{} entries, {} B", u["cache"]["entries"], u["cache"]["bytes"]);
        let endpoints = u["endpoints"].as_array().cloned().unwrap_or_default();
        if endpoints.is_empty() {
            rows.push(vec![
                svc.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                u["policy_version"].to_string(),
                cache.clone(),
            ]);
        }
        for e in endpoints {
            rows.push(vec![
                svc.clone(),
                e["id"].as_str().unwrap_or("?").into(),
                e["address"].as_str().unwrap_or("?").into(),
                e["breaker"].as_str().unwrap_or("?").into(),
                e["inflight"].to_string(),
                format!("{:.1}ms", e["latency_ewma_ms"].as_f64().unwrap_or(0.0)),
                u["policy_version"].to_string(),
                cache.clone(),
            ]);
        }
    }
    print_table(
        &["UPSTREAM", "ENDPOINT", "ADDRESS", "BREAKER", "IN FLIGHT", "LATENCY", "POLICY", "CACHE"],
        rows,
    );
    out!();
    let counters: Vec<Vec<String>> = cfg["upstreams"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|u| {
            let c = &u["counters"];
            vec![
                u["service"].as_str().unwrap_or("?").to_string(),
                c["retries"].to_string(),
                c["retry_budget_exhausted"].to_string(),
                c["overload_rejections"].to_string(),
                format!("{}/{}/{}", c["cache_hits"], c["cache_misses"], c["cache_stale"]),
            ]
        })
        .collect();
    print_table(&["UPSTREAM", "RETRIES", "BUDGET EXHAUSTED", "OVERLOADED", "CACHE HIT/MISS/STALE"], counters);
    if cfg["service"].is_string() {
        out!(
            "\nrequests to {} refused by its rate limits: {}",
            cfg["service"].as_str().unwrap_or("?"),
            cfg["rate_limited"]
        );
    }
    Ok(())
}

fn delivery_json(d: &v1::Delivery) -> Value {
    let e = d.event.clone().unwrap_or_default();
    let data = String::from_utf8_lossy(&e.data).into_owned();
    json!({
        "offset": d.offset, "id": e.id, "topic": e.topic, "type": e.r#type, "key": e.key, "source": e.source,
        "time_unix_ms": e.time_unix_ms, "data": serde_json::from_str::<Value>(&data).unwrap_or(Value::String(data)),
    })
}

/// Writes `secret` to `path`, readable by its owner only (directories created).
pub fn write_secret(path: &Path, secret: &str) -> Result<(), CliError> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let fail = |e: std::io::Error| CliError::Input(format!("cannot write {}: {e}", path.display()));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(fail)?;
    // `mode` applies only when the file is created: an older file keeps its bits otherwise.
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600)).map_err(fail)?;
    f.write_all(secret.as_bytes()).and_then(|()| f.sync_all()).map_err(fail)
}

async fn identity(cmd: IdentityCommand, ch: CpChannel, out: Output, addr: &str) -> Result<(), CliError> {
    let st = |s: tonic::Status| CliError::from_status(s, addr);
    let mut ca = v1::identity_client::IdentityClient::new(ch);
    match cmd {
        IdentityCommand::Token(TokenCommand::Create { service, write }) => {
            let r = ca.create_token(v1::CreateTokenRequest { service }).await.map_err(st)?.into_inner();
            match (write, out) {
                (Some(path), _) => {
                    write_secret(&path, &r.token)?;
                    out!("wrote the token for {} to {}", r.service, path.display());
                }
                (None, Output::Json) => {
                    out!("{}", serde_json::json!({"service": r.service, "token": r.token}))
                }
                (None, Output::Table) => out!("{}", r.token),
            }
        }
        IdentityCommand::Token(TokenCommand::Revoke { service }) => {
            let r =
                ca.revoke_tokens(v1::RevokeTokensRequest { service: service.clone() }).await.map_err(st)?;
            let n = r.into_inner().revoked;
            match out {
                Output::Json => out!("{}", serde_json::json!({"service": service, "revoked": n})),
                Output::Table => out!("revoked {n} token(s) of {service}"),
            }
        }
        IdentityCommand::Bundle { write } => {
            let r = ca.trust_bundle(v1::TrustBundleRequest {}).await.map_err(st)?.into_inner();
            if let Some(path) = write {
                write_secret(&path, &r.trust_anchors_pem)?;
                out!("wrote the trust bundle of {} to {}", r.trust_domain, path.display());
                return Ok(());
            }
            match out {
                Output::Json => out!(
                    "{}",
                    serde_json::json!({"trust_domain": r.trust_domain, "trust_anchors_pem": r.trust_anchors_pem})
                ),
                Output::Table => {
                    out!("# trust domain: {}", r.trust_domain);
                    out!("{}", r.trust_anchors_pem.trim_end());
                }
            }
        }
    }
    Ok(())
}

async fn events(cmd: EventsCommand, ch: CpChannel, out: Output, addr: &str) -> Result<(), CliError> {
    let st = |s: tonic::Status| CliError::from_status(s, addr);
    let mut bus = v1::events_client::EventsClient::new(ch);
    let print = |d: &v1::Delivery| match out {
        Output::Json => out!("{}", delivery_json(d)),
        Output::Table => {
            let e = d.event.clone().unwrap_or_default();
            out!(
                "{:>6}  {}  {}  {}  {}",
                d.offset,
                e.id,
                dash(&e.key),
                e.r#type,
                String::from_utf8_lossy(&e.data)
            );
        }
    };
    match cmd {
        EventsCommand::Publish { topic, data, key, kind, id } => {
            let event = v1::Event {
                id: id.unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
                topic,
                source: "meshctl".into(),
                r#type: kind,
                key,
                time_unix_ms: mesh_proto::unix_ms(std::time::SystemTime::now()),
                data: data.into_bytes(),
                content_type: "application/json".into(),
                ..Default::default()
            };
            let r = bus.publish(v1::PublishRequest { events: vec![event] }).await.map_err(st)?.into_inner();
            for x in r.results {
                match out {
                    Output::Json => {
                        out!("{}", json!({"id": x.id, "offset": x.offset, "duplicate": x.duplicate}))
                    }
                    Output::Table if x.duplicate => {
                        out!("{} was already at offset {} (duplicate dropped)", x.id, x.offset)
                    }
                    Output::Table => out!("{} stored at offset {}", x.id, x.offset),
                }
            }
        }
        EventsCommand::Replay { topic, from_offset, from_time, limit } => {
            let req = v1::ReplayRequest { topic, from_offset, from_time_unix_ms: from_time, limit };
            let mut s = bus.replay(req).await.map_err(st)?.into_inner();
            let (mut printed, mut last) = (0u32, None);
            while let Some(d) = s.next().await {
                let d = d.map_err(st)?;
                last = Some(d.offset);
                printed += 1;
                print(&d);
            }
            let asked = if limit == 0 { crate::api::DEFAULT_REPLAY_LIMIT } else { limit };
            if let Some(last) = last.filter(|_| printed == asked) {
                eprintln!(
                    "{printed} events printed (--limit); there may be more: continue with --from-offset {}",
                    last + 1
                );
            }
        }
        EventsCommand::Tail { topic, group, from_offset, from_time, from_end, count } => {
            let (tx, rx) = tokio::sync::mpsc::channel(8);
            let start = v1::SubscribeStart {
                topic,
                group: group.clone(),
                from_offset,
                from_time_unix_ms: from_time,
                from_end,
            };
            let _ =
                tx.send(v1::SubscribeRequest { kind: Some(v1::subscribe_request::Kind::Start(start)) }).await;
            let mut s = bus
                .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .map_err(st)?
                .into_inner();
            let mut seen = 0u64;
            loop {
                let d = tokio::select! {
                    _ = mesh_runtime::shutdown_signal() => break,
                    d = s.next() => match d { Some(d) => d.map_err(st)?, None => break },
                };
                print(&d);
                if !group.is_empty() {
                    let commit = v1::SubscribeCommit { offset: d.offset + 1 };
                    let _ = tx
                        .send(v1::SubscribeRequest {
                            kind: Some(v1::subscribe_request::Kind::Commit(commit)),
                        })
                        .await;
                }
                seen += 1;
                if count.is_some_and(|c| seen >= c) {
                    break;
                }
            }
            // Close our side so the server applies the last commit and ends the stream.
            drop(tx);
            let _ = tokio::time::timeout(Duration::from_secs(3), async { while s.next().await.is_some() {} })
                .await;
        }
    }
    Ok(())
}

/// The stored policy of `service` with the fields `path` names put over it, and the version it
/// was read at.
async fn merged_policy(
    client: &mut v1::policy_client::PolicyClient<CpChannel>,
    service: &str,
    path: &Path,
    st: &impl Fn(tonic::Status) -> CliError,
) -> Result<(ServicePolicy, u64), CliError> {
    let vp = client.get(v1::GetPolicyRequest { service: service.into() }).await.map_err(st)?.into_inner();
    let stored = ServicePolicy::try_from(vp.policy.unwrap_or_default()).map_err(|e| {
        CliError::Refused(format!("the control plane sent a policy meshctl cannot read: {e}"))
    })?;
    let mut merged = serde_yaml_ng::to_value(&stored)
        .map_err(|e| CliError::Input(format!("the stored policy of {service}: {e}")))?;
    merge_yaml(&mut merged, policy_file_value(path)?);
    Ok((validated_policy(path, serde_yaml_ng::from_value(merged))?, vp.version))
}

/// Puts `patch` over `base`: mappings merge key by key, anything else replaces.
fn merge_yaml(base: &mut serde_yaml_ng::Value, patch: serde_yaml_ng::Value) {
    use serde_yaml_ng::Value::Mapping;
    match (base, patch) {
        (Mapping(b), Mapping(p)) => {
            for (k, v) in p {
                match b.get_mut(&k) {
                    Some(slot) => merge_yaml(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

/// Reads a policy from YAML or JSON (JSON is YAML), refusing unknown fields and invalid values.
pub fn read_policy_file(path: &Path) -> Result<ServicePolicy, CliError> {
    validated_policy(path, serde_yaml_ng::from_str(&policy_file_text(path)?))
}

/// A policy file as a YAML value (any mapping; fields are checked when it becomes a policy).
fn policy_file_value(path: &Path) -> Result<serde_yaml_ng::Value, CliError> {
    serde_yaml_ng::from_str(&policy_file_text(path)?)
        .map_err(|e| CliError::Input(format!("policy file {}: {e}", path.display())))
}

fn policy_file_text(path: &Path) -> Result<String, CliError> {
    std::fs::read_to_string(path)
        .map_err(|e| CliError::Input(format!("cannot read policy file {}: {e}", path.display())))
}

/// The policy that `path` describes, if it parses and validates; the error names the file.
fn validated_policy(
    path: &Path,
    parsed: Result<ServicePolicy, serde_yaml_ng::Error>,
) -> Result<ServicePolicy, CliError> {
    let bad = |e: String| CliError::Input(format!("policy file {}: {e}", path.display()));
    let policy = parsed.map_err(|e| bad(e.to_string()))?;
    policy.validate().map_err(|e| bad(e.to_string()))?;
    Ok(policy)
}

fn changes_json(changes: &[v1::FieldChange]) -> Value {
    Value::Array(
        changes.iter().map(|c| json!({"field": c.field, "old": c.old_value, "new": c.new_value})).collect(),
    )
}

fn print_changes(changes: &[v1::FieldChange]) {
    if changes.is_empty() {
        return;
    }
    let rows =
        changes.iter().map(|c| vec![c.field.clone(), c.old_value.clone(), c.new_value.clone()]).collect();
    print_table(&["FIELD", "OLD", "NEW"], rows);
}

fn health_name(h: v1::HealthStatus) -> &'static str {
    match h {
        v1::HealthStatus::Healthy => "healthy",
        v1::HealthStatus::Unhealthy => "unhealthy",
        v1::HealthStatus::Expired => "expired",
        v1::HealthStatus::Unspecified => "unknown",
    }
}

fn dash(s: &str) -> String {
    if s.is_empty() { "-".into() } else { s.to_string() }
}

fn print_json(v: &Value) {
    out!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn emit(out: Output, headers: &[&str], rows: Vec<Vec<String>>, js: Value) {
    match out {
        Output::Json => print_json(&js),
        Output::Table => print_table(headers, rows),
    }
}

/// Key/value listing for single objects.
fn emit_kv(out: Output, js: Value) {
    match (out, &js) {
        (Output::Table, Value::Object(map)) => {
            let sorted: BTreeMap<_, _> = map.iter().collect();
            let w = sorted.keys().map(|k| k.len()).max().unwrap_or(0);
            for (k, v) in sorted {
                let v = match v {
                    Value::String(s) => s.clone(),
                    Value::Number(n) if n.is_f64() => format!("{:.2}", n.as_f64().unwrap_or_default()),
                    other => other.to_string(),
                };
                out!("{k:<w$}  {v}");
            }
        }
        _ => print_json(&js),
    }
}

pub fn print_table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out!("{}", s.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}
