//! Endpoints: the connection [`pool`] per upstream, `forward`ing one request on it, and the
//! `local_app` beside a sidecar.

pub(crate) mod forward;
pub(crate) mod local_app;
pub mod pool;
