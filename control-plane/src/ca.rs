//! The mesh's certificate authority.
//!
//! On first start the control plane creates a root (ECDSA P-256, 10 years) in its data dir
//! (`ca.pem`, and `ca-key.pem` readable by the owner only), or loads one the operator gives
//! (`--ca-cert` / `--ca-key`). [`Ca::certify`] signs a sidecar's CSR as a short-lived leaf whose
//! only identity is the URI SAN `spiffe://<trust-domain>/service/<name>`: whatever names the CSR
//! asks for are ignored, so a CSR cannot widen what it is issued for. The caller has already
//! proven it may speak for `<name>` with a bootstrap token (see `crate::store`'s token table).

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("CA file {path}: {reason}")]
    File { path: String, reason: String },
    #[error("the certificate signing request is not valid: {0}")]
    Csr(String),
    #[error("signing failed: {0}")]
    Sign(String),
}

/// How long an issued leaf certificate is valid, and what the CA answers with.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The root, PEM: the trust anchor every sidecar is given.
    pub root_pem: String,
    pub trust_domain: String,
    pub leaf_ttl: Duration,
}

pub use mesh_proto::names::spiffe_id;

fn file_err(path: &Path) -> impl FnOnce(String) -> CaError + '_ {
    move |reason| CaError::File { path: path.display().to_string(), reason }
}

impl Ca {
    /// Loads `given` (certificate, key) or the root in `data_dir`, creating and persisting one
    /// when neither exists.
    pub fn open(
        data_dir: &Path,
        given: Option<(PathBuf, PathBuf)>,
        trust_domain: &str,
        leaf_ttl: Duration,
    ) -> Result<Ca, CaError> {
        let (cert_path, key_path) =
            given.clone().unwrap_or_else(|| (data_dir.join("ca.pem"), data_dir.join("ca-key.pem")));
        let (root_pem, key) = if cert_path.exists() || given.is_some() {
            let pem = std::fs::read_to_string(&cert_path).map_err(|e| file_err(&cert_path)(e.to_string()))?;
            let key_pem =
                std::fs::read_to_string(&key_path).map_err(|e| file_err(&key_path)(e.to_string()))?;
            let key = KeyPair::from_pem(&key_pem)
                .map_err(|e| file_err(&key_path)(format!("not a private key: {e}")))?;
            (pem, key)
        } else {
            let (pem, key_pem) = new_root(trust_domain)?;
            write_private(&key_path, &key_pem)?;
            write_file(&cert_path, &pem)?;
            tracing::info!(path = %cert_path.display(), %trust_domain, "created the mesh root certificate");
            (pem, KeyPair::from_pem(&key_pem).map_err(|e| CaError::Sign(e.to_string()))?)
        };
        let issuer = Issuer::from_ca_cert_pem(&root_pem, key)
            .map_err(|e| file_err(&cert_path)(format!("not a CA certificate: {e}")))?;
        Ok(Ca { issuer, root_pem, trust_domain: trust_domain.to_string(), leaf_ttl })
    }

    /// The CA of a root given as PEM (shared through etcd by the replicas).
    pub fn from_pems(
        root_pem: &str,
        key_pem: &str,
        trust_domain: &str,
        leaf_ttl: Duration,
    ) -> Result<Ca, CaError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| CaError::Sign(format!("the root's key: {e}")))?;
        let issuer = Issuer::from_ca_cert_pem(root_pem, key)
            .map_err(|e| CaError::Sign(format!("not a CA certificate: {e}")))?;
        Ok(Ca { issuer, root_pem: root_pem.to_string(), trust_domain: trust_domain.to_string(), leaf_ttl })
    }

    /// Signs `csr_pem` for `service` at `now`: the leaf certificate (PEM) and when it expires.
    pub fn certify(
        &self,
        service: &str,
        csr_pem: &str,
        now: SystemTime,
    ) -> Result<(String, SystemTime), CaError> {
        let mut csr =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| CaError::Csr(e.to_string()))?;
        let id = spiffe_id(&self.trust_domain, service);
        let p = &mut csr.params;
        p.subject_alt_names = vec![SanType::URI(
            id.clone().try_into().map_err(|e: rcgen::Error| CaError::Sign(e.to_string()))?,
        )];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, service);
        p.distinguished_name = dn;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        p.name_constraints = None;
        // A minute of slack for clocks a little behind ours.
        let expires = now + self.leaf_ttl;
        p.not_before = (now - Duration::from_secs(60)).into();
        p.not_after = expires.into();
        p.serial_number = Some(rand_serial().into());
        p.use_authority_key_identifier_extension = true;
        let cert = csr.signed_by(&self.issuer).map_err(|e| CaError::Sign(e.to_string()))?;
        Ok((cert.pem(), expires))
    }
}

impl Ca {
    /// A certificate for the control plane's own API: `names` (DNS names or IP addresses) and
    /// `spiffe://<trust-domain>/control-plane`, with a key made here; valid for the leaf TTL.
    /// Returns (certificate PEM, key, expiry).
    pub fn issue_server(
        &self,
        names: &[String],
        now: SystemTime,
    ) -> Result<(String, KeyPair, SystemTime), CaError> {
        let key = KeyPair::generate().map_err(|e| CaError::Sign(e.to_string()))?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "control-plane");
        p.distinguished_name = dn;
        let sign = |e: rcgen::Error| CaError::Sign(e.to_string());
        let mut sans = vec![SanType::URI(
            format!("spiffe://{}/control-plane", self.trust_domain).try_into().map_err(sign)?,
        )];
        for n in names {
            sans.push(match n.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(n.clone().try_into().map_err(sign)?),
            });
        }
        p.subject_alt_names = sans;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let expires = now + self.leaf_ttl;
        p.not_before = (now - Duration::from_secs(60)).into();
        p.not_after = expires.into();
        p.serial_number = Some(rand_serial().into());
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(&key, &self.issuer).map_err(sign)?;
        Ok((cert.pem(), key, expires))
    }
}

fn rand_serial() -> Vec<u8> {
    let mut b = uuid::Uuid::now_v7().into_bytes().to_vec();
    b[0] &= 0x7f; // positive
    b
}

pub(crate) fn write_file(path: &Path, text: &str) -> Result<(), CaError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| file_err(path)(e.to_string()))?;
    }
    std::fs::write(path, text).map_err(|e| file_err(path)(e.to_string()))?;
    std::fs::File::open(path).and_then(|f| f.sync_all()).map_err(|e| file_err(path)(e.to_string()))
}

/// Writes a key or token owner-only, never over an existing file.
pub(crate) fn write_private(path: &Path, text: &str) -> Result<(), CaError> {
    mesh_runtime::write_secret(path, text, mesh_runtime::Existing::Keep)
        .map_err(|e| file_err(path)(e.to_string()))
}

/// A new mesh root for `trust_domain`: (certificate PEM, private key PEM).
pub fn new_root(trust_domain: &str) -> Result<(String, String), CaError> {
    let key = KeyPair::generate().map_err(|e| CaError::Sign(e.to_string()))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("Opinion Market Mesh root ({trust_domain})"));
    dn.push(DnType::OrganizationName, "Opinion Market Mesh");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(3600)).into();
    params.not_after = (now + Duration::from_secs(10 * 365 * 86_400)).into();
    let cert = params.self_signed(&key).map_err(|e| CaError::Sign(e.to_string()))?;
    Ok((cert.pem(), key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr(names: &[&str]) -> (KeyPair, String) {
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        let pem = params.serialize_request(&key).unwrap().pem().unwrap();
        (key, pem)
    }

    #[test]
    fn issues_the_service_identity_only_and_keeps_its_root_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::open(dir.path(), None, "mesh.test", Duration::from_secs(3600)).unwrap();
        let (_key, pem) = csr(&["evil.example", "admin"]);
        let now = SystemTime::now();
        let (leaf, expires) = ca.certify("market", &pem, now).unwrap();
        assert_eq!(expires, now + Duration::from_secs(3600));
        let der = rustls_pem_der(&leaf);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let sans: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(sans, ["URI(spiffe://mesh.test/service/market)"], "the CSR's own names are ignored");
        assert!(!cert.is_ca());
        let root = ca.root_pem.clone();
        drop(ca);
        let again = Ca::open(dir.path(), None, "mesh.test", Duration::from_secs(3600)).unwrap();
        assert_eq!(again.root_pem, root, "the root is loaded, not re-created");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join("ca-key.pem")).unwrap().permissions(),
        );
        assert_eq!(mode & 0o077, 0, "the CA key is readable by its owner only");
        assert!(matches!(again.certify("market", "not a csr", now), Err(CaError::Csr(_))));
    }

    #[test]
    fn an_operators_root_is_used_as_given_and_a_missing_one_is_an_error() {
        let theirs = tempfile::tempdir().unwrap();
        let made = Ca::open(theirs.path(), None, "corp.example", Duration::from_secs(60)).unwrap();
        let given = Some((theirs.path().join("ca.pem"), theirs.path().join("ca-key.pem")));
        let ours = tempfile::tempdir().unwrap();
        let ca = Ca::open(ours.path(), given, "corp.example", Duration::from_secs(60)).unwrap();
        assert_eq!(ca.root_pem, made.root_pem, "the given root, not a new one");
        assert!(!ours.path().join("ca.pem").exists(), "nothing created beside the given files");
        let (_key, pem) = csr(&[]);
        assert!(ca.certify("market", &pem, SystemTime::now()).is_ok());
        let missing = Some((ours.path().join("no.pem"), ours.path().join("no-key.pem")));
        let err = Ca::open(ours.path(), missing, "corp.example", Duration::from_secs(60)).err().unwrap();
        assert!(err.to_string().contains("no.pem"), "{err}");
    }

    fn rustls_pem_der(pem: &str) -> Vec<u8> {
        use rustls_pki_types::{CertificateDer, pem::PemObject};
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap().to_vec()
    }
}
