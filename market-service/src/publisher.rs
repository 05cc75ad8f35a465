//! The outbox publisher: drains events committed to the outbox (in the same transaction as the
//! change they describe) to the sidecar's event API, oldest first, and marks them published once
//! the sidecar has spooled them (202). A failure keeps them for the next round; a crash between
//! the 202 and the mark re-sends them, and the bus drops them as duplicates by event id.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::{service::now_ms, store::Store};

/// Rows sent per request.
const BATCH: i64 = 200;

/// Runs until `stop`, posting to `{sidecar_admin}/events`.
pub async fn run(store: Store, sidecar_admin: String, stop: CancellationToken) {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let url = format!("{}/events", sidecar_admin.trim_end_matches('/'));
    let mut failures = 0u32;
    loop {
        let sent = publish_once(&store, &client, &url).await;
        if sent.is_ok() {
            failures = 0;
        }
        let wait = match sent {
            Ok(n) if n as i64 == BATCH => Duration::ZERO,
            Ok(_) => Duration::from_millis(200),
            Err(e) => {
                failures += 1;
                let wait = Duration::from_millis(200 * 2u64.pow(failures.min(5)));
                tracing::warn!(error = %e, retry_in = ?wait, "publishing the outbox failed; the events stay in it");
                wait
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

async fn publish_once(
    store: &Store,
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    url: &str,
) -> Result<usize, String> {
    let rows = store.outbox_pending(BATCH).await.map_err(|e| e.to_string())?;
    if rows.is_empty() {
        return Ok(0);
    }
    let events: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "specversion": "1.0",
                "topic": r.topic,
                "id": r.event_id,
                "source": "market-service",
                "type": r.event_type,
                "subject": r.key,
                "data": serde_json::from_str::<Value>(&r.payload).unwrap_or(Value::Null),
            })
        })
        .collect();
    let req = http::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(Value::Array(events).to_string())))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .map_err(|_| format!("{url} did not answer within 10s"))?
        .map_err(|e| format!("{url}: {e}"))?;
    let status = resp.status();
    if status != http::StatusCode::ACCEPTED {
        let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        return Err(format!("{url} answered {status}: {}", String::from_utf8_lossy(&body)));
    }
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    store.mark_published(&ids, now_ms() as i64).await.map_err(|e| e.to_string())?;
    Ok(rows.len())
}
