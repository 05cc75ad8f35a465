//! The accept loop both proxies use: HTTP/1.1 and h2c on one listener (detected per
//! connection) — or, for the inbound listener of a sidecar with a mesh identity, mutual TLS
//! only (ALPN picks the protocol; the verified peer identity goes into each request's
//! extensions as [`PeerIdentity`]) — and a graceful drain: stop accepting, let open connections
//! finish their requests, give up after a deadline.

use std::{convert::Infallible, future::Future, net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::proxy::Body;

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The SPIFFE id a caller proved with its client certificate (set on requests that came over
/// mutual TLS; absent otherwise).
#[derive(Debug, Clone)]
pub struct PeerIdentity(pub String);

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A request handler: the request and the peer's address in, a response out (never an error:
/// failures are answered as JSON responses). Boxed per request on purpose: a generic handler
/// saves the box (~1.4k instructions per request) but hyper then keeps a slot of the future's
/// full size (~5 KB) allocated for every open connection, idle or not (BENCHMARKS.md).
pub type Handler = Arc<dyn Fn(Request<Incoming>, SocketAddr) -> BoxFuture<Response<Body>> + Send + Sync>;

/// Serves `listener` until `stop` fires, then drains open connections for at most `drain`.
/// With `tls`, every connection must complete a mutual TLS handshake with the current identity
/// (none yet: the connection is refused).
pub async fn serve(
    listener: TcpListener,
    handler: Handler,
    stop: CancellationToken,
    drain: Duration,
    name: &'static str,
    tls: Option<Arc<crate::identity::IdentityCell>>,
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
                    let (handler, builder, tls) = (handler.clone(), builder.clone(), tls.clone());
                    let watcher = graceful.watcher();
                    tokio::spawn(
                        async move {
                            let Some(cell) = tls else {
                                let svc = service(handler, peer, None);
                                let conn = builder.serve_connection(TokioIo::new(stream), svc);
                                if let Err(e) = watcher.watch(conn.into_owned()).await {
                                    tracing::debug!(error = %e, "connection ended with an error");
                                }
                                return;
                            };
                            let Some(cert) = cell.current() else {
                                tracing::debug!("refused: no mesh certificate yet");
                                return;
                            };
                            let acceptor = tokio_rustls::TlsAcceptor::from(cert.server.clone());
                            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                                Ok(Ok(tls)) => tls,
                                Ok(Err(e)) => {
                                    tracing::debug!(error = %e, "mTLS handshake refused");
                                    return;
                                }
                                Err(_) => {
                                    tracing::debug!("mTLS handshake timed out");
                                    return;
                                }
                            };
                            let caller = tls
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .and_then(crate::tls::peer_spiffe_id);
                            let svc = service(handler, peer, caller.map(PeerIdentity));
                            let conn = builder.serve_connection(TokioIo::new(tls), svc);
                            if let Err(e) = watcher.watch(conn.into_owned()).await {
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
    // Connections still handshaking hold watchers too; the drain covers them.
    tokio::select! {
        _ = graceful.shutdown() => tracing::debug!(listener = name, "drained"),
        _ = tokio::time::sleep(drain) => tracing::warn!(listener = name, ?drain, "drain deadline passed with requests still open"),
    }
}

/// The hyper service of one connection: the handler, with the caller's verified identity (if
/// any) in each request's extensions.
#[derive(Clone)]
struct Service {
    handler: Handler,
    peer: SocketAddr,
    caller: Option<PeerIdentity>,
}

type Answer = Result<Response<Body>, Infallible>;

impl hyper::service::Service<Request<Incoming>> for Service {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = futures::future::Map<BoxFuture<Response<Body>>, fn(Response<Body>) -> Answer>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        if let Some(c) = &self.caller {
            req.extensions_mut().insert(c.clone());
        }
        futures::FutureExt::map((self.handler)(req, self.peer), Ok as fn(Response<Body>) -> Answer)
    }
}

fn service(handler: Handler, peer: SocketAddr, caller: Option<PeerIdentity>) -> Service {
    Service { handler, peer, caller }
}
