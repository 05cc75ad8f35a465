//! The Opinion Market Mesh control plane.
//!
//! - `registry`: instances, heartbeats, TTL expiry with self-preservation, deregistration; one
//!   `watch` channel per service feeds discovery.
//! - `policy`: versioned per-service policies, persisted and pushed.
//! - `store`: the redb file in the data dir; fsync before anything is acknowledged.
//! - [`etcd`]: `--store etcd`, several replicas sharing policies, instances, tokens and the CA.
//! - [`api`]: one file per gRPC service (`Registry`, `Discovery`, `Policy`, `Admin`, `Events`,
//!   `Identity`) and one map from errors to `Status`; `state`: what they share.
//! - [`bus`]: the event bus (embedded in the store, or on NATS JetStream).
//! - [`ca`]: the mesh CA; `transport`: the API's TLS; `auth`: who a caller is.
//! - `http`: the admin HTTP listener (`/metrics`, `/healthz`).
//! - [`config`]: every setting and its default; [`server`]: [`ControlPlane`].
//!
//! [`ControlPlane::open`] restores state from a data dir; [`ControlPlane::serve`] takes bound
//! listeners and a shutdown token, so tests run it on port 0 exactly as the binary does. The
//! command line is the binary's (`main.rs`); `meshctl` is its own crate.

pub mod api;
pub(crate) mod auth;
pub mod bus;
pub mod ca;
pub mod config;
pub mod error;
pub mod etcd;
pub(crate) mod http;
pub(crate) mod management;
pub(crate) mod metrics;
pub(crate) mod policy;
pub(crate) mod proxies;
pub(crate) mod registry;
pub mod server;
pub(crate) mod state;
pub(crate) mod store;
pub(crate) mod tap;
pub(crate) mod topology;
pub(crate) mod traced;
pub(crate) mod transport;
pub mod watch_limits;

pub use config::{BusBackend, Config, EtcdStore, StoreBackend};
pub use error::Error;
pub use server::ControlPlane;
