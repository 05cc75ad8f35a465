//! What the inbound and outbound proxies share: the body type, request forwarding on the
//! connection pools of [`crate::pool`] with streaming bodies (trailers included), hop-by-hop
//! header handling, and the JSON error responses every refusal uses.

use mesh_proto::dial::root_cause;
use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version, header, uri::Authority,
};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};

pub use crate::pool::{Clients, Pooled, SendError};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every body the proxies handle: streamed, never buffered whole.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

pub fn boxed<B>(b: B) -> Body
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    b.map_err(Into::into).boxed_unsync()
}

pub fn empty() -> Body {
    boxed(http_body_util::Empty::new())
}

/// A JSON error answer: `{"error": code, "message": …}` plus any extra fields, and an
/// `x-mesh-error` header so callers can tell the mesh's refusals from their app's.
pub fn error_response(
    status: StatusCode,
    code: &str,
    message: String,
    extra: serde_json::Value,
) -> Response<Body> {
    let mut body = serde_json::json!({ "error": code, "message": message });
    if let (Some(b), serde_json::Value::Object(extra)) = (body.as_object_mut(), extra) {
        b.extend(extra);
    }
    let mut resp = Response::new(boxed(Full::new(Bytes::from(body.to_string()))));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Ok(v) = HeaderValue::from_str(code) {
        h.insert("x-mesh-error", v);
    }
    resp.extensions_mut().insert(MeshError { message });
    resp
}

/// What [`error_response`] refused with, kept for [`for_grpc`].
#[derive(Debug, Clone)]
pub struct MeshError {
    pub message: String,
}

pub fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// A mesh refusal in the shape a gRPC client understands: a trailers-only response (HTTP 200,
/// `grpc-status`, `grpc-message`) instead of a JSON body. Other responses pass unchanged.
pub fn for_grpc(resp: Response<Body>) -> Response<Body> {
    let Some(e) = resp.extensions().get::<MeshError>().cloned() else { return resp };
    let code = match resp.status().as_u16() {
        400 => 3,  // INVALID_ARGUMENT
        403 => 7,  // PERMISSION_DENIED
        404 => 12, // UNIMPLEMENTED (no route)
        429 => 8,  // RESOURCE_EXHAUSTED
        504 => 4,  // DEADLINE_EXCEEDED
        _ => 14,   // UNAVAILABLE
    };
    let mut out = Response::new(empty());
    let h = out.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert("grpc-status", HeaderValue::from(code));
    let msg: String =
        e.message.chars().map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' }).collect();
    if let Ok(v) = HeaderValue::from_str(&msg.replace('%', "%25")) {
        h.insert("grpc-message", v);
    }
    if let Some(v) = resp.headers().get("x-mesh-error") {
        h.insert("x-mesh-error", v.clone());
    }
    out
}

/// Where a client's connections are mutual TLS: the identity to present, and the service
/// whose SPIFFE id the server must have.
#[derive(Clone)]
pub struct MeshTls {
    pub identity: std::sync::Arc<crate::identity::IdentityCell>,
    pub service: String,
    /// Counts this service's HTTP/1.1 requests that went as streams of the shared HTTP/2
    /// connection (`mesh_sidecar_multiplexed_requests_total`).
    pub multiplexed: prometheus_client::metrics::counter::Counter,
}

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

/// Removes hop-by-hop headers, and those named in `Connection`; keeps `te: trailers` (gRPC).
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Most requests carry none: one pass over the names instead of a lookup per header.
    if !h.keys().any(|k| HOP_BY_HOP.contains(k) || k == header::TE) {
        return;
    }
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in HOP_BY_HOP.iter().chain(&named) {
        h.remove(n);
    }
    if h.get(header::TE).is_some_and(|v| v != "trailers") {
        h.remove(header::TE);
    }
}

/// Marks an HTTP/1.1 request that one sidecar carries to another as an HTTP/2 stream (see
/// [`crate::pool`]); the receiving sidecar hands it to its app as HTTP/1.1 again, and drops
/// the header with every other `x-mesh-` one.
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("x-mesh-orig-proto");

/// `uri`'s path and query (`/` when it has none).
pub fn origin_form(uri: &Uri) -> http::uri::PathAndQuery {
    uri.path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"))
}

/// The URI an HTTP/2 request for `uri` carries to `target`: `:scheme` and `:authority` name the
/// target, the path and query are `uri`'s.
pub fn h2_uri(target: &Authority, uri: &Uri) -> Result<Uri, http::uri::InvalidUriParts> {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(http::uri::Scheme::HTTP);
    parts.authority = Some(target.clone());
    parts.path_and_query = Some(origin_form(uri));
    Uri::from_parts(parts)
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

/// Reads a whole body of at most `limit` bytes (trailers are dropped).
pub async fn collect_up_to<B>(mut body: B, limit: usize) -> Result<Bytes, String>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                return Err(format!("the body is larger than {limit} bytes"));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

/// A response body that holds a guard (an endpoint's in-flight slot, the app's load unit) until
/// the body ends, so streams count as load for as long as they are open.
pub struct Tracked<B, G> {
    inner: B,
    slot: Option<G>,
}

impl<B, G> Tracked<B, G> {
    pub fn new(inner: B, guard: G) -> Self {
        Self { inner, slot: Some(guard) }
    }
}

impl<B: HttpBody + Unpin, G: Unpin> HttpBody for Tracked<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.slot = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed_and_te_trailers_kept() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-private"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["te", "x-keep"]);
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h);
        assert!(!h.contains_key(header::TE));
    }

    #[tokio::test]
    async fn error_responses_are_json_naming_the_problem() {
        let r = error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_endpoints",
            "no healthy endpoints".into(),
            serde_json::json!({"service": "market"}),
        );
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["x-mesh-error"], "no_endpoints");
        let body = r.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!((v["error"].as_str(), v["service"].as_str()), (Some("no_endpoints"), Some("market")));
    }
}

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
