//! Mutual TLS between sidecars, from a certified `Identity`:
//! rustls with the ring provider, TLS 1.3 and 1.2, ALPN `h2` and `http/1.1`.
//!
//! - [`server_config`]: the inbound side. It presents this sidecar's certificate and requires a
//!   client certificate that chains to the mesh root and is valid now; anything else (no
//!   certificate, another CA's, expired or not yet valid, plaintext) fails the handshake, so
//!   nothing reaches the app.
//! - [`client_config`]: the outbound side. It presents this sidecar's certificate and accepts
//!   the server only if its certificate chains to the mesh root and names exactly the expected
//!   service (`spiffe://<trust-domain>/service/<name>` as its URI SAN) — the endpoint's address
//!   says nothing about who answers.
//! - [`peer_spiffe_id`]: the verified identity of the other side, read from its certificate.
//! - [`Gated`]: a TLS stream whose reads skip rustls while nothing can be read.

use crate::{identity::cert::Identity, transport::net::Coalesced};

pub use mesh_proto::dial::{DialError as TlsError, peer_spiffe_id};
use mesh_proto::dial::{cert_chain, private_key, provider, roots};
use rustls::{
    DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    server::{ParsedCertificate, WebPkiClientVerifier},
};
use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

fn chain(id: &Identity) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    cert_chain(&id.certificate_pem)
}

fn key(id: &Identity) -> Result<PrivateKeyDer<'static>, TlsError> {
    private_key(&id.private_key_pem)
}

/// The inbound listener's configuration: mutual TLS with mesh identities only.
pub fn server_config(id: &Identity) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots(&id.trust_anchors_pem)?),
        provider.clone(),
    )
    .build()
    .map_err(|e| TlsError::Tls(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain(id)?, key(id)?)
        .map_err(|e| TlsError::Tls(e.to_string()))?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A client builder that trusts only the mesh root and only a server named `expected`.
fn client_builder(
    trust_anchors_pem: &str,
    expected: &str,
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>, TlsError> {
    let provider = provider();
    let verifier = Arc::new(SpiffeVerifier {
        roots: roots(trust_anchors_pem)?,
        expected: expected.to_string(),
        provider: provider.clone(),
    });
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier))
}

fn with_alpn(mut config: rustls::ClientConfig) -> rustls::ClientConfig {
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    config
}

/// The outbound configuration for calls to `expected` (a SPIFFE id).
pub fn client_config(id: &Identity, expected: &str) -> Result<rustls::ClientConfig, TlsError> {
    let config = client_builder(&id.trust_anchors_pem, expected)?
        .with_client_auth_cert(chain(id)?, key(id)?)
        .map_err(|e| TlsError::Tls(e.to_string()))?;
    Ok(with_alpn(config))
}

/// A client that verifies a mesh server but presents no certificate of its own (what a
/// caller outside the mesh looks like; the inbound side refuses it).
pub fn anonymous_client_config(
    trust_anchors_pem: &str,
    expected: &str,
) -> Result<rustls::ClientConfig, TlsError> {
    Ok(with_alpn(client_builder(trust_anchors_pem, expected)?.with_no_client_auth()))
}

/// Accepts a server certificate that chains to the mesh root and names `expected`; the TLS
/// server name (an address) is not what identifies a mesh peer.
#[derive(Debug)]
struct SpiffeVerifier {
    roots: RootCertStore,
    expected: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        match peer_spiffe_id(end_entity) {
            Some(id) if id == self.expected => Ok(ServerCertVerified::assertion()),
            other => Err(rustls::Error::General(format!(
                "the peer is {}, not {}",
                other.as_deref().unwrap_or("no mesh identity"),
                self.expected
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS stream over TCP that answers a read with `Pending` at once when rustls holds no
/// decrypted bytes and the socket is not readable. hyper polls its connections' reads several
/// times per request (the answer, the body's end, the keep-alive check); through tokio-rustls
/// each of those tried a socket read under rustls (a buffer prepared, an error made and
/// dropped) where a readiness check suffices: read attempts under rustls per request 6.5 → 2,
/// −1.4k instructions per request pair (`MTLS=1 bench/callgrind.sh`). Complete records are always decrypted as soon as they
/// are read, so no plaintext and no readable socket means nothing to do until the socket is.
pub struct Gated<S>(pub S);

/// What [`Gated`] needs of a TLS stream: its socket and its received plaintext.
pub trait TlsParts {
    fn parts(&mut self) -> (&tokio::net::TcpStream, rustls::Reader<'_>);
}

impl TlsParts for tokio_rustls::client::TlsStream<Coalesced<tokio::net::TcpStream>> {
    fn parts(&mut self) -> (&tokio::net::TcpStream, rustls::Reader<'_>) {
        let (tcp, conn) = self.get_mut();
        (tcp.get_ref(), conn.reader())
    }
}

impl TlsParts for tokio_rustls::server::TlsStream<Coalesced<tokio::net::TcpStream>> {
    fn parts(&mut self) -> (&tokio::net::TcpStream, rustls::Reader<'_>) {
        let (tcp, conn) = self.get_mut();
        (tcp.get_ref(), conn.reader())
    }
}

impl<S: TlsParts + tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Gated<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let (tcp, reader) = this.0.parts();
        // Nothing decrypted and the connection still open (rustls says `WouldBlock`): only
        // the socket can change that.
        let nothing = matches!(reader.into_first_chunk(), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        if nothing && tcp.poll_read_ready(cx).is_pending() {
            return Poll::Pending;
        }
        Pin::new(&mut this.0).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Gated<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}
