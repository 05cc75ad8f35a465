//! Whole-system tests: `meshctl up`, the README's commands, and the deploy files checked by the tools users have.
//!
//! One test binary for the crate (faster to link than one per file); each module is one area.

// Tests spawn plain tasks (their spans are the product's concern) and may time real waits.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod check;
mod dashboard;
mod dashboards;
mod deploy;
mod grpc;
mod ha;
mod layout;
mod local;
mod logs;
mod management;
mod metrics;
mod openapi;
mod readme;
mod tap;
mod top;
mod traces;
mod up;
