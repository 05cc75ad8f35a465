//! The proxies' connection pools: per target address, a stack of idle HTTP/1.1 connections
//! (the most recently used on top) and one shared HTTP/2 connection, over TCP or — to a mesh
//! peer — mutual TLS.
//!
//! An HTTP/1.1 connection goes back on its stack when the response body it carries has ended,
//! so the request path spawns no task, boxes no pool future and hashes one short key. A request
//! whose reused connection turned out closed before the request was written is sent again on
//! another (hyper hands such a request back untouched; one that reached the peer never is).
//! Idle connections older than the policy's idle timeout are closed by a reaper task, one per
//! pool, started with its first connection and ended with the pool.
//!
//! To a mesh peer, at most [`H1_PER_PEER`] HTTP/1.1 connections are opened; an HTTP/1.1
//! request that finds none of them idle travels as a stream of the shared HTTP/2 connection
//! instead, marked with `crate::http::headers::ORIG_PROTO` so the peer's inbound hands it to its app
//! as HTTP/1.1, and counted in `mesh_sidecar_multiplexed_requests_total`. One request at a time
//! stays on HTTP/1.1, which costs least per request; many at once share the HTTP/2 connection's
//! TLS records and socket writes, which costs less than one connection each: CPU per request of the mTLS pair at 64 connections −6 % (every request
//! over HTTP/2: −8 %, but +15–20 µs per request one at a time; `PAIRED=1 bench/variants.sh`
//! and `bench/mtls.sh`, BENCHMARKS.md).

use crate::{
    http::{
        body::{Body, BoxError},
        headers::{self, ORIG_PROTO},
    },
    identity::cell::IdentityCell,
    server::timer,
    transport::{net::Coalesced, tls::Gated},
};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, Version, uri::Authority};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_proto::policy::ServicePolicy;
use std::{
    collections::HashMap,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};
use tokio::{net::TcpStream, time::Instant};
use tokio_util::either::Either;

/// Where a client's connections are mutual TLS: the identity to present, and the service
/// whose SPIFFE id the server must have.
#[derive(Clone)]
pub struct MeshTls {
    pub identity: std::sync::Arc<IdentityCell>,
    pub service: String,
    /// Counts this service's HTTP/1.1 requests that went as streams of the shared HTTP/2
    /// connection (`mesh_sidecar_multiplexed_requests_total`).
    pub multiplexed: prometheus_client::metrics::counter::Counter,
}

/// Idle HTTP/1.1 connections kept per target at most; more are closed when they come back.
const MAX_IDLE_PER_TARGET: usize = 1024;

/// HTTP/2 pings on an otherwise idle connection, so a dead peer is noticed.
const H2_KEEPALIVE: Duration = Duration::from_secs(20);

/// HTTP/1.1 connections opened to one mesh peer at most; more requests at once go over HTTP/2.
/// (0 sends every request to a peer over HTTP/2: the "all HTTP/2" row of BENCHMARKS.md.)
pub const H1_PER_PEER: usize = 2;

/// How long a pooled connection whose last exchange just ended may take to accept the next
/// request (it is normally ready at once) before another one is used.
const READY_WAIT: Duration = Duration::from_millis(100);

/// Target addresses are short and chosen by discovery, not by callers: a fast fixed hash.
type Hasher = foldhash::fast::FixedState;

/// Pooled keep-alive connections built from a policy's connect and idle timeouts; mutual TLS
/// when `tls` names the peer. Cheap to clone; clones share the pools.
#[derive(Clone)]
pub struct Clients(Arc<Inner>);

struct Inner {
    /// Keyed by the address text: `Authority` hashes and compares byte by byte, lowercased.
    targets: Mutex<HashMap<Box<str>, Arc<Target>, Hasher>>,
    tls: Option<MeshTls>,
    connect_timeout: Option<Duration>,
    idle_timeout: Option<Duration>,
    reaping: AtomicBool,
    /// Every connection goes to this Unix socket (the local app's), whatever the target names.
    unix: Option<std::path::PathBuf>,
}

/// The connections to one address.
#[derive(Default)]
struct Target {
    idle: Mutex<Vec<Idle>>,
    h2: Mutex<Option<http2::SendRequest<Body>>>,
    /// Held while an HTTP/2 connection is being made, so concurrent first requests share it.
    h2_connecting: tokio::sync::Mutex<()>,
    /// HTTP/1.1 connections open or being opened (counted for mesh peers only).
    h1_open: AtomicUsize,
}

/// One of a mesh peer's [`Target::h1_open`] connections, given back when its task ends.
struct H1Slot(Arc<Target>);

impl H1Slot {
    /// A slot for one more HTTP/1.1 connection to `t`, unless [`H1_PER_PEER`] are open.
    fn take(t: &Arc<Target>) -> Option<Self> {
        let slot = H1Slot(t.clone());
        (t.h1_open.fetch_add(1, Ordering::Relaxed) < H1_PER_PEER).then_some(slot)
    }
}

impl Drop for H1Slot {
    fn drop(&mut self) {
        self.0.h1_open.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Idle {
    tx: http1::SendRequest<Body>,
    since: Instant,
}

/// Why a request got no response.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made (TCP, TLS or the HTTP/2 handshake).
    Connect(BoxError),
    /// The connection failed the request.
    Request(hyper::Error),
}

/// A connection as the pool holds it: plain TCP or a Unix socket to the local app, or TLS to a
/// mesh peer (boxed: a TLS connection's state is ~1 KB, a plain one 40 bytes).
type MeshStream = TokioIo<
    Either<
        Either<Coalesced<TcpStream>, tokio::net::UnixStream>,
        Box<Gated<tokio_rustls::client::TlsStream<Coalesced<TcpStream>>>>,
    >,
>;

/// A response body that puts its HTTP/1.1 connection back in the pool once it has ended.
pub struct Pooled {
    body: Incoming,
    back: Option<(http1::SendRequest<Body>, Arc<Target>)>,
}

impl Clients {
    pub fn new(policy: &ServicePolicy, tls: Option<MeshTls>) -> Self {
        let t = &policy.timeout;
        Self(Arc::new(Inner {
            targets: Mutex::new(HashMap::default()),
            tls,
            connect_timeout: (!t.connect.is_zero()).then_some(t.connect),
            idle_timeout: (!t.idle.is_zero()).then_some(t.idle),
            reaping: AtomicBool::new(false),
            unix: None,
        }))
    }

    /// A pool whose connections all go to the Unix socket at `path` (plaintext).
    pub fn unix(policy: &ServicePolicy, path: std::path::PathBuf) -> Self {
        let mut inner = Self::new(policy, None);
        // Just made: the only reference.
        if let Some(i) = Arc::get_mut(&mut inner.0) {
            i.unix = Some(path);
        }
        inner
    }

    /// Sends `req` (its URI already in the form its version needs) to `target`: HTTP/2 on the
    /// target's shared connection, anything else as HTTP/1.1 on an idle or new connection.
    pub async fn send(&self, target: &Authority, req: Request<Body>) -> Result<Response<Pooled>, SendError> {
        let t = self.target(target);
        if req.version() == Version::HTTP_2 {
            self.send_h2(&t, target, req).await
        } else {
            self.send_h1(t, target, req).await
        }
    }

    fn target(&self, target: &Authority) -> Arc<Target> {
        let mut targets = self.0.targets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = targets.get(target.as_str()) {
            return t.clone();
        }
        targets.entry(target.as_str().into()).or_default().clone()
    }

    async fn send_h1(
        &self,
        t: Arc<Target>,
        target: &Authority,
        mut req: Request<Body>,
    ) -> Result<Response<Pooled>, SendError> {
        loop {
            let (mut tx, reused) = match checkout(&t, self.0.idle_timeout).await {
                Some(tx) => (tx, true),
                None => {
                    // A mesh peer: one of its few HTTP/1.1 connections, or else HTTP/2.
                    let slot = match &self.0.tls {
                        Some(tls) if req.method() != Method::CONNECT => match H1Slot::take(&t) {
                            Some(slot) => Some(slot),
                            None => return Box::pin(self.send_multiplexed(tls, &t, target, req)).await,
                        },
                        _ => None,
                    };
                    // Boxed: the TLS handshake's state would otherwise size every request's future.
                    (Box::pin(self.connect_h1(target, slot)).await?, false)
                }
            };
            match tx.try_send_request(req).await {
                Ok(resp) => return Ok(resp.map(|body| Pooled { body, back: Some((tx, t)) })),
                Err(mut e) => match e.take_message() {
                    // Closed before a byte of the request was written: another connection.
                    Some(r) if reused => req = r,
                    _ => return Err(SendError::Request(e.into_error())),
                },
            }
        }
    }

    /// An HTTP/1.1 request to a mesh peer as a stream of the shared HTTP/2 connection, marked
    /// so the peer gives its app HTTP/1.1 (and counted in `tls`); the answer goes back as HTTP/1.1.
    async fn send_multiplexed(
        &self,
        tls: &MeshTls,
        t: &Target,
        target: &Authority,
        mut req: Request<Body>,
    ) -> Result<Response<Pooled>, SendError> {
        *req.uri_mut() = headers::h2_uri(target, req.uri()).map_err(|e| SendError::Connect(e.into()))?;
        *req.version_mut() = Version::HTTP_2;
        tls.multiplexed.inc();
        req.headers_mut().insert(ORIG_PROTO, HeaderValue::from_static("HTTP/1.1"));
        let mut resp = self.send_h2(t, target, req).await?;
        *resp.version_mut() = Version::HTTP_11;
        Ok(resp)
    }

    async fn send_h2(
        &self,
        t: &Target,
        target: &Authority,
        req: Request<Body>,
    ) -> Result<Response<Pooled>, SendError> {
        let (mut tx, reused) = match t.shared_h2() {
            Some(tx) => (tx, true),
            None => {
                let _connecting = t.h2_connecting.lock().await;
                match t.shared_h2() {
                    Some(tx) => (tx, true),
                    None => (Box::pin(self.connect_h2(t, target)).await?, false),
                }
            }
        };
        let req = match tx.try_send_request(req).await {
            Ok(resp) => return Ok(resp.map(|body| Pooled { body, back: None })),
            Err(mut e) => match e.take_message() {
                Some(r) if reused => r,
                _ => return Err(SendError::Request(e.into_error())),
            },
        };
        // The shared connection went away before taking the request: one new connection.
        let mut tx = {
            let _connecting = t.h2_connecting.lock().await;
            match t.shared_h2() {
                Some(tx) => tx,
                None => Box::pin(self.connect_h2(t, target)).await?,
            }
        };
        match tx.try_send_request(req).await {
            Ok(resp) => Ok(resp.map(|body| Pooled { body, back: None })),
            Err(e) => Err(SendError::Request(e.into_error())),
        }
    }

    /// A new HTTP/1.1 connection; `slot` (a mesh peer's) is held until the connection ends.
    async fn connect_h1(
        &self,
        target: &Authority,
        slot: Option<H1Slot>,
    ) -> Result<http1::SendRequest<Body>, SendError> {
        let io = self.connect(target, b"http/1.1").await.map_err(SendError::Connect)?;
        // One flat write buffer over TLS (see `crate::server::serve`), vectored writes over TCP.
        let (tx, conn) = http1::Builder::new()
            .writev(self.0.tls.is_none())
            .handshake(io)
            .await
            .map_err(|e| SendError::Connect(e.into()))?;
        drive(
            async move {
                let _slot = slot;
                conn.await
            },
            "HTTP/1.1",
        );
        Ok(tx)
    }

    async fn connect_h2(
        &self,
        t: &Target,
        target: &Authority,
    ) -> Result<http2::SendRequest<Body>, SendError> {
        let io = self.connect(target, b"h2").await.map_err(SendError::Connect)?;
        let (tx, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(H2_KEEPALIVE)
            .keep_alive_while_idle(true)
            .handshake(io)
            .await
            .map_err(|e| SendError::Connect(e.into()))?;
        drive(conn, "HTTP/2");
        *t.h2.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx.clone());
        Ok(tx)
    }

    /// TCP (within the connect timeout), then mutual TLS offering `alpn` when the target is a
    /// mesh peer.
    async fn connect(&self, target: &Authority, alpn: &'static [u8]) -> Result<MeshStream, BoxError> {
        self.start_reaper();
        if let Some(path) = &self.0.unix {
            let unix = self.within_connect_timeout(tokio::net::UnixStream::connect(path)).await?;
            return Ok(TokioIo::new(Either::Left(Either::Right(unix))));
        }
        let tcp = self.within_connect_timeout(TcpStream::connect(target.as_str())).await?;
        let _ = tcp.set_nodelay(true);
        let tcp = Coalesced(tcp);
        let Some(tls) = &self.0.tls else { return Ok(TokioIo::new(Either::Left(Either::Left(tcp)))) };
        let Some(cert) = tls.identity.current() else {
            return Err("this sidecar has no mesh certificate yet (mTLS calls wait for the CA)".into());
        };
        let config = cert.client_for(&tls.service, alpn)?;
        let name = rustls::pki_types::ServerName::try_from(tls.service.clone())
            .map_err(|e| format!("service name {} as TLS server name: {e}", tls.service))?;
        let stream = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("mTLS handshake with {} failed: {e}", tls.service))?;
        Ok(TokioIo::new(Either::Right(Box::new(Gated(stream)))))
    }

    async fn within_connect_timeout<S>(
        &self,
        connecting: impl std::future::Future<Output = std::io::Result<S>>,
    ) -> Result<S, BoxError> {
        Ok(match self.0.connect_timeout {
            Some(limit) => tokio::time::timeout(limit, connecting)
                .await
                .map_err(|_| format!("no connection within {}ms", limit.as_millis()))??,
            None => connecting.await?,
        })
    }

    /// Starts the task that closes connections idle past the idle timeout (once per pool; it
    /// ends when the pool is dropped).
    fn start_reaper(&self) {
        let Some(idle) = self.0.idle_timeout else { return };
        if self.0.reaping.swap(true, Ordering::Relaxed) {
            return;
        }
        let every = (idle / 2).clamp(Duration::from_millis(100), Duration::from_secs(30));
        timer::every_while_alive("idle_reaper", &self.0, every, |pool| pool.reap(Instant::now()));
    }

    /// Idle HTTP/1.1 connections to `target`.
    #[cfg(test)]
    pub fn idle_count(&self, target: &Authority) -> usize {
        let targets = self.0.targets.lock().unwrap_or_else(|p| p.into_inner());
        targets.get(target.as_str()).map_or(0, |t| t.idle.lock().unwrap_or_else(|p| p.into_inner()).len())
    }
}

impl Inner {
    /// Closes idle connections past the timeout, and forgets targets left with nothing.
    fn reap(&self, now: Instant) {
        let Some(limit) = self.idle_timeout else { return };
        let mut targets = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        targets.retain(|_, t| {
            let mut idle = t.idle.lock().unwrap_or_else(|p| p.into_inner());
            idle.retain(|i| i.usable(now, Some(limit)));
            let mut h2 = t.h2.lock().unwrap_or_else(|p| p.into_inner());
            if h2.as_ref().is_some_and(|tx| tx.is_closed()) {
                *h2 = None;
            }
            !idle.is_empty() || h2.is_some() || Arc::strong_count(t) > 1
        });
    }
}

/// Runs an upstream connection's task until the connection ends.
fn drive<C>(conn: C, protocol: &'static str)
where
    C: std::future::Future<Output = Result<(), hyper::Error>> + Send + 'static,
{
    mesh_runtime::spawn(tracing::debug_span!("upstream_connection", protocol), async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, protocol, "upstream connection ended with an error");
        }
    });
}

/// The most recently used live idle connection to `t`, if any.
async fn checkout(t: &Target, idle_timeout: Option<Duration>) -> Option<http1::SendRequest<Body>> {
    loop {
        let popped = t.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let idle = popped?;
        if !idle.usable(Instant::now(), idle_timeout) {
            continue;
        }
        let mut tx = idle.tx;
        if tx.is_ready() {
            return Some(tx);
        }
        // Its last response has only just ended: the connection wants the next request a
        // moment later.
        if let Ok(Ok(())) = tokio::time::timeout(READY_WAIT, tx.ready()).await {
            return Some(tx);
        }
    }
}

impl Idle {
    /// Still open, and idle for less than the idle timeout (if any).
    fn usable(&self, now: Instant, idle_timeout: Option<Duration>) -> bool {
        !self.tx.is_closed() && idle_timeout.is_none_or(|limit| now.duration_since(self.since) < limit)
    }
}

impl Target {
    /// The shared HTTP/2 connection, unless it has closed.
    fn shared_h2(&self) -> Option<http2::SendRequest<Body>> {
        self.h2.lock().unwrap_or_else(|p| p.into_inner()).clone().filter(|tx| !tx.is_closed())
    }

    fn put(&self, tx: http1::SendRequest<Body>) {
        if tx.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE_PER_TARGET {
            idle.push(Idle { tx, since: Instant::now() });
        }
    }
}

impl Pooled {
    fn give_back(&mut self) {
        if let Some((tx, t)) = self.back.take() {
            t.put(tx);
        }
    }
}

impl HttpBody for Pooled {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Err(_))) => self.back = None,
            Poll::Ready(None) => self.give_back(),
            // Readers stop at `is_end_stream`, so the last frame hands the connection back.
            Poll::Ready(Some(Ok(_))) if self.body.is_end_stream() => self.give_back(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        // An empty body is never read; one dropped half-read leaves its connection unusable.
        if self.body.is_end_stream() {
            self.give_back();
        }
    }
}

#[cfg(test)]
mod tests;
