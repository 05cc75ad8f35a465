//! Reaching the control plane: its URL, the mesh root to trust, the admin token.

use crate::error::CliError;

use mesh_proto::dial::{AdminChannel, DialError, admin_channel};
use std::path::{Path, PathBuf};

/// Where the control plane is and how to prove who we are to it.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: String,
    /// The mesh root, for an `https://` URL.
    pub ca_file: PathBuf,
    /// The admin token, sent when the file exists.
    pub admin_token_file: PathBuf,
}

fn read_file(path: &Path, flag: &str) -> Result<Option<String>, CliError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CliError::Input(format!("cannot read {flag} {}: {e}", path.display()))),
    }
}

pub async fn connect(t: &Target) -> Result<AdminChannel, CliError> {
    let addr = &t.url;
    let tls = addr.starts_with("https://");
    let ca = if tls { read_file(&t.ca_file, "--ca-file")? } else { None };
    if tls && ca.is_none() {
        return Err(CliError::Input(format!(
            "the control plane at {addr} is served over TLS and --ca-file {} does not exist: give \
             the mesh root (the control plane's data dir holds it as ca.pem)",
            t.ca_file.display()
        )));
    }
    // The token goes only where TLS protects it: an `http://` control plane runs with
    // --insecure-api and needs none.
    let token = if tls { read_file(&t.admin_token_file, "--admin-token-file")? } else { None };
    admin_channel(addr, ca.as_deref(), token.as_deref()).await.map_err(|e| match e {
        DialError::Url(..) => {
            CliError::Input(format!("--control-plane {addr:?} is not a URL like https://127.0.0.1:7070: {e}"))
        }
        DialError::Connect(_, cause) => CliError::Unreachable { addr: addr.to_string(), cause },
        DialError::Pem { what: "admin token", .. } => {
            CliError::Input(format!("--admin-token-file {}: not a token", t.admin_token_file.display()))
        }
        DialError::Pem { .. } | DialError::Tls(_) => {
            CliError::Input(format!("--ca-file {}: {e}", t.ca_file.display()))
        }
        other => CliError::Input(other.to_string()),
    })
}
