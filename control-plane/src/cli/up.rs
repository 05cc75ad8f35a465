//! `meshctl up`: the local mesh on loopback as separate processes with embedded storage under
//! `./.mesh/`, started in order, each awaited until it listens, and all stopped (SIGTERM, then
//! SIGKILL after a grace period) on Ctrl-C or when any of them dies.
//!
//! The binaries are looked up beside `meshctl` itself (`cargo build --release` puts them all in
//! `target/release/`).

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use clap::Args;
use nix::{sys::signal, unistd::Pid};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    time::Instant,
};

use mesh_runtime::shutdown_signal;

use super::CliError;

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Where the mesh keeps its state and logs.
    #[arg(long, env = "MESH_UP_DIR", default_value = ".mesh")]
    pub dir: PathBuf,
    /// Control-plane gRPC address.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub grpc_addr: String,
    /// Control-plane admin HTTP address.
    #[arg(long, default_value = "127.0.0.1:7071")]
    pub admin_addr: String,
    /// How long each process may take to start listening.
    #[arg(long, default_value = "30s", value_parser = mesh_runtime::parse_duration)]
    pub start_timeout: Duration,
}

/// A started process of the local mesh.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

pub async fn run(args: UpArgs) -> Result<(), CliError> {
    let bin_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .ok_or_else(|| CliError::Input("cannot tell where meshctl is installed".into()))?;
    let logs = args.dir.join("logs");
    std::fs::create_dir_all(&logs)
        .map_err(|e| CliError::Input(format!("cannot create {}: {e}", logs.display())))?;

    let mut procs: Vec<Proc> = Vec::new();
    let started = start(
        &bin_dir,
        "control-plane",
        &[
            "--grpc-addr",
            &args.grpc_addr,
            "--admin-addr",
            &args.admin_addr,
            "--data-dir",
            &args.dir.join("control-plane").display().to_string(),
        ],
        &logs,
        args.start_timeout,
    )
    .await;
    let listening = match started {
        Ok((proc, listening)) => {
            procs.push(proc);
            listening
        }
        Err(e) => {
            stop_all(procs).await;
            return Err(e);
        }
    };
    let grpc = listening.get("grpc").and_then(Value::as_str).unwrap_or_default().to_string();
    let admin = listening.get("admin").and_then(Value::as_str).unwrap_or_default().to_string();

    out!();
    out!("Opinion Market Mesh is up. Ctrl-C stops it.");
    super::print_table(
        &["PROCESS", "LISTENS ON", "WHAT"],
        vec![
            vec![
                "control-plane".into(),
                format!("http://{grpc}"),
                "gRPC: registry, discovery, policy, admin".into(),
            ],
            vec!["".into(), format!("http://{admin}/metrics"), "Prometheus metrics (and /healthz)".into()],
        ],
    );
    out!();
    out!("state: {}   logs: {}", args.dir.display(), logs.display());
    out!("try:   meshctl --control-plane http://{grpc} overview");
    out!();

    let reason = tokio::select! {
        sig = shutdown_signal() => format!("{sig} received"),
        name = first_exit(&mut procs) => format!("{name} exited unexpectedly (see its log)"),
    };
    out!("stopping the mesh: {reason}");
    stop_all(procs).await;
    out!("stopped");
    Ok(())
}

/// Starts `name` from `bin_dir` with its stderr in `logs/<name>.log`, and waits for the JSON
/// `listening` line on its stdout.
async fn start(
    bin_dir: &Path,
    name: &str,
    args: &[&str],
    logs: &Path,
    timeout: Duration,
) -> Result<(Proc, Value), CliError> {
    let bin = bin_dir.join(name);
    if !bin.exists() {
        return Err(CliError::Input(format!(
            "{} not found: build every binary first with `cargo build --release`",
            bin.display()
        )));
    }
    let log = logs.join(format!("{name}.log"));
    let log_file = std::fs::File::create(&log)
        .map_err(|e| CliError::Input(format!("cannot create {}: {e}", log.display())))?;
    eprint!("starting {name} … ");
    let t0 = Instant::now();
    let mut child = Command::new(&bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log_file))
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| CliError::Input(format!("cannot start {}: {e}", bin.display())))?;
    let stdout = child.stdout.take().ok_or_else(|| CliError::Input(format!("{name}: no stdout")))?;
    let mut lines = BufReader::new(stdout).lines();
    let wait = async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && v.get("event").and_then(Value::as_str) == Some("listening")
            {
                return Some(v);
            }
        }
        None
    };
    match tokio::time::timeout(timeout, wait).await {
        Ok(Some(v)) => {
            eprintln!("ok ({} ms)", t0.elapsed().as_millis());
            // Keep draining stdout so the child never blocks on a full pipe.
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            Ok((Proc { name: name.into(), child, log }, v))
        }
        outcome => {
            eprintln!("failed");
            let _ = child.start_kill();
            let _ = child.wait().await;
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let last = tail.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("(no output)");
            let why =
                if outcome.is_err() { format!("did not listen within {timeout:?}") } else { "exited".into() };
            Err(CliError::Input(format!("{name} {why}: {last} (full log: {})", log.display())))
        }
    }
}

async fn first_exit(procs: &mut [Proc]) -> String {
    let waits = procs.iter_mut().map(|p| {
        Box::pin(async move {
            let _ = p.child.wait().await;
            p.name.clone()
        })
    });
    futures::future::select_all(waits).await.0
}

/// SIGTERM to all in reverse start order, then SIGKILL whoever is still running after 10 s.
async fn stop_all(mut procs: Vec<Proc>) {
    procs.reverse();
    for p in &procs {
        if let Some(pid) = p.child.id() {
            let _ = signal::kill(Pid::from_raw(pid as i32), signal::Signal::SIGTERM);
        }
    }
    for p in &mut procs {
        match tokio::time::timeout(Duration::from_secs(10), p.child.wait()).await {
            Ok(_) => eprintln!("  {} stopped", p.name),
            Err(_) => {
                eprintln!("  {} did not stop within 10 s: killing it (log: {})", p.name, p.log.display());
                let _ = p.child.kill().await;
            }
        }
    }
}
