//! What every Opinion Market Mesh binary and server shares: the process frame (tracing, runtime,
//! signals, exit code), local addresses and Unix sockets, the JSON error body of every HTTP
//! listener, reconnect backoff over control-plane URLs, secrets and SHA-256, spans over OTLP.

mod addr;
mod backoff;
mod digest;
pub mod exposition;
mod http;
mod process;
mod secret;
mod task;
pub mod telemetry;

pub use addr::{LocalAddr, LocalListener, bind_unix};
pub use backoff::{Backoff, Rotation};
pub use digest::{base64, base64_decode, base64url, hex, sha256, sha256_parts, write_hex};
pub use http::{PROBLEM_JSON, error_body, error_response, problem_title, serve_http};
pub use process::{
    LogFormat, init_tracing, main, parse_duration, runtime, serve_until_signal, shutdown_signal,
};
pub use secret::{Existing, random_token, read_secret, write_secret};
pub use task::{spawn, spawn_tracked};

#[cfg(test)]
mod tests;
