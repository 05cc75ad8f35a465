//! `meshctl identity token create|revoke` and `identity bundle`.

use crate::{
    args::{IdentityCommand, Output, TokenCommand},
    error::CliError,
};

use mesh_proto::dial::AdminChannel;
use mesh_proto::v1;
use std::path::Path;

pub async fn run(cmd: IdentityCommand, ch: AdminChannel, out: Output, addr: &str) -> Result<(), CliError> {
    let st = |s: tonic::Status| CliError::from_status(s, addr);
    let mut ca = v1::identity_client::IdentityClient::new(ch);
    match cmd {
        IdentityCommand::Token(TokenCommand::Create { service, write }) => {
            let r = ca.create_token(v1::CreateTokenRequest { service }).await.map_err(st)?.into_inner();
            match (write, out) {
                (Some(path), _) => {
                    write_secret(&path, &r.token)?;
                    out!("wrote the token for {} to {}", r.service, path.display());
                }
                (None, Output::Json) => {
                    out!("{}", serde_json::json!({"service": r.service, "token": r.token}))
                }
                (None, Output::Table) => out!("{}", r.token),
            }
        }
        IdentityCommand::Token(TokenCommand::Revoke { service }) => {
            let r =
                ca.revoke_tokens(v1::RevokeTokensRequest { service: service.clone() }).await.map_err(st)?;
            let n = r.into_inner().revoked;
            match out {
                Output::Json => out!("{}", serde_json::json!({"service": service, "revoked": n})),
                Output::Table => out!("revoked {n} token(s) of {service}"),
            }
        }
        IdentityCommand::Bundle { write } => {
            let r = ca.trust_bundle(v1::TrustBundleRequest {}).await.map_err(st)?.into_inner();
            if let Some(path) = write {
                write_secret(&path, &r.trust_anchors_pem)?;
                out!("wrote the trust bundle of {} to {}", r.trust_domain, path.display());
                return Ok(());
            }
            match out {
                Output::Json => out!(
                    "{}",
                    serde_json::json!({"trust_domain": r.trust_domain, "trust_anchors_pem": r.trust_anchors_pem})
                ),
                Output::Table => {
                    out!("# trust domain: {}", r.trust_domain);
                    out!("{}", r.trust_anchors_pem.trim_end());
                }
            }
        }
    }
    Ok(())
}

/// Writes `secret` to `path`, readable by its owner only (directories created).
pub fn write_secret(path: &Path, secret: &str) -> Result<(), CliError> {
    mesh_runtime::write_secret(path, secret, mesh_runtime::Existing::Replace)
        .map_err(|e| CliError::Input(format!("cannot write {}: {e}", path.display())))
}
