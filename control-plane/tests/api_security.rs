//! The control plane's own API: TLS, sidecars authenticated by their mesh certificates and
//! limited to their own service, the admin by token; refusals are UNAUTHENTICATED or
//! PERMISSION_DENIED and change nothing.

use std::time::Duration;

use mesh_proto::{dial::Dialer, v1};
use mesh_testkit::instance;
use mesh_testkit::{TestCp, http_metric};
use tokio_stream::StreamExt;
use tonic::{Code, transport::Endpoint};

/// A CSR for a fresh key: (key PEM, CSR PEM).
fn csr() -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    (key.serialize_pem(), csr)
}

/// A certificate for `service` from `cp`'s CA: (chain PEM, key PEM).
async fn certificate(cp: &TestCp, service: &str) -> (String, String) {
    let token = cp.token(service).await;
    // Certify needs no client certificate: the token is the credential.
    let anonymous = cp.dialer(None).connect(Endpoint::from_shared(cp.url()).unwrap()).await.unwrap();
    let (key, csr_pem) = csr();
    let r = v1::identity_client::IdentityClient::new(anonymous)
        .certify(v1::CertifyRequest { service: service.into(), csr_pem, token, node_id: String::new() })
        .await
        .unwrap()
        .into_inner();
    (r.certificate_chain_pem, key)
}

async fn as_client(cp: &TestCp, cert: Option<&(String, String)>) -> tonic::transport::Channel {
    let client = cert.map(|(c, k)| (c.as_str(), k.as_str()));
    cp.dialer(client).connect(Endpoint::from_shared(cp.url()).unwrap()).await.unwrap()
}

async fn services(cp: &TestCp) -> Vec<String> {
    let r = v1::registry_client::RegistryClient::new(cp.channel().await)
        .list_services(v1::ListServicesRequest {})
        .await
        .unwrap()
        .into_inner();
    r.services.into_iter().map(|s| s.name).collect()
}

fn code<T>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

#[tokio::test]
async fn a_sidecar_acts_only_as_its_own_service_and_nothing_changes_when_refused() {
    let cp = TestCp::start_secure().await;
    let market = certificate(&cp, "market").await;
    let ch = as_client(&cp, Some(&market)).await;
    let mut registry = v1::registry_client::RegistryClient::new(ch.clone());

    // Its own service: allowed.
    let own = v1::RegisterRequest { instance: Some(instance("market", "m1", 9001)) };
    registry.register(own).await.expect("a sidecar registers its own service");

    // Another service's name: refused, and the registry is as it was.
    let before = services(&cp).await;
    let forged = v1::RegisterRequest { instance: Some(instance("payments", "p1", 9002)) };
    let e = registry.register(forged).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("payments"), "the refusal names the service: {e:?}");
    assert_eq!(services(&cp).await, before, "the registry is unchanged");
    assert_eq!(before, ["market"]);

    // Heartbeats and deregistration as another service: refused too.
    let hb =
        v1::HeartbeatRequest { service: "payments".into(), instance_id: "p1".into(), ..Default::default() };
    let mut answers = registry.heartbeat(tokio_stream::iter([hb])).await.unwrap().into_inner();
    let first = answers.next().await.expect("an answer");
    assert_eq!(code(first), Code::PermissionDenied);
    let own_hb =
        v1::HeartbeatRequest { service: "market".into(), instance_id: "m1".into(), ..Default::default() };
    let mut answers = registry.heartbeat(tokio_stream::iter([own_hb])).await.unwrap().into_inner();
    assert!(answers.next().await.unwrap().unwrap().known, "its own heartbeat is accepted");
    let dereg = v1::DeregisterRequest { service: "payments".into(), instance_id: "p1".into() };
    assert_eq!(code(registry.deregister(dereg).await), Code::PermissionDenied);

    // Policy streams as another service: refused; as itself (or as a client only): allowed.
    let mut policy = v1::policy_client::PolicyClient::new(ch.clone());
    let sub = |service: &str| v1::PolicyStreamRequest {
        kind: Some(v1::policy_stream_request::Kind::Subscribe(v1::PolicySubscribe {
            node_id: "m1".into(),
            service: service.into(),
            services: vec!["market".into(), "payments".into()],
        })),
    };
    let mut s = policy.stream(tokio_stream::iter([sub("payments")])).await.unwrap().into_inner();
    assert_eq!(code(s.next().await.expect("an answer")), Code::PermissionDenied);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(sub("market")).await.unwrap();
    let mut s = policy.stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    assert!(s.next().await.unwrap().is_ok(), "its own policy stream gets pushes");

    // Discovery of any service: allowed (a sidecar calls others).
    let mut watch = v1::discovery_client::DiscoveryClient::new(ch.clone())
        .watch(v1::WatchRequest { services: vec!["payments".into()], node_id: "m1".into() })
        .await
        .expect("watching is open to mesh identities")
        .into_inner();
    assert!(watch.next().await.unwrap().is_ok());

    // Admin calls: refused for a sidecar.
    let set = v1::SetPolicyRequest {
        service: "market".into(),
        policy: Some(Default::default()),
        ..Default::default()
    };
    assert_eq!(code(policy.set(set).await), Code::PermissionDenied);
    let mut admin = v1::admin_client::AdminClient::new(ch.clone());
    assert_eq!(code(admin.overview(v1::OverviewRequest {}).await), Code::PermissionDenied);
    let mut ca = v1::identity_client::IdentityClient::new(ch.clone());
    let e = ca.create_token(v1::CreateTokenRequest { service: "payments".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let admin_policy = v1::policy_client::PolicyClient::new(cp.channel().await)
        .get(v1::GetPolicyRequest { service: "market".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(admin_policy.version, 0, "no policy was set");

    let metrics =
        http_metric(cp.admin, "mesh_control_plane_api_refused_total{code=\"permission_denied\"}").await;
    assert!(metrics >= 7.0, "refusals are counted: {metrics}");
}

#[tokio::test]
async fn without_a_credential_only_certify_and_the_trust_bundle_answer() {
    let cp = TestCp::start_secure().await;
    let ch = as_client(&cp, None).await;
    let reg = v1::RegisterRequest { instance: Some(instance("market", "m1", 9001)) };
    let e = v1::registry_client::RegistryClient::new(ch.clone()).register(reg).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(
        e.message().contains("certificate") && e.message().contains("admin token"),
        "says what to present: {e:?}"
    );
    let mut policy = v1::policy_client::PolicyClient::new(ch.clone());
    let set = v1::SetPolicyRequest {
        service: "market".into(),
        policy: Some(Default::default()),
        ..Default::default()
    };
    assert_eq!(code(policy.set(set).await), Code::Unauthenticated);
    assert_eq!(code(policy.list(v1::ListPoliciesRequest {}).await), Code::Unauthenticated);
    let watch = v1::WatchRequest { services: vec!["market".into()], node_id: "x".into() };
    assert_eq!(
        code(v1::discovery_client::DiscoveryClient::new(ch.clone()).watch(watch).await),
        Code::Unauthenticated
    );
    let publish = v1::PublishRequest { events: vec![] };
    assert_eq!(
        code(v1::events_client::EventsClient::new(ch.clone()).publish(publish).await),
        Code::Unauthenticated
    );
    let bundle = v1::identity_client::IdentityClient::new(ch.clone())
        .trust_bundle(v1::TrustBundleRequest {})
        .await
        .expect("the trust bundle is public")
        .into_inner();
    assert_eq!(bundle.trust_anchors_pem, cp.ca_pem());
    assert!(services(&cp).await.is_empty(), "nothing was registered");

    // A bearer token that is not the admin token.
    let mut wrong = tonic::Request::new(v1::OverviewRequest {});
    wrong.metadata_mut().insert("authorization", "Bearer not-the-admin-token".parse().unwrap());
    let e = v1::admin_client::AdminClient::new(ch.clone()).overview(wrong).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("admin token"), "{e:?}");
    let n = http_metric(cp.admin, "mesh_control_plane_api_refused_total{code=\"unauthenticated\"}").await;
    assert!(n >= 6.0, "{n}");
}

/// Registers `market/m1` over `ch` if it connected.
async fn try_register(ch: Result<tonic::transport::Channel, String>) -> Result<(), tonic::Status> {
    let ch = ch.map_err(tonic::Status::unavailable)?;
    let req = v1::RegisterRequest { instance: Some(instance("market", "m1", 9001)) };
    v1::registry_client::RegistryClient::new(ch).register(req).await.map(|_| ())
}

#[tokio::test]
async fn plaintext_foreign_certificates_and_unknown_servers_get_no_api() {
    let cp = TestCp::start_secure().await;
    // Plaintext gRPC to the TLS port.
    let plain = Endpoint::from_shared(format!("http://{}", cp.grpc))
        .unwrap()
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(5));
    let r = try_register(plain.connect().await.map_err(|e| e.to_string())).await;
    assert!(r.is_err(), "plaintext is refused");

    // A client certificate from another CA: the handshake fails, no call gets through.
    let other = tempfile::tempdir().unwrap();
    let foreign_ca =
        control_plane::ca::Ca::open(other.path(), None, "mesh.local", Duration::from_secs(3600)).unwrap();
    let (key, csr_pem) = csr();
    let (chain, _) = foreign_ca.certify("market", &csr_pem, std::time::SystemTime::now()).unwrap();
    let dialer = cp.dialer(Some((&chain, &key)));
    let r = try_register(
        dialer.connect(Endpoint::from_shared(cp.url()).unwrap()).await.map_err(|e| e.to_string()),
    )
    .await;
    assert!(r.is_err(), "a foreign certificate is refused: {r:?}");
    assert!(services(&cp).await.is_empty(), "nothing was registered");
    let failures = http_metric(cp.admin, "mesh_control_plane_api_handshake_failures_total").await;
    assert!(failures >= 2.0, "failed handshakes are counted: {failures}");

    // The client side: a control plane whose certificate is not from the mesh root is not
    // trusted (here: trusting another root).
    let wrong_root = Dialer::trusting(&foreign_ca.root_pem).unwrap();
    let e = wrong_root.connect(Endpoint::from_shared(cp.url()).unwrap()).await.unwrap_err();
    assert!(e.to_string().contains("certificate"), "{e}");
    // And an https URL without a root to check it against is an error that says so.
    let e = Dialer::plaintext().connect(Endpoint::from_shared(cp.url()).unwrap()).await.unwrap_err();
    assert!(e.to_string().contains("--control-plane-ca"), "{e}");
}

#[tokio::test]
async fn connections_that_never_finish_a_handshake_are_bounded() {
    let cp = TestCp::start_with(|c| {
        c.insecure_api = false;
        c.max_pending_handshakes = 2;
    })
    .await;
    // Two connections that never send a ClientHello hold both handshake slots…
    let idle = [
        tokio::net::TcpStream::connect(cp.grpc).await.unwrap(),
        tokio::net::TcpStream::connect(cp.grpc).await.unwrap(),
    ];
    mesh_testkit::eventually(mesh_testkit::WAIT, "a third connection is turned away", || async {
        try_register(
            cp.dialer(None)
                .connect(Endpoint::from_shared(cp.url()).unwrap())
                .await
                .map_err(|e| e.to_string()),
        )
        .await
        .is_err_and(|s| s.code() == Code::Unavailable)
    })
    .await;
    assert!(http_metric(cp.admin, "mesh_control_plane_api_handshake_failures_total").await >= 1.0);
    // …and once they go, the API answers again (anonymous: UNAUTHENTICATED, not a dead socket).
    drop(idle);
    mesh_testkit::eventually(mesh_testkit::WAIT, "the API answers again", || async {
        let ch = cp
            .dialer(None)
            .connect(Endpoint::from_shared(cp.url()).unwrap())
            .await
            .map_err(|e| e.to_string());
        try_register(ch).await.is_err_and(|s| s.code() == Code::Unauthenticated)
    })
    .await;
}

/// The certificate the API presents on a new connection (verified against the mesh root).
async fn server_certificate(cp: &TestCp) -> Vec<u8> {
    let config = std::sync::Arc::new(mesh_proto::dial::client_config(&cp.ca_pem(), None).unwrap());
    let tcp = tokio::net::TcpStream::connect(cp.grpc).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test]
async fn the_apis_own_certificate_is_reissued_before_it_expires() {
    // 3 s certificates: the API's is reissued 2 s after it was made.
    let cp = TestCp::start_with(|c| {
        c.insecure_api = false;
        c.cert_ttl = Duration::from_secs(3);
    })
    .await;
    let first = server_certificate(&cp).await;
    assert_eq!(server_certificate(&cp).await, first, "the same certificate until it is due");
    mesh_testkit::eventually(
        mesh_testkit::WAIT,
        "a reissued certificate, still from the mesh root",
        || async { server_certificate(&cp).await != first },
    )
    .await;
}

/// One reflection request over `ch` (with the admin token when `admin` names it): the services
/// it lists, or the refusal.
async fn reflected_services(
    ch: tonic::transport::Channel,
    admin: Option<String>,
) -> Result<Vec<String>, tonic::Status> {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let ask = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut call = tonic::Request::new(tokio_stream::iter([ask]));
    if let Some(token) = admin {
        call.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    let mut answers = ServerReflectionClient::new(ch).server_reflection_info(call).await?.into_inner();
    match answers.next().await.transpose()?.and_then(|r| r.message_response) {
        Some(MessageResponse::ListServicesResponse(l)) => Ok(l.service.into_iter().map(|s| s.name).collect()),
        other => panic!("not a service list: {other:?}"),
    }
}

#[tokio::test]
async fn reflection_answers_members_and_the_admin_and_health_answers_anyone() {
    let cp = TestCp::start_secure().await;
    let anonymous = as_client(&cp, None).await;
    let e = reflected_services(anonymous.clone(), None).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let member = as_client(&cp, Some(&certificate(&cp, "market").await)).await;
    let listed = reflected_services(member, None).await.unwrap();
    assert!(listed.iter().any(|s| s == "mesh.v1.Registry"), "{listed:?}");
    let admin = reflected_services(anonymous.clone(), Some(cp.admin_token())).await;
    assert!(admin.is_ok(), "the admin (meshctl) may list the API: {admin:?}");
    // Liveness probes carry no credential.
    let health = tonic_health::pb::health_client::HealthClient::new(anonymous)
        .check(tonic_health::pb::HealthCheckRequest { service: "mesh.v1.Registry".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status(), tonic_health::pb::health_check_response::ServingStatus::Serving);
}
