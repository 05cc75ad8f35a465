//! `meshctl up -o json` for tests that need the whole local mesh: started on port 0 in a
//! temporary directory, its listeners read from the `up` event, stopped (Ctrl-C) on drop.

use std::io::{BufRead, BufReader};

use mesh_testkit::MeshctlUp;
use serde_json::Value;

pub struct LocalMesh {
    pub state: std::path::PathBuf,
    pub ready: Value,
    _up: MeshctlUp,
    _dir: tempfile::TempDir,
}

impl LocalMesh {
    /// Starts it with `env` for meshctl and its processes; returns once it printed `up`.
    pub fn start(env: &[(&str, &str)]) -> LocalMesh {
        Self::start_up(&[], env)
    }

    /// With `up` flags for `meshctl up` (`--store etcd --replicas 3`).
    pub fn start_up(up: &[&str], env: &[(&str, &str)]) -> LocalMesh {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join(".mesh");
        let (up, stdout) = MeshctlUp::start_with_env(&state, &["-o", "json"], up, env);
        let mut lines = BufReader::new(stdout).lines();
        let ready: Value = loop {
            let line = lines.next().expect("meshctl up printed its listeners").unwrap();
            let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
            if v["event"] == "up" {
                break v;
            }
        };
        // Keep reading so meshctl never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        LocalMesh { state, ready, _up: up, _dir: dir }
    }

    fn listeners(&self) -> impl Iterator<Item = &Value> {
        self.ready["listeners"].as_array().into_iter().flatten()
    }

    /// The PID of a process `meshctl up` started.
    pub fn pid(&self, process: &str) -> i32 {
        self.listeners()
            .find(|l| l["process"] == process)
            .and_then(|l| l["pid"].as_i64())
            .unwrap_or_else(|| panic!("no pid of {process} in {}", self.ready)) as i32
    }

    /// The address a process listens on (its first listener).
    pub fn address(&self, process: &str) -> String {
        self.listeners()
            .find(|l| l["process"] == process)
            .and_then(|l| l["address"].as_str())
            .unwrap_or_else(|| panic!("no {process} in {}", self.ready))
            .to_string()
    }

    /// The gateway's `http://host:port`.
    pub fn gateway(&self) -> String {
        self.address("gateway").trim_end_matches("/api/markets").to_string()
    }

    /// Every Prometheus endpoint of the mesh: the control plane's and each sidecar's and the
    /// gateway's admin `/metrics`.
    pub fn metrics_urls(&self) -> Vec<String> {
        self.listeners()
            .filter_map(|l| l["address"].as_str())
            .filter_map(|a| match a {
                a if a.ends_with("/metrics") => Some(a.to_string()),
                a if a.ends_with("/config") => Some(a.replace("/config", "/metrics")),
                _ => None,
            })
            .collect()
    }

    /// `meshctl` with the control plane's address, CA and admin token.
    pub fn meshctl(&self, args: &[&str]) -> std::process::Output {
        self.meshctl_at(&self.address("control-plane"), args)
    }

    /// `meshctl` against the control plane (replica) at `url`.
    pub fn meshctl_at(&self, url: &str, args: &[&str]) -> std::process::Output {
        std::process::Command::new(mesh_testkit::bin("meshctl"))
            .args(["--control-plane", url, "--ca-file"])
            .arg(self.state.join("control-plane/ca.pem"))
            .arg("--admin-token-file")
            .arg(self.state.join("control-plane/admin.token"))
            .args(args)
            .output()
            .unwrap()
    }
}
