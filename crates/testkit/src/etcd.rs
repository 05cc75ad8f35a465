//! A real etcd cluster on loopback for tests: Debian's `etcd` binary, one process per member,
//! each with its own data directory; members can be stopped and started again. Every member is
//! killed on drop.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{client::get, eventually::eventually};

/// The etcd binary (`MESH_TEST_ETCD`, else `etcd` on the PATH). `None` skips a test, unless
/// `MESH_REQUIRE_ETCD=1` (set by `scripts/test-deps`), which makes a missing etcd a failure.
pub fn etcd_binary() -> Option<PathBuf> {
    let found = std::env::var_os("MESH_TEST_ETCD").map(PathBuf::from).or_else(|| {
        std::env::var_os("PATH")?
            .to_str()?
            .split(':')
            .map(|d| PathBuf::from(d).join("etcd"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var("MESH_REQUIRE_ETCD").is_err(),
            "MESH_REQUIRE_ETCD=1 but no etcd binary (scripts/test-deps installs etcd-server)"
        );
        eprintln!("skipped: no etcd binary (scripts/test-deps installs Debian's etcd-server)");
    }
    found
}

struct Member {
    name: String,
    client: SocketAddr,
    peer: SocketAddr,
    child: Option<Child>,
}

/// An etcd cluster of one or more members on 127.0.0.1.
pub struct EtcdCluster {
    bin: PathBuf,
    dir: tempfile::TempDir,
    members: Vec<Member>,
    tls: Option<EtcdTls>,
}

/// Serve clients over TLS with these files (PEM): the server's certificate and key, and the CA
/// client certificates must chain to (`--client-cert-auth`).
#[derive(Clone)]
pub struct EtcdTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

/// A loopback port nobody listens on now.
fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

impl EtcdCluster {
    /// Starts `n` members and waits until the cluster answers; `None` when there is no etcd.
    pub async fn start(n: usize) -> Option<EtcdCluster> {
        Self::start_with(n, None).await
    }

    /// [`EtcdCluster::start`], serving clients over TLS when `tls` is given.
    pub async fn start_with(n: usize, tls: Option<EtcdTls>) -> Option<EtcdCluster> {
        let bin = etcd_binary()?;
        let members = (0..n)
            .map(|i| Member { name: format!("m{i}"), client: free_port(), peer: free_port(), child: None })
            .collect();
        let mut cluster = EtcdCluster { bin, dir: tempfile::tempdir().unwrap(), members, tls };
        for i in 0..n {
            cluster.start_member(i);
        }
        cluster.wait_healthy().await;
        Some(cluster)
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        self.members.iter().map(|m| format!("{scheme}://{}", m.client)).collect()
    }

    /// The client URLs joined with commas, as `--etcd-endpoints` takes them.
    pub fn endpoints_flag(&self) -> String {
        self.endpoints().join(",")
    }

    /// Starts member `i` (again, on its data directory).
    pub fn start_member(&mut self, i: usize) {
        let initial: Vec<String> =
            self.members.iter().map(|m| format!("{}=http://{}", m.name, m.peer)).collect();
        let client_url = self.endpoints()[i].clone();
        let m = &self.members[i];
        let log = std::fs::File::create(self.dir.path().join(format!("{}.log", m.name))).unwrap();
        let mut cmd = Command::new(&self.bin);
        if let Some(t) = &self.tls {
            cmd.arg("--cert-file").arg(&t.cert).arg("--key-file").arg(&t.key);
            cmd.arg("--trusted-ca-file").arg(&t.client_ca).arg("--client-cert-auth");
        }
        let child = cmd
            .args(["--name", &m.name, "--data-dir"])
            .arg(self.dir.path().join(&m.name))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &format!("http://{}", m.peer)])
            .args(["--initial-advertise-peer-urls", &format!("http://{}", m.peer)])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-state", "new", "--initial-cluster-token", "mesh-test"])
            // Short elections: the tests stop members on purpose.
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start etcd: {e}"));
        self.members[i].child = Some(child);
    }

    /// Stops member `i` at once (SIGKILL).
    pub fn stop_member(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits until every running member says the cluster is healthy (over TLS: until each
    /// says in its log that it serves clients).
    pub async fn wait_healthy(&self) {
        if self.tls.is_some() {
            for (i, _) in self.members.iter().enumerate().filter(|(_, m)| m.child.is_some()) {
                eventually(Duration::from_secs(30), "etcd serves clients", || async move {
                    self.log(i).contains("ready to serve client requests")
                })
                .await;
            }
            return;
        }
        for m in self.members.iter().filter(|m| m.child.is_some()) {
            let addr = m.client;
            eventually(Duration::from_secs(30), "etcd answers /health", || async move {
                let (status, body) = get(addr, "etcd", "/health").await;
                status == 200 && body.contains("true")
            })
            .await;
        }
    }

    /// A member's log (for failure messages).
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{}.log", self.members[i].name)))
            .unwrap_or_default()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.stop_member(i);
        }
    }
}

/// Where a [`crate::TestCp`] keeps its state: the embedded store, or an etcd cluster of one
/// member started for the test (with the NATS bus `--store etcd` needs). The control-plane
/// contract tests run on both.
#[derive(Clone)]
pub enum TestStore {
    Embedded,
    Etcd(std::sync::Arc<EtcdStoreFixture>),
}

/// One etcd member, a seal key and the bus, shared by every control plane a test starts on it
/// (a restart reads the state back from etcd).
pub struct EtcdStoreFixture {
    etcd: EtcdCluster,
    nats: String,
    seal: tempfile::TempDir,
}

impl TestStore {
    /// A new etcd store; `None` (the test is skipped) when etcd or NATS is missing and not
    /// required (`MESH_REQUIRE_ETCD`, `MESH_REQUIRE_NATS`).
    pub async fn etcd() -> Option<TestStore> {
        let nats = test_nats_url()?;
        let etcd = EtcdCluster::start(1).await?;
        let seal = tempfile::tempdir().unwrap();
        std::fs::write(seal.path().join("seal.key"), mesh_runtime::random_token().unwrap()).unwrap();
        Some(TestStore::Etcd(std::sync::Arc::new(EtcdStoreFixture { etcd, nats, seal })))
    }

    /// Points `config` at this store.
    pub fn apply(&self, config: &mut control_plane::Config) {
        let TestStore::Etcd(f) = self else { return };
        let replica = format!("test-{}", &mesh_runtime::random_token().unwrap_or_default()[..8]);
        on_etcd(config, etcd_options(f.etcd.endpoints()), &f.nats, &f.seal.path().join("seal.key"), &replica);
    }
}

/// The NATS server `scripts/test-deps` starts (`MESH_TEST_NATS_URL`); `None` (the test is
/// skipped, saying so) when it is not set and `MESH_REQUIRE_NATS=1` is not either.
pub fn test_nats_url() -> Option<String> {
    match std::env::var("MESH_TEST_NATS_URL") {
        Ok(url) => Some(url),
        Err(_) => {
            assert!(
                std::env::var("MESH_REQUIRE_NATS").is_err(),
                "MESH_REQUIRE_NATS=1 but MESH_TEST_NATS_URL is not set (scripts/test-deps starts one)"
            );
            eprintln!("skipped: MESH_TEST_NATS_URL is not set (scripts/test-deps starts a NATS server)");
            None
        }
    }
}

/// How to reach the etcd at `endpoints`: plaintext, no user, a 5 s deadline.
pub fn etcd_options(endpoints: Vec<String>) -> control_plane::etcd::EtcdOptions {
    control_plane::etcd::EtcdOptions {
        endpoints,
        ca_pem: None,
        client_cert: None,
        user: None,
        timeout: Duration::from_secs(5),
    }
}

/// `config` as a replica named `replica` on etcd (`options`), with the NATS bus at `nats` and
/// the seal key in `seal`.
pub fn on_etcd(
    config: &mut control_plane::Config,
    options: control_plane::etcd::EtcdOptions,
    nats: &str,
    seal: &std::path::Path,
    replica: &str,
) {
    config.bus = control_plane::BusBackend::Nats(nats.to_string());
    config.store = control_plane::StoreBackend::Etcd(Box::new(control_plane::EtcdStore {
        options,
        prefix: "/mesh".into(),
        replica: replica.into(),
        seal_key_file: Some(seal.to_path_buf()),
    }));
}

/// Runs the async test `$body(store: TestStore)` once per store: `<name>::embedded` and
/// `<name>::etcd`.
#[macro_export]
macro_rules! on_both_stores {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                super::$name($crate::TestStore::Embedded).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn etcd() {
                let Some(store) = $crate::TestStore::etcd().await else { return };
                super::$name(store).await
            }
        }
    )+};
}
