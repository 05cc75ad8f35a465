//! `bench-events`: the event path's load generator and subscriber app.
//!
//! It serves a webhook (`POST /hook`, and `200` for any `GET`, the sidecar's health probe) on
//! `--hook`, publishes `--events` events (`--batch` per request, `--concurrency` requests in
//! flight; each publisher owns one key and publishes in order) to a sidecar's `POST /events` at `--publish`, and, with
//! `--wait-delivery`, waits until the subscriber's sidecar has delivered every one to the hook.
//! Each event carries its publish time, so delivery latency is measured per event.
//!
//! With `--rate N` it publishes at a steady N events/s instead of as fast as it can (the outage
//! evidence run), and `--direct-bus URL` publishes straight to the bus over gRPC, without a
//! spool (the negative control: what an app without the sidecar's spool loses while the bus is
//! down). Prints one JSON object with the figures.

// Benchmarks time real work with the wall clock and spawn plain load generators.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, service::service_fn};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use mesh_proto::v1;
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Where the webhook listens (the subscriber sidecar's --app-addr).
    #[arg(long)]
    hook: SocketAddr,
    /// The publishing sidecar's admin address.
    #[arg(long)]
    publish: Option<SocketAddr>,
    /// Publish straight to the bus at this gRPC URL instead (no spool).
    #[arg(long)]
    direct_bus: Option<String>,
    #[arg(long, default_value = "bench")]
    topic: String,
    #[arg(long, default_value_t = 20_000)]
    events: u64,
    #[arg(long, default_value_t = 1)]
    batch: u64,
    #[arg(long, default_value_t = 16)]
    concurrency: u64,
    /// Steady rate in events/s (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Wait (at most this long) until every event reached the hook.
    #[arg(long, value_parser = mesh_runtime::parse_duration)]
    wait_delivery: Option<Duration>,
    /// Event ids are `<prefix>-<n>` (default: the start time, so runs never collide in dedup).
    #[arg(long)]
    id_prefix: Option<String>,
    /// Before publishing, wait until the sidecar with this admin address finds its app (the
    /// hook) healthy.
    #[arg(long)]
    wait_healthy: Option<SocketAddr>,
    /// Write `sent_unix_us delivered_unix_us` per delivered event here (first deliveries).
    #[arg(long)]
    dump: Option<std::path::PathBuf>,
    /// Only serve the hook (until killed).
    #[arg(long)]
    serve_only: bool,
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_micros() as u64
}

/// What the hook saw: per event id, the first delivery's latency (µs) and the number of
/// deliveries; per key, the sequence numbers in arrival order.
#[derive(Default)]
struct Seen {
    first: HashMap<String, u64>,
    /// (sent, first delivered) per event, µs since the epoch.
    times: Vec<(u64, u64)>,
    deliveries: u64,
    per_key: HashMap<String, Vec<u64>>,
    last_us: u64,
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize] as f64
}

async fn serve_hook(addr: SocketAddr, seen: Arc<Mutex<Seen>>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let seen = seen.clone();
                    async move {
                        if req.method() == hyper::Method::POST {
                            let id = req
                                .headers()
                                .get("ce-id")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or_default()
                                .to_string();
                            let key = req
                                .headers()
                                .get("ce-subject")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or_default()
                                .to_string();
                            let body =
                                req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                            let (sent, seq) = (v["t"].as_u64().unwrap_or(0), v["seq"].as_u64().unwrap_or(0));
                            let now = now_us();
                            let mut s = seen.lock().unwrap_or_else(|p| p.into_inner());
                            s.deliveries += 1;
                            s.last_us = now;
                            if let std::collections::hash_map::Entry::Vacant(v) = s.first.entry(id) {
                                v.insert(now.saturating_sub(sent));
                                s.times.push((sent, now));
                                s.per_key.entry(key).or_default().push(seq);
                            }
                        }
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(())
}

fn event_json(prefix: &str, topic: &str, seq: u64, key: u64) -> serde_json::Value {
    json!({"specversion": "1.0", "type": "BenchEvent", "topic": topic, "id": format!("{prefix}-{seq}"), "subject": format!("k{key}"),
           "type": "BenchEvent", "data": {"seq": seq, "t": now_us()}})
}

fn event_proto(prefix: &str, topic: &str, seq: u64, key: u64) -> v1::Event {
    v1::Event {
        id: format!("{prefix}-{seq}"),
        topic: topic.into(),
        key: format!("k{key}"),
        r#type: "BenchEvent".into(),
        data: json!({"seq": seq, "t": now_us()}).to_string().into_bytes(),
        content_type: "application/json".into(),
        time_unix_ms: now_us() / 1000,
        ..Default::default()
    }
}

/// Publishes batch `first..first+n`; retries refusals (429, 5xx, transport errors) until
/// accepted when `retry`. Returns (accepted, refused attempts, latency µs of the accepted try).
async fn publish_batch(
    a: &Args,
    prefix: &str,
    key: u64,
    http: &Client<HttpConnector, Full<Bytes>>,
    bus: &Option<v1::events_client::EventsClient<tonic::transport::Channel>>,
    first: u64,
    n: u64,
) -> (bool, u64, u64) {
    let mut refused = 0;
    loop {
        let t0 = Instant::now();
        let ok = if let Some(bus) = bus {
            let events = (first..first + n).map(|s| event_proto(prefix, &a.topic, s, key)).collect();
            bus.clone().publish(v1::PublishRequest { events }).await.is_ok()
        } else {
            let body: Vec<_> = (first..first + n).map(|s| event_json(prefix, &a.topic, s, key)).collect();
            let Some(publish) = a.publish else { return (false, refused, 0) };
            let req = Request::post(format!("http://{publish}/events"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(serde_json::to_vec(&body).unwrap_or_default())))
                .expect("a valid request");
            match http.request(req).await {
                Ok(resp) => {
                    let accepted = resp.status() == hyper::StatusCode::ACCEPTED;
                    let _ = resp.into_body().collect().await;
                    accepted
                }
                Err(_) => false,
            }
        };
        if ok {
            return (true, refused, t0.elapsed().as_micros() as u64);
        }
        refused += 1;
        // Without the spool there is nothing to retry into: the event is lost to the app.
        if bus.is_some() {
            return (false, refused, 0);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Arc::new(Args::parse());
    let seen = Arc::new(Mutex::new(Seen::default()));
    serve_hook(a.hook, seen.clone()).await?;
    if a.serve_only {
        std::future::pending::<()>().await;
    }
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let http: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let bus = match &a.direct_bus {
        Some(url) => Some(v1::events_client::EventsClient::new(
            tonic::transport::Endpoint::from_shared(url.clone())?.connect_lazy(),
        )),
        None => None,
    };
    let prefix = a.id_prefix.clone().unwrap_or_else(|| format!("ev{}", now_us()));
    if let Some(admin) = a.wait_healthy {
        let uri: hyper::Uri = format!("http://{admin}/metrics").parse()?;
        let mut healthy = false;
        for _ in 0..600 {
            if let Ok(resp) = http.get(uri.clone()).await
                && let Ok(body) = resp.into_body().collect().await
                && String::from_utf8_lossy(&body.to_bytes()).contains("mesh_sidecar_app_healthy 1")
            {
                healthy = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::ensure!(healthy, "the subscriber's sidecar at {admin} never found the hook healthy");
    }
    let batches = a.events.div_ceil(a.batch);
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let results = Arc::new(Mutex::new((0u64, 0u64, Vec::<u64>::new())));
    let started = Instant::now();
    let started_us = now_us();
    let mut workers = Vec::new();
    for worker in 0..a.concurrency {
        let (a, http, bus, next, results) =
            (a.clone(), http.clone(), bus.clone(), next.clone(), results.clone());
        let prefix = prefix.clone();
        workers.push(tokio::spawn(async move {
            loop {
                let b = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if b >= batches {
                    return;
                }
                if a.rate > 0 {
                    // Batch b is due at b * batch / rate seconds.
                    let due = started + Duration::from_secs_f64((b * a.batch) as f64 / a.rate as f64);
                    tokio::time::sleep_until(due.into()).await;
                }
                let first = b * a.batch;
                let n = a.batch.min(a.events - first);
                let (ok, refused, lat) = publish_batch(&a, &prefix, worker, &http, &bus, first, n).await;
                let mut r = results.lock().unwrap_or_else(|p| p.into_inner());
                if ok {
                    r.0 += n;
                    r.2.push(lat);
                }
                r.1 += refused;
            }
        }));
    }
    for w in workers {
        w.await?;
    }
    let publish_secs = started.elapsed().as_secs_f64();
    let (accepted, refused, mut lat) = results.lock().unwrap_or_else(|p| p.into_inner()).clone();
    lat.sort_unstable();
    let mut out = json!({
        "events": a.events, "batch": a.batch, "concurrency": a.concurrency, "rate": a.rate,
        "accepted": accepted, "refused_attempts": refused,
        "publish_seconds": publish_secs, "accepted_per_second": accepted as f64 / publish_secs,
        "publish_p50_us": percentile(&lat, 0.5), "publish_p99_us": percentile(&lat, 0.99),
    });
    if let Some(limit) = a.wait_delivery {
        let end = Instant::now() + limit;
        let drain_from = Instant::now();
        while seen.lock().unwrap_or_else(|p| p.into_inner()).first.len() < accepted as usize
            && Instant::now() < end
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let drain_secs = drain_from.elapsed().as_secs_f64();
        let s = seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut latencies: Vec<u64> = s.first.values().copied().collect();
        latencies.sort_unstable();
        let out_of_order = s.per_key.values().filter(|seqs| seqs.windows(2).any(|w| w[0] > w[1])).count();
        let span = Duration::from_micros(s.last_us.saturating_sub(started_us));
        out["delivered"] = json!(s.first.len());
        out["deliveries"] = json!(s.deliveries);
        out["duplicates_delivered"] = json!(s.deliveries - s.first.len() as u64);
        out["lost"] = json!(accepted.saturating_sub(s.first.len() as u64));
        out["keys_out_of_order"] = json!(out_of_order);
        out["drain_seconds_after_publishing"] = json!(drain_secs);
        out["last_delivery_unix_ms"] = json!(s.last_us / 1000);
        if let Some(path) = &a.dump {
            let lines: String = s.times.iter().map(|(sent, at)| format!("{sent} {at}\n")).collect();
            std::fs::write(path, lines)?;
        }
        out["end_to_end_per_second"] = json!(s.first.len() as f64 / span.as_secs_f64().max(1e-9));
        out["delivery_p50_ms"] = json!(percentile(&latencies, 0.5) / 1000.0);
        out["delivery_p99_ms"] = json!(percentile(&latencies, 0.99) / 1000.0);
    }
    println!("{out}");
    Ok(())
}
