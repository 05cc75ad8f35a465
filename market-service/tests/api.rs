//! The market service over real HTTP on loopback, against SQLite and — when
//! `MESH_TEST_POSTGRES_URL` names a server — PostgreSQL. With `MESH_REQUIRE_POSTGRES=1` (CI) a
//! missing PostgreSQL is a failure, not a skip.

use bytes::Bytes;
use market_service::domain::Micro;
use mesh_testkit::{WAIT, eventually};
use serde_json::{Value, json};

use crate::support::{ADMIN, Svc, check_log, databases};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_on_its_happy_path() {
    let dir = tempfile::tempdir().unwrap();
    for url in databases(&dir).await {
        let s = Svc::start(&url, 50).await;
        s.account("alice", "1000").await;
        s.account("bob", "500").await;
        let id = s.market("alice", 3_600_000).await;

        let (st, q) = s
            .post(&format!("/markets/{id}/quote"), json!({"outcome": 0, "side": "buy", "shares": "10"}))
            .await;
        assert_eq!(st, 200, "{q}");
        let quoted = q["quote"]["amount"].as_str().unwrap().to_string();
        let (st, t) = s
            .act(
                "bob",
                "POST",
                &format!("/markets/{id}/trades"),
                json!({"outcome": 0, "side": "buy", "shares": "10", "max_cost": "6"}),
            )
            .await;
        assert_eq!(st, 201, "{t}");
        assert_eq!(t["quote"]["amount"].as_str().unwrap(), quoted, "the trade costs what the quote said");
        let (st, t) = s
            .act(
                "bob",
                "POST",
                &format!("/markets/{id}/trades"),
                json!({"outcome": 0, "side": "sell", "shares": "4", "min_proceeds": "1"}),
            )
            .await;
        assert_eq!(st, 201, "{t}");

        let (st, m) = s.get(&format!("/markets/{id}")).await;
        assert_eq!((st, m["trades"].as_u64(), m["status"].as_str()), (200, Some(2), Some("open")));
        let p: f64 = m["prices"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).sum();
        assert!((p - 1.0).abs() < 1e-9);
        let (st, l) = s.get("/markets?status=open&category=weather&limit=10").await;
        assert_eq!((st, l["total"].as_u64()), (200, Some(1)));
        assert_eq!(s.get("/markets?category=sports").await.1["total"], 0);
        let (st, u) = s
            .call(
                "PATCH",
                &format!("/markets/{id}"),
                &[("if-match", "3"), ("x-mesh-user", "alice")],
                json!({"description": "updated"}),
            )
            .await;
        assert_eq!((st, u["description"].as_str()), (200, Some("updated")), "{u}");
        let (st, pos) = s.get(&format!("/markets/{id}/positions")).await;
        assert_eq!((st, pos["positions"][0]["shares"].as_str()), (200, Some("6.000000")));
        let (st, h) = s.get(&format!("/markets/{id}/history")).await;
        assert_eq!((st, h["points"].as_array().unwrap().len()), (200, 3));
        let (st, a) = s.act("bob", "GET", "/accounts/bob", Value::Null).await;
        assert_eq!((st, a["positions"].as_array().unwrap().len()), (200, 1));
        let (st, ev) = s.get(&format!("/markets/{id}/events")).await;
        assert_eq!((st, ev["events"].as_array().unwrap().len()), (200, 4));
        assert_eq!(s.get(&format!("/markets/{id}/audit")).await.1["valid"], true);
        let (st, an) = s.get(&format!("/analytics/markets/{id}")).await;
        assert_eq!((st, an["unique_traders"].as_u64()), (200, Some(1)));
        let (st, pl) = s.get("/analytics/platform").await;
        assert_eq!((st, pl["trades"].as_u64(), pl["accounts"].as_u64()), (200, Some(2), Some(2)));
        let (st, doc) = s.get("/openapi.json").await;
        assert_eq!((st, doc["openapi"].as_str()), (200, Some("3.1.0")));

        // Resolution settles: bob's 6 winning shares pay 6 credits; alice gets the rest back.
        let before = s.balance("bob").await;
        let (st, r) = s.act("alice", "POST", &format!("/markets/{id}/resolve"), json!({"outcome": 0})).await;
        assert_eq!(st, 200, "{r}");
        assert_eq!(s.balance("bob").await - before, Micro::units(6).0);
        assert_eq!(s.get(&format!("/markets/{id}")).await.1["pool"], "0.000000");
        let total = s.balance("alice").await + s.balance("bob").await;
        assert_eq!(total, Micro::units(1500).0, "money is conserved");

        // Cancellation refunds what was paid.
        let id2 = s.market("alice", 3_600_000).await;
        s.act(
            "bob",
            "POST",
            &format!("/markets/{id2}/trades"),
            json!({"outcome": 1, "side": "buy", "shares": "5"}),
        )
        .await;
        let before = s.balance("bob").await;
        // A command without fields takes an empty body.
        assert_eq!(s.act("alice", "POST", &format!("/markets/{id2}/cancel"), Value::Null).await.0, 200);
        assert!(s.balance("bob").await > before, "bob's stake is refunded");
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_the_documented_4xx_never_500() {
    let dir = tempfile::tempdir().unwrap();
    for url in databases(&dir).await {
        let s = Svc::start(&url, 50).await;
        s.account("alice", "1000").await;
        let id = s.market("alice", 3_600_000).await;
        let trades = format!("/markets/{id}/trades");
        let future = market_service::service::now_ms() + 3_600_000;
        // (user: "" anonymous, "root" with the admin role; method, path, body, status, code)
        let cases: Vec<(&str, &str, String, String, u16, &str)> = vec![
            ("alice", "POST", trades.clone(), "{not json".into(), 400, "invalid_body"),
            ("alice", "POST", trades.clone(), json!({"outcome": 0, "side": "buy", "shares": "1", "extra": 1}).to_string(), 400, "invalid_body"),
            ("alice", "POST", trades.clone(), json!({"outcome": "zero", "side": "buy", "shares": "1"}).to_string(), 400, "invalid_body"),
            ("alice", "POST", trades.clone(), json!({"outcome": -1, "side": "buy", "shares": "1"}).to_string(), 400, "invalid_body"),
            ("alice", "POST", trades.clone(), json!({"outcome": 0, "side": "hold", "shares": "1"}).to_string(), 400, "invalid_body"),
            ("alice", "POST", trades.clone(), json!({"outcome": 0, "side": "buy", "shares": "-5"}).to_string(), 400, "invalid"),
            ("alice", "POST", trades.clone(), json!({"outcome": 0, "side": "buy", "shares": 1.5}).to_string(), 400, "invalid_body"),
            ("alice", "POST", trades.clone(), json!({"outcome": 0, "side": "buy", "shares": "99999999999999999999"}).to_string(), 400, "invalid_body"),
            ("alice", "POST", trades.clone(), r#"{"outcome":99999999999999999999999,"side":"buy","shares":"1"}"#.into(), 400, "invalid_body"),
            ("alice", "POST", trades.clone(), json!({"outcome": 5, "side": "buy", "shares": "1"}).to_string(), 400, "invalid"),
            ("nobody", "POST", trades.clone(), json!({"outcome": 0, "side": "buy", "shares": "1"}).to_string(), 404, "no_account"),
            ("alice", "POST", trades.clone(), json!({"outcome": 0, "side": "buy", "shares": "100000"}).to_string(), 409, "insufficient_balance"),
            ("alice", "POST", trades.clone(), json!({"outcome": 0, "side": "sell", "shares": "1"}).to_string(), 409, "insufficient_shares"),
            ("alice", "POST", trades.clone(), json!({"outcome": 0, "side": "buy", "shares": "10", "max_cost": "0.01"}).to_string(), 409, "slippage"),
            ("alice", "POST", "/markets/nope/trades".into(), json!({"outcome": 0, "side": "buy", "shares": "1"}).to_string(), 404, "not_found"),
            ("alice", "GET", "/markets/nope".into(), String::new(), 404, "not_found"),
            ("root", "GET", "/accounts/nope".into(), String::new(), 404, "not_found"),
            ("alice", "GET", "/markets?status=sleeping".into(), String::new(), 400, "invalid"),
            ("alice", "GET", "/markets?limit=0".into(), String::new(), 400, "invalid"),
            ("alice", "GET", "/markets?limit=abc".into(), String::new(), 400, "invalid_query"),
            ("alice", "GET", "/nowhere".into(), String::new(), 404, "not_found"),
            ("has space", "POST", "/accounts".into(), json!({}).to_string(), 400, "invalid"),
            ("alice", "POST", "/accounts".into(), json!({"id": "alice"}).to_string(), 409, "exists"),
            ("", "POST", "/accounts/alice/grants".into(), json!({"amount": "5"}).to_string(), 401, "unauthenticated"),
            ("alice", "POST", "/accounts/alice/grants".into(), json!({"amount": "5"}).to_string(), 403, "forbidden"),
            ("root", "POST", "/accounts/nope/grants".into(), json!({"amount": "5"}).to_string(), 404, "not_found"),
            ("alice", "DELETE", "/markets".into(), String::new(), 405, "method_not_allowed"),
            ("alice", "PUT", format!("/markets/{id}/trades"), String::new(), 405, "method_not_allowed"),
            ("alice", "POST", "/markets".into(), json!({"question": "", "outcomes": ["a", "b"], "close_time_ms": future, "liquidity": "10"}).to_string(), 400, "invalid"),
            ("alice", "POST", "/markets".into(), json!({"question": "q", "outcomes": ["a"], "close_time_ms": future, "liquidity": "10"}).to_string(), 400, "invalid"),
            ("alice", "POST", "/markets".into(), json!({"question": "q", "outcomes": ["a", "a"], "close_time_ms": future, "liquidity": "10"}).to_string(), 400, "invalid"),
            ("alice", "POST", "/markets".into(), json!({"question": "q", "outcomes": ["a", "b"], "close_time_ms": 1, "liquidity": "10"}).to_string(), 400, "invalid"),
            ("ghost", "POST", "/markets".into(), json!({"question": "q", "outcomes": ["a", "b"], "close_time_ms": future, "liquidity": "10"}).to_string(), 404, "no_account"),
            ("alice", "POST", "/markets".into(), json!({"question": "q", "outcomes": ["a", "b"], "close_time_ms": future, "liquidity": "0"}).to_string(), 400, "invalid"),
            ("mallory", "POST", format!("/markets/{id}/resolve"), json!({"outcome": 0}).to_string(), 403, "forbidden"),
            ("alice", "POST", format!("/markets/{id}/resolve"), json!({"outcome": 9}).to_string(), 400, "invalid"),
            ("alice", "PATCH", format!("/markets/{id}"), json!({}).to_string(), 400, "invalid"),
            // Who acts is the verified user, never a name in the body: anonymous writes are
            // 401, acting on another's market or account is 403.
            ("alice", "POST", trades.clone(), json!({"account": "bob", "outcome": 0, "side": "buy", "shares": "1"}).to_string(), 400, "invalid_body"),
            ("alice", "POST", "/markets".into(), json!({"question": "q", "outcomes": ["a", "b"], "close_time_ms": future, "liquidity": "10", "creator": "bob"}).to_string(), 400, "invalid_body"),
            ("", "POST", trades.clone(), json!({"outcome": 0, "side": "buy", "shares": "1"}).to_string(), 401, "unauthenticated"),
            ("", "POST", "/markets".into(), json!({"question": "q", "outcomes": ["a", "b"], "close_time_ms": future, "liquidity": "10"}).to_string(), 401, "unauthenticated"),
            ("", "PATCH", format!("/markets/{id}"), json!({"description": "mine now"}).to_string(), 401, "unauthenticated"),
            ("", "POST", format!("/markets/{id}/cancel"), String::new(), 401, "unauthenticated"),
            ("", "POST", "/accounts".into(), json!({}).to_string(), 401, "unauthenticated"),
            ("", "GET", "/accounts/alice".into(), String::new(), 401, "unauthenticated"),
            ("mallory", "PATCH", format!("/markets/{id}"), json!({"description": "mine now"}).to_string(), 403, "forbidden"),
            ("mallory", "POST", format!("/markets/{id}/cancel"), String::new(), 403, "forbidden"),
            ("mallory", "POST", "/accounts".into(), json!({"id": "alice2"}).to_string(), 403, "forbidden"),
            ("mallory", "GET", "/accounts/alice".into(), String::new(), 403, "forbidden"),
        ];
        for (user, method, path, body, status, code) in cases {
            let roles = if user == "root" { "admin" } else { "" };
            let h: &[(&str, &str)] =
                if user.is_empty() { &[] } else { &[("x-mesh-user", user), ("x-mesh-user-roles", roles)] };
            let (got, v) = s.raw(method, &path, h, body.clone()).await;
            assert_eq!((got, v["error"].as_str()), (status, Some(code)), "{method} {path} {body}: {v}");
            assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
            // Problem details (RFC 9457): a type that is described where it points, the status,
            // a title and the detail.
            assert_eq!((v["status"].as_u64(), &v["detail"]), (Some(u64::from(status)), &v["message"]), "{v}");
            let (described, d) = s.get(v["type"].as_str().unwrap()).await;
            assert_eq!((described, &d["title"]), (200, &v["title"]), "{v} → {d}");
        }
        let (_, headers, _) =
            mesh_testkit::request_full(s.addr, "GET", "market-service", "/markets/nope", &[], Bytes::new())
                .await;
        assert_eq!(headers[http::header::CONTENT_TYPE], "application/problem+json");
        let (st, v) = s
            .call(
                "PATCH",
                &format!("/markets/{id}"),
                &[("if-match", "99"), ("x-mesh-user", "alice")],
                json!({"description": "x"}),
            )
            .await;
        assert_eq!((st, v["error"].as_str()), (412, Some("precondition_failed")));
        let (st, v) = s.raw("POST", &trades, &[("idempotency-key", "")], "{}".into()).await;
        assert_eq!(st, 400, "{v}");
        // No credential is 401 with a challenge; a wrong one is 403.
        let (st, head, _) = mesh_testkit::request_full(
            s.addr,
            "POST",
            "market-service",
            "/accounts/alice/grants",
            &[("content-type", "application/json")],
            Bytes::from_static(br#"{"amount":"5"}"#),
        )
        .await;
        assert_eq!(st, 401);
        assert!(
            head.get("www-authenticate").is_some_and(|v| v.as_bytes().starts_with(b"Bearer")),
            "{head:?}"
        );
        let (st, v) = s
            .call(
                "POST",
                "/accounts/alice/grants",
                &[("authorization", "Bearer wrong")],
                json!({"amount": "5"}),
            )
            .await;
        assert_eq!((st, v["error"].as_str()), (403, Some("forbidden")), "{v}");
        let huge = "x".repeat(100 * 1024);
        assert_eq!(s.raw("POST", "/accounts", &[], json!({"id": huge}).to_string()).await.0, 413);
        s.stop().await;
    }
}

/// Issue #17: the verified user acts, never a name in the body; an admin (the role or the
/// operator's token) may grant and act on any market; idempotency keys are per user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_verified_user_acts_and_only_admins_act_for_others() {
    let dir = tempfile::tempdir().unwrap();
    for url in databases(&dir).await {
        let s = Svc::start(&url, 50).await;
        let root = [("x-mesh-user", "root"), ("x-mesh-user-roles", "trader,admin")];
        for user in ["alice", "bob"] {
            assert_eq!(s.act(user, "POST", "/accounts", json!({})).await.0, 201);
            let (st, g) =
                s.call("POST", &format!("/accounts/{user}/grants"), &root, json!({"amount": "100"})).await;
            assert_eq!(st, 200, "an admin role grants: {g}");
        }
        // A role other than admin is no admin.
        let (st, _) = s
            .call(
                "POST",
                "/accounts/bob/grants",
                &[("x-mesh-user", "bob"), ("x-mesh-user-roles", "trader,administrator")],
                json!({"amount": "100"}),
            )
            .await;
        assert_eq!(st, 403);
        let id = s.market("alice", 3_600_000).await;
        assert_eq!(s.get(&format!("/markets/{id}")).await.1["creator"], "alice");
        let alice_before = s.balance("alice").await;

        // Bob's trade debits bob, whoever the body might have named.
        let trades = format!("/markets/{id}/trades");
        let (st, t) = s
            .call(
                "POST",
                &trades,
                &[("x-mesh-user", "bob"), ("idempotency-key", "k")],
                json!({"outcome": 0, "side": "buy", "shares": "5"}),
            )
            .await;
        assert_eq!((st, t["account"].as_str()), (201, Some("bob")), "{t}");
        assert!(s.balance("bob").await < Micro::units(100).0);
        assert_eq!(s.balance("alice").await, alice_before);
        // The same key from another user is another request.
        let (st, t) = s
            .call(
                "POST",
                &trades,
                &[("x-mesh-user", "alice"), ("idempotency-key", "k")],
                json!({"outcome": 1, "side": "buy", "shares": "1"}),
            )
            .await;
        assert_eq!((st, t["account"].as_str()), (201, Some("alice")), "{t}");
        assert_eq!(s.get(&format!("/markets/{id}")).await.1["trades"], 2);

        // Accounts are their owners': `me` is the caller's own.
        let (st, me) = s.act("bob", "GET", "/accounts/me", Value::Null).await;
        assert_eq!((st, me["id"].as_str()), (200, Some("bob")), "{me}");
        assert_eq!(s.call("GET", "/accounts/bob", &root, Value::Null).await.0, 200);

        // Bob cannot resolve alice's market; an admin can, and the trail says who.
        let resolve = format!("/markets/{id}/resolve");
        assert_eq!(s.act("bob", "POST", &resolve, json!({"outcome": 0})).await.0, 403);
        let (st, r) = s.call("POST", &resolve, &root, json!({"outcome": 0})).await;
        assert_eq!(st, 200, "{r}");
        let trail = s.get(&format!("/markets/{id}/events")).await.1;
        let resolved = trail["events"].as_array().unwrap().iter().find(|e| e["type"] == "MarketResolved");
        assert_eq!(resolved.unwrap()["data"]["by"], "root");

        // The operator's token is an admin without an account: it grants, it does not trade.
        let (st, g) =
            s.call("POST", "/accounts/bob/grants", &[("authorization", ADMIN)], json!({"amount": "1"})).await;
        assert_eq!(st, 200, "{g}");
        let (st, v) = s
            .call(
                "POST",
                &trades,
                &[("authorization", ADMIN)],
                json!({"outcome": 0, "side": "buy", "shares": "1"}),
            )
            .await;
        assert_eq!((st, v["error"].as_str()), (403, Some("forbidden")), "{v}");
        s.stop().await;
    }
}

/// Issue #18.3 (part): a market read carries a strong ETag (its version); If-None-Match with it
/// is 304; If-Match pins a command to it (412 once the market moved on; `*`: any version).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etags_make_reads_conditional_and_commands_precondition_checked() {
    let dir = tempfile::tempdir().unwrap();
    for url in databases(&dir).await {
        let s = Svc::start(&url, 50).await;
        s.account("alice", "1000").await;
        let id = s.market("alice", 3_600_000).await;
        let path = format!("/markets/{id}");
        let (st, head, _) =
            mesh_testkit::request_full(s.addr, "GET", "market-service", &path, &[], Bytes::new()).await;
        assert_eq!(st, 200);
        let tag = head["etag"].to_str().unwrap().to_string();
        assert_eq!(tag, "\"1\"", "the version, quoted");
        let read_if_changed = |tag: String| {
            let (addr, path) = (s.addr, path.clone());
            async move {
                mesh_testkit::request_full(
                    addr,
                    "GET",
                    "market-service",
                    &path,
                    &[("if-none-match", tag.as_str())],
                    Bytes::new(),
                )
                .await
            }
        };
        let (st, head, body) = read_if_changed(tag.clone()).await;
        assert_eq!((st, body.as_str(), head["etag"].to_str().unwrap()), (304, "", tag.as_str()));

        let trade = |pin: &'static str| {
            let (s, path) = (&s, format!("{path}/trades"));
            async move {
                s.call(
                    "POST",
                    &path,
                    &[("x-mesh-user", "alice"), ("if-match", pin)],
                    json!({"outcome": 0, "side": "buy", "shares": "1"}),
                )
                .await
            }
        };
        assert_eq!(trade("\"1\"").await.0, 201, "the version read");
        let (st, v) = trade("\"1\"").await;
        assert_eq!((st, v["error"].as_str()), (412, Some("precondition_failed")), "it moved on: {v}");
        assert_eq!(trade("W/\"2\"").await.0, 412, "a weak tag never matches");
        assert_eq!(trade("*").await.0, 201, "any version");
        assert_eq!(trade("two").await.0, 400);
        // The read after the writes is no longer the one cached: 200 with the new tag.
        let (st, head, _) = read_if_changed(tag).await;
        assert_eq!((st, head["etag"].to_str().unwrap()), (200, "\"3\""));

        // Accounts too: the owner's read carries the account's version; 304 when unchanged.
        let me = [("x-mesh-user", "alice")];
        let (st, head, _) =
            mesh_testkit::request_full(s.addr, "GET", "market-service", "/accounts/me", &me, Bytes::new())
                .await;
        let account_tag = head["etag"].to_str().unwrap().to_string();
        assert_eq!(st, 200);
        let with_tag = [("x-mesh-user", "alice"), ("if-none-match", account_tag.as_str())];
        let (st, ..) = mesh_testkit::request_full(
            s.addr,
            "GET",
            "market-service",
            "/accounts/me",
            &with_tag,
            Bytes::new(),
        )
        .await;
        assert_eq!(st, 304, "{account_tag}");

        // A 201 says where what it created is, and it is there.
        let body = |v: Value| Bytes::from(v.to_string());
        let json_as = |u| [("x-mesh-user", u), ("content-type", "application/json")];
        let (st, head, t) = mesh_testkit::request_full(
            s.addr,
            "POST",
            "market-service",
            &format!("{path}/trades"),
            &json_as("alice"),
            body(json!({"outcome": 1, "side": "buy", "shares": "1"})),
        )
        .await;
        let t: Value = serde_json::from_str(&t).unwrap();
        let location = head["location"].to_str().unwrap().to_string();
        assert_eq!(
            (st, location.clone()),
            (201, format!("{path}/trades/{}", t["trade_id"].as_str().unwrap()))
        );
        let (st, read) = s.get(&location).await;
        assert_eq!(
            (st, &read["trade_id"], &read["market_version"]),
            (200, &t["trade_id"], &t["market_version"])
        );
        let (st, head, m) = mesh_testkit::request_full(
            s.addr,
            "POST",
            "market-service",
            "/markets",
            &json_as("alice"),
            body(json!({"question": "Q?", "outcomes": ["a", "b"], "close_time_ms": market_service::service::now_ms() + 60_000, "liquidity": "10"})),
        )
        .await;
        let m: Value = serde_json::from_str(&m).unwrap();
        assert_eq!(
            (st, head["location"].to_str().unwrap()),
            (201, format!("/markets/{}", m["id"].as_str().unwrap()).as_str())
        );
        let (st, head, _) = mesh_testkit::request_full(
            s.addr,
            "POST",
            "market-service",
            "/accounts",
            &json_as("bob"),
            body(json!({})),
        )
        .await;
        assert_eq!((st, head["location"].to_str().unwrap()), (201, "/accounts/bob"));
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_post_with_the_same_idempotency_key_is_applied_once() {
    let dir = tempfile::tempdir().unwrap();
    for url in databases(&dir).await {
        // Two instances on one database: a key means the same on both.
        let s = Svc::start(&url, 50).await;
        let other = Svc::start(&url, 50).await;
        s.account("alice", "1000").await;
        let id = s.market("alice", 3_600_000).await;
        let body = json!({"outcome": 0, "side": "buy", "shares": "10"});
        let key = [("idempotency-key", "trade-1"), ("x-mesh-user", "alice")];
        let path = format!("/markets/{id}/trades");
        // Concurrent retries of one request, as a client (or its sidecar) might send them, to
        // either instance.
        let answers = futures::future::join_all(
            (0..8).map(|i| [&s, &other][i % 2].call("POST", &path, &key, body.clone())),
        )
        .await;
        for (st, a) in &answers {
            assert_eq!(*st, 201, "{a}");
            assert_eq!(a, &answers[0].1, "every retry gets the first answer");
        }
        assert_eq!(s.get(&format!("/markets/{id}")).await.1["trades"], 1, "applied once");
        // The same key with another body, or on another path, is 422 on every instance.
        for svc in [&s, &other] {
            let (st, v) =
                svc.call("POST", &path, &key, json!({"outcome": 1, "side": "buy", "shares": "1"})).await;
            assert_eq!((st, v["error"].as_str()), (422, Some("idempotency_key_reused")), "{v}");
            let (st, v) = svc.call("POST", &format!("/markets/{id}/cancel"), &key, Value::Null).await;
            assert_eq!((st, v["error"].as_str()), (422, Some("idempotency_key_reused")), "{v}");
        }
        assert_eq!(other.get(&format!("/markets/{id}")).await.1["status"], "open", "nothing else applied");
        other.stop().await;
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_lose_nothing_and_duplicate_nothing() {
    const TRADERS: usize = 8;
    const EACH: usize = 12;
    let dir = tempfile::tempdir().unwrap();
    for url in databases(&dir).await {
        // Two instances on one database, as `meshctl up` runs them.
        let a = Svc::start(&url, 5).await;
        let b = Svc::start(&url, 5).await;
        a.account("maker", "100000").await;
        for t in 0..TRADERS {
            a.account(&format!("t{t}"), "10000").await;
        }
        let markets = [a.market("maker", 3_600_000).await, a.market("maker", 3_600_000).await];
        let conflicts = std::sync::atomic::AtomicU64::new(0);
        let accepted = futures::future::join_all((0..TRADERS).map(|t| {
            let (svc, markets, conflicts) = (if t % 2 == 0 { &a } else { &b }, &markets, &conflicts);
            async move {
                let mut ids = Vec::new();
                for n in 0..EACH {
                    let m = &markets[(t + n) % 2];
                    let (user, body) =
                        (format!("t{t}"), json!({"outcome": n % 2, "side": "buy", "shares": "1"}));
                    // Pinned versions: every lost race is a 412 the client retries on fresh state.
                    loop {
                        let v = svc.get(&format!("/markets/{m}")).await.1["version"]
                            .as_u64()
                            .unwrap()
                            .to_string();
                        let (st, r) = svc
                            .call(
                                "POST",
                                &format!("/markets/{m}/trades"),
                                &[("if-match", &v), ("x-mesh-user", &user)],
                                body.clone(),
                            )
                            .await;
                        match st {
                            201 => {
                                ids.push(r["trade_id"].as_str().unwrap().to_string());
                                break;
                            }
                            // The version it read moved on: read again and retry.
                            412 => {
                                conflicts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            other => panic!("unexpected {other}: {r}"),
                        }
                    }
                }
                ids
            }
        }))
        .await;
        let accepted: Vec<String> = accepted.into_iter().flatten().collect();
        assert_eq!(accepted.len(), TRADERS * EACH);
        assert!(conflicts.load(std::sync::atomic::Ordering::Relaxed) > 0, "writers really raced");

        check_log(&a.url, &b, &markets, &accepted, 100_000 + 10_000 * TRADERS as i64, false).await;
        a.stop().await;
        b.stop().await;
    }
}

/// Issue #15.1: amounts past the one bound are refused at input naming the field; amounts that
/// are already stored (past any bound) stay readable; an unreadable event takes out only its own
/// aggregate, and the service still starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amounts_past_the_bound_are_refused_and_no_stored_aggregate_stops_the_service() {
    let dir = tempfile::tempdir().unwrap();
    for url in databases(&dir).await {
        let s = Svc::start(&url, 2).await;
        s.account("alice", "1000000000000").await;
        let grant = |amount: &'static str| {
            let s = &s;
            async move {
                s.call(
                    "POST",
                    "/accounts/alice/grants",
                    &[("authorization", ADMIN)],
                    json!({"amount": amount}),
                )
                .await
            }
        };
        let (st, v) = grant("47").await;
        assert_eq!(
            (st, v["error"].as_str(), v["field"].as_str()),
            (422, Some("amount_out_of_range"), Some("balance")),
            "{v}"
        );
        let (st, v) = grant("2000000000000").await;
        assert_eq!((st, v["field"].as_str()), (422, Some("amount")), "{v}");
        assert_eq!(s.balance("alice").await, Micro::units(1_000_000_000_000).0);
        s.account("bob", "10").await;
        s.account("carol", "10").await;
        let url = s.url.clone();
        s.stop().await;

        // What an earlier version let through: a balance of 2×10¹² + 47 in an event and in a
        // snapshot; and one event that does not parse at all.
        let store = market_service::store::Store::connect(&url).await.unwrap();
        store
            .execute_unchecked("UPDATE events SET payload = REPLACE(payload, '\"1000000000000.000000\"', '\"2000000000047.000000\"') WHERE aggregate_id = 'account-alice'".into())
            .await
            .unwrap();
        store
            .execute_unchecked("UPDATE snapshots SET state = REPLACE(state, '\"1000000000000.000000\"', '\"2000000000047.000000\"') WHERE aggregate_id = 'account-alice'".into())
            .await
            .unwrap();
        let broken = store
            .execute_unchecked("UPDATE events SET payload = '{\"type\":\"FundsGranted\",\"amount\":[]}' WHERE aggregate_id = 'account-carol' AND version = 2".into())
            .await
            .unwrap();
        assert_eq!(broken, 1);
        store.close().await;

        let s = Svc::start(&url, 2).await;
        assert_eq!(s.balance("alice").await, Micro::units(2_000_000_000_047).0, "stored amounts read back");
        let (st, v) = s
            .call("POST", "/accounts/alice/grants", &[("authorization", ADMIN)], json!({"amount": "1"}))
            .await;
        assert_eq!((st, v["field"].as_str()), (422, Some("balance")), "refused, not 503: {v}");
        assert_eq!(s.balance("bob").await, Micro::units(10).0, "the others are served");
        let (st, v) = s.act("carol", "GET", "/accounts/carol", Value::Null).await;
        assert_eq!(st, 503, "{v}");
        assert!(v["message"].as_str().unwrap().contains("account-carol"), "{v}");
        let (st, v) = s.get("/healthz").await;
        assert_eq!(st, 200, "{v}");
        assert!(v["unreadable_aggregates"]["account-carol"].is_string(), "{v}");
        assert_eq!(s.get("/analytics/platform").await.0, 200);
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_chain_detects_a_modified_event() {
    let dir = tempfile::tempdir().unwrap();
    for url in databases(&dir).await {
        let s = Svc::start(&url, 50).await;
        s.account("alice", "1000").await;
        let id = s.market("alice", 3_600_000).await;
        for _ in 0..3 {
            s.act(
                "alice",
                "POST",
                &format!("/markets/{id}/trades"),
                json!({"outcome": 1, "side": "buy", "shares": "2"}),
            )
            .await;
        }
        assert_eq!(s.get(&format!("/markets/{id}/audit")).await.1["valid"], true);
        let store = market_service::store::Store::connect(&s.url).await.unwrap();
        let changed = store
            .execute_unchecked(format!(
                "UPDATE events SET payload = REPLACE(payload, '\"shares\":\"2.000000\"', '\"shares\":\"20.000000\"') WHERE aggregate_id = 'market-{id}' AND version = 3"
            ))
            .await
            .unwrap();
        assert_eq!(changed, 1);
        let (_, v) = s.get(&format!("/markets/{id}/audit")).await;
        assert_eq!(
            (v["valid"].as_bool(), v["first_invalid_version"].as_u64()),
            (Some(false), Some(3)),
            "{v}"
        );
        store.close().await;
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn markets_close_at_their_close_time() {
    let dir = tempfile::tempdir().unwrap();
    for url in databases(&dir).await {
        let s = Svc::start(&url, 50).await;
        s.account("alice", "1000").await;
        let id = s.market("alice", 300).await;
        eventually(WAIT, "the market closes", || async {
            s.get(&format!("/markets/{id}")).await.1["status"] == "closed"
        })
        .await;
        let (st, v) = s.buy_one("alice", &id).await;
        assert_eq!((st, v["error"].as_str()), (409, Some("market_not_open")));
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_events_reach_the_bus_through_the_sidecar_once_each() {
    use futures::StreamExt;
    use mesh_proto::v1;
    let (cp, _sc, _sdir, admin) = crate::support::bus_and_sidecar().await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/market.db", dir.path().display());
    let s = Svc::start_with(&url, |c| c.sidecar_admin = Some(admin)).await;
    s.account("alice", "1000").await;
    let id = s.market("alice", 3_600_000).await;
    assert_eq!(
        s.act(
            "alice",
            "POST",
            &format!("/markets/{id}/trades"),
            json!({"outcome": 0, "side": "buy", "shares": "1"})
        )
        .await
        .0,
        201
    );

    let topic = |t: &'static str| {
        let ch = cp.channel();
        async move {
            let req = v1::ReplayRequest {
                topic: t.into(),
                from_offset: Some(0),
                from_time_unix_ms: None,
                limit: 1000,
            };
            let stream =
                v1::events_client::EventsClient::new(ch.await).replay(req).await.unwrap().into_inner();
            stream.map(|d| d.unwrap().event.unwrap()).collect::<Vec<_>>().await
        }
    };
    eventually(WAIT, "market events reach the bus", || async { topic("market-events").await.len() == 2 })
        .await;
    let market = topic("market-events").await;
    assert_eq!(
        market.iter().map(|e| e.r#type.as_str()).collect::<Vec<_>>(),
        ["MarketCreated", "TradeExecuted"]
    );
    assert!(market.iter().all(|e| e.key == id), "keyed by the market's id: order per market");
    let payload: Value = serde_json::from_slice(&market[1].data).unwrap();
    assert_eq!(payload["type"], "TradeExecuted");
    eventually(WAIT, "account events too", || async { topic("account-events").await.len() == 4 }).await;
    let store = market_service::store::Store::connect(&url).await.unwrap();
    eventually(WAIT, "the outbox is drained", || async {
        store.outbox_pending(10).await.unwrap().is_empty()
    })
    .await;
    store.close().await;
    s.stop().await;
}
