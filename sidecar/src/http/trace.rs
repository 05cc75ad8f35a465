//! Request identity across hops: an `x-request-id` on every request and W3C trace context
//! (`traceparent`) continued with a new span id at each sidecar.

use http::{HeaderMap, HeaderName, HeaderValue, Request};
use mesh_runtime::telemetry::{self, KeyValue, Sampling, Span, SpanContext, SpanKind, Telemetry};
use std::{cell::Cell, fmt};

/// Header names as constants: a name parsed from a `&str` is allocated on every insert.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// The ids this hop carries (for its log span; the headers carry them on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    pub request_id: RequestId,
    pub trace_id: Hex<32>,
    pub span_id: Hex<16>,
    /// The caller's span, when this hop continues a trace.
    pub parent_id: Option<Hex<16>>,
    /// Whether the trace is sampled: the caller's decision, or this hop's for a new trace.
    pub sampled: bool,
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
/// A new trace is sampled by `sampling`; a continued one keeps its caller's decision.
pub fn propagate(headers: &mut HeaderMap, sampling: &Sampling) -> TraceContext {
    // A caller's id, marked never indexed (see `never_indexed`) in the same look-up.
    let given = headers
        .get_mut(&REQUEST_ID)
        .filter(|id| !id.is_empty() && id.len() <= 128 && id.to_str().is_ok())
        .map(|id| {
            id.set_sensitive(true);
            id.clone()
        });
    let span_id = Hex::<16>::random();
    let (trace_id, parent_id, flags) = match headers.get(&TRACEPARENT).and_then(|v| parse(v.as_bytes())) {
        Some((trace, parent, flags)) => {
            // The caller's vendors' state goes on with its trace, when it is well formed.
            if !tracestate_ok(headers) {
                headers.remove(&TRACESTATE);
            }
            (trace, Some(parent), flags)
        }
        None => {
            // A new trace: the old trace's vendor state belongs to it, not to this one.
            headers.remove(&TRACESTATE);
            let flags = if sampling.sample(next_u64()) { *b"01" } else { *b"00" };
            (Hex::<32>::random(), None, flags)
        }
    };
    let sampled =
        telemetry::TraceParent { trace_id: &trace_id.0, parent_id: &span_id.0, flags: &flags }.sampled();
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
    TraceContext { request_id, trace_id, span_id, parent_id, sampled }
}

/// This hop's spans, when its trace is sampled and spans are exported: a server span for the
/// request this sidecar received, and a client span for each attempt it makes upstream (whose id
/// the attempt's `traceparent` carries, so the next hop's server span is its child).
pub struct Hop {
    pub trace_id: Hex<32>,
    telemetry: Telemetry,
    server: Option<SpanContext>,
}

impl TraceContext {
    /// Starts this hop's server span (OpenTelemetry HTTP conventions: named by the method).
    pub fn server_span<B>(
        &self,
        telemetry: &Telemetry,
        req: &Request<B>,
        direction: &'static str,
    ) -> Option<Span> {
        if !self.sampled || !telemetry.is_on() {
            return None;
        }
        // Room for what the answer adds (status, error, cache): no regrowth on the request path.
        let mut attributes = Vec::with_capacity(8);
        let name = telemetry::method_name(req.method().as_str());
        attributes.extend([
            KeyValue::new("http.request.method", name.clone()),
            KeyValue::new("url.path", req.uri().path().to_string()),
            KeyValue::new("mesh.direction", direction),
            KeyValue::new("mesh.request_id", self.request_id.to_string()),
        ]);
        match self.parent_id {
            Some(parent) => {
                let state = req.headers().get(&TRACESTATE).and_then(|v| v.to_str().ok());
                let caller =
                    telemetry::TraceParent { trace_id: &self.trace_id.0, parent_id: &parent.0, flags: b"01" }
                        .span_context(state);
                telemetry.span(name, SpanKind::Server, Some(&caller), attributes)
            }
            None => telemetry.root(self.trace_id.as_str(), name, SpanKind::Server, attributes),
        }
    }

    /// The hop as its upstream attempts see it: under `server`, when it is recorded.
    pub fn hop(&self, telemetry: &Telemetry, server: Option<&Span>) -> Hop {
        match server {
            Some(s) => Hop {
                trace_id: self.trace_id,
                telemetry: telemetry.clone(),
                server: Some(s.context().clone()),
            },
            None => Hop { trace_id: self.trace_id, telemetry: Telemetry::default(), server: None },
        }
    }
}

impl Hop {
    /// Starts the client span of one attempt at `req` and names it in the request's
    /// `traceparent`. `resends`: how many attempts came before (`http.request.resend_count`).
    pub fn attempt<B>(&self, req: &mut Request<B>, peer: &str, resends: u32) -> Option<Span> {
        let server = self.server.as_ref()?;
        // Room for what the outbound path and the answer add (service, endpoint, status, retry,
        // breaker, error): no regrowth on the request path.
        let mut attributes = Vec::with_capacity(10);
        let name = telemetry::method_name(req.method().as_str());
        attributes.extend([
            KeyValue::new("http.request.method", name.clone()),
            KeyValue::new("url.path", req.uri().path().to_string()),
            KeyValue::new("server.address", peer.to_string()),
        ]);
        if resends > 0 {
            attributes.push(KeyValue::new("http.request.resend_count", i64::from(resends)));
        }
        let span = self.telemetry.span(name, SpanKind::Client, Some(server), attributes)?;
        if let Ok(v) = HeaderValue::from_bytes(&span.traceparent_bytes()) {
            req.headers_mut().insert(TRACEPARENT, never_indexed(v));
        }
        Some(span)
    }
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
            mesh_runtime::write_hex(&next_u64().max(1).to_le_bytes(), chunk);
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

/// W3C Trace Context `traceparent` → (trace id, parent id, flags), by the rules in
/// [`mesh_runtime::telemetry::parse_traceparent`].
fn parse(v: &[u8]) -> Option<(Hex<32>, Hex<16>, [u8; 2])> {
    let p = telemetry::parse_traceparent(v)?;
    Some((Hex(*p.trace_id), Hex(*p.parent_id), *p.flags))
}

/// Whether the `tracestate` header(s) form a valid list: at most 32 members of `key=value`, keys
/// (`[a-z][a-z0-9_*/-]{0,255}`, or `tenant@system`) not repeated, values of printable ASCII
/// without `,` or `=` and not ending in a space, at most 256 characters. No header is valid.
fn tracestate_ok(headers: &HeaderMap) -> bool {
    let mut keys = std::collections::HashSet::new();
    for value in headers.get_all(&TRACESTATE) {
        let Ok(list) = value.to_str() else { return false };
        for member in list.split(',').map(|m| m.trim_matches([' ', '\t'])).filter(|m| !m.is_empty()) {
            let Some((key, val)) = member.split_once('=') else { return false };
            let key_ok = |k: &str, first_digit: bool| {
                let mut b = k.bytes();
                b.next().is_some_and(|c| c.is_ascii_lowercase() || (first_digit && c.is_ascii_digit()))
                    && b.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_-*/".contains(&c))
            };
            let key_valid = match key.split_once('@') {
                None => key.len() <= 256 && key_ok(key, false),
                Some((tenant, system)) => {
                    tenant.len() <= 241 && system.len() <= 14 && key_ok(tenant, true) && key_ok(system, false)
                }
            };
            let val_valid = !val.is_empty()
                && val.len() <= 256
                && !val.ends_with(' ')
                && val.bytes().all(|c| (0x20..=0x7e).contains(&c) && c != b',' && c != b'=');
            if !key_valid || !val_valid || !keys.insert(key) || keys.len() > 32 {
                return false;
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    static ALL: Sampling = Sampling::all();

    /// A new trace is sampled by the hop's share; a continued one keeps its caller's decision,
    /// whatever this hop's share (parent-based), and so does the next hop.
    #[test]
    fn sampling_is_decided_where_a_trace_starts() {
        for (ppm, flag) in [(0, "-00"), (1_000_000, "-01")] {
            let mut h = HeaderMap::new();
            let t = propagate(&mut h, &Sampling::new(ppm));
            assert_eq!(t.sampled, ppm > 0);
            assert!(h[&TRACEPARENT].to_str().unwrap().ends_with(flag));
        }
        for (given, sampled) in [("01", true), ("00", false), ("03", true), ("02", false)] {
            for ppm in [0, 1_000_000] {
                let mut h = HeaderMap::new();
                let tp = format!("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-{given}");
                h.insert(TRACEPARENT, HeaderValue::from_str(&tp).unwrap());
                let t = propagate(&mut h, &Sampling::new(ppm));
                assert_eq!(t.sampled, sampled, "{tp} at {ppm} ppm");
                assert_eq!(t.parent_id.map(|p| p.to_string()).as_deref(), Some("00f067aa0ba902b7"));
                assert!(h[&TRACEPARENT].to_str().unwrap().ends_with(given));
            }
        }
        let one_percent = Sampling::new(10_000);
        let sampled = (0..100_000).filter(|_| propagate(&mut HeaderMap::new(), &one_percent).sampled).count();
        assert!((500..1500).contains(&sampled), "about 1 % of 100,000 new traces: {sampled}");
    }

    #[test]
    fn continues_a_valid_trace_with_a_new_span() {
        let mut h = HeaderMap::new();
        h.insert(
            TRACEPARENT,
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        h.insert(REQUEST_ID, HeaderValue::from_static("req-1"));
        let t = propagate(&mut h, &ALL);
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
            let t = propagate(&mut h, &ALL);
            assert_eq!(t.trace_id.as_str().len(), 32);
            assert_ne!(t.trace_id.as_str(), "00000000000000000000000000000000");
            assert_eq!(h[&REQUEST_ID].to_str().unwrap(), t.request_id.to_string());
            assert!(parse(h[&TRACEPARENT].as_bytes()).is_some());
        }
    }

    /// The W3C Trace Context edge cases (Level 1, §3.2 and §3.3): versions, ids, case, lengths,
    /// and `tracestate` kept only with the trace it belongs to.
    #[test]
    fn traceparent_and_tracestate_follow_the_spec_edge_cases() {
        const ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
        let continued = |tp: &str| parse(tp.as_bytes()).map(|(t, _, f)| (t.as_str().to_string(), f));
        let valid = [
            format!("00-{ID}-00f067aa0ba902b7-01"),
            format!("00-{ID}-00f067aa0ba902b7-00"),
            format!("01-{ID}-00f067aa0ba902b7-01"),
            format!("cc-{ID}-00f067aa0ba902b7-01-what-the-future-holds"),
            format!("fe-{ID}-00f067aa0ba902b7-09"),
        ];
        for tp in &valid {
            assert_eq!(continued(tp).map(|c| c.0), Some(ID.to_string()), "{tp}");
        }
        let invalid = [
            format!("ff-{ID}-00f067aa0ba902b7-01"),
            format!("00-{ID}-00f067aa0ba902b7-01-extra"),
            format!("cc-{ID}-00f067aa0ba902b7-01extra"),
            format!("00-{}-00f067aa0ba902b7-01", ID.to_uppercase()),
            format!("0G-{ID}-00f067aa0ba902b7-01"),
            format!("00-{ID}-0000000000000000-01"),
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01".to_string(),
            format!("00-{ID}-00f067aa0ba902b7-0"),
            format!("00-{ID}-00f067aa0ba902b-701"),
            format!(" 00-{ID}-00f067aa0ba902b7-01"),
            String::new(),
        ];
        for tp in &invalid {
            assert_eq!(continued(tp), None, "{tp:?}");
        }

        let with = |tp: &str, state: &[&str]| {
            let mut h = HeaderMap::new();
            h.insert(TRACEPARENT, HeaderValue::from_str(tp).unwrap());
            for s in state {
                h.append(TRACESTATE, HeaderValue::from_str(s).unwrap());
            }
            let t = propagate(&mut h, &ALL);
            let state: Vec<String> =
                h.get_all(&TRACESTATE).iter().map(|v| v.to_str().unwrap().to_string()).collect();
            (t.trace_id.as_str() == ID, state)
        };
        let ok = format!("00-{ID}-00f067aa0ba902b7-01");
        assert_eq!(
            with(&ok, &["congo=t61rcWkgMzE", "rojo=00f067aa0ba902b7"]).1.len(),
            2,
            "kept, both headers"
        );
        assert_eq!(with(&ok, &["tenant1@system=v, a-b_c*d/e=1"]).1.len(), 1);
        assert_eq!(with("garbage", &["congo=t61rcWkgMzE"]), (false, vec![]), "a restarted trace drops it");
        for bad in ["congo=a,congo=b", "Congo=a", "congo", "congo=a=b", "congo=", "9congo=a"] {
            assert_eq!(with(&ok, &[bad]).1, Vec::<String>::new(), "{bad}");
        }
        let many: Vec<String> = (0..33).map(|i| format!("k{i}=v")).collect();
        assert_eq!(with(&ok, &[&many.join(",")]).1, Vec::<String>::new(), "more than 32 members");
        assert_eq!(with(&ok, &[&many[..32].join(",")]).1.len(), 1, "32 members are fine");
    }

    #[test]
    fn the_per_request_ids_stay_out_of_the_http2_header_table() {
        for given in [None, Some("req-1")] {
            let mut h = HeaderMap::new();
            if let Some(id) = given {
                h.insert(REQUEST_ID, HeaderValue::from_static(id));
            }
            h.insert(http::header::HOST, HeaderValue::from_static("market"));
            let t = propagate(&mut h, &ALL);
            assert!(h[&REQUEST_ID].is_sensitive(), "request id {given:?}");
            assert!(h[&TRACEPARENT].is_sensitive());
            assert!(!h[http::header::HOST].is_sensitive(), "only the per-request ids");
            // What logs show is the value itself.
            assert_eq!(t.request_id.to_string(), h[&REQUEST_ID].to_str().unwrap());
        }
    }

    #[test]
    fn fresh_ids_are_lowercase_hex_and_distinct() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let mut h = HeaderMap::new();
            let t = propagate(&mut h, &ALL);
            for id in [t.trace_id.as_str(), t.span_id.as_str()] {
                assert!(id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{id}");
            }
            assert!(seen.insert(t.trace_id.as_str().to_string()), "a trace id repeated");
            assert!(seen.insert(t.span_id.as_str().to_string()), "a span id repeated");
        }
    }
}
