//! Health probing of the local app: `GET <probe_path>` every `probe_interval` with a timeout;
//! healthy after `healthy_threshold` good answers (2xx/3xx) in a row, unhealthy after
//! `unhealthy_threshold` failures in a row. Settings come from the service's own policy and
//! take effect on its next change. A probe interval of 0 means "always healthy".

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use mesh_proto::policy::ServicePolicy;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Runs until `stop`, publishing the app's health on `healthy`.
pub async fn run(
    app: SocketAddr,
    mut policy: watch::Receiver<(u64, Arc<ServicePolicy>)>,
    healthy: watch::Sender<bool>,
    stop: CancellationToken,
) {
    let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let (mut good, mut bad) = (0u32, 0u32);
    loop {
        let h = policy.borrow_and_update().1.health.clone();
        if h.probe_interval.is_zero() {
            healthy.send_if_modified(|v| !std::mem::replace(v, true));
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = policy.changed() => continue,
            }
        }
        let ok = probe_once(&client, app, &h.probe_path, h.probe_timeout).await;
        if ok {
            (good, bad) = (good.saturating_add(1), 0);
        } else {
            (good, bad) = (0, bad.saturating_add(1));
        }
        let was = *healthy.borrow();
        if !was && good >= h.healthy_threshold {
            tracing::info!(%app, path = %h.probe_path, "app is healthy");
            healthy.send_replace(true);
        } else if was && bad >= h.unhealthy_threshold {
            tracing::warn!(%app, path = %h.probe_path, failures = bad, "app is unhealthy");
            healthy.send_replace(false);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = policy.changed() => {}
            _ = tokio::time::sleep(h.probe_interval) => {}
        }
    }
}

async fn probe_once(
    client: &Client<HttpConnector, Empty<Bytes>>,
    app: SocketAddr,
    path: &str,
    timeout: Duration,
) -> bool {
    let Ok(uri) = format!("http://{app}{path}").parse::<http::Uri>() else { return false };
    match tokio::time::timeout(timeout, client.get(uri)).await {
        Ok(Ok(resp)) => {
            let s = resp.status();
            s.is_success() || s.is_redirection()
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "health probe failed");
            false
        }
        Err(_) => false,
    }
}
