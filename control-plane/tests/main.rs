//! The control plane's integration tests: the real server (in process and as its binary) over real gRPC.
//!
//! One test binary for the crate (faster to link than one per file); each module is one area.

// Tests spawn plain tasks (their spans are the product's concern) and may time real waits.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod api_security;
mod discovery;
mod events;
mod ha;
mod identity;
mod policy;
mod process;
