//! Reaching the control plane, and the TLS pieces its clients and servers share.
//!
//! The URL's scheme decides: `http://` is plaintext (a control plane run with `--insecure-api`),
//! `https://` is TLS that trusts only the mesh root. A [`Dialer`] carries how to build the TLS
//! client configuration; it is asked again for every connection, so a sidecar whose certificate
//! was rotated presents the new one when its channel reconnects.
//!
//! Also here, because the control plane and the sidecar both need them: the ring crypto
//! [`provider`], [`roots`] from PEM, and [`peer_spiffe_id`].

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use hyper_util::rt::TokioIo;
use rustls::{
    RootCertStore,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint, Uri};

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("control-plane URL {0:?} is not valid: {1}")]
    Url(String, String),
    #[error(
        "control-plane URL {0} is https but no CA was given to check it (sidecar: \
         --control-plane-ca; meshctl: --ca-file)"
    )]
    NoTrust(String),
    #[error("cannot reach the control plane at {0}: {1}")]
    Connect(String, String),
    #[error("bad {what} PEM: {reason}")]
    Pem { what: &'static str, reason: String },
    #[error("TLS configuration: {0}")]
    Tls(String),
}

/// Builds the client's TLS configuration for one connection.
pub type ClientTls = Arc<dyn Fn() -> Result<Arc<rustls::ClientConfig>, DialError> + Send + Sync>;

/// How to reach the control plane: plaintext, or TLS with a configuration made per connection.
#[derive(Clone, Default)]
pub struct Dialer {
    tls: Option<ClientTls>,
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialer").field("tls", &self.tls.is_some()).finish()
    }
}

impl Dialer {
    /// `http://` URLs only.
    pub fn plaintext() -> Self {
        Self { tls: None }
    }

    /// TLS from `make`, called for every new connection.
    pub fn tls(make: ClientTls) -> Self {
        Self { tls: Some(make) }
    }

    /// TLS trusting the mesh root in `ca_pem`, without a client certificate (meshctl, and a
    /// sidecar before its first certificate).
    pub fn trusting(ca_pem: &str) -> Result<Self, DialError> {
        let config = Arc::new(client_config(ca_pem, None)?);
        Ok(Self::tls(Arc::new(move || Ok(config.clone()))))
    }

    /// `url` as an endpoint, checked.
    pub fn endpoint(url: &str) -> Result<Endpoint, DialError> {
        Endpoint::from_shared(url.to_string()).map_err(|e| DialError::Url(url.into(), e.to_string()))
    }

    /// Connects to `endpoint` now.
    pub async fn connect(&self, endpoint: Endpoint) -> Result<Channel, DialError> {
        self.connect_at(endpoint, None).await
    }

    /// Connects to `endpoint` now; over TLS, to `addr` when given (one of the addresses the
    /// URL's name resolved to) while still checking the server by that name.
    pub async fn connect_at(
        &self,
        endpoint: Endpoint,
        addr: Option<std::net::SocketAddr>,
    ) -> Result<Channel, DialError> {
        let url = endpoint.uri().to_string();
        let connector = self.connector(&endpoint)?.map(|c| TlsConnector { addr, ..c });
        let connected = match connector {
            Some(c) => endpoint.connect_with_connector(c).await,
            None => endpoint.connect().await,
        };
        connected.map_err(|e| DialError::Connect(url, root_cause(&e)))
    }

    /// A channel that connects on first use (and reconnects by itself).
    pub fn connect_lazy(&self, endpoint: Endpoint) -> Result<Channel, DialError> {
        Ok(match self.connector(&endpoint)? {
            Some(c) => endpoint.connect_with_connector_lazy(c),
            None => endpoint.connect_lazy(),
        })
    }

    fn connector(&self, endpoint: &Endpoint) -> Result<Option<TlsConnector>, DialError> {
        let uri = endpoint.uri();
        match uri.scheme_str() {
            Some("https") => match &self.tls {
                Some(make) => Ok(Some(TlsConnector { make: make.clone(), addr: None })),
                None => Err(DialError::NoTrust(uri.to_string())),
            },
            _ => Ok(None),
        }
    }
}

/// The innermost cause of an error: what actually went wrong ("connection refused", "invalid
/// peer certificate: UnknownIssuer") rather than "transport error".
pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// TCP, then TLS with the configuration [`Dialer`] makes now, named by the URL's host.
#[derive(Clone)]
struct TlsConnector {
    make: ClientTls,
    /// Connect here instead of resolving the host.
    addr: Option<std::net::SocketAddr>,
}

type Connecting = Pin<
    Box<
        dyn Future<
                Output = Result<
                    TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
                    Box<dyn std::error::Error + Send + Sync>,
                >,
            > + Send,
    >,
>;

impl tower_service::Service<Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Connecting;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let (make, addr) = (self.make.clone(), self.addr);
        Box::pin(async move {
            let host = uri.host().ok_or("the control-plane URL has no host")?;
            let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
            let port = uri.port_u16().unwrap_or(443);
            let name = ServerName::try_from(host.clone())?;
            let config = make()?;
            let tcp = match addr {
                Some(a) => TcpStream::connect(a).await?,
                None => TcpStream::connect((host.as_str(), port)).await?,
            };
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}

/// ring, the one crypto provider of the mesh.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn pem_err(what: &'static str) -> impl FnOnce(rustls::pki_types::pem::Error) -> DialError {
    move |e| DialError::Pem { what, reason: e.to_string() }
}

/// Trust anchors from PEM (at least one).
pub fn roots(pem: &str) -> Result<RootCertStore, DialError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        roots.add(cert.map_err(pem_err("trust anchor"))?).map_err(|e| DialError::Tls(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(DialError::Tls("no trust anchors".into()));
    }
    Ok(roots)
}

/// A certificate chain from PEM.
pub fn cert_chain(pem: &str) -> Result<Vec<CertificateDer<'static>>, DialError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err("certificate"))
}

/// A private key from PEM.
pub fn private_key(pem: &str) -> Result<PrivateKeyDer<'static>, DialError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(pem_err("private key"))
}

/// A gRPC client configuration for the control plane: the server must chain to `ca_pem` and be
/// named by the URL's host; `client` (certificate chain PEM, key PEM) is presented when given.
pub fn client_config(ca_pem: &str, client: Option<(&str, &str)>) -> Result<rustls::ClientConfig, DialError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| DialError::Tls(e.to_string()))?
        .with_root_certificates(roots(ca_pem)?);
    let mut config = match client {
        Some((chain, key)) => builder
            .with_client_auth_cert(cert_chain(chain)?, private_key(key)?)
            .map_err(|e| DialError::Tls(e.to_string()))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The URI SAN naming a SPIFFE id in a (verified) certificate.
pub fn peer_spiffe_id(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => Some(u.to_string()),
        _ => None,
    })
}

/// Sends the admin token (when there is one) with every call.
#[derive(Clone)]
pub struct AdminToken(pub Option<tonic::metadata::AsciiMetadataValue>);

impl tonic::service::Interceptor for AdminToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

impl AdminToken {
    /// `authorization: Bearer <token>` on every call.
    pub fn bearer(token: &str) -> Result<Self, DialError> {
        format!("Bearer {}", token.trim()).parse().map(|v| AdminToken(Some(v))).map_err(|_| DialError::Pem {
            what: "admin token",
            reason: "not a token (printable ASCII)".into(),
        })
    }
}

/// A channel to the control plane at `url` as its operator: for `https://`, TLS trusting
/// `ca_pem` (the mesh root) and the admin token on every call; for `http://` (a control plane
/// run with --insecure-api), plaintext and no token, which only goes where TLS protects it.
pub async fn admin_channel(
    url: &str,
    ca_pem: Option<&str>,
    token: Option<&str>,
) -> Result<AdminChannel, DialError> {
    let endpoint = Dialer::endpoint(url)?
        .connect_timeout(std::time::Duration::from_secs(3))
        .timeout(std::time::Duration::from_secs(30));
    let (dialer, token) = if url.starts_with("https://") {
        let ca = ca_pem.ok_or_else(|| DialError::NoTrust(url.to_string()))?;
        (Dialer::trusting(ca)?, token.map(AdminToken::bearer).transpose()?.unwrap_or(AdminToken(None)))
    } else {
        (Dialer::plaintext(), AdminToken(None))
    };
    let ch = dialer.connect(endpoint).await?;
    Ok(tonic::service::interceptor::InterceptedService::new(ch, token))
}

/// A channel to the control plane that carries the admin token.
pub type AdminChannel =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, AdminToken>;
