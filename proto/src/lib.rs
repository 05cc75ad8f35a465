//! The contracts of Opinion Market Mesh.
//!
//! - [`v1`]: code generated from `proto/mesh/v1/*.proto` (package `mesh.v1`) by `build.rs` with
//!   protox, so no system `protoc` is needed. Clients and servers for `Registry`, `Discovery`,
//!   `Policy`, `Identity`, `Events` and `Admin` live under `v1::<service>_client` / `_server`.
//! - [`policy`]: the validated per-service policy model and its conversions from and to the wire.
//! - [`dial`]: reaching the control plane over TLS (or plaintext), and the TLS helpers the
//!   control plane and the sidecar share.
//! - [`names`]: validation of service names, instance ids, topics, header names and addresses.
//! - [`topology`]: the latency buckets of observed edges, and percentiles read from them.
//!
//! This is the only crate that defines wire types; the others convert at their edge.

/// Re-exported so other crates encode and decode these messages without naming prost themselves.
pub use prost;

pub mod cloudevents;
pub mod dial;
pub mod field;
pub mod gateway;
pub mod json;
pub mod names;
pub mod policy;
pub mod topology;
pub use cloudevents::{delivery_json, replay_json};

/// Generated messages, clients and servers of package `mesh.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("mesh.v1");
}

/// The subset of etcd's v3 API the control plane's `--store etcd` uses (clients only): its
/// packages `etcdserverpb`, `mvccpb` and `v3electionpb`, so paths and messages are etcd's own.
#[allow(clippy::all, missing_docs)]
pub mod etcd {
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
    pub mod v3electionpb {
        tonic::include_proto!("v3electionpb");
    }
}

/// The encoded `FileDescriptorSet` of `mesh.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/mesh_v1_descriptor.bin"));

/// How many events `Events.Replay` returns when the request names no limit.
pub const DEFAULT_REPLAY_LIMIT: u32 = 1000;

/// Time since the Unix epoch in milliseconds (wall clock, for timestamps on the wire).
pub fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
