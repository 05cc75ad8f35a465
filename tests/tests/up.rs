//! `meshctl up` end to end: the README's main command, then a user's first session through the
//! gateway, then Ctrl-C.

use std::{
    io::{BufRead, BufReader},
    process::Command,
    time::Duration,
};

use bytes::Bytes;
use mesh_testkit::{MeshctlUp, WAIT, bin, eventually, request};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshctl_up_runs_a_whole_mesh_reachable_through_the_gateway_and_stops_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join(".mesh");
    let (mut up, stdout) = MeshctlUp::start(&state, &[], &[]);
    let (mut cp, mut gateway, mut gateway_admin) = (None, None, None);
    let mut inbounds = Vec::new();
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let cols: Vec<&str> = line.split_whitespace().collect();
        match cols.first() {
            // PROCESS PID LISTENS-ON WHAT
            Some(&"control-plane") => cp = Some(cols[2].to_string()),
            Some(&"gateway") => {
                gateway =
                    Some(cols[2].trim_end_matches("/api/markets").trim_start_matches("http://").to_string())
            }
            Some(first) if gateway.is_some() && gateway_admin.is_none() && first.ends_with("/config") => {
                gateway_admin =
                    Some(first.trim_start_matches("http://").trim_end_matches("/config").to_string())
            }
            Some(&"try:") => break,
            Some(first) if first.starts_with("sidecar-") && cols.get(3) == Some(&"inbound") => {
                inbounds.push(cols[2].to_string())
            }
            _ => {}
        }
    }
    // Keep reading so meshctl never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    let (cp, gateway) =
        (cp.expect("control plane address printed"), gateway.expect("gateway address printed"));
    let gw: std::net::SocketAddr = gateway.parse().unwrap();
    let operator = std::fs::read_to_string(state.join("admin-token")).unwrap();
    // A request through the gateway, with a bearer credential or none.
    let call = |method: &'static str, path: String, bearer: Option<&str>, body: Value| {
        let bearer = bearer.map(|t| format!("Bearer {t}"));
        async move {
            let mut h = vec![("content-type", "application/json")];
            if let Some(b) = &bearer {
                h.push(("authorization", b.as_str()));
            }
            let (status, text) =
                request(gw, method, "example.com", &path, &h, Bytes::from(body.to_string())).await;
            (status, serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text)))
        }
    };

    // Both instances register once healthy; the gateway learns them.
    // The control plane's API is TLS from the mesh CA; meshctl trusts its root and sends the
    // admin token it wrote.
    assert!(cp.starts_with("https://"), "{cp}");
    let (ca, token) = (state.join("control-plane/ca.pem"), state.join("control-plane/admin.token"));
    let meshctl_with = |token: &std::path::Path, args: &[&str]| {
        Command::new(bin("meshctl"))
            .arg("--control-plane")
            .arg(&cp)
            .arg("--ca-file")
            .arg(&ca)
            .arg("--admin-token-file")
            .arg(token)
            .args(args)
            .output()
            .unwrap()
    };
    let meshctl = |args: &[&str]| String::from_utf8(meshctl_with(&token, args).stdout).unwrap();
    eventually(WAIT, "two healthy market-service instances", || async {
        meshctl(&["instances", "market-service"]).lines().filter(|l| l.contains("healthy")).count() == 2
    })
    .await;
    eventually(WAIT, "the gateway routes to market-service", || async {
        call("GET", "/api/markets".into(), None, Value::Null).await.0 == 200
    })
    .await;

    // End users: the gateway verifies tokens of the development issuer (`meshctl token issue`).
    let issue = |args: &[&str]| {
        let issued = Command::new(bin("meshctl"))
            .args(["token", "issue", "--ttl", "10m", "--dir"])
            .arg(&state)
            .args(args)
            .output()
            .unwrap();
        assert!(issued.status.success(), "{}", String::from_utf8_lossy(&issued.stderr));
        String::from_utf8(issued.stdout).unwrap().trim().to_string()
    };
    let (alice, bob, admin) =
        (issue(&["--sub", "alice"]), issue(&["--sub", "bob"]), issue(&["--sub", "ops", "--admin"]));
    assert_eq!(alice.split('.').count(), 3, "{alice}");
    assert_eq!(call("GET", "/api/markets".into(), Some(&alice), Value::Null).await.0, 200);
    let (status, body) = call("GET", "/api/markets".into(), Some(&format!("{alice}x")), Value::Null).await;
    assert_eq!(status, 401, "a token with a broken signature: {body}");
    assert!(body["error"] == "token_bad_signature" || body["error"] == "token_malformed", "{body}");

    // Issue #17: the market service acts as the verified user. Accounts are their owners';
    // anonymous writes are 401; only an admin (the role, or the operator's token) grants.
    let accounts = "/api/accounts".to_string();
    assert_eq!(call("POST", accounts.clone(), None, json!({})).await.0, 401);
    for who in [&alice, &bob] {
        assert_eq!(call("POST", accounts.clone(), Some(who), json!({})).await.0, 201);
    }
    let grant = |who: &str| format!("/api/accounts/{who}/grants");
    assert_eq!(call("POST", grant("alice"), Some(&alice), json!({"amount": "1000"})).await.0, 403);
    assert_eq!(call("POST", grant("alice"), Some(&admin), json!({"amount": "1000"})).await.0, 200);
    assert_eq!(call("POST", grant("bob"), Some(&operator), json!({"amount": "10"})).await.0, 200);
    let close = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
        as u64
        + 3_600_000;
    let question =
        json!({"question": "Rain?", "outcomes": ["yes", "no"], "close_time_ms": close, "liquidity": "100"});
    assert_eq!(call("POST", "/api/markets".into(), None, question.clone()).await.0, 401);
    let (st, m) = call("POST", "/api/markets".into(), Some(&alice), question).await;
    assert_eq!((st, m["creator"].as_str()), (201, Some("alice")), "{m}");
    let id = m["id"].as_str().unwrap().to_string();
    // Bob cannot trade as alice, nor resolve or change her market.
    let trades = format!("/api/markets/{id}/trades");
    let (st, v) = call(
        "POST",
        trades.clone(),
        Some(&bob),
        json!({"account": "alice", "outcome": 0, "side": "buy", "shares": "1"}),
    )
    .await;
    assert_eq!(st, 400, "a body cannot name the account: {v}");
    let resolve = format!("/api/markets/{id}/resolve");
    assert_eq!(call("POST", resolve, Some(&bob), json!({"outcome": 0})).await.0, 403);
    assert_eq!(
        call("PATCH", format!("/api/markets/{id}"), Some(&bob), json!({"description": "x"})).await.0,
        403
    );
    assert_eq!(
        call("POST", trades.clone(), None, json!({"outcome": 0, "side": "buy", "shares": "1"})).await.0,
        401
    );
    // Trades through the gateway land on either instance; both share one database.
    for _ in 0..6 {
        let (st, t) =
            call("POST", trades.clone(), Some(&alice), json!({"outcome": 0, "side": "buy", "shares": "1"}))
                .await;
        assert_eq!(st, 201, "{t}");
    }
    let gateway_admin_addr: std::net::SocketAddr =
        gateway_admin.as_deref().expect("gateway admin address printed").parse().unwrap();
    // The gateway caches market pages only once it follows market-events (so no entry can miss
    // its invalidation).
    eventually(WAIT, "the gateway follows market-events", || async {
        let (_, m) = mesh_testkit::get(gateway_admin_addr, "admin", "/metrics").await;
        m.contains("mesh_sidecar_cache_invalidation_followers 1")
    })
    .await;
    for _ in 0..4 {
        let (st, m) = call("GET", format!("/api/markets/{id}"), None, Value::Null).await;
        assert_eq!(
            (st, m["trades"].as_u64()),
            (200, Some(6)),
            "every instance reads its own and the other's writes"
        );
    }
    // The gateway caches the market page (policy set by `meshctl up`, TTL 30 s); the next trade's
    // TradeExecuted event drops it, so the page shows the trade long before the TTL.
    let cache_hits = || async {
        let (_, m) = mesh_testkit::get(gateway_admin_addr, "admin", "/metrics").await;
        m.lines()
            .find(|l| l.starts_with("mesh_sidecar_cache_requests_total{") && l.contains("result=\"hit\""))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert!(cache_hits().await >= 3, "repeated reads of the market page are served from the gateway cache");
    let (st, t) =
        call("POST", trades.clone(), Some(&alice), json!({"outcome": 1, "side": "buy", "shares": "1"})).await;
    assert_eq!(st, 201, "{t}");
    assert_eq!(
        call("GET", format!("/api/markets/{id}"), None, Value::Null).await.1["trades"].as_u64(),
        Some(7),
        "a trade through the gateway drops its market's cached page before it is answered"
    );
    // Mutual TLS: the gateway and both sidecars hold mesh certificates; plaintext to a
    // sidecar's inbound port gets no HTTP answer.
    let (_, gw_config) = mesh_testkit::get(gateway_admin_addr, "admin", "/config").await;
    assert!(gw_config.contains("spiffe://mesh.local/service/gateway"), "{gw_config}");
    assert_eq!(inbounds.len(), 2, "both sidecars' inbound listeners printed");
    for inbound in &inbounds {
        let (status, body) =
            request(inbound.parse().unwrap(), "GET", "market-service", "/markets", &[], Bytes::new()).await;
        assert_eq!(status, 0, "plaintext to {inbound} must not be served: {body}");
    }
    // Issue #15.12: the admin URL exactly as `meshctl up` printed it works too.
    let printed = format!("http://{}/config", gateway_admin.as_deref().unwrap_or_default());
    assert!(meshctl(&["sidecar", &printed]).contains("connected"), "meshctl sidecar {printed}");
    let view = meshctl(&["sidecar", gateway_admin.as_deref().expect("gateway admin address printed")]);
    assert!(
        view.contains("connected")
            && view.lines().filter(|l| l.starts_with("market-service") && l.contains("closed")).count() == 2,
        "{view}"
    );
    // The market's events left the outbox through the sidecars' spools into the bus.
    eventually(WAIT, "market events in the bus", || async {
        let replay = meshctl(&["events", "replay", "market-events"]);
        replay.contains("MarketCreated")
            && replay.lines().filter(|l| l.contains("TradeExecuted")).count() == 7
    })
    .await;
    // A trade's Location, through the gateway, is the gateway's path to it (the route's rewrite
    // undone), and it answers there.
    let (st, head, t) = mesh_testkit::request_full(
        gw,
        "POST",
        "example.com",
        &trades,
        &[("content-type", "application/json"), ("authorization", &format!("Bearer {alice}"))],
        Bytes::from(json!({"outcome": 0, "side": "buy", "shares": "0.1"}).to_string()),
    )
    .await;
    let t: Value = serde_json::from_str(&t).unwrap();
    let location = head["location"].to_str().unwrap().to_string();
    assert_eq!(
        (st, location.as_str()),
        (201, format!("{trades}/{}", t["trade_id"].as_str().unwrap()).as_str())
    );
    assert_eq!(call("GET", location, None, Value::Null).await.1["trade_id"], t["trade_id"]);
    // Read your writes: 100 trades, each read back at once through the gateway (whichever
    // instance either lands on, cache or not): never a page older than the trade.
    let mut stale = Vec::new();
    for n in 0..100 {
        let (st, t) = call(
            "POST",
            trades.clone(),
            Some(&alice),
            json!({"outcome": n % 2, "side": "buy", "shares": "0.1"}),
        )
        .await;
        assert_eq!(st, 201, "{t}");
        let (_, m) = call("GET", format!("/api/markets/{id}"), None, Value::Null).await;
        if m["version"].as_u64() < t["market_version"].as_u64() {
            stale.push((t["market_version"].clone(), m["version"].clone()));
        }
    }
    assert_eq!(stale, vec![], "reads older than the caller's own trade (trade version, read version)");
    let status = meshctl(&["proxy-status"]);
    assert!(status.lines().filter(|l| l.contains("SYNCED")).count() >= 3, "{status}");
    // Without the admin token the API refuses.
    let anonymous = meshctl_with(&state.join("no-such-token"), &["proxy-status"]);
    assert!(!anonymous.status.success());
    assert!(String::from_utf8_lossy(&anonymous.stderr).contains("unauthenticated"), "{anonymous:?}");

    let mut up = up.0.take().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(up.id() as i32), nix::sys::signal::Signal::SIGINT)
        .unwrap();
    let exit = tokio::task::spawn_blocking(move || up.wait().unwrap()).await.unwrap();
    assert!(exit.success(), "{exit:?}");
    let refused = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(gw)).await;
    assert!(!matches!(refused, Ok(Ok(_))), "the gateway stopped with meshctl up");
}

/// Issue #15.6 and #15.7: `meshctl up -o json` supervises: one market-service instance killed is
/// reported and restarted on its address while the mesh keeps serving; one that keeps dying
/// within seconds stops the mesh with a non-zero exit. The market's operator token is 256
/// random bits in an owner-only file, never on a command line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshctl_up_restarts_a_dead_process_and_gives_up_on_one_that_keeps_dying() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join(".mesh");
    // A token file left world-readable by an older version is tightened, not reused as it is.
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("admin-token"), "old").unwrap();
    std::fs::set_permissions(state.join("admin-token"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let (mut up, stdout) =
        MeshctlUp::start(&state, &["-o", "json"], &["--restart-backoff", "100ms", "--give-up-after", "3"]);
    let (tx, mut events) = tokio::sync::mpsc::unbounded_channel::<Value>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // A line that is not JSON fails the test where it is read (`event` is missing).
            let _ = tx.send(
                serde_json::from_str(&line)
                    .unwrap_or_else(|e| json!({"not_json": line, "error": e.to_string()})),
            );
        }
    });
    let mut next =
        async || tokio::time::timeout(Duration::from_secs(60), events.recv()).await.unwrap().unwrap();
    let ready = next().await;
    assert_eq!(ready["event"], "up", "{ready}");
    let listeners = ready["listeners"].as_array().unwrap();
    let pid_of = |name: &str| {
        listeners
            .iter()
            .find(|l| l["process"] == name)
            .and_then(|l| l["pid"].as_u64())
            .unwrap_or_else(|| panic!("{name} in {ready}"))
    };
    let victim = pid_of("market-service-1") as i32;
    for name in ["control-plane", "market-service-2", "gateway"] {
        assert!(pid_of(name) > 0);
    }
    let gateway = listeners.iter().find(|l| l["process"] == "gateway").unwrap()["address"].as_str().unwrap();
    let gw: std::net::SocketAddr =
        gateway.trim_start_matches("http://").trim_end_matches("/api/markets").parse().unwrap();

    // #15.7: the token file is owner-only, 64 hex digits (256 bits), and no process's command
    // line carries it.
    let token_file = state.join("admin-token");
    let token = std::fs::read_to_string(&token_file).unwrap();
    assert_eq!(std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit()), "{token}");
    for l in listeners.iter().filter_map(|l| l["pid"].as_u64()) {
        let cmdline = std::fs::read(format!("/proc/{l}/cmdline")).unwrap();
        assert!(
            !String::from_utf8_lossy(&cmdline).contains(&token),
            "pid {l} has the token on its command line"
        );
    }

    let markets = || async { request(gw, "GET", "example.com", "/api/markets", &[], Bytes::new()).await.0 };
    eventually(WAIT, "the gateway serves", || async { markets().await == 200 }).await;

    // #15.8: the market service listens on a Unix socket only its user can open, and reaches
    // the mesh through its sidecar's socket; no TCP port of the app exists to bypass mTLS.
    let app =
        listeners.iter().find(|l| l["process"] == "market-service-1").unwrap()["address"].as_str().unwrap();
    let app_socket = std::path::PathBuf::from(app.strip_prefix("unix:").unwrap_or_else(|| panic!("{app}")));
    let sockets = app_socket.parent().unwrap();
    for name in ["app.sock", "sidecar.sock", "outbound.sock"] {
        let mode = std::fs::metadata(sockets.join(name)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{name}");
    }
    let over_unix = |socket: std::path::PathBuf, host: &'static str, path: &'static str| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::UnixStream::connect(socket).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).await.unwrap();
        raw
    };
    assert!(over_unix(app_socket.clone(), "localhost", "/healthz").await.starts_with("HTTP/1.1 200"));
    let via_mesh = over_unix(sockets.join("outbound.sock"), "market-service", "/markets").await;
    assert!(via_mesh.starts_with("HTTP/1.1 200"), "the app's way into the mesh: {via_mesh}");
    let root = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap()) == 0;
    if root && std::path::Path::new("/usr/sbin/runuser").exists() {
        // Another user of the host cannot reach the app (the root test user can: the control).
        let other = Command::new("runuser")
            .args(["-u", "nobody", "--", "curl", "-s", "--unix-socket"])
            .arg(&app_socket)
            .arg("http://localhost/healthz")
            .output()
            .unwrap();
        assert!(!other.status.success(), "nobody reached the app: {other:?}");
    }

    // Kill one instance: reported with its exit, restarted; the mesh serves all along.
    let kill = |pid: i32| {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap()
    };
    kill(victim);
    let exited = next().await;
    assert_eq!(
        (exited["event"].as_str(), exited["process"].as_str()),
        (Some("exited"), Some("market-service-1")),
        "{exited}"
    );
    assert!(exited["status"].as_str().unwrap().contains("SIGKILL"), "{exited}");
    eventually(WAIT, "the gateway serves while an instance is down", || async { markets().await == 200 })
        .await;
    let restarted = next().await;
    assert_eq!(
        (restarted["event"].as_str(), restarted["process"].as_str()),
        (Some("restarted"), Some("market-service-1")),
        "{restarted}"
    );
    let pid = restarted["pid"].as_u64().unwrap() as i32;
    assert_ne!(pid, victim);
    assert!(up.0.as_mut().unwrap().try_wait().unwrap().is_none(), "meshctl keeps running");
    for _ in 0..10 {
        assert_eq!(markets().await, 200);
    }

    // Negative control for giving up: killed again within seconds of each start, three times
    // in a row, it is given up on and the whole mesh stops with a non-zero exit.
    kill(pid);
    loop {
        let e = next().await;
        match e["event"].as_str() {
            Some("exited" | "stopping" | "stopped") => {}
            Some("restarted") => kill(e["pid"].as_u64().unwrap() as i32),
            Some("giving_up") => {
                assert_eq!(
                    (e["process"].as_str(), e["failures"].as_u64()),
                    (Some("market-service-1"), Some(3)),
                    "{e}"
                );
                break;
            }
            _ => panic!("unexpected {e}"),
        }
    }
    let mut child = up.0.take().unwrap();
    let exit = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    assert!(!exit.success(), "giving up is a failure: {exit:?}");
    let refused = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(gw)).await;
    assert!(!matches!(refused, Ok(Ok(_))), "the gateway stopped with meshctl up");
}
