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
    commands::sidecar::admin_call,
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
    let mut client = v1::policy_client::PolicyClient::new(ch);
    let vp =
        client.get(v1::GetPolicyRequest { service: GATEWAY_SERVICE.into() }).await.map_err(st)?.into_inner();
    let stored = ServicePolicy::try_from(vp.policy.unwrap_or_default())
        .map_err(|e| CliError::Refused(format!("the control plane sent routes meshctl cannot read: {e}")))?;
    let (file, dry_run, is_diff) = match cmd {
        GatewayCommand::Get => {
            match out {
                Output::Json => print_json(&json!({"version": vp.version, "routes": stored.gateway.routes})),
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
        GatewayCommand::Set { file, dry_run } => (file, dry_run, false),
        GatewayCommand::Diff { file } => (file, true, true),
        GatewayCommand::Blocks { .. } | GatewayCommand::Unblock { .. } => {
            unreachable!("answered by run_admin")
        }
    };
    let routes = read_routes(&file)?;
    let policy = ServicePolicy { gateway: routes, ..stored };
    let r = client
        .set(v1::SetPolicyRequest {
            service: GATEWAY_SERVICE.into(),
            policy: Some((&policy).into()),
            dry_run,
            expected_version: Some(vp.version),
        })
        .await
        .map_err(st)?
        .into_inner();
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
    Ok(())
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
