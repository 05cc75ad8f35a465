//! Mutual TLS handshakes between mesh identities over real TCP on loopback: every caller that
//! is not a mesh identity valid now is refused before a byte reaches the app, and a client
//! talks only to the service it meant to reach.
//!
//! `MESH_MTLS_ATTEMPTS` (default 100) sets the attempts per case; the evidence run uses 1000.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use control_plane::ca::Ca;
use sidecar::{identity::Identity, transport::tls};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;

fn attempts() -> usize {
    std::env::var("MESH_MTLS_ATTEMPTS").ok().and_then(|v| v.parse().ok()).unwrap_or(100)
}

/// An identity for `service` from `ca`, issued as if at `at`.
fn identity(ca: &Ca, service: &str, at: SystemTime) -> Identity {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap().serialize_request(&key).unwrap();
    let (pem, expires) = ca.certify(service, &csr.pem().unwrap(), at).unwrap();
    Identity {
        spiffe_id: control_plane::ca::spiffe_id(&ca.trust_domain, service),
        certificate_pem: pem,
        private_key_pem: key.serialize_pem(),
        trust_anchors_pem: ca.root_pem.clone(),
        expires,
        issued: at,
    }
}

/// A TLS "app" behind `server`: counts the bytes that reach it and the peers it saw.
struct App {
    addr: std::net::SocketAddr,
    bytes: Arc<AtomicU64>,
    peers: Arc<Mutex<Vec<Option<String>>>>,
    stop: CancellationToken,
}

impl App {
    async fn start(server: &Identity) -> App {
        let acceptor = TlsAcceptor::from(Arc::new(tls::server_config(server).unwrap()));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = App {
            addr: listener.local_addr().unwrap(),
            bytes: Arc::default(),
            peers: Arc::default(),
            stop: CancellationToken::new(),
        };
        let (bytes, peers, stop) = (app.bytes.clone(), app.peers.clone(), app.stop.clone());
        tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    _ = stop.cancelled() => return,
                    a = listener.accept() => a.unwrap(),
                };
                let (acceptor, bytes, peers) = (acceptor.clone(), bytes.clone(), peers.clone());
                tokio::spawn(async move {
                    let Ok(Ok(mut tls)) =
                        tokio::time::timeout(Duration::from_secs(5), acceptor.accept(tcp)).await
                    else {
                        return;
                    };
                    let peer = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(tls::peer_spiffe_id);
                    peers.lock().unwrap().push(peer);
                    let mut buf = [0u8; 64];
                    while let Ok(n) = tls.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        bytes.fetch_add(n as u64, Ordering::SeqCst);
                        let _ = tls.write_all(b"ok").await;
                    }
                });
            }
        });
        app
    }
}

/// One connection with `config`: sends "hello", expects "ok". True when that worked.
async fn call(app: &App, config: &Arc<rustls::ClientConfig>) -> bool {
    let tcp = TcpStream::connect(app.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("mesh.invalid").unwrap();
    let Ok(mut tls) = TlsConnector::from(config.clone()).connect(name, tcp).await else { return false };
    if tls.write_all(b"hello").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 2];
    matches!(tokio::time::timeout(Duration::from_secs(5), tls.read_exact(&mut buf)).await, Ok(Ok(_)))
        && &buf == b"ok"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_valid_mesh_identities_get_through_and_clients_check_who_answers() {
    let dir = tempfile::tempdir().unwrap();
    let other_dir = tempfile::tempdir().unwrap();
    let hour = Duration::from_secs(3600);
    let ca = Ca::open(dir.path(), None, "mesh.test", hour).unwrap();
    let other = Ca::open(other_dir.path(), None, "mesh.test", hour).unwrap();
    let now = SystemTime::now();
    let market = identity(&ca, "market", now);
    let app = App::start(&market).await;
    let expected = "spiffe://mesh.test/service/market";
    let n = attempts();

    // Positive control: a mesh identity valid now.
    let web = identity(&ca, "web", now);
    let good = Arc::new(tls::client_config(&web, expected).unwrap());
    for _ in 0..n {
        assert!(call(&app, &good).await, "a valid mesh client is served");
    }
    assert_eq!(app.bytes.swap(0, Ordering::SeqCst), 5 * n as u64);
    let seen = std::mem::take(&mut *app.peers.lock().unwrap());
    assert!(seen.iter().all(|p| p.as_deref() == Some("spiffe://mesh.test/service/web")), "{seen:?}");

    let cases: Vec<(&str, Arc<rustls::ClientConfig>)> = vec![
        ("no certificate", Arc::new(tls::anonymous_client_config(&ca.root_pem, expected).unwrap())),
        ("another CA's certificate", {
            let mut stranger = identity(&other, "web", now);
            // It trusts our root (so it would accept the server); only its own certificate is foreign.
            stranger.trust_anchors_pem = ca.root_pem.clone();
            Arc::new(tls::client_config(&stranger, expected).unwrap())
        }),
        (
            "an expired certificate",
            Arc::new(tls::client_config(&identity(&ca, "web", now - 2 * hour), expected).unwrap()),
        ),
        (
            "a certificate not valid yet",
            Arc::new(tls::client_config(&identity(&ca, "web", now + 2 * hour), expected).unwrap()),
        ),
    ];
    for (what, config) in &cases {
        let mut refused = 0;
        for _ in 0..n {
            if !call(&app, config).await {
                refused += 1;
            }
        }
        assert_eq!(refused, n, "{what}: every attempt refused");
        assert_eq!(app.bytes.load(Ordering::SeqCst), 0, "{what}: no byte reaches the app");
    }

    // Plaintext to the mTLS port: the handshake fails and nothing is served.
    for _ in 0..n {
        let mut tcp = TcpStream::connect(app.addr).await.unwrap();
        let _ = tcp.write_all(b"GET / HTTP/1.1\r\nHost: market\r\n\r\n").await;
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
        assert!(!String::from_utf8_lossy(&buf).contains("HTTP/1.1 2"), "plaintext got an answer");
    }
    assert_eq!(app.bytes.load(Ordering::SeqCst), 0, "plaintext: no byte reaches the app");

    // The wrong identity answering: a client that means to reach payments refuses market.
    let wants_payments = Arc::new(tls::client_config(&web, "spiffe://mesh.test/service/payments").unwrap());
    for _ in 0..n {
        assert!(!call(&app, &wants_payments).await, "a client must not talk to the wrong service");
    }
    assert_eq!(app.bytes.load(Ordering::SeqCst), 0);
    app.stop.cancel();
}

// ---- through the sidecars --------------------------------------------------------------------

mod mesh {
    use std::time::Duration;

    use mesh_testkit::{Backend, Load, TestCp, TestSidecar, WAIT, eventually, get, request};

    struct Mesh {
        cp: TestCp,
        app: Backend,
        market: TestSidecar,
        web: TestSidecar,
        _web_app: Backend,
        _dirs: Vec<tempfile::TempDir>,
    }

    async fn mesh(cert_ttl: Duration) -> Mesh {
        let cp = TestCp::start_with(|c| c.cert_ttl = cert_ttl).await;
        cp.set_policy("market", &mesh_testkit::fast_policy()).await;
        let (app, web_app) = (Backend::start("market").await, Backend::start("web").await);
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut cfg = TestSidecar::config(&cp.url(), "market", "m1", app.addr, d1.path());
        cfg.identity_token = Some(cp.token("market").await);
        let market = TestSidecar::start(cfg).await;
        let mut cfg = TestSidecar::config(&cp.url(), "web", "w1", web_app.addr, d2.path());
        cfg.identity_token = Some(cp.token("web").await);
        cfg.upstreams = vec!["market".into()];
        let web = TestSidecar::start(cfg).await;
        eventually(WAIT, "web reaches market over mTLS", || async {
            request(web.outbound, "GET", "market", "/ping", &[], bytes::Bytes::new()).await.0 == 200
        })
        .await;
        Mesh { cp, app, market, web, _web_app: web_app, _dirs: vec![d1, d2] }
    }

    /// Established TCP connections whose local port is `port` (from /proc/net/tcp).
    fn established_to(port: u16) -> usize {
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
        let local = format!(":{port:04X}");
        table
            .lines()
            .skip(1)
            .filter(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3 && f[1].ends_with(&local) && f[3] == "01"
            })
            .count()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn http1_requests_beyond_a_peers_few_connections_share_one_http2_connection() {
        let m = mesh(Duration::from_secs(3600)).await;
        let (inbound, outbound) = (m.market.inbound.unwrap(), m.web.outbound);
        let (n, before) = (sidecar::endpoint::pool::H1_PER_PEER + 4, m.app.hits());
        // n requests at once, each held a second by the app.
        let calls: Vec<_> = (0..n)
            .map(|i| {
                let path = format!("/slow/{i}?delay_ms=1000");
                tokio::spawn(async move {
                    request(outbound, "POST", "market", &path, &[], bytes::Bytes::from(vec![1u8; 1000])).await
                })
            })
            .collect();
        eventually(WAIT, "every request reached the app", || async { m.app.hits() >= before + n as u64 })
            .await;
        let open = established_to(inbound.port());
        assert!(
            open <= sidecar::endpoint::pool::H1_PER_PEER + 1,
            "{open} connections for {n} requests at once"
        );
        // The requests beyond the HTTP/1.1 connections are counted in the caller's metrics.
        let metrics = get(m.web.admin, "admin", "/metrics").await.1;
        let line = format!(
            "mesh_sidecar_multiplexed_requests_total{{service=\"market\"}} {}",
            n - sidecar::endpoint::pool::H1_PER_PEER
        );
        assert!(metrics.lines().any(|l| l == line), "no `{line}` in {metrics}");
        for call in calls {
            let (status, body) = call.await.unwrap();
            assert_eq!(status, 200, "{body}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["version"], "HTTP/1.1", "{body}");
            assert_eq!(v["headers"]["host"], "market", "{body}");
            assert!(v["headers"].get("x-mesh-orig-proto").is_none(), "{body}");
            assert_eq!(v["body_len"], 1000, "{body}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn callers_are_verified_identities_and_authorization_is_enforced() {
        let m = mesh(Duration::from_secs(3600)).await;
        // The app sees the verified caller; a forged header from the calling app never arrives.
        let (status, body) = request(
            m.web.outbound,
            "GET",
            "market",
            "/who",
            &[("x-mesh-caller", "spiffe://mesh.local/service/admin")],
            bytes::Bytes::new(),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["headers"]["x-mesh-caller"], "spiffe://mesh.local/service/web", "{body}");
        // The app gets HTTP/1.1 with the caller's Host.
        assert_eq!(v["version"], "HTTP/1.1", "{body}");
        assert_eq!(v["headers"]["host"], "market", "{body}");
        assert!(v["headers"].get("x-mesh-orig-proto").is_none(), "{body}");
        let (status, body) =
            request(m.web.outbound, "POST", "market", "/orders", &[], bytes::Bytes::from(vec![7u8; 100_000]))
                .await;
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!((v["method"].as_str(), v["body_len"].as_u64()), (Some("POST"), Some(100_000)), "{body}");

        // Plaintext to the mTLS inbound port: refused, nothing reaches the app.
        let before = m.app.hits();
        let (status, _) =
            request(m.market.inbound.unwrap(), "GET", "market", "/direct", &[], bytes::Bytes::new()).await;
        assert_eq!(status, 0, "plaintext must not get an HTTP answer");
        assert_eq!(m.app.hits(), before);

        // Authorization: only payments may call market now; web gets 403 with the reason.
        let mut p = mesh_testkit::fast_policy();
        p.authz.allowed_callers = vec!["payments".into()];
        m.cp.set_policy("market", &p).await;
        eventually(WAIT, "web is refused", || async {
            request(m.web.outbound, "GET", "market", "/x", &[], bytes::Bytes::new()).await.0 == 403
        })
        .await;
        let (status, body) = request(m.web.outbound, "GET", "market", "/x", &[], bytes::Bytes::new()).await;
        assert_eq!(status, 403);
        assert!(body.contains("may not call market") && body.contains("payments"), "{body}");
        let before = m.app.hits();
        request(m.web.outbound, "GET", "market", "/x", &[], bytes::Bytes::new()).await;
        assert_eq!(m.app.hits(), before, "a refused caller never reaches the app");
        // By full SPIFFE id too.
        p.authz.allowed_callers = vec!["spiffe://mesh.local/service/web".into()];
        m.cp.set_policy("market", &p).await;
        eventually(WAIT, "web is allowed again", || async {
            request(m.web.outbound, "GET", "market", "/x", &[], bytes::Bytes::new()).await.0 == 200
        })
        .await;
        let metrics = get(m.market.admin, "admin", "/metrics").await.1;
        assert!(metrics.contains("mesh_sidecar_authz_denied_total{service=\"market\"}"), "{metrics}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn certificates_rotate_under_load_without_a_failed_request() {
        // 3 s certificates: both sidecars renew every 2 s, several times during the load.
        let m = mesh(Duration::from_secs(3)).await;
        let load = Load::start(m.web.outbound, "market", "/load", 4);
        let rotations = |admin| async move {
            let text = get(admin, "admin", "/metrics").await.1;
            text.lines()
                .find(|l| l.starts_with("mesh_sidecar_certificate_rotations_total "))
                .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .unwrap_or(0)
        };
        eventually(Duration::from_secs(20), "three rotations on each side under load", || async {
            rotations(m.web.admin).await >= 3 && rotations(m.market.admin).await >= 3
        })
        .await;
        let ok = load.stop_expecting_no_failures().await;
        assert!(ok > 100, "the load ran: {ok} requests");
    }
}
