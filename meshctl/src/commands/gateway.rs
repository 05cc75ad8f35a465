//! `meshctl gateway get|set|diff` (the routes, kept as the `gateway` service's policy so they are
//! versioned, validated, diffed, pushed and ACKed like any policy) and `meshctl gateway
//! blocks|unblock` (a gateway's automatic blocks, from its admin listener).

use std::path::Path;

use mesh_proto::{
    dial::AdminChannel,
    gateway::{GATEWAY_SERVICE, GatewayPolicy},
    policy::ServicePolicy,
    v1,
};
use serde_json::json;

use crate::{
    args::{GatewayCommand, Output},
    commands::{policy, sidecar::admin_call},
    error::CliError,
    output::{changes_json, emit, print_changes, print_json},
};

/// `blocks` and `unblock`: no control plane involved.
pub async fn run_admin(cmd: &GatewayCommand, out: Output) -> Result<bool, CliError> {
    match cmd {
        GatewayCommand::Blocks { admin } => {
            let (_, answer) = admin_call(admin, "GET", "/gateway/blocks").await?;
            let list = answer["blocks"].as_array().cloned().ok_or_else(|| {
                CliError::Refused(format!("{admin} has no /gateway/blocks: is it a gateway's admin address?"))
            })?;
            let rows = list
                .iter()
                .map(|b| {
                    vec![
                        b["ip"].as_str().unwrap_or("?").to_string(),
                        b["seconds_left"].to_string(),
                        b["reason"].as_str().unwrap_or("?").to_string(),
                    ]
                })
                .collect();
            emit(out, &["CLIENT", "SECONDS LEFT", "LAST RULE"], rows, answer["blocks"].clone());
            Ok(true)
        }
        GatewayCommand::Unblock { admin, ip } => {
            let (status, answer) = admin_call(admin, "DELETE", &format!("/gateway/blocks/{ip}")).await?;
            if status != 200 {
                let why = answer["message"].as_str().unwrap_or("refused");
                return Err(CliError::Refused(format!("unblock {ip}: {why}")));
            }
            match out {
                Output::Json => print_json(&answer),
                Output::Table => out!("{ip} is no longer blocked"),
            }
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// `get`, `set` and `diff`: the `gateway` policy's routes on the control plane.
pub async fn run(cmd: GatewayCommand, ch: AdminChannel, out: Output, addr: &str) -> Result<(), CliError> {
    let st = |s: tonic::Status| CliError::from_status(s, addr);
    let ch_admin = ch.clone();
    let mut client = v1::policy_client::PolicyClient::new(ch);
    let (stored, vp) = policy::read(&mut client, GATEWAY_SERVICE, &st).await?;
    let (file, dry_run, is_diff, wait) = match cmd {
        GatewayCommand::Get => {
            match out {
                Output::Json => {
                    let mut shown = serde_json::to_value(&stored.gateway).unwrap_or_default();
                    shown["version"] = json!(vp.version);
                    print_json(&shown)
                }
                Output::Table if stored.gateway.is_empty() => out!(
                    "# no routes stored (version {}): each gateway serves the routes it was started with",
                    vp.version
                ),
                Output::Table => {
                    out!("# gateway routes, version {}", vp.version);
                    out_raw!("{}", serde_yaml_ng::to_string(&stored.gateway).unwrap_or_default());
                }
            }
            return Ok(());
        }
        GatewayCommand::Set { file, dry_run, wait } => (file, dry_run, false, wait),
        GatewayCommand::Diff { file } => (file, true, true, std::time::Duration::ZERO),
        GatewayCommand::Blocks { .. } | GatewayCommand::Unblock { .. } => {
            unreachable!("answered by run_admin")
        }
    };
    let routes = read_routes(&file)?;
    let policy = ServicePolicy { gateway: routes, ..stored };
    let r = policy::store(&mut client, GATEWAY_SERVICE, &policy, dry_run, Some(vp.version), &st).await?;
    let version = r.policy.as_ref().map(|p| p.version).unwrap_or_default();
    match out {
        Output::Json => print_json(&json!({
            "version": version, "applied": r.applied, "changes": changes_json(&r.changes),
        })),
        Output::Table if !r.applied && r.changes.is_empty() => out!("no changes"),
        Output::Table => {
            if r.applied {
                out!(
                    "gateway routes stored as version {version} ({} changes); pushing to gateways",
                    r.changes.len()
                );
            } else if !is_diff {
                out!("dry run: the routes are valid and would become version {version}");
            }
            print_changes(&r.changes);
        }
    }
    if r.applied && !wait.is_zero() {
        await_acks(&ch_admin, version, wait, out, &st).await?;
    }
    Ok(())
}

/// Waits until every gateway connected to the control plane has answered `version` — an ACK,
/// or a NACK (then an error naming the gateway and why) — or `wait` has passed.
async fn await_acks(
    ch: &AdminChannel,
    version: u64,
    wait: std::time::Duration,
    out: Output,
    st: &impl Fn(tonic::Status) -> CliError,
) -> Result<(), CliError> {
    let mut admin = v1::admin_client::AdminClient::new(ch.clone());
    let deadline = tokio::time::Instant::now() + wait;
    let mut told = false;
    loop {
        let status = admin
            .proxy_status(v1::ProxyStatusRequest { service: GATEWAY_SERVICE.into() })
            .await
            .map_err(st)?
            .into_inner();
        let sync: Vec<(&str, &v1::PolicySyncStatus)> = status
            .proxies
            .iter()
            .flat_map(|p| {
                p.policies
                    .iter()
                    .filter(|s| s.service == GATEWAY_SERVICE)
                    .map(move |s| (p.node_id.as_str(), s))
            })
            .collect();
        if let Some((node, s)) = sync.iter().find(|(_, s)| s.nacked_version >= version) {
            return Err(CliError::Refused(format!(
                "gateway {node} refused the routes (NACK): {}",
                s.nack_reason
            )));
        }
        let acked = sync.iter().filter(|(_, s)| s.acked_version >= version).count();
        if acked == sync.len() {
            if out == Output::Table {
                match acked {
                    0 => out!("no gateway is connected: each gets the routes when it connects"),
                    n => out!("ACKed by {n} gateway{}", if n == 1 { "" } else { "s" }),
                }
            }
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(CliError::Refused(format!(
                "{acked} of {} gateways ACKed version {version} within {}; `meshctl proxy-status gateway` shows which",
                sync.len(),
                humantime::format_duration(wait)
            )));
        }
        if !told && out == Output::Table {
            out!("waiting for {} gateway(s) to ACK…", sync.len() - acked);
            told = true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Routes from a YAML or JSON file (`routes: [...]`), parsed strictly and validated; the error
/// names the file and the field.
fn read_routes(path: &Path) -> Result<GatewayPolicy, CliError> {
    let bad = |e: String| CliError::Input(format!("routes file {}: {e}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
    let routes: GatewayPolicy = serde_yaml_ng::from_str(&text).map_err(|e| bad(e.to_string()))?;
    routes.validate().map_err(|e| bad(e.to_string()))?;
    Ok(routes)
}
