//! `meshctl policy get|set|diff|delete|list`.

use crate::{
    args::{Output, PolicyCommand},
    error::CliError,
    output::{changes_json, emit, print_changes, print_json},
};

use mesh_proto::dial::AdminChannel;
use mesh_proto::{policy::ServicePolicy, v1};
use serde_json::{Value, json};
use std::path::Path;

pub async fn run(cmd: PolicyCommand, ch: AdminChannel, out: Output, addr: &str) -> Result<(), CliError> {
    let st = |s: tonic::Status| CliError::from_status(s, addr);
    let mut client = v1::policy_client::PolicyClient::new(ch);
    match cmd {
        PolicyCommand::Get { service } => {
            let (policy, vp) = read(&mut client, &service, &st).await?;
            match out {
                Output::Json => print_json(&json!({
                    "service": vp.service, "version": vp.version, "is_default": vp.is_default,
                    "updated_at_unix_ms": vp.updated_at_unix_ms, "policy": policy,
                })),
                Output::Table => {
                    let origin = if vp.is_default { " (defaults)" } else { "" };
                    out!("# {} policy version {}{origin}", vp.service, vp.version);
                    out_raw!("{}", serde_yaml_ng::to_string(&policy).unwrap_or_default());
                }
            }
        }
        PolicyCommand::Set { service, file, dry_run, expected_version, merge } => {
            let (policy, expected_version) = match merge {
                false => (read_policy_file(&file)?, expected_version),
                true => {
                    let (policy, read) = merged_policy(&mut client, &service, &file, &st).await?;
                    (policy, expected_version.or(Some(read)))
                }
            };
            let r = store(&mut client, &service, &policy, dry_run, expected_version, &st).await?;
            let version = r.policy.as_ref().map(|p| p.version).unwrap_or_default();
            match out {
                Output::Json => print_json(&json!({
                    "service": service, "version": version, "applied": r.applied, "changes": changes_json(&r.changes),
                })),
                Output::Table => {
                    if r.applied {
                        out!(
                            "policy for {service} stored as version {version} ({} changes); pushing to proxies",
                            r.changes.len()
                        );
                    } else {
                        out!("dry run: policy for {service} is valid and would become version {version}");
                    }
                    print_changes(&r.changes);
                }
            }
        }
        PolicyCommand::Diff { service, file, merge } => {
            let policy = match merge {
                false => read_policy_file(&file)?,
                true => merged_policy(&mut client, &service, &file, &st).await?.0,
            };
            let r = store(&mut client, &service, &policy, true, None, &st).await?;
            match out {
                Output::Json => print_json(&changes_json(&r.changes)),
                Output::Table if r.changes.is_empty() => out!("no changes"),
                Output::Table => print_changes(&r.changes),
            }
        }
        PolicyCommand::Delete { service } => {
            let r = client
                .delete(v1::DeletePolicyRequest { service: service.clone() })
                .await
                .map_err(st)?
                .into_inner();
            match out {
                Output::Json => {
                    print_json(&json!({"service": service, "existed": r.existed, "version": r.version}))
                }
                Output::Table if r.existed => {
                    out!("policy for {service} deleted: defaults pushed as version {}", r.version)
                }
                Output::Table => out!("{service} had no policy: it already runs on the defaults"),
            }
        }
        PolicyCommand::List => {
            let r = client.list(v1::ListPoliciesRequest {}).await.map_err(st)?.into_inner();
            let rows = r
                .policies
                .iter()
                .map(|p| vec![p.service.clone(), p.version.to_string(), p.updated_at_unix_ms.to_string()])
                .collect();
            let js = r.policies.iter().map(|p| json!({"service": p.service, "version": p.version, "updated_at_unix_ms": p.updated_at_unix_ms})).collect();
            emit(out, &["SERVICE", "VERSION", "UPDATED (UNIX MS)"], rows, Value::Array(js));
        }
    }
    Ok(())
}

/// The policy stored for `service` (the defaults at version 0 when none is), and what the
/// control plane said of it.
pub async fn read(
    client: &mut v1::policy_client::PolicyClient<AdminChannel>,
    service: &str,
    st: &impl Fn(tonic::Status) -> CliError,
) -> Result<(ServicePolicy, v1::VersionedPolicy), CliError> {
    let vp = client.get(v1::GetPolicyRequest { service: service.into() }).await.map_err(st)?.into_inner();
    let policy = ServicePolicy::try_from(vp.policy.clone().unwrap_or_default()).map_err(|e| {
        CliError::Refused(format!("the control plane sent a policy of {service} meshctl cannot read: {e}"))
    })?;
    Ok((policy, vp))
}

/// Stores `policy` for `service` (with `dry_run`, only validates it and lists the changes),
/// refused unless the stored version is `expected_version` when one is given.
pub async fn store(
    client: &mut v1::policy_client::PolicyClient<AdminChannel>,
    service: &str,
    policy: &ServicePolicy,
    dry_run: bool,
    expected_version: Option<u64>,
    st: &impl Fn(tonic::Status) -> CliError,
) -> Result<v1::SetPolicyResponse, CliError> {
    let req = v1::SetPolicyRequest {
        service: service.into(),
        policy: Some(policy.into()),
        dry_run,
        expected_version,
    };
    Ok(client.set(req).await.map_err(st)?.into_inner())
}

/// The stored policy of `service` with the fields `path` names put over it, and the version it
/// was read at.
async fn merged_policy(
    client: &mut v1::policy_client::PolicyClient<AdminChannel>,
    service: &str,
    path: &Path,
    st: &impl Fn(tonic::Status) -> CliError,
) -> Result<(ServicePolicy, u64), CliError> {
    let (stored, vp) = read(client, service, st).await?;
    let mut merged = serde_yaml_ng::to_value(&stored)
        .map_err(|e| CliError::Input(format!("the stored policy of {service}: {e}")))?;
    merge_yaml(&mut merged, policy_file_value(path)?);
    Ok((validated_policy(path, serde_yaml_ng::from_value(merged))?, vp.version))
}

/// Puts `patch` over `base`: mappings merge key by key, anything else replaces.
fn merge_yaml(base: &mut serde_yaml_ng::Value, patch: serde_yaml_ng::Value) {
    use serde_yaml_ng::Value::Mapping;
    match (base, patch) {
        (Mapping(b), Mapping(p)) => {
            for (k, v) in p {
                match b.get_mut(&k) {
                    Some(slot) => merge_yaml(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

/// Reads a policy from YAML or JSON (JSON is YAML), refusing unknown fields and invalid values.
pub fn read_policy_file(path: &Path) -> Result<ServicePolicy, CliError> {
    validated_policy(path, serde_yaml_ng::from_str(&policy_file_text(path)?))
}

/// A policy file as a YAML value (any mapping; fields are checked when it becomes a policy).
fn policy_file_value(path: &Path) -> Result<serde_yaml_ng::Value, CliError> {
    serde_yaml_ng::from_str(&policy_file_text(path)?)
        .map_err(|e| CliError::Input(format!("policy file {}: {e}", path.display())))
}

fn policy_file_text(path: &Path) -> Result<String, CliError> {
    std::fs::read_to_string(path)
        .map_err(|e| CliError::Input(format!("cannot read policy file {}: {e}", path.display())))
}

/// The policy that `path` describes, if it parses and validates; the error names the file.
fn validated_policy(
    path: &Path,
    parsed: Result<ServicePolicy, serde_yaml_ng::Error>,
) -> Result<ServicePolicy, CliError> {
    let bad = |e: String| CliError::Input(format!("policy file {}: {e}", path.display()));
    let policy = parsed.map_err(|e| bad(e.to_string()))?;
    policy.validate().map_err(|e| bad(e.to_string()))?;
    Ok(policy)
}
