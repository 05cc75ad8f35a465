//! What every gRPC service and the admin HTTP listener share.

use crate::{
    auth::Auth, bus::Bus, ca::Ca, metrics::Metrics, policy::Policies, proxies::Proxies, registry::Registry,
    store::Store, watch_limits::WatchLimits,
};

use std::{sync::Arc, time::Duration};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Everything the handlers share.
pub struct State {
    /// Who may call what.
    pub auth: Auth,
    pub registry: Registry,
    pub bus: Bus,
    pub ca: Arc<Ca>,
    pub store: Store,
    pub policies: Arc<Policies>,
    pub metrics: Arc<Metrics>,
    pub proxies: Proxies,
    /// What the proxies report of their calls: edges and services over time windows.
    pub topology: crate::topology::Topology,
    /// Operators' taps, and the proxies' tap sessions' view of them.
    pub taps: Arc<crate::tap::Taps>,
    /// What each caller watches, bounded (see [`crate::watch_limits`]).
    pub watch_limits: Arc<WatchLimits>,
    pub started: Instant,
    pub data_dir: String,
    pub ping_interval: Duration,
    pub shutdown: CancellationToken,
}
