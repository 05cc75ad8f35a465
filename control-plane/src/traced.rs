//! Server spans for the control plane's unary gRPC calls (OpenTelemetry RPC conventions:
//! `rpc.system`, `rpc.service`, `rpc.method`, `rpc.grpc.status_code`), as a tower layer in
//! front of every service. A call carrying a `traceparent` keeps its caller's decision; one
//! without starts a trace sampled by `OTEL_TRACES_SAMPLER`(`_ARG`). The long-lived streams
//! (heartbeats, discovery, policy, subscriptions) are left out: a span lasting a session says
//! nothing about a request.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use mesh_runtime::telemetry::{KeyValue, Sampling, Span, SpanKind, Telemetry, default_sampling};

/// The layer: wraps each service in [`Traced`].
#[derive(Clone)]
pub struct TraceLayer {
    telemetry: Telemetry,
    sampling: Arc<Sampling>,
}

impl TraceLayer {
    pub fn new(telemetry: Telemetry) -> Self {
        Self { telemetry, sampling: Arc::new(Sampling::new(default_sampling())) }
    }
}

impl<S> tower_layer::Layer<S> for TraceLayer {
    type Service = Traced<S>;

    fn layer(&self, inner: S) -> Traced<S> {
        Traced { inner, layer: self.clone() }
    }
}

#[derive(Clone)]
pub struct Traced<S> {
    inner: S,
    layer: TraceLayer,
}

/// Streaming methods, by name: no span.
const STREAMS: &[&str] = &["Watch", "Subscribe", "Replay", "Stream", "Heartbeat", "Check"];

impl TraceLayer {
    fn start<B>(&self, req: &tonic::codegen::http::Request<B>) -> Option<Span> {
        if !self.telemetry.is_on() {
            return None;
        }
        let path = req.uri().path();
        let (service, method) = path.trim_start_matches('/').split_once('/')?;
        if STREAMS.contains(&method) || service.starts_with("grpc.") {
            return None;
        }
        let caller = req.headers().get("traceparent").and_then(|v| {
            let p = mesh_runtime::telemetry::parse_traceparent(v.as_bytes())?;
            Some(p.span_context(req.headers().get("tracestate").and_then(|v| v.to_str().ok())))
        });
        let sampled = match &caller {
            Some(c) => c.is_sampled(),
            None => self.sampling.sample(rand::random()),
        };
        if !sampled {
            return None;
        }
        let attributes = vec![
            KeyValue::new("rpc.system", "grpc"),
            KeyValue::new("rpc.service", service.to_string()),
            KeyValue::new("rpc.method", method.to_string()),
        ];
        self.telemetry.span(format!("{service}/{method}"), SpanKind::Server, caller.as_ref(), attributes)
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, RB> tower_service::Service<tonic::codegen::http::Request<B>> for Traced<S>
where
    S: tower_service::Service<
            tonic::codegen::http::Request<B>,
            Response = tonic::codegen::http::Response<RB>,
        >,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: tonic::codegen::http::Request<B>) -> Self::Future {
        let span = self.layer.start(&req);
        let answer = self.inner.call(req);
        Box::pin(async move {
            let result = answer.await;
            if let Some(mut s) = span {
                // A refusal is in the headers (trailers-only); an answer's status comes in the
                // trailers, after this: OK.
                let code = match &result {
                    Ok(resp) => resp
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok()?.parse::<i64>().ok())
                        .unwrap_or(0),
                    Err(_) => 2,
                };
                s.set(KeyValue::new("rpc.grpc.status_code", code));
                // Server-side, as OpenTelemetry's RPC conventions say: only codes that mean the
                // server failed mark the span (UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED,
                // INTERNAL, UNAVAILABLE, DATA_LOSS).
                if [2, 4, 12, 13, 14, 15].contains(&code) {
                    s.fail(format!("gRPC status {code}"));
                }
                s.end();
            }
            result
        })
    }
}
