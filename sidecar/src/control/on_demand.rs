//! What operators ask of this proxy on demand, over its session with the control plane
//! (`Admin.ProxySession`): the taps on its service ([`super::tap`]) and probes of its app now
//! (the management API's `POST /api/v1/services/{service}/check`).

use futures::StreamExt;
use mesh_proto::v1::{self, admin_client::AdminClient, proxy_command::Kind as Command, proxy_report::Kind};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::{
    control::tap::{QUEUE, Tap},
    shared::Shared,
};

/// The on-demand session of one control-plane session: hello, then the taps on this service
/// as the control plane announces them and the probes it asks for. Ends (taps off) with the
/// connection; a control plane without it is not an error — the rest of the session goes on.
pub async fn session(shared: &Shared, ch: tonic::transport::Channel) {
    let tap = &shared.tap;
    let (tx, rx) = mpsc::channel(QUEUE);
    let hello =
        v1::ProxyHello { node_id: shared.config.instance_id.clone(), service: shared.identity_service() };
    let _ = tx.send(v1::ProxyReport { kind: Some(Kind::Hello(hello)) }).await;
    let mut commands = match AdminClient::new(ch).proxy_session(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(s) => {
            tracing::debug!(status = %s, "no on-demand session: the control plane cannot tap or probe this proxy");
            return std::future::pending().await;
        }
    };
    tap.attach(Some(tx.clone()));
    // However the session ends, its taps end with it.
    let _detach = Detach(tap);
    while let Some(Ok(command)) = commands.next().await {
        match command.kind {
            Some(Command::Taps(control)) => {
                tracing::info!(taps = control.taps.len(), "taps on this service changed");
                tap.set(control);
            }
            Some(Command::Probe(p)) => {
                let (app, health) = (shared.app.clone(), shared.own_policy.borrow().1.health.clone());
                let tx = tx.clone();
                mesh_runtime::spawn(tracing::info_span!("probe_now", id = p.id), async move {
                    let mut result = match app {
                        Some(app) => {
                            super::probe::probe_now(&app, &health.probe_path, health.probe_timeout).await
                        }
                        None => v1::ProbeResult {
                            error: "a gateway has no app to probe".into(),
                            ..Default::default()
                        },
                    };
                    result.id = p.id;
                    let _ = tx.send(v1::ProxyReport { kind: Some(Kind::Probe(result)) }).await;
                });
            }
            Some(Command::Call(c)) => {
                let (outbound, tx) = (shared.outbound.get().cloned(), tx.clone());
                mesh_runtime::spawn(
                    tracing::info_span!("operator_call", id = c.id, service = %c.service),
                    async move {
                        let result = match outbound {
                            Some(outbound) => call(&outbound, c).await,
                            None => v1::CallResult {
                                id: c.id,
                                error: "the proxy is still starting".into(),
                                ..Default::default()
                            },
                        };
                        let _ = tx.send(v1::ProxyReport { kind: Some(Kind::Call(result)) }).await;
                    },
                );
            }
            None => {}
        }
    }
    tap.attach(None);
    std::future::pending().await
}

struct Detach<'a>(&'a Tap);

impl Drop for Detach<'_> {
    fn drop(&mut self) {
        self.0.attach(None);
    }
}

/// The most of an answer's body an operator's call returns.
const MAX_CALL_BODY: usize = 1024 * 1024;

/// Sends an operator's call through this proxy's outbound side, as its app would.
async fn call(outbound: &crate::outbound::Outbound, c: v1::CallCommand) -> v1::CallResult {
    let refused = |id, error: String| v1::CallResult { id, error, ..Default::default() };
    let mut req = http::Request::builder().method(c.method.as_str()).uri(c.path.as_str());
    // An operator speaks as an operator: the mesh's own headers (the end user a gateway
    // verified, above all) are never taken from the call.
    for (k, v) in c.headers.iter().filter(|(k, _)| !k.to_ascii_lowercase().starts_with("x-mesh-")) {
        req = req.header(k, v);
    }
    let req = match req.body(crate::http::body::boxed(http_body_util::Full::new(bytes::Bytes::from(c.body))))
    {
        Ok(r) => r,
        Err(e) => return refused(c.id, format!("not a valid request: {e}")),
    };
    let started = tokio::time::Instant::now();
    let (resp, endpoint) = outbound.call(&c.service, req).await;
    let attempts = resp.extensions().get::<crate::outbound::AttemptsMade>().map_or(0, |a| a.0);
    let (parts, body) = resp.into_parts();
    let body = match crate::http::body::collect_up_to(body, MAX_CALL_BODY).await {
        Ok(b) => b,
        Err(e) => return refused(c.id, format!("reading the answer failed: {e}")),
    };
    let headers = parts
        .headers
        .iter()
        .filter_map(|(k, v)| Some((k.to_string(), v.to_str().ok()?.to_string())))
        .collect();
    v1::CallResult {
        id: c.id,
        response: Some(v1::CallResponse {
            via: String::new(),
            status: parts.status.as_u16().into(),
            headers,
            body: body.to_vec(),
            endpoint: endpoint.map(|e| e.info.id.clone()).unwrap_or_default(),
            attempts,
            latency_ms: started.elapsed().as_secs_f64() * 1000.0,
        }),
        error: String::new(),
    }
}
