//! The local app beside a sidecar, over TCP or its Unix socket.

use crate::{
    endpoint::{
        forward::{ForwardError, forward},
        pool::{Clients, Pooled},
    },
    http::body::Body,
};

use http::{Request, Response, uri::Authority};
use std::time::Duration;

/// The local app, over TCP or its Unix socket: one pool shared by inbound requests, health
/// probes and event deliveries.
#[derive(Clone)]
pub struct LocalApp {
    /// What requests name as `Host` (`localhost` over a Unix socket).
    pub authority: Authority,
    pub clients: Clients,
}

impl LocalApp {
    pub fn new(addr: &mesh_runtime::LocalAddr) -> Self {
        let defaults = mesh_proto::policy::ServicePolicy::default();
        match addr {
            // A SocketAddr always forms a valid authority.
            mesh_runtime::LocalAddr::Tcp(a) => Self {
                authority: a.to_string().parse().unwrap_or_else(|_| Authority::from_static("127.0.0.1:80")),
                clients: Clients::new(&defaults, None),
            },
            mesh_runtime::LocalAddr::Unix(path) => Self {
                authority: Authority::from_static("localhost"),
                clients: Clients::unix(&defaults, path.clone()),
            },
        }
    }

    /// Sends `req` (path and query as its URI) to the app.
    pub async fn send(
        &self,
        req: Request<Body>,
        timeout: Option<Duration>,
    ) -> Result<Response<Pooled>, ForwardError> {
        forward(&self.clients, req, &self.authority, timeout).await
    }
}
