//! End-user tokens at the edge: JWTs (`Authorization: Bearer …`) verified against a JWK Set.
//!
//! - Keys come from a JWK Set (RFC 7517): RSA (`RS256/384/512`, `PS256/384/512`), EC P-256 /
//!   P-384 (`ES256` / `ES384`), OKP Ed25519 (`EdDSA`) and `oct` secrets (`HS256/384/512`). A key
//!   accepts only the algorithms of its own type — and, when the JWK names one (`alg`), only that
//!   one — so a token cannot choose how it is checked: `alg: none` and the classic confusion
//!   (`HS256` "signed" with an RSA public key as the secret) are refused.
//! - The token's `kid` picks the key; a token without one is tried against the keys without a
//!   `kid` only. An unknown `kid` is its own refusal, so the caller can refresh the set
//!   ([`Verifier::replace`]) and try again.
//! - Claims: `exp` is required; `exp` and `nbf` are checked with a small leeway; `iss` and `aud`
//!   when configured; `sub` is required (it is who the caller acts as).
//! - A refusal says what was wrong ([`Refusal`]); the token itself never appears in it.

use std::{collections::HashMap, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use jsonwebtoken::{
    Algorithm, DecodingKey, Validation, decode, decode_header,
    errors::ErrorKind,
    jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet},
};
use serde_json::{Map, Value};

/// What a token must say besides a good signature.
#[derive(Debug, Clone)]
pub struct Expectations {
    /// Accepted issuers (`iss`); empty: any.
    pub issuers: Vec<String>,
    /// Accepted audiences (`aud`, one of them); empty: any.
    pub audiences: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
}

impl Default for Expectations {
    fn default() -> Self {
        Expectations { issuers: Vec::new(), audiences: Vec::new(), leeway: Duration::from_secs(30) }
    }
}

/// A verified token: who it is for, and its claims.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    pub subject: String,
    pub claims: Map<String, Value>,
}

/// Why a token was refused, in words a client can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the token is not a JWT (three base64url parts with a JSON header)")]
    Malformed,
    #[error("the token's key id {0:?} is not in the gateway's key set")]
    UnknownKey(String),
    #[error("the token names no key id and no key without one verifies it")]
    NoKey,
    #[error("algorithm {alg} is not accepted for key {kid:?}")]
    AlgorithmNotAllowed { alg: String, kid: String },
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the token's issuer is not accepted")]
    WrongIssuer,
    #[error("the token is not meant for this audience")]
    WrongAudience,
    #[error("the token lacks the {0} claim")]
    MissingClaim(String),
}

impl Refusal {
    /// A short code for JSON bodies, logs and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Malformed => "token_malformed",
            Refusal::UnknownKey(_) => "token_unknown_key",
            Refusal::NoKey => "token_no_key",
            Refusal::AlgorithmNotAllowed { .. } => "token_algorithm_not_allowed",
            Refusal::BadSignature => "token_bad_signature",
            Refusal::Expired => "token_expired",
            Refusal::NotYetValid => "token_not_yet_valid",
            Refusal::WrongIssuer => "token_wrong_issuer",
            Refusal::WrongAudience => "token_wrong_audience",
            Refusal::MissingClaim(_) => "token_missing_claim",
        }
    }

    /// The `WWW-Authenticate` value of a 401 (RFC 6750 §3).
    pub fn www_authenticate(&self) -> String {
        format!("Bearer error=\"invalid_token\", error_description=\"{self}\"")
    }
}

/// One usable key of the set.
struct Key {
    kid: Option<String>,
    decoding: DecodingKey,
    algorithms: Vec<Algorithm>,
}

/// A parsed JWK Set.
pub struct Keys {
    by_kid: HashMap<String, Arc<Key>>,
    without_kid: Vec<Arc<Key>>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut kids: Vec<&String> = self.by_kid.keys().collect();
        kids.sort();
        f.debug_struct("Keys").field("kids", &kids).field("without_kid", &self.without_kid.len()).finish()
    }
}

impl Keys {
    /// Parses a JWK Set document. Keys this verifier cannot use (an unknown key type or curve,
    /// `use` other than `sig`) are skipped; a set with no usable key is an error.
    pub fn from_json(json: &str) -> Result<Keys, String> {
        let set: JwkSet = serde_json::from_str(json).map_err(|e| format!("not a JWK Set: {e}"))?;
        let mut keys = Keys { by_kid: HashMap::new(), without_kid: Vec::new() };
        let mut skipped = Vec::new();
        for jwk in &set.keys {
            match key(jwk) {
                Ok(k) => match k.kid.clone() {
                    Some(kid) => {
                        keys.by_kid.insert(kid, Arc::new(k));
                    }
                    None => keys.without_kid.push(Arc::new(k)),
                },
                Err(e) => skipped.push(e),
            }
        }
        if keys.by_kid.is_empty() && keys.without_kid.is_empty() {
            return Err(format!("the JWK Set has no usable signing key ({})", skipped.join("; ")));
        }
        Ok(keys)
    }

    /// How many keys were usable.
    pub fn len(&self) -> usize {
        self.by_kid.len() + self.without_kid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The algorithms a JWK may verify: those of its key type, narrowed to its `alg` when it names one.
fn key(jwk: &Jwk) -> Result<Key, String> {
    let kid = jwk.common.key_id.clone();
    let name = kid.as_deref().unwrap_or("(no kid)");
    if jwk.common.public_key_use.as_ref().is_some_and(|u| *u != jsonwebtoken::jwk::PublicKeyUse::Signature) {
        return Err(format!("key {name} is not for signatures"));
    }
    let by_type: Vec<Algorithm> = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => vec![
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ],
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            _ => return Err(format!("key {name}: curve not supported")),
        },
        AlgorithmParameters::OctetKeyPair(p) => match p.curve {
            EllipticCurve::Ed25519 => vec![Algorithm::EdDSA],
            _ => return Err(format!("key {name}: curve not supported")),
        },
        AlgorithmParameters::OctetKey(_) => vec![Algorithm::HS256, Algorithm::HS384, Algorithm::HS512],
        _ => return Err(format!("key {name}: key type not supported")),
    };
    let algorithms = match jwk.common.key_algorithm {
        None => by_type,
        Some(named) => {
            let named: Algorithm = named
                .to_string()
                .parse()
                .map_err(|_| format!("key {name}: algorithm {named} is not a signature algorithm"))?;
            if !by_type.contains(&named) {
                return Err(format!("key {name}: algorithm {named:?} does not match its key type"));
            }
            vec![named]
        }
    };
    let decoding = DecodingKey::from_jwk(jwk).map_err(|e| format!("key {name}: {e}"))?;
    Ok(Key { kid, decoding, algorithms })
}

/// Verifies tokens against the current key set, which can be replaced at any time (a refresh,
/// a rotation) without stopping requests in flight.
pub struct Verifier {
    keys: ArcSwap<Keys>,
    expect: Expectations,
}

impl Verifier {
    pub fn new(keys: Keys, expect: Expectations) -> Self {
        Verifier { keys: ArcSwap::from_pointee(keys), expect }
    }

    /// Takes a new key set (requests already verifying keep the old one).
    pub fn replace(&self, keys: Keys) {
        self.keys.store(Arc::new(keys));
    }

    /// Verifies `token` (the part after `Bearer `).
    pub fn verify(&self, token: &str) -> Result<Verified, Refusal> {
        let header = decode_header(token).map_err(|_| Refusal::Malformed)?;
        let keys = self.keys.load();
        let candidates: Vec<&Arc<Key>> = match &header.kid {
            Some(kid) => vec![keys.by_kid.get(kid).ok_or_else(|| Refusal::UnknownKey(kid.clone()))?],
            None => keys.without_kid.iter().collect(),
        };
        if candidates.is_empty() {
            return Err(Refusal::NoKey);
        }
        let mut last = Refusal::NoKey;
        for k in candidates {
            match self.verify_with(token, header.alg, k) {
                Ok(v) => return Ok(v),
                Err(e @ (Refusal::BadSignature | Refusal::AlgorithmNotAllowed { .. })) => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    fn verify_with(&self, token: &str, alg: Algorithm, key: &Key) -> Result<Verified, Refusal> {
        if !key.algorithms.contains(&alg) {
            let kid = key.kid.clone().unwrap_or_default();
            return Err(Refusal::AlgorithmNotAllowed { alg: format!("{alg:?}"), kid });
        }
        let mut v = Validation::new(alg);
        v.leeway = self.expect.leeway.as_secs();
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp", "sub"]);
        if !self.expect.issuers.is_empty() {
            v.set_issuer(&self.expect.issuers);
        }
        if self.expect.audiences.is_empty() {
            v.validate_aud = false;
        } else {
            v.set_audience(&self.expect.audiences);
        }
        let data = decode::<Map<String, Value>>(token, &key.decoding, &v).map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => Refusal::Expired,
            ErrorKind::ImmatureSignature => Refusal::NotYetValid,
            ErrorKind::InvalidIssuer => Refusal::WrongIssuer,
            ErrorKind::InvalidAudience => Refusal::WrongAudience,
            ErrorKind::MissingRequiredClaim(c) => Refusal::MissingClaim(c.clone()),
            ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm | ErrorKind::InvalidKeyFormat => {
                Refusal::BadSignature
            }
            _ => Refusal::Malformed,
        })?;
        let subject = match data.claims.get("sub") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(Refusal::MissingClaim("sub".into())),
        };
        Ok(Verified { subject, claims: data.claims })
    }
}

#[cfg(test)]
mod tests;
