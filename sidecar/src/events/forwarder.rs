//! The forwarder: spooled events to the control plane's bus, in spool order, with backoff.

use crate::shared::Shared;

use mesh_proto::{dial::Dialer, v1};
use mesh_runtime::{Backoff, Rotation};
use std::{sync::Arc, time::Duration};
use tokio_util::sync::CancellationToken;

/// A client of the control plane's event bus at `url`.
pub async fn connect_events(
    dialer: &Dialer,
    url: &str,
) -> Result<v1::events_client::EventsClient<tonic::transport::Channel>, String> {
    let ep = Dialer::endpoint(url).map_err(|e| e.to_string())?.connect_timeout(Duration::from_secs(3));
    let ch = dialer.connect(ep).await.map_err(|e| e.to_string())?;
    Ok(v1::events_client::EventsClient::new(ch))
}

/// Publishes spooled events to the bus until `stop`.
pub async fn forward(shared: Arc<Shared>, stop: CancellationToken) {
    let Ok(outbox) = &shared.outbox else { return };
    let mut urls = Rotation::new(&shared.config.control_plane);
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut client: Option<v1::events_client::EventsClient<tonic::transport::Channel>> = None;
    loop {
        let spool = outbox.spool.clone();
        let batch =
            tokio::task::spawn_blocking(move || spool.lock().unwrap_or_else(|p| p.into_inner()).peek(256))
                .await;
        let batch = match batch {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "reading the event spool failed");
                Vec::new()
            }
            Err(_) => Vec::new(),
        };
        if batch.is_empty() {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = outbox.wake.notified() => continue,
                _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
            }
        }
        if client.is_none() {
            client = connect_events(&shared.dialer, urls.next_url()).await.ok();
        }
        let n = batch.len() as u64;
        let sent = match &mut client {
            Some(c) => c.publish(v1::PublishRequest { events: batch }).await.map_err(|s| s.to_string()),
            None => Err("cannot reach the control plane".into()),
        };
        match sent {
            Ok(_) => {
                backoff.reset();
                let spool = outbox.spool.clone();
                match tokio::task::spawn_blocking(move || {
                    spool.lock().unwrap_or_else(|p| p.into_inner()).ack(n)
                })
                .await
                {
                    Ok(Ok(())) => {
                        shared.metrics.events_forwarded.inc_by(n);
                    }
                    other => tracing::error!(
                        ?other,
                        "recording forwarded events failed; they will be sent again (the bus drops duplicates)"
                    ),
                }
            }
            Err(e) => {
                client = None;
                let wait = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?wait, "forwarding events to the bus failed; they stay in the spool");
                if !Backoff::sleep(wait, &stop).await {
                    return;
                }
            }
        }
    }
}
