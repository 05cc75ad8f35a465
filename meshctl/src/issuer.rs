//! The development token issuer of the local mesh: an ES256 key in `<dir>/issuer/` (made on first
//! use, owner-only), its JWK Set for the gateway (`--jwks-file`), and tokens signed with it
//! (`meshctl token issue`). For local development only: a real deployment trusts its identity
//! provider's JWK Set instead.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

use crate::error::CliError;

/// The issuer (`iss`) and audience (`aud`) of development tokens; the gateway of `meshctl up`
/// accepts exactly these.
pub const ISSUER: &str = "meshctl-dev";
pub const AUDIENCE: &str = "opinion-market";

pub struct Issuer {
    key: rcgen::KeyPair,
    kid: String,
    pub jwks_file: PathBuf,
}

impl Issuer {
    /// The issuer in `dir`: its key read, or made (and its JWK Set written) the first time.
    pub fn open(dir: &Path) -> Result<Issuer, CliError> {
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            CliError::Input(format!("the development token issuer in {}: {what}: {e}", dir.display()))
        };
        let key_file = dir.join("key.pem");
        let made = !key_file.exists();
        let key = if !made {
            let pem = std::fs::read_to_string(&key_file).map_err(|e| fail("cannot read key.pem", &e))?;
            rcgen::KeyPair::from_pem(&pem).map_err(|e| fail("key.pem is not a key", &e))?
        } else {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                .map_err(|e| fail("cannot make a key", &e))?;
            crate::commands::identity::write_secret(&key_file, &key.serialize_pem())?;
            key
        };
        let raw = key.public_key_raw();
        if raw.len() != 65 {
            return Err(fail("key.pem", &"not a P-256 key"));
        }
        let kid = mesh_runtime::hex(&mesh_runtime::sha256(raw))[..16].to_string();
        let jwks = json!({"keys": [{
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
            "x": mesh_runtime::base64url(&raw[1..33]), "y": mesh_runtime::base64url(&raw[33..65]),
        }]});
        // Written with the key (or when missing): rewriting it on every `token issue` would only
        // make the gateway read it again.
        let jwks_file = dir.join("jwks.json");
        if made || !jwks_file.exists() {
            std::fs::write(&jwks_file, jwks.to_string()).map_err(|e| fail("cannot write jwks.json", &e))?;
        }
        Ok(Issuer { key, kid, jwks_file })
    }

    /// A token for `sub`, valid for `ttl`, with the `admin` role when asked.
    pub fn issue(&self, sub: &str, admin: bool, ttl: Duration) -> Result<String, CliError> {
        let now = jsonwebtoken::get_current_timestamp();
        let roles: Vec<&str> = if admin { vec!["admin"] } else { Vec::new() };
        let claims = json!({
            "iss": ISSUER, "aud": AUDIENCE, "sub": sub, "roles": roles,
            "iat": now, "exp": now + ttl.as_secs(),
        });
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ec_der(&self.key.serialize_der()))
            .map_err(|e| CliError::Input(format!("cannot sign the token: {e}")))
    }
}
