//! The commands: [`run`] dispatches to one file per command group; the registry views
//! (`services`, `instances`, `proxy-status`, `overview`, `stats`) are answered here.

pub mod check;
pub mod events;
pub mod gateway;
pub mod identity;
pub mod policy;
pub mod sidecar;
pub mod tap;
pub mod top;

use crate::{
    args::{Args, Command, EndUserTokenCommand},
    connect::{Target, connect},
    error::CliError,
    issuer::Issuer,
    output::{dash, emit, emit_kv, health_name, sync_state},
    up,
};

use mesh_proto::v1;
use serde_json::Value;

pub async fn run(args: Args) -> Result<(), CliError> {
    match args.command {
        Command::Up(up) => return up::run(up, args.output, args.log_format).await,
        Command::Sidecar { admin } => return sidecar::run(&admin, args.output).await,
        Command::Gateway(ref cmd) if gateway::run_admin(cmd, args.output).await? => return Ok(()),
        Command::Check { cert_margin } => {
            let target = Target {
                url: args.control_plane.clone(),
                ca_file: args.ca_file.clone(),
                admin_token_file: args.admin_token_file.clone(),
            };
            return check::run(&target, cert_margin, args.output).await;
        }
        Command::Token(EndUserTokenCommand::Issue { sub, admin, ttl, dir }) => {
            let token = Issuer::open(&dir.join("issuer"))?.issue(&sub, admin, ttl)?;
            out!("{token}");
            return Ok(());
        }
        _ => {}
    }
    let addr = args.control_plane.clone();
    let ch = connect(&Target {
        url: addr.clone(),
        ca_file: args.ca_file.clone(),
        admin_token_file: args.admin_token_file.clone(),
    })
    .await?;
    let st = |s: tonic::Status| CliError::from_status(s, &addr);
    let out = args.output;
    match args.command {
        Command::Top { interval, once } => top::run(ch, &addr, interval, once, out).await?,
        Command::Tap { service, path, status, max_per_second } => {
            tap::run(ch, &addr, tap::TapArgs { service, path, status, max_per_second }, out).await?
        }
        Command::Services => {
            let r = v1::registry_client::RegistryClient::new(ch)
                .list_services(v1::ListServicesRequest {})
                .await
                .map_err(st)?
                .into_inner();
            let rows = r
                .services
                .iter()
                .map(|s| {
                    vec![
                        s.name.clone(),
                        s.instances.to_string(),
                        s.healthy.to_string(),
                        s.policy_version.to_string(),
                    ]
                })
                .collect();
            let js = r.services.iter().map(mesh_proto::json::service_summary).collect();
            emit(out, &["SERVICE", "INSTANCES", "HEALTHY", "POLICY"], rows, Value::Array(js));
        }
        Command::Instances { service } => {
            let r = v1::registry_client::RegistryClient::new(ch)
                .get_service(v1::GetServiceRequest { name: service })
                .await
                .map_err(st)?
                .into_inner();
            let health = |i: &v1::Instance| health_name(i.health());
            let rows = r
                .instances
                .iter()
                .map(|i| {
                    vec![
                        i.id.clone(),
                        i.address.clone(),
                        dash(&i.zone),
                        dash(&i.version),
                        health(i).into(),
                        i.load.to_string(),
                        format!("{:.1}s", i.last_heartbeat_age_ms as f64 / 1000.0),
                    ]
                })
                .collect();
            let js = r.instances.iter().map(mesh_proto::json::instance).collect();
            emit(
                out,
                &["ID", "ADDRESS", "ZONE", "VERSION", "HEALTH", "LOAD", "LAST HEARTBEAT"],
                rows,
                Value::Array(js),
            );
        }
        Command::Policy(cmd) => policy::run(cmd, ch, out, &addr).await?,
        Command::Gateway(cmd) => gateway::run(cmd, ch, out, &addr).await?,
        Command::Events(cmd) => events::run(cmd, ch, out, &addr).await?,
        Command::Identity(cmd) => identity::run(cmd, ch, out, &addr).await?,
        Command::ProxyStatus { service } => {
            let r = v1::admin_client::AdminClient::new(ch)
                .proxy_status(v1::ProxyStatusRequest { service: service.unwrap_or_default() })
                .await
                .map_err(st)?
                .into_inner();
            let mut rows = Vec::new();
            let mut js = Vec::new();
            for p in &r.proxies {
                let hb = p
                    .last_heartbeat_age_ms
                    .map(|ms| format!("{:.1}s ago", ms as f64 / 1000.0))
                    .unwrap_or("-".into());
                let now = mesh_proto::unix_ms(std::time::SystemTime::now());
                let cert = match p.certificate_expires_unix_ms {
                    0 => "-".to_string(),
                    exp if exp <= now => format!("EXPIRED ({} issued)", p.certificates_issued),
                    exp => format!(
                        "expires in {} ({} issued)",
                        humantime::format_duration(std::time::Duration::from_secs((exp - now) / 1000)),
                        p.certificates_issued
                    ),
                };
                for s in &p.policies {
                    let state = sync_state(s).to_string();
                    rows.push(vec![
                        dash(&p.node_id),
                        dash(&p.service),
                        s.service.clone(),
                        s.current_version.to_string(),
                        s.acked_version.to_string(),
                        state,
                        format!("{:.1}ms", s.last_ack_latency_ms),
                        hb.clone(),
                        cert.clone(),
                        dash(&p.replica),
                    ]);
                }
                js.push(mesh_proto::json::proxy_status(p));
            }
            let mut headers = vec![
                "NODE",
                "SERVICE",
                "POLICY OF",
                "CURRENT",
                "ACKED",
                "STATE",
                "ACK LATENCY",
                "HEARTBEAT",
                "CERTIFICATE",
                "REPLICA",
            ];
            // Which replica a proxy is on matters only with several (--store etcd).
            if r.proxies.iter().all(|p| p.replica.is_empty()) {
                headers.pop();
                rows.iter_mut().for_each(|r| drop(r.pop()));
            }
            emit(out, &headers, rows, Value::Array(js));
        }
        Command::Overview => {
            let o = v1::admin_client::AdminClient::new(ch)
                .overview(v1::OverviewRequest {})
                .await
                .map_err(st)?
                .into_inner();
            let js = mesh_proto::json::overview(&o);
            emit_kv(out, js);
        }
        Command::Stats => {
            let s = v1::admin_client::AdminClient::new(ch)
                .stats(v1::StatsRequest {})
                .await
                .map_err(st)?
                .into_inner();
            let js = mesh_proto::json::stats(&s);
            emit_kv(out, js);
        }
        Command::Up(_) | Command::Sidecar { .. } | Command::Token(_) | Command::Check { .. } => {
            unreachable!("handled above")
        }
    }
    Ok(())
}
