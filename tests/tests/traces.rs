//! Spans over OTLP from `meshctl up`'s mesh, received by the test kit's collector (a real gRPC
//! `TraceService`) through the standard `OTEL_EXPORTER_OTLP_ENDPOINT`: a trade through the
//! gateway is one trace — gateway → market sidecar → market service → the trade command → its
//! store commit — and the event the trade published carries the trade's span (the CloudEvents
//! distributed tracing extension). The control plane's calls have spans of their own.

use std::{collections::HashMap, process::Command};

use mesh_testkit::{CLIENT, Collector, ReceivedSpan, SERVER, WAIT, bin, eventually};
use serde_json::{Value, json};

use crate::local::LocalMesh;

const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CLIENT_SPAN: &str = "b7ad6b7169203331";

fn by_id(spans: &[ReceivedSpan]) -> HashMap<&str, &ReceivedSpan> {
    spans.iter().map(|s| (s.span_id.as_str(), s)).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trade_through_the_gateway_is_one_trace_down_to_its_commit() {
    let collector = Collector::start().await;
    let endpoint = collector.endpoint();
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "100")];
    let mesh = tokio::task::block_in_place(|| LocalMesh::start(&env));
    let gw: std::net::SocketAddr = mesh.gateway().trim_start_matches("http://").parse().unwrap();
    let call = |method: &'static str, path: String, token: Option<String>, body: Value, traced: bool| async move {
        let auth = token.map(|t| format!("Bearer {t}"));
        let tp = format!("00-{TRACE}-{CLIENT_SPAN}-01");
        let mut headers = vec![("content-type", "application/json")];
        if let Some(a) = &auth {
            headers.push(("authorization", a.as_str()));
        }
        if traced {
            headers.push(("traceparent", tp.as_str()));
        }
        let (status, text) =
            mesh_testkit::request(gw, method, "example.com", &path, &headers, body.to_string().into()).await;
        (status, serde_json::from_str::<Value>(&text).unwrap_or(Value::Null))
    };
    eventually(WAIT, "the gateway routes to market-service", || async {
        call("GET", "/api/markets".into(), None, Value::Null, false).await.0 == 200
    })
    .await;
    let issue = |args: &[&str]| {
        let out = Command::new(bin("meshctl"))
            .args(["token", "issue", "--ttl", "10m", "--dir"])
            .arg(&mesh.state)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let (alice, admin) = (issue(&["--sub", "alice"]), issue(&["--sub", "ops", "--admin"]));
    assert_eq!(call("POST", "/api/accounts".into(), Some(alice.clone()), json!({}), false).await.0, 201);
    let grant = json!({"amount": "1000"});
    assert_eq!(call("POST", "/api/accounts/alice/grants".into(), Some(admin), grant, false).await.0, 200);
    let close = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
        as u64
        + 3_600_000;
    let question =
        json!({"question": "Sun?", "outcomes": ["yes", "no"], "close_time_ms": close, "liquidity": "100"});
    let (status, market) = call("POST", "/api/markets".into(), Some(alice.clone()), question, false).await;
    assert_eq!(status, 201, "{market}");
    let id = market["id"].as_str().unwrap().to_string();

    // The traced trade.
    let trade = json!({"outcome": 0, "side": "buy", "shares": "5"});
    let (status, body) = call("POST", format!("/api/markets/{id}/trades"), Some(alice), trade, true).await;
    assert_eq!(status, 201, "{body}");
    // Gateway (server, attempt), market sidecar (server, attempt), market service (server,
    // command, commit): each process exports on its own schedule.
    eventually(WAIT, "the trade's seven spans are exported", || async { collector.trace(TRACE).len() >= 7 })
        .await;
    let spans = collector.trace(TRACE);
    let ids = by_id(&spans);
    let parent = |s: &ReceivedSpan| {
        *ids.get(s.parent_span_id.as_str())
            .unwrap_or_else(|| panic!("{s:#?}'s parent is in the trace: {spans:#?}"))
    };
    // From the commit up to the client, every parent is in the trace, in this order.
    let commit = spans.iter().find(|s| s.name == "market.commit").unwrap();
    assert_eq!((commit.service.as_str(), commit.attr("db.system.name")), ("market-service", Some("sqlite")));
    let command = parent(commit);
    assert_eq!((command.name.as_str(), command.service.as_str()), ("market.trade", "market-service"));
    let app = parent(command);
    assert_eq!((app.name.as_str(), app.kind), ("POST /markets/{id}/trades", SERVER));
    assert_eq!(app.attr("http.response.status_code"), Some("201"));
    let to_app = parent(app);
    assert_eq!(
        (to_app.service.as_str(), to_app.kind, to_app.attr("server.address")),
        ("market-service", CLIENT, Some("app"))
    );
    let inbound = parent(to_app);
    assert_eq!((inbound.kind, inbound.attr("mesh.direction")), (SERVER, Some("inbound")));
    let attempt = parent(inbound);
    assert_eq!(
        (attempt.service.as_str(), attempt.kind, attempt.attr("mesh.service")),
        ("gateway", CLIENT, Some("market-service"))
    );
    let edge = parent(attempt);
    assert_eq!(
        (edge.service.as_str(), edge.kind, edge.attr("mesh.direction")),
        ("gateway", SERVER, Some("gateway"))
    );
    assert_eq!(edge.parent_span_id, CLIENT_SPAN, "the client's span is the edge's parent");
    assert_eq!(edge.attr("http.response.status_code"), Some("201"));

    // The trade's event carries the trade command's span.
    let topic = "market-events";
    let wanted = format!("00-{TRACE}-{}-01", command.span_id);
    eventually(WAIT, "the trade's event is on the bus with the trade's trace", || async {
        let out = mesh.meshctl(&["-o", "json", "events", "replay", topic]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .any(|e| e["traceparent"] == wanted.as_str())
    })
    .await;

    // The control plane traces its own calls (sidecars registering, certificates signed).
    let cp = collector.spans().into_iter().filter(|s| s.service == "control-plane").collect::<Vec<_>>();
    assert!(cp.iter().any(|s| s.kind == SERVER && s.attr("rpc.system") == Some("grpc")), "{cp:#?}");
}
