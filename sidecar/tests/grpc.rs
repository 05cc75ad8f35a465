//! gRPC through two sidecars (outbound → inbound): unary and bidirectional streaming, with
//! statuses (trailers) intact. The app behind the mesh is a real tonic server — a second
//! control plane, registered as service `grpc-app`.

use std::time::Duration;

use futures::StreamExt;
use mesh_proto::v1::{self, policy_stream_request::Kind};
use mesh_testkit::{Backend, TestCp, TestSidecar, WAIT, eventually, fast_policy};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

/// Everything that must outlive the test body.
type Held = (TestCp, Vec<TestSidecar>, Backend, Vec<tempfile::TempDir>);

async fn through_mesh() -> (Held, TestCp, Channel) {
    let mesh = TestCp::start().await;
    let app = TestCp::start().await;
    let mut p = fast_policy();
    p.health.probe_interval = Duration::ZERO; // a gRPC app has no HTTP/1.1 /healthz
    mesh.set_policy("grpc-app", &p).await;
    mesh.set_policy("web", &fast_policy()).await;
    let dirs = vec![tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let server_side =
        TestSidecar::start(TestSidecar::config(&mesh.url(), "grpc-app", "g1", app.grpc, dirs[0].path()))
            .await;
    let web = Backend::start("web").await;
    let mut cfg = TestSidecar::config(&mesh.url(), "web", "web-1", web.addr, dirs[1].path());
    cfg.upstreams = vec!["grpc-app".into()];
    let caller = TestSidecar::start(cfg).await;
    eventually(WAIT, "grpc-app registered", || async { mesh.endpoints("grpc-app").await == ["g1"] }).await;
    eventually(WAIT, "the caller's sidecar knows grpc-app", || async {
        caller.config_json().await["upstreams"].as_array().is_some_and(|ups| {
            ups.iter().any(|u| {
                u["service"] == "grpc-app" && u["endpoints"].as_array().is_some_and(|e| !e.is_empty())
            })
        })
    })
    .await;
    // The app's gRPC client talks to its own sidecar, naming the service in :authority.
    let ch = Endpoint::from_shared(format!("http://{}", caller.outbound))
        .unwrap()
        .origin("http://grpc-app".parse().unwrap())
        .connect()
        .await
        .unwrap();
    ((mesh, vec![server_side, caller], web, dirs), app, ch)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_calls_and_error_statuses_pass_intact() {
    let (_held, _app, ch) = through_mesh().await;
    let mut admin = v1::admin_client::AdminClient::new(ch.clone());
    let mut ok = None;
    for _ in 0..200 {
        match admin.overview(v1::OverviewRequest {}).await {
            Ok(r) => {
                ok = Some(r.into_inner());
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let o = ok.expect("unary call through the mesh");
    assert_eq!(o.server_version, env!("CARGO_PKG_VERSION"));

    let e = v1::registry_client::RegistryClient::new(ch)
        .get_service(v1::GetServiceRequest { name: "nothing".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert!(e.message().contains("nothing"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_refusals_reach_grpc_clients_as_grpc_statuses() {
    let (held, _app, _) = through_mesh().await;
    // A service nobody serves: the sidecar refuses in gRPC's terms, not with a JSON body.
    let caller = format!("http://{}", held.1[1].outbound);
    let ch = Endpoint::from_shared(caller)
        .unwrap()
        .origin("http://nobody-here".parse().unwrap())
        .connect()
        .await
        .unwrap();
    let e = v1::admin_client::AdminClient::new(ch).overview(v1::OverviewRequest {}).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    assert!(e.message().contains("nobody-here"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bidirectional_streams_pass_both_ways() {
    let (_held, app, ch) = through_mesh().await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let sub = v1::PolicySubscribe { node_id: "n".into(), service: "x".into(), services: vec!["x".into()] };
    tx.send(v1::PolicyStreamRequest { kind: Some(Kind::Subscribe(sub)) }).await.unwrap();
    let mut pushes =
        v1::policy_client::PolicyClient::new(ch).stream(ReceiverStream::new(rx)).await.unwrap().into_inner();
    let first = tokio::time::timeout(WAIT, pushes.next()).await.unwrap().unwrap().unwrap();
    assert_eq!((first.service.as_str(), first.version), ("x", 0));
    let ack = v1::PolicyAck { service: first.service, version: first.version, nonce: first.nonce };
    tx.send(v1::PolicyStreamRequest { kind: Some(Kind::Ack(ack)) }).await.unwrap();

    // A change on the server side reaches the client through both sidecars mid-stream.
    app.set_policy("x", &fast_policy()).await;
    let second = tokio::time::timeout(WAIT, pushes.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(second.version, 1);

    // A protocol error from the server arrives as a status (in trailers) on the open stream.
    tx.send(v1::PolicyStreamRequest { kind: None }).await.unwrap();
    let e = tokio::time::timeout(WAIT, pushes.next()).await.unwrap().unwrap().unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
}
