//! `meshctl tap SERVICE`: live request metadata from the service's proxies — time, direction,
//! caller, method, path, status, latency, the endpoint that answered, the trace id — one line
//! per request (or one JSON object with `-o json`) until Ctrl-C. On demand only: the proxies
//! record nothing while no tap is on, at most `--max-per-second` each while one is.

use mesh_proto::{dial::AdminChannel, v1};
use serde_json::json;

use crate::{args::Output, error::CliError};

pub struct TapArgs {
    pub service: String,
    pub path: Option<String>,
    pub status: Option<u16>,
    pub max_per_second: u32,
}

pub async fn run(ch: AdminChannel, addr: &str, a: TapArgs, out: Output) -> Result<(), CliError> {
    let req = v1::TapRequest {
        service: a.service.clone(),
        path_prefix: a.path.unwrap_or_default(),
        status: a.status.map_or(0, u32::from),
        max_per_second: a.max_per_second,
    };
    let mut records = v1::admin_client::AdminClient::new(ch)
        .tap(req)
        .await
        .map_err(|s| CliError::from_status(s, addr))?
        .into_inner();
    if out == Output::Table {
        eprintln!("tapping {} (Ctrl-C to stop)…", a.service);
    }
    loop {
        let record = tokio::select! {
            r = records.message() => r.map_err(|s| CliError::from_status(s, addr))?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let Some(r) = record else { return Ok(()) };
        let time = humantime::format_rfc3339_millis(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(r.time_unix_ms),
        );
        match out {
            Output::Json => out!(
                "{}",
                json!({
                    "time": time.to_string(), "node_id": r.node_id, "service": r.service, "direction": r.direction,
                    "caller": r.caller, "method": r.method, "path": r.path, "status": r.status,
                    "latency_ms": r.latency_ms, "endpoint": r.endpoint, "trace_id": r.trace_id,
                })
            ),
            Output::Table => out!(
                "{time} {:<8} {} {} → {} {} {} {:.1}ms {} trace={}",
                r.direction,
                if r.caller.is_empty() { "-" } else { &r.caller },
                r.node_id,
                r.method,
                r.path,
                r.status,
                r.latency_ms,
                r.endpoint,
                r.trace_id
            ),
        }
    }
}
