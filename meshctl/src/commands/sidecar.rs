//! `meshctl sidecar`: one sidecar's view, from its admin endpoint.

use crate::{
    args::Output,
    error::CliError,
    output::{print_json, print_table},
};

use serde_json::Value;
use std::time::Duration;

/// One request to a sidecar's admin listener (plain HTTP/1.1): the status and the JSON answer.
/// `admin` is `127.0.0.1:4191`, or a URL as `meshctl up` prints it (`http://127.0.0.1:4191/config`).
pub async fn admin_call(admin: &str, method: &str, path: &str) -> Result<(u16, Value), CliError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = admin.trim_start_matches("http://").split('/').next().unwrap_or_default();
    let unreachable = |cause: String| {
        CliError::Input(format!(
            "cannot reach the sidecar admin listener at {addr}: {cause} (`meshctl up` prints each \
             sidecar's admin URL, http://…/config)"
        ))
    };
    let mut s = tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| unreachable("timed out".into()))?
        .map_err(|e| unreachable(e.to_string()))?;
    s.write_all(format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.map_err(|e| unreachable(e.to_string()))?;
    let text = String::from_utf8_lossy(&raw);
    let status = text.split(' ').nth(1).and_then(|c| c.parse::<u16>().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let answer: Value = serde_json::from_str(body).map_err(|e| {
        CliError::Refused(format!(
            "{addr} did not answer {path} with JSON ({e}): is it a sidecar's admin address?"
        ))
    })?;
    Ok((status, answer))
}

/// `meshctl sidecar ADMIN`: the sidecar's `/config`.
pub async fn run(admin: &str, out: Output) -> Result<(), CliError> {
    let (_, cfg) = admin_call(admin, "GET", "/config").await?;
    if out == Output::Json {
        print_json(&cfg);
        return Ok(());
    }
    let cp = &cfg["control_plane"];
    out!(
        "{} {} ({}), control plane {} {}",
        cfg["mode"].as_str().unwrap_or("?"),
        cfg["instance_id"].as_str().unwrap_or("?"),
        cfg["service"].as_str().unwrap_or("gateway"),
        cp["current"].as_str().unwrap_or("?"),
        if cp["connected"] == true { "connected" } else { "DISCONNECTED (serving the last known state)" }
    );
    let mut rows = Vec::new();
    for u in cfg["upstreams"].as_array().into_iter().flatten() {
        let svc = u["service"].as_str().unwrap_or("?").to_string();
        let cache = format!("{} entries, {} B", u["cache"]["entries"], u["cache"]["bytes"]);
        let endpoints = u["endpoints"].as_array().cloned().unwrap_or_default();
        if endpoints.is_empty() {
            rows.push(vec![
                svc.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                u["policy_version"].to_string(),
                cache.clone(),
            ]);
        }
        for e in endpoints {
            rows.push(vec![
                svc.clone(),
                e["id"].as_str().unwrap_or("?").into(),
                e["address"].as_str().unwrap_or("?").into(),
                e["breaker"].as_str().unwrap_or("?").into(),
                e["inflight"].to_string(),
                format!("{:.1}ms", e["latency_ewma_ms"].as_f64().unwrap_or(0.0)),
                u["policy_version"].to_string(),
                cache.clone(),
            ]);
        }
    }
    print_table(
        &["UPSTREAM", "ENDPOINT", "ADDRESS", "BREAKER", "IN FLIGHT", "LATENCY", "POLICY", "CACHE"],
        rows,
    );
    out!();
    let counters: Vec<Vec<String>> = cfg["upstreams"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|u| {
            let c = &u["counters"];
            vec![
                u["service"].as_str().unwrap_or("?").to_string(),
                c["retries"].to_string(),
                c["retry_budget_exhausted"].to_string(),
                c["overload_rejections"].to_string(),
                format!("{}/{}/{}", c["cache_hits"], c["cache_misses"], c["cache_stale"]),
            ]
        })
        .collect();
    print_table(&["UPSTREAM", "RETRIES", "BUDGET EXHAUSTED", "OVERLOADED", "CACHE HIT/MISS/STALE"], counters);
    if cfg["service"].is_string() {
        out!(
            "\nrequests to {} refused by its rate limits: {}",
            cfg["service"].as_str().unwrap_or("?"),
            cfg["rate_limited"]
        );
    }
    Ok(())
}
