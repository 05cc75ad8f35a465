//! The accept loop both proxies use: HTTP/1.1 and h2c on one listener (detected per
//! connection) — or, for the inbound listener of a sidecar with a mesh identity, mutual TLS
//! only (ALPN picks the protocol; the peer identity its certificate proved is read once per
//! connection and handed with every request as part of [`Peer`]) — and a graceful drain: stop
//! accepting, let open connections finish their requests, give up after a deadline.

pub mod timer;

use crate::{
    http::body::Body,
    identity::cell::IdentityCell,
    server::timer::CoarseTimer,
    transport::{
        framing::{Framed, FramingLog},
        net::Coalesced,
        public_tls::PublicTls,
        tls::{self, Gated},
    },
};

use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use mesh_runtime::LocalListener;
use std::{convert::Infallible, future::Future, net::SocketAddr, pin::Pin, sync::Arc, time::Duration};
use tokio_util::sync::CancellationToken;

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Boxes the future `make` builds, building it in its allocation: a request's future holds the
/// whole request path's state (kilobytes), and built first and boxed after, it is copied twice.
pub fn boxed_in_place<F>(make: impl FnOnce() -> F) -> BoxFuture<Response<Body>>
where
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let boxed: Box<F> = Box::write(Box::<F>::new_uninit(), make());
    Box::into_pin(boxed)
}

/// The other end of a connection, handed to the handler with each of its requests.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// Over mutual TLS, the identity the caller's certificate proved; `None` otherwise.
    pub identity: Option<Arc<PeerIdentity>>,
    /// On the gateway's listener, the framing verdict of each HTTP/1.1 request, in order.
    pub framing: Option<Arc<FramingLog>>,
}

/// A SPIFFE id a caller proved with its client certificate, with what requests need of it
/// prepared once per connection: the service it names and its form as a header value.
#[derive(Debug)]
pub struct PeerIdentity {
    id: String,
    service: Option<String>,
    header: Option<HeaderValue>,
}

impl PeerIdentity {
    pub fn new(id: String) -> Self {
        let service = id.rsplit_once("/service/").map(|(_, s)| s.to_string());
        let header = HeaderValue::from_maybe_shared(bytes::Bytes::from(id.clone())).ok();
        Self { id, service, header }
    }

    /// The whole SPIFFE id (`spiffe://<trust-domain>/service/<name>`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The service the id names, if it has the mesh's form.
    pub fn service(&self) -> Option<&str> {
        self.service.as_deref()
    }

    /// The id as a header value (`None` if it has bytes a header cannot carry).
    pub fn header(&self) -> Option<&HeaderValue> {
        self.header.as_ref()
    }
}

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A request handler: the request and its connection's peer in, a response out (never an error:
/// failures are answered as JSON responses). Boxed per request on purpose: a generic handler
/// saves the box (~1.4k instructions per request) but hyper then keeps a slot of the future's
/// full size (~5 KB) allocated for every open connection, idle or not (BENCHMARKS.md).
pub type Handler = Arc<dyn Fn(Request<Incoming>, &Peer) -> BoxFuture<Response<Body>> + Send + Sync>;

/// What a listener's connections must complete a TLS handshake with.
#[derive(Clone)]
pub enum ServerTls {
    /// Mutual TLS with the sidecar's current mesh identity (none yet: the connection is
    /// refused): the inbound listener.
    Mesh(Arc<IdentityCell>),
    /// Server-only TLS with a certificate from files: the gateway's public listener.
    Public(Arc<PublicTls>),
}

/// How a listener serves its connections.
pub struct Listen {
    /// For logs.
    pub name: &'static str,
    /// After `stop`, how long open connections may finish.
    pub drain: Duration,
    /// The TLS handshake every connection must complete first.
    pub tls: Option<ServerTls>,
    /// How long an HTTP/1 request head may take to arrive (to within a tenth of it) after the
    /// connection opened or its previous answer.
    pub header_read_timeout: Duration,
    /// The gateway: follow each connection's HTTP/1.1 framing and hand the handler a verdict
    /// per request ([`crate::transport::framing`]).
    pub guard_framing: bool,
}

/// Serves `listener` until `stop` fires, then drains open connections for at most
/// `listen.drain`.
pub async fn serve(
    listener: impl Into<LocalListener>,
    handler: Handler,
    stop: CancellationToken,
    listen: Listen,
) {
    let Listen { name, drain, tls, header_read_timeout, guard_framing } = listen;
    let header_timer = CoarseTimer::default();
    header_timer.start((header_read_timeout / 10).clamp(Duration::from_millis(10), Duration::from_secs(1)));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Half-closed client connections are allowed (as HAProxy does without `abortonclose`): a
    // request whose caller shut its write side still gets its answer, and a request in flight
    // costs no read of its connection to look for an end of stream (a read that would find the
    // read buffer still shared with the request's headers and allocate another).
    // Over TLS, rustls copies every byte into its records anyway, so hyper's queue of buffers
    // for vectored writes is only bookkeeping there: one flat buffer instead. In plaintext the
    // queue stays and `Coalesced` (crate::net) flattens the small writes at the socket.
    builder
        .http1()
        .timer(header_timer)
        .header_read_timeout(header_read_timeout)
        .half_close(true)
        .writev(tls.is_none());
    builder.http2().timer(TokioTimer::new()).max_concurrent_streams(1024);
    let graceful = GracefulShutdown::new();
    let listener = listener.into();
    let tcp = match &listener {
        LocalListener::Tcp(l) => l,
        LocalListener::Unix(l, path) => {
            // The local app's own socket (owner-only): plaintext, no mesh identity.
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    accepted = l.accept() => match accepted {
                        Ok((stream, _)) => {
                            let svc = Service { handler: handler.clone(), peer: Peer { addr: LOCAL, identity: None, framing: None } };
                            let conn = builder.serve_connection(TokioIo::new(stream), svc).into_owned();
                            let watched = graceful.watch(conn);
                            mesh_runtime::spawn(tracing::debug_span!("conn", listener = name, socket = %path.display()), async move {
                                    if let Err(e) = watched.await {
                                        tracing::debug!(error = %e, "connection ended with an error");
                                    }
                                });
                        }
                        Err(e) => {
                            tracing::warn!(listener = name, error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    },
                }
            }
            return drain_then_stop(listener, graceful, drain, name).await;
        }
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            accepted = tcp.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let (handler, builder, tls) = (handler.clone(), builder.clone(), tls.clone());
                    let watcher = graceful.watcher();
                    mesh_runtime::spawn(tracing::debug_span!("conn", listener = name, %peer), async move {
                            let Some(tls) = tls else {
                                if guard_framing {
                                    let log = Arc::new(FramingLog::default());
                                    let svc = Service { handler, peer: Peer { addr: peer, identity: None, framing: Some(log.clone()) } };
                                    let conn = builder.serve_connection(TokioIo::new(Framed::new(Coalesced(stream), log)), svc);
                                    if let Err(e) = watcher.watch(conn.into_owned()).await {
                                        tracing::debug!(error = %e, "connection ended with an error");
                                    }
                                    return;
                                }
                                let svc = Service { handler, peer: Peer { addr: peer, identity: None, framing: None } };
                                let conn = builder.serve_connection(TokioIo::new(Coalesced(stream)), svc);
                                if let Err(e) = watcher.watch(conn.into_owned()).await {
                                    tracing::debug!(error = %e, "connection ended with an error");
                                }
                                return;
                            };
                            let config = match &tls {
                                ServerTls::Mesh(cell) => match cell.current() {
                                    Some(cert) => cert.server.clone(),
                                    None => {
                                        tracing::debug!("refused: no mesh certificate yet");
                                        return;
                                    }
                                },
                                ServerTls::Public(public) => public.config(),
                            };
                            let acceptor = tokio_rustls::TlsAcceptor::from(config);
                            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(Coalesced(stream))).await {
                                Ok(Ok(tls)) => tls,
                                Ok(Err(e)) => {
                                    tracing::debug!(error = %e, "TLS handshake refused");
                                    return;
                                }
                                Err(_) => {
                                    tracing::debug!("TLS handshake timed out");
                                    return;
                                }
                            };
                            let caller = tls
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .and_then(tls::peer_spiffe_id);
                            let identity = caller.map(|id| Arc::new(PeerIdentity::new(id)));
                            if guard_framing {
                                let log = Arc::new(FramingLog::default());
                                let svc = Service { handler, peer: Peer { addr: peer, identity, framing: Some(log.clone()) } };
                                let conn = builder.serve_connection(TokioIo::new(Framed::new(Gated(tls), log)), svc);
                                if let Err(e) = watcher.watch(conn.into_owned()).await {
                                    tracing::debug!(error = %e, "connection ended with an error");
                                }
                                return;
                            }
                            let svc = Service { handler, peer: Peer { addr: peer, identity, framing: None } };
                            let conn = builder.serve_connection(TokioIo::new(Gated(tls)), svc);
                            if let Err(e) = watcher.watch(conn.into_owned()).await {
                                tracing::debug!(error = %e, "connection ended with an error");
                            }
                        });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    drain_then_stop(listener, graceful, drain, name).await
}

/// The peer address of a client on a Unix socket (it has none of its own).
pub const LOCAL: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

/// Stops accepting, then waits for open connections, at most `drain`.
async fn drain_then_stop(
    listener: LocalListener,
    graceful: GracefulShutdown,
    drain: Duration,
    name: &'static str,
) {
    drop(listener);
    // Connections still handshaking hold watchers too; the drain covers them.
    tokio::select! {
        _ = graceful.shutdown() => tracing::debug!(listener = name, "drained"),
        _ = tokio::time::sleep(drain) => tracing::warn!(listener = name, ?drain, "drain deadline passed with requests still open"),
    }
}

/// The hyper service of one connection: the handler, called with the connection's peer.
#[derive(Clone)]
struct Service {
    handler: Handler,
    peer: Peer,
}

type Answer = Result<Response<Body>, Infallible>;

impl hyper::service::Service<Request<Incoming>> for Service {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = futures::future::Map<BoxFuture<Response<Body>>, fn(Response<Body>) -> Answer>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        futures::FutureExt::map((self.handler)(req, &self.peer), Ok as fn(Response<Body>) -> Answer)
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, clippy::disallowed_types)] // Tests spawn plain tasks and time a real slow client.
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpStream,
    };

    use super::*;

    /// Serves answers of 200 with `header_read_timeout`; the address, the stop and the task.
    async fn server(
        header_read_timeout: Duration,
    ) -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handler: Handler = Arc::new(|_, _| Box::pin(async { Response::new(crate::http::body::empty()) }));
        let stop = CancellationToken::new();
        let drain = Duration::from_secs(1);
        let task = mesh_runtime::spawn(
            tracing::Span::none(),
            serve(
                listener,
                handler,
                stop.clone(),
                Listen { name: "test", drain, tls: None, header_read_timeout, guard_framing: false },
            ),
        );
        (addr, stop, task)
    }

    /// Reads until the server closes the connection (bounded); what it sent.
    async fn until_closed(conn: &mut TcpStream) -> String {
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), conn.read_to_end(&mut got))
            .await
            .expect("the server closes the connection")
            .expect("read");
        String::from_utf8_lossy(&got).into_owned()
    }

    #[tokio::test]
    async fn slow_headers_and_idle_keep_alive_connections_are_cut_off() {
        let timeout = Duration::from_millis(300);
        let (addr, stop, task) = server(timeout).await;

        // Half a request head, then nothing.
        let mut slow = TcpStream::connect(addr).await.unwrap();
        let sent = std::time::Instant::now();
        slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        let answer = until_closed(&mut slow).await;
        assert!(sent.elapsed() >= timeout / 2, "not closed long before the timeout");
        assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 408"), "{answer:?}");

        // A whole request is answered; the connection left idle afterwards is closed too.
        let mut idle = TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let answer = until_closed(&mut idle).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");

        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn negative_control_a_long_timeout_keeps_a_slow_client_connected() {
        let (addr, stop, task) = server(crate::config::HEADER_READ_TIMEOUT).await;
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_millis(600), slow.read(&mut byte)).await;
        assert!(read.is_err(), "still open after 600 ms of a 30 s limit: {read:?}");
        // The rest of the head arrives late but in time: answered.
        slow.write_all(b"\r\n").await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(20), slow.read(&mut byte)).await.unwrap().unwrap();
        assert_eq!((n, byte[0]), (1, b'H'));
        stop.cancel();
        task.await.unwrap();
    }
}
