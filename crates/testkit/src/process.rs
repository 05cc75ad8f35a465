//! The workspace's real binaries as child processes: found beside the test executable, started
//! on port 0, their addresses read from the JSON line they print, stopped on drop.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use crate::client;

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
        Self::start_with_env(state, global, up, &[])
    }

    /// [`MeshctlUp::start`] with environment variables for meshctl and the processes it starts.
    pub fn start_with_env(
        state: &std::path::Path,
        global: &[&str],
        up: &[&str],
        env: &[(&str, &str)],
    ) -> (Self, std::process::ChildStdout) {
        let mut child = Command::new(bin("meshctl"))
            .envs(env.iter().copied())
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

/// The real `control-plane` binary on port 0 of 127.0.0.1; SIGKILLed on drop. Plaintext API
/// (`--insecure-api`) unless started with [`CpProcess::start_secure`].
pub struct CpProcess {
    proc: Process,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    secure: bool,
}

impl CpProcess {
    pub fn start(data_dir: &Path) -> Self {
        Self::launch(data_dir, false)
    }

    /// With the binary's defaults: TLS, certificates and the admin token.
    pub fn start_secure(data_dir: &Path) -> Self {
        Self::launch(data_dir, true)
    }

    /// A replica on a shared store: plaintext API, with `extra` flags (`--store etcd …`).
    pub fn start_with(data_dir: &Path, extra: &[String]) -> Self {
        Self::launch_with(data_dir, false, extra)
    }

    fn launch(data_dir: &Path, secure: bool) -> Self {
        Self::launch_with(data_dir, secure, &[])
    }

    fn launch_with(data_dir: &Path, secure: bool, extra: &[String]) -> Self {
        let args: Vec<String> =
            ["--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0", "--log", "warn", "--data-dir"]
                .iter()
                .map(|s| s.to_string())
                .chain([data_dir.display().to_string()])
                .chain((!secure).then(|| "--insecure-api".to_string()))
                .chain(extra.iter().cloned())
                .collect();
        let proc = Process::start("control-plane", &args);
        let (grpc, admin) = (proc.addr("grpc"), proc.addr("admin"));
        Self { proc, grpc, admin, secure }
    }

    pub fn url(&self) -> String {
        let scheme = if self.secure { "https" } else { "http" };
        format!("{scheme}://{}", self.grpc)
    }

    pub fn kill9(self) {
        self.proc.kill9();
    }

    pub fn pid(&self) -> i32 {
        self.proc.child.id() as i32
    }

    /// Waits for the process to exit.
    pub fn wait(mut self) -> std::process::ExitStatus {
        self.proc.child.wait().unwrap()
    }
}

/// Sends a signal to a process.
pub fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).unwrap();
}

/// `GET path` on the admin listener: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    client::get(addr, "test", path).await
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
