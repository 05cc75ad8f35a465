//! `bench-backend`: the app behind every proxy in the data-plane benchmark. One thread,
//! HTTP/1.1 and h2c on one port, answers every request with `200 ok` at once, except
//! `GET /__requests`, which answers how many other requests it has answered (so a benchmark
//! can count the requests of a time window that no client run starts or ends).
//!
//! `bench-backend 127.0.0.1:0` prints `{"event":"listening","http":"…"}` and serves until killed.

// Benchmarks time real work with the wall clock and spawn plain load generators.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::{
    convert::Infallible,
    sync::atomic::{AtomicU64, Ordering},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};

/// Requests answered, `/__requests` excepted.
static ANSWERED: AtomicU64 = AtomicU64::new(0);

fn main() -> std::io::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:0".into());
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
        let listener = tokio::net::TcpListener::bind(&addr).await?;
        println!("{}", serde_json::json!({"event": "listening", "http": listener.local_addr()?}));
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let svc = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    let body = if req.uri().path() == "/__requests" {
                        Bytes::from(ANSWERED.load(Ordering::Relaxed).to_string())
                    } else {
                        ANSWERED.fetch_add(1, Ordering::Relaxed);
                        Bytes::from_static(b"ok")
                    };
                    Ok::<_, Infallible>(Response::new(Full::new(body)))
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    })
}
