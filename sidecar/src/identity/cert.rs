//! A certified identity: the SPIFFE id, certificate chain, private key and trust anchors.

use std::time::SystemTime;

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
