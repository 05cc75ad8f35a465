//! A real sidecar in process on port 0 ([`TestSidecar`]).

pub use sidecar::{Config as SidecarConfig, Mode};
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::{client::get, eventually::WAIT};

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
        let mut c = SidecarConfig::new(Mode::Sidecar, id.into(), vec![cp.to_string()], dir.to_path_buf());
        c.service = Some(service.into());
        c.app_addr = Some(mesh_runtime::LocalAddr::Tcp(app));
        c.zone = "z1".into();
        c.version = "test".into();
        // Tests stop sidecars often: a short drain.
        c.drain_delay = Duration::from_millis(300);
        c.drain_timeout = Duration::from_secs(5);
        c
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
            // Tests that read the access log name a file.
            access_log: sidecar::gateway::access_log::Sink::Off,
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
