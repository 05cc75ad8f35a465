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
use serde_json::json;
use tokio::time::Instant;

use crate::{
    gateway::{
        jwks_url::JwksUrl,
        jwt::{Expectations, Keys, Refusal, Verified, Verifier},
    },
    http::{body::Body, errors::error_response},
};

/// The verified end user's subject, for the app.
pub const USER: HeaderName = HeaderName::from_static("x-mesh-user");
/// The verified end user's roles (the token's `roles` claim), comma separated.
pub const USER_ROLES: HeaderName = HeaderName::from_static("x-mesh-user-roles");

pub use mesh_proto::gateway::AuthMode;

/// The gateway's end-user authentication settings.
/// Where the JWK Set comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A file, re-read when its modification time changes.
    File(PathBuf),
    /// An identity provider's URL, fetched on every refresh (`ca_file`: the CAs an `https://`
    /// URL's certificate must chain to; default the system's).
    Url { url: String, ca_file: Option<PathBuf> },
}

#[derive(Debug, Clone)]
pub struct EdgeAuthConfig {
    /// The JWK Set (JSON) the tokens are checked against.
    pub jwks: KeySource,
    pub expect: Expectations,
    /// The mode of routes that name none.
    pub default_mode: AuthMode,
    /// How often the file is checked for a change (the URL fetched again).
    pub refresh: Duration,
    /// Most verified tokens remembered (0: every request's signature is checked).
    pub token_cache: usize,
}

/// The verifier over the current key set of [`EdgeAuthConfig::jwks`].
pub struct EdgeAuth {
    config: EdgeAuthConfig,
    url: Option<JwksUrl>,
    verifier: Verifier,
    cache: TokenCache,
    /// The file's modification time when last read, and when a reload was last tried.
    state: Mutex<(Option<SystemTime>, Option<Instant>)>,
}

/// Reloads for unknown key ids happen at most this often.
const RELOAD_AT_MOST_EVERY: Duration = Duration::from_secs(1);

fn modified(path: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The key set in `path`, with the modification time read before it (so a change made while it
/// is read is seen again at the next check, never missed).
fn read_keys(path: &std::path::Path) -> Result<(Keys, Option<SystemTime>), String> {
    let modified = modified(path);
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let keys = Keys::from_json(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((keys, modified))
}

impl EdgeAuth {
    /// Reads (or fetches) the key set; an unusable one is an error (the gateway does not start).
    pub async fn load(config: EdgeAuthConfig) -> Result<EdgeAuth, String> {
        let (keys, modified, url) = match &config.jwks {
            KeySource::File(path) => {
                let (keys, modified) = read_keys(path)?;
                (keys, modified, None)
            }
            KeySource::Url { url, ca_file } => {
                let source = JwksUrl::new(url, ca_file.as_deref())?;
                let text = source.fetch().await?;
                (Keys::from_json(&text).map_err(|e| format!("{url}: {e}"))?, None, Some(source))
            }
        };
        let verifier = Verifier::new(keys, config.expect.clone());
        let cache = TokenCache { max: config.token_cache, entries: Mutex::default() };
        Ok(EdgeAuth { config, url, verifier, cache, state: Mutex::new((modified, None)) })
    }

    pub fn default_mode(&self) -> AuthMode {
        self.config.default_mode
    }

    pub fn refresh_interval(&self) -> Duration {
        self.config.refresh
    }

    /// Reads the key set again: a file when it changed (or when `force`), a URL always. A bad
    /// or unreachable set keeps the keys in use and says why.
    pub async fn reload(&self, force: bool) {
        let fetched = match (&self.config.jwks, &self.url) {
            (KeySource::Url { url, .. }, Some(source)) => {
                self.state.lock().unwrap_or_else(|p| p.into_inner()).1 = Some(Instant::now());
                source
                    .fetch()
                    .await
                    .and_then(|text| Keys::from_json(&text).map_err(|e| format!("{url}: {e}")))
                    .map(|keys| (keys, None))
            }
            (_, _) => {
                let KeySource::File(path) = &self.config.jwks else { return };
                let now_modified = modified(path);
                {
                    let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
                    if !force && now_modified == state.0 {
                        return;
                    }
                    state.1 = Some(Instant::now());
                }
                read_keys(path)
            }
        };
        match fetched {
            Ok((keys, modified)) => {
                tracing::debug!(keys = keys.len(), "end-user key set reloaded");
                self.verifier.replace(keys);
                self.cache.clear();
                self.state.lock().unwrap_or_else(|p| p.into_inner()).0 = modified;
            }
            Err(e) => tracing::warn!(error = %e, "end-user key set not reloaded; the previous keys stay"),
        }
    }

    /// Verifies `token`; an unknown key id reloads the set (at most once a second) and tries again.
    async fn verify(&self, token: &str) -> Result<Verified, Refusal> {
        match self.verifier.verify(token) {
            Err(Refusal::UnknownKey(_)) if self.may_reload() => {
                self.reload(true).await;
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
    /// verifies the bearer token and sets them from it. `Err` is the refusal's code (for the
    /// access log) and the 401 to answer.
    pub async fn authenticate(
        &self,
        headers: &mut HeaderMap,
        mode: AuthMode,
    ) -> Result<(), (&'static str, Box<Response<Body>>)> {
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
                let resp = unauthorized(
                    "token_missing",
                    "this route needs a bearer JWT (Authorization: Bearer <token>)".into(),
                    "Bearer".into(),
                );
                return Err(("token_missing", Box::new(resp)));
            }
            return Ok(());
        };
        if let Some(user) = self.cache.get(token) {
            user.set(headers);
            return Ok(());
        }
        match self.verify(token).await {
            Ok(v) => {
                let user = EndUser::of(&v);
                self.cache.put(token, &user, &v);
                user.set(headers);
                Ok(())
            }
            Err(r) => {
                tracing::debug!(reason = r.code(), "end-user token refused");
                Err((r.code(), Box::new(unauthorized(r.code(), r.to_string(), r.www_authenticate()))))
            }
        }
    }
}

/// Removes the identity headers a client may have sent.
pub fn strip_user(headers: &mut HeaderMap) {
    headers.remove(USER);
    headers.remove(USER_ROLES);
}

/// What a verified token puts on a request: the subject and roles as header values.
#[derive(Clone)]
struct EndUser {
    user: Option<HeaderValue>,
    roles: Option<HeaderValue>,
}

impl EndUser {
    fn of(v: &Verified) -> EndUser {
        let roles: Vec<&str> = match v.claims.get("roles") {
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|r| r.as_str()).collect(),
            Some(serde_json::Value::String(s)) => s.split([' ', ',']).filter(|r| !r.is_empty()).collect(),
            _ => Vec::new(),
        };
        let roles: Vec<&str> = roles.into_iter().filter(|r| !r.contains(',') && r.is_ascii()).collect();
        EndUser {
            user: HeaderValue::from_str(&v.subject).ok(),
            roles: (!roles.is_empty()).then(|| HeaderValue::from_str(&roles.join(",")).ok()).flatten(),
        }
    }

    fn set(&self, headers: &mut HeaderMap) {
        if let Some(u) = &self.user {
            headers.insert(USER, u.clone());
        }
        if let Some(r) = &self.roles {
            headers.insert(USER_ROLES, r.clone());
        }
    }
}

/// Tokens verified lately, by their SHA-256: what they set, until their `exp` (at most
/// [`CACHE_FOR`]). Emptied whenever the key set changes, so a withdrawn key's tokens stop at
/// once; bounded (full: emptied).
struct TokenCache {
    max: usize,
    entries: Mutex<std::collections::HashMap<[u8; 32], (EndUser, SystemTime)>>,
}

/// The longest a verified token is trusted without checking its signature again.
const CACHE_FOR: Duration = Duration::from_secs(60);

impl TokenCache {
    fn get(&self, token: &str) -> Option<EndUser> {
        if self.max == 0 {
            return None;
        }
        let key = mesh_runtime::sha256(token.as_bytes());
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.get(&key).filter(|(_, until)| SystemTime::now() < *until).map(|(u, _)| u.clone())
    }

    fn put(&self, token: &str, user: &EndUser, v: &Verified) {
        if self.max == 0 {
            return;
        }
        let now = SystemTime::now();
        let exp = v
            .claims
            .get("exp")
            .and_then(serde_json::Value::as_u64)
            .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s));
        let until = exp.map_or(now + CACHE_FOR, |e| e.min(now + CACHE_FOR));
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= self.max {
            entries.retain(|_, (_, u)| now < *u);
            if entries.len() >= self.max {
                entries.clear();
            }
        }
        entries.insert(mesh_runtime::sha256(token.as_bytes()), (user.clone(), until));
    }

    fn clear(&self) {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

fn unauthorized(code: &str, message: String, challenge: String) -> Response<Body> {
    let mut resp = error_response(StatusCode::UNAUTHORIZED, code, message, json!({}));
    if let Ok(v) = HeaderValue::from_str(&challenge) {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use serde_json::{Value, json};

    use super::*;

    fn es256(kid: &str) -> (EncodingKey, Value) {
        let k = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = k.public_key_raw();
        let (x, y) = (mesh_runtime::base64url(&raw[1..33]), mesh_runtime::base64url(&raw[33..65]));
        (
            EncodingKey::from_ec_der(&k.serialize_der()),
            json!({"kty": "EC", "crv": "P-256", "kid": kid, "x": x, "y": y}),
        )
    }

    fn bearer(key: &EncodingKey, kid: &str) -> HeaderMap {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(kid.into());
        let claims = json!({"sub": "alice", "exp": jsonwebtoken::get_current_timestamp() + 600});
        let token = jsonwebtoken::encode(&h, &claims, key).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_str(&format!("Bearer {token}")).unwrap());
        headers
    }

    /// The interval refresh (`reload(false)`) notices a changed file by its modification time,
    /// and leaves the keys alone when the file is unchanged or broken.
    #[tokio::test]
    async fn a_changed_key_set_file_is_read_again_and_a_broken_one_keeps_the_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        let (k1, j1) = es256("k1");
        let (k2, j2) = es256("k2");
        let write = |keys: &[&Value], at: u64| {
            std::fs::write(&path, json!({ "keys": keys }).to_string()).unwrap();
            let f = std::fs::File::options().write(true).open(&path).unwrap();
            f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(at)).unwrap();
        };
        write(&[&j1], 1_000);
        let auth = EdgeAuth::load(EdgeAuthConfig {
            jwks: KeySource::File(path.clone()),
            expect: Expectations::default(),
            default_mode: AuthMode::Required,
            refresh: Duration::from_secs(30),
            token_cache: 1000,
        })
        .await
        .unwrap();
        let mut first = bearer(&k1, "k1");
        assert!(auth.authenticate(&mut first, AuthMode::Required).await.is_ok());
        // The verified token is remembered (its next requests skip the signature check)…
        let token = first[header::AUTHORIZATION].to_str().unwrap()["Bearer ".len()..].to_string();
        assert!(auth.cache.get(&token).is_some_and(|u| u.user.as_ref().is_some_and(|v| v == "alice")));
        // …but not by a gateway told not to.
        let uncached =
            EdgeAuth::load(EdgeAuthConfig { token_cache: 0, ..auth.config.clone() }).await.unwrap();
        assert!(uncached.authenticate(&mut bearer(&k1, "k1"), AuthMode::Required).await.is_ok());
        assert!(uncached.cache.get(&token).is_none());

        // k1 leaves the set, k2 joins: only the interval check can notice k1 is gone (and the
        // remembered k1 token is forgotten with it).
        write(&[&j2], 2_000);
        auth.reload(false).await;
        assert!(auth.cache.get(&token).is_none(), "a changed key set empties the cache");
        assert!(
            auth.authenticate(&mut bearer(&k1, "k1"), AuthMode::Required).await.is_err(),
            "k1 was removed"
        );
        let mut ok = bearer(&k2, "k2");
        assert!(auth.authenticate(&mut ok, AuthMode::Required).await.is_ok());
        assert_eq!(ok[USER], "alice");

        // Unchanged file: nothing is read. A broken file: the keys in use stay.
        std::fs::write(&path, "not json").unwrap();
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(2_000)).unwrap();
        auth.reload(false).await;
        f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(3_000)).unwrap();
        auth.reload(false).await;
        assert!(
            auth.authenticate(&mut bearer(&k2, "k2"), AuthMode::Required).await.is_ok(),
            "k2 still trusted"
        );
    }
}
