//! The binary's command line (and an optional YAML config file) resolved into a [`Config`]:
//! part of the `sidecar` binary, not of the library, which takes a `Config` and reads neither
//! flags nor the environment.
//!
//! A flag given on the command line (or through its `MESH_*` variable) wins over the config
//! file; the file wins over the defaults of [`Config::new`].

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context, bail};
use ipnet::IpNet;
use mesh_runtime::{LocalAddr, parse_duration};
use serde::Deserialize;

use sidecar::{
    config::{ADMIN_ADDR, CONTROL_PLANE, Config, GATEWAY_ADDR, INBOUND_ADDR, Mode, OUTBOUND_ADDR},
    events::subscription::Subscription,
    gateway::{
        access_log::Sink,
        auth::{AuthMode, EdgeAuthConfig, KeySource},
        ip_filter::IpRule,
        jwt::Expectations,
        screen::ThreatMode,
    },
    outbound::route::Route,
    transport::public_tls::PublicTlsFiles,
};

/// The sidecar's command line.
#[derive(Debug, clap::Parser)]
#[command(
    version,
    about = "Opinion Market Mesh sidecar: the proxy beside a service instance, or the gateway"
)]
pub struct Args {
    /// YAML file with any of the settings below (snake_case keys); flags win over it.
    #[arg(long, env = "MESH_CONFIG")]
    config: Option<PathBuf>,
    /// sidecar (beside a service instance) or gateway (the platform's edge).
    #[arg(long, env = "MESH_MODE", value_enum)]
    mode: Option<Mode>,
    /// The service this instance belongs to (sidecar mode).
    #[arg(long, env = "MESH_SERVICE")]
    service: Option<String>,
    /// Unique instance id (default: <service>-<hostname>-<pid>).
    #[arg(long, env = "MESH_INSTANCE_ID")]
    instance_id: Option<String>,
    /// The local app (sidecar mode): host:port, or unix:/path for its Unix socket (then no
    /// other user of the host can reach the app past this sidecar).
    #[arg(long, env = "MESH_APP_ADDR")]
    app_addr: Option<LocalAddr>,
    /// Control-plane gRPC URL; repeat or comma-separate for failover. `https://` (the default
    /// control plane) needs --control-plane-ca; `http://` is for one run with --insecure-api.
    #[arg(long, env = "MESH_CONTROL_PLANE", value_delimiter = ',')]
    control_plane: Vec<String>,
    /// The mesh root certificate (PEM; the control plane's `ca.pem`, or `meshctl identity
    /// bundle`): an `https://` control plane must present a certificate it issued.
    #[arg(long, env = "MESH_CONTROL_PLANE_CA")]
    control_plane_ca: Option<PathBuf>,
    /// A DNS server (ip:port) to resolve names with — the control plane's (a name with several
    /// addresses: one per replica) and external services' — instead of /etc/hosts and the
    /// system's resolver configuration.
    #[arg(long, env = "MESH_DNS_SERVER")]
    dns_server: Option<SocketAddr>,
    /// Inbound listener: other sidecars reach the app here (default 0.0.0.0:4143).
    #[arg(long, env = "MESH_INBOUND_ADDR")]
    inbound_addr: Option<SocketAddr>,
    /// Outbound listener for the local app (default 127.0.0.1:4140; unix:/path for a socket
    /// only the app's user can open, mode 0600); the public listener in gateway mode.
    #[arg(long, env = "MESH_OUTBOUND_ADDR")]
    outbound_addr: Option<LocalAddr>,
    /// The admin API (`POST /events`, `/config`, …) also on this address for the local app:
    /// unix:/path makes a socket only the app's user can open (mode 0600).
    #[arg(long, env = "MESH_APP_API_ADDR")]
    app_api_addr: Option<LocalAddr>,
    /// Admin listener: /metrics /ready /live /config (default 127.0.0.1:4191).
    #[arg(long, env = "MESH_ADMIN_ADDR")]
    admin_addr: Option<SocketAddr>,
    /// Address registered for other sidecars (default: the inbound address, 127.0.0.1 for 0.0.0.0).
    #[arg(long, env = "MESH_ADVERTISE_ADDR")]
    advertise_addr: Option<String>,
    /// Where the fail-static snapshot lives (default .mesh/sidecar-<instance id>).
    #[arg(long, env = "MESH_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Services the app calls, watched from the start (others are added on first use).
    #[arg(long = "upstream", env = "MESH_UPSTREAMS", value_delimiter = ',')]
    upstreams: Vec<String>,
    /// Gateway route PREFIX=SERVICE[,REWRITE], e.g. /api/markets=market-service,/markets.
    #[arg(long = "route", env = "MESH_ROUTES", value_delimiter = ';')]
    routes: Vec<String>,
    #[arg(long, env = "MESH_ZONE")]
    zone: Option<String>,
    /// Version label registered with the instance.
    #[arg(long, env = "MESH_INSTANCE_VERSION")]
    instance_version: Option<String>,
    /// Metadata KEY=VALUE registered with the instance; repeatable.
    #[arg(long = "metadata", env = "MESH_METADATA", value_delimiter = ',')]
    metadata: Vec<String>,
    /// Weight for the weighted balancer (default 100).
    #[arg(long, env = "MESH_WEIGHT")]
    weight: Option<u32>,
    /// After SIGTERM and deregistration, keep serving this long (default 2s).
    #[arg(long, env = "MESH_DRAIN_DELAY", value_parser = parse_duration)]
    drain_delay: Option<Duration>,
    /// Then give open requests this long to finish (default 10s).
    #[arg(long, env = "MESH_DRAIN_TIMEOUT", value_parser = parse_duration)]
    drain_timeout: Option<Duration>,
    /// How long an HTTP/1 client may take to send a request head, or leave a connection idle,
    /// before it is closed (default 30s).
    #[arg(long, env = "MESH_HEADER_READ_TIMEOUT", value_parser = parse_duration)]
    header_read_timeout: Option<Duration>,
    /// Gateway mode: the largest request body accepted (bytes; default 1048576, 0 = no limit).
    /// A larger declared `Content-Length` is refused with 413 before any of the body is read.
    #[arg(long, env = "MESH_MAX_REQUEST_BODY")]
    max_request_body: Option<u64>,
    /// How long a repeated Idempotency-Key is answered with the first response (default 2m).
    #[arg(long, env = "MESH_IDEMPOTENCY_WINDOW", value_parser = parse_duration)]
    idempotency_window: Option<Duration>,
    /// How long a request for a service met for the first time waits for its endpoints (default 2s).
    #[arg(long, env = "MESH_DISCOVERY_WAIT", value_parser = parse_duration)]
    discovery_wait: Option<Duration>,
    /// Deliver a topic's events to the app: TOPIC=PATH (POST, CloudEvents binary mode); repeat
    /// for more. The config file's `subscriptions` take group, max_attempts, dead_letter_topic,
    /// timeout and backoff too.
    #[arg(long = "subscribe", env = "MESH_SUBSCRIBE", value_delimiter = ',')]
    subscribe: Vec<String>,
    /// Most bytes of unforwarded events spooled before publishing gets 429 (default 256 MiB).
    #[arg(long, env = "MESH_SPOOL_MAX_BYTES")]
    spool_max_bytes: Option<u64>,
    /// Publishing gets 429 while the oldest unforwarded event is older than this (default 24h).
    #[arg(long, env = "MESH_SPOOL_MAX_AGE", value_parser = parse_duration)]
    spool_max_age: Option<Duration>,
    /// A file holding the service's bootstrap token (`meshctl identity token create SERVICE`;
    /// `gateway` for the gateway): the sidecar gets its certificate from the mesh CA with it,
    /// renews it at two thirds of its lifetime, and speaks mutual TLS to other sidecars (its
    /// inbound listener then accepts mTLS only). A secret: read from a file, never given on the
    /// command line.
    #[arg(long, env = "MESH_IDENTITY_TOKEN_FILE")]
    identity_token_file: Option<PathBuf>,
    /// Gateway mode: check end users' bearer tokens (JWTs) against this JWK Set file (RS*, PS*,
    /// ES256/384, EdDSA, HS*), re-read when it changes. The verified `sub` and `roles` reach the
    /// app as `x-mesh-user` and `x-mesh-user-roles`; clients can never set those.
    #[arg(long, env = "MESH_JWKS_FILE", conflicts_with = "jwks_url")]
    jwks_file: Option<PathBuf>,
    /// Gateway mode: fetch the JWK Set from this URL (an identity provider's `jwks_uri`)
    /// instead, again every --jwks-refresh and at once for an unknown key id (at most once a
    /// second); a failed fetch keeps the keys in use.
    #[arg(long, env = "MESH_JWKS_URL")]
    jwks_url: Option<String>,
    /// The CAs (PEM) an https:// --jwks-url must chain to (default: the system's,
    /// /etc/ssl/certs/ca-certificates.crt).
    #[arg(long, env = "MESH_JWKS_CA")]
    jwks_ca: Option<PathBuf>,
    /// Accepted token issuer (`iss`); repeat for several. Default: any.
    #[arg(long = "jwt-issuer", env = "MESH_JWT_ISSUERS", value_delimiter = ',')]
    jwt_issuers: Vec<String>,
    /// Accepted token audience (`aud`); repeat for several. Default: any.
    #[arg(long = "jwt-audience", env = "MESH_JWT_AUDIENCES", value_delimiter = ',')]
    jwt_audiences: Vec<String>,
    /// Routes that name no auth mode: required (no token: 401), optional (a token is checked
    /// when present) or none. Default: optional.
    #[arg(long, env = "MESH_AUTH", value_parser = <AuthMode as std::str::FromStr>::from_str)]
    auth: Option<AuthMode>,
    /// How often the JWK Set file is checked for a change (default 30s; an unknown key id
    /// re-reads it at once).
    #[arg(long, env = "MESH_JWKS_REFRESH", value_parser = parse_duration)]
    jwks_refresh: Option<Duration>,
    /// Most verified tokens remembered, by hash, until their exp (at most a minute; emptied when
    /// the key set changes), so a client's next requests skip the signature check (default
    /// 10000; 0: check every request).
    #[arg(long, env = "MESH_JWT_CACHE")]
    jwt_cache: Option<usize>,
    /// Sidecar mode: a service whose calls may carry a verified end user to the app (default:
    /// gateway); repeat for several. Over mutual TLS only: the caller's certificate says who it is.
    #[arg(long = "trusted-edge", env = "MESH_TRUSTED_EDGES", value_delimiter = ',')]
    trusted_edges: Vec<String>,
    /// Export spans over OTLP/gRPC to this collector (`http://host:4317`); the standard
    /// `OTEL_*` variables apply. The share of new traces sampled is the service policy's
    /// `tracing.sampling` (else `OTEL_TRACES_SAMPLER_ARG`, else all).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// How often the calls this proxy made (per service called: requests, successes, latency)
    /// are reported to the control plane for its topology (default 10s; 0: never).
    #[arg(long, env = "MESH_EDGE_REPORT_INTERVAL", value_parser = parse_duration)]
    edge_report_interval: Option<Duration>,
    /// Gateway mode: the longest request target (path and query) accepted, bytes (default 8192;
    /// longer: 414). A route's `limits` may set its own.
    #[arg(long, env = "MESH_MAX_URI_LENGTH")]
    max_uri_length: Option<usize>,
    /// Gateway mode: the most header fields accepted (default 100; more: 431).
    #[arg(long, env = "MESH_MAX_HEADERS")]
    max_headers: Option<usize>,
    /// Gateway mode: the largest total of header names and values, bytes (default 32768; more: 431).
    #[arg(long, env = "MESH_MAX_HEADER_BYTES")]
    max_header_bytes: Option<usize>,
    /// Gateway mode: SQL-injection and XSS screening of query and body on routes that name no
    /// mode: off, detect (logged and counted; the default) or block (403).
    #[arg(long, env = "MESH_THREATS", value_parser = <ThreatMode as std::str::FromStr>::from_str)]
    threats: Option<ThreatMode>,
    /// Gateway mode: proxies (CIDR) whose X-Forwarded-For names the client; from anyone else
    /// the connection's address is the client's.
    #[arg(long = "trusted-proxies", env = "MESH_TRUSTED_PROXIES", value_delimiter = ',')]
    trusted_proxies: Vec<IpNet>,
    /// Gateway mode: only these clients (CIDR, IPv4 or IPv6, optionally `@RFC3339` until when)
    /// may call; repeat for several. Default: everyone.
    #[arg(long = "ip-allow", env = "MESH_IP_ALLOW", value_delimiter = ',', value_parser = IpRule::parse)]
    ip_allow: Vec<IpRule>,
    /// Gateway mode: these clients (CIDR[@RFC3339]) may not call (403).
    #[arg(long = "ip-deny", env = "MESH_IP_DENY", value_delimiter = ',', value_parser = IpRule::parse)]
    ip_deny: Vec<IpRule>,
    /// Gateway mode: block a client automatically after this many screening refusals or bad
    /// tokens within --block-window (default 20; 0: never).
    #[arg(long, env = "MESH_BLOCK_AFTER")]
    block_after: Option<u32>,
    /// The window strikes are counted in (default 1m).
    #[arg(long, env = "MESH_BLOCK_WINDOW", value_parser = parse_duration)]
    block_window: Option<Duration>,
    /// How long an automatic block lasts (default 10m); `meshctl gateway unblock` lifts one.
    #[arg(long, env = "MESH_BLOCK_FOR", value_parser = parse_duration)]
    block_for: Option<Duration>,
    /// Gateway mode: serve the public listener over TLS (HTTP/1.1 and HTTP/2 by ALPN) with this
    /// certificate chain (PEM); re-read with --tls-key when either changes.
    #[arg(long, env = "MESH_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "MESH_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// How often the certificate files are checked for a change (default 10s).
    #[arg(long, env = "MESH_TLS_RELOAD", value_parser = parse_duration)]
    tls_reload: Option<Duration>,
    /// With TLS: the Strict-Transport-Security max-age in seconds (default one year; 0: none).
    #[arg(long, env = "MESH_HSTS_MAX_AGE")]
    hsts_max_age: Option<u64>,
    /// Gateway mode: the access log, one JSON line per request: stdout (the default), a file
    /// path (appended to), or off.
    #[arg(long, env = "MESH_ACCESS_LOG")]
    access_log: Option<Sink>,
    /// The share of requests the access log keeps (0..=1, default 1); refusals are always kept.
    #[arg(long, env = "MESH_ACCESS_LOG_SAMPLE")]
    access_log_sample: Option<f64>,
    /// Runtime worker threads (default: one per core; 1 runs the whole proxy on one thread, the
    /// cheapest per request when the sidecar gets one core).
    #[arg(long, env = "MESH_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "MESH_LOG", default_value = "info")]
    pub log: String,
    /// How logs are written to stderr: text, or json (one object per line, with the request's
    /// trace id).
    #[arg(long, env = "MESH_LOG_FORMAT", default_value = "text")]
    pub log_format: mesh_runtime::LogFormat,
}

/// The config file: every key optional, unknown keys are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FileConfig {
    mode: Option<Mode>,
    service: Option<String>,
    instance_id: Option<String>,
    app_addr: Option<String>,
    control_plane: Vec<String>,
    inbound_addr: Option<SocketAddr>,
    outbound_addr: Option<String>,
    app_api_addr: Option<String>,
    admin_addr: Option<SocketAddr>,
    advertise_addr: Option<String>,
    data_dir: Option<PathBuf>,
    upstreams: Vec<String>,
    routes: Vec<Route>,
    zone: Option<String>,
    instance_version: Option<String>,
    metadata: HashMap<String, String>,
    weight: Option<u32>,
    #[serde(with = "opt_duration")]
    drain_delay: Option<Duration>,
    #[serde(with = "opt_duration")]
    drain_timeout: Option<Duration>,
    #[serde(with = "opt_duration")]
    header_read_timeout: Option<Duration>,
    max_request_body: Option<u64>,
    #[serde(with = "opt_duration")]
    discovery_wait: Option<Duration>,
    #[serde(with = "opt_duration")]
    idempotency_window: Option<Duration>,
    subscriptions: Vec<Subscription>,
    identity_token_file: Option<PathBuf>,
    control_plane_ca: Option<PathBuf>,
    dns_server: Option<SocketAddr>,
    jwks_file: Option<PathBuf>,
    jwks_url: Option<String>,
    jwks_ca: Option<PathBuf>,
    jwt_issuers: Vec<String>,
    jwt_audiences: Vec<String>,
    auth: Option<AuthMode>,
    #[serde(with = "opt_duration")]
    jwks_refresh: Option<Duration>,
    jwt_cache: Option<usize>,
    trusted_edges: Vec<String>,
    otlp_endpoint: Option<String>,
    #[serde(with = "opt_duration")]
    edge_report_interval: Option<Duration>,
    max_uri_length: Option<usize>,
    max_headers: Option<usize>,
    max_header_bytes: Option<usize>,
    threats: Option<ThreatMode>,
    trusted_proxies: Vec<IpNet>,
    ip_allow: Vec<IpRule>,
    ip_deny: Vec<IpRule>,
    block_after: Option<u32>,
    #[serde(with = "opt_duration")]
    block_window: Option<Duration>,
    #[serde(with = "opt_duration")]
    block_for: Option<Duration>,
    access_log: Option<String>,
    access_log_sample: Option<f64>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    #[serde(with = "opt_duration")]
    tls_reload: Option<Duration>,
    hsts_max_age: Option<u64>,
    spool_max_bytes: Option<u64>,
    #[serde(with = "opt_duration")]
    spool_max_age: Option<Duration>,
}

mod opt_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, de::Error};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| humantime::parse_duration(&s).map_err(|e| D::Error::custom(format!("{s:?}: {e}"))))
            .transpose()
    }
}

/// The config and the listeners' addresses.
pub struct Resolved {
    pub config: Config,
    pub inbound: SocketAddr,
    pub outbound: LocalAddr,
    pub app_api: Option<LocalAddr>,
    pub admin: SocketAddr,
}

/// A `host:port` or `unix:/path` from the config file, named by its key in errors.
fn local_addr(key: &str, value: Option<String>) -> anyhow::Result<Option<LocalAddr>> {
    value.map(|v| v.parse().map_err(|e: String| anyhow::anyhow!("{key}: {e}"))).transpose()
}

pub fn resolve(a: Args) -> anyhow::Result<Resolved> {
    let f: FileConfig = match &a.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read --config {}", path.display()))?;
            serde_yaml_ng::from_str(&text).with_context(|| format!("config file {}", path.display()))?
        }
        None => FileConfig::default(),
    };
    let mode = a.mode.or(f.mode).unwrap_or(Mode::Sidecar);
    let service = a.service.or(f.service);
    if let Some(s) = &service
        && !mesh_proto::names::is_service_name(s)
    {
        bail!("--service {s:?} must be {}", mesh_proto::names::SERVICE_NAME_RULE);
    }
    if mode == Mode::Sidecar && service.is_none() {
        bail!("--service is required in sidecar mode");
    }
    let app_addr = a.app_addr.or(local_addr("app_addr", f.app_addr)?);
    if mode == Mode::Sidecar && app_addr.is_none() {
        bail!("--app-addr is required in sidecar mode (where the local app listens)");
    }
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "local".into());
    let instance_id = a.instance_id.or(f.instance_id).unwrap_or_else(|| {
        format!("{}-{}-{}", service.as_deref().unwrap_or("gateway"), host, std::process::id())
    });
    if !mesh_proto::names::is_instance_id(&instance_id) {
        bail!("--instance-id {instance_id:?} must be {}", mesh_proto::names::INSTANCE_ID_RULE);
    }
    let inbound = a.inbound_addr.or(f.inbound_addr).unwrap_or(INBOUND_ADDR);
    let default_outbound = if mode == Mode::Gateway { GATEWAY_ADDR } else { OUTBOUND_ADDR };
    let outbound = a
        .outbound_addr
        .or(local_addr("outbound_addr", f.outbound_addr)?)
        .unwrap_or(LocalAddr::Tcp(default_outbound));
    let app_api = a.app_api_addr.or(local_addr("app_api_addr", f.app_api_addr)?);
    let admin = a.admin_addr.or(f.admin_addr).unwrap_or(ADMIN_ADDR);
    let control_plane = if a.control_plane.is_empty() { f.control_plane } else { a.control_plane };
    let control_plane =
        if control_plane.is_empty() { vec![CONTROL_PLANE.to_string()] } else { control_plane };
    let mut routes = f.routes;
    for r in &a.routes {
        routes.push(Route::parse(r).map_err(anyhow::Error::msg)?);
    }
    for r in &routes {
        r.validate().map_err(anyhow::Error::msg)?;
    }
    if mode == Mode::Gateway && routes.is_empty() {
        bail!("gateway mode needs at least one --route PREFIX=SERVICE[,REWRITE]");
    }
    let mut metadata = f.metadata;
    for kv in &a.metadata {
        let (k, v) = kv.split_once('=').with_context(|| format!("--metadata {kv:?}: expected KEY=VALUE"))?;
        metadata.insert(k.to_string(), v.to_string());
    }
    let upstreams: Vec<String> = if a.upstreams.is_empty() { f.upstreams } else { a.upstreams };
    if let Some(bad) = upstreams.iter().find(|u| !mesh_proto::names::is_service_name(u)) {
        bail!("--upstream {bad:?} must be {}", mesh_proto::names::SERVICE_NAME_RULE);
    }
    let mut subscriptions = f.subscriptions;
    for s in &a.subscribe {
        subscriptions.push(Subscription::parse(s).map_err(anyhow::Error::msg)?);
    }
    for s in &subscriptions {
        s.validate().map_err(anyhow::Error::msg)?;
    }
    if mode == Mode::Gateway && !subscriptions.is_empty() {
        bail!("subscriptions deliver to a local app: they need sidecar mode");
    }
    let identity_token = match a.identity_token_file.or(f.identity_token_file) {
        Some(path) => Some(
            mesh_runtime::read_secret(&path).map_err(|e| anyhow::anyhow!("--identity-token-file: {e}"))?,
        ),
        None => None,
    };
    let control_plane_ca = match a.control_plane_ca.or(f.control_plane_ca) {
        Some(path) => Some(
            std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read --control-plane-ca {}", path.display()))?,
        ),
        None => None,
    };
    if let Some(ca) = &control_plane_ca {
        mesh_proto::dial::roots(ca).context("--control-plane-ca holds no usable certificate")?;
    }
    if let Some(url) = control_plane.iter().find(|u| u.starts_with("https://"))
        && control_plane_ca.is_none()
    {
        bail!(
            "the control plane {url} is served over TLS: give its CA with --control-plane-ca \
             (the control plane's data dir holds it as ca.pem)"
        );
    }
    let data_dir =
        a.data_dir.or(f.data_dir).unwrap_or_else(|| PathBuf::from(format!(".mesh/sidecar-{instance_id}")));
    let mut c = Config::new(mode, instance_id, control_plane, data_dir);
    let d = c.clone();
    c.service = if mode == Mode::Sidecar { service } else { None };
    c.advertise_addr = a.advertise_addr.or(f.advertise_addr).unwrap_or_default();
    c.app_addr = app_addr;
    c.zone = a.zone.or(f.zone).unwrap_or_default();
    c.version = a.instance_version.or(f.instance_version).unwrap_or_default();
    c.metadata = metadata;
    c.weight = a.weight.or(f.weight).unwrap_or(d.weight);
    c.upstreams = upstreams;
    c.routes = routes;
    c.discovery_wait = a.discovery_wait.or(f.discovery_wait).unwrap_or(d.discovery_wait);
    c.drain_delay = a.drain_delay.or(f.drain_delay).unwrap_or(d.drain_delay);
    c.drain_timeout = a.drain_timeout.or(f.drain_timeout).unwrap_or(d.drain_timeout);
    c.header_read_timeout = a.header_read_timeout.or(f.header_read_timeout).unwrap_or(d.header_read_timeout);
    let e = &mut c.edge;
    e.limits.body = match a.max_request_body.or(f.max_request_body) {
        Some(0) => u64::MAX,
        Some(n) => n,
        None => d.edge.limits.body,
    };
    e.limits.uri = a.max_uri_length.or(f.max_uri_length).unwrap_or(d.edge.limits.uri);
    e.limits.headers = a.max_headers.or(f.max_headers).unwrap_or(d.edge.limits.headers);
    e.limits.header_bytes = a.max_header_bytes.or(f.max_header_bytes).unwrap_or(d.edge.limits.header_bytes);
    e.threats = a.threats.or(f.threats).unwrap_or(d.edge.threats);
    e.trusted_proxies = if a.trusted_proxies.is_empty() { f.trusted_proxies } else { a.trusted_proxies };
    e.allow = if a.ip_allow.is_empty() { f.ip_allow } else { a.ip_allow };
    e.deny = if a.ip_deny.is_empty() { f.ip_deny } else { a.ip_deny };
    e.auto_block.after = a.block_after.or(f.block_after).unwrap_or(d.edge.auto_block.after);
    e.auto_block.window = a.block_window.or(f.block_window).unwrap_or(d.edge.auto_block.window);
    e.auto_block.block_for = a.block_for.or(f.block_for).unwrap_or(d.edge.auto_block.block_for);
    c.access_log = match (a.access_log, f.access_log) {
        (Some(sink), _) => sink,
        (None, Some(s)) => s.parse().map_err(anyhow::Error::msg)?,
        (None, None) => d.access_log.clone(),
    };
    c.access_log_sample = a.access_log_sample.or(f.access_log_sample).unwrap_or(d.access_log_sample);
    c.public_tls = match (a.tls_cert.or(f.tls_cert), a.tls_key.or(f.tls_key)) {
        (Some(cert), Some(key)) if mode == Mode::Gateway => Some(PublicTlsFiles { cert, key }),
        (None, None) => None,
        (Some(_), Some(_)) => {
            bail!("--tls-cert / --tls-key are for the gateway's public listener: they need gateway mode")
        }
        _ => bail!("--tls-cert and --tls-key go together"),
    };
    c.tls_reload = a.tls_reload.or(f.tls_reload).unwrap_or(d.tls_reload);
    c.edge.hsts_max_age = a.hsts_max_age.or(f.hsts_max_age).unwrap_or(d.edge.hsts_max_age);
    if !(0.0..=1.0).contains(&c.access_log_sample) {
        bail!("--access-log-sample {}: a share between 0 and 1", c.access_log_sample);
    }
    c.idempotency_window = a.idempotency_window.or(f.idempotency_window).unwrap_or(d.idempotency_window);
    c.spool_max_bytes = a.spool_max_bytes.or(f.spool_max_bytes).unwrap_or(d.spool_max_bytes);
    c.spool_max_age = a.spool_max_age.or(f.spool_max_age).unwrap_or(d.spool_max_age);
    c.subscriptions = subscriptions;
    c.identity_token = identity_token;
    c.control_plane_ca = control_plane_ca;
    c.dns_server = a.dns_server.or(f.dns_server);
    let pick = |a: Vec<String>, f: Vec<String>| if a.is_empty() { f } else { a };
    let jwks = match (a.jwks_file.or(f.jwks_file), a.jwks_url.or(f.jwks_url)) {
        (Some(_), Some(_)) => bail!("--jwks-file or --jwks-url: one source of keys"),
        (Some(path), None) => Some(KeySource::File(path)),
        (None, Some(url)) => Some(KeySource::Url { url, ca_file: a.jwks_ca.or(f.jwks_ca) }),
        (None, None) => None,
    };
    if mode == Mode::Sidecar && jwks.is_some() {
        bail!("--jwks-file / --jwks-url check end users at the edge: they need gateway mode");
    }
    c.edge_auth = jwks.map(|jwks| EdgeAuthConfig {
        jwks,
        expect: Expectations {
            issuers: pick(a.jwt_issuers, f.jwt_issuers),
            audiences: pick(a.jwt_audiences, f.jwt_audiences),
            ..Expectations::default()
        },
        default_mode: a.auth.or(f.auth).unwrap_or(AuthMode::Optional),
        refresh: a.jwks_refresh.or(f.jwks_refresh).unwrap_or(Duration::from_secs(30)),
        token_cache: a.jwt_cache.or(f.jwt_cache).unwrap_or(10_000),
    });
    let edges = pick(a.trusted_edges, f.trusted_edges);
    if let Some(bad) = edges.iter().find(|s| !mesh_proto::names::is_service_name(s)) {
        bail!("--trusted-edge {bad:?} must be {}", mesh_proto::names::SERVICE_NAME_RULE);
    }
    if !edges.is_empty() {
        c.trusted_edges = edges;
    }
    c.otlp_endpoint = a.otlp_endpoint.or(f.otlp_endpoint);
    if let Some(every) = a.edge_report_interval.or(f.edge_report_interval) {
        c.edge_report_interval = every;
    }
    let config = c;
    Ok(Resolved { config, inbound, outbound, app_api, admin })
}
