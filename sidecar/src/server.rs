//! The accept loop both proxies use: HTTP/1.1 and h2c on one listener (detected per
//! connection), and a graceful drain — stop accepting, let open connections finish their
//! requests, give up after a deadline.

use std::{convert::Infallible, future::Future, net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use http::{Request, Response};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::proxy::Body;

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
/// A request handler: the request and the peer's address in, a response out (never an error:
/// failures are answered as JSON responses).
pub type Handler = Arc<dyn Fn(Request<Incoming>, SocketAddr) -> BoxFuture<Response<Body>> + Send + Sync>;

/// Serves `listener` until `stop` fires, then drains open connections for at most `drain`.
pub async fn serve(
    listener: TcpListener,
    handler: Handler,
    stop: CancellationToken,
    drain: Duration,
    name: &'static str,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(Duration::from_secs(30));
    builder.http2().timer(TokioTimer::new()).max_concurrent_streams(1024);
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let handler = handler.clone();
                    let svc = service_fn(move |req| {
                        let fut = handler(req, peer);
                        async move { Ok::<_, Infallible>(fut.await) }
                    });
                    let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), svc).into_owned());
                    tokio::spawn(
                        async move {
                            if let Err(e) = conn.await {
                                tracing::debug!(error = %e, "connection ended with an error");
                            }
                        }
                        .instrument(tracing::debug_span!("conn", listener = name, %peer)),
                    );
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => tracing::debug!(listener = name, "drained"),
        _ = tokio::time::sleep(drain) => tracing::warn!(listener = name, ?drain, "drain deadline passed with requests still open"),
    }
}
