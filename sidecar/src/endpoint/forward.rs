//! One request forwarded to one endpoint on a pooled connection, within a timeout.

use crate::{
    endpoint::pool::{Clients, Pooled, SendError},
    http::{
        body::Body,
        headers::{h2_uri, origin_form, strip_hop_by_hop},
    },
};

use http::{HeaderValue, Request, Response, StatusCode, Uri, Version, header, uri::Authority};
use mesh_proto::dial::root_cause;
use std::time::Duration;

/// Why a forwarded request got no response.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("connecting to {0} failed: {1}")]
    Connect(String, String),
    #[error("{0} did not answer within {ms}ms", ms = .1.as_micros().div_ceil(1000))]
    Timeout(String, Duration),
    #[error("{0} failed the request: {1}")]
    Failed(String, String),
}

impl ForwardError {
    pub fn status(&self) -> StatusCode {
        match self {
            ForwardError::Connect(..) => StatusCode::SERVICE_UNAVAILABLE,
            ForwardError::Timeout(..) => StatusCode::GATEWAY_TIMEOUT,
            ForwardError::Failed(..) => StatusCode::BAD_GATEWAY,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ForwardError::Connect(..) => "connect_failed",
            ForwardError::Timeout(..) => "timeout",
            ForwardError::Failed(..) => "upstream_failed",
        }
    }
}

/// Sends `req` to `target` (`host:port`) on a pooled connection, keeping its path, query,
/// method, version and headers (less hop-by-hop ones); waits at most `timeout` for the
/// response headers. The response body streams.
pub async fn forward(
    clients: &Clients,
    mut req: Request<Body>,
    target: &Authority,
    timeout: Option<Duration>,
) -> Result<Response<Pooled>, ForwardError> {
    if req.version() == Version::HTTP_2 {
        *req.uri_mut() = h2_uri(target, req.uri())
            .map_err(|e| ForwardError::Failed(target.to_string(), format!("bad target URI: {e}")))?;
    } else {
        if !req.headers().contains_key(header::HOST) {
            // HTTP/2 callers name the service in :authority; HTTP/1.1 apps expect a Host header.
            let host = req.uri().authority().unwrap_or(target);
            if let Ok(v) = HeaderValue::from_str(host.as_str()) {
                req.headers_mut().insert(header::HOST, v);
            }
        }
        *req.uri_mut() = Uri::from(origin_form(req.uri()));
        *req.version_mut() = Version::HTTP_11;
    }
    strip_hop_by_hop(req.headers_mut());
    let fut = clients.send(target, req);
    let result = match timeout {
        Some(t) => {
            tokio::time::timeout(t, fut).await.map_err(|_| ForwardError::Timeout(target.to_string(), t))?
        }
        None => fut.await,
    };
    result.map_err(|e| match e {
        SendError::Connect(e) => ForwardError::Connect(target.to_string(), root_cause(&*e)),
        SendError::Request(e) => ForwardError::Failed(target.to_string(), root_cause(&e)),
    })
}
