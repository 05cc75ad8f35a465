//! The market service's integration tests: its HTTP API over SQLite and PostgreSQL.
//!
//! One test binary for the crate (faster to link than one per file); each module is one area.

// Tests spawn plain tasks (their spans are the product's concern) and may time real waits.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod api;
mod audit;
mod group_commit;
mod support;
