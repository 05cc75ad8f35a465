//! Health probing of the local app: `GET <probe_path>` every `probe_interval` with a timeout;
//! healthy after `healthy_threshold` good answers (2xx/3xx) in a row, unhealthy after
//! `unhealthy_threshold` failures in a row. Settings come from the service's own policy and
//! take effect on its next change. A probe interval of 0 means "always healthy".

use http_body_util::{BodyExt, Empty};
use mesh_proto::{policy::ServicePolicy, v1};
use std::{sync::Arc, time::Duration};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{endpoint::local_app::LocalApp, http::body};

/// Runs until `stop`, publishing the app's health on `healthy`.
pub async fn run(
    app: LocalApp,
    mut policy: watch::Receiver<(u64, Arc<ServicePolicy>)>,
    healthy: watch::Sender<bool>,
    stop: CancellationToken,
) {
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
        let ok = probe_once(&app, &h.probe_path, h.probe_timeout).await;
        if ok {
            (good, bad) = (good.saturating_add(1), 0);
        } else {
            (good, bad) = (0, bad.saturating_add(1));
        }
        let was = *healthy.borrow();
        if !was && good >= h.healthy_threshold {
            tracing::info!(app = %app.authority, path = %h.probe_path, "app is healthy");
            healthy.send_replace(true);
        } else if was && bad >= h.unhealthy_threshold {
            tracing::warn!(app = %app.authority, path = %h.probe_path, failures = bad, "app is unhealthy");
            healthy.send_replace(false);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = policy.changed() => {}
            _ = tokio::time::sleep(h.probe_interval) => {}
        }
    }
}

async fn probe_once(app: &LocalApp, path: &str, timeout: Duration) -> bool {
    let probed = probe_now(app, path, timeout).await;
    if !probed.error.is_empty() {
        tracing::debug!(error = %probed.error, "health probe failed");
    }
    probed.healthy
}

/// One probe of the app (`GET path`): its outcome, answer and latency (`id` left 0).
pub async fn probe_now(app: &LocalApp, path: &str, timeout: Duration) -> v1::ProbeResult {
    let started = tokio::time::Instant::now();
    let mut r = v1::ProbeResult { path: path.to_string(), ..Default::default() };
    let req = match http::Request::get(path).body(body::boxed(Empty::new())) {
        Ok(req) => req,
        Err(e) => {
            r.error = format!("the probe path {path:?} is not a valid request target: {e}");
            return r;
        }
    };
    match app.send(req, Some(timeout)).await {
        Ok(resp) => {
            let s = resp.status();
            // Read the answer so the connection goes back to the pool.
            let _ = tokio::time::timeout(timeout, resp.into_body().collect()).await;
            (r.healthy, r.status) = (s.is_success() || s.is_redirection(), s.as_u16().into());
        }
        Err(e) => r.error = e.to_string(),
    }
    r.latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    r
}
