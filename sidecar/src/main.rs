//! `sidecar`: flags (and an optional YAML config file, [`args`]) → tracing →
//! bind → `sidecar::run` until SIGTERM / SIGINT → ordered drain → exit code.
//!
//! Once listening it prints one JSON line on stdout,
//! `{"event":"listening","outbound":…,"inbound":…,"admin":…}`; logs go to stderr.

mod args;

use std::{net::SocketAddr, process::ExitCode};

use anyhow::Context;
use args::{Args, Resolved, resolve};
use clap::Parser;
use mesh_runtime::{LocalAddr, LocalListener};
use sidecar::{Listeners, Mode};
use tokio::net::TcpListener;

/// jemalloc instead of glibc's malloc. Every request allocates and frees buffers of a few
/// kilobytes (hyper's read buffers are split off per request and grown again): under load,
/// glibc's malloc and free took 8–10 % of the sidecar's samples, 1.6–2.3 % of them in fastbin
/// consolidation and chunk unlinking. Measured side by side (BENCHMARKS.md, mTLS section, fifth round): jemalloc
/// −6 % CPU per request of the mTLS pair, +0.6–1 MB idle RSS, +4–6 MB with 1,000 client
/// connections; mimalloc saved 11 % but cost +7–8 MB idle and +21–23 MB with 1,000 connections.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let args = Args::parse();
    let log = args.log.clone();
    let threads = args.worker_threads;
    mesh_runtime::main(&log, args.log_format, threads, run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let Resolved { mut config, inbound, outbound, app_api, admin } = resolve(args)?;
    let bind = |addr: SocketAddr, what: &'static str| async move {
        TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {what} {addr}"))
    };
    let inbound = match config.mode {
        Mode::Sidecar => Some(bind(inbound, "--inbound-addr").await?),
        Mode::Gateway => None,
    };
    let local = |addr: LocalAddr, what: &'static str| async move {
        LocalListener::bind(&addr).await.with_context(|| format!("cannot listen on {what} {addr}"))
    };
    let outbound = local(outbound, "--outbound-addr").await?;
    let app_api = match app_api {
        Some(a) => Some(local(a, "--app-api-addr").await?),
        None => None,
    };
    let admin = bind(admin, "--admin-addr").await?;
    let inbound_addr = inbound.as_ref().map(|l| l.local_addr()).transpose()?;
    if config.advertise_addr.is_empty()
        && let Some(a) = inbound_addr
    {
        let ip = if a.ip().is_unspecified() { [127, 0, 0, 1].into() } else { a.ip() };
        config.advertise_addr = SocketAddr::new(ip, a.port()).to_string();
    }
    println!(
        "{}",
        serde_json::json!({
            "event": "listening", "outbound": outbound.local_addr()?.to_string(), "inbound": inbound_addr,
            "admin": admin.local_addr()?, "instance_id": config.instance_id,
            "app_api": app_api.as_ref().map(|l| l.local_addr().map(|a| a.to_string())).transpose()?,
        })
    );
    let listeners = Listeners { inbound, outbound, app_api, admin };
    mesh_runtime::serve_until_signal("sidecar", None, |stop| sidecar::run(config, listeners, stop))
        .await
        .map_err(|e| anyhow::anyhow!(e))
}
