//! Compiles `proto/mesh/v1/*.proto` with protox (a pure-Rust protoc), so building the workspace
//! needs no system `protoc`. The encoded descriptor set is written beside the generated code for
//! gRPC server reflection. It also compiles the subset of etcd's v3 API in `proto/etcd/` (client only).

use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/mesh/v1/common.proto",
        "proto/mesh/v1/policy.proto",
        "proto/mesh/v1/registry.proto",
        "proto/mesh/v1/discovery.proto",
        "proto/mesh/v1/identity.proto",
        "proto/mesh/v1/events.proto",
        "proto/mesh/v1/admin.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("mesh_v1_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;

    // The part of etcd's v3 API the control plane's `--store etcd` uses: a client only, compiled
    // the same way so no system protoc is needed (the etcd-client crate's build script needs one).
    let etcd = ["proto/etcd/mvcc.proto", "proto/etcd/rpc.proto", "proto/etcd/election.proto"];
    for f in &etcd {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(etcd, ["proto"])?;
    tonic_prost_build::configure().build_client(true).build_server(false).compile_fds(fds)?;
    Ok(())
}
