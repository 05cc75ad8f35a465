//! The sidecar's integration tests: real sidecars, a real control plane and real backends on loopback.
//!
//! One test binary for the crate (faster to link than one per file); each module is one area.

// Tests spawn plain tasks (their spans are the product's concern) and may time real waits.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod cli;
mod cloudevents;
mod edge;
mod edge_auth;
mod events;
mod failstatic;
mod grpc;
mod identity;
mod mesh;
mod mtls;
mod subscriptions;
mod topology;
mod traces;
