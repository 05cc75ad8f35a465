//! Hop-by-hop headers, the forms a request URI takes per protocol, and gRPC detection.

use http::{HeaderMap, HeaderName, Uri, header, uri::Authority};

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

pub fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

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
}
