//! Test harness for whole-mesh tests: a control plane, sidecars and HTTP backends on port 0 of
//! 127.0.0.1, started through the same `run` / `serve` functions the binaries use, each stopped
//! when dropped. Also: the real binaries as child processes (for SIGKILL), a plain HTTP client,
//! and eventual assertions.

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use mesh_proto::{policy::ServicePolicy, v1};
pub use sidecar::{Config as SidecarConfig, Mode};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tonic::{
    service::interceptor::InterceptedService,
    transport::{Channel, Endpoint},
};

pub const WAIT: Duration = Duration::from_secs(15);

/// Polls `check` every 10 ms until it holds, failing the test after `within`.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub use control_plane::cli::AdminToken as Bearer;

/// What [`TestCp::channel`] returns.
pub type AdminChannel = control_plane::cli::CpChannel;

pub async fn channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap()
}

// ---- control plane ---------------------------------------------------------------------------

/// A control plane inside the test process. Its API is plaintext and open unless started with
/// [`TestCp::start_secure`] (the binary's default: TLS, sidecars by certificate, admin by token);
/// the tests of API security and `meshctl up` run it secure, the others test what is behind it.
pub struct TestCp {
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    pub secure: bool,
    stop: CancellationToken,
    task: Option<JoinHandle<Result<(), control_plane::Error>>>,
}

impl TestCp {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts with the defaults changed by `tune` (ping interval, sweep interval, …).
    pub async fn start_with(tune: impl FnOnce(&mut control_plane::Config)) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), tune).await
    }

    /// With the API served as the binary serves it by default: TLS and authentication.
    pub async fn start_secure() -> Self {
        Self::start_with(|c| c.insecure_api = false).await
    }

    /// Starts on the state in `dir` (a previous instance's data dir).
    pub async fn start_in(dir: tempfile::TempDir, tune: impl FnOnce(&mut control_plane::Config)) -> Self {
        let mut config = control_plane::Config::new(dir.path());
        config.insecure_api = true;
        tune(&mut config);
        let secure = !config.insecure_api;
        let cp = control_plane::ControlPlane::open(config).await.unwrap();
        let g = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (grpc, admin) = (g.local_addr().unwrap(), a.local_addr().unwrap());
        let stop = CancellationToken::new();
        let task = tokio::spawn(cp.serve(g, a, stop.clone()));
        Self { grpc, admin, dir, secure, stop, task: Some(task) }
    }

    pub fn url(&self) -> String {
        let scheme = if self.secure { "https" } else { "http" };
        format!("{scheme}://{}", self.grpc)
    }

    /// The mesh root (what sidecars get as `--control-plane-ca`).
    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ca.pem")).unwrap()
    }

    /// The admin token the control plane wrote into its data dir.
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("admin.token")).unwrap().trim().to_string()
    }

    /// A channel with admin rights: plaintext to an open API, else TLS + the admin token.
    pub async fn channel(&self) -> AdminChannel {
        if !self.secure {
            return InterceptedService::new(channel(self.grpc).await, Bearer(None));
        }
        let ch = self.dialer(None).connect(Endpoint::from_shared(self.url()).unwrap()).await.unwrap();
        InterceptedService::new(ch, Bearer(Some(format!("Bearer {}", self.admin_token()).parse().unwrap())))
    }

    /// TLS to a secure API trusting the mesh root, presenting `client` (certificate chain PEM,
    /// key PEM) when given.
    pub fn dialer(&self, client: Option<(&str, &str)>) -> mesh_proto::dial::Dialer {
        let config = Arc::new(mesh_proto::dial::client_config(&self.ca_pem(), client).unwrap());
        mesh_proto::dial::Dialer::tls(Arc::new(move || Ok(config.clone())))
    }

    /// A new bootstrap token for `service` (created as the admin).
    pub async fn token(&self, service: &str) -> String {
        v1::identity_client::IdentityClient::new(self.channel().await)
            .create_token(v1::CreateTokenRequest { service: service.into() })
            .await
            .unwrap()
            .into_inner()
            .token
    }

    /// Stores `policy` for `service`; returns its version.
    pub async fn set_policy(&self, service: &str, policy: &ServicePolicy) -> u64 {
        v1::policy_client::PolicyClient::new(self.channel().await)
            .set(v1::SetPolicyRequest {
                service: service.into(),
                policy: Some(policy.into()),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .policy
            .unwrap()
            .version
    }

    /// Routable endpoint ids of `service`, sorted.
    pub async fn endpoints(&self, service: &str) -> Vec<String> {
        let r = v1::registry_client::RegistryClient::new(self.channel().await)
            .get_service(v1::GetServiceRequest { name: service.into() })
            .await;
        let mut ids: Vec<String> = match r {
            Ok(r) => r
                .into_inner()
                .instances
                .into_iter()
                .filter(|i| i.health() == v1::HealthStatus::Healthy)
                .map(|i| i.id)
                .collect(),
            Err(_) => vec![],
        };
        ids.sort();
        ids
    }

    /// Graceful stop (it must drain); returns the data dir so a test can start again on it.
    pub async fn stop(mut self) -> tempfile::TempDir {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            tokio::time::timeout(WAIT, t).await.expect("the control plane drains").unwrap().unwrap();
        }
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }
}

impl Drop for TestCp {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A policy with fast heartbeats and probes, for tests that watch instances come and go.
pub fn fast_policy() -> ServicePolicy {
    let mut p = ServicePolicy::default();
    p.health.heartbeat_interval = Duration::from_millis(100);
    p.health.heartbeat_ttl = Duration::from_millis(400);
    p.health.probe_interval = Duration::from_millis(100);
    p.health.probe_timeout = Duration::from_millis(100);
    p.health.self_preservation_percent = 0;
    p
}

// ---- HTTP backends ---------------------------------------------------------------------------

/// An HTTP/1.1 + h2c app. `GET /healthz` answers 200 (or 503 once made unhealthy); every other
/// request answers JSON naming the backend, method, path, version and request headers, after
/// `delay` (or `?delay_ms=N`).
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub hits: Arc<AtomicU64>,
    pub healthy: Arc<AtomicBool>,
    pub delay_ms: Arc<AtomicU64>,
    /// Answer this status instead of 200 (0 = 200).
    pub status: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl Backend {
    pub async fn start(name: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let b = Backend {
            name: name.to_string(),
            addr,
            hits: Arc::default(),
            healthy: Arc::new(AtomicBool::new(true)),
            delay_ms: Arc::default(),
            status: Arc::default(),
            stop: CancellationToken::new(),
        };
        let (name, hits, healthy, delay, status, stop) = (
            b.name.clone(),
            b.hits.clone(),
            b.healthy.clone(),
            b.delay_ms.clone(),
            b.status.clone(),
            b.stop.clone(),
        );
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                };
                let (name, hits, healthy, delay, status) =
                    (name.clone(), hits.clone(), healthy.clone(), delay.clone(), status.clone());
                let svc = service_fn(move |req: Request<Incoming>| {
                    let (name, hits, healthy, delay, status) =
                        (name.clone(), hits.clone(), healthy.clone(), delay.clone(), status.clone());
                    async move { Ok::<_, Infallible>(answer(req, &name, &hits, &healthy, &delay, &status).await) }
                });
                let stop = stop.clone();
                tokio::spawn(async move {
                    let builder = auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = stop.cancelled() => {}
                    }
                });
            }
        });
        b
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Stops listening and drops every open connection at once (the app crashed).
    pub fn stop_now(&self) {
        self.stop.cancel();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn answer(
    req: Request<Incoming>,
    name: &str,
    hits: &AtomicU64,
    healthy: &AtomicBool,
    delay: &AtomicU64,
    status: &AtomicUsize,
) -> Response<Full<Bytes>> {
    if req.uri().path() == "/healthz" {
        let code =
            if healthy.load(Ordering::Relaxed) { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        return Response::builder().status(code).body(Full::new(Bytes::from_static(b"{}"))).unwrap();
    }
    hits.fetch_add(1, Ordering::Relaxed);
    let query_delay = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("delay_ms=")))
        .and_then(|v| v.parse::<u64>().ok());
    let ms = query_delay.unwrap_or_else(|| delay.load(Ordering::Relaxed));
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let headers: HashMap<String, String> =
        req.headers().iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string())).collect();
    let (method, path, version) =
        (req.method().to_string(), req.uri().path().to_string(), format!("{:?}", req.version()));
    let query = req.uri().query().map(str::to_string);
    let body_len = req.into_body().collect().await.map(|b| b.to_bytes().len()).unwrap_or(0);
    let body = serde_json::json!({
        "backend": name, "method": method, "path": path, "version": version, "headers": headers, "body_len": body_len,
        "hit": hits.load(Ordering::Relaxed),
    });
    let code = match status.load(Ordering::Relaxed) {
        0 => StatusCode::OK,
        c => StatusCode::from_u16(c as u16).unwrap_or(StatusCode::OK),
    };
    let mut resp = Response::builder().status(code).header("content-type", "application/json");
    // `?cc=…` and `?vary=…` set Cache-Control and Vary (for cache tests).
    for (param, header) in [("cc=", "cache-control"), ("vary=", "vary")] {
        if let Some(v) = query.as_deref().and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix(param))) {
            resp = resp.header(header, v.replace("%20", " "));
        }
    }
    resp.body(Full::new(Bytes::from(body.to_string()))).unwrap()
}

// ---- sidecars --------------------------------------------------------------------------------

/// A sidecar inside the test process.
pub struct TestSidecar {
    pub outbound: SocketAddr,
    pub inbound: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub instance_id: String,
    pub dir: PathBuf,
    stop: CancellationToken,
    task: Option<JoinHandle<Result<(), sidecar::Error>>>,
}

impl TestSidecar {
    /// A sidecar for `service` in front of `app`, with its data in `dir`.
    pub fn config(cp: &str, service: &str, id: &str, app: SocketAddr, dir: &Path) -> SidecarConfig {
        SidecarConfig {
            mode: Mode::Sidecar,
            service: Some(service.into()),
            instance_id: id.into(),
            app_addr: Some(mesh_runtime::LocalAddr::Tcp(app)),
            control_plane: vec![cp.to_string()],
            advertise_addr: String::new(),
            data_dir: dir.to_path_buf(),
            zone: "z1".into(),
            version: "test".into(),
            metadata: HashMap::new(),
            weight: 100,
            upstreams: vec![],
            routes: vec![],
            discovery_wait: Duration::from_secs(2),
            drain_delay: Duration::from_millis(300),
            drain_timeout: Duration::from_secs(5),
            header_read_timeout: sidecar::config::HEADER_READ_TIMEOUT,
            max_request_body: sidecar::config::MAX_REQUEST_BODY,
            idempotency_window: Duration::from_secs(120),
            spool_max_bytes: 256 * 1024 * 1024,
            spool_max_age: Duration::from_secs(86_400),
            subscriptions: Vec::new(),
            identity_token: None,
            control_plane_ca: None,
        }
    }

    /// A gateway routing `routes` into the mesh.
    pub fn gateway_config(
        cp: &str,
        routes: Vec<sidecar::outbound::route::Route>,
        dir: &Path,
    ) -> SidecarConfig {
        SidecarConfig {
            mode: Mode::Gateway,
            service: None,
            instance_id: "gateway".into(),
            app_addr: None,
            routes,
            ..Self::config(cp, "gateway", "gateway", "127.0.0.1:9".parse().unwrap(), dir)
        }
    }

    pub async fn start(mut config: SidecarConfig) -> Self {
        let outbound = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let inbound = match config.mode {
            Mode::Sidecar => Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
            Mode::Gateway => None,
        };
        let inbound_addr = inbound.as_ref().map(|l| l.local_addr().unwrap());
        if config.advertise_addr.is_empty()
            && let Some(a) = inbound_addr
        {
            config.advertise_addr = a.to_string();
        }
        let (out_addr, admin_addr) = (outbound.local_addr().unwrap(), admin.local_addr().unwrap());
        let stop = CancellationToken::new();
        let (instance_id, dir) = (config.instance_id.clone(), config.data_dir.clone());
        let listeners = sidecar::Listeners { inbound, outbound: outbound.into(), app_api: None, admin };
        let task = tokio::spawn(sidecar::run(config, listeners, stop.clone()));
        Self {
            outbound: out_addr,
            inbound: inbound_addr,
            admin: admin_addr,
            instance_id,
            dir,
            stop,
            task: Some(task),
        }
    }

    /// Starts the graceful shutdown and returns at once.
    pub fn begin_stop(&self) {
        self.stop.cancel();
    }

    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            tokio::time::timeout(WAIT, t).await.expect("sidecar drains").unwrap().unwrap();
        }
    }

    pub async fn config_json(&self) -> serde_json::Value {
        let (_, body) = get(self.admin, "admin", "/config").await;
        serde_json::from_str(&body).unwrap()
    }
}

impl Drop for TestSidecar {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

// ---- real binaries ---------------------------------------------------------------------------

/// The directory cargo puts the workspace's binaries in (beside the test executable's `deps/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(|d| d.parent()).unwrap().to_path_buf()
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not built: run the tests with `cargo nextest run --workspace` (or `cargo build --workspace` first)",
        p.display()
    );
    p
}

/// `meshctl [GLOBAL…] up [UP…]` on port 0 everywhere with its state in a directory; stopped
/// with SIGINT (Ctrl-C) on drop, so no process of its mesh outlives the test.
pub struct MeshctlUp(pub Option<Child>);

impl MeshctlUp {
    /// Starts it and hands back its stdout.
    pub fn start(state: &std::path::Path, global: &[&str], up: &[&str]) -> (Self, std::process::ChildStdout) {
        let mut child = Command::new(bin("meshctl"))
            .args(global)
            .arg("up")
            .args(up)
            .args([
                "--grpc-addr",
                "127.0.0.1:0",
                "--admin-addr",
                "127.0.0.1:0",
                "--gateway-addr",
                "127.0.0.1:0",
            ])
            .arg("--dir")
            .arg(state)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        (Self(Some(child)), stdout)
    }
}

impl Drop for MeshctlUp {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
            let _ = child.wait();
        }
    }
}

/// A workspace binary as a child process; killed (SIGKILL) on drop.
pub struct Process {
    pub child: Child,
    /// Its `listening` line.
    pub listening: serde_json::Value,
}

impl Process {
    pub fn start(name: &str, args: &[String]) -> Self {
        let mut cmd = Command::new(bin(name));
        cmd.args(args);
        Self::spawn(cmd, name)
    }

    /// Runs `cmd` (stdin closed, stderr inherited) and waits for its `listening` line.
    pub fn spawn(mut cmd: Command, name: &str) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let listening =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{name} printed {line:?}: {e}"));
        Self { child, listening }
    }

    pub fn addr(&self, key: &str) -> SocketAddr {
        self.listening[key]
            .as_str()
            .unwrap_or_else(|| panic!("no {key} in {}", self.listening))
            .parse()
            .unwrap()
    }

    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- HTTP client -----------------------------------------------------------------------------

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// `GET path` to `addr` with `Host: host`: (status, body).
/// The value of sample `name` (with its labels, as written) in Prometheus text, 0 if absent.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Sample `name` from the `/metrics` of the admin listener at `addr`.
pub async fn http_metric(addr: SocketAddr, name: &str) -> f64 {
    metric(&get(addr, "test", "/metrics").await.1, name)
}

pub async fn get(addr: SocketAddr, host: &str, path: &str) -> (u16, String) {
    request(addr, "GET", host, path, &[], Bytes::new()).await
}

/// One HTTP/1.1 request on a fresh pooled client: (status, body). Transport failures are
/// status 0 with the error as body.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> (u16, String) {
    let (status, _, body) = request_full(addr, method, host, path, headers, body).await;
    (status, body)
}

/// [`request`], also returning the answer's headers (status 0 and no headers if it failed).
pub async fn request_full(
    addr: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> (u16, http::HeaderMap, String) {
    let mut b = Request::builder().method(method).uri(format!("http://{addr}{path}")).header("host", host);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    match client().request(b.body(Full::new(body)).unwrap()).await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let (parts, body) = resp.into_parts();
            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            (status, parts.headers, String::from_utf8_lossy(&body).into_owned())
        }
        Err(e) => (0, http::HeaderMap::new(), e.to_string()),
    }
}

/// A reusable keep-alive client, as an app would hold one.
#[derive(Clone)]
pub struct HttpClient(Client<HttpConnector, Full<Bytes>>);

impl Default for HttpClient {
    fn default() -> Self {
        Self(client())
    }
}

impl HttpClient {
    pub async fn get(&self, addr: SocketAddr, host: &str, path: &str) -> (u16, String) {
        let req = Request::get(format!("http://{addr}{path}"))
            .header("host", host)
            .body(Full::new(Bytes::new()))
            .unwrap();
        match self.0.request(req).await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                (status, String::from_utf8_lossy(&body).into_owned())
            }
            Err(e) => (0, e.to_string()),
        }
    }
}

/// The `backend` field of a Backend's JSON answer.
pub fn backend_of(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["backend"].as_str().map(str::to_string))
        .unwrap_or_else(|| format!("<not a backend answer: {body}>"))
}

/// Steady closed-loop load: `tasks` keep-alive clients each sending `GET path` with
/// `Host: host` back to back until stopped, counting successes and recording failures.
pub struct Load {
    ok: Arc<AtomicU64>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    pub fn start(addr: SocketAddr, host: &str, path: &str, tasks: usize) -> Self {
        let (ok, failures, stop) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(std::sync::Mutex::new(Vec::new())),
            CancellationToken::new(),
        );
        let tasks = (0..tasks)
            .map(|_| {
                let (ok, failures, stop, host, path) =
                    (ok.clone(), failures.clone(), stop.clone(), host.to_string(), path.to_string());
                tokio::spawn(async move {
                    let client = HttpClient::default();
                    while !stop.is_cancelled() {
                        let (status, body) = client.get(addr, &host, &path).await;
                        if status == 200 {
                            ok.fetch_add(1, Ordering::Relaxed);
                        } else {
                            failures
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push(format!("{status}: {body}"));
                        }
                    }
                })
            })
            .collect();
        Self { ok, failures, stop, tasks }
    }

    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Waits until `n` more requests than now have succeeded.
    pub async fn wait_more(&self, n: u64, what: &str) {
        let target = self.ok() + n;
        eventually(WAIT, what, || async { self.ok() >= target }).await;
    }

    /// Stops the clients and fails the test if any request failed; returns the successes.
    pub async fn stop_expecting_no_failures(self) -> u64 {
        let (ok, failures) = self.stop().await;
        assert!(
            failures.is_empty(),
            "{} of {} requests failed, e.g. {:?}",
            failures.len(),
            ok + failures.len() as u64,
            &failures[..failures.len().min(5)]
        );
        ok
    }

    /// Stops the clients; returns (successes, failures).
    pub async fn stop(mut self) -> (u64, Vec<String>) {
        self.stop.cancel();
        for t in std::mem::take(&mut self.tasks) {
            let _ = t.await;
        }
        let failures = std::mem::take(&mut *self.failures.lock().unwrap_or_else(|p| p.into_inner()));
        (self.ok(), failures)
    }
}

/// What a [`FaultProxy`] does to each connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Accepts, reads, never answers.
    Blackhole,
    /// Resets the connection at once (RST).
    Reset,
    /// Waits this long before passing anything through.
    Delay(Duration),
    /// Passes the request, then only the first `n` bytes of the answer, then closes.
    Truncate(usize),
}

/// A TCP proxy on 127.0.0.1 that injects one fault into every connection to `target`
/// (a stand-in for toxiproxy, which cannot be installed here).
pub struct FaultProxy {
    pub addr: SocketAddr,
    stop: CancellationToken,
}

impl FaultProxy {
    pub async fn start(target: SocketAddr, fault: Fault) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            loop {
                let (mut client, _) = tokio::select! {
                    _ = token.cancelled() => return,
                    r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
                };
                let token = token.clone();
                tokio::spawn(async move {
                    let work = async {
                        match fault {
                            Fault::Blackhole => {
                                let mut sink = [0u8; 4096];
                                while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {}
                            }
                            Fault::Reset => {
                                let _ = client.set_zero_linger();
                                drop(client);
                            }
                            Fault::Delay(d) => {
                                tokio::time::sleep(d).await;
                                if let Ok(mut up) = tokio::net::TcpStream::connect(target).await {
                                    let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                                }
                            }
                            Fault::Truncate(n) => {
                                let Ok(up) = tokio::net::TcpStream::connect(target).await else { return };
                                let (mut ur, mut uw) = up.into_split();
                                let (mut cr, mut cw) = client.into_split();
                                let forward = async { tokio::io::copy(&mut cr, &mut uw).await };
                                let back = async {
                                    let mut buf = vec![0u8; n];
                                    let mut got = 0;
                                    while got < n {
                                        match ur.read(&mut buf[got..]).await {
                                            Ok(0) | Err(_) => break,
                                            Ok(k) => got += k,
                                        }
                                    }
                                    let _ = cw.write_all(&buf[..got]).await;
                                    let _ = cw.shutdown().await;
                                };
                                tokio::select! { _ = forward => {}, _ = back => {} }
                            }
                        }
                    };
                    tokio::select! { _ = work => {}, _ = token.cancelled() => {} }
                });
            }
        });
        FaultProxy { addr, stop }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Arguments for the `control-plane` binary on `grpc` (`127.0.0.1:0` for any port) with its
/// data in `dir`.
pub fn control_plane_args(dir: &Path, grpc: &str) -> Vec<String> {
    [
        "--insecure-api",
        "--grpc-addr",
        grpc,
        "--admin-addr",
        "127.0.0.1:0",
        "--log",
        "warn",
        "--data-dir",
        &dir.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Arguments for a `sidecar` binary serving `service` as `id` in front of `app`, all listeners
/// on port 0.
pub fn sidecar_args(
    service: &str,
    id: &str,
    app: SocketAddr,
    control_plane: &str,
    dir: &Path,
) -> Vec<String> {
    [
        "--service",
        service,
        "--instance-id",
        id,
        "--app-addr",
        &app.to_string(),
        "--control-plane",
        control_plane,
        "--inbound-addr",
        "127.0.0.1:0",
        "--outbound-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--data-dir",
        &dir.display().to_string(),
        "--log",
        "warn",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}
