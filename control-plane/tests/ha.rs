//! Issue #21: several control-plane replicas (the real binary) on a real etcd, with sidecars
//! spread over them. Each test starts its own etcd (Debian's `etcd`, `MESH_TEST_ETCD`) and uses
//! the NATS server `scripts/test-deps` starts (`MESH_TEST_NATS_URL`): `--store etcd` needs a
//! shared bus.

use std::{net::SocketAddr, time::Duration};

use mesh_proto::{
    policy::ServicePolicy,
    v1::{self, policy_client::PolicyClient, registry_client::RegistryClient},
};
use mesh_testkit::{
    Backend, CpProcess, EtcdCluster, Load, TestSidecar, WAIT, channel, eventually, http_get, metric,
};

/// What every HA test starts: etcd, a seal key, and replicas on them.
struct Ha {
    etcd: EtcdCluster,
    dir: tempfile::TempDir,
    nats: String,
    replicas: Vec<Option<CpProcess>>,
}

impl Ha {
    /// An etcd cluster of `members` and `replicas` control planes on it; `None` (skipped) when
    /// etcd or NATS is missing and not required.
    async fn start(members: usize, replicas: usize) -> Option<Ha> {
        let nats = mesh_testkit::test_nats_url()?;
        let etcd = EtcdCluster::start(members).await?;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("seal.key"), mesh_runtime::random_token().unwrap()).unwrap();
        let mut ha = Ha { etcd, dir, nats, replicas: Vec::new() };
        for _ in 0..replicas {
            ha.add_replica();
        }
        Some(ha)
    }

    /// The flags that put a replica named `name` on this etcd, bus and seal key.
    fn shared_flags(&self, name: &str) -> Vec<String> {
        [
            "--store",
            "etcd",
            "--etcd-endpoints",
            &self.etcd.endpoints_flag(),
            "--bus",
            "nats",
            "--nats-url",
            &self.nats,
            "--ca-seal-key-file",
            &self.dir.path().join("seal.key").display().to_string(),
            "--replica",
            name,
            "--etcd-timeout",
            "5s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    fn add_replica(&mut self) -> usize {
        let i = self.replicas.len();
        let data = self.dir.path().join(format!("r{i}"));
        let args = self.shared_flags(&format!("r{i}"));
        self.replicas.push(Some(CpProcess::start_with(&data, &args)));
        i
    }

    fn replica(&self, i: usize) -> &CpProcess {
        self.replicas[i].as_ref().expect("replica running")
    }

    fn url(&self, i: usize) -> String {
        self.replica(i).url()
    }

    fn kill(&mut self, i: usize) {
        if let Some(r) = self.replicas[i].take() {
            r.kill9();
        }
    }

    async fn is_sweeper(&self, i: usize) -> bool {
        let (_, text) = http_get(self.replica(i).admin, "/metrics").await;
        metric(&text, "mesh_control_plane_sweeper") == 1.0
    }

    /// The replica elected to expire instances (waits for one).
    async fn sweeper(&self) -> usize {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            for i in (0..self.replicas.len()).filter(|i| self.replicas[*i].is_some()) {
                if self.is_sweeper(i).await {
                    return i;
                }
            }
            assert!(tokio::time::Instant::now() < deadline, "no replica was elected sweeper");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A sidecar for `service` in front of `app` that tries the control planes at `urls` in turn.
async fn sidecar(
    urls: &[String],
    service: &str,
    id: &str,
    app: SocketAddr,
    dir: &std::path::Path,
) -> TestSidecar {
    let mut c = TestSidecar::config(&urls[0], service, id, app, &dir.join(id));
    c.control_plane = urls.to_vec();
    TestSidecar::start(c).await
}

/// A caller's sidecar with `alpha` as its upstream.
async fn caller(urls: &[String], dir: &std::path::Path) -> (TestSidecar, Backend) {
    let app = Backend::start("caller-app").await;
    let mut c = TestSidecar::config(&urls[0], "caller", "caller-1", app.addr, &dir.join("caller-1"));
    c.control_plane = urls.to_vec();
    c.upstreams = vec!["alpha".into()];
    c.edge_report_interval = Duration::from_millis(200);
    (TestSidecar::start(c).await, app)
}

async fn set_policy(
    url: &str,
    service: &str,
    policy: &ServicePolicy,
    expected: Option<u64>,
) -> Result<u64, tonic::Status> {
    let ch = tonic::transport::Endpoint::from_shared(url.to_string()).unwrap().connect().await.unwrap();
    PolicyClient::new(ch)
        .set(v1::SetPolicyRequest {
            service: service.into(),
            policy: Some(policy.into()),
            expected_version: expected,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().policy.unwrap().version)
}

async fn instances(addr: SocketAddr, service: &str) -> Vec<(String, v1::HealthStatus)> {
    let r = RegistryClient::new(channel(addr).await)
        .get_service(v1::GetServiceRequest { name: service.into() })
        .await;
    let mut out: Vec<_> = match r {
        Ok(r) => r.into_inner().instances.into_iter().map(|i| (i.id.clone(), i.health())).collect(),
        Err(_) => vec![],
    };
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The version of `service`'s policy a sidecar runs on (its own or an upstream's).
async fn policy_version(s: &TestSidecar, service: &str) -> u64 {
    let c = s.config_json().await;
    if c["service"] == service {
        return c["own_policy"]["version"].as_u64().unwrap_or(0);
    }
    c["upstreams"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|u| u["service"] == service)
        .and_then(|u| u["policy_version"].as_u64())
        .unwrap_or(0)
}

async fn proxy_status(addr: SocketAddr) -> Vec<v1::ProxyStatus> {
    v1::admin_client::AdminClient::new(channel(addr).await)
        .proxy_status(v1::ProxyStatusRequest::default())
        .await
        .unwrap()
        .into_inner()
        .proxies
}

fn alpha_policy() -> ServicePolicy {
    let mut p = mesh_testkit::fast_policy();
    // Long enough for a sidecar to reach another replica when its own dies (the sweeper adds
    // two heartbeat flushes on top).
    p.health.heartbeat_interval = Duration::from_millis(200);
    p.health.heartbeat_ttl = Duration::from_secs(3);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_policies_instances_and_tokens() {
    let Some(ha) = Ha::start(1, 3).await else { return };
    let dir = tempfile::tempdir().unwrap();
    // The same root and admin token on every replica, made once and sealed in etcd.
    let root = |i: usize| std::fs::read_to_string(ha.dir.path().join(format!("r{i}/ca.pem"))).unwrap();
    assert_eq!(root(0), root(1));
    assert_eq!(root(1), root(2));

    let v1 = set_policy(&ha.url(0), "alpha", &alpha_policy(), None).await.unwrap();
    let app = Backend::start("alpha-1").await;
    // alpha-1 registers through replica 1; the caller follows alpha through replica 2.
    let alpha = sidecar(&[ha.url(1)], "alpha", "alpha-1", app.addr, dir.path()).await;
    let (caller, _caller_app) = caller(&[ha.url(2)], dir.path()).await;

    eventually(WAIT, "replica 2 discovers what registered through replica 1", || async {
        instances(ha.replica(2).grpc, "alpha").await
            == vec![("alpha-1".to_string(), v1::HealthStatus::Healthy)]
    })
    .await;
    eventually(WAIT, "the caller on replica 2 reaches alpha-1", || async {
        let (status, body) = mesh_testkit::get(caller.outbound, "alpha", "/").await;
        status == 200 && body.contains("alpha-1")
    })
    .await;

    // What the caller reports to replica 2 is in every replica's topology, count for count.
    let edge_requests = |i: usize| {
        let addr = ha.replica(i).grpc;
        async move {
            let topo = v1::admin_client::AdminClient::new(channel(addr).await)
                .topology(v1::TopologyRequest {})
                .await
                .unwrap()
                .into_inner();
            topo.edges
                .iter()
                .filter(|e| e.caller == "caller" && e.callee == "alpha")
                .filter_map(|e| e.last_ten_minutes.as_ref().map(|w| w.requests))
                .sum::<u64>()
        }
    };
    eventually(WAIT, "every replica's topology has the caller → alpha edge with the same count", || async {
        let counts = [edge_requests(0).await, edge_requests(1).await, edge_requests(2).await];
        counts[0] > 0 && counts.iter().all(|c| *c == counts[2])
    })
    .await;

    // A policy set through replica 0 reaches the sidecars on replicas 1 and 2, which ACK it.
    let mut p = alpha_policy();
    p.retry.max_attempts = 2;
    let v2 = set_policy(&ha.url(0), "alpha", &p, Some(v1)).await.unwrap();
    assert_eq!(v2, v1 + 1, "etcd decides the version, whichever replica is asked");
    eventually(WAIT, "both sidecars run on the new version", || async {
        policy_version(&alpha, "alpha").await == v2 && policy_version(&caller, "alpha").await == v2
    })
    .await;
    for (replica, node) in [(1, "alpha-1"), (2, "caller-1")] {
        let addr = ha.replica(replica).grpc;
        eventually(WAIT, "the sidecar's replica records its ACK", || async move {
            proxy_status(addr).await.iter().any(|p| {
                p.node_id == node && p.policies.iter().any(|s| s.service == "alpha" && s.acked_version == v2)
            })
        })
        .await;
    }
    // Compare-and-set is decided by etcd, whichever replica is asked.
    let stale = set_policy(&ha.url(2), "alpha", &p, Some(v1)).await.unwrap_err();
    assert_eq!(stale.code(), tonic::Code::FailedPrecondition, "{stale:?}");
    assert!(stale.message().contains(&format!("at version {v2}")), "{}", stale.message());

    // Every replica shows every sidecar, whichever replica it is connected to.
    for i in 0..3 {
        let addr = ha.replica(i).grpc;
        eventually(WAIT, "proxy status lists both sidecars on every replica", || async move {
            let nodes: Vec<String> = proxy_status(addr).await.into_iter().map(|p| p.node_id).collect();
            nodes.contains(&"alpha-1".to_string()) && nodes.contains(&"caller-1".to_string())
        })
        .await;
    }

    // Deregistration through one replica leaves every replica's discovery.
    alpha.stop().await;
    for i in 0..3 {
        let addr = ha.replica(i).grpc;
        eventually(WAIT, "alpha-1 leaves every replica", || async move {
            instances(addr, "alpha").await.is_empty()
        })
        .await;
    }
    caller.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_replica_under_load_fails_no_request_and_expires_no_instance() {
    let Some(mut ha) = Ha::start(1, 1).await else { return };
    // Replica 0 starts first and is elected; then two more join.
    assert_eq!(ha.sweeper().await, 0);
    ha.add_replica();
    ha.add_replica();
    let dir = tempfile::tempdir().unwrap();
    set_policy(&ha.url(0), "alpha", &alpha_policy(), None).await.unwrap();
    let urls = |first: usize| -> Vec<String> { (0..3).map(|k| ha.url((first + k) % 3)).collect() };
    // Half the sidecars use replica 0: alpha-1 and the caller; alpha-2 uses replica 1.
    let (a1, a2) = (Backend::start("alpha-1").await, Backend::start("alpha-2").await);
    let s1 = sidecar(&urls(0), "alpha", "alpha-1", a1.addr, dir.path()).await;
    let s2 = sidecar(&urls(1), "alpha", "alpha-2", a2.addr, dir.path()).await;
    let (caller, _app) = caller(&urls(0), dir.path()).await;
    eventually(WAIT, "both instances are discovered by the caller", || async {
        let (_, a) = mesh_testkit::get(caller.outbound, "alpha", "/").await;
        let (_, b) = mesh_testkit::get(caller.outbound, "alpha", "/").await;
        a != b && [a, b].iter().all(|x| x.contains("alpha-"))
    })
    .await;
    let current = |s: &TestSidecar| {
        let admin = s.admin;
        async move {
            let (_, body) = http_get(admin, "/config").await;
            let c: serde_json::Value = serde_json::from_str(&body).unwrap();
            (
                c["control_plane"]["current"].as_str().unwrap_or_default().to_string(),
                c["control_plane"]["connected"] == true,
            )
        }
    };
    assert_eq!(current(&s1).await.0, ha.url(0));
    assert_eq!(current(&caller).await.0, ha.url(0));

    let load = Load::start(caller.outbound, "alpha", "/", 4);
    load.wait_more(200, "requests before the kill").await;
    let dead = ha.url(0);
    ha.kill(0);
    load.wait_more(500, "requests after the kill").await;

    // They reconnect to the others.
    for s in [&s1, &caller] {
        eventually(WAIT, "the sidecar is served by another replica", || async {
            let (url, connected) = current(s).await;
            connected && url != dead
        })
        .await;
    }
    // The sweeper moved to a live replica; no instance expired meanwhile or after a TTL.
    let sweeper = ha.sweeper().await;
    assert_ne!(sweeper, 0);
    let ttl = alpha_policy().health.heartbeat_ttl;
    let until = tokio::time::Instant::now() + ttl * 2;
    while tokio::time::Instant::now() < until {
        for i in [1, 2] {
            let seen = instances(ha.replica(i).grpc, "alpha").await;
            assert_eq!(
                seen,
                vec![
                    ("alpha-1".to_string(), v1::HealthStatus::Healthy),
                    ("alpha-2".to_string(), v1::HealthStatus::Healthy)
                ],
                "replica {i}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, text) = http_get(ha.replica(sweeper).admin, "/metrics").await;
    assert_eq!(metric(&text, "mesh_control_plane_expirations_total"), 0.0);
    let sent = load.stop_expecting_no_failures().await;
    assert!(sent > 500);
    caller.stop().await;
    s1.stop().await;
    s2.stop().await;
}

/// Nothing acknowledged is lost: every replica reads the last acked policy version back, and
/// alpha-1 stays registered and healthy.
async fn nothing_lost(replicas: &[SocketAddr], acked: u64) {
    for (i, addr) in replicas.iter().copied().enumerate() {
        eventually(WAIT, "every replica holds the last acknowledged policy", || async move {
            let got = PolicyClient::new(channel(addr).await)
                .get(v1::GetPolicyRequest { service: "alpha".into() })
                .await
                .map(|r| r.into_inner().version);
            got.ok() == Some(acked)
        })
        .await;
        assert_eq!(
            instances(addr, "alpha").await,
            vec![("alpha-1".to_string(), v1::HealthStatus::Healthy)],
            "replica {i}"
        );
    }
}

/// Every policy version `sidecars` ran on, sampled until `stop`: (node, version) in order.
fn sample_versions(
    admins: Vec<(String, SocketAddr)>,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<Vec<(String, u64)>> {
    tokio::spawn(async move {
        let mut seen = Vec::new();
        while !stop.is_cancelled() {
            for (node, admin) in &admins {
                let (status, body) = http_get(*admin, "/config").await;
                if status != 200 {
                    continue;
                }
                let c: serde_json::Value = serde_json::from_str(&body).unwrap();
                let own = c["own_policy"]["version"].as_u64();
                let upstream = c["upstreams"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|u| u["service"] == "alpha")
                    .and_then(|u| u["policy_version"].as_u64());
                if let Some(v) = if c["service"] == "alpha" { own } else { upstream } {
                    seen.push((node.clone(), v));
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        seen
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_etcd_member_down_writes_go_on_and_with_two_they_are_refused_and_nothing_is_lost() {
    let Some(mut ha) = Ha::start(3, 2).await else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut acked = set_policy(&ha.url(0), "alpha", &alpha_policy(), None).await.unwrap();
    // alpha-1 heartbeats through the replica that is not the sweeper; the caller follows the
    // sweeper's discovery.
    let sweeper = ha.sweeper().await;
    let other = 1 - sweeper;
    let app = Backend::start("alpha-1").await;
    let alpha = sidecar(&[ha.url(other), ha.url(sweeper)], "alpha", "alpha-1", app.addr, dir.path()).await;
    let (caller, _caller_app) = caller(&[ha.url(sweeper), ha.url(other)], dir.path()).await;
    eventually(WAIT, "the caller reaches alpha-1", || async {
        mesh_testkit::get(caller.outbound, "alpha", "/").await.1.contains("alpha-1")
    })
    .await;
    let stop = tokio_util::sync::CancellationToken::new();
    let sampler = sample_versions(
        vec![("alpha-1".into(), alpha.admin), ("caller-1".into(), caller.admin)],
        stop.clone(),
    );

    // Nothing acknowledged is ever lost: both replicas read the last acked version back from
    // etcd's state, and alpha-1 stays registered and healthy.
    let replicas: Vec<SocketAddr> = (0..2).map(|i| ha.replica(i).grpc).collect();
    let mut p = alpha_policy();

    // One member of three stopped: a majority is left, writes go on through either replica.
    ha.etcd.stop_member(2);
    // If it led, a write waits out the election (etcd's own timeout): wait for a new leader.
    ha.etcd.wait_healthy().await;
    for (n, i) in [(2, 1), (3, 0)] {
        p.retry.max_attempts = n;
        acked = set_policy(&ha.url(i), "alpha", &p, Some(acked)).await.expect("writes with 2 of 3 members");
    }
    nothing_lost(&replicas, acked).await;

    // Two stopped: no quorum. Writes are refused with a status saying why; the sidecars keep
    // serving on what they have.
    ha.etcd.stop_member(1);
    let load = Load::start(caller.outbound, "alpha", "/", 2);
    p.retry.max_attempts = 4;
    let refused = set_policy(&ha.url(0), "alpha", &p, None).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("etcd") && refused.message().contains("majority"),
        "{}",
        refused.message()
    );
    load.wait_more(300, "requests while etcd has no quorum").await;
    // Longer than alpha's TTL and the sweeper's margin: no instance expires while the
    // replicas cannot hear each other (the sweeper hears none of alpha-1's heartbeats).
    let ttl = alpha_policy().health.heartbeat_ttl + Duration::from_secs(2);
    let until = tokio::time::Instant::now() + ttl;
    while tokio::time::Instant::now() < until {
        let (status, body) = mesh_testkit::get(caller.outbound, "alpha", "/").await;
        assert_eq!((status, body.contains("alpha-1")), (200, true), "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(load.stop_expecting_no_failures().await > 300);

    // Back to three: writes resume; whatever the refused write did, nothing acked is lost.
    ha.etcd.start_member(1);
    ha.etcd.start_member(2);
    ha.etcd.wait_healthy().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let resumed = loop {
        let current = PolicyClient::new(channel(ha.replica(1).grpc).await)
            .get(v1::GetPolicyRequest { service: "alpha".into() })
            .await
            .map(|r| r.into_inner().version)
            .unwrap_or(0);
        if let Ok(v) = set_policy(&ha.url(1), "alpha", &p, Some(current)).await {
            break v;
        }
        assert!(tokio::time::Instant::now() < deadline, "writes did not resume once a majority was back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let acked_after = resumed;
    assert!(acked_after > acked);
    nothing_lost(&replicas, acked_after).await;
    eventually(WAIT, "the sidecars run on it", || async {
        policy_version(&alpha, "alpha").await == acked_after
            && policy_version(&caller, "alpha").await == acked_after
    })
    .await;

    stop.cancel();
    let seen = sampler.await.unwrap();
    for node in ["alpha-1", "caller-1"] {
        let versions: Vec<u64> = seen.iter().filter(|(n, _)| n == node).map(|(_, v)| *v).collect();
        assert!(versions.len() > 10, "{node} was sampled");
        assert!(versions.windows(2).all(|w| w[0] <= w[1]), "{node}'s policy version went back: {versions:?}");
    }
    caller.stop().await;
    alpha.stop().await;
}

#[tokio::test]
async fn the_etcd_store_refuses_to_start_without_a_shared_bus() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = control_plane::Config::new(dir.path());
    let options = mesh_testkit::etcd_options(vec!["http://127.0.0.1:9".into()]);
    mesh_testkit::on_etcd(&mut config, options, "nats://127.0.0.1:9", &dir.path().join("seal.key"), "r");
    config.bus = control_plane::BusBackend::Embedded;
    let e = control_plane::ControlPlane::open(config).await.err().expect("refused").to_string();
    assert!(e.contains("--bus nats"), "{e}");
}

/// A control plane in process on the etcd at `endpoints`, with `options` changed by `tune`.
async fn open_on_etcd(
    endpoints: Vec<String>,
    seal: &std::path::Path,
    tune: impl FnOnce(&mut control_plane::etcd::EtcdOptions),
) -> Result<mesh_testkit::TestCp, String> {
    let Some(nats) = mesh_testkit::test_nats_url() else { return Err("no NATS".into()) };
    let mut options = mesh_testkit::etcd_options(endpoints);
    tune(&mut options);
    let config = |dir: &std::path::Path, replica: &str| {
        let mut config = control_plane::Config::new(dir);
        config.insecure_api = true;
        mesh_testkit::on_etcd(&mut config, options.clone(), &nats, seal, replica);
        config
    };
    // Opened here first (on a data dir of its own), so a refusal comes back as an error.
    let probe_dir = tempfile::tempdir().unwrap();
    let probe = control_plane::ControlPlane::open(config(probe_dir.path(), "probe"))
        .await
        .map_err(|e| e.to_string())?;
    probe.state().shutdown.cancel(); // ends what it started following
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), "r");
    Ok(mesh_testkit::TestCp::start_in(dir, |c| *c = config).await)
}

/// A policy set and read back through `cp` (the store answers).
async fn round_trip(cp: &mesh_testkit::TestCp) {
    let v = set_policy(&cp.url(), "alpha", &alpha_policy(), None).await.unwrap();
    let got = PolicyClient::new(cp.channel().await)
        .get(v1::GetPolicyRequest { service: "alpha".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.version, v);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_tls_with_a_client_certificate() {
    use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
    let pki = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let p = pki.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(vec![]).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let leaf = |eku: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        p.extended_key_usages = vec![eku];
        (p.signed_by(&key, &issuer).unwrap().pem(), key.serialize_pem())
    };
    let (server, server_key) = leaf(ExtendedKeyUsagePurpose::ServerAuth);
    let (client, client_key) = leaf(ExtendedKeyUsagePurpose::ClientAuth);
    let tls = mesh_testkit::EtcdTls {
        cert: file("server.pem", &server),
        key: file("server-key.pem", &server_key),
        client_ca: file("ca.pem", &ca_pem),
    };
    let Some(etcd) = EtcdCluster::start_with(1, Some(tls)).await else { return };
    let seal = file("seal.key", &mesh_runtime::random_token().unwrap());
    assert!(etcd.endpoints()[0].starts_with("https://"));

    // Without a client certificate etcd refuses the connection: a clear error at start.
    let e = open_on_etcd(etcd.endpoints(), &seal, |o| o.ca_pem = Some(ca_pem.clone())).await.err().unwrap();
    assert!(e.contains("etcd"), "{e}");
    let cp = open_on_etcd(etcd.endpoints(), &seal, |o| {
        o.ca_pem = Some(ca_pem.clone());
        o.client_cert = Some((client.clone(), client_key.clone()));
    })
    .await
    .unwrap();
    round_trip(&cp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_with_authentication() {
    let Some(etcd) = EtcdCluster::start(1).await else { return };
    let addr: SocketAddr = etcd.endpoints()[0].trim_start_matches("http://").parse().unwrap();
    // etcd's own JSON gateway, as its operator would use it (with a token once auth is on).
    let gateway = async |path: &str, token: Option<&str>, body: &str| {
        let headers: Vec<(&str, &str)> = token.map(|t| ("authorization", t)).into_iter().collect();
        mesh_testkit::request(addr, "POST", "etcd", path, &headers, body.to_string().into()).await
    };
    // A root user, then authentication on.
    for (path, body) in [
        ("/v3/auth/user/add", r#"{"name":"root","password":"s3cret-pass"}"#),
        ("/v3/auth/user/grant", r#"{"user":"root","role":"root"}"#),
        ("/v3/auth/enable", "{}"),
    ] {
        let (status, answer) = gateway(path, None, body).await;
        assert_eq!(status, 200, "{path}: {answer}");
    }
    let dir = tempfile::tempdir().unwrap();
    let seal = dir.path().join("seal.key");
    std::fs::write(&seal, mesh_runtime::random_token().unwrap()).unwrap();

    let e = open_on_etcd(etcd.endpoints(), &seal, |_| {}).await.err().unwrap();
    assert!(e.contains("etcd"), "without credentials: {e}");
    let e = open_on_etcd(etcd.endpoints(), &seal, |o| o.user = Some(("root".into(), "wrong".into())))
        .await
        .err()
        .unwrap();
    assert!(e.contains("authentication failed"), "with a wrong password: {e}");
    let cp = open_on_etcd(etcd.endpoints(), &seal, |o| o.user = Some(("root".into(), "s3cret-pass".into())))
        .await
        .unwrap();
    round_trip(&cp).await;
    // A password change ends every token etcd gave the user, the replica's too (what an operator
    // rotating the password, or etcd expiring an idle token, does to a running replica): its next
    // call is refused, and it signs in again instead of failing.
    let root = r#"{"name":"root","password":"s3cret-pass"}"#;
    let (status, answer) = gateway("/v3/auth/authenticate", None, root).await;
    assert_eq!(status, 200, "{answer}");
    let token =
        serde_json::from_str::<serde_json::Value>(&answer).unwrap()["token"].as_str().unwrap().to_string();
    let (status, answer) = gateway("/v3/auth/user/changepw", Some(&token), root).await;
    assert_eq!(status, 200, "{answer}");
    let (_, answer) = gateway("/v3/kv/range", Some(&token), r#"{"key":"YQ=="}"#).await;
    assert!(answer.contains("invalid auth token"), "the old tokens are void: {answer}");
    round_trip(&cp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_find_the_replicas_behind_one_name_and_fail_over_between_them() {
    let Some(ha) = Ha::start(1, 0).await else { return };
    // Two replicas on one port of two loopback addresses, both behind cp.mesh.test.
    let replica = |grpc: String, name: &str| {
        let mut args: Vec<String> =
            ["--grpc-addr", &grpc, "--admin-addr", "127.0.0.1:0", "--insecure-api", "--log", "warn"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        args.extend(ha.shared_flags(name));
        args.extend(["--data-dir".to_string(), ha.dir.path().join(name).display().to_string()]);
        mesh_testkit::Process::start("control-plane", &args)
    };
    let a = replica("127.0.0.1:0".into(), "a");
    let port = a.addr("grpc").port();
    let b = replica(format!("127.0.0.2:{port}"), "b");
    let dns = mesh_testkit::DnsServer::start(&[(
        "cp.mesh.test",
        vec!["127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap()],
    )])
    .await;

    let dir = tempfile::tempdir().unwrap();
    let app = Backend::start("alpha-1").await;
    let url = format!("http://cp.mesh.test:{port}");
    let mut c = TestSidecar::config(&url, "alpha", "alpha-1", app.addr, &dir.path().join("alpha-1"));
    c.dns_server = Some(dns.addr);
    let alpha = TestSidecar::start(c).await;
    let on = || async {
        let c = alpha.config_json().await;
        (
            c["control_plane"]["address"].as_str().unwrap_or_default().to_string(),
            c["control_plane"]["registered"] == true,
        )
    };
    eventually(WAIT, "the sidecar registers through one of the name's addresses", || async {
        let (addr, registered) = on().await;
        registered && addr.ends_with(&format!(":{port}"))
    })
    .await;
    let first = on().await.0;
    let (dead, survivor) = if first.starts_with("127.0.0.1:") { (a, b) } else { (b, a) };
    let survivor_grpc = survivor.addr("grpc");
    dead.kill9();
    eventually(WAIT, "it moves to the other address and stays registered", || async {
        let (addr, _) = on().await;
        addr == survivor_grpc.to_string()
            && instances(survivor_grpc, "alpha").await
                == vec![("alpha-1".to_string(), v1::HealthStatus::Healthy)]
    })
    .await;
    alpha.stop().await;
}
