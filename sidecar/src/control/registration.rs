//! Registration of this instance, heartbeats with its health and load, and deregistration.

use crate::{
    control::client::{SessionError, connect, status},
    shared::Shared,
};

use futures::StreamExt;
use mesh_proto::v1::{self, registry_client::RegistryClient};
use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

fn instance(shared: &Shared, service: &str) -> v1::Instance {
    let c = &shared.config;
    v1::Instance {
        service: service.to_string(),
        id: c.instance_id.clone(),
        address: c.advertise_addr.clone(),
        zone: c.zone.clone(),
        version: c.version.clone(),
        metadata: c.metadata.clone(),
        weight: c.weight,
        ..Default::default()
    }
}

/// Sidecar mode: waits for the app to be healthy, registers, then heartbeats at the interval the
/// control plane names, re-registering if it forgot us. Never returns `Ok` while running.
pub(crate) async fn registration(
    shared: &Arc<Shared>,
    ch: Channel,
    stop: CancellationToken,
) -> Result<(), SessionError> {
    let Some(service) = shared.config.service.clone() else { return std::future::pending().await };
    if shared.stopping.is_cancelled() {
        stop.cancelled().await; // shutting down: never register again
        return Ok(());
    }
    let mut healthy = shared.app_healthy.subscribe();
    tokio::select! {
        _ = stop.cancelled() => return Ok(()),
        r = healthy.wait_for(|h| *h) => if r.is_err() { return Ok(()) },
    }
    if shared.mtls() {
        // Callers would be refused until this sidecar can complete a handshake.
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = shared.identity.wait() => {}
        }
    }
    let mut reg = RegistryClient::new(ch);
    let r = reg
        .register(v1::RegisterRequest { instance: Some(instance(shared, &service)) })
        .await
        .map_err(status("register"))?
        .into_inner();
    shared.cp.registered.store(true, Ordering::Relaxed);
    tracing::info!(%service, instance = %shared.config.instance_id, address = %shared.config.advertise_addr, "registered");
    let mut every = Duration::from_millis(r.heartbeat_interval_ms.max(100));
    let (htx, hrx) = mpsc::channel(4);
    let mut answers =
        reg.heartbeat(ReceiverStream::new(hrx)).await.map_err(status("heartbeat"))?.into_inner();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            // Shutting down: deregistration follows, and a heartbeat answered "unknown" after
            // it must not register the instance again.
            _ = shared.stopping.cancelled() => {
                stop.cancelled().await;
                return Ok(());
            }
            _ = tick.tick() => {
                let hb = v1::HeartbeatRequest {
                    service: service.clone(),
                    instance_id: shared.config.instance_id.clone(),
                    health: if *shared.app_healthy.borrow() { v1::HealthStatus::Healthy } else { v1::HealthStatus::Unhealthy }.into(),
                    load: shared.load.load(Ordering::Relaxed) as u32,
                };
                if htx.send(hb).await.is_err() {
                    return Err(SessionError::Closed("heartbeat"));
                }
                shared.metrics.heartbeats.inc();
            }
            a = answers.next() => match a {
                Some(Ok(a)) => {
                    if !a.known {
                        tracing::warn!("the control plane does not know this instance: registering again");
                        reg.register(v1::RegisterRequest { instance: Some(instance(shared, &service)) }).await.map_err(status("register"))?;
                    }
                    let want = Duration::from_millis(a.heartbeat_interval_ms.max(100));
                    if want != every {
                        every = want;
                        tick = tokio::time::interval(every);
                        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    }
                }
                Some(Err(s)) => return Err(SessionError::Status("heartbeat", s)),
                None => return Err(SessionError::Closed("heartbeat")),
            },
        }
    }
}

/// Removes this instance from the registry (graceful shutdown). Bounded by `within`.
pub async fn deregister(shared: &Shared, within: Duration) {
    let Some(service) = shared.config.service.clone() else { return };
    if !shared.cp.registered.load(Ordering::Relaxed) {
        return;
    }
    let url = shared.cp.url.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let attempt = async {
        let ch = connect(shared, &url).await?;
        RegistryClient::new(ch)
            .deregister(v1::DeregisterRequest { service, instance_id: shared.config.instance_id.clone() })
            .await
            .map_err(status("deregister"))
    };
    match tokio::time::timeout(within, attempt).await {
        Ok(Ok(_)) => tracing::info!("deregistered"),
        Ok(Err(e)) => tracing::warn!(error = %e, "deregistration failed; the instance will expire by TTL"),
        Err(_) => tracing::warn!(?within, "deregistration timed out; the instance will expire by TTL"),
    }
}
