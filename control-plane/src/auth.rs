//! Who is calling the control plane's API, and what they may do.
//!
//! The API is served over TLS (see [`crate::tls`]). A caller is one of:
//!
//! - **admin** — presents the admin token as `authorization: Bearer <token>` (what `meshctl`
//!   does, reading the token file the control plane wrote into its data dir);
//! - **a mesh service** — presents a client certificate the mesh CA issued; its URI SAN
//!   `spiffe://<trust-domain>/service/<name>` names the service;
//! - **anonymous** — neither. It may only call `Identity.Certify` (which its bootstrap token
//!   authorizes), `Identity.TrustBundle` and the gRPC health service.
//!
//! | call                                              | admin | its own service | other mesh service |
//! |---------------------------------------------------|-------|-----------------|--------------------|
//! | Registry.Register / Heartbeat / Deregister         | yes   | yes             | PERMISSION_DENIED  |
//! | Policy.Stream subscribing as a service             | yes   | yes             | PERMISSION_DENIED  |
//! | Discovery.Watch, Registry / Policy reads, Events   | yes   | yes             | yes                |
//! | Policy.Set / Delete, Admin.*, tokens               | yes   | PERMISSION_DENIED | PERMISSION_DENIED |
//!
//! Anonymous callers get `UNAUTHENTICATED` everywhere else. A refused call changes nothing: the
//! check comes before any effect. With `--insecure-api` (plaintext, for a throwaway local run)
//! every caller is admin.

use std::{net::SocketAddr, path::Path};

use tonic::{Request, Status};

use crate::{ca, error, transport::peer::Peer};

/// Who made a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Admin,
    /// A mesh identity: the service named in its certificate.
    Service(String),
    Anonymous,
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Admin => f.write_str("the admin"),
            Caller::Service(s) => write!(f, "service {s}"),
            Caller::Anonymous => f.write_str("an anonymous caller"),
        }
    }
}

/// How callers are recognised.
pub struct Auth {
    /// SHA-256 of the admin token; `None` when the API is unauthenticated (`--insecure-api`).
    admin_token_sha256: Option<[u8; 32]>,
    /// `spiffe://<trust-domain>/service/`.
    service_prefix: String,
}

impl Auth {
    /// Callers are recognised by the admin token or a certificate of `trust_domain`.
    pub fn enforcing(admin_token: &str, trust_domain: &str) -> Self {
        Self {
            admin_token_sha256: Some(mesh_runtime::sha256(admin_token.as_bytes())),
            service_prefix: mesh_proto::names::spiffe_id(trust_domain, ""),
        }
    }

    /// Everyone is admin (`--insecure-api`).
    pub fn open() -> Self {
        Self { admin_token_sha256: None, service_prefix: String::new() }
    }

    /// Who sent `req`. A bearer token that is not the admin token is an error, not anonymous,
    /// so a mistyped token says so.
    pub fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let Some(admin) = &self.admin_token_sha256 else { return Ok(Caller::Admin) };
        if let Some(value) = req.metadata().get("authorization") {
            let token = value.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")).unwrap_or_default();
            if !token.is_empty() && mesh_runtime::sha256(token.trim().as_bytes()) == *admin {
                return Ok(Caller::Admin);
            }
            return Err(Status::unauthenticated(
                "the bearer token is not the admin token: use the control plane's admin token \
                 (its data dir's admin.token; meshctl --admin-token-file)",
            ));
        }
        let id = req.extensions().get::<Peer>().and_then(|p| p.spiffe_id.as_deref());
        Ok(match id.and_then(|id| id.strip_prefix(&self.service_prefix)) {
            Some(service) => Caller::Service(service.to_string()),
            None => Caller::Anonymous,
        })
    }

    /// The management API over HTTP: the admin token as a bearer token, or the reason it is
    /// refused — 401 with none, 403 with another.
    pub fn http_admin(
        &self,
        headers: &axum::http::HeaderMap,
    ) -> Result<(), (axum::http::StatusCode, &'static str, String)> {
        let Some(admin) = &self.admin_token_sha256 else { return Ok(()) };
        let Some(value) = headers.get(axum::http::header::AUTHORIZATION) else {
            return Err((
                axum::http::StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "send the admin token: authorization: Bearer <its data dir's admin.token>".into(),
            ));
        };
        let token = value.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")).unwrap_or_default();
        if !token.is_empty() && mesh_runtime::sha256(token.trim().as_bytes()) == *admin {
            return Ok(());
        }
        Err((
            axum::http::StatusCode::FORBIDDEN,
            "forbidden",
            "the bearer token is not the admin token: use the control plane's admin token (its data dir's admin.token)"
                .into(),
        ))
    }

    /// Admin only.
    pub fn admin<T>(&self, req: &Request<T>, what: &str) -> Result<(), Status> {
        match self.caller(req)? {
            Caller::Admin => Ok(()),
            Caller::Anonymous => Err(unauthenticated(what)),
            c => Err(Status::permission_denied(format!("{c} may not {what}: that needs the admin token"))),
        }
    }

    /// Any mesh identity or the admin.
    pub fn member<T>(&self, req: &Request<T>, what: &str) -> Result<Caller, Status> {
        match self.caller(req)? {
            Caller::Anonymous => Err(unauthenticated(what)),
            c => Ok(c),
        }
    }

    /// The admin, or `service` itself.
    pub fn as_service<T>(&self, req: &Request<T>, service: &str, what: &str) -> Result<Caller, Status> {
        let caller = self.member(req, what)?;
        caller.may_act_as(service, what)?;
        Ok(caller)
    }
}

impl Caller {
    /// Whether this caller may `what` as `service`.
    pub fn may_act_as(&self, service: &str, what: &str) -> Result<(), Status> {
        match self {
            Caller::Admin => Ok(()),
            Caller::Service(s) if s == service => Ok(()),
            Caller::Anonymous => Err(unauthenticated(what)),
            c => Err(Status::permission_denied(format!(
                "{c} may not {what} as service {service}: a sidecar acts only as the service its \
                 certificate names"
            ))),
        }
    }
}

fn unauthenticated(what: &str) -> Status {
    Status::unauthenticated(format!(
        "no credential to {what}: present a mesh certificate (sidecars, from Identity.Certify) or \
         the admin token (meshctl --admin-token-file)"
    ))
}

/// The admin token: read from `given`, or from `admin.token` in `data_dir`, created there
/// (owner-only, fsync'd) on first start.
pub fn admin_token(data_dir: &Path, given: Option<&Path>) -> Result<String, error::Error> {
    let path = given.map(Path::to_path_buf).unwrap_or_else(|| data_dir.join("admin.token"));
    let err = |reason: String| error::Error::AdminToken { path: path.display().to_string(), reason };
    if given.is_some() || path.exists() {
        let token = std::fs::read_to_string(&path).map_err(|e| err(e.to_string()))?.trim().to_string();
        if token.len() < 16 {
            return Err(err("the token must be at least 16 characters".into()));
        }
        return Ok(token);
    }
    let token = mesh_runtime::random_token().ok_or_else(|| err("no randomness for a token".into()))?;
    ca::write_private(&path, &format!("{token}\n")).map_err(|e| err(e.to_string()))?;
    tracing::info!(path = %path.display(), "created the admin token (meshctl reads it with --admin-token-file)");
    Ok(token)
}

/// The caller's address, with or without TLS.
pub fn remote_addr<T>(req: &Request<T>) -> Option<SocketAddr> {
    req.remote_addr().or_else(|| req.extensions().get::<Peer>().and_then(|p| p.addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_token(token: &str) -> Request<()> {
        let mut r = Request::new(());
        r.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        r
    }

    #[test]
    fn the_admin_token_makes_an_admin_and_nothing_else_does() {
        let auth = Auth::enforcing("s3cret", "mesh.test");
        assert_eq!(auth.caller(&with_token("s3cret")).unwrap(), Caller::Admin);
        assert_eq!(auth.caller(&with_token("wrong")).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert_eq!(auth.caller(&Request::new(())).unwrap(), Caller::Anonymous);
        let anon = auth.admin(&Request::new(()), "set a policy").unwrap_err();
        assert_eq!(anon.code(), tonic::Code::Unauthenticated);
        assert!(anon.message().contains("set a policy"), "{anon:?}");
        assert_eq!(Auth::open().caller(&Request::new(())).unwrap(), Caller::Admin);
    }

    #[test]
    fn a_service_acts_only_as_itself() {
        let market = Caller::Service("market".into());
        assert!(market.may_act_as("market", "register").is_ok());
        let e = market.may_act_as("payments", "register").unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("payments"), "{e:?}");
        assert!(Caller::Admin.may_act_as("payments", "register").is_ok());
        assert_eq!(
            Caller::Anonymous.may_act_as("x", "register").unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }
}
