//! End-user authentication at the gateway: a route's auth mode, the bearer token verified
//! ([`super::jwt`]) against a JWK Set file the gateway re-reads when it changes (checked on an
//! interval, and at once when a token names a key the set lacks), and the verified subject and
//! roles handed to the app in headers no client can set.
//!
//! - `x-mesh-user`: the token's `sub`; `x-mesh-user-roles`: its `roles` claim (strings, comma
//!   separated). Both are removed from every request that enters the gateway, and set only from
//!   a verified token. The receiving sidecar passes them to its app only when the caller is a
//!   trusted edge (the gateway's mesh identity); from anyone else they are dropped with every
//!   other `x-mesh-*` header.
//! - Only a JWT (three dot-separated parts) is the edge's to verify; another bearer credential (an
//!   app's own API key or admin token) passes to the app as on a route without auth.
//! - A refused token is 401 with `WWW-Authenticate: Bearer error="invalid_token", …` and a JSON
//!   body naming what was wrong; a route that requires a token answers 401 without one. The
//!   token is never logged.

use std::{
    path::PathBuf,
    sync::Mutex,
    time::{Duration, SystemTime},
};

use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode, header};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::time::Instant;

use crate::{
    gateway::jwt::{Expectations, Keys, Refusal, Verified, Verifier},
    http::{body::Body, errors::error_response},
};

/// The verified end user's subject, for the app.
pub const USER: HeaderName = HeaderName::from_static("x-mesh-user");
/// The verified end user's roles (the token's `roles` claim), comma separated.
pub const USER_ROLES: HeaderName = HeaderName::from_static("x-mesh-user-roles");

/// Whether a route needs an end-user token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// No token: 401.
    Required,
    /// A token is verified when present (a bad one is 401); without one the request goes on
    /// anonymous.
    Optional,
    /// Tokens are not looked at (the app still never sees a client's `x-mesh-user`).
    None,
}

/// The gateway's end-user authentication settings.
#[derive(Debug, Clone)]
pub struct EdgeAuthConfig {
    /// The JWK Set (JSON) the tokens are checked against.
    pub jwks_file: PathBuf,
    pub expect: Expectations,
    /// The mode of routes that name none.
    pub default_mode: AuthMode,
    /// How often the file is checked for a change.
    pub refresh: Duration,
}

/// The verifier over the current key set of [`EdgeAuthConfig::jwks_file`].
pub struct EdgeAuth {
    config: EdgeAuthConfig,
    verifier: Verifier,
    /// The file's modification time when last read, and when a reload was last tried.
    state: Mutex<(Option<SystemTime>, Option<Instant>)>,
}

/// Reloads for unknown key ids happen at most this often.
const RELOAD_AT_MOST_EVERY: Duration = Duration::from_secs(1);

fn read_keys(path: &std::path::Path) -> Result<(Keys, Option<SystemTime>), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let keys = Keys::from_json(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    Ok((keys, modified))
}

impl EdgeAuth {
    /// Reads the key set; an unreadable or unusable file is an error (the gateway does not start).
    pub fn load(config: EdgeAuthConfig) -> Result<EdgeAuth, String> {
        let (keys, modified) = read_keys(&config.jwks_file)?;
        let verifier = Verifier::new(keys, config.expect.clone());
        Ok(EdgeAuth { config, verifier, state: Mutex::new((modified, None)) })
    }

    pub fn default_mode(&self) -> AuthMode {
        self.config.default_mode
    }

    pub fn refresh_interval(&self) -> Duration {
        self.config.refresh
    }

    /// Re-reads the key set when the file changed (or when `force`). A bad file keeps the keys
    /// in use and says why.
    pub fn reload(&self, force: bool) {
        let path = &self.config.jwks_file;
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if !force && modified == state.0 {
                return;
            }
            state.1 = Some(Instant::now());
        }
        match read_keys(path) {
            Ok((keys, modified)) => {
                tracing::info!(keys = keys.len(), file = %path.display(), "end-user key set reloaded");
                self.verifier.replace(keys);
                self.state.lock().unwrap_or_else(|p| p.into_inner()).0 = modified;
            }
            Err(e) => tracing::warn!(error = %e, "end-user key set not reloaded; the previous keys stay"),
        }
    }

    /// Verifies `token`; an unknown key id reloads the set (at most once a second) and tries again.
    fn verify(&self, token: &str) -> Result<Verified, Refusal> {
        match self.verifier.verify(token) {
            Err(Refusal::UnknownKey(_)) if self.may_reload() => {
                self.reload(true);
                self.verifier.verify(token)
            }
            other => other,
        }
    }

    fn may_reload(&self) -> bool {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.1.is_none_or(|at| at.elapsed() >= RELOAD_AT_MOST_EVERY)
    }

    /// Applies `mode` to a request's headers: removes any client-sent identity headers, then
    /// verifies the bearer token and sets them from it. `Err` is the 401 to answer.
    pub fn authenticate(&self, headers: &mut HeaderMap, mode: AuthMode) -> Result<(), Box<Response<Body>>> {
        strip_user(headers);
        if mode == AuthMode::None {
            return Ok(());
        }
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            // An opaque bearer credential (an API key, an app's admin token) is not the edge's
            // business: it goes on to the app, which checks it; only a JWT is verified here.
            .filter(|t| t.bytes().filter(|b| *b == b'.').count() == 2);
        let Some(token) = token else {
            if mode == AuthMode::Required {
                return Err(Box::new(unauthorized(
                    "token_missing",
                    "this route needs a bearer JWT (Authorization: Bearer <token>)".into(),
                    "Bearer".into(),
                )));
            }
            return Ok(());
        };
        match self.verify(token) {
            Ok(v) => {
                set_user(headers, &v);
                Ok(())
            }
            Err(r) => {
                tracing::debug!(reason = r.code(), "end-user token refused");
                Err(Box::new(unauthorized(r.code(), r.to_string(), r.www_authenticate())))
            }
        }
    }
}

/// Removes the identity headers a client may have sent.
pub fn strip_user(headers: &mut HeaderMap) {
    headers.remove(USER);
    headers.remove(USER_ROLES);
}

fn set_user(headers: &mut HeaderMap, v: &Verified) {
    if let Ok(sub) = HeaderValue::from_str(&v.subject) {
        headers.insert(USER, sub);
    }
    let roles: Vec<&str> = match v.claims.get("roles") {
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|r| r.as_str()).collect(),
        Some(serde_json::Value::String(s)) => s.split([' ', ',']).filter(|r| !r.is_empty()).collect(),
        _ => Vec::new(),
    };
    let roles: Vec<&str> = roles.into_iter().filter(|r| !r.contains(',') && r.is_ascii()).collect();
    if !roles.is_empty()
        && let Ok(v) = HeaderValue::from_str(&roles.join(","))
    {
        headers.insert(USER_ROLES, v);
    }
}

fn unauthorized(code: &str, message: String, challenge: String) -> Response<Body> {
    let mut resp = error_response(StatusCode::UNAUTHORIZED, code, message, json!({}));
    if let Ok(v) = HeaderValue::from_str(&challenge) {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    resp
}
