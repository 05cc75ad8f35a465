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
use sidecar::{identity::Identity, tls};
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
