//! TLS on the gateway's public listener: a certificate chain and key from PEM files (any CA's),
//! read again when either file changes (checked every `--tls-reload`, 10 s), so a renewed
//! certificate is served without a restart; a bad pair keeps the one in use and says why.
//! HTTP/1.1 and HTTP/2 by ALPN.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use arc_swap::ArcSwap;
use mesh_proto::dial::{cert_chain, private_key, provider};

use crate::transport::tls::{ALPN, TlsError};

/// The public listener's certificate files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub struct PublicTls {
    files: PublicTlsFiles,
    config: ArcSwap<rustls::ServerConfig>,
    /// Both files' modification times when last read.
    read_at: Mutex<(Option<SystemTime>, Option<SystemTime>)>,
}

fn modified(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

fn load(files: &PublicTlsFiles) -> Result<rustls::ServerConfig, TlsError> {
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|e| TlsError::Tls(format!("cannot read {}: {e}", p.display())))
    };
    let chain = cert_chain(&read(&files.cert)?)
        .map_err(|e| TlsError::Tls(format!("{}: {e}", files.cert.display())))?;
    if chain.is_empty() {
        return Err(TlsError::Tls(format!("{}: no certificate in it", files.cert.display())));
    }
    let key = private_key(&read(&files.key)?)
        .map_err(|e| TlsError::Tls(format!("{}: {e}", files.key.display())))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| {
            TlsError::Tls(format!(
                "{} and {} do not make a pair: {e}",
                files.cert.display(),
                files.key.display()
            ))
        })?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

impl PublicTls {
    /// Reads the pair; unreadable or mismatched files are an error (the gateway does not start).
    pub fn load(files: PublicTlsFiles) -> Result<PublicTls, TlsError> {
        let stamps = (modified(&files.cert), modified(&files.key));
        let config = load(&files)?;
        Ok(PublicTls { files, config: ArcSwap::from_pointee(config), read_at: Mutex::new(stamps) })
    }

    /// The configuration new connections get.
    pub fn config(&self) -> Arc<rustls::ServerConfig> {
        self.config.load_full()
    }

    /// Reads the pair again if either file changed; a bad pair keeps the one in use.
    pub fn reload(&self) {
        let stamps = (modified(&self.files.cert), modified(&self.files.key));
        if *self.read_at.lock().unwrap_or_else(|p| p.into_inner()) == stamps {
            return;
        }
        match load(&self.files) {
            Ok(config) => {
                self.config.store(Arc::new(config));
                *self.read_at.lock().unwrap_or_else(|p| p.into_inner()) = stamps;
                tracing::info!(cert = %self.files.cert.display(), "public TLS certificate reloaded");
            }
            Err(e) => tracing::warn!(error = %e, "public TLS certificate not reloaded; the one in use stays"),
        }
    }
}
