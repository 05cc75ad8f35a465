//! Tapping, the request path's side: while an operator taps this proxy's service (`meshctl
//! tap`), each request's metadata — time, caller, method, path, status, latency, endpoint, trace
//! id; never a body or a header's value — goes to the control plane ([`super::on_demand`]), at
//! most each tap's rate; with no tap on, the request path pays one relaxed atomic load.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use mesh_proto::v1::{self, proxy_report::Kind};
use tokio::sync::mpsc;

/// What one request was, as a tap reports it.
pub struct Seen<'a> {
    pub direction: &'static str,
    pub caller: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub latency: Duration,
    pub endpoint: &'a str,
    pub trace_id: &'a str,
}

#[derive(Default)]
pub struct Tap {
    on: AtomicBool,
    active: ArcSwap<Vec<v1::ActiveTap>>,
    to_control_plane: Mutex<Option<mpsc::Sender<v1::ProxyReport>>>,
    /// Per tap: (the current second, records sent in it).
    spent: Mutex<HashMap<u64, (u64, u32)>>,
    node_id: String,
    /// The service this proxy acts as (`gateway` at the edge).
    pub service: String,
}

/// Records queued for the control plane before more are dropped.
pub(crate) const QUEUE: usize = 256;

impl Tap {
    pub fn new(node_id: String, service: String) -> Self {
        Self { node_id, service, ..Default::default() }
    }

    /// Whether any tap is on (the one check on the request path).
    pub fn on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// Reports `seen` to the taps it matches that have room this second.
    pub fn record(&self, seen: &Seen<'_>) {
        let active = self.active.load();
        let now = SystemTime::now();
        let second = now.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let taps: Vec<u64> = {
            let mut spent = self.spent.lock().unwrap_or_else(|p| p.into_inner());
            active
                .iter()
                .filter(|t| seen.path.starts_with(&t.path_prefix))
                .filter(|t| t.status == 0 || t.status == u32::from(seen.status))
                .filter(|t| {
                    let (s, n) = spent.entry(t.id).or_insert((second, 0));
                    if *s != second {
                        (*s, *n) = (second, 0);
                    }
                    *n += 1;
                    *n <= t.max_per_second
                })
                .map(|t| t.id)
                .collect()
        };
        if taps.is_empty() {
            return;
        }
        let record = v1::TapRecord {
            time_unix_ms: mesh_proto::unix_ms(now),
            node_id: self.node_id.clone(),
            service: self.service.clone(),
            direction: seen.direction.into(),
            caller: seen.caller.into(),
            method: seen.method.into(),
            path: seen.path.into(),
            status: seen.status.into(),
            latency_ms: seen.latency.as_secs_f64() * 1000.0,
            endpoint: seen.endpoint.into(),
            trace_id: seen.trace_id.into(),
            taps,
        };
        if let Some(tx) = self.to_control_plane.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = tx.try_send(v1::ProxyReport { kind: Some(Kind::Tap(record)) });
        }
    }

    pub(crate) fn set(&self, control: v1::TapControl) {
        let on = !control.taps.is_empty();
        let ids: Vec<u64> = control.taps.iter().map(|t| t.id).collect();
        self.spent.lock().unwrap_or_else(|p| p.into_inner()).retain(|id, _| ids.contains(id));
        self.active.store(Arc::new(control.taps));
        self.on.store(on, Ordering::Relaxed);
    }

    pub(crate) fn attach(&self, tx: Option<mpsc::Sender<v1::ProxyReport>>) {
        if tx.is_none() {
            self.set(v1::TapControl::default());
        }
        *self.to_control_plane.lock().unwrap_or_else(|p| p.into_inner()) = tx;
    }
}
