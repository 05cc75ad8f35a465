//! `bench-collector`: an OTLP/gRPC trace collector that only counts what it is sent (spans, and
//! export calls), for the tracing benchmark. Prints `{"event":"listening","grpc":ADDR}`; `GET`
//! is not served — the counts go to stdout as one JSON line per second while they change.

// Benchmarks time real work with the wall clock and spawn plain tasks.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};

#[derive(Clone, Default)]
struct Counts {
    spans: Arc<AtomicU64>,
    exports: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl TraceService for Counts {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let n: usize =
            req.into_inner().resource_spans.iter().flat_map(|r| &r.scope_spans).map(|s| s.spans.len()).sum();
        self.spans.fetch_add(n as u64, Ordering::Relaxed);
        self.exports.fetch_add(1, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("{}", serde_json::json!({"event": "listening", "grpc": listener.local_addr()?.to_string()}));
    let counts = Counts::default();
    let report = counts.clone();
    tokio::spawn(async move {
        let mut last = u64::MAX;
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            let spans = report.spans.load(Ordering::Relaxed);
            if spans != last {
                println!(
                    "{}",
                    serde_json::json!({"spans": spans, "exports": report.exports.load(Ordering::Relaxed)})
                );
                last = spans;
            }
        }
    });
    tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(counts))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await?;
    Ok(())
}
