//! The sidecar's settings: [`Config`] with every default in one place ([`Config::new`]). The
//! binary resolves its command line and config file into one (`src/args.rs`).

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{
    events::subscription::Subscription,
    gateway::{access_log::Sink, auth::EdgeAuthConfig, edge::EdgeConfig},
    outbound::route::Route,
    transport::public_tls::PublicTlsFiles,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Beside one service instance: inbound, outbound, registration.
    Sidecar,
    /// The platform's edge: routes public requests by path prefix into the mesh.
    Gateway,
}

/// Sidecar settings, parsed once by the binary.
#[derive(Debug, Clone)]
pub struct Config {
    pub mode: Mode,
    /// The service this sidecar serves (sidecar mode).
    pub service: Option<String>,
    pub instance_id: String,
    /// The local app (sidecar mode): TCP, or its Unix socket.
    pub app_addr: Option<mesh_runtime::LocalAddr>,
    /// Control-plane gRPC URLs, tried in turn.
    pub control_plane: Vec<String>,
    /// The address registered for other sidecars to reach this instance's inbound listener.
    pub advertise_addr: String,
    pub data_dir: PathBuf,
    pub zone: String,
    pub version: String,
    pub metadata: HashMap<String, String>,
    pub weight: u32,
    /// Services the app calls, watched from the start (others are added on first use).
    pub upstreams: Vec<String>,
    /// Gateway routes.
    pub routes: Vec<Route>,
    /// How long a request for a service met for the first time waits for its endpoints.
    pub discovery_wait: Duration,
    /// After SIGTERM and deregistration, keep serving this long so callers learn of it.
    pub drain_delay: Duration,
    /// Then stop accepting and give open requests this long to finish.
    pub drain_timeout: Duration,
    /// How long an HTTP/1 client may take to send a request head, or keep a connection idle.
    pub header_read_timeout: Duration,
    /// Gateway mode: the edge's limits, screening, client addresses and IP lists.
    pub edge: EdgeConfig,
    /// Gateway mode: TLS on the public listener (certificate and key files), and how often the
    /// files are checked for a change.
    pub public_tls: Option<PublicTlsFiles>,
    pub tls_reload: Duration,
    /// Gateway mode: where the access log goes, and the share of requests it keeps.
    pub access_log: Sink,
    pub access_log_sample: f64,
    /// How long the inbound proxy answers a repeated `Idempotency-Key` with the first response.
    pub idempotency_window: Duration,
    /// The spool refuses new events (429) past this many pending bytes…
    pub spool_max_bytes: u64,
    /// …or while its oldest pending event is older than this.
    pub spool_max_age: Duration,
    /// Events delivered to the app by webhook.
    pub subscriptions: Vec<Subscription>,
    /// The service's bootstrap token: with it the sidecar gets (and renews) its certificate
    /// from the mesh CA.
    pub identity_token: Option<String>,
    /// The mesh root (PEM) that an `https://` control plane's certificate must chain to.
    pub control_plane_ca: Option<String>,
    /// Resolve names with this DNS server instead of the system's configuration.
    pub dns_server: Option<std::net::SocketAddr>,
    /// Gateway mode: end-user tokens (JWTs) checked against a JWK Set file.
    pub edge_auth: Option<EdgeAuthConfig>,
    /// Sidecar mode: the services whose calls may carry a verified end user (`x-mesh-user`,
    /// `x-mesh-user-roles`) to the app; from any other caller those headers are dropped.
    pub trusted_edges: Vec<String>,
    /// Where spans go over OTLP/gRPC (`--otlp-endpoint`); none: no spans are exported.
    pub otlp_endpoint: Option<String>,
    /// How often what this proxy saw of its edges is reported to the control plane (observed
    /// topology); zero: never.
    pub edge_report_interval: Duration,
}

/// How long an HTTP/1 client may take to send a request's head — and a keep-alive connection
/// may stay idle between requests — before the connection is closed (slow-header defence).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the listeners are when no flag names them.
pub const INBOUND_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 4143);
pub const OUTBOUND_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 4140);
pub const GATEWAY_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 8080);
pub const ADMIN_ADDR: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 4191);
/// The control plane when none is named.
pub const CONTROL_PLANE: &str = "https://127.0.0.1:7070";

impl Config {
    /// A configuration with every default: the one place defaults are written (the command
    /// line, the config file and the test kit start from it).
    pub fn new(mode: Mode, instance_id: String, control_plane: Vec<String>, data_dir: PathBuf) -> Config {
        Config {
            mode,
            service: None,
            instance_id,
            app_addr: None,
            control_plane,
            advertise_addr: String::new(),
            data_dir,
            zone: String::new(),
            version: String::new(),
            metadata: HashMap::new(),
            weight: 100,
            upstreams: Vec::new(),
            routes: Vec::new(),
            discovery_wait: Duration::from_secs(2),
            drain_delay: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(10),
            header_read_timeout: HEADER_READ_TIMEOUT,
            edge: EdgeConfig::default(),
            public_tls: None,
            tls_reload: Duration::from_secs(10),
            access_log: Sink::Stdout,
            access_log_sample: 1.0,
            idempotency_window: Duration::from_secs(120),
            spool_max_bytes: 256 * 1024 * 1024,
            spool_max_age: Duration::from_secs(86_400),
            subscriptions: Vec::new(),
            identity_token: None,
            control_plane_ca: None,
            dns_server: None,
            edge_auth: None,
            trusted_edges: vec!["gateway".into()],
            otlp_endpoint: None,
            edge_report_interval: Duration::from_secs(10),
        }
    }

    /// Unit tests: sidecar `web-1` of `web`, its app and control plane unreachable (port 9).
    #[cfg(test)]
    pub(crate) fn unit_test(dir: &std::path::Path) -> Config {
        let mut c = Config::new(Mode::Sidecar, "web-1".into(), vec!["http://127.0.0.1:9".into()], dir.into());
        c.service = Some("web".into());
        c.app_addr = Some(mesh_runtime::LocalAddr::Tcp("127.0.0.1:9".parse().unwrap()));
        c.advertise_addr = "127.0.0.1:9".into();
        c.discovery_wait = Duration::from_secs(1);
        c.drain_delay = Duration::ZERO;
        c.drain_timeout = Duration::from_secs(1);
        c
    }
}
