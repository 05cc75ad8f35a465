//! Spans over OTLP, shared by every binary: W3C `traceparent` parsing (one reading of the spec's
//! rules), the sampling decision, and an exporter (OTLP/gRPC through tonic, batched on its own
//! thread with a bounded queue: a full queue drops spans, a request never waits for export).
//!
//! The decision is made here, not by the SDK's sampler: a hop whose trace is not sampled builds
//! no span at all (the unsampled path costs a flag check), and a sampled one builds its spans with
//! the SDK under an always-on sampler.

use std::{
    borrow::Cow,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::SystemTime,
};

use opentelemetry::{
    Context,
    trace::{Link, Span as _, SpanId, Status, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer as _},
};
pub use opentelemetry::{
    KeyValue,
    trace::{SpanContext, SpanKind},
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, Sampler, SdkTracer, SdkTracerProvider};

thread_local! {
    /// The trace id the next root span started on this thread takes (see [`Ids`]).
    static NEXT_TRACE_ID: std::cell::Cell<Option<TraceId>> = const { std::cell::Cell::new(None) };
}

/// Random ids, except that a root span takes the trace id its hop already made: a sidecar
/// writes the trace id into headers, logs and exemplars before it knows whether a span is
/// recorded, and the exported trace must be that one. The SDK asks for the id synchronously
/// inside `start`, on the thread that set it.
#[derive(Debug, Default)]
struct Ids(RandomIdGenerator);

impl IdGenerator for Ids {
    fn new_trace_id(&self) -> TraceId {
        NEXT_TRACE_ID.with(|n| n.take()).unwrap_or_else(|| self.0.new_trace_id())
    }

    fn new_span_id(&self) -> SpanId {
        self.0.new_span_id()
    }
}

/// The length of a version-00 `traceparent`: `00-<32 hex>-<16 hex>-<2 hex>`.
pub const TRACEPARENT_LEN: usize = 55;

/// A W3C `traceparent`, as the hex text it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent<'a> {
    pub trace_id: &'a [u8; 32],
    pub parent_id: &'a [u8; 16],
    pub flags: &'a [u8; 2],
}

/// W3C Trace Context `traceparent`: `<version>-<32 hex>-<16 hex>-<2 hex>` in lowercase hex with
/// non-zero ids. Version `00` is exactly that; a later version (not `ff`) may carry more after a
/// `-`, and is read by its first 55 characters, as the spec says.
pub fn parse_traceparent(v: &[u8]) -> Option<TraceParent<'_>> {
    let hex = |s: &[u8]| s.iter().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b));
    let nonzero = |s: &[u8]| s.iter().any(|b| *b != b'0');
    let version = v.get(..2)?;
    if !hex(version) || version == b"ff" {
        return None;
    }
    let v = match (version, v.len()) {
        (b"00", TRACEPARENT_LEN) => v,
        (b"00", _) => return None,
        (_, n) if n == TRACEPARENT_LEN || (n > TRACEPARENT_LEN && v[TRACEPARENT_LEN] == b'-') => {
            &v[..TRACEPARENT_LEN]
        }
        _ => return None,
    };
    if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let (trace, parent, flags) = (&v[3..35], &v[36..52], &v[53..]);
    if !(hex(trace) && nonzero(trace) && hex(parent) && nonzero(parent) && hex(flags)) {
        return None;
    }
    Some(TraceParent {
        trace_id: trace.try_into().ok()?,
        parent_id: parent.try_into().ok()?,
        flags: flags.try_into().ok()?,
    })
}

impl TraceParent<'_> {
    /// The `sampled` bit of the flags.
    pub fn sampled(&self) -> bool {
        let digit = self.flags[1];
        let low = if digit.is_ascii_digit() { digit - b'0' } else { digit - b'a' + 10 };
        low & 1 == 1
    }

    /// The caller's span as a parent for spans of this hop (`tracestate` kept when it parses).
    pub fn span_context(&self, tracestate: Option<&str>) -> SpanContext {
        fn text(b: &[u8]) -> &str {
            std::str::from_utf8(b).unwrap_or("0")
        }
        let flags = if self.sampled() { TraceFlags::SAMPLED } else { TraceFlags::default() };
        let state = tracestate.and_then(|s| s.parse::<TraceState>().ok()).unwrap_or_default();
        SpanContext::new(
            TraceId::from_hex(text(self.trace_id)).unwrap_or(TraceId::INVALID),
            SpanId::from_hex(text(self.parent_id)).unwrap_or(SpanId::INVALID),
            flags,
            true,
            state,
        )
    }
}

/// The `traceparent` that names `cx` as the parent of the next hop (ASCII, no formatting
/// machinery: every sampled request writes one per attempt).
pub fn traceparent_bytes(cx: &SpanContext) -> [u8; TRACEPARENT_LEN] {
    let mut out = *b"00-00000000000000000000000000000000-0000000000000000-00";
    crate::write_hex(&cx.trace_id().to_bytes(), &mut out[3..35]);
    crate::write_hex(&cx.span_id().to_bytes(), &mut out[36..52]);
    if cx.is_sampled() {
        out[54] = b'1';
    }
    out
}

/// [`traceparent_bytes`] as text.
pub fn traceparent(cx: &SpanContext) -> String {
    String::from_utf8_lossy(&traceparent_bytes(cx)).into_owned()
}

/// A span name for an HTTP method (OpenTelemetry names HTTP spans by their method): the
/// standard ones without an allocation.
pub fn method_name(method: &str) -> Cow<'static, str> {
    const STANDARD: [&str; 9] =
        ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE"];
    match STANDARD.iter().find(|m| **m == method) {
        Some(m) => Cow::Borrowed(m),
        None => Cow::Owned(method.to_string()),
    }
}

/// The share of new traces a hop samples, changed live (a service's policy): parts per million.
#[derive(Debug)]
pub struct Sampling(AtomicU32);

impl Sampling {
    pub fn new(parts_per_million: u32) -> Self {
        Sampling(AtomicU32::new(parts_per_million.min(1_000_000)))
    }

    /// Every new trace sampled.
    pub const fn all() -> Self {
        Sampling(AtomicU32::new(1_000_000))
    }

    pub fn set(&self, parts_per_million: u32) {
        self.0.store(parts_per_million.min(1_000_000), Ordering::Relaxed);
    }

    pub fn parts_per_million(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }

    /// Whether a new trace is sampled, given 64 random bits.
    pub fn sample(&self, random: u64) -> bool {
        let ppm = u64::from(self.parts_per_million());
        ppm >= 1_000_000 || (ppm > 0 && random % 1_000_000 < ppm)
    }
}

/// The root sampling share the standard variables ask for (`OTEL_TRACES_SAMPLER`, with
/// `OTEL_TRACES_SAMPLER_ARG` for the ratio samplers), in parts per million; 1 (everything)
/// when they say nothing. Parent-based either way: a caller's decision is kept.
pub fn default_sampling() -> u32 {
    let arg = std::env::var("OTEL_TRACES_SAMPLER_ARG").ok().and_then(|a| a.trim().parse::<f64>().ok());
    let ratio = match std::env::var("OTEL_TRACES_SAMPLER").as_deref() {
        Ok("always_off" | "parentbased_always_off") => 0.0,
        Ok("traceidratio" | "parentbased_traceidratio") => arg.unwrap_or(1.0),
        _ => 1.0,
    };
    (ratio.clamp(0.0, 1.0) * 1_000_000.0).round() as u32
}

/// Where spans go: nowhere (the default), or an OTLP/gRPC collector.
#[derive(Clone, Default)]
pub struct Telemetry(Option<Arc<Exporting>>);

struct Exporting {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

/// One span being recorded; ended (and queued for export) by [`Span::end`] or when dropped.
pub struct Span(opentelemetry_sdk::trace::Span);

impl Telemetry {
    /// Exports to `endpoint` (`--otlp-endpoint`, `OTEL_EXPORTER_OTLP_ENDPOINT`), or to
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` when that is set; off when neither is. The standard
    /// `OTEL_*` variables apply (headers, timeout, `OTEL_BSP_*` queue and batch sizes,
    /// `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`). Runs inside the Tokio runtime.
    pub fn start(service: &str, endpoint: Option<&str>) -> Result<Telemetry, String> {
        let traces_env = std::env::var_os("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some();
        let endpoint = endpoint.map(str::trim).filter(|e| !e.is_empty());
        if endpoint.is_none() && !traces_env {
            return Ok(Telemetry(None));
        }
        let builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
        let builder = match endpoint {
            Some(e) if !traces_env => builder.with_endpoint(e),
            _ => builder,
        };
        let exporter = builder.build().map_err(|e| {
            format!("the OTLP exporter for {endpoint:?} could not start: {e} (check --otlp-endpoint)")
        })?;
        let mut resource = opentelemetry_sdk::Resource::builder();
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name(service.to_string());
        }
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(Sampler::AlwaysOn)
            .with_id_generator(Ids::default())
            .with_resource(resource.build())
            .build();
        let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "opinion-market-mesh");
        tracing::info!(
            endpoint = endpoint.unwrap_or("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            "exporting spans over OTLP"
        );
        Ok(Telemetry(Some(Arc::new(Exporting { provider, tracer }))))
    }

    /// Whether spans are exported at all.
    pub fn is_on(&self) -> bool {
        self.0.is_some()
    }

    /// Starts the first span of trace `trace_id` (32 hex digits, made by the caller) — `None`
    /// when exporting is off.
    pub fn root(
        &self,
        trace_id: &str,
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
        attributes: Vec<KeyValue>,
    ) -> Option<Span> {
        self.0.as_ref()?;
        NEXT_TRACE_ID.with(|n| n.set(TraceId::from_hex(trace_id).ok()));
        let span = self.span(name, kind, None, attributes);
        NEXT_TRACE_ID.with(|n| n.set(None));
        span
    }

    /// Starts a span under `parent` (a new trace without one) — `None` when exporting is off.
    /// Call it only for sampled traces: the decision is the caller's.
    pub fn span(
        &self,
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
        parent: Option<&SpanContext>,
        attributes: Vec<KeyValue>,
    ) -> Option<Span> {
        self.span_with(name, kind, parent, attributes, None, Vec::new())
    }

    /// [`Telemetry::span`] with a start time in the past and links to other traces' spans.
    pub fn span_with(
        &self,
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
        parent: Option<&SpanContext>,
        attributes: Vec<KeyValue>,
        started: Option<SystemTime>,
        links: Vec<SpanContext>,
    ) -> Option<Span> {
        let on = self.0.as_ref()?;
        let cx = match parent {
            Some(p) if p.is_valid() => Context::new().with_remote_span_context(p.clone()),
            _ => Context::new(),
        };
        let mut b = on.tracer.span_builder(name).with_kind(kind).with_attributes(attributes);
        if let Some(t) = started {
            b = b.with_start_time(t);
        }
        if !links.is_empty() {
            b = b.with_links(links.into_iter().map(Link::with_context).collect());
        }
        Some(Span(b.start_with_context(&on.tracer, &cx)))
    }

    /// Exports what is queued and stops the exporter (at exit). Runs on a blocking thread: the
    /// exporter's connection lives on this runtime, which must keep running meanwhile.
    pub async fn shutdown(&self) {
        if let Some(on) = &self.0 {
            let provider = on.provider.clone();
            let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        }
    }
}

impl Span {
    pub fn context(&self) -> &SpanContext {
        self.0.span_context()
    }

    /// The `traceparent` naming this span as the next hop's parent.
    pub fn traceparent(&self) -> String {
        traceparent(self.context())
    }

    /// [`Span::traceparent`] as bytes, for a header.
    pub fn traceparent_bytes(&self) -> [u8; TRACEPARENT_LEN] {
        traceparent_bytes(self.context())
    }

    pub fn set(&mut self, kv: KeyValue) {
        self.0.set_attribute(kv);
    }

    /// Marks the span failed, saying why.
    pub fn fail(&mut self, why: impl Into<Cow<'static, str>>) {
        self.0.set_status(Status::error(why));
    }

    /// Records an HTTP answer's status (`http.response.status_code`). As OpenTelemetry's HTTP
    /// conventions say: a 5xx marks any span failed, a 4xx only a client span (on a server span
    /// it is the caller's error, not this hop's).
    pub fn status(&mut self, status: u16, server: bool) {
        self.set(KeyValue::new("http.response.status_code", i64::from(status)));
        if status >= 500 || (!server && status >= 400) {
            self.set(KeyValue::new("error.type", status.to_string()));
            self.0.set_status(Status::error(""));
        }
    }

    pub fn end(mut self) {
        self.0.end();
    }

    pub fn end_at(mut self, at: SystemTime) {
        self.0.end_with_timestamp(at);
    }
}
