//! The sidecar's mesh identity: a key pair made here (the private key never leaves this
//! process), a certificate for `spiffe://<trust-domain>/service/<service>` from the control
//! plane's CA (`Identity.Certify`, proven with the service's bootstrap token), renewed at two
//! thirds of its lifetime. Rotation swaps the identity atomically: connections already open keep
//! the certificate they were made with; new ones get the new one.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwapOption;
use mesh_proto::{dial::Dialer, v1};
use tokio_util::sync::CancellationToken;

use crate::{Shared, control::Backoff};

/// A certified identity.
#[derive(Debug)]
pub struct Identity {
    pub spiffe_id: String,
    pub certificate_pem: String,
    /// PKCS#8 PEM; in memory only.
    pub private_key_pem: String,
    pub trust_anchors_pem: String,
    pub expires: SystemTime,
    pub issued: SystemTime,
}

impl Identity {
    /// The trust domain of this identity (`spiffe://<domain>/service/<name>`).
    pub fn trust_domain(&self) -> &str {
        self.spiffe_id.trim_start_matches("spiffe://").split('/').next().unwrap_or_default()
    }
}

type ClientConfigs = std::collections::HashMap<(String, &'static [u8]), Arc<rustls::ClientConfig>>;

/// An identity with the TLS configurations built from it (once per certificate).
pub struct Certified {
    pub id: Identity,
    pub server: Arc<rustls::ServerConfig>,
    /// Client configurations per (expected peer, ALPN protocol).
    clients: std::sync::Mutex<ClientConfigs>,
}

impl Certified {
    pub fn new(id: Identity) -> Result<Certified, crate::tls::TlsError> {
        let server = Arc::new(crate::tls::server_config(&id)?);
        Ok(Certified { id, server, clients: Default::default() })
    }

    /// The client configuration for calling `service`, offering `alpn` only.
    pub fn client_for(
        &self,
        service: &str,
        alpn: &'static [u8],
    ) -> Result<Arc<rustls::ClientConfig>, crate::tls::TlsError> {
        let expected = mesh_proto::names::spiffe_id(self.id.trust_domain(), service);
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(&(expected.clone(), alpn)) {
            return Ok(c.clone());
        }
        let mut config = crate::tls::client_config(&self.id, &expected)?;
        config.alpn_protocols = vec![alpn.to_vec()];
        let config = Arc::new(config);
        clients.insert((expected, alpn), config.clone());
        Ok(config)
    }
}

/// The current identity (none until the first certificate arrives).
pub struct IdentityCell(ArcSwapOption<Certified>, tokio::sync::watch::Sender<bool>);

impl Default for IdentityCell {
    fn default() -> Self {
        IdentityCell(ArcSwapOption::empty(), tokio::sync::watch::channel(false).0)
    }
}

impl IdentityCell {
    pub fn current(&self) -> Option<Arc<Certified>> {
        self.0.load_full()
    }

    /// Replaces the identity (new connections use it; open ones keep theirs).
    pub fn store(&self, c: Certified) {
        self.0.store(Some(Arc::new(c)));
        self.1.send_replace(true);
    }

    /// Waits until the first certificate is here.
    pub async fn wait(&self) {
        let _ = self.1.subscribe().wait_for(|has| *has).await;
    }
}

/// One CSR → certificate exchange with the control plane at `url`.
pub async fn obtain(
    dialer: &Dialer,
    url: &str,
    service: &str,
    node_id: &str,
    token: &str,
) -> Result<Identity, String> {
    let key = rcgen::KeyPair::generate().map_err(|e| format!("cannot generate a key pair: {e}"))?;
    let params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| format!("cannot build a CSR: {e}"))?;
    let ep = Dialer::endpoint(url).map_err(|e| e.to_string())?.connect_timeout(Duration::from_secs(3));
    let ch = dialer.connect(ep).await.map_err(|e| e.to_string())?;
    let issued = SystemTime::now();
    let r = v1::identity_client::IdentityClient::new(ch)
        .certify(v1::CertifyRequest {
            service: service.into(),
            csr_pem: csr,
            token: token.into(),
            node_id: node_id.into(),
        })
        .await
        .map_err(|s| format!("the CA refused: {}", s.message()))?
        .into_inner();
    Ok(Identity {
        spiffe_id: r.spiffe_id,
        certificate_pem: r.certificate_chain_pem,
        private_key_pem: key.serialize_pem(),
        trust_anchors_pem: r.trust_anchors_pem,
        expires: SystemTime::UNIX_EPOCH + Duration::from_millis(r.expires_at_unix_ms),
        issued,
    })
}

/// How this sidecar reaches the control plane: with `ca_pem`, TLS that presents the current
/// certificate (none before the first one, which is how `Certify` is reached); without, plaintext.
/// The configuration is made per connection, so a reconnect after a rotation uses the new
/// certificate.
pub fn control_plane_dialer(ca_pem: Option<String>, cell: Arc<IdentityCell>) -> Dialer {
    let Some(ca) = ca_pem else { return Dialer::plaintext() };
    Dialer::tls(Arc::new(move || {
        let current = cell.current();
        let client = current.as_ref().map(|c| (c.id.certificate_pem.as_str(), c.id.private_key_pem.as_str()));
        mesh_proto::dial::client_config(&ca, client).map(Arc::new)
    }))
}

/// When to renew: two thirds into the certificate's lifetime.
pub fn renew_at(id: &Identity) -> SystemTime {
    let life = id.expires.duration_since(id.issued).unwrap_or_default();
    id.issued + life * 2 / 3
}

/// Keeps `shared.identity` certified until `stop`: obtains a certificate, renews it at two
/// thirds of its lifetime, retries failures with backoff (the old certificate serves meanwhile).
pub async fn run(shared: Arc<Shared>, token: String, stop: CancellationToken) {
    let service = shared.identity_service();
    let urls = shared.config.control_plane.clone();
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    for attempt in 0usize.. {
        let url = &urls[attempt % urls.len()];
        let certified =
            obtain(&shared.dialer, url, &service, &shared.config.instance_id, &token).await.and_then(|id| {
                Certified::new(id).map_err(|e| format!("the issued certificate is unusable: {e}"))
            });
        let wait = match certified {
            Ok(c) => {
                let id = &c.id;
                backoff.reset();
                let next = renew_at(id);
                let m = &shared.metrics;
                m.certificate_expiry.set(mesh_proto::unix_ms(id.expires) as i64 / 1000);
                if shared.identity.current().is_some() {
                    m.certificate_rotations.inc();
                }
                tracing::info!(id = %id.spiffe_id, expires = %humantime::format_rfc3339_seconds(id.expires), "certificate issued");
                shared.identity.store(c);
                next.duration_since(SystemTime::now()).unwrap_or_default()
            }
            Err(e) => {
                shared.metrics.certificate_failures.inc();
                let wait = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?wait, "getting a certificate failed");
                wait
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
