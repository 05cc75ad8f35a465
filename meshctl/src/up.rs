//! `meshctl up`: the local mesh on loopback as separate processes with embedded storage under
//! `./.mesh/`, started in order, each awaited until it listens, and all stopped (SIGTERM, then
//! SIGKILL after a grace period) on Ctrl-C.
//!
//! Supervision: a process that exits is reported (name, PID, exit status) and started again
//! on the addresses it had, after a backoff that doubles with each quick failure; the rest of
//! the mesh keeps serving meanwhile. After `--give-up-after` consecutive quick failures (runs
//! shorter than [`QUICK`]) of one process, meshctl stops the mesh and exits non-zero. Logs in
//! `<dir>/logs/` are appended to, so a restart keeps the history.
//!
//! The binaries are looked up beside `meshctl` itself (`cargo build --release` puts them all in
//! `target/release/`).

use crate::{
    args::{Output, UpArgs, UpStore},
    commands::identity,
    connect::{self, Target},
    error::CliError,
    output,
};

use mesh_runtime::shutdown_signal;
use nix::{sys::signal, unistd::Pid};
use serde_json::{Value, json};
use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    time::Instant,
};

/// A run shorter than this counts as a quick failure.
pub const QUICK: Duration = Duration::from_secs(10);

/// A started process of the local mesh.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    bin: String,
    /// The arguments to start it again with: addresses it chose (port 0) are pinned to what it
    /// got, so its peers still find it.
    args: Vec<String>,
    started: Instant,
    /// Consecutive quick failures.
    quick_failures: u32,
    /// How to tell it is up (again, after a restart).
    ready: Ready,
}

/// How a started process says it is up.
#[derive(Debug, Clone)]
enum Ready {
    /// Ours: a JSON `listening` line on stdout.
    Listening,
    /// A server of its own (etcd, nats-server): its port accepts connections.
    Accepts(String),
}

/// The processes started so far; stopped together.
struct Mesh {
    bin_dir: PathBuf,
    logs: PathBuf,
    timeout: Duration,
    procs: Vec<Proc>,
    rows: Vec<Vec<String>>,
    json: bool,
    /// Every process writes its log (in `logs/`) in this format.
    log_format: mesh_runtime::LogFormat,
}

impl Mesh {
    /// Starts `bin` as `label` and returns its `listening` line; on failure stops everything.
    async fn launch(&mut self, label: &str, bin: &str, args: &[String]) -> Result<Value, CliError> {
        let args = [args, &["--log-format".to_string(), self.log_format.to_string()]].concat();
        self.launch_as(label, bin, &args, Ready::Listening).await
    }

    /// Starts a server that is not ours (`program`: its full path) and waits until `addr`
    /// accepts connections.
    async fn launch_server(
        &mut self,
        label: &str,
        program: &Path,
        args: &[String],
        addr: &str,
    ) -> Result<(), CliError> {
        self.launch_as(label, &program.display().to_string(), args, Ready::Accepts(addr.to_string()))
            .await
            .map(drop)
    }

    async fn launch_as(
        &mut self,
        label: &str,
        bin: &str,
        args: &[String],
        ready: Ready,
    ) -> Result<Value, CliError> {
        match start(&self.bin_dir, label, bin, args, &self.logs, self.timeout, &ready).await {
            Ok((proc, listening)) => {
                self.procs.push(proc);
                Ok(listening)
            }
            Err(e) => {
                stop_all(std::mem::take(&mut self.procs)).await;
                Err(e)
            }
        }
    }

    /// A row of the table; a named process is shown with the PID of the process started
    /// `back` launches ago (0: the last one).
    fn row(&mut self, process: &str, at: String, what: &str) {
        self.row_of(process, 0, at, what)
    }

    fn row_of(&mut self, process: &str, back: usize, at: String, what: &str) {
        let pid = self.procs.iter().rev().nth(back).and_then(|p| p.child.id());
        let pid = pid.filter(|_| !process.is_empty()).map(|p| p.to_string()).unwrap_or_default();
        self.rows.push(vec![process.to_string(), pid, at, what.to_string()]);
    }

    /// Stops every process on a signal (Ctrl-C: a clean exit).
    async fn stop(&mut self, sig: &str) -> Result<(), CliError> {
        self.say(
            "stopping",
            json!({"reason": format!("{sig} received")}),
            format!("stopping the mesh: {sig} received"),
        );
        stop_all(std::mem::take(&mut self.procs)).await;
        self.say("stopped", json!({}), "stopped".into());
        Ok(())
    }

    /// Says what happened to a process: a line of text, or a JSON object with `-o json`.
    fn say(&self, event: &str, fields: Value, text: String) {
        if self.json {
            let mut v = json!({ "event": event });
            if let (Some(v), Value::Object(f)) = (v.as_object_mut(), fields) {
                v.extend(f);
            }
            out!("{v}");
        } else {
            out!("{text}");
        }
    }
}

/// `args` with every `FLAG 127.0.0.1:0` replaced by the address the process reported for it.
fn pinned(args: &[String], listening: &Value) -> Vec<String> {
    const KEYS: [(&str, &str); 5] = [
        ("--listen", "http"),
        ("--grpc-addr", "grpc"),
        ("--admin-addr", "admin"),
        ("--inbound-addr", "inbound"),
        ("--outbound-addr", "outbound"),
    ];
    let mut out = args.to_vec();
    for i in 1..out.len() {
        if let Some((_, key)) = KEYS.iter().find(|(flag, _)| *flag == out[i - 1])
            && out[i].ends_with(":0")
            && let Some(got) = listening.get(*key).and_then(Value::as_str)
        {
            // A URL (`https://…`) or a bare address, as the process printed it.
            out[i] = got.rsplit("//").next().unwrap_or(got).to_string();
        }
    }
    out
}

fn addr(v: &Value, key: &str) -> String {
    v.get(key).and_then(Value::as_str).unwrap_or_default().to_string()
}

/// `--store etcd`: the etcd cluster and NATS server the replicas share (started under --dir
/// unless given), and the seal key every replica reads; the control-plane flags that name them.
async fn shared_store(mesh: &mut Mesh, args: &UpArgs) -> Result<Vec<String>, CliError> {
    let seal = args.dir.join("seal.key");
    if !seal.exists() {
        let key = mesh_runtime::random_token()
            .ok_or_else(|| CliError::Input("the system's random number generator failed".into()))?;
        identity::write_secret(&seal, &key)?;
    }
    let etcd = if args.etcd_endpoints.is_empty() {
        let program = program("etcd", "install Debian's etcd-server, or give --etcd-endpoints")?;
        let (client, peer) = (free_port()?, free_port()?);
        let data = args.dir.join("etcd").display().to_string();
        let server_args = strings(&[
            "--name",
            "local",
            "--data-dir",
            &data,
            "--listen-client-urls",
            &format!("http://{client}"),
            "--advertise-client-urls",
            &format!("http://{client}"),
            "--listen-peer-urls",
            &format!("http://{peer}"),
            "--initial-advertise-peer-urls",
            &format!("http://{peer}"),
            "--initial-cluster",
            &format!("local=http://{peer}"),
        ]);
        mesh.launch_server("etcd", &program, &server_args, &client).await?;
        mesh.row("etcd", format!("http://{client}"), "the replicas' shared store (data in --dir/etcd)");
        format!("http://{client}")
    } else {
        args.etcd_endpoints.join(",")
    };
    let nats = match &args.nats_url {
        Some(url) => url.clone(),
        None => {
            let program = program("nats-server", "install Debian's nats-server, or give --nats-url")?;
            let port = free_port()?;
            let (host, port) = port.rsplit_once(':').unwrap_or(("127.0.0.1", "4222"));
            let store = args.dir.join("nats").display().to_string();
            let server_args = strings(&["-a", host, "-p", port, "-js", "-sd", &store]);
            mesh.launch_server("nats", &program, &server_args, &format!("{host}:{port}")).await?;
            mesh.row(
                "nats",
                format!("nats://{host}:{port}"),
                "the replicas' event bus (JetStream, in --dir/nats)",
            );
            format!("nats://{host}:{port}")
        }
    };
    Ok(strings(&[
        "--store",
        "etcd",
        "--etcd-endpoints",
        &etcd,
        "--bus",
        "nats",
        "--nats-url",
        &nats,
        "--ca-seal-key-file",
        &seal.display().to_string(),
    ]))
}

/// `name` on the PATH (or in /usr/sbin); `hint` says how to get it.
fn program(name: &str, hint: &str) -> Result<PathBuf, CliError> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/usr/bin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            CliError::Input(format!("--store etcd starts a local {name}, and none is installed: {hint}"))
        })
}

/// A loopback address nothing listens on now.
fn free_port() -> Result<String, CliError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.to_string())
        .map_err(|e| CliError::Input(format!("no free port on 127.0.0.1: {e}")))
}

/// Waits (up to `timeout`) until the gateway is ready and knows `instances` endpoints of
/// `service`, so the mesh is said to be up only once a request through the edge can be served.
/// Past the timeout it says what is missing and carries on: the gateway keeps trying.
async fn wait_routable(admin: &str, service: &str, instances: usize, timeout: Duration) {
    eprint!("waiting for the gateway to reach {service} … ");
    let t0 = Instant::now();
    let mut missing = String::new();
    while t0.elapsed() < timeout {
        missing = match routable(admin, service, instances).await {
            Ok(()) => {
                eprintln!("ok ({} ms)", t0.elapsed().as_millis());
                return;
            }
            Err(why) => why,
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("not yet: {missing}; requests may fail until it does (see the gateway's log)");
}

/// Whether the gateway at `admin` is ready with `instances` endpoints of `service`; else why not.
async fn routable(admin: &str, service: &str, instances: usize) -> Result<(), String> {
    use crate::commands::sidecar::admin_call;
    let (status, ready) = admin_call(admin, "GET", "/ready").await.map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("not ready: {}", ready["reasons"]));
    }
    let (_, config) = admin_call(admin, "GET", "/config").await.map_err(|e| e.to_string())?;
    let known = config["upstreams"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|u| u["service"] == service)
        .and_then(|u| u["endpoints"].as_array())
        .map_or(0, Vec::len);
    if known < instances {
        return Err(format!("it knows {known} of {instances} {service} instances"));
    }
    Ok(())
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

pub async fn run(args: UpArgs, output: Output, log_format: mesh_runtime::LogFormat) -> Result<(), CliError> {
    let bin_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .ok_or_else(|| CliError::Input("cannot tell where meshctl is installed".into()))?;
    let logs = args.dir.join("logs");
    std::fs::create_dir_all(&logs)
        .map_err(|e| CliError::Input(format!("cannot create {}: {e}", logs.display())))?;
    let dir = |sub: &str| args.dir.join(sub).display().to_string();
    // The market service's operator token: 256 random bits, owner-only, passed as a file.
    let market_token_file = args.dir.join("admin-token");
    let admin_token = mesh_runtime::random_token()
        .ok_or_else(|| CliError::Input("the system's random number generator failed".into()))?;
    identity::write_secret(&market_token_file, &admin_token)?;
    let mut mesh = Mesh {
        bin_dir,
        logs: logs.clone(),
        timeout: args.start_timeout,
        procs: Vec::new(),
        rows: Vec::new(),
        json: output == Output::Json,
        log_format,
    };

    // The control plane: one on its data dir, or --replicas on a shared etcd (and NATS).
    let shared = match args.store {
        UpStore::Embedded if args.replicas > 1 => {
            return Err(CliError::Input(
                "--replicas above 1 needs --store etcd: replicas share their state through etcd".into(),
            ));
        }
        UpStore::Embedded => vec![],
        UpStore::Etcd => shared_store(&mut mesh, &args).await?,
    };
    let mut cp_urls = Vec::new();
    let mut cp_admin = String::new();
    let mut others = Vec::new();
    for r in 1..=args.replicas {
        let (label, data) = if r == 1 {
            ("control-plane".to_string(), dir("control-plane"))
        } else {
            (format!("control-plane-{r}"), dir(&format!("control-plane-{r}")))
        };
        let (grpc_addr, admin_addr) = if r == 1 {
            (args.grpc_addr.as_str(), args.admin_addr.as_str())
        } else {
            ("127.0.0.1:0", "127.0.0.1:0")
        };
        let mut cp_args =
            strings(&["--grpc-addr", grpc_addr, "--admin-addr", admin_addr, "--data-dir", &data]);
        if !shared.is_empty() {
            cp_args.extend(shared.iter().cloned());
            cp_args.extend(strings(&["--replica", &label]));
        }
        let cp = mesh.launch(&label, "control-plane", &cp_args).await?;
        let (grpc, admin) = (addr(&cp, "grpc"), addr(&cp, "admin"));
        if r == 1 {
            cp_admin = admin.clone();
        } else {
            others.push((label, format!("https://{grpc}"), format!("replica {r}: admin http://{admin}/")));
        }
        cp_urls.push(format!("https://{grpc}"));
    }
    let cp_url = cp_urls[0].clone();
    // Each sidecar starts on the next replica and fails over to the others in turn.
    let mut spread = 0usize;
    let mut next_urls = || {
        let list: Vec<String> =
            (0..cp_urls.len()).map(|k| cp_urls[(spread + k) % cp_urls.len()].clone()).collect();
        spread += 1;
        list.join(",")
    };
    // The API is TLS from the mesh CA; sidecars trust its root, meshctl also sends the admin
    // token the control plane wrote into its data dir.
    let target = Target {
        url: cp_url.clone(),
        ca_file: args.dir.join("control-plane").join("ca.pem"),
        admin_token_file: args.dir.join("control-plane").join("admin.token"),
    };
    let ca_file = target.ca_file.display().to_string();
    let first_cp = usize::from(args.replicas) - 1; // launches since the first replica
    mesh.row_of(
        "control-plane",
        first_cp,
        cp_url.clone(),
        "gRPC over TLS: registry, discovery, policy, admin (meshctl)",
    );
    mesh.row(
        "",
        format!("http://{cp_admin}/metrics"),
        "Prometheus metrics, /healthz; the management API (JSON, admin token) under /api/v1",
    );
    mesh.row(
        "",
        format!("http://{cp_admin}/"),
        &format!("the live dashboard: sign in with the admin token ({})", target.admin_token_file.display()),
    );
    for (k, (label, url, what)) in others.into_iter().enumerate() {
        mesh.row_of(&label, first_cp - 1 - k, url, &what);
    }

    set_market_policy(&target).await?;
    // Mesh identity: a bootstrap token per service; every sidecar and the gateway get their
    // certificates from the control plane's CA and speak mutual TLS to each other.
    let token_file = |service: &str| args.dir.join("tokens").join(service).display().to_string();
    for service in ["market-service", "gateway"] {
        write_token(&target, service, Path::new(&token_file(service))).await?;
    }
    mesh.row(
        "",
        format!("{}", args.dir.join("tokens").display()),
        "bootstrap tokens: sidecars get mTLS certificates",
    );
    mesh.row(
        "",
        "policy market-service".into(),
        "gateway caches /markets/{id}, dropped by its market-events",
    );

    let db = format!("sqlite://{}", args.dir.join("market.db").display());
    for i in 1..=args.instances {
        let id = format!("market-service-{i}");
        // The app and its sidecar talk over Unix sockets only this user can open (mode 0600):
        // nobody else on the host reaches the app past its sidecar, or the mesh as the app.
        let socket = |name: &str| format!("unix:{}", args.dir.join("sockets").join(&id).join(name).display());
        let (app_socket, api_socket, outbound_socket) =
            (socket("app.sock"), socket("sidecar.sock"), socket("outbound.sock"));
        let app = mesh
            .launch(
                &id,
                "market-service",
                &strings(&[
                    "--listen",
                    &app_socket,
                    "--database-url",
                    &db,
                    "--admin-token-file",
                    &market_token_file.display().to_string(),
                    "--sidecar-admin",
                    &api_socket,
                    "--audit-key-file",
                    &args.dir.join("audit.key").display().to_string(),
                ]),
            )
            .await?;
        let app_addr = addr(&app, "http");
        let sidecar = mesh
            .launch(
                &format!("sidecar-{id}"),
                "sidecar",
                &strings(&[
                    "--service",
                    "market-service",
                    "--instance-id",
                    &id,
                    "--app-addr",
                    &app_addr,
                    "--control-plane",
                    &next_urls(),
                    "--control-plane-ca",
                    &ca_file,
                    "--inbound-addr",
                    "127.0.0.1:0",
                    "--outbound-addr",
                    &outbound_socket,
                    "--app-api-addr",
                    &api_socket,
                    "--admin-addr",
                    "127.0.0.1:0",
                    "--data-dir",
                    &dir(&format!("sidecar-{id}")),
                    "--drain-delay",
                    "500ms",
                    "--identity-token-file",
                    &token_file("market-service"),
                ]),
            )
            .await?;
        mesh.row_of(&id, 1, app_addr, "market service, on its Unix socket (reached through its sidecar)");
        mesh.row(&format!("  sidecar-{i}"), addr(&sidecar, "inbound"), "inbound from the mesh");
        mesh.row(
            "",
            format!("http://{}/config", addr(&sidecar, "admin")),
            "sidecar admin: /metrics /ready /config",
        );
    }

    // End users: the gateway trusts the development issuer's key set (`meshctl token issue`).
    let issuer = crate::issuer::Issuer::open(&args.dir.join("issuer"))?;
    let jwks_file = issuer.jwks_file.display().to_string();
    let gw = mesh
        .launch(
            "gateway",
            "sidecar",
            &strings(&[
                "--mode",
                "gateway",
                "--instance-id",
                "gateway",
                "--control-plane",
                &next_urls(),
                "--control-plane-ca",
                &ca_file,
                "--outbound-addr",
                &args.gateway_addr,
                "--admin-addr",
                "127.0.0.1:0",
                "--data-dir",
                &dir("gateway"),
                "--route",
                "/api/markets=market-service,/markets",
                "--route",
                "/api/accounts=market-service,/accounts",
                "--route",
                "/api/analytics=market-service,/analytics",
                "--identity-token-file",
                &token_file("gateway"),
                "--jwks-file",
                &jwks_file,
                "--jwt-issuer",
                crate::issuer::ISSUER,
                "--jwt-audience",
                crate::issuer::AUDIENCE,
                "--auth",
                "optional",
                "--access-log",
                &logs.join("gateway-access.log").display().to_string(),
            ]),
        )
        .await?;
    let public = addr(&gw, "outbound");
    wait_routable(&addr(&gw, "admin"), "market-service", args.instances, mesh.timeout).await;
    mesh.row(
        "gateway",
        format!("http://{public}/api/markets"),
        "the platform's edge: /api/markets, /api/accounts, /api/analytics",
    );
    mesh.row(
        "",
        format!("http://{}/config", addr(&gw, "admin")),
        "gateway admin: /config /metrics /gateway/blocks",
    );
    mesh.row("", logs.join("gateway-access.log").display().to_string(), "gateway access log (JSON lines)");

    if mesh.json {
        let rows: Vec<Value> = std::mem::take(&mut mesh.rows)
            .into_iter()
            .map(|r| json!({"process": r[0], "pid": r[1].parse::<u32>().ok(), "address": r[2], "what": r[3]}))
            .collect();
        mesh.say(
            "up",
            json!({"listeners": rows, "dir": args.dir, "logs": logs, "mesh_admin_token_file": target.admin_token_file,
                   "market_admin_token_file": market_token_file}),
            String::new(),
        );
        return supervise(mesh, args.restart_backoff, args.give_up_after).await;
    }
    out!();
    out!("Opinion Market Mesh is up. Ctrl-C stops it.");
    output::print_table(&["PROCESS", "PID", "LISTENS ON", "WHAT"], std::mem::take(&mut mesh.rows));
    out!();
    out!(
        "state: {}   logs: {}   mesh admin token: {}   market admin token: {}",
        args.dir.display(),
        logs.display(),
        target.admin_token_file.display(),
        args.dir.join("admin-token").display()
    );
    out!(
        "try:   meshctl --control-plane {cp_url} --ca-file {ca_file} --admin-token-file {} instances market-service",
        target.admin_token_file.display()
    );
    out!(
        "       ALICE=$(meshctl token issue --sub alice --dir {})   (an end-user token the gateway verifies; --admin for the admin role)",
        args.dir.display()
    );
    out!("       curl -s -XPOST http://{public}/api/accounts -H \"authorization: Bearer $ALICE\"");
    out!("       curl -s http://{public}/api/markets");
    out!();
    supervise(mesh, args.restart_backoff, args.give_up_after).await
}

/// Keeps the mesh running until Ctrl-C: a process that exits is reported and restarted with
/// backoff; one that keeps failing quickly stops the mesh with an error.
async fn supervise(mut mesh: Mesh, backoff: Duration, give_up_after: u32) -> Result<(), CliError> {
    let signal = shutdown_signal();
    tokio::pin!(signal);
    loop {
        let (i, status) = tokio::select! {
            sig = &mut signal => return mesh.stop(sig).await,
            exit = first_exit(&mut mesh.procs) => exit,
        };
        let p = &mut mesh.procs[i];
        let ran = p.started.elapsed();
        p.quick_failures = if ran < QUICK { p.quick_failures + 1 } else { 1 };
        let (name, failures, log) = (p.name.clone(), p.quick_failures, p.log.display().to_string());
        if failures >= give_up_after {
            let why = format!(
                "{name} failed {failures} times in a row, each within {QUICK:?} of starting ({status}); \
                 stopping the mesh — see {log}"
            );
            mesh.say(
                "giving_up",
                json!({"process": name, "failures": failures, "status": status, "log": log}),
                format!("error: {why}"),
            );
            stop_all(std::mem::take(&mut mesh.procs)).await;
            return Err(CliError::Input(why));
        }
        let delay = backoff.saturating_mul(1 << (failures - 1).min(6));
        mesh.say(
            "exited",
            json!({"process": name, "status": status, "ran_ms": ran.as_millis() as u64, "restart_in_ms": delay.as_millis() as u64, "log": log}),
            format!("{name} exited ({status}) after {ran:.1?}; the rest keeps serving; restarting it in {delay:?} (log: {log})"),
        );
        tokio::select! {
            sig = &mut signal => return mesh.stop(sig).await,
            _ = tokio::time::sleep(delay) => {}
        }
        let p = &mesh.procs[i];
        let (bin, args, ready) = (p.bin.clone(), p.args.clone(), p.ready.clone());
        match start(&mesh.bin_dir, &name, &bin, &args, &mesh.logs, mesh.timeout, &ready).await {
            Ok((mut fresh, _)) => {
                fresh.quick_failures = failures;
                let pid = fresh.child.id();
                mesh.say(
                    "restarted",
                    json!({"process": name, "pid": pid}),
                    format!("{name} restarted (pid {})", pid.unwrap_or(0)),
                );
                mesh.procs[i] = fresh;
            }
            // Still down: its old, exited child answers `first_exit` at once, which counts as
            // the next quick failure (dated from this attempt) and backs off further.
            Err(e) => {
                mesh.procs[i].started = Instant::now();
                mesh.say(
                    "restart_failed",
                    json!({"process": name, "error": e.to_string()}),
                    format!("{name} did not restart: {e}"),
                );
            }
        }
    }
}

/// A child's exit, as people read it.
fn describe(status: std::io::Result<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exit code {code}"),
            (None, Some(sig)) => format!(
                "killed by signal {sig}{}",
                signal::Signal::try_from(sig).map(|s| format!(" ({s})")).unwrap_or_default()
            ),
            _ => s.to_string(),
        },
        Err(e) => format!("status unknown: {e}"),
    }
}

/// The local mesh's policy for the market service: market pages are cached at the caller (the
/// gateway) for 30 s, and a market's entries are dropped as soon as its events reach the bus —
/// a trade is visible at once without giving up the cache. Set only when the service has no
/// policy yet, so an operator's own survives restarts.
async fn set_market_policy(cp: &Target) -> Result<(), CliError> {
    use mesh_proto::{
        policy::{CacheInvalidation, ServicePolicy},
        v1,
    };
    let mut client = v1::policy_client::PolicyClient::new(connect::connect(cp).await?);
    let existing = client.get(v1::GetPolicyRequest { service: "market-service".into() }).await;
    if existing.is_ok_and(|r| !r.into_inner().is_default) {
        return Ok(());
    }
    let mut p = ServicePolicy::default();
    p.cache.ttl = Duration::from_secs(30);
    p.cache.path_prefixes = vec!["/markets/".into()];
    p.cache.invalidate_on =
        vec![CacheInvalidation { topic: "market-events".into(), prefix: "/markets/{key}".into() }];
    client
        .set(v1::SetPolicyRequest {
            service: "market-service".into(),
            policy: Some((&p).into()),
            ..Default::default()
        })
        .await
        .map_err(|s| CliError::Refused(format!("setting the market-service policy: {}", s.message())))?;
    Ok(())
}

/// Creates a bootstrap token for `service` and writes it to `path` (owner-only).
async fn write_token(cp: &Target, service: &str, path: &Path) -> Result<(), CliError> {
    let mut ca = mesh_proto::v1::identity_client::IdentityClient::new(connect::connect(cp).await?);
    let token = ca
        .create_token(mesh_proto::v1::CreateTokenRequest { service: service.into() })
        .await
        .map_err(|s| CliError::Refused(format!("creating a token for {service}: {}", s.message())))?
        .into_inner()
        .token;
    identity::write_secret(path, &token)
}

/// Starts binary `bin` from `bin_dir` as `name`, with its stderr in `logs/<name>.log`, and
/// waits for the JSON `listening` line on its stdout.
async fn start(
    bin_dir: &Path,
    name: &str,
    bin_name: &str,
    args: &[String],
    logs: &Path,
    timeout: Duration,
    ready: &Ready,
) -> Result<(Proc, Value), CliError> {
    // An absolute `bin_name` (a server found on the PATH) replaces `bin_dir`.
    let bin = bin_dir.join(bin_name);
    if !bin.exists() {
        return Err(CliError::Input(format!(
            "{} not found: build every binary first with `cargo build --release`",
            bin.display()
        )));
    }
    let log = logs.join(format!("{name}.log"));
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(|e| CliError::Input(format!("cannot open {}: {e}", log.display())))?;
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
        match ready {
            Ready::Listening => {
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Ok(v) = serde_json::from_str::<Value>(&line)
                        && v.get("event").and_then(Value::as_str) == Some("listening")
                    {
                        return Some(v);
                    }
                }
                None
            }
            Ready::Accepts(addr) => loop {
                if tokio::net::TcpStream::connect(addr.as_str()).await.is_ok() {
                    return Some(json!({}));
                }
                if !matches!(child.try_wait(), Ok(None)) {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            },
        }
    };
    match tokio::time::timeout(timeout, wait).await {
        Ok(Some(v)) => {
            eprintln!("ok, pid {} ({} ms)", child.id().unwrap_or(0), t0.elapsed().as_millis());
            // Keep draining stdout so the child never blocks on a full pipe.
            mesh_runtime::spawn(tracing::debug_span!("drain_output"), async move {
                while let Ok(Some(_)) = lines.next_line().await {}
            });
            let proc = Proc {
                name: name.into(),
                child,
                log,
                bin: bin_name.into(),
                args: pinned(args, &v),
                started: Instant::now(),
                quick_failures: 0,
                ready: ready.clone(),
            };
            Ok((proc, v))
        }
        outcome => {
            eprintln!("failed");
            let _ = child.start_kill();
            let _ = child.wait().await;
            // The log is appended to: only this run's lines are its own, but the last line is.
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let last = tail.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("(no output)");
            let why =
                if outcome.is_err() { format!("did not listen within {timeout:?}") } else { "exited".into() };
            Err(CliError::Input(format!("{name} {why}: {last} (full log: {})", log.display())))
        }
    }
}

/// The first process to exit: its index and how it ended.
async fn first_exit(procs: &mut [Proc]) -> (usize, String) {
    let waits = procs
        .iter_mut()
        .enumerate()
        .map(|(i, p)| Box::pin(async move { (i, describe(p.child.wait().await)) }));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restart_keeps_the_addresses_the_process_chose() {
        let args = strings(&[
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            "sqlite://x:0",
            "--admin-addr",
            "127.0.0.1:7",
        ]);
        let listening = json!({"event": "listening", "http": "127.0.0.1:40001", "admin": "127.0.0.1:40002"});
        assert_eq!(
            pinned(&args, &listening),
            strings(&[
                "--listen",
                "127.0.0.1:40001",
                "--database-url",
                "sqlite://x:0",
                "--admin-addr",
                "127.0.0.1:7"
            ]),
            "only port-0 addresses of listener flags are pinned"
        );
        let cp = strings(&["--grpc-addr", "127.0.0.1:0"]);
        assert_eq!(
            pinned(&cp, &json!({"grpc": "https://127.0.0.1:40003"})),
            strings(&["--grpc-addr", "127.0.0.1:40003"])
        );
    }
}
