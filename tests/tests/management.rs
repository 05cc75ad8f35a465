//! The control plane's JSON management API against `meshctl up`'s mesh: every operation its
//! OpenAPI document lists answers the admin token (and its documented status), refuses no token
//! (401) and another token (403) with a JSON body, and bad input gets a 4xx naming the problem;
//! the document passes openapi-spec-validator.

use std::net::SocketAddr;

use mesh_testkit::{WAIT, eventually, request_full};
use serde_json::{Value, json};

use crate::local::LocalMesh;

pub fn admin_listener(mesh: &LocalMesh) -> SocketAddr {
    mesh.ready["listeners"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["what"].as_str().is_some_and(|w| w.contains("/api/v1")))
        .filter_map(|l| l["address"].as_str())
        .find(|a| a.ends_with("/metrics"))
        .map(|a| a.trim_start_matches("http://").trim_end_matches("/metrics").parse().unwrap())
        .unwrap_or_else(|| panic!("the control plane's admin listener in {}", mesh.ready))
}

async fn call(addr: SocketAddr, method: &str, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("authorization", a.as_str()));
    }
    let body = if body.is_null() { Default::default() } else { body.to_string().into() };
    let (status, h, text) = request_full(addr, method, "cp", path, &headers, body).await;
    if status >= 400 {
        let kind = h.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
        assert!(kind.contains("json"), "{method} {path}: a {status} is JSON ({kind}): {text}");
    }
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn every_management_endpoint_answers_the_admin_and_only_the_admin() {
    let mesh = tokio::task::block_in_place(|| LocalMesh::start(&[("MESH_EDGE_REPORT_INTERVAL", "200ms")]));
    let cp = admin_listener(&mesh);
    let token = std::fs::read_to_string(mesh.state.join("control-plane/admin.token")).unwrap();
    let token = token.trim();
    eventually(WAIT, "both market service instances are registered and healthy", || async {
        let (_, s) = call(cp, "GET", "/api/v1/services", Some(token), Value::Null).await;
        s["services"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| s["name"] == "market-service" && s["healthy"] == 2)
    })
    .await;

    // The description: open, valid, and every operation in it served.
    let (status, doc) = call(cp, "GET", "/api/v1/openapi.json", None, Value::Null).await;
    assert_eq!(status, 200);
    if let Some(validator) = crate::deploy::validator("openapi-spec-validator") {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), doc.to_string()).unwrap();
        let out = std::process::Command::new(validator).arg(file.path()).output().unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let policy = json!({"retry": {"max_attempts": 2}, "tracing": {"sampling": 0.5}});
    let event = json!({"id": "ops-1", "type": "Announced", "subject": "all", "data": {"text": "hello"}});
    let mut operations = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let concrete = path.replace("{service}", "market-service").replace("{topic}", "ops");
            let url = format!("/api/v1{concrete}");
            let method = method.to_uppercase();
            let body = match (method.as_str(), path.as_str()) {
                ("PUT", _) => policy.clone(),
                ("POST", "/call/{service}") => json!({"path": "/markets"}),
                ("POST", _) => event.clone(),
                _ => Value::Null,
            };
            let documented: Vec<u16> =
                op["responses"].as_object().unwrap().keys().filter_map(|k| k.parse().ok()).collect();
            // The live feeds never end: tests/tests/dashboard.rs reads them in a browser.
            if !(path.ends_with("/tail") || path == "/stream") {
                let (status, answer) = call(cp, &method, &url, Some(token), body.clone()).await;
                assert!(
                    (200..300).contains(&status) && documented.contains(&status),
                    "{method} {url}: {status} {answer} (documented {documented:?})"
                );
            }
            operations += 1;
            if path == "/openapi.json" {
                continue;
            }
            let (status, answer) = call(cp, &method, &url, None, body.clone()).await;
            assert_eq!((status, answer["error"].as_str()), (401, Some("unauthenticated")), "{method} {url}");
            let (status, answer) = call(cp, &method, &url, Some("not-the-admin-token"), body).await;
            assert_eq!((status, answer["error"].as_str()), (403, Some("forbidden")), "{method} {url}");
        }
    }
    assert_eq!(operations, 17, "every operation of the document was called");

    // What the calls did: the policy stored (and its change named), the event on the bus.
    let (_, p) = call(cp, "GET", "/api/v1/policies/market-service", Some(token), Value::Null).await;
    assert_eq!(
        (p["is_default"].as_bool(), p["policy"]["retry"]["max_attempts"].as_u64()),
        (Some(false), Some(2)),
        "{p}"
    );
    let (status, _) = call(cp, "DELETE", "/api/v1/policies/market-service", Some(token), Value::Null).await;
    assert_eq!(status, 200);
    let (status, set) = call(cp, "PUT", "/api/v1/policies/market-service", Some(token), policy.clone()).await;
    assert_eq!(status, 200, "{set}");
    assert!(set["changes"].as_array().unwrap().iter().any(|c| c["field"] == "retry.max_attempts"), "{set}");
    assert_eq!(set["policy"]["policy"]["tracing"]["sampling"], 0.5);
    // On demand: each instance's sidecar probed its app just now.
    let (status, checked) =
        call(cp, "POST", "/api/v1/services/market-service/check", Some(token), Value::Null).await;
    assert_eq!(status, 200, "{checked}");
    let instances = checked["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 2, "{checked}");
    for i in instances {
        assert_eq!((i["healthy"].as_bool(), i["status"].as_u64()), (Some(true), Some(200)), "{checked}");
        assert!(i["latency_ms"].as_f64().unwrap() > 0.0, "{checked}");
    }
    let one = format!(
        "/api/v1/services/market-service/check?instance={}",
        instances[0]["instance_id"].as_str().unwrap()
    );
    let (status, checked) = call(cp, "POST", &one, Some(token), Value::Null).await;
    assert_eq!((status, checked["instances"].as_array().map(Vec::len)), (200, Some(1)), "{checked}");
    let (status, answer) =
        call(cp, "POST", "/api/v1/services/market-service/check?instance=nobody", Some(token), Value::Null)
            .await;
    assert_eq!((status, answer["error"].as_str()), (404, Some("not_found")), "{answer}");
    // An operator's call goes out through the gateway, with its identity and the policy.
    let (status, answer) =
        call(cp, "POST", "/api/v1/call/market-service", Some(token), json!({"path": "/markets?limit=1"}))
            .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        (answer["via"].as_str(), answer["status"].as_u64(), answer["attempts"].as_u64()),
        (Some("gateway"), Some(200), Some(1)),
        "{answer}"
    );
    assert!(answer["endpoint"].as_str().unwrap().starts_with("market-service-"), "{answer}");
    assert!(answer["body"].as_str().unwrap().contains("markets"), "{answer}");
    // It cannot pose as an end user: the mesh's headers are not taken from the call.
    let forged =
        json!({"method": "POST", "path": "/accounts", "headers": {"x-mesh-user": "alice"}, "body": "{}"});
    let (status, answer) = call(cp, "POST", "/api/v1/call/market-service", Some(token), forged).await;
    assert_eq!((status, answer["status"].as_u64()), (200, Some(401)), "{answer}");
    let (status, answer) =
        call(cp, "POST", "/api/v1/call/market-service?via=nobody", Some(token), json!({"path": "/"})).await;
    assert_eq!((status, answer["error"].as_str()), (503, Some("unavailable")), "{answer}");
    let (_, events) = call(cp, "GET", "/api/v1/events/ops?from=0", Some(token), Value::Null).await;
    assert_eq!(events["events"][0]["id"], "ops-1", "{events}");
    assert_eq!(events["events"][0]["data"]["text"], "hello", "{events}");

    // Bad input: 4xx with a JSON body that names the problem.
    let version = set["policy"]["version"].as_u64().unwrap();
    let stale = format!("/api/v1/policies/market-service?expected_version={}", version - 1);
    let (status, answer) = call(cp, "PUT", &stale, Some(token), policy).await;
    assert_eq!(status, 412, "{answer}");
    let bad = [
        ("PUT", "/api/v1/policies/market-service", json!({"retry": {"max_attempts": "three"}})),
        ("PUT", "/api/v1/policies/market-service", json!({"no_such_field": 1})),
        ("PUT", "/api/v1/policies/market-service", json!({"tracing": {"sampling": 2}})),
        ("PUT", "/api/v1/policies/Not_A_Service", json!({})),
        ("POST", "/api/v1/events/ops", json!({"id": "x"})),
        ("GET", "/api/v1/events/ops?from=minus-one", Value::Null),
        ("GET", "/api/v1/proxies?color=blue", Value::Null),
        ("POST", "/api/v1/call/market-service", json!({"method": "GET"})),
        ("POST", "/api/v1/call/market-service", json!({"path": "no-slash"})),
        ("POST", "/api/v1/call/market-service", json!({"path": "/", "method": "G E T"})),
    ];
    for (method, path, body) in bad {
        let (status, answer) = call(cp, method, path, Some(token), body).await;
        assert_eq!(status, 400, "{method} {path}: {answer}");
        assert!(!answer["message"].as_str().unwrap_or_default().is_empty(), "{method} {path}: {answer}");
    }
    let (status, answer) =
        call(cp, "GET", "/api/v1/services/no-such-service", Some(token), Value::Null).await;
    assert_eq!((status, answer["error"].as_str()), (404, Some("not_found")), "{answer}");
    let (status, answer) = call(cp, "GET", "/api/v1/nothing-here", Some(token), Value::Null).await;
    assert_eq!((status, answer["error"].as_str()), (404, Some("not_found")));
    let (status, answer) = call(cp, "PATCH", "/api/v1/topology", Some(token), Value::Null).await;
    assert_eq!((status, answer["error"].as_str()), (405, Some("method_not_allowed")));
    let (status, _) = call(cp, "GET", "/healthz", None, Value::Null).await;
    assert_eq!(status, 200, "/healthz stays open");
}
