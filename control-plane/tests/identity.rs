//! The mesh CA over real gRPC: bootstrap tokens per service, CSR signing, revocation.

use mesh_proto::v1::{self, identity_client::IdentityClient};
use mesh_testkit::{TestCp, TestStore};
use rustls_pki_types::{CertificateDer, pem::PemObject};

fn csr() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["whatever.example".to_string()]).unwrap();
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn certify(service: &str, token: &str, csr_pem: String) -> v1::CertifyRequest {
    v1::CertifyRequest { service: service.into(), csr_pem, token: token.into(), node_id: String::new() }
}

async fn a_token_certifies_its_own_service_only_and_revocation_ends_it(store: TestStore) {
    let cp = TestCp::start_on(&store, |_| {}).await;
    let mut ca = IdentityClient::new(cp.channel().await);
    let token = cp.token("market").await;
    assert_eq!(token.len(), 64);

    let r = ca.certify(certify("market", &token, csr())).await.unwrap().into_inner();
    assert_eq!(r.spiffe_id, "spiffe://mesh.local/service/market");
    let now = mesh_proto::unix_ms(std::time::SystemTime::now());
    assert!((r.expires_at_unix_ms - now).abs_diff(24 * 3600 * 1000) < 60_000, "24 h by default");
    let leaf = CertificateDer::from_pem_slice(r.certificate_chain_pem.as_bytes()).unwrap();
    let root = CertificateDer::from_pem_slice(r.trust_anchors_pem.as_bytes()).unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    let (_, root) = x509_parser::parse_x509_certificate(&root).unwrap();
    leaf.verify_signature(Some(root.public_key())).expect("signed by the mesh root");
    let sans: Vec<String> = leaf
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(sans, ["URI(spiffe://mesh.local/service/market)"], "the CSR's own names are not issued");

    let denied = ca.certify(certify("payments", &token, csr())).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied}");
    assert!(denied.message().contains("market"), "{denied}");
    for bad in ["", "0000", &"f".repeat(64)] {
        let e = ca.certify(certify("market", bad, csr())).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "token {bad:?}: {e}");
    }
    let e = ca.certify(certify("market", &token, "not a csr".into())).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    let e = ca.certify(certify("Bad Name", &token, csr())).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");

    let bundle = ca.trust_bundle(v1::TrustBundleRequest {}).await.unwrap().into_inner();
    assert_eq!(bundle.trust_anchors_pem, r.trust_anchors_pem);
    assert!(!bundle.trust_anchors_pem.contains("PRIVATE KEY"));

    let revoked = ca.revoke_tokens(v1::RevokeTokensRequest { service: "market".into() }).await.unwrap();
    assert_eq!(revoked.into_inner().revoked, 1);
    let e = ca.certify(certify("market", &token, csr())).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "a revoked token: {e}");
}

async fn tokens_and_the_root_survive_a_restart(store: TestStore) {
    let cp = TestCp::start_on(&store, |_| {}).await;
    let mut ca = IdentityClient::new(cp.channel().await);
    let token = cp.token("market").await;
    let root = ca.trust_bundle(v1::TrustBundleRequest {}).await.unwrap().into_inner().trust_anchors_pem;
    let dir = cp.stop().await;
    let cp = TestCp::start_in(dir, |c| store.apply(c)).await;
    let mut ca = IdentityClient::new(cp.channel().await);
    let r = ca.certify(certify("market", &token, csr())).await.unwrap().into_inner();
    assert_eq!(r.trust_anchors_pem, root, "the same root after a restart");
}

mesh_testkit::on_both_stores!(
    a_token_certifies_its_own_service_only_and_revocation_ends_it,
    tokens_and_the_root_survive_a_restart,
);
