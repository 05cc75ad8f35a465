//! Request identity across hops: an `x-request-id` on every request and W3C trace context
//! (`traceparent`) continued with a new span id at each sidecar.

use http::{HeaderMap, HeaderName, HeaderValue};
use std::{cell::Cell, fmt};

/// Header names as constants: a name parsed from a `&str` is allocated on every insert.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// The ids this hop carries (for its log span; the headers carry them on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    pub request_id: RequestId,
    pub trace_id: Hex<32>,
    pub span_id: Hex<16>,
}

/// The caller's request id, or the one this hop made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestId {
    Given(HeaderValue),
    Made(Hex<32>),
}

/// Lowercase hex digits, kept as text.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Hex<const N: usize>([u8; N]);

/// Keeps a caller's request id (or makes one) and continues its trace (or starts one), writing
/// both into `headers` for the next hop. Allocates once, for the new values (`traceparent`, and
/// the request id when the caller sent none), whose copies — the retry copy of a request's
/// headers — then only count references: this runs on every request.
pub fn propagate(headers: &mut HeaderMap) -> TraceContext {
    // A caller's id, marked never indexed (see `never_indexed`) in the same look-up.
    let given = headers
        .get_mut(&REQUEST_ID)
        .filter(|id| !id.is_empty() && id.len() <= 128 && id.to_str().is_ok())
        .map(|id| {
            id.set_sensitive(true);
            id.clone()
        });
    let span_id = Hex::<16>::random();
    let (trace_id, flags) = match headers.get(&TRACEPARENT).and_then(|v| parse(v.as_bytes())) {
        Some(found) => found,
        None => (Hex::<32>::random(), *b"01"),
    };
    // [request id (when made)][traceparent: 00-<trace id>-<span id>-<flags>]
    let mut text = [0u8; 32 + TRACEPARENT_LEN];
    let tp = &mut text[32..];
    tp[..3].copy_from_slice(b"00-");
    tp[3..35].copy_from_slice(&trace_id.0);
    tp[35] = b'-';
    tp[36..52].copy_from_slice(&span_id.0);
    tp[52] = b'-';
    tp[53..].copy_from_slice(&flags);
    let request_id = match given {
        Some(id) => RequestId::Given(id),
        None => {
            let id = Hex::<32>::random();
            text[..32].copy_from_slice(&id.0);
            RequestId::Made(id)
        }
    };
    let shared = bytes::Bytes::from_owner(text);
    if let RequestId::Made(_) = request_id
        && let Ok(v) = HeaderValue::from_maybe_shared(shared.slice(..32))
    {
        headers.insert(REQUEST_ID, never_indexed(v));
    }
    if let Ok(v) = HeaderValue::from_maybe_shared(shared.slice(32..)) {
        headers.insert(TRACEPARENT, never_indexed(v));
    }
    TraceContext { request_id, trace_id, span_id }
}

const TRACEPARENT_LEN: usize = 55;

/// Both ids are new on every request, so HTTP/2's header compression (HPACK) gains nothing by
/// adding them to its table of recent headers: each would only push out an entry that does
/// repeat (`host`, `x-mesh-orig-proto`, …), which the next request must then send in full again,
/// and both ends would pay for the insert and the eviction. Marked sensitive, they are sent as
/// "never indexed" literals and leave the table to the headers that repeat. Over HTTP/1.1 the
/// mark changes nothing; `to_str` and `Display` still show the value (only `Debug` hides it).
fn never_indexed(mut v: HeaderValue) -> HeaderValue {
    v.set_sensitive(true);
    v
}

thread_local! {
    /// SplitMix64 state, seeded once per thread from the OS-seeded generator: ids must be
    /// unique, not secret, and this is cheaper than a cryptographic generator per request.
    static SEED: Cell<u64> = Cell::new(rand::random());
}

/// The two lowercase hex digits of every byte.
const HEX_PAIRS: [[u8; 2]; 256] = {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut t = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = [DIGITS[i >> 4], DIGITS[i & 15]];
        i += 1;
    }
    t
};

fn next_u64() -> u64 {
    SEED.with(|s| {
        let x = s.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        s.set(x);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

impl<const N: usize> Hex<N> {
    /// N hex digits of fresh random bits, never all zero (W3C forbids all-zero ids): each
    /// random byte becomes two digits with one table lookup.
    fn random() -> Self {
        let mut out = [0u8; N];
        for chunk in out.chunks_mut(16) {
            let r = next_u64().max(1).to_le_bytes();
            for (pair, byte) in chunk.chunks_mut(2).zip(r) {
                pair.copy_from_slice(&HEX_PAIRS[byte as usize]);
            }
        }
        Hex(out)
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or("")
    }
}

impl<const N: usize> fmt::Display for Hex<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<const N: usize> fmt::Debug for Hex<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestId::Given(v) => f.write_str(v.to_str().unwrap_or("-")),
            RequestId::Made(h) => f.write_str(h.as_str()),
        }
    }
}

/// `00-<32 hex>-<16 hex>-<2 hex>` with non-zero ids → (trace id, flags).
fn parse(v: &[u8]) -> Option<(Hex<32>, [u8; 2])> {
    let v = v.trim_ascii();
    let hex = |s: &[u8]| s.iter().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b));
    let nonzero = |s: &[u8]| s.iter().any(|b| *b != b'0');
    if v.len() != TRACEPARENT_LEN || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let (version, trace, parent, flags) = (&v[..2], &v[3..35], &v[36..52], &v[53..]);
    let ok = hex(version)
        && version != b"ff"
        && hex(trace)
        && nonzero(trace)
        && hex(parent)
        && nonzero(parent)
        && hex(flags);
    if !ok {
        return None;
    }
    Some((Hex(trace.try_into().ok()?), flags.try_into().ok()?))
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
        assert_eq!(t.trace_id.as_str(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.request_id.to_string(), "req-1");
        let tp = h[&TRACEPARENT].to_str().unwrap();
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
            assert_eq!(t.trace_id.as_str().len(), 32);
            assert_ne!(t.trace_id.as_str(), "00000000000000000000000000000000");
            assert_eq!(h[&REQUEST_ID].to_str().unwrap(), t.request_id.to_string());
            assert!(parse(h[&TRACEPARENT].as_bytes()).is_some());
        }
    }

    #[test]
    fn the_per_request_ids_stay_out_of_the_http2_header_table() {
        for given in [None, Some("req-1")] {
            let mut h = HeaderMap::new();
            if let Some(id) = given {
                h.insert(REQUEST_ID, HeaderValue::from_static(id));
            }
            h.insert(http::header::HOST, HeaderValue::from_static("market"));
            let t = propagate(&mut h);
            assert!(h[&REQUEST_ID].is_sensitive(), "request id {given:?}");
            assert!(h[&TRACEPARENT].is_sensitive());
            assert!(!h[http::header::HOST].is_sensitive(), "only the per-request ids");
            // What logs show is the value itself.
            assert_eq!(t.request_id.to_string(), h[&REQUEST_ID].to_str().unwrap());
        }
    }

    #[test]
    fn the_digit_table_spells_every_byte() {
        for (b, pair) in HEX_PAIRS.iter().enumerate() {
            assert_eq!(std::str::from_utf8(pair).unwrap(), format!("{b:02x}"));
        }
    }

    #[test]
    fn fresh_ids_are_lowercase_hex_and_distinct() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let mut h = HeaderMap::new();
            let t = propagate(&mut h);
            for id in [t.trace_id.as_str(), t.span_id.as_str()] {
                assert!(id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{id}");
            }
            assert!(seen.insert(t.trace_id.as_str().to_string()), "a trace id repeated");
            assert!(seen.insert(t.span_id.as_str().to_string()), "a span id repeated");
        }
    }
}
