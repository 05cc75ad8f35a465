//! One endpoint of an upstream: its address, in-flight count, latency estimate and breaker.

use serde::{Deserialize, Serialize};
use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};
use tokio::time::Instant;

use crate::{metrics::StatusCounters, outbound::breaker::Breaker};

/// Latency assumed for an endpoint with no measurement yet (linkerd uses the same idea).
const DEFAULT_RTT: Duration = Duration::from_millis(30);

/// Peak-EWMA decay time.
const EWMA_DECAY: Duration = Duration::from_secs(10);

/// An endpoint as discovery (or DNS) describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointInfo {
    pub id: String,
    pub address: String,
    #[serde(default)]
    pub zone: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    100
}

/// One endpoint and what the balancers know of it.
#[derive(Debug)]
pub struct Endpoint {
    pub info: EndpointInfo,
    /// `info.address` parsed once (requests are sent here).
    pub authority: Option<http::uri::Authority>,
    inflight: AtomicUsize,
    ewma: Mutex<Ewma>,
    /// This endpoint's request counters by status.
    pub counters: StatusCounters,
    /// Outlier detection for this endpoint.
    pub breaker: Breaker,
}

#[derive(Debug)]
struct Ewma {
    nanos: f64,
    at: Instant,
}

impl Endpoint {
    pub fn new(info: EndpointInfo) -> Self {
        let authority = info.address.parse().ok();
        Self {
            info,
            authority,
            inflight: AtomicUsize::new(0),
            ewma: Mutex::new(Ewma { nanos: 0.0, at: Instant::now() }),
            counters: Default::default(),
            breaker: Default::default(),
        }
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Counts a request in flight until the guard drops.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Peak EWMA: a slower sample takes over at once, faster ones pull it down with decay.
    pub fn observe(&self, rtt: Duration, now: Instant) {
        let mut e = self.ewma.lock().unwrap_or_else(|p| p.into_inner());
        let sample = rtt.as_nanos() as f64;
        if sample > e.nanos {
            e.nanos = sample;
        } else {
            let w = (-(now.duration_since(e.at).as_secs_f64()) / EWMA_DECAY.as_secs_f64()).exp();
            e.nanos = e.nanos * w + sample * (1.0 - w);
        }
        e.at = now;
    }

    /// Latency estimate × (in-flight + 1). The estimate decays with time since the last sample,
    /// so an endpoint that once answered slowly is tried again instead of starving. An endpoint
    /// never measured costs nothing while idle (one request learns its latency) and the
    /// conservative default while that request is out.
    pub(crate) fn cost(&self) -> f64 {
        let e = self.ewma.lock().unwrap_or_else(|p| p.into_inner());
        let inflight = self.inflight();
        let rtt = if e.nanos == 0.0 {
            if inflight == 0 {
                return 0.0;
            }
            DEFAULT_RTT.as_nanos() as f64
        } else {
            let idle = Instant::now().duration_since(e.at).as_secs_f64();
            e.nanos * (-idle / EWMA_DECAY.as_secs_f64()).exp()
        };
        rtt * (inflight + 1) as f64
    }

    pub fn latency_estimate(&self) -> Duration {
        Duration::from_nanos(self.ewma.lock().unwrap_or_else(|p| p.into_inner()).nanos as u64)
    }
}

/// Decrements the endpoint's in-flight count when dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Endpoint>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}
