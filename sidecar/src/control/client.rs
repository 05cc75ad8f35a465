//! Reaching the control plane: one gRPC channel (TLS with the current certificate when the
//! control plane has a CA), and the errors a session ends with.

use std::time::Duration;

use tonic::transport::Channel;

use crate::shared::Shared;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cannot connect to the control plane at {0}: {1}")]
    Connect(String, String),
    #[error("control plane refused {0}: {1}")]
    Status(&'static str, tonic::Status),
    #[error("the control plane closed the {0} stream")]
    Closed(&'static str),
}

pub(crate) fn status(what: &'static str) -> impl FnOnce(tonic::Status) -> SessionError {
    move |s| SessionError::Status(what, s)
}

pub(crate) async fn connect(shared: &Shared, url: &str) -> Result<Channel, SessionError> {
    let err = |e: &dyn std::fmt::Display| SessionError::Connect(url.to_string(), e.to_string());
    // The address the session picked among the name's (TLS still checks the name; plaintext
    // just goes to the address).
    let address = *shared.cp.address.lock().unwrap_or_else(|p| p.into_inner());
    let plain;
    let url = match address {
        Some(a) if url.starts_with("http://") => {
            plain = format!("http://{a}");
            plain.as_str()
        }
        _ => url,
    };
    let endpoint = mesh_proto::dial::Dialer::endpoint(url)
        .map_err(|e| err(&e))?
        .connect_timeout(Duration::from_secs(3))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    shared.dialer.connect_at(endpoint, address).await.map_err(|e| match e {
        mesh_proto::dial::DialError::Connect(_, cause) => err(&cause),
        other => err(&other),
    })
}
