//! `mesh.v1.Discovery`: endpoint streams per watched service, bounded per caller.

use crate::{
    api::{
        Api, BoxStream,
        streams::{GaugeGuard, check_services, release_all},
    },
    registry::Endpoints,
    state::State,
    watch_limits::Lease,
};

use futures::{FutureExt, StreamExt, stream};
use mesh_proto::v1;
use std::{pin::Pin, sync::Arc, time::Duration};
use tokio::time::{Instant, Sleep};
use tokio_stream::{StreamMap, wrappers::WatchStream};
use tonic::{Request, Response, Status};

struct WatchState {
    updates: StreamMap<String, WatchStream<Arc<Endpoints>>>,
    ping: Pin<Box<Sleep>>,
    ping_interval: Duration,
    version: u64,
    state: Arc<State>,
    _lease: Lease,
    _open: GaugeGuard,
}

/// A watch that ends lets go of its names: entries nobody else needs are forgotten.
impl Drop for WatchState {
    fn drop(&mut self) {
        let registry = &self.state.registry;
        release_all(&mut self.updates, |name| registry.release(name));
    }
}

impl WatchState {
    async fn next(mut self) -> Option<(Result<v1::WatchResponse, Status>, Self)> {
        use v1::watch_response::Kind;
        let msg = tokio::select! {
            _ = self.state.shutdown.cancelled() => return None,
            Some((_, first)) = self.updates.next() => {
                // Coalesce whatever else is ready into the same message.
                let mut services = vec![first.to_wire()];
                while let Some(Some((_, more))) = self.updates.next().now_or_never() {
                    services.push(more.to_wire());
                }
                self.version = services.iter().map(|s| s.version).fold(self.version, u64::max);
                v1::WatchResponse { kind: Kind::Update.into(), version: self.version, services }
            }
            _ = &mut self.ping => v1::WatchResponse { kind: Kind::Ping.into(), version: self.version, services: vec![] },
        };
        self.ping.as_mut().reset(Instant::now() + self.ping_interval);
        self.state.metrics.discovery_messages.inc();
        Some((Ok(msg), self))
    }
}

#[tonic::async_trait]
impl v1::discovery_server::Discovery for Api {
    type WatchStream = BoxStream<v1::WatchResponse>;

    async fn watch(&self, req: Request<v1::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let caller = self.member(&req, "watch endpoints")?;
        let req = req.into_inner();
        let services = check_services(&req.services)?;
        let s = &self.0;
        let lease = s.watch_limits.acquire(&caller.to_string(), &services)?;
        let mut updates = StreamMap::with_capacity(services.len());
        let mut snapshot = Vec::with_capacity(services.len());
        for name in services {
            let mut rx = s.registry.watch(&name);
            snapshot.push(rx.borrow_and_update().to_wire());
            updates.insert(name, WatchStream::from_changes(rx));
        }
        let version = snapshot.iter().map(|e| e.version).max().unwrap_or(0);
        tracing::debug!(node = %req.node_id, services = snapshot.len(), "discovery watch opened");
        let first = v1::WatchResponse {
            kind: v1::watch_response::Kind::Snapshot.into(),
            version,
            services: snapshot,
        };
        s.metrics.discovery_messages.inc();
        let state = WatchState {
            updates,
            ping: Box::pin(tokio::time::sleep(s.ping_interval)),
            ping_interval: s.ping_interval,
            version,
            state: s.clone(),
            _lease: lease,
            _open: GaugeGuard::new(&s.metrics.discovery_streams),
        };
        let out = stream::once(async move { Ok(first) }).chain(stream::unfold(state, WatchState::next));
        Ok(Response::new(Box::pin(out)))
    }
}

// ---- Policy --------------------------------------------------------------------------------
