//! The control plane's settings: [`Config`], every default in [`Config::new`] (the binary's
//! flags start from it).

use crate::bus::retention::Retention;

use std::{path::PathBuf, time::Duration};

/// Control-plane settings (the binary fills these from flags and `MESH_*` variables).
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the redb file lives.
    pub data_dir: PathBuf,
    /// Where policies, instances, tokens and the CA live: the data dir, or etcd shared by
    /// several replicas.
    pub store: StoreBackend,
    /// Idle discovery streams get a PING this often.
    pub ping_interval: Duration,
    /// How often TTLs are checked: expiry happens at most this long after the TTL passed.
    pub sweep_interval: Duration,
    /// The observed topology's time slot: its windows are 6 and 60 slots (one and ten minutes
    /// at the default 10 s).
    pub topology_slot: Duration,
    /// HTTP/2 streams one connection may open (discovery + policy streams of many proxies).
    pub max_concurrent_streams: u32,
    /// After a restart, restored instances do not expire before this has passed (on top of
    /// their TTL): time for every sidecar to reconnect through its backoff.
    pub restart_grace: Duration,
    /// Where the event bus keeps its log.
    pub bus: BusBackend,
    /// How long and how much of each topic the bus keeps.
    pub retention: Retention,
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
    /// Where spans go over OTLP/gRPC; none: no spans are exported.
    pub otlp_endpoint: Option<String>,
    /// TLS handshakes in progress at once on the gRPC listener; connections beyond are closed at
    /// once, so clients that connect and never finish a handshake cannot pile up.
    pub max_pending_handshakes: usize,
}

/// Where the control plane keeps its state.
#[derive(Debug, Clone)]
pub enum StoreBackend {
    /// The redb file in the data dir (default): one control plane.
    Embedded,
    /// etcd, shared by every replica (see [`crate::etcd`]).
    Etcd(Box<EtcdStore>),
}

/// `--store etcd` settings.
#[derive(Debug, Clone)]
pub struct EtcdStore {
    pub options: crate::etcd::EtcdOptions,
    /// Every key lives under this prefix (several meshes can share one etcd).
    pub prefix: String,
    /// This replica's name in etcd (its heartbeat batch, the election).
    pub replica: String,
    /// Seals the mesh root and the admin token in etcd (64 hex digits, the same on every
    /// replica); not needed when both are given as files.
    pub seal_key_file: Option<PathBuf>,
}

/// The event bus's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusBackend {
    /// In the control plane's redb file (default).
    Embedded,
    /// NATS JetStream at this URL.
    Nats(String),
}

/// The defaults (the binary's flags show them in `--help`).
pub const PING_INTERVAL: Duration = Duration::from_secs(15);
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(50);
pub const RESTART_GRACE: Duration = Duration::from_secs(15);
pub const BUS_MAINTENANCE_INTERVAL: Duration = Duration::from_secs(60);
pub const TRUST_DOMAIN: &str = "mesh.local";
pub const CERT_TTL: Duration = Duration::from_secs(24 * 3600);
pub const GRPC_ADDR: &str = "127.0.0.1:7070";
pub const ADMIN_ADDR: &str = "127.0.0.1:7071";
pub const DATA_DIR: &str = ".mesh/control-plane";
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

impl Config {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            store: StoreBackend::Embedded,
            ping_interval: PING_INTERVAL,
            sweep_interval: SWEEP_INTERVAL,
            topology_slot: Duration::from_secs(10),
            max_concurrent_streams: 16_384,
            restart_grace: RESTART_GRACE,
            bus: BusBackend::Embedded,
            retention: Retention::DEFAULT,
            bus_maintenance_interval: BUS_MAINTENANCE_INTERVAL,
            trust_domain: TRUST_DOMAIN.into(),
            ca_files: None,
            cert_ttl: CERT_TTL,
            insecure_api: false,
            api_names: Vec::new(),
            admin_token_file: None,
            otlp_endpoint: None,
            max_pending_handshakes: 1024,
        }
    }
}
