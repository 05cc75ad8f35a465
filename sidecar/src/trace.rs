//! Request identity across hops: an `x-request-id` on every request and W3C trace context
//! (`traceparent`) continued with a new span id at each sidecar.

use http::{HeaderMap, HeaderValue};
use rand::Rng;

pub const REQUEST_ID: &str = "x-request-id";
pub const TRACEPARENT: &str = "traceparent";

/// The ids this hop carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    pub request_id: String,
    pub trace_id: String,
    pub span_id: String,
}

/// Keeps a caller's request id (or makes one) and continues its trace (or starts one), writing
/// both into `headers` for the next hop.
pub fn propagate(headers: &mut HeaderMap) -> TraceContext {
    let mut rng = rand::rng();
    let request_id = match headers.get(REQUEST_ID).and_then(|v| v.to_str().ok()) {
        Some(id) if !id.is_empty() && id.len() <= 128 => id.to_string(),
        _ => {
            let id = hex(&rng.random::<u128>().to_be_bytes());
            if let Ok(v) = HeaderValue::from_str(&id) {
                headers.insert(REQUEST_ID, v);
            }
            id
        }
    };
    let span_id = hex(&rng.random::<u64>().max(1).to_be_bytes());
    let (trace_id, flags) = match headers.get(TRACEPARENT).and_then(|v| v.to_str().ok()).and_then(parse) {
        Some((trace, flags)) => (trace, flags),
        None => (hex(&rng.random::<u128>().max(1).to_be_bytes()), "01".to_string()),
    };
    let mut tp = String::with_capacity(55);
    for part in ["00-", &trace_id, "-", &span_id, "-", &flags] {
        tp.push_str(part);
    }
    if let Ok(v) = HeaderValue::from_str(&tp) {
        headers.insert(TRACEPARENT, v);
    }
    TraceContext { request_id, trace_id, span_id }
}

/// Lowercase hex, without going through `fmt` (this runs on every request).
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// `00-<32 hex>-<16 hex>-<2 hex>` with non-zero ids → (trace id, flags).
fn parse(v: &str) -> Option<(String, String)> {
    let parts: Vec<&str> = v.trim().split('-').collect();
    let [version, trace, parent, flags] = parts.as_slice() else { return None };
    let hex = |s: &str, n: usize| {
        s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let ok = hex(version, 2)
        && *version != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(parent, 16)
        && parent.bytes().any(|b| b != b'0')
        && hex(flags, 2);
    ok.then(|| (trace.to_string(), flags.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continues_a_valid_trace_with_a_new_span() {
        let mut h = HeaderMap::new();
        h.insert(
            TRACEPARENT,
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        h.insert(REQUEST_ID, HeaderValue::from_static("req-1"));
        let t = propagate(&mut h);
        assert_eq!(t.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.request_id, "req-1");
        let tp = h[TRACEPARENT].to_str().unwrap();
        assert!(tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "{tp}");
        assert!(!tp.contains("00f067aa0ba902b7"), "a new span id: {tp}");
        assert!(tp.ends_with("-01"));
    }

    #[test]
    fn starts_a_trace_and_request_id_when_missing_or_invalid() {
        for bad in [None, Some("garbage"), Some("00-00000000000000000000000000000000-00f067aa0ba902b7-01")] {
            let mut h = HeaderMap::new();
            if let Some(b) = bad {
                h.insert(TRACEPARENT, HeaderValue::from_static(b));
            }
            let t = propagate(&mut h);
            assert_eq!(t.trace_id.len(), 32);
            assert_ne!(t.trace_id, "00000000000000000000000000000000");
            assert_eq!(h[REQUEST_ID].to_str().unwrap(), t.request_id);
            assert!(parse(h[TRACEPARENT].to_str().unwrap()).is_some());
        }
    }
}
