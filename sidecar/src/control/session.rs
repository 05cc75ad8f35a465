//! The sidecar's side of the control plane.
//!
//! One session at a time over one HTTP/2 connection: a policy stream (subscribe, then apply
//! each push and ACK it once the snapshot is durable, or NACK it with the reason and keep the
//! previous policy), a discovery watch for the upstreams (re-opened when the app starts calling
//! a new service), and — in sidecar mode, once the app is healthy — registration and a
//! heartbeat stream carrying health and load. When anything of the session fails, the sidecar
//! keeps serving what it has (it never drops endpoints for lack of a control plane) and
//! reconnects with jittered exponential backoff, trying each configured address in turn.

use crate::{
    control::{
        client::{SessionError, connect, status},
        registration::registration,
    },
    shared::Shared,
    upstream::{Source, endpoint::EndpointInfo},
};

use futures::StreamExt;
use mesh_proto::{
    policy::ServicePolicy,
    v1::{self, discovery_client::DiscoveryClient, policy_client::PolicyClient, policy_stream_request::Kind},
};
use mesh_runtime::{Backoff, Rotation};
use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};
use tokio::{sync::mpsc, time::Instant};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Streaming, transport::Channel};

/// Runs sessions until `stop`. `added` announces upstreams the proxy meets for the first time.
pub async fn run(shared: Arc<Shared>, mut added: mpsc::UnboundedReceiver<String>, stop: CancellationToken) {
    let mut urls = Rotation::new(&shared.config.control_plane);
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    // Against the TLS API a sidecar with a bootstrap token is only recognised once certified:
    // sessions before that would just be refused.
    if shared.mtls() && shared.config.control_plane_ca.is_some() {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = shared.identity.wait() => {}
        }
    }
    // Where among a name's addresses this sidecar starts (spreading sidecars over replicas
    // behind one name), moving on to the next one after each session.
    let mut cursor =
        shared.config.instance_id.bytes().fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b.into()));
    loop {
        let url = urls.next_url();
        *shared.cp.url.lock().unwrap_or_else(|p| p.into_inner()) = url.to_string();
        let address = pick_address(&shared, url, cursor).await;
        cursor = cursor.wrapping_add(1);
        *shared.cp.address.lock().unwrap_or_else(|p| p.into_inner()) = address;
        let started = Instant::now();
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = session(&shared, url, &mut added, &stop) => r,
        };
        shared.cp.connected.store(false, Ordering::Relaxed);
        shared.metrics.control_plane_connected.set(0);
        if let Err(e) = result {
            tracing::warn!(error = %e, "control-plane session ended; serving the last known endpoints and policy");
            *shared.cp.last_error.lock().unwrap_or_else(|p| p.into_inner()) = e.to_string();
        }
        if started.elapsed() > Duration::from_secs(30) {
            backoff.reset();
        }
        if !backoff.wait(&stop).await {
            return;
        }
    }
}

/// When `url` names its host (not an address), one of the addresses it resolves to: the
/// `cursor`-th in a sorted list, so a name with one address per control-plane replica spreads
/// sidecars over them and each moves to the next when its session ends. `None`: let the
/// system resolve at connect time (an address, `localhost`, or a name that did not resolve).
async fn pick_address(shared: &Shared, url: &str, cursor: usize) -> Option<std::net::SocketAddr> {
    let uri: tonic::transport::Uri = url.parse().ok()?;
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    if host.parse::<std::net::IpAddr>().is_ok() || host == "localhost" {
        return None;
    }
    let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("https") { 443 } else { 80 });
    let ips = shared.dns.addresses(host).await;
    let ip = ips.get(cursor % ips.len().max(1))?;
    tracing::debug!(%host, address = %ip, of = ips.len(), "control-plane name resolved");
    Some(std::net::SocketAddr::new(*ip, port))
}

fn subscribe(shared: &Shared) -> v1::PolicyStreamRequest {
    let mut services = shared.upstreams.names();
    // A gateway's own policy (`gateway`) carries its routes.
    let own = shared.identity_service();
    if !services.contains(&own) {
        services.push(own.clone());
    }
    v1::PolicyStreamRequest {
        kind: Some(Kind::Subscribe(v1::PolicySubscribe {
            node_id: shared.config.instance_id.clone(),
            service: own,
            services,
        })),
    }
}

async fn open_watch(
    shared: &Shared,
    ch: &Channel,
) -> Result<Option<Streaming<v1::WatchResponse>>, SessionError> {
    let services = shared.upstreams.names();
    if services.is_empty() {
        return Ok(None);
    }
    let req = v1::WatchRequest { services, node_id: shared.config.instance_id.clone() };
    Ok(Some(
        DiscoveryClient::new(ch.clone()).watch(req).await.map_err(status("discovery watch"))?.into_inner(),
    ))
}

async fn next_watch(
    w: &mut Option<Streaming<v1::WatchResponse>>,
) -> Option<Result<v1::WatchResponse, tonic::Status>> {
    match w {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

async fn session(
    shared: &Arc<Shared>,
    url: &str,
    added: &mut mpsc::UnboundedReceiver<String>,
    stop: &CancellationToken,
) -> Result<(), SessionError> {
    let ch = connect(shared, url).await?;
    shared.metrics.control_plane_reconnects.inc();
    // Names announced before this session are in the subscription already.
    while added.try_recv().is_ok() {}
    let (ptx, prx) = mpsc::channel(64);
    let _ = ptx.send(subscribe(shared)).await;
    let mut pushes = PolicyClient::new(ch.clone())
        .stream(ReceiverStream::new(prx))
        .await
        .map_err(status("policy stream"))?
        .into_inner();
    let mut watch = open_watch(shared, &ch).await?;
    shared.cp.connected.store(true, Ordering::Relaxed);
    shared.metrics.control_plane_connected.set(1);
    tracing::info!(%url, "connected to the control plane");
    let registration = registration(shared, ch.clone(), stop.clone());
    tokio::pin!(registration);
    let tap = crate::control::on_demand::session(shared, ch.clone());
    tokio::pin!(tap);
    let every = shared.config.edge_report_interval;
    let mut report = tokio::time::interval_at(Instant::now() + every, every.max(Duration::from_millis(10)));
    report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = report.tick(), if !every.is_zero() => {
                if let Some(edges) = edge_report(shared)
                    && ptx.send(edges).await.is_err()
                {
                    return Err(SessionError::Closed("policy"));
                }
            }
            push = pushes.next() => match push {
                Some(Ok(p)) => {
                    let reply = apply_policy(shared, p).await;
                    if ptx.send(reply).await.is_err() {
                        return Err(SessionError::Closed("policy"));
                    }
                }
                Some(Err(s)) => return Err(SessionError::Status("policy stream", s)),
                None => return Err(SessionError::Closed("policy")),
            },
            msg = next_watch(&mut watch) => match msg {
                Some(Ok(m)) => apply_discovery(shared, m).await,
                Some(Err(s)) => return Err(SessionError::Status("discovery watch", s)),
                None => return Err(SessionError::Closed("discovery")),
            },
            Some(name) = added.recv() => {
                while added.try_recv().is_ok() {}
                tracing::debug!(service = %name, "new upstream: widening the discovery watch and policy subscription");
                let _ = ptx.send(subscribe(shared)).await;
                watch = open_watch(shared, &ch).await?;
            }
            r = &mut registration => return r,
            () = &mut tap => {}
        }
    }
}

/// What this proxy called since its last report, per service called (`None`: nothing). At most
/// [`MAX_EDGES_PER_REPORT`] edges; the rest wait for the next report.
fn edge_report(shared: &Shared) -> Option<v1::PolicyStreamRequest> {
    let caller = shared.identity_service();
    let now = Instant::now();
    let open = |service: &str| {
        shared
            .upstreams
            .get(service)
            .map_or(0, |up| up.endpoints().endpoints.iter().filter(|e| e.breaker.is_open(now)).count() as u32)
    };
    let by_service =
        shared.upstreams.all().into_iter().filter_map(|up| up.edge.take(&caller, &up.name, open(&up.name)));
    // At the edge, by route.
    let by_route = shared.route_edges.iter().filter_map(|e| {
        let (route, service) = e.key();
        let mut d = e.value().take(&caller, service, open(service))?;
        d.route = route.clone();
        Some(d)
    });
    let edges: Vec<v1::EdgeDelta> = by_service.chain(by_route).take(MAX_EDGES_PER_REPORT).collect();
    (!edges.is_empty())
        .then_some(v1::PolicyStreamRequest { kind: Some(Kind::Edges(v1::EdgeReport { edges })) })
}

/// A report's bound: its size stays under a few hundred kilobytes.
const MAX_EDGES_PER_REPORT: usize = 1000;

/// The NACK of push `p`, counted.
fn nack(shared: &Shared, p: v1::PolicyPush, reason: String) -> v1::PolicyStreamRequest {
    shared.metrics.policy_nacks.inc();
    v1::PolicyStreamRequest {
        kind: Some(Kind::Nack(v1::PolicyNack {
            service: p.service,
            version: p.version,
            nonce: p.nonce,
            reason,
        })),
    }
}

/// Applies a push and answers it: ACK once applied and durable, NACK (keeping the previous
/// policy untouched) when it does not validate.
async fn apply_policy(shared: &Shared, p: v1::PolicyPush) -> v1::PolicyStreamRequest {
    let policy = match ServicePolicy::try_from(p.policy.clone().unwrap_or_default()) {
        Ok(policy) => policy,
        Err(e) => {
            tracing::warn!(service = %p.service, version = p.version, reason = %e, "refusing policy push (NACK); keeping the previous policy");
            return nack(shared, p, e.to_string());
        }
    };
    let own = shared.identity_service() == p.service;
    if own
        && shared.config.mode == crate::config::Mode::Gateway
        && let Err(e) = crate::gateway::edge::RouteTable::new(policy.gateway.routes.clone(), p.version)
    {
        tracing::warn!(version = p.version, reason = %e, "refusing the gateway's routes (NACK); keeping the routes in force");
        return nack(shared, p, format!("gateway routes: {e}"));
    }
    let before_own = own.then(|| shared.own_policy.send_replace((p.version, Arc::new(policy.clone()))));
    let up = shared.upstreams.get(&p.service);
    let before_up = up.as_ref().map(|up| {
        let before = up.policy();
        shared.dns.sync(up, policy.external.as_ref());
        up.set_policy(p.version, policy);
        before
    });
    if let Err(e) = shared.snapshot.save().await {
        // Not durable, so not acknowledged: the previous policy comes back and the push is
        // NACKed with the reason (the control plane shows it; the next push tries again).
        if let Some(before) = before_own {
            shared.own_policy.send_replace(before);
        }
        if let (Some(up), Some(before)) = (up, before_up) {
            shared.dns.sync(&up, before.policy.external.as_ref());
            up.restore(before);
        }
        tracing::error!(service = %p.service, version = p.version, error = %e, "policy not durable: NACK, previous policy kept");
        return nack(shared, p, format!("the sidecar could not make the policy durable: {e}"));
    }
    shared.cp.synced.store(true, Ordering::Relaxed);
    shared.metrics.policy_acks.inc();
    tracing::debug!(service = %p.service, version = p.version, "policy applied");
    v1::PolicyStreamRequest {
        kind: Some(Kind::Ack(v1::PolicyAck { service: p.service, version: p.version, nonce: p.nonce })),
    }
}

async fn apply_discovery(shared: &Shared, m: v1::WatchResponse) {
    if m.services.is_empty() {
        return; // a ping
    }
    for s in m.services {
        let Some(up) = shared.upstreams.get(&s.service) else { continue };
        if up.policy().policy.external.is_some() {
            continue; // DNS owns this service's endpoints
        }
        let infos = s
            .endpoints
            .into_iter()
            .map(|e| EndpointInfo { id: e.instance_id, address: e.address, zone: e.zone, weight: e.weight })
            .collect();
        up.set_endpoints(s.version, infos, Source::Discovery);
    }
    shared.metrics.discovery_updates.inc();
    if let Err(e) = shared.snapshot.save().await {
        // Endpoints are not acknowledged; serving goes on with them, the next update retries.
        tracing::warn!(error = %e, "the snapshot does not hold the newest endpoints");
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // Tests spawn plain tasks.
mod tests {
    use super::*;
    use crate::config::Config;

    fn push(service: &str, version: u64, policy: v1::ServicePolicy) -> v1::PolicyPush {
        v1::PolicyPush {
            service: service.into(),
            version,
            nonce: format!("n{version}"),
            policy: Some(policy),
            is_default: false,
        }
    }

    /// A sidecar's shared state in `data_dir` with its snapshot writer running (stopped by
    /// cancelling the token), and its upstream `market`.
    fn sidecar(
        data_dir: &std::path::Path,
    ) -> (Arc<Shared>, CancellationToken, tokio::task::JoinHandle<()>, Arc<crate::upstream::Upstream>) {
        let (shared, _added) = Shared::new(Config::unit_test(data_dir), Default::default());
        let stop = CancellationToken::new();
        let writer = tokio::spawn(
            shared.snapshot.clone().run(crate::upstream::snapshot::Snapshot::default, stop.clone()),
        );
        let up = shared.upstreams.get_or_add("market");
        (shared, stop, writer, up)
    }

    #[tokio::test]
    async fn an_invalid_push_is_nacked_with_the_field_and_the_previous_policy_stays() {
        let dir = tempfile::tempdir().unwrap();
        let (shared, stop, writer, up) = sidecar(dir.path());

        let mut good = ServicePolicy::default();
        good.retry.max_attempts = 2;
        let reply = apply_policy(&shared, push("market", 1, (&good).into())).await;
        assert!(
            matches!(reply.kind, Some(Kind::Ack(ref a)) if a.version == 1 && a.nonce == "n1"),
            "{reply:?}"
        );
        assert_eq!(up.policy().version, 1);

        let mut bad: v1::ServicePolicy = (&good).into();
        bad.retry.as_mut().unwrap().max_attempts = Some(99);
        let reply = apply_policy(&shared, push("market", 2, bad)).await;
        match reply.kind {
            Some(Kind::Nack(n)) => {
                assert_eq!((n.version, n.nonce.as_str()), (2, "n2"));
                assert!(n.reason.contains("retry.max_attempts"), "{}", n.reason);
            }
            other => panic!("expected a NACK, got {other:?}"),
        }
        let kept = up.policy();
        assert_eq!((kept.version, kept.policy.as_ref()), (1, &good));
        assert_eq!(shared.metrics.policy_nacks.get(), 1);
        stop.cancel();
        writer.await.unwrap();
    }

    /// Issue #15.4: no ACK before the snapshot is durable.
    #[tokio::test(start_paused = true)]
    async fn a_push_whose_snapshot_cannot_be_written_is_nacked_and_the_previous_policy_stays() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let (shared, stop, writer, up) = sidecar(&data_dir);
        let mut good = ServicePolicy::default();
        good.retry.max_attempts = 2;
        let reply = apply_policy(&shared, push("market", 1, (&good).into())).await;
        assert!(matches!(reply.kind, Some(Kind::Ack(_))), "{reply:?}");

        // The data dir turns into a file: the next snapshot write fails.
        std::fs::remove_dir_all(&data_dir).unwrap();
        std::fs::write(&data_dir, b"").unwrap();
        let mut next = good.clone();
        next.retry.max_attempts = 3;
        let reply = apply_policy(&shared, push("market", 2, (&next).into())).await;
        match reply.kind {
            Some(Kind::Nack(n)) => {
                assert_eq!(n.version, 2);
                assert!(n.reason.contains("durable"), "{}", n.reason);
            }
            other => panic!("expected a NACK, got {other:?}"),
        }
        let kept = up.policy();
        assert_eq!((kept.version, kept.policy.as_ref()), (1, &good));
        stop.cancel();
        writer.await.unwrap();
    }
}
