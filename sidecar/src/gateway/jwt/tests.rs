use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::json;

use super::*;

/// A 2048-bit RSA key made for these tests (PKCS#1 DER), and its public half as JWK parameters.
const RSA_DER: &[u8] = include_bytes!("testdata/rsa-2048.der");
const RSA_N: &str = "s5gkrSPkmccypsv_VIjzbqgJI4t83cJddOKgsbr0JfQW-4fFoSTrOCGWq95SiZ7EEvQlugE5vOTXUF28cir80YVR027cMS0oKAB9Tg4eZ_28Q_PIMxnQbOReeFTfJo8T2b7IF3nKTYIKUEpAhRU6Z_sEC2YaQ04kbs2_C4WZx-3CoahTtac0DoGQHe73bheOGimM1wuiE0EgMnjaSpN3ffRPAj-OtuGo_QSJAGPvV90Vv3B4ts5VquU9DA16h-qNk63IvbML8r7q9XBdmMxwV01kg1QhQk4w51CPsfuggEpWtFX7kmA54oYQUSbkwKgP62VGlUc8OLo087-dY39SLw";
const SECRET: &[u8] = b"a-shared-secret-of-at-least-32-bytes!!";

/// Keys of every kind, each with its signing half.
struct Signers {
    es256: (EncodingKey, Value),
    eddsa: (EncodingKey, Value),
}

fn signers() -> Signers {
    let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let raw = ec.public_key_raw();
    let es256 = (
        EncodingKey::from_ec_der(&ec.serialize_der()),
        json!({"kty": "EC", "crv": "P-256", "kid": "ec-1", "x": mesh_runtime::base64url(&raw[1..33]), "y": mesh_runtime::base64url(&raw[33..65])}),
    );
    let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let eddsa = (
        EncodingKey::from_ed_der(&ed.serialize_der()),
        json!({"kty": "OKP", "crv": "Ed25519", "kid": "ed-1", "x": mesh_runtime::base64url(ed.public_key_raw())}),
    );
    Signers { es256, eddsa }
}

fn jwks(extra: &[Value]) -> String {
    let mut keys = vec![
        json!({"kty": "RSA", "kid": "rsa-1", "alg": "RS256", "use": "sig", "n": RSA_N, "e": "AQAB"}),
        json!({"kty": "oct", "kid": "hs-1", "k": mesh_runtime::base64url(SECRET)}),
    ];
    keys.extend_from_slice(extra);
    json!({ "keys": keys }).to_string()
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn claims(sub: &str) -> Value {
    json!({"sub": sub, "iss": "https://issuer.test", "aud": "market", "exp": now() + 600, "iat": now(), "role": "trader"})
}

fn token(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_string);
    encode(&h, claims, key).unwrap()
}

fn verifier(s: &Signers) -> Verifier {
    let keys = Keys::from_json(&jwks(&[s.es256.1.clone(), s.eddsa.1.clone()])).unwrap();
    let expect = Expectations {
        issuers: vec!["https://issuer.test".into()],
        audiences: vec!["market".into()],
        leeway: Duration::from_secs(5),
    };
    Verifier::new(keys, expect)
}

#[test]
fn every_supported_algorithm_verifies_and_yields_the_subject_and_claims() {
    let s = signers();
    let v = verifier(&s);
    let rsa = EncodingKey::from_rsa_der(RSA_DER);
    for (alg, kid, key) in [
        (Algorithm::RS256, "rsa-1", &rsa),
        (Algorithm::ES256, "ec-1", &s.es256.0),
        (Algorithm::EdDSA, "ed-1", &s.eddsa.0),
        (Algorithm::HS256, "hs-1", &EncodingKey::from_secret(SECRET)),
    ] {
        let got = v
            .verify(&token(alg, Some(kid), key, &claims("alice")))
            .unwrap_or_else(|e| panic!("{alg:?}: {e}"));
        assert_eq!(got.subject, "alice");
        assert_eq!(got.claims["role"], "trader");
    }
}

#[test]
fn each_bad_token_is_refused_with_its_reason() {
    let s = signers();
    let v = verifier(&s);
    let es = |c: &Value| token(Algorithm::ES256, Some("ec-1"), &s.es256.0, c);
    let mut c = claims("alice");
    c["exp"] = json!(now() - 120);
    assert_eq!(v.verify(&es(&c)), Err(Refusal::Expired));
    let mut c = claims("alice");
    c["nbf"] = json!(now() + 120);
    assert_eq!(v.verify(&es(&c)), Err(Refusal::NotYetValid));
    let mut c = claims("alice");
    c["iss"] = json!("https://elsewhere.test");
    assert_eq!(v.verify(&es(&c)), Err(Refusal::WrongIssuer));
    let mut c = claims("alice");
    c["aud"] = json!("billing");
    assert_eq!(v.verify(&es(&c)), Err(Refusal::WrongAudience));
    let mut c = claims("alice");
    c.as_object_mut().unwrap().remove("exp");
    assert_eq!(v.verify(&es(&c)), Err(Refusal::MissingClaim("exp".into())));
    let mut c = claims("alice");
    c.as_object_mut().unwrap().remove("sub");
    assert_eq!(v.verify(&es(&c)), Err(Refusal::MissingClaim("sub".into())));
    // Within the leeway an expired token still passes.
    let mut c = claims("alice");
    c["exp"] = json!(now() - 2);
    assert!(v.verify(&es(&c)).is_ok());

    // Signed by another key that claims the same kid.
    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let forged = token(
        Algorithm::ES256,
        Some("ec-1"),
        &EncodingKey::from_ec_der(&other.serialize_der()),
        &claims("alice"),
    );
    assert_eq!(v.verify(&forged), Err(Refusal::BadSignature));
    // A tampered payload.
    let good = es(&claims("alice"));
    let parts: Vec<&str> = good.split('.').collect();
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        mesh_runtime::base64url(claims("mallory").to_string().as_bytes()),
        parts[2]
    );
    assert_eq!(v.verify(&tampered), Err(Refusal::BadSignature));
    assert_eq!(
        v.verify(&token(Algorithm::ES256, Some("nobody"), &s.es256.0, &claims("alice"))),
        Err(Refusal::UnknownKey("nobody".into()))
    );
    assert_eq!(v.verify("not.a.jwt"), Err(Refusal::Malformed));
    assert_eq!(v.verify(""), Err(Refusal::Malformed));
}

#[test]
fn alg_none_and_algorithm_confusion_are_refused() {
    let s = signers();
    let v = verifier(&s);
    // `alg: none`, no signature.
    let none = format!(
        "{}.{}.",
        mesh_runtime::base64url(br#"{"alg":"none","typ":"JWT","kid":"rsa-1"}"#),
        mesh_runtime::base64url(claims("alice").to_string().as_bytes())
    );
    assert_eq!(v.verify(&none), Err(Refusal::Malformed));
    // HS256 "signed" with the RSA key's public parameters as the shared secret.
    let public_as_secret = EncodingKey::from_secret(RSA_N.as_bytes());
    let confused = token(Algorithm::HS256, Some("rsa-1"), &public_as_secret, &claims("alice"));
    assert_eq!(
        v.verify(&confused),
        Err(Refusal::AlgorithmNotAllowed { alg: "HS256".into(), kid: "rsa-1".into() })
    );
    // A key whose JWK names RS256 accepts no other RSA algorithm either.
    let ps = token(Algorithm::PS256, Some("rsa-1"), &EncodingKey::from_rsa_der(RSA_DER), &claims("alice"));
    assert!(matches!(v.verify(&ps), Err(Refusal::AlgorithmNotAllowed { .. })));
}

#[test]
fn a_rotated_key_set_takes_over_without_a_restart() {
    let s = signers();
    let v = verifier(&s);
    let new = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let raw = new.public_key_raw();
    let jwk = json!({"kty": "EC", "crv": "P-256", "kid": "ec-2", "x": mesh_runtime::base64url(&raw[1..33]), "y": mesh_runtime::base64url(&raw[33..65])});
    let t = token(
        Algorithm::ES256,
        Some("ec-2"),
        &EncodingKey::from_ec_der(&new.serialize_der()),
        &claims("bob"),
    );
    assert_eq!(v.verify(&t), Err(Refusal::UnknownKey("ec-2".into())));
    v.replace(Keys::from_json(&jwks(&[jwk])).unwrap());
    assert_eq!(v.verify(&t).unwrap().subject, "bob");
    // The old EC key left the set with the rotation.
    let old = token(Algorithm::ES256, Some("ec-1"), &s.es256.0, &claims("bob"));
    assert_eq!(v.verify(&old), Err(Refusal::UnknownKey("ec-1".into())));
}

#[test]
fn key_sets_without_a_usable_key_are_refused_and_refusals_say_what_was_wrong() {
    assert!(Keys::from_json("{}").unwrap_err().contains("JWK Set"));
    let enc_only = json!({"keys": [{"kty": "RSA", "kid": "e", "use": "enc", "n": RSA_N, "e": "AQAB"}]});
    assert!(Keys::from_json(&enc_only.to_string()).unwrap_err().contains("no usable signing key"));
    let mismatched = json!({"keys": [{"kty": "RSA", "kid": "m", "alg": "ES256", "n": RSA_N, "e": "AQAB"}]});
    assert!(Keys::from_json(&mismatched.to_string()).unwrap_err().contains("does not match its key type"));
    let r = Refusal::UnknownKey("k9".into());
    assert!(r.www_authenticate().starts_with("Bearer error=\"invalid_token\""));
    assert_eq!(r.code(), "token_unknown_key");
}
