//! Test harness for whole-mesh tests: a control plane, sidecars and HTTP backends on port 0 of
//! 127.0.0.1, started through the same `run` / `serve` functions the binaries use, each stopped
//! when dropped. Also: the real binaries as child processes (for SIGKILL), a plain HTTP client,
//! and eventual assertions.
// Test support: plain tasks and wall-clock waits are what a harness needs.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod backend;
mod client;
mod collector;
mod cp;
mod dns;
mod etcd;
mod eventually;
mod fault;
mod load;
mod process;
mod sidecars;

pub use backend::*;
pub use client::*;
pub use collector::*;
pub use cp::*;
pub use dns::*;
pub use etcd::*;
pub use eventually::*;
pub use fault::*;
pub use load::*;
pub use mesh_proto::dial::AdminToken as Bearer;
pub use process::*;
pub use sidecar::{Config as SidecarConfig, Mode};
pub use sidecars::*;
