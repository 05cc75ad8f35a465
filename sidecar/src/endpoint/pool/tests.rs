// Tests spawn plain tasks.
#![allow(clippy::disallowed_methods)]

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::atomic::{AtomicUsize, Ordering},
};

use http_body_util::{BodyExt, Full, StreamBody};
use hyper::service::service_fn;
use hyper_util::server::conn::auto;
use mesh_testkit::eventually;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::http::body::{boxed, empty};

/// A loopback app that counts the connections it accepted and those that have ended.
/// `/empty` answers 204, `/big` streams 4 MiB, anything else a short body. With `close`,
/// every answer says `Connection: close`.
struct App {
    addr: Authority,
    accepted: Arc<AtomicUsize>,
    ended: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl App {
    async fn start(close: bool) -> App {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let (accepted, ended, stop) =
            (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), CancellationToken::new());
        let (a, e, s) = (accepted.clone(), ended.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = s.cancelled() => return,
                    r = listener.accept() => r.unwrap().0,
                };
                a.fetch_add(1, Ordering::SeqCst);
                let (e, s) = (e.clone(), s.clone());
                tokio::spawn(async move {
                    let svc = service_fn(|req: Request<Incoming>| async move {
                        let resp = match req.uri().path() {
                            "/empty" => Response::builder().status(204).body(empty()),
                            "/big" => {
                                let chunks = (0..256).map(|_| {
                                    Ok::<_, Infallible>(Frame::data(Bytes::from(vec![b'x'; 16 * 1024])))
                                });
                                Response::builder()
                                    .body(boxed(StreamBody::new(futures::stream::iter(chunks))))
                            }
                            _ => Response::builder().body(boxed(Full::new(Bytes::from_static(b"hello")))),
                        };
                        Ok::<_, Infallible>(resp.unwrap())
                    });
                    let mut builder = auto::Builder::new(TokioExecutor::new());
                    builder.http1().keep_alive(!close);
                    tokio::select! {
                        _ = builder.serve_connection(TokioIo::new(stream), svc) => {}
                        _ = s.cancelled() => {}
                    }
                    e.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        App { addr: addr.to_string().parse().unwrap(), accepted, ended, stop }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn ended(&self) -> usize {
        self.ended.load(Ordering::SeqCst)
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn get(path: &str, version: Version, target: &Authority) -> Request<Body> {
    let uri = if version == Version::HTTP_2 { format!("http://{target}{path}") } else { path.to_string() };
    let mut req = Request::builder().uri(uri).version(version).body(empty()).unwrap();
    if version != Version::HTTP_2 {
        req.headers_mut().insert(http::header::HOST, http::HeaderValue::from_static("app"));
    }
    req
}

async fn read(clients: &Clients, app: &App, path: &str) -> (u16, usize) {
    let resp = clients.send(&app.addr, get(path, Version::HTTP_11, &app.addr)).await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.into_body().collect().await.unwrap().to_bytes().len())
}

fn clients(idle: Duration) -> Clients {
    let mut policy = ServicePolicy::default();
    policy.timeout.idle = idle;
    Clients::new(&policy, None)
}

#[tokio::test]
async fn sequential_requests_reuse_one_connection() {
    let app = App::start(false).await;
    let c = clients(Duration::from_secs(60));
    for _ in 0..20 {
        assert_eq!(read(&c, &app, "/").await, (200, 5));
        assert_eq!(read(&c, &app, "/big").await, (200, 4 * 1024 * 1024));
    }
    assert_eq!(app.accepted(), 1, "every request after the first reuses the connection");
    assert_eq!(c.idle_count(&app.addr), 1);
}

#[tokio::test]
async fn empty_bodies_nobody_reads_still_return_their_connection() {
    let app = App::start(false).await;
    let c = clients(Duration::from_secs(60));
    for _ in 0..10 {
        let resp = c.send(&app.addr, get("/empty", Version::HTTP_11, &app.addr)).await.unwrap();
        assert_eq!(resp.status(), 204);
        drop(resp);
    }
    assert_eq!(app.accepted(), 1);
}

#[tokio::test]
async fn a_body_dropped_half_read_takes_its_connection_with_it() {
    let app = App::start(false).await;
    let c = clients(Duration::from_secs(60));
    let mut body = c.send(&app.addr, get("/big", Version::HTTP_11, &app.addr)).await.unwrap().into_body();
    body.frame().await.unwrap().unwrap();
    drop(body);
    assert_eq!(c.idle_count(&app.addr), 0, "a connection in the middle of a body is never reused");
    assert_eq!(read(&c, &app, "/").await, (200, 5));
    assert_eq!(app.accepted(), 2);
    eventually(Duration::from_secs(5), "the abandoned connection is closed", || async { app.ended() == 1 })
        .await;
}

#[tokio::test]
async fn connections_the_app_closes_are_never_reused() {
    let app = App::start(true).await;
    let c = clients(Duration::from_secs(60));
    for _ in 0..5 {
        assert_eq!(read(&c, &app, "/").await, (200, 5));
    }
    assert_eq!(app.accepted(), 5, "each answer said Connection: close");
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    let app = App::start(false).await;
    let c = clients(Duration::from_millis(200));
    assert_eq!(read(&c, &app, "/").await, (200, 5));
    assert_eq!(c.idle_count(&app.addr), 1);
    eventually(Duration::from_secs(5), "the idle connection is closed", || async { app.ended() == 1 }).await;
    assert_eq!(c.idle_count(&app.addr), 0);
    // A later request simply opens a new one.
    assert_eq!(read(&c, &app, "/").await, (200, 5));
    assert_eq!(app.accepted(), 2);
}

#[tokio::test]
async fn http2_requests_share_one_connection() {
    let app = App::start(false).await;
    let c = clients(Duration::from_secs(60));
    let sends = (0..16).map(|_| {
        let (c, target) = (c.clone(), app.addr.clone());
        async move {
            let resp = c.send(&target, get("/", Version::HTTP_2, &target)).await.unwrap();
            assert_eq!(resp.version(), Version::HTTP_2);
            resp.into_body().collect().await.unwrap().to_bytes().len()
        }
    });
    assert_eq!(futures::future::join_all(sends).await, vec![5; 16]);
    assert_eq!(app.accepted(), 1);
}

#[tokio::test]
async fn a_refused_connection_is_a_connect_error() {
    let port = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
    let target: Authority = format!("127.0.0.1:{port}").parse().unwrap();
    let c = clients(Duration::from_secs(60));
    match c.send(&target, get("/", Version::HTTP_11, &target)).await {
        Err(SendError::Connect(e)) => assert!(e.to_string().contains("refused"), "{e}"),
        Err(SendError::Request(e)) => panic!("expected a connect error, got {e}"),
        Ok(r) => panic!("expected a connect error, got {}", r.status()),
    }
}
