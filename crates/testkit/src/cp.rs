//! The control plane in process on port 0 ([`TestCp`]), channels to it, and policies and instances for tests.

pub use mesh_proto::dial::AdminToken as Bearer;
use mesh_proto::{policy::ServicePolicy, v1};
use std::{net::SocketAddr, sync::Arc, time::Duration};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tonic::{
    service::interceptor::InterceptedService,
    transport::{Channel, Endpoint},
};

use crate::eventually::WAIT;

/// What [`TestCp::channel`] returns.
pub type AdminChannel = mesh_proto::dial::AdminChannel;

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

    /// On `store` (embedded, or etcd), with the defaults changed by `tune`.
    pub async fn start_on(store: &crate::TestStore, tune: impl FnOnce(&mut control_plane::Config)) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), |c| {
            store.apply(c);
            tune(c)
        })
        .await
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
