//! Why the control plane could not start or stopped serving.

use crate::{bus::error::BusError, ca, store};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("event bus: {0}")]
    Bus(#[from] BusError),
    #[error("certificate authority: {0}")]
    Ca(#[from] ca::CaError),
    #[error("admin token file {path}: {reason}")]
    AdminToken { path: String, reason: String },
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("{0}")]
    Telemetry(String),
    /// Settings that cannot work together, or a shared store that cannot be used.
    #[error("{0}")]
    Config(String),
    #[error("admin HTTP server failed: {0}")]
    Admin(#[source] std::io::Error),
}
