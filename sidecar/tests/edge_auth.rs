//! End users at the edge: a gateway with a JWK Set in front of a market sidecar, mutual TLS
//! between them, real tokens signed here.

use std::{path::Path, time::Duration};

use bytes::Bytes;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode, get_current_timestamp};
use mesh_testkit::{Backend, TestCp, TestSidecar, WAIT, eventually, request, request_full};
use serde_json::{Value, json};
use sidecar::{
    gateway::{
        auth::{AuthMode, EdgeAuthConfig, KeySource},
        jwt::Expectations,
    },
    outbound::route::Route,
};

/// A P-256 signing key and its JWK.
pub fn es256(kid: &str) -> (EncodingKey, Value) {
    let k = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let raw = k.public_key_raw();
    let jwk = json!({"kty": "EC", "crv": "P-256", "kid": kid, "x": mesh_runtime::base64url(&raw[1..33]), "y": mesh_runtime::base64url(&raw[33..65])});
    (EncodingKey::from_ec_der(&k.serialize_der()), jwk)
}

pub fn write_jwks(path: &Path, keys: &[&Value]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, json!({ "keys": keys }).to_string()).unwrap();
    std::fs::rename(tmp, path).unwrap();
}

pub fn token(key: &EncodingKey, kid: &str, sub: &str, exp_in: i64) -> String {
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some(kid.into());
    let now = get_current_timestamp() as i64;
    let claims = json!({"sub": sub, "iss": "https://issuer.test", "aud": "market", "exp": now + exp_in, "roles": ["trader", "admin"]});
    encode(&h, &claims, key).unwrap()
}

/// The gateway trusts the key set in `jwks` for tokens of [`token`]'s issuer and audience.
pub fn auth_config(jwks: &Path) -> EdgeAuthConfig {
    EdgeAuthConfig {
        jwks: KeySource::File(jwks.to_path_buf()),
        expect: Expectations {
            issuers: vec!["https://issuer.test".into()],
            audiences: vec!["market".into()],
            leeway: Duration::from_secs(5),
        },
        default_mode: AuthMode::Optional,
        refresh: Duration::from_secs(3600),
        token_cache: 1000,
    }
}

pub fn seen(body: &str) -> Value {
    serde_json::from_str::<Value>(body).unwrap_or_else(|e| panic!("{e}: {body}"))["headers"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_verified_end_users_reach_the_app_and_only_through_the_gateway() {
    let cp = TestCp::start().await;
    cp.set_policy("market", &mesh_testkit::fast_policy()).await;
    let (app, web_app) = (Backend::start("market").await, Backend::start("web").await);
    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let jwks = dirs[3].path().join("jwks.json");
    let (key1, jwk1) = es256("ec-1");
    write_jwks(&jwks, &[&jwk1]);

    let mut cfg = TestSidecar::config(&cp.url(), "market", "m1", app.addr, dirs[0].path());
    cfg.identity_token = Some(cp.token("market").await);
    let market = TestSidecar::start(cfg).await;
    let routes = vec![
        Route {
            prefix: "/private".into(),
            service: "market".into(),
            auth: Some(AuthMode::Required),
            ..Route::default()
        },
        Route::parse("/=market").unwrap(),
    ];
    let mut cfg = TestSidecar::gateway_config(&cp.url(), routes, dirs[1].path());
    cfg.identity_token = Some(cp.token("gateway").await);
    cfg.edge_auth = Some(auth_config(&jwks));
    let gateway = TestSidecar::start(cfg).await;
    let mut cfg = TestSidecar::config(&cp.url(), "web", "w1", web_app.addr, dirs[2].path());
    cfg.identity_token = Some(cp.token("web").await);
    cfg.upstreams = vec!["market".into()];
    let web = TestSidecar::start(cfg).await;
    let gw = gateway.outbound;
    eventually(WAIT, "the gateway reaches market over mTLS", || async {
        request(gw, "GET", "edge", "/ping", &[], Bytes::new()).await.0 == 200
    })
    .await;

    // A required route without a token: 401 with a challenge, and the app never sees it.
    let before = app.hits();
    let (status, headers, body) = request_full(gw, "GET", "edge", "/private/x", &[], Bytes::new()).await;
    assert_eq!(status, 401, "{body}");
    assert!(headers["www-authenticate"].to_str().unwrap().starts_with("Bearer"));
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["error"], "token_missing", "{body}");
    assert_eq!(app.hits(), before);

    // A verified token: the app gets its subject and roles, whatever the client claims.
    let alice = format!("Bearer {}", token(&key1, "ec-1", "alice", 600));
    let forged =
        [("authorization", alice.as_str()), ("x-mesh-user", "mallory"), ("x-mesh-user-roles", "root")];
    let (status, body) = request(gw, "GET", "edge", "/private/who", &forged, Bytes::new()).await;
    assert_eq!(status, 200, "{body}");
    let h = seen(&body);
    assert_eq!(
        (h["x-mesh-user"].as_str(), h["x-mesh-user-roles"].as_str()),
        (Some("alice"), Some("trader,admin"))
    );

    // An optional route without a token goes on anonymous: the forged identity is dropped.
    let (status, body) =
        request(gw, "GET", "edge", "/who", &[("x-mesh-user", "mallory")], Bytes::new()).await;
    assert_eq!(status, 200, "{body}");
    assert!(seen(&body).get("x-mesh-user").is_none(), "{body}");

    // An opaque bearer credential (the app's own admin token) is the app's to check: it passes.
    let (status, body) =
        request(gw, "GET", "edge", "/who", &[("authorization", "Bearer 0123abcd")], Bytes::new()).await;
    assert_eq!(status, 200, "{body}");
    let h = seen(&body);
    assert_eq!(h["authorization"], "Bearer 0123abcd", "{body}");
    assert!(h.get("x-mesh-user").is_none(), "{body}");
    let (status, _) =
        request(gw, "GET", "edge", "/private/x", &[("authorization", "Bearer 0123abcd")], Bytes::new()).await;
    assert_eq!(status, 401, "a required route takes a JWT only");

    // A bad token is refused with its reason, on optional routes too.
    let expired = format!("Bearer {}", token(&key1, "ec-1", "alice", -120));
    let (status, headers, body) =
        request_full(gw, "GET", "edge", "/who", &[("authorization", &expired)], Bytes::new()).await;
    assert_eq!(status, 401, "{body}");
    assert!(headers["www-authenticate"].to_str().unwrap().contains("invalid_token"));
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["error"], "token_expired", "{body}");
    assert!(!body.contains(&expired[7..]), "the token is never echoed");

    // The key set rotates on disk: a token of the new key is accepted without a restart.
    let (key2, jwk2) = es256("ec-2");
    write_jwks(&jwks, &[&jwk1, &jwk2]);
    let bob = format!("Bearer {}", token(&key2, "ec-2", "bob", 600));
    let (status, body) =
        request(gw, "GET", "edge", "/private/who", &[("authorization", &bob)], Bytes::new()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(seen(&body)["x-mesh-user"], "bob");

    // Idempotency-Key behind the edge: a key is the end user's. Alice's repeat is replayed and
    // her key with another body is 422; an anonymous client's key is left to the app (the
    // gateway speaks for every anonymous client), so both of those reach it.
    let keyed = |auth: Option<&str>, body: &'static str| {
        let auth = auth.map(str::to_string);
        async move {
            let mut h = vec![("idempotency-key", "k-1")];
            if let Some(a) = &auth {
                h.push(("authorization", a.as_str()));
            }
            request(gw, "POST", "edge", "/orders", &h, Bytes::from_static(body.as_bytes())).await.0
        }
    };
    let before = app.hits();
    assert_eq!(keyed(Some(&alice), "a").await, 200);
    assert_eq!(keyed(Some(&alice), "a").await, 200);
    assert_eq!(app.hits() - before, 1, "alice's repeat is a replay");
    assert_eq!(keyed(Some(&alice), "b").await, 422, "her key with another body");
    assert_eq!(keyed(None, "a").await, 200);
    assert_eq!(keyed(None, "b").await, 200, "anonymous keys are not shared between clients");
    assert_eq!(app.hits() - before, 3);

    // Another mesh service cannot speak for an end user: only the gateway is a trusted edge.
    let (status, body) =
        request(web.outbound, "GET", "market", "/who", &[("x-mesh-user", "alice")], Bytes::new()).await;
    assert_eq!(status, 200, "{body}");
    let h = seen(&body);
    assert!(h.get("x-mesh-user").is_none(), "{body}");
    assert_eq!(h["x-mesh-caller"], "spiffe://mesh.local/service/web");
    drop((market, gateway, web));
}

/// Keys from an identity provider's URL: fetched at start, again for a key id the gateway does
/// not know (a rotation), and kept when the provider is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_come_from_a_jwks_url_rotate_on_an_unknown_kid_and_survive_the_provider_going_down() {
    use std::sync::{Arc, Mutex};
    let cp = TestCp::start().await;
    cp.set_policy("market", &mesh_testkit::fast_policy()).await;
    let app = Backend::start("market").await;
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut cfg = TestSidecar::config(&cp.url(), "market", "m1", app.addr, dirs[0].path());
    cfg.identity_token = Some(cp.token("market").await);
    let _market = TestSidecar::start(cfg).await;

    // The identity provider: its JWK Set at /.well-known/jwks.json.
    let (key1, jwk1) = es256("idp-1");
    let (key2, jwk2) = es256("idp-2");
    let served = Arc::new(Mutex::new(json!({ "keys": [jwk1] }).to_string()));
    let fetches = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let idp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let idp_addr = idp.local_addr().unwrap();
    let stop_idp = tokio_util::sync::CancellationToken::new();
    let router = axum::Router::new().route(
        "/.well-known/jwks.json",
        axum::routing::get({
            let (served, fetches) = (served.clone(), fetches.clone());
            move || async move {
                fetches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                served.lock().unwrap().clone()
            }
        }),
    );
    let idp_task = tokio::spawn({
        let stop = stop_idp.clone();
        async move {
            axum::serve(idp, router).with_graceful_shutdown(stop.cancelled_owned()).await.unwrap();
        }
    });

    let mut cfg =
        TestSidecar::gateway_config(&cp.url(), vec![Route::parse("/=market").unwrap()], dirs[1].path());
    cfg.edge_auth = Some(EdgeAuthConfig {
        jwks: KeySource::Url { url: format!("http://{idp_addr}/.well-known/jwks.json"), ca_file: None },
        ..auth_config(Path::new("unused"))
    });
    cfg.identity_token = Some(cp.token("gateway").await);
    let gateway = TestSidecar::start(cfg).await;
    let gw = gateway.outbound;
    let call = |t: String| async move {
        let bearer = format!("Bearer {t}");
        request(gw, "GET", "edge", "/who", &[("authorization", bearer.as_str())], Bytes::new()).await
    };
    eventually(WAIT, "a token of the provider's key is verified", || async {
        call(token(&key1, "idp-1", "alice", 600)).await.0 == 200
    })
    .await;
    assert_eq!(seen(&call(token(&key1, "idp-1", "alice", 600)).await.1)["x-mesh-user"], "alice");

    // The provider rotates: a token of its new key is verified after one fetch.
    *served.lock().unwrap() = json!({ "keys": [jwk1, jwk2] }).to_string();
    let before = fetches.load(std::sync::atomic::Ordering::Relaxed);
    let (status, body) = call(token(&key2, "idp-2", "bob", 600)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(seen(&body)["x-mesh-user"], "bob");
    assert_eq!(
        fetches.load(std::sync::atomic::Ordering::Relaxed),
        before + 1,
        "one fetch for the unknown kid"
    );
    // An unknown key id cannot make the gateway fetch more than once a second.
    let (forged_key, _) = es256("nobody");
    for _ in 0..5 {
        assert_eq!(call(token(&forged_key, "nobody", "mallory", 600)).await.0, 401);
    }
    assert!(fetches.load(std::sync::atomic::Ordering::Relaxed) <= before + 2, "fetches are rate-limited");

    // The provider goes down: the keys in use stay.
    stop_idp.cancel();
    idp_task.await.unwrap();
    assert_eq!(call(token(&key2, "idp-2", "bob", 600)).await.0, 200);
    assert_eq!(call(token(&forged_key, "nobody", "mallory", 600)).await.0, 401);
}
