//! The current identity and the TLS configurations made from it, swapped atomically on
//! rotation; and how the sidecar dials the control plane with it.

use crate::{
    identity::cert::Identity,
    transport::tls::{self, TlsError},
};

use arc_swap::ArcSwapOption;
use mesh_proto::dial::Dialer;
use std::sync::Arc;

type ClientConfigs = std::collections::HashMap<(String, &'static [u8]), Arc<rustls::ClientConfig>>;

/// An identity with the TLS configurations built from it (once per certificate).
pub struct Certified {
    pub id: Identity,
    pub server: Arc<rustls::ServerConfig>,
    /// Client configurations per (expected peer, ALPN protocol).
    clients: std::sync::Mutex<ClientConfigs>,
}

impl Certified {
    pub fn new(id: Identity) -> Result<Certified, TlsError> {
        let server = Arc::new(tls::server_config(&id)?);
        Ok(Certified { id, server, clients: Default::default() })
    }

    /// The client configuration for calling `service`, offering `alpn` only.
    pub fn client_for(
        &self,
        service: &str,
        alpn: &'static [u8],
    ) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let expected = mesh_proto::names::spiffe_id(self.id.trust_domain(), service);
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(&(expected.clone(), alpn)) {
            return Ok(c.clone());
        }
        let mut config = tls::client_config(&self.id, &expected)?;
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
