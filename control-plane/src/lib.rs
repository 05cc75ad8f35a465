//! The Opinion Market Mesh control plane.
//!
//! - [`registry`]: instances, heartbeats, TTL expiry with self-preservation, deregistration; one
//!   `watch` channel per service feeds discovery.
//! - [`policy`]: versioned per-service policies, persisted and pushed.
//! - [`store`]: the redb file in the data dir; fsync before anything is acknowledged.
//! - [`api`]: the gRPC handlers (`Registry`, `Discovery`, `Policy`, `Events`, `Admin`).
//! - [`bus`]: the event bus (embedded in the store, or [`bus_nats`] on NATS JetStream).
//! - [`http`]: the admin HTTP listener (`/metrics`, `/healthz`).
//! - [`cli`]: `meshctl`, a thin client of the API.
//!
//! [`ControlPlane::open`] restores state from a data dir; [`ControlPlane::serve`] takes bound
//! listeners and a shutdown token, so tests run it on port 0 exactly as the binary does.

pub mod api;
pub(crate) mod auth;
pub mod bus;
pub mod ca;
pub mod config;
pub mod error;
pub(crate) mod http;
pub(crate) mod metrics;
pub(crate) mod policy;
pub(crate) mod proxies;
pub(crate) mod registry;
pub mod server;
pub(crate) mod state;
pub(crate) mod store;
pub(crate) mod transport;
pub mod watch_limits;

pub use config::{BusBackend, Config};
pub use error::Error;
pub use server::ControlPlane;
