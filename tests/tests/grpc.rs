//! Issue #19.4: a stock gRPC client — Python's grpcio with grpcio-reflection, which asks for
//! reflection v1alpha — lists the control plane's API, describes it and calls it with the admin
//! token, using nothing but reflection; without a credential it is refused.

use std::process::Command;

use serde_json::Value;

use crate::local::LocalMesh;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_reflection_lists_describes_and_calls_the_api_with_the_admin_token() {
    let Some(python) = crate::deploy::validator("python") else { return };
    let mesh = LocalMesh::start(&[]);
    let addr = mesh.address("control-plane").trim_start_matches("https://").to_string();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("grpc/reflect.py");
    let ca = mesh.state.join("control-plane/ca.pem");
    let run = |token: &std::path::Path| {
        let out = Command::new(&python).arg(&script).arg(&addr).arg(&ca).arg(token).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let v: Value = serde_json::from_str(text.trim())
            .unwrap_or_else(|e| panic!("{e}: {text} {}", String::from_utf8_lossy(&out.stderr)));
        (out.status.success(), v)
    };
    let (ok, v) = run(&mesh.state.join("control-plane/admin.token"));
    assert!(ok, "{v}");
    for service in
        ["mesh.v1.Admin", "mesh.v1.Registry", "mesh.v1.Policy", "mesh.v1.Events", "grpc.health.v1.Health"]
    {
        assert!(v["services"].as_array().unwrap().iter().any(|s| s == service), "{service} in {v}");
    }
    assert_eq!(v["overview"]["instances"], 2, "the call went through: {v}");
    let (ok, v) = run(std::path::Path::new("-"));
    assert!(!ok && v["code"] == "UNAUTHENTICATED", "{v}");
}
