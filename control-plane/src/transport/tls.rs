//! TLS for the control plane's gRPC API.
//!
//! The server certificate comes from the mesh CA itself (names: `--api-name`s, `localhost`,
//! `127.0.0.1`, and `spiffe://<trust-domain>/control-plane`) and is reissued, with a new key,
//! once two thirds of its lifetime have passed: no file to manage, and clients trust it through
//! the mesh root they already have. Client certificates are optional — a sidecar calls
//! `Identity.Certify` before it has one — but one that is presented must chain to the mesh root
//! and be valid now; [`crate::auth`] then reads the service it names.
//!
//! Handshakes run in their own tasks with a deadline, so a client that never finishes one holds
//! no one else up, and a failed one is counted and dropped without touching the server.

use crate::{
    ca::{Ca, CaError},
    transport::peer::ApiConn,
};

use rustls::{
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
};
use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

/// How long a client may take to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The API's certificate, reissued at two thirds of its lifetime.
struct ApiCert {
    ca: Arc<Ca>,
    names: Vec<String>,
    current: Mutex<(Arc<CertifiedKey>, SystemTime)>,
}

impl std::fmt::Debug for ApiCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiCert").field("names", &self.names).finish()
    }
}

fn issue(ca: &Ca, names: &[String]) -> Result<(Arc<CertifiedKey>, SystemTime), CaError> {
    let now = SystemTime::now();
    let (pem, key, expires) = ca.issue_server(names, now)?;
    let bad = |e: &dyn std::fmt::Display| CaError::Sign(e.to_string());
    let chain = mesh_proto::dial::cert_chain(&pem).map_err(|e| bad(&e))?;
    let key = mesh_proto::dial::private_key(&key.serialize_pem()).map_err(|e| bad(&e))?;
    let signer = mesh_proto::dial::provider().key_provider.load_private_key(key).map_err(|e| bad(&e))?;
    let renew = now + expires.duration_since(now).unwrap_or_default() * 2 / 3;
    Ok((Arc::new(CertifiedKey::new(chain, signer)), renew))
}

impl ResolvesServerCert for ApiCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if SystemTime::now() >= current.1 {
            match issue(&self.ca, &self.names) {
                Ok(fresh) => {
                    tracing::info!(names = ?self.names, "reissued the API's server certificate");
                    *current = fresh;
                }
                // The old certificate is still valid for a third of its life: keep serving it.
                Err(e) => tracing::error!(error = %e, "reissuing the API's server certificate failed"),
            }
        }
        Some(current.0.clone())
    }
}

/// The API's TLS configuration: TLS 1.3/1.2, ALPN h2, client certificates optional and checked
/// against the mesh root.
pub fn server_config(ca: Arc<Ca>, names: &[String]) -> Result<Arc<rustls::ServerConfig>, CaError> {
    let bad = |e: &dyn std::fmt::Display| CaError::Sign(e.to_string());
    let mut names: Vec<String> = names.to_vec();
    for n in ["localhost", "127.0.0.1"] {
        if !names.iter().any(|x| x == n) {
            names.push(n.to_string());
        }
    }
    let provider = mesh_proto::dial::provider();
    let roots = mesh_proto::dial::roots(&ca.root_pem).map_err(|e| bad(&e))?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| bad(&e))?;
    let first = issue(&ca, &names)?;
    let resolver = Arc::new(ApiCert { ca, names, current: Mutex::new(first) });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(&e))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// TLS connections accepted on `listener` until `stop`.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    failures: prometheus_client::metrics::counter::Counter,
    max_handshakes: usize,
    stop: CancellationToken,
) -> ReceiverStream<std::io::Result<ApiConn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(128);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let slots = Arc::new(tokio::sync::Semaphore::new(max_handshakes));
    mesh_runtime::spawn(tracing::info_span!("grpc_tls_accept"), async move {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = stop.cancelled() => return,
                _ = tx.closed() => return,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: wait a little rather than spin.
                        tracing::warn!(error = %e, "accepting a gRPC connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                failures.inc();
                tracing::warn!(%peer, max_handshakes, "too many TLS handshakes in progress: connection closed");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx, failures) = (acceptor.clone(), tx.clone(), failures.clone());
            mesh_runtime::spawn(tracing::debug_span!("tls_handshake", %peer), async move {
                let _slot = slot;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(ApiConn(tls))).await;
                    }
                    Ok(Err(e)) => {
                        failures.inc();
                        tracing::debug!(%peer, error = %e, "TLS handshake on the gRPC listener failed");
                    }
                    Err(_) => {
                        failures.inc();
                        tracing::debug!(%peer, "TLS handshake on the gRPC listener timed out");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
