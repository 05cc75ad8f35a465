//! The command line: global flags, and one subcommand enum per command group.

use clap::{Parser, Subcommand, ValueEnum};
use std::{path::PathBuf, time::Duration};

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
    /// How meshctl's diagnostics — and, under `up`, every process it starts — write their logs:
    /// text, or json (one object per line, with the request's trace id).
    #[arg(long, global = true, env = "MESH_LOG_FORMAT", default_value = "text")]
    pub log_format: mesh_runtime::LogFormat,
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
    /// Verifies a running mesh and says what to fix: the control plane answers, instances are
    /// healthy, every sidecar is connected and converged (no NACK), certificates are valid past
    /// --cert-margin, the event bus answers. Exit status 1 when a check fails.
    Check {
        /// A certificate expiring sooner than this fails the check.
        #[arg(long, default_value = "10m", value_parser = mesh_runtime::parse_duration)]
        cert_margin: std::time::Duration,
    },
    /// Counters since start and push→ACK latency.
    Stats,
    /// Live request metadata from a service's proxies (time, direction, caller, method, path,
    /// status, latency, endpoint, trace id — never bodies or header values), until Ctrl-C.
    /// Admins only; the proxies record nothing while no tap is on.
    Tap {
        service: String,
        /// Only requests whose path starts with this.
        #[arg(long)]
        path: Option<String>,
        /// Only answers with this status.
        #[arg(long)]
        status: Option<u16>,
        /// At most this many requests a second from each proxy (at most 1000).
        #[arg(long, default_value_t = 100)]
        max_per_second: u32,
    },
    /// Who calls whom, live: services and edges with requests per second, success rate and
    /// latency over the last minute (from the proxies' reports), busiest first, redrawn every
    /// --interval until Ctrl-C.
    Top {
        #[arg(long, default_value = "2s", value_parser = mesh_runtime::parse_duration)]
        interval: std::time::Duration,
        /// Print once and exit (with -o json: the topology as JSON).
        #[arg(long)]
        once: bool,
    },
    /// Publish to, replay or follow a topic of the embedded event bus.
    #[command(subcommand)]
    Events(EventsCommand),
    /// The mesh CA: bootstrap tokens for sidecars, and the trust bundle.
    #[command(subcommand)]
    Identity(IdentityCommand),
    /// End-user tokens from the local mesh's development issuer (`meshctl up` trusts it).
    #[command(subcommand)]
    Token(EndUserTokenCommand),
    /// One sidecar's view: its upstreams, endpoints, breaker states and cache (from its admin
    /// listener, e.g. 127.0.0.1:4191).
    Sidecar { admin: String },
    /// The edge: its routes (stored, versioned and pushed by the control plane like policy) and
    /// a gateway's blocked clients.
    #[command(subcommand)]
    Gateway(GatewayCommand),
    /// Run a local mesh on loopback with embedded storage until Ctrl-C.
    Up(UpArgs),
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
pub enum GatewayCommand {
    /// Print the routes every gateway serves (YAML in table mode), with their version.
    Get,
    /// Validate and store routes from a YAML or JSON file (`routes: [...]`): every gateway gets
    /// them live and ACKs. Compare-and-set against the version read, so a concurrent change is
    /// refused, not lost.
    Set {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Validate and show the changes without storing anything.
        #[arg(long)]
        dry_run: bool,
        /// How long to wait for every connected gateway to ACK (or NACK) the new routes
        /// (0: do not wait).
        #[arg(long, default_value = "10s", value_parser = mesh_runtime::parse_duration)]
        wait: std::time::Duration,
    },
    /// Show what `set` would change, route by route and field by field.
    Diff {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// The clients a gateway has blocked after repeated refused requests (from its admin
    /// listener, e.g. http://127.0.0.1:4191).
    Blocks { admin: String },
    /// Lift a gateway's block on a client address.
    Unblock { admin: String, ip: String },
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

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Where the mesh keeps its state and logs.
    #[arg(long, env = "MESH_UP_DIR", default_value = ".mesh")]
    pub dir: PathBuf,
    /// Control-plane gRPC address.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub grpc_addr: String,
    /// Control-plane admin HTTP address.
    #[arg(long, default_value = "127.0.0.1:7071")]
    pub admin_addr: String,
    /// The gateway's public address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub gateway_addr: String,
    /// Where the control plane keeps its state: embedded (its data dir), or etcd shared by
    /// --replicas control planes (with a NATS JetStream bus, which etcd needs).
    #[arg(long, value_enum, default_value = "embedded")]
    pub store: UpStore,
    /// Control-plane replicas (more than one needs --store etcd). Sidecars spread over them and
    /// fail over to the others.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=9))]
    pub replicas: u16,
    /// With --store etcd: an etcd cluster to use (comma-separated client URLs). Default: start
    /// a local etcd (Debian's etcd-server) under --dir.
    #[arg(long, value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// With --store etcd: a NATS JetStream server for the event bus. Default: start a local
    /// nats-server under --dir.
    #[arg(long)]
    pub nats_url: Option<String>,
    /// Market-service instances, each behind its own sidecar, sharing one SQLite database.
    #[arg(long, default_value_t = 2)]
    pub instances: usize,
    /// How long each process may take to start listening.
    #[arg(long, default_value = "30s", value_parser = mesh_runtime::parse_duration)]
    pub start_timeout: Duration,
    /// The first wait before restarting a process that exited; doubles per quick failure.
    #[arg(long, default_value = "500ms", value_parser = mesh_runtime::parse_duration)]
    pub restart_backoff: Duration,
    /// Consecutive quick failures of one process after which the whole mesh is stopped.
    #[arg(long, default_value_t = 5)]
    pub give_up_after: u32,
}

/// `meshctl up --store`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UpStore {
    Embedded,
    Etcd,
}

#[derive(Debug, Subcommand)]
pub enum EndUserTokenCommand {
    /// Print a token for an end user, signed by the development issuer in --dir (made on first
    /// use); send it as `Authorization: Bearer <token>` through the gateway.
    Issue {
        /// Who the token is for (its `sub`: the account the user acts as).
        #[arg(long)]
        sub: String,
        /// With the `admin` role (granting money, administrative actions).
        #[arg(long)]
        admin: bool,
        /// How long it is valid.
        #[arg(long, default_value = "1h", value_parser = mesh_runtime::parse_duration)]
        ttl: Duration,
        /// The local mesh's state directory (as given to `meshctl up`).
        #[arg(long, default_value = ".mesh")]
        dir: PathBuf,
    },
}
