//! `meshctl top`: the observed topology as a live table — services (what they served) and edges
//! (who calls whom), busiest first, refreshed every `--interval` until Ctrl-C; `--once` prints
//! one table (or, with `-o json`, the topology as JSON) and exits.

use std::time::Duration;

use mesh_proto::v1;

use crate::{
    args::Output,
    error::CliError,
    output::{print_json, print_table},
};

/// A window's cells: rps, success, p50, p99.
fn cells(w: Option<&v1::WindowStats>) -> [String; 4] {
    let w = w.cloned().unwrap_or_default();
    [
        format!("{:.1}", w.rps),
        format!("{:.1}%", w.success_rate * 100.0),
        format!("{:.1}ms", w.p50_ms),
        format!("{:.1}ms", w.p99_ms),
    ]
}

fn render(t: &v1::TopologyResponse) {
    let services = t
        .services
        .iter()
        .map(|s| {
            let mut row = vec![s.service.clone()];
            row.extend(cells(s.inbound_last_minute.as_ref()));
            row.push(s.inbound_last_ten_minutes.as_ref().map_or(0, |w| w.requests).to_string());
            row
        })
        .collect();
    print_table(&["SERVICE", "RPS (1m)", "SUCCESS", "P50", "P99", "REQUESTS (10m)"], services);
    crate::output::blank_line();
    let edges = t
        .edges
        .iter()
        .map(|e| {
            let mut row = vec![
                e.caller.clone(),
                e.callee.clone(),
                if e.route.is_empty() { "-".into() } else { e.route.clone() },
            ];
            row.extend(cells(e.last_minute.as_ref()));
            row.push(format!("{:.1}s ago", e.last_seen_ms_ago as f64 / 1000.0));
            row
        })
        .collect();
    print_table(&["FROM", "TO", "ROUTE", "RPS (1m)", "SUCCESS", "P50", "P99", "LAST SEEN"], edges);
}

pub async fn run(
    ch: mesh_proto::dial::AdminChannel,
    addr: &str,
    interval: Duration,
    once: bool,
    out: Output,
) -> Result<(), CliError> {
    use std::io::IsTerminal;
    let live = !once && std::io::stdout().is_terminal();
    let mut admin = v1::admin_client::AdminClient::new(ch);
    loop {
        let t = admin
            .topology(v1::TopologyRequest {})
            .await
            .map_err(|s| CliError::from_status(s, addr))?
            .into_inner();
        match out {
            Output::Json => print_json(&mesh_proto::json::topology(&t)),
            Output::Table => {
                if live {
                    // Home and clear, so the table redraws in place.
                    out_raw!("\x1b[H\x1b[2J");
                    out!("meshctl top — every {}, Ctrl-C to stop", humantime::format_duration(interval));
                    crate::output::blank_line();
                }
                render(&t);
                if t.edges.is_empty() {
                    crate::output::blank_line();
                    out!("no traffic reported yet (proxies report what they called every 10s)");
                }
            }
        }
        if once {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}
