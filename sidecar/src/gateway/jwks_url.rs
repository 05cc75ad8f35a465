//! Fetching a JWK Set from an identity provider's URL (`--jwks-url`): one GET over HTTP/1.1,
//! TLS for `https://` against the trust anchors of `--jwks-ca` (default: the system's bundle),
//! bounded in time and size.

use std::{path::Path, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Request, Uri, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;

/// Largest key set accepted.
const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// A fetch that takes longer fails (the keys in use stay).
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Where Debian (and most Linux systems) keep the public CAs.
const SYSTEM_CAS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Where the keys come from and how to reach it.
pub struct JwksUrl {
    uri: Uri,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl JwksUrl {
    /// Checks the URL and prepares TLS for an `https://` one (trusting `ca_file`, or the
    /// system's CAs).
    pub fn new(url: &str, ca_file: Option<&Path>) -> Result<JwksUrl, String> {
        let uri: Uri = url.parse().map_err(|e| format!("--jwks-url {url:?}: {e}"))?;
        let tls = match uri.scheme_str() {
            Some("http") => None,
            Some("https") => {
                let path = ca_file.unwrap_or(Path::new(SYSTEM_CAS));
                let pem = std::fs::read_to_string(path).map_err(|e| {
                    format!("the CAs for --jwks-url, {}: {e} (name them with --jwks-ca)", path.display())
                })?;
                let mut config = mesh_proto::dial::client_config(&pem, None)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                config.alpn_protocols = vec![b"http/1.1".to_vec()];
                Some(Arc::new(config))
            }
            _ => return Err(format!("--jwks-url {url:?}: an http:// or https:// URL")),
        };
        if uri.host().is_none() {
            return Err(format!("--jwks-url {url:?}: no host"));
        }
        Ok(JwksUrl { uri, tls })
    }

    /// The key set's text, or why it could not be fetched.
    pub async fn fetch(&self) -> Result<String, String> {
        tokio::time::timeout(FETCH_TIMEOUT, self.get())
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {FETCH_TIMEOUT:?}")))
            .map_err(|e| format!("fetching {}: {e}", self.uri))
    }

    async fn get(&self) -> Result<String, String> {
        let host = self.uri.host().unwrap_or_default();
        let port = self.uri.port_u16().unwrap_or(if self.tls.is_some() { 443 } else { 80 });
        let tcp = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
            .await
            .map_err(|e| e.to_string())?;
        let req = Request::get(self.uri.path_and_query().map_or("/", |p| p.as_str()))
            .header(header::HOST, self.uri.authority().map_or(host, |a| a.as_str()))
            .header(header::ACCEPT, "application/json, application/jwk-set+json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = match &self.tls {
            None => send(TokioIo::new(tcp), req).await?,
            Some(config) => {
                let name = rustls::pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_string())
                    .map_err(|e| e.to_string())?;
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                send(TokioIo::new(tls), req).await?
            }
        };
        if resp.status() != http::StatusCode::OK {
            return Err(format!("answered {}", resp.status()));
        }
        let body = Limited::new(resp.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading the key set: {e}"))?
            .to_bytes();
        String::from_utf8(body.to_vec()).map_err(|_| "the key set is not UTF-8".to_string())
    }
}

async fn send<S>(
    io: TokioIo<S>,
    req: Request<Empty<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.map_err(|e| e.to_string())?;
    mesh_runtime::spawn(tracing::debug_span!("jwks_fetch"), async move {
        let _ = conn.await;
    });
    sender.send_request(req).await.map_err(|e| e.to_string())
}
