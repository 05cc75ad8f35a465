//! Test harness: a control plane in-process (through the same `ControlPlane::open` / `serve` the
//! binary uses) or as the real binary, always on port 0 of 127.0.0.1 and always stopped.
#![allow(dead_code)]

use std::{
    future::Future,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use control_plane::{Config, ControlPlane};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

/// A control plane running inside the test process.
pub struct TestCp {
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), control_plane::Error>>>,
}

impl TestCp {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tune: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, tune).await
    }

    pub async fn start_in(dir: tempfile::TempDir, tune: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config::new(dir.path());
        tune(&mut config);
        let cp = ControlPlane::open(config).unwrap();
        let grpc_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (grpc, admin) = (grpc_l.local_addr().unwrap(), admin_l.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(cp.serve(grpc_l, admin_l, shutdown.clone()));
        Self { grpc, admin, dir, shutdown, task: Some(task) }
    }

    pub async fn channel(&self) -> Channel {
        channel(self.grpc).await
    }

    /// Graceful stop; returns the data dir so a test can start again on the same state.
    pub async fn stop(mut self) -> tempfile::TempDir {
        self.shutdown.cancel();
        let task = self.task.take().unwrap();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("control plane drains")
            .unwrap()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, dir)
    }
}

impl Drop for TestCp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub async fn channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap()
}

/// Polls `check` until it returns true, failing after `within`.
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

/// The real `control-plane` binary on port 0; killed on drop.
pub struct CpProcess {
    pub child: Child,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
}

impl CpProcess {
    pub fn start(data_dir: &Path) -> Self {
        Self::start_with_args(data_dir, &[])
    }

    pub fn start_with_args(data_dir: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_control-plane"))
            .args([
                "--grpc-addr",
                "127.0.0.1:0",
                "--admin-addr",
                "127.0.0.1:0",
                "--log",
                "warn",
                "--data-dir",
            ])
            .arg(data_dir)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        let addr = |k: &str| v[k].as_str().unwrap().parse().unwrap();
        Self { grpc: addr("grpc"), admin: addr("admin"), child }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for CpProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends a signal to a process.
pub fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).unwrap();
}

/// One HTTP/1.1 GET over a plain socket: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8(buf).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    // axum answers small bodies with content-length; no chunked decoding needed for these.
    (status, body.to_string())
}

pub fn instance(service: &str, id: &str, port: u16) -> mesh_proto::v1::Instance {
    mesh_proto::v1::Instance {
        service: service.into(),
        id: id.into(),
        address: format!("127.0.0.1:{port}"),
        zone: "z1".into(),
        version: "1.0.0".into(),
        ..Default::default()
    }
}

pub fn bin(name: &str) -> PathBuf {
    match name {
        "meshctl" => PathBuf::from(env!("CARGO_BIN_EXE_meshctl")),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_control-plane")),
    }
}
