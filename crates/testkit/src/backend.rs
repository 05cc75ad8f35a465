//! HTTP backends on loopback that say who answered, with faults on demand.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// An HTTP/1.1 + h2c app. `GET /healthz` answers 200 (or 503 once made unhealthy); every other
/// request answers JSON naming the backend, method, path, version and request headers, after
/// `delay` (or `?delay_ms=N`).
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub hits: Arc<AtomicU64>,
    pub healthy: Arc<AtomicBool>,
    pub delay_ms: Arc<AtomicU64>,
    /// Answer this status instead of 200 (0 = 200).
    pub status: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl Backend {
    pub async fn start(name: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let b = Backend {
            name: name.to_string(),
            addr,
            hits: Arc::default(),
            healthy: Arc::new(AtomicBool::new(true)),
            delay_ms: Arc::default(),
            status: Arc::default(),
            stop: CancellationToken::new(),
        };
        let (name, hits, healthy, delay, status, stop) = (
            b.name.clone(),
            b.hits.clone(),
            b.healthy.clone(),
            b.delay_ms.clone(),
            b.status.clone(),
            b.stop.clone(),
        );
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                };
                let (name, hits, healthy, delay, status) =
                    (name.clone(), hits.clone(), healthy.clone(), delay.clone(), status.clone());
                let svc = service_fn(move |req: Request<Incoming>| {
                    let (name, hits, healthy, delay, status) =
                        (name.clone(), hits.clone(), healthy.clone(), delay.clone(), status.clone());
                    async move { Ok::<_, Infallible>(answer(req, &name, &hits, &healthy, &delay, &status).await) }
                });
                let stop = stop.clone();
                tokio::spawn(async move {
                    let builder = auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = stop.cancelled() => {}
                    }
                });
            }
        });
        b
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Stops listening and drops every open connection at once (the app crashed).
    pub fn stop_now(&self) {
        self.stop.cancel();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn answer(
    req: Request<Incoming>,
    name: &str,
    hits: &AtomicU64,
    healthy: &AtomicBool,
    delay: &AtomicU64,
    status: &AtomicUsize,
) -> Response<Full<Bytes>> {
    if req.uri().path() == "/healthz" {
        let code =
            if healthy.load(Ordering::Relaxed) { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        return Response::builder().status(code).body(Full::new(Bytes::from_static(b"{}"))).unwrap();
    }
    hits.fetch_add(1, Ordering::Relaxed);
    let query_delay = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("delay_ms=")))
        .and_then(|v| v.parse::<u64>().ok());
    let ms = query_delay.unwrap_or_else(|| delay.load(Ordering::Relaxed));
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let headers: HashMap<String, String> =
        req.headers().iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string())).collect();
    let (method, path, version) =
        (req.method().to_string(), req.uri().path().to_string(), format!("{:?}", req.version()));
    let query = req.uri().query().map(str::to_string);
    let body_len = req.into_body().collect().await.map(|b| b.to_bytes().len()).unwrap_or(0);
    let body = serde_json::json!({
        "backend": name, "method": method, "path": path, "version": version, "headers": headers, "body_len": body_len,
        "hit": hits.load(Ordering::Relaxed),
    });
    let code = match status.load(Ordering::Relaxed) {
        0 => StatusCode::OK,
        c => StatusCode::from_u16(c as u16).unwrap_or(StatusCode::OK),
    };
    let mut resp = Response::builder().status(code).header("content-type", "application/json");
    // `?cc=…` and `?vary=…` set Cache-Control and Vary (for cache tests).
    for (param, header) in [("cc=", "cache-control"), ("vary=", "vary")] {
        if let Some(v) = query.as_deref().and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix(param))) {
            resp = resp.header(header, v.replace("%20", " "));
        }
    }
    resp.body(Full::new(Bytes::from(body.to_string()))).unwrap()
}

// ---- sidecars --------------------------------------------------------------------------------

/// The `backend` field of a Backend's JSON answer.
pub fn backend_of(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["backend"].as_str().map(str::to_string))
        .unwrap_or_else(|| format!("<not a backend answer: {body}>"))
}
