//! `meshctl` end to end: the real binary against a real control plane process.

use std::{
    io::Write,
    process::{Command, Output},
    time::Duration,
};

use mesh_proto::v1::{self, registry_client::RegistryClient};
use mesh_testkit::{CpProcess, bin, channel, instance};

fn meshctl(url: &str, args: &[&str]) -> Output {
    Command::new(bin("meshctl")).arg("--control-plane").arg(url).args(args).output().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "meshctl failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// Fails with exactly one line on stderr and returns it.
fn fails(out: &Output) -> String {
    assert!(!out.status.success(), "expected failure, got: {}", String::from_utf8_lossy(&out.stdout));
    let err = String::from_utf8(out.stderr.clone()).unwrap();
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err:?}");
    err
}

fn policy_file(dir: &tempfile::TempDir, name: &str, body: &str) -> String {
    let path = dir.path().join(name);
    std::fs::File::create(&path).unwrap().write_all(body.as_bytes()).unwrap();
    path.display().to_string()
}

#[tokio::test]
async fn services_instances_overview_and_stats() {
    let dir = tempfile::tempdir().unwrap();
    let cp = CpProcess::start(dir.path());
    let mut reg = RegistryClient::new(channel(cp.grpc).await);
    for (id, port) in [("m1", 9001), ("m2", 9002)] {
        reg.register(v1::RegisterRequest { instance: Some(instance("market-service", id, port)) })
            .await
            .unwrap();
    }
    let url = cp.url();

    let table = ok(&meshctl(&url, &["services"]));
    assert!(table.starts_with("SERVICE"), "{table}");
    assert!(
        table.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["market-service", "2", "2", "0"]),
        "{table}"
    );

    let js: serde_json::Value =
        serde_json::from_str(&ok(&meshctl(&url, &["-o", "json", "instances", "market-service"]))).unwrap();
    assert_eq!(js.as_array().unwrap().len(), 2);
    assert_eq!(js[0]["id"], "m1");
    assert_eq!(js[0]["address"], "127.0.0.1:9001");
    assert_eq!(js[0]["health"], "healthy");

    let err = fails(&meshctl(&url, &["instances", "nobody"]));
    assert!(err.contains("not found") && err.contains("nobody"), "{err}");

    let o: serde_json::Value =
        serde_json::from_str(&ok(&meshctl(&url, &["overview", "-o", "json"]))).unwrap();
    assert_eq!((o["services"].as_u64(), o["instances"].as_u64()), (Some(1), Some(2)));
    let s: serde_json::Value = serde_json::from_str(&ok(&meshctl(&url, &["stats", "-o", "json"]))).unwrap();
    assert_eq!(s["registrations_total"], 2);
    assert!(ok(&meshctl(&url, &["overview"])).contains("healthy_instances"));
}

#[tokio::test]
async fn policy_get_set_diff_delete_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let cp = CpProcess::start(dir.path());
    let url = cp.url();
    let good = policy_file(
        &dir,
        "good.yaml",
        "load_balancer:\n  algorithm: round_robin\nretry:\n  max_attempts: 2\n",
    );

    let get = ok(&meshctl(&url, &["policy", "get", "market-service"]));
    assert!(get.starts_with("# market-service policy version 0 (defaults)"), "{get}");
    assert!(get.contains("algorithm: p2c_peak_ewma"));

    let diff = ok(&meshctl(&url, &["policy", "diff", "market-service", "-f", &good]));
    assert!(diff.contains("load_balancer.algorithm") && diff.contains("round_robin"), "{diff}");
    assert!(diff.contains("retry.max_attempts"));

    let dry = ok(&meshctl(&url, &["policy", "set", "market-service", "-f", &good, "--dry-run"]));
    assert!(dry.starts_with("dry run"), "{dry}");
    let set = ok(&meshctl(&url, &["policy", "set", "market-service", "-f", &good]));
    assert!(set.contains("version 1"), "{set}");
    let js: serde_json::Value =
        serde_json::from_str(&ok(&meshctl(&url, &["-o", "json", "policy", "get", "market-service"])))
            .unwrap();
    assert_eq!((js["version"].as_u64(), js["policy"]["retry"]["max_attempts"].as_u64()), (Some(1), Some(2)));
    assert_eq!(ok(&meshctl(&url, &["policy", "diff", "market-service", "-f", &good])).trim(), "no changes");

    // JSON files work too.
    let json = policy_file(&dir, "p.json", r#"{"timeout": {"request": "2s"}}"#);
    assert!(ok(&meshctl(&url, &["policy", "set", "market-service", "-f", &json])).contains("version 2"));

    // Refusals: one line naming the field; nothing changes.
    let bad = policy_file(&dir, "bad.yaml", "retry:\n  max_attempts: 50\n");
    let err = fails(&meshctl(&url, &["policy", "set", "market-service", "-f", &bad]));
    assert!(err.contains("retry.max_attempts"), "{err}");
    let typo = policy_file(&dir, "typo.yaml", "retry:\n  max_attemps: 5\n");
    let err = fails(&meshctl(&url, &["policy", "set", "market-service", "-f", &typo]));
    assert!(err.contains("max_attemps"), "{err}");
    let err =
        fails(&meshctl(&url, &["policy", "set", "market-service", "-f", &good, "--expected-version", "1"]));
    assert!(err.contains("failed precondition") && err.contains("version 2"), "{err}");
    let err = fails(&meshctl(&url, &["policy", "get", "Bad_Name"]));
    assert!(err.contains("invalid argument"), "{err}");
    let err = fails(&meshctl(&url, &["policy", "set", "market-service", "-f", "/no/such/file.yaml"]));
    assert!(err.contains("/no/such/file.yaml"), "{err}");
    let js: serde_json::Value =
        serde_json::from_str(&ok(&meshctl(&url, &["-o", "json", "policy", "get", "market-service"])))
            .unwrap();
    assert_eq!(js["version"], 2);

    assert!(ok(&meshctl(&url, &["policy", "list"])).contains("market-service"));
    assert!(ok(&meshctl(&url, &["policy", "delete", "market-service"])).contains("version 3"));
    assert!(
        ok(&meshctl(&url, &["policy", "delete", "market-service"])).contains("already runs on the defaults")
    );
}

#[tokio::test]
async fn proxy_status_shows_connected_proxies() {
    use futures::StreamExt;
    use v1::policy_stream_request::Kind;
    let dir = tempfile::tempdir().unwrap();
    let cp = CpProcess::start(dir.path());
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(v1::PolicyStreamRequest {
        kind: Some(Kind::Subscribe(v1::PolicySubscribe {
            node_id: "market-1".into(),
            service: "market-service".into(),
            services: vec!["market-service".into()],
        })),
    })
    .await
    .unwrap();
    let mut pushes = v1::policy_client::PolicyClient::new(channel(cp.grpc).await)
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let p = pushes.next().await.unwrap().unwrap();
    tx.send(v1::PolicyStreamRequest {
        kind: Some(Kind::Ack(v1::PolicyAck { service: p.service, version: p.version, nonce: p.nonce })),
    })
    .await
    .unwrap();
    let url = cp.url();
    mesh_testkit::eventually(Duration::from_secs(10), "proxy-status lists the synced proxy", || {
        let url = url.clone();
        async move {
            let out = ok(&meshctl(&url, &["proxy-status"]));
            out.lines().any(|l| l.starts_with("market-1") && l.contains("SYNCED"))
        }
    })
    .await;
}

#[test]
fn an_unreachable_control_plane_is_one_line_naming_the_address() {
    // Bind then drop a listener: that port refuses connections.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let err = fails(&meshctl(&url, &["services"]));
    assert!(err.contains(&url) && err.contains("cannot reach"), "{err}");
    let err = fails(&meshctl("not a url", &["services"]));
    assert!(err.contains("not a URL"), "{err}");
}

#[tokio::test]
async fn events_publish_replay_and_tail_with_a_group() {
    let dir = tempfile::tempdir().unwrap();
    let cp = CpProcess::start(dir.path());
    let url = cp.url();
    assert!(
        ok(&meshctl(
            &url,
            &["events", "publish", "markets", "--id", "e1", "--key", "m1", "--data", r#"{"n":1}"#]
        ))
        .contains("offset 0")
    );
    assert!(
        ok(&meshctl(&url, &["events", "publish", "markets", "--id", "e1", "--data", "{}"]))
            .contains("duplicate")
    );
    ok(&meshctl(&url, &["events", "publish", "markets", "--id", "e2", "--data", r#"{"n":2}"#]));
    let lines: Vec<serde_json::Value> = ok(&meshctl(&url, &["-o", "json", "events", "replay", "markets"]))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.iter().map(|v| v["id"].as_str().unwrap()).collect::<Vec<_>>(), ["e1", "e2"]);
    assert_eq!(lines[0]["data"]["n"], 1);
    assert_eq!(
        (lines[0]["specversion"].as_str(), lines[0]["offset"].as_u64()),
        (Some("1.0"), Some(0)),
        "CloudEvents JSON"
    );
    // A group resumes where it committed.
    let first = ok(&meshctl(&url, &["events", "tail", "markets", "--group", "g", "--count", "1"]));
    let second = ok(&meshctl(&url, &["events", "tail", "markets", "--group", "g", "--count", "1"]));
    assert!(first.contains("e1") && second.contains("e2"), "{first} / {second}");
    let err = fails(&meshctl(&url, &["events", "publish", "Bad Topic"]));
    assert!(err.contains("topic"), "{err}");
    // --from-time takes RFC 3339 (or Unix ms) and says what it wants otherwise.
    let since = ok(&meshctl(&url, &["events", "replay", "markets", "--from-time", "2000-01-01T00:00:00Z"]));
    assert!(since.contains("e1") && since.contains("e2"), "{since}");
    let future = ok(&meshctl(&url, &["events", "replay", "markets", "--from-time", "2999-01-01T00:00:00Z"]));
    assert!(!future.contains("e1"), "{future}");
    // (A flag that does not parse is clap's usage error, several lines.)
    let bad = meshctl(&url, &["events", "replay", "markets", "--from-time", "yesterday"]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("RFC 3339"), "{err}");
}

#[tokio::test]
async fn identity_tokens_are_created_once_revoked_and_the_bundle_is_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let cp = CpProcess::start(dir.path());
    let url = cp.url();
    let token = ok(&meshctl(&url, &["identity", "token", "create", "market"]));
    assert!(token.trim().len() == 64 && token.trim().chars().all(|c| c.is_ascii_hexdigit()), "{token}");
    let bundle = ok(&meshctl(&url, &["identity", "bundle"]));
    assert!(
        bundle.contains("# trust domain: mesh.local") && bundle.contains("BEGIN CERTIFICATE"),
        "{bundle}"
    );
    assert!(!bundle.contains("PRIVATE KEY"));
    assert!(ok(&meshctl(&url, &["identity", "token", "revoke", "market"])).contains("revoked 1"));
    let err = fails(&meshctl(&url, &["identity", "token", "create", "Bad Name"]));
    assert!(err.contains("service"), "{err}");
}

#[tokio::test]
async fn against_the_default_tls_api_meshctl_needs_the_root_and_the_admin_token() {
    let dir = tempfile::tempdir().unwrap();
    let cp = CpProcess::start_secure(dir.path());
    let url = cp.url();
    assert!(url.starts_with("https://"), "{url}");
    let (ca, token) = (dir.path().join("ca.pem"), dir.path().join("admin.token"));
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&token).unwrap().permissions());
    assert_eq!(mode & 0o077, 0, "the admin token is readable by its owner only");
    let (ca, token) = (ca.display().to_string(), token.display().to_string());
    let missing = dir.path().join("none").display().to_string();
    let with = |ca: &str, token: &str, args: &[&str]| {
        let mut all = vec!["--ca-file", ca, "--admin-token-file", token];
        all.extend_from_slice(args);
        meshctl(&url, &all)
    };

    // With both: the whole API.
    assert!(ok(&with(&ca, &token, &["services"])).starts_with("SERVICE"));
    let file = policy_file(&dir, "p.yaml", "timeout:\n  request: 2s\n");
    assert!(ok(&with(&ca, &token, &["policy", "set", "market-service", "-f", &file])).contains("version 1"));
    ok(&with(&ca, &token, &["identity", "token", "create", "market-service"]));

    // Without the admin token: refused, nothing changed.
    let err = fails(&with(&ca, &missing, &["policy", "set", "market-service", "-f", &file]));
    assert!(err.contains("unauthenticated") && err.contains("admin token"), "{err}");
    let err = fails(&with(&ca, &missing, &["identity", "token", "create", "payments"]));
    assert!(err.contains("unauthenticated"), "{err}");
    let got: serde_json::Value =
        serde_json::from_str(&ok(&with(&ca, &token, &["-o", "json", "policy", "get", "market-service"])))
            .unwrap();
    assert_eq!(got["version"], 1, "{got}");

    // Without the root: it says which flag is missing; plaintext to the TLS port gets nowhere.
    let err = fails(&with(&missing, &token, &["services"]));
    assert!(err.contains("--ca-file"), "{err}");
    let plain = format!("http://{}", cp.grpc);
    let err = fails(&meshctl(&plain, &["--admin-token-file", &token, "services"]));
    assert!(err.contains("cannot reach") || err.contains("unavailable"), "{err}");
}

/// Issue #15.13: `policy set --merge` changes only the fields the file names; plain `set`
/// (the negative control) puts the others back to their defaults.
#[tokio::test]
async fn policy_set_merge_keeps_the_fields_the_file_leaves_out() {
    let dir = tempfile::tempdir().unwrap();
    let cp = CpProcess::start(dir.path());
    let url = cp.url();
    let cache = policy_file(
        &dir,
        "cache.yaml",
        "cache: { ttl: 30s, path_prefixes: [/markets/], invalidate_on: [{ topic: market-events, prefix: \"/markets/{key}\" }] }\n",
    );
    ok(&meshctl(&url, &["policy", "set", "market-service", "-f", &cache]));
    let lb =
        policy_file(&dir, "lb.yaml", "load_balancer: { algorithm: round_robin }\ntimeout: { request: 2s }\n");
    let get = || -> serde_json::Value {
        serde_json::from_str(&ok(&meshctl(&url, &["-o", "json", "policy", "get", "market-service"]))).unwrap()
    };

    let diff = ok(&meshctl(&url, &["policy", "diff", "market-service", "-f", &lb, "--merge"]));
    assert!(diff.contains("load_balancer.algorithm") && !diff.contains("cache."), "{diff}");
    ok(&meshctl(&url, &["policy", "set", "market-service", "-f", &lb, "--merge"]));
    let p = get();
    assert_eq!(p["policy"]["load_balancer"]["algorithm"], "round_robin", "{p}");
    assert_eq!(p["policy"]["cache"]["invalidate_on"][0]["topic"], "market-events", "kept: {p}");
    assert_eq!(p["policy"]["cache"]["ttl"], "30s", "kept: {p}");
    // A merge that breaks a rule is refused naming the field, and nothing changes.
    let bad = policy_file(&dir, "bad.yaml", "retry: { max_attempts: 50 }\n");
    let err = fails(&meshctl(&url, &["policy", "set", "market-service", "-f", &bad, "--merge"]));
    assert!(err.contains("retry.max_attempts"), "{err}");
    assert_eq!(get()["version"], p["version"]);

    // Without --merge, what the file leaves out goes back to its default.
    ok(&meshctl(&url, &["policy", "set", "market-service", "-f", &lb]));
    let p = get();
    assert_eq!(p["policy"]["cache"]["invalidate_on"].as_array().map(Vec::len), Some(0), "{p}");
}
