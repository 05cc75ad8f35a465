//! What operators ask of proxies on demand, over each proxy's session (`Admin.ProxySession`).
//!
//! Tapping: an operator's tap (`Admin.Tap`) is registered here with where its records go; each
//! session watches the set and is told which taps concern its service, and the records it
//! sends are handed to their taps. A tap ends when its caller goes away; with none on, proxies
//! record nothing. Probing (`Admin.Check`): a probe command goes to the session of the
//! instance's sidecar, whose result comes back to the waiting caller.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use mesh_proto::v1;
use tokio::sync::{mpsc, oneshot, watch};

/// One operator's tap.
#[derive(Clone)]
pub struct Tap {
    pub service: String,
    pub filter: v1::ActiveTap,
    pub records: mpsc::Sender<v1::TapRecord>,
}

/// Every tap on now, by id.
pub type TapSet = Arc<HashMap<u64, Tap>>;

pub struct Taps {
    next: AtomicU64,
    set: watch::Sender<TapSet>,
    edit: Mutex<()>,
    /// Connected proxies by node id: their service and where their commands go.
    sessions: Mutex<HashMap<String, (String, mpsc::Sender<v1::ProxyCommand>)>>,
    /// Commands waiting for their proxy's answer (a probe's result, a call's), by id.
    waiting: Mutex<HashMap<u64, oneshot::Sender<v1::proxy_report::Kind>>>,
}

/// Forgets a proxy's session when it ends.
pub struct SessionGuard {
    taps: Arc<Taps>,
    node: String,
    commands: mpsc::Sender<v1::ProxyCommand>,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let mut sessions = self.taps.sessions.lock().unwrap_or_else(|p| p.into_inner());
        // A newer session of the same node replaced this one: leave it.
        if sessions.get(&self.node).is_some_and(|(_, tx)| tx.same_channel(&self.commands)) {
            sessions.remove(&self.node);
        }
    }
}

/// Removes its tap when dropped (the operator's stream ended).
pub struct TapGuard {
    taps: Arc<Taps>,
    id: u64,
}

impl Drop for TapGuard {
    fn drop(&mut self) {
        let _edit = self.taps.edit.lock().unwrap_or_else(|p| p.into_inner());
        let mut set = (**self.taps.set.borrow()).clone();
        set.remove(&self.id);
        self.taps.set.send_replace(Arc::new(set));
    }
}

impl Default for Taps {
    fn default() -> Self {
        Self {
            next: AtomicU64::new(1),
            set: watch::channel(Arc::default()).0,
            edit: Mutex::new(()),
            sessions: Mutex::default(),
            waiting: Mutex::default(),
        }
    }
}

/// Records a tap buffers for its caller before more are dropped.
const BUFFER: usize = 1024;

impl Taps {
    /// Starts a tap on `service`'s proxies: its records, and the guard that ends it.
    pub fn start(self: &Arc<Self>, req: &v1::TapRequest) -> (mpsc::Receiver<v1::TapRecord>, TapGuard) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (records, rx) = mpsc::channel(BUFFER);
        let max = match req.max_per_second {
            0 => 100,
            n => n.min(1000),
        };
        let filter = v1::ActiveTap {
            id,
            path_prefix: req.path_prefix.clone(),
            status: req.status,
            max_per_second: max,
        };
        let _edit = self.edit.lock().unwrap_or_else(|p| p.into_inner());
        let mut set = (**self.set.borrow()).clone();
        set.insert(id, Tap { service: req.service.clone(), filter, records });
        self.set.send_replace(Arc::new(set));
        (rx, TapGuard { taps: self.clone(), id })
    }

    pub fn watch(&self) -> watch::Receiver<TapSet> {
        self.set.subscribe()
    }

    /// A proxy's session: where commands for `node` go from now on (its commands, and the
    /// guard that forgets it).
    pub fn connect(
        self: &Arc<Self>,
        node: &str,
        service: &str,
    ) -> (mpsc::Receiver<v1::ProxyCommand>, SessionGuard) {
        let (tx, rx) = mpsc::channel(64);
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node.to_string(), (service.to_string(), tx.clone()));
        (rx, SessionGuard { taps: self.clone(), node: node.to_string(), commands: tx })
    }

    /// Asks `node`'s proxy (of `service`) to probe its app now and waits at most `within`.
    pub async fn probe(
        &self,
        node: &str,
        service: &str,
        within: std::time::Duration,
    ) -> Result<v1::ProbeResult, String> {
        let probe = |id| v1::proxy_command::Kind::Probe(v1::ProbeCommand { id });
        match self.ask(node, Some(service), probe, within).await? {
            v1::proxy_report::Kind::Probe(r) => Ok(r),
            _ => Err("its sidecar answered something else".into()),
        }
    }

    /// Sends `call` through `via`'s proxy (empty: a connected gateway, else any proxy), waiting
    /// at most `within`: the node that sent it and what came back.
    pub async fn call(
        &self,
        via: &str,
        mut call: v1::CallCommand,
        within: std::time::Duration,
    ) -> Result<(String, v1::CallResult), String> {
        let node = {
            let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            let pick = |want: &dyn Fn(&str, &str) -> bool| {
                let mut nodes: Vec<&String> =
                    sessions.iter().filter(|(n, (s, _))| want(n, s)).map(|(n, _)| n).collect();
                nodes.sort();
                nodes.first().map(|n| n.to_string())
            };
            match via {
                "" => pick(&|_, s| s == mesh_proto::gateway::GATEWAY_SERVICE).or_else(|| pick(&|_, _| true)),
                via => pick(&|n, _| n == via),
            }
        };
        let Some(node) = node else {
            return Err(match via {
                "" => "no proxy is connected to this control plane to send it".into(),
                via => format!("proxy {via} has no session with this control plane"),
            });
        };
        let command = move |id| {
            call.id = id;
            v1::proxy_command::Kind::Call(call)
        };
        match self.ask(&node, None, command, within).await? {
            v1::proxy_report::Kind::Call(r) => Ok((node, r)),
            _ => Err("the proxy answered something else".into()),
        }
    }

    /// Sends `node`'s proxy (of `service`, when given) a command and waits at most `within` for
    /// the answer carrying its id.
    async fn ask(
        &self,
        node: &str,
        service: Option<&str>,
        command: impl FnOnce(u64) -> v1::proxy_command::Kind,
        within: std::time::Duration,
    ) -> Result<v1::proxy_report::Kind, String> {
        let commands = self.sessions.lock().unwrap_or_else(|p| p.into_inner()).get(node).cloned();
        let Some((_, commands)) = commands.filter(|(svc, _)| service.is_none_or(|s| s == svc)) else {
            return Err(
                "its proxy has no session with this control plane (not connected, or connected to another)"
                    .into(),
            );
        };
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().unwrap_or_else(|p| p.into_inner()).insert(id, tx);
        let sent = commands.send(v1::ProxyCommand { kind: Some(command(id)) }).await;
        let answer = match sent {
            Err(_) => Err("its proxy's session ended".to_string()),
            Ok(()) => match tokio::time::timeout(within, rx).await {
                Ok(Ok(answer)) => Ok(answer),
                Ok(Err(_)) => Err("its proxy's session ended before it answered".into()),
                Err(_) => Err(format!("its proxy did not answer within {within:?}")),
            },
        };
        self.waiting.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        answer
    }

    /// A proxy's answer (with the id of the command it answers), to whoever waits for it.
    pub fn answered(&self, id: u64, answer: v1::proxy_report::Kind) {
        if let Some(tx) = self.waiting.lock().unwrap_or_else(|p| p.into_inner()).remove(&id) {
            let _ = tx.send(answer);
        }
    }

    /// The taps on `service`, as a proxy is told them.
    pub fn control(set: &TapSet, service: &str) -> v1::TapControl {
        let mut taps: Vec<v1::ActiveTap> =
            set.values().filter(|t| t.service == service).map(|t| t.filter.clone()).collect();
        taps.sort_by_key(|t| t.id);
        v1::TapControl { taps }
    }

    /// Hands a proxy's record to the taps it names (those on its service); a tap whose caller
    /// is behind loses records rather than holding the proxy up.
    pub fn deliver(set: &TapSet, service: &str, record: v1::TapRecord) {
        for id in &record.taps {
            if let Some(t) = set.get(id).filter(|t| t.service == service) {
                let _ = t.records.try_send(record.clone());
            }
        }
    }
}
