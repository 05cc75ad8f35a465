//! `meshctl check`: one command that verifies a running mesh and says what to fix — the control
//! plane answers, every instance is healthy, every proxy is connected and has ACKed the current
//! version of every policy it follows (none NACKed), every proxy's certificate is valid for a
//! while yet, and the event bus answers. Exit status 1 when anything failed.

use std::time::Duration;

use mesh_proto::v1;
use serde_json::json;

use crate::{
    args::Output,
    connect::{Target, connect},
    error::CliError,
    output::{SyncState, emit, print_json, sync_state},
};

/// One verdict: what was checked, whether it holds, what was found, and what to do.
struct Verdict {
    check: &'static str,
    ok: bool,
    found: String,
    fix: String,
}

fn ok(check: &'static str, found: String) -> Verdict {
    Verdict { check, ok: true, found, fix: String::new() }
}

fn fail(check: &'static str, found: String, fix: impl Into<String>) -> Verdict {
    Verdict { check, ok: false, found, fix: fix.into() }
}

pub async fn run(target: &Target, cert_margin: Duration, out: Output) -> Result<(), CliError> {
    let mut verdicts = Vec::new();
    let reached = match connect(target).await {
        Ok(ch) => {
            let overview =
                v1::admin_client::AdminClient::new(ch.clone()).overview(v1::OverviewRequest {}).await;
            match overview {
                Ok(o) => Some((ch, o.into_inner())),
                Err(s) => {
                    verdicts.push(fail(
                        "control plane",
                        s.message().to_string(),
                        "check --admin-token-file (and --ca-file)",
                    ));
                    None
                }
            }
        }
        Err(e) => {
            verdicts.push(fail(
                "control plane",
                e.to_string(),
                format!("start it (meshctl up) or point --control-plane at it (now {})", target.url),
            ));
            None
        }
    };
    if let Some((ch, o)) = reached {
        verdicts.push(ok(
            "control plane",
            format!("{} up {} s, {} services", target.url, o.uptime_ms / 1000, o.services),
        ));
        verdicts.push(match o.instances - o.healthy_instances {
            0 => ok("instances", format!("{} healthy", o.healthy_instances)),
            n => fail(
                "instances",
                format!("{n} of {} not healthy", o.instances),
                "meshctl services, then meshctl instances SERVICE: the app behind each sidecar fails its probe",
            ),
        });
        verdicts.extend(proxies(ch.clone(), cert_margin).await);
        let bus = v1::events_client::EventsClient::new(ch)
            .replay(v1::ReplayRequest { topic: "mesh-check".into(), limit: 1, ..Default::default() })
            .await;
        verdicts.push(match bus {
            Ok(_) => ok("event bus", "answers".into()),
            Err(s) => fail(
                "event bus",
                s.message().to_string(),
                "see the control plane's log (--bus, the NATS URL)",
            ),
        });
    }
    let failed = verdicts.iter().filter(|v| !v.ok).count();
    match out {
        Output::Json => print_json(&json!({
            "ok": failed == 0,
            "checks": verdicts.iter().map(|v| json!({"check": v.check, "ok": v.ok, "found": v.found, "fix": v.fix})).collect::<Vec<_>>(),
        })),
        Output::Table => {
            let rows = verdicts
                .iter()
                .map(|v| {
                    vec![
                        if v.ok { "ok" } else { "FAIL" }.to_string(),
                        v.check.into(),
                        v.found.clone(),
                        v.fix.clone(),
                    ]
                })
                .collect();
            emit(out, &["", "CHECK", "FOUND", "FIX"], rows, json!(null));
        }
    }
    if failed == 0 { Ok(()) } else { Err(CliError::Refused(format!("{failed} check(s) failed"))) }
}

/// Every proxy connected and converged, and holding a certificate valid past `margin`.
async fn proxies(ch: mesh_proto::dial::AdminChannel, margin: Duration) -> Vec<Verdict> {
    let status = v1::admin_client::AdminClient::new(ch).proxy_status(v1::ProxyStatusRequest::default()).await;
    let list = match status {
        Ok(r) => r.into_inner().proxies,
        Err(s) => {
            return vec![fail("proxies", s.message().to_string(), "the admin token may lack the admin role")];
        }
    };
    if list.is_empty() {
        return vec![fail(
            "proxies",
            "no sidecar is connected".into(),
            "start the sidecars (meshctl up starts them)",
        )];
    }
    let now = mesh_proto::unix_ms(std::time::SystemTime::now());
    let (mut stale, mut nacked, mut certs) = (Vec::new(), Vec::new(), Vec::new());
    for p in &list {
        for s in &p.policies {
            let (node, policy, v) = (&p.node_id, &s.service, s.current_version);
            match sync_state(s) {
                SyncState::Synced => {}
                SyncState::Nacked(why) => nacked.push(format!("{node} NACKed {policy} v{v}: {why}")),
                SyncState::Stale => stale.push(format!("{node} has {policy} v{} of v{v}", s.acked_version)),
            }
        }
        let exp = p.certificate_expires_unix_ms;
        if exp != 0 && exp < now + margin.as_millis() as u64 {
            let left = exp.saturating_sub(now) / 1000;
            certs.push(format!("{} expires in {left} s", p.node_id));
        }
    }
    let with_certs = list.iter().filter(|p| p.certificate_expires_unix_ms != 0).count();
    vec![
        ok("proxies", format!("{} connected", list.len())),
        match (nacked.is_empty(), stale.is_empty()) {
            (true, true) => ok("convergence", "every proxy ACKed the current version of every policy".into()),
            (false, _) => fail(
                "convergence",
                nacked.join("; "),
                "the NACK says why: fix the policy field it names (meshctl policy get SERVICE), or \
                 what the sidecar's log says it could not do",
            ),
            (true, false) => fail(
                "convergence",
                stale.join("; "),
                "wait, or see the sidecar's log for why it has not applied it",
            ),
        },
        match certs.is_empty() {
            true => {
                ok("certificates", format!("{with_certs} valid past {}", humantime::format_duration(margin)))
            }
            false => fail(
                "certificates",
                certs.join("; "),
                "sidecars renew before expiry: check they reach the control plane (meshctl sidecar ADMIN)",
            ),
        },
    ]
}
