//! HTTP clients for tests: one-off requests, a pooled client, metrics scraped from `/metrics`.

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use std::net::SocketAddr;

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// `GET path` to `addr` with `Host: host`: (status, body).
/// The value of sample `name` (with its labels, as written) in Prometheus text, 0 if absent.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Sample `name` from the `/metrics` of the admin listener at `addr`.
pub async fn http_metric(addr: SocketAddr, name: &str) -> f64 {
    metric(&get(addr, "test", "/metrics").await.1, name)
}

pub async fn get(addr: SocketAddr, host: &str, path: &str) -> (u16, String) {
    request(addr, "GET", host, path, &[], Bytes::new()).await
}

/// One HTTP/1.1 request on a fresh pooled client: (status, body). Transport failures are
/// status 0 with the error as body.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> (u16, String) {
    let (status, _, body) = request_full(addr, method, host, path, headers, body).await;
    (status, body)
}

/// [`request`], also returning the answer's headers (status 0 and no headers if it failed).
pub async fn request_full(
    addr: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> (u16, http::HeaderMap, String) {
    let mut b = Request::builder().method(method).uri(format!("http://{addr}{path}")).header("host", host);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    match client().request(b.body(Full::new(body)).unwrap()).await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let (parts, body) = resp.into_parts();
            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            (status, parts.headers, String::from_utf8_lossy(&body).into_owned())
        }
        Err(e) => (0, http::HeaderMap::new(), e.to_string()),
    }
}

/// A reusable keep-alive client, as an app would hold one.
#[derive(Clone)]
pub struct HttpClient(Client<HttpConnector, Full<Bytes>>);

impl Default for HttpClient {
    fn default() -> Self {
        Self(client())
    }
}

impl HttpClient {
    pub async fn get(&self, addr: SocketAddr, host: &str, path: &str) -> (u16, String) {
        let req = Request::get(format!("http://{addr}{path}"))
            .header("host", host)
            .body(Full::new(Bytes::new()))
            .unwrap();
        match self.0.request(req).await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                (status, String::from_utf8_lossy(&body).into_owned())
            }
            Err(e) => (0, e.to_string()),
        }
    }
}
