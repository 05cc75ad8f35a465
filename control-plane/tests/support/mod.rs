//! What the control plane's integration tests share: the workspace test harness
//! (`mesh-testkit`) plus the real `control-plane` binary on port 0 and a few helpers.
#![allow(dead_code, unused_imports)]

use std::{net::SocketAddr, path::Path};

use mesh_testkit::Process;
pub use mesh_testkit::{TestCp, bin, channel, eventually};

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

    fn launch(data_dir: &Path, secure: bool) -> Self {
        let args: Vec<String> =
            ["--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0", "--log", "warn", "--data-dir"]
                .iter()
                .map(|s| s.to_string())
                .chain([data_dir.display().to_string()])
                .chain((!secure).then(|| "--insecure-api".to_string()))
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
    mesh_testkit::get(addr, "test", path).await
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
