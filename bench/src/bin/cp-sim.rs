//! `cp-sim`: a sidecar simulator for the control-plane benchmark.
//!
//! It starts the real `control-plane` binary (optionally pinned to one CPU), then, over real
//! gRPC on loopback:
//! 1. registers `--instances` instances and reports registration rate and RSS per instance;
//! 2. drives heartbeat streams flat out and reports heartbeats per second of control-plane CPU;
//! 3. opens `--streams` simulated sidecars, each with a discovery watch and a policy stream
//!    (ACKing every push), and reports RSS per stream;
//! 4. changes the policy `--rounds` times and reports, per round, the time from the `Set` call
//!    to each sidecar's receipt of the new version (every receipt is ACKed at once): p50, p99
//!    and the last;
//! 5. registers one more endpoint and reports the same for discovery;
//! 6. has every sidecar (of `--services` services) send an observed-topology report of
//!    `--report-edges` edges, `--report-rounds` times a second apart, and reports the control
//!    plane's CPU per round — its share of a core when the proxies report every 10 s.
//!
//! Figures go to stdout as one JSON object (and a readable summary on stderr).

// Benchmarks time real work with the wall clock and spawn plain load generators.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::{
    path::PathBuf,
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::Parser;
use futures::StreamExt;
use mesh_proto::dial::{AdminChannel as Channel, admin_channel};
use mesh_proto::{
    policy::ServicePolicy,
    v1::{
        self, discovery_client::DiscoveryClient, policy_client::PolicyClient, policy_stream_request::Kind,
        registry_client::RegistryClient,
    },
};
use serde_json::json;
use tokio::{io::AsyncBufReadExt, sync::mpsc};
use tokio_stream::wrappers::ReceiverStream;

#[derive(Debug, Parser)]
#[command(about = "Control-plane benchmark: a simulator of many sidecars over real gRPC")]
struct Args {
    /// The control-plane binary (default: beside cp-sim).
    #[arg(long)]
    control_plane_bin: Option<PathBuf>,
    /// Pin the control plane to this CPU (taskset).
    #[arg(long)]
    cp_cpu: Option<u32>,
    /// Simulated sidecars (each: one discovery watch + one policy stream).
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    /// HTTP/2 connections the simulated sidecars share.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Policy changes to time.
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Instances to register (memory per instance).
    #[arg(long, default_value_t = 10_000)]
    instances: usize,
    /// Heartbeat streams driven during the heartbeat phase.
    #[arg(long, default_value_t = 64)]
    heartbeat_streams: usize,
    /// Seconds of heartbeat load.
    #[arg(long, default_value_t = 5)]
    heartbeat_secs: u64,
    /// Run the control plane with its default TLS API (the simulator authenticates with the
    /// admin token over TLS); without it, `--insecure-api` (plaintext).
    #[arg(long)]
    tls: bool,
    /// Services the simulated sidecars belong to (topology phase).
    #[arg(long, default_value_t = 100)]
    services: usize,
    /// Edges in each sidecar's topology report.
    #[arg(long, default_value_t = 5)]
    report_edges: usize,
    /// Topology reports per sidecar (a second apart).
    #[arg(long, default_value_t = 10)]
    report_rounds: u64,
    /// Control-plane replicas on etcd (`--store etcd`; needs --etcd-endpoints and --nats-url);
    /// 0: one control plane on its embedded store. The simulated sidecars spread over the
    /// replicas and, after the policy rounds, the first replica is SIGKILLed and the time until
    /// each of its sidecars is served by another is measured.
    #[arg(long, default_value_t = 0)]
    replicas: usize,
    #[arg(long, default_value = "http://127.0.0.1:2379")]
    etcd_endpoints: String,
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
}

struct Cp {
    child: tokio::process::Child,
    pid: u32,
    url: String,
    dir: tempfile::TempDir,
}

impl Cp {
    /// One control plane; with `shared` (replica number, directory with the seal key), a
    /// replica on etcd.
    async fn start(args: &Args, shared: Option<(usize, &std::path::Path)>) -> anyhow::Result<Cp> {
        let bin = match &args.control_plane_bin {
            Some(b) => b.clone(),
            None => std::env::current_exe()?.parent().context("exe dir")?.join("control-plane"),
        };
        let dir = tempfile::tempdir()?;
        let mut cmd = match args.cp_cpu {
            Some(cpu) => {
                let mut c = tokio::process::Command::new("taskset");
                c.arg("-c").arg(cpu.to_string()).arg(&bin);
                c
            }
            None => tokio::process::Command::new(&bin),
        };
        let mut child = cmd
            .args(if args.tls { None } else { Some("--insecure-api") })
            .args([
                "--grpc-addr",
                "127.0.0.1:0",
                "--admin-addr",
                "127.0.0.1:0",
                "--log",
                "warn",
                "--data-dir",
            ])
            .arg(dir.path())
            .args(
                shared
                    .map(|(r, seal)| {
                        [
                            "--store".to_string(),
                            "etcd".into(),
                            "--etcd-endpoints".into(),
                            args.etcd_endpoints.clone(),
                            "--bus".into(),
                            "nats".into(),
                            "--nats-url".into(),
                            args.nats_url.clone(),
                            "--ca-seal-key-file".into(),
                            seal.join("seal.key").display().to_string(),
                            "--replica".into(),
                            format!("sim-{r}"),
                            "--etcd-prefix".into(),
                            format!("/cp-sim-{}-{}", std::process::id(), STARTS.load(Ordering::Relaxed)),
                        ]
                    })
                    .into_iter()
                    .flatten(),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id().context("pid")?;
        let mut lines = tokio::io::BufReader::new(child.stdout.take().context("stdout")?).lines();
        let line = lines.next_line().await?.context("control plane exited before listening")?;
        let v: serde_json::Value = serde_json::from_str(&line)?;
        let scheme = if args.tls { "https" } else { "http" };
        let url = format!("{scheme}://{}", v["grpc"].as_str().context("grpc address")?);
        Ok(Cp { child, pid, url, dir })
    }

    /// Resident set size in bytes.
    fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    }

    /// User + system CPU time consumed so far.
    fn cpu(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap_or_default();
        // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
        // `rest` starts at field 3 (state), so utime (14) and stime (15) are at 11 and 12.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let field = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
        let ticks = field(11) + field(12);
        Duration::from_millis(ticks * 1000 / clk_tck())
    }
}

/// How many times the control planes were started (each start gets its own etcd prefix).
static STARTS: AtomicUsize = AtomicUsize::new(0);

/// The control planes under test: one, or the replicas on etcd.
struct Cps {
    all: Vec<Cp>,
    /// The seal key the replicas share.
    _seal: tempfile::TempDir,
}

impl Cps {
    async fn start(args: &Args) -> anyhow::Result<Cps> {
        let seal = tempfile::tempdir()?;
        if args.replicas == 0 {
            return Ok(Cps { all: vec![Cp::start(args, None).await?], _seal: seal });
        }
        std::fs::write(seal.path().join("seal.key"), mesh_runtime::random_token().context("randomness")?)?;
        STARTS.fetch_add(1, Ordering::Relaxed);
        let mut all = Vec::new();
        for r in 0..args.replicas {
            all.push(Cp::start(args, Some((r, seal.path()))).await?);
        }
        Ok(Cps { all, _seal: seal })
    }

    fn rss(&self) -> u64 {
        self.all.iter().map(Cp::rss).sum()
    }

    fn cpu(&self) -> Duration {
        self.all.iter().map(Cp::cpu).sum()
    }

    async fn kill(&mut self) {
        for cp in &mut self.all {
            cp.child.kill().await.ok();
        }
    }
}

fn clk_tck() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100)
}

/// `n` connections as meshctl makes them: TLS trusting the mesh root and carrying the admin
/// token when the control plane serves TLS, plaintext otherwise.
/// Channel `i` goes to replica `i % replicas`.
async fn channels(cps: &Cps, n: usize) -> anyhow::Result<Vec<Channel>> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let cp = &cps.all[i % cps.all.len()];
        let ca = std::fs::read_to_string(cp.dir.path().join("ca.pem")).ok();
        let token = std::fs::read_to_string(cp.dir.path().join("admin.token")).ok();
        out.push(admin_channel(&cp.url, ca.as_deref(), token.as_deref()).await?);
    }
    Ok(out)
}

async fn settle(cp: &Cps) -> u64 {
    tokio::time::sleep(Duration::from_millis(500)).await;
    cp.rss()
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Milliseconds from `t0` to each receipt, sorted.
fn spread(t0: Instant, got: &[Instant]) -> Vec<f64> {
    let mut v: Vec<f64> = got.iter().map(|t| t.duration_since(t0).as_secs_f64() * 1000.0).collect();
    v.sort_by(f64::total_cmp);
    v
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cp = Cps::start(&args).await?;
    let idle_rss = settle(&cp).await;
    for c in &cp.all {
        eprintln!("control plane pid {} at {}", c.pid, c.url);
    }
    eprintln!("idle RSS {:.1} MB", idle_rss as f64 / 1e6);
    let chans = channels(&cp, args.connections).await?;

    // 1. Registrations.
    let t = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for w in 0..256 {
        let (next, ch, total) = (next.clone(), chans[w % chans.len()].clone(), args.instances);
        tasks.push(tokio::spawn(async move {
            let mut reg = RegistryClient::new(ch);
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    return Ok::<_, tonic::Status>(());
                }
                let inst = v1::Instance {
                    service: format!("svc-{}", n / 100),
                    id: format!("i-{n}"),
                    address: format!("10.0.{}.{}:4143", (n / 250) % 250, n % 250 + 1),
                    zone: "z1".into(),
                    version: "1.0.0".into(),
                    metadata: [("team".to_string(), "markets".to_string())].into(),
                    ..Default::default()
                };
                reg.register(v1::RegisterRequest { instance: Some(inst) }).await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let reg_secs = t.elapsed().as_secs_f64();
    let rss_instances = settle(&cp).await;
    let per_instance = rss_instances.saturating_sub(idle_rss) as f64 / args.instances.max(1) as f64;
    eprintln!(
        "registered {} instances in {reg_secs:.2}s ({:.0}/s, group-committed); {:.0} bytes RSS per instance",
        args.instances,
        args.instances as f64 / reg_secs,
        per_instance
    );

    // 2. Heartbeats, flat out, pipelined.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let mut hb_tasks = Vec::new();
    for s in 0..args.heartbeat_streams {
        let (ch, stop, answered) = (chans[s % chans.len()].clone(), stop.clone(), answered.clone());
        let n_inst = args.instances.max(1);
        hb_tasks.push(tokio::spawn(async move {
            let (tx, rx) = mpsc::channel::<v1::HeartbeatRequest>(256);
            let mut resp = RegistryClient::new(ch).heartbeat(ReceiverStream::new(rx)).await?.into_inner();
            let sender = tokio::spawn({
                let stop = stop.clone();
                async move {
                    let mut n = s;
                    while !stop.load(Ordering::Relaxed) {
                        let i = n % n_inst;
                        let hb = v1::HeartbeatRequest {
                            service: format!("svc-{}", i / 100),
                            instance_id: format!("i-{i}"),
                            health: v1::HealthStatus::Healthy.into(),
                            load: 1,
                        };
                        if tx.send(hb).await.is_err() {
                            return;
                        }
                        n += 64;
                    }
                }
            });
            while let Some(r) = resp.next().await {
                r?;
                answered.fetch_add(1, Ordering::Relaxed);
                if stop.load(Ordering::Relaxed) {
                    break;
                }
            }
            sender.abort();
            Ok::<_, tonic::Status>(())
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await; // warm up
    let mut stats = v1::admin_client::AdminClient::new(chans[0].clone());
    let server_count = |s: tonic::Response<v1::StatsResponse>| s.into_inner().heartbeats_total;
    let s0 = server_count(stats.stats(v1::StatsRequest {}).await?);
    let (a0, c0, t0) = (answered.load(Ordering::Relaxed), cp.cpu(), Instant::now());
    tokio::time::sleep(Duration::from_secs(args.heartbeat_secs)).await;
    let (a1, c1, wall) = (answered.load(Ordering::Relaxed), cp.cpu(), t0.elapsed());
    let s1 = server_count(stats.stats(v1::StatsRequest {}).await?);
    stop.store(true, Ordering::Relaxed);
    for t in hb_tasks {
        t.abort();
    }
    let hb_count = a1 - a0;
    let hb_cpu = (c1 - c0).as_secs_f64();
    let hb_per_sec = hb_count as f64 / wall.as_secs_f64();
    let hb_per_cpu_sec = hb_count as f64 / hb_cpu.max(1e-9);
    eprintln!(
        "heartbeats: {hb_per_sec:.0}/s answered (server counted {} in the same window), control plane used {hb_cpu:.2} CPU-s → {hb_per_cpu_sec:.0} per CPU-second",
        s1 - s0
    );
    drop(chans);
    let mut cp = cp;
    cp.kill().await;

    // A fresh control plane for the stream phases, so memory freed by the phases above and
    // kept by the allocator cannot hide what the streams cost.
    let mut cp = Cps::start(&args).await?;
    let chans = channels(&cp, args.connections).await?;

    // 3. Streams.
    let before_streams = settle(&cp).await;
    let target = "bench-target";
    let policy_got: Receipts<u64> = Arc::default();
    let discovery_got: Receipts<usize> = Arc::default();
    let failover_got: Receipts<usize> = Arc::default();
    let ready = Arc::new(AtomicUsize::new(0));
    let (report_tx, report_rx) = tokio::sync::watch::channel(0u64);
    let mut sidecars = Vec::with_capacity(args.streams);
    for s in 0..args.streams {
        let chans = chans.clone();
        let (policy_got, discovery_got, ready, failover_got) =
            (policy_got.clone(), discovery_got.clone(), ready.clone(), failover_got.clone());
        let report = Report {
            rx: report_rx.clone(),
            service: format!("sim-{}", s % args.services.max(1)),
            edges: args.report_edges,
        };
        sidecars.push(tokio::spawn(sidecar(
            s,
            chans,
            target,
            Receivers { policy_got, discovery_got, ready, report, failover_got },
        )));
    }
    while ready.load(Ordering::Relaxed) < args.streams {
        if let Some(t) = sidecars.iter().find(|t| t.is_finished()) {
            bail!("a simulated sidecar failed early: {t:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let with_streams = settle(&cp).await;
    let per_stream = with_streams.saturating_sub(before_streams) as f64 / (2 * args.streams) as f64;
    eprintln!(
        "{} sidecars connected ({} streams over {} connections); {:.0} bytes RSS per stream",
        args.streams,
        2 * args.streams,
        args.connections,
        per_stream
    );

    // 4. Policy propagation.
    let mut admin = PolicyClient::new(chans[0].clone());
    let mut rounds = Vec::new();
    for r in 0..args.rounds {
        let mut p = ServicePolicy::default();
        p.retry.max_attempts = (r % 9 + 1) as u32;
        policy_got.lock().unwrap().clear();
        let t0 = Instant::now();
        let set = admin
            .set(v1::SetPolicyRequest {
                service: target.into(),
                policy: Some((&p).into()),
                ..Default::default()
            })
            .await?
            .into_inner();
        let version = set.policy.context("policy")?.version;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let n = policy_got.lock().unwrap().iter().filter(|(v, _)| *v == version).count();
            if n >= args.streams {
                break;
            }
            if Instant::now() > deadline {
                bail!("round {r}: only {n} of {} sidecars got version {version}", args.streams);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let got: Vec<Instant> =
            policy_got.lock().unwrap().iter().filter(|(v, _)| *v == version).map(|(_, t)| *t).collect();
        let ms = spread(t0, &got);
        rounds.push((percentile(&ms, 0.5), percentile(&ms, 0.99), ms[ms.len() - 1]));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut p99s: Vec<f64> = rounds.iter().map(|r| r.1).collect();
    p99s.sort_by(f64::total_cmp);
    let worst_last = rounds.iter().map(|r| r.2).fold(0.0, f64::max);
    let median_p50 = {
        let mut v: Vec<f64> = rounds.iter().map(|r| r.0).collect();
        v.sort_by(f64::total_cmp);
        percentile(&v, 0.5)
    };
    eprintln!(
        "policy change → sidecar receipt+ACK over {} rounds: median p50 {median_p50:.1} ms, median p99 {:.1} ms, worst p99 {:.1} ms, worst last {worst_last:.1} ms",
        args.rounds,
        percentile(&p99s, 0.5),
        p99s[p99s.len() - 1]
    );

    // 5. Discovery propagation: one new endpoint.
    discovery_got.lock().unwrap().clear();
    let t0 = Instant::now();
    RegistryClient::new(chans[0].clone())
        .register(v1::RegisterRequest {
            instance: Some(v1::Instance {
                service: target.into(),
                id: "new".into(),
                address: "127.0.0.1:4143".into(),
                ..Default::default()
            }),
        })
        .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while discovery_got.lock().unwrap().len() < args.streams {
        if Instant::now() > deadline {
            bail!("discovery: not every watcher saw the new endpoint");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let got: Vec<Instant> = discovery_got.lock().unwrap().iter().map(|(_, t)| *t).collect();
    let disc = spread(t0, &got);
    eprintln!(
        "new endpoint → every watcher: p50 {:.1} ms, p99 {:.1} ms, last {:.1} ms (includes the fsync'd Register)",
        percentile(&disc, 0.5),
        percentile(&disc, 0.99),
        disc[disc.len() - 1]
    );

    // 6. Observed topology: every sidecar reports its edges once per round.
    let cpu0 = cp.cpu();
    let t0 = Instant::now();
    for r in 1..=args.report_rounds {
        report_tx.send_replace(r);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    if cp.all.len() > 1 {
        // Replicas relay their reports to each other through etcd (a batch per 500 ms): let the
        // last ones land, and count what applying them costs.
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let (cpu, wall) = (cp.cpu() - cpu0, t0.elapsed());
    let per_round = cpu.as_secs_f64() / args.report_rounds.max(1) as f64;
    let topo = v1::admin_client::AdminClient::new(chans[0].clone())
        .topology(v1::TopologyRequest {})
        .await?
        .into_inner();
    let reported: u64 =
        topo.edges.iter().map(|e| e.last_ten_minutes.as_ref().map_or(0, |w| w.requests)).sum();
    let expected = args.streams as u64 * args.report_edges as u64 * args.report_rounds * 100;
    eprintln!(
        "topology: {} sidecars × {} edges reported {} times: control plane CPU {:.1} ms per round ({:.2} % of a core at one round per 10 s; {:.1} % busy over the {:.0} s), {} edges, {reported} of {expected} requests summed",
        args.streams,
        args.report_edges,
        args.report_rounds,
        per_round * 1000.0,
        per_round / 10.0 * 100.0,
        cpu.as_secs_f64() / wall.as_secs_f64() * 100.0,
        wall.as_secs_f64(),
        topo.edges.len(),
    );

    let report = json!({
        "topology_cpu_ms_per_round": per_round * 1000.0,
        "topology_core_share_at_10s": per_round / 10.0,
        "topology_edges": topo.edges.len(),
        "topology_requests_summed": reported,
        "topology_requests_expected": expected,
        "streams": args.streams, "connections": args.connections, "instances": args.instances,
        "idle_rss_bytes": idle_rss,
        "registrations_per_sec": args.instances as f64 / reg_secs,
        "rss_bytes_per_instance": per_instance,
        "heartbeats_per_sec_wall": hb_per_sec,
        "heartbeats_per_cpu_sec": hb_per_cpu_sec,
        "rss_bytes_per_stream": per_stream,
        "policy_rounds": rounds.iter().map(|r| json!({"p50_ms": r.0, "p99_ms": r.1, "last_ms": r.2})).collect::<Vec<_>>(),
        "policy_p99_ms_median": percentile(&p99s, 0.5),
        "policy_p99_ms_worst": p99s[p99s.len() - 1],
        "policy_last_ms_worst": worst_last,
        "discovery_p50_ms": percentile(&disc, 0.5),
        "discovery_p99_ms": percentile(&disc, 0.99),
        "discovery_last_ms": disc[disc.len() - 1],
    });
    // 7. Failover: the first replica dies; each of its sidecars reconnects to the next.
    let mut report = report;
    if cp.all.len() > 1 {
        // From a steady state: nothing left over from the phases above.
        tokio::time::sleep(Duration::from_secs(2)).await;
        failover_got.lock().unwrap().clear();
        let moving = (0..args.streams).filter(|s| (s % args.connections) % cp.all.len() == 0).count();
        let t0 = Instant::now();
        cp.all[0].child.kill().await.ok();
        let deadline = Instant::now() + Duration::from_secs(60);
        while failover_got.lock().unwrap().len() < moving {
            if Instant::now() > deadline {
                bail!("failover: {} of {moving} sidecars served again", failover_got.lock().unwrap().len());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let got: Vec<Instant> = failover_got.lock().unwrap().iter().map(|(_, t)| *t).collect();
        let ms = spread(t0, &got);
        eprintln!(
            "failover: replica 0 SIGKILLed; its {moving} sidecars served by another replica after p50 {:.0} ms, p99 {:.0} ms, last {:.0} ms (reconnect backoff 100-200 ms included)",
            percentile(&ms, 0.5),
            percentile(&ms, 0.99),
            ms[ms.len() - 1]
        );
        report["replicas"] = json!(cp.all.len());
        report["failover_sidecars"] = json!(moving);
        report["failover_p50_ms"] = json!(percentile(&ms, 0.5));
        report["failover_p99_ms"] = json!(percentile(&ms, 0.99));
        report["failover_last_ms"] = json!(ms[ms.len() - 1]);
    }
    println!("{report}");
    for s in sidecars {
        s.abort();
    }
    cp.kill().await;
    Ok(())
}

type Receipts<T> = Arc<Mutex<Vec<(T, Instant)>>>;

/// When to send a topology report (each new round number), as which service, with how many edges.
struct Report {
    rx: tokio::sync::watch::Receiver<u64>,
    service: String,
    edges: usize,
}

/// What a simulated sidecar records, and when it reports its edges.
struct Receivers {
    policy_got: Receipts<u64>,
    discovery_got: Receipts<usize>,
    ready: Arc<AtomicUsize>,
    report: Report,
    /// When a sidecar whose replica died got its first push from another.
    failover_got: Receipts<usize>,
}

/// A report of `edges` edges, 100 requests each (97 successes, spread over the buckets).
fn edge_report(caller: &str, edges: usize) -> v1::PolicyStreamRequest {
    let edges = (0..edges)
        .map(|e| {
            let mut latency_buckets = vec![0; mesh_proto::topology::EDGE_BUCKETS];
            latency_buckets[e % 8] = 60;
            latency_buckets[e % 8 + 1] = 40;
            v1::EdgeDelta {
                caller: caller.into(),
                callee: format!("callee-{e}"),
                requests: 100,
                successes: 97,
                latency_buckets,
                cached: 10,
                limited: 0,
                open_breakers: 0,
                route: String::new(),
                node: String::new(),
            }
        })
        .collect();
    v1::PolicyStreamRequest { kind: Some(Kind::Edges(v1::EdgeReport { edges })) }
}

/// One simulated sidecar: a discovery watch and a policy stream that ACKs every push, both
/// timestamping what they receive. It starts on channel `s % chans.len()`; when its streams
/// break (its replica died) it moves to the next channel after 100-200 ms, as a sidecar's
/// backoff would, and notes when the new replica's first push arrived.
async fn sidecar(s: usize, chans: Vec<Channel>, target: &'static str, r: Receivers) -> anyhow::Result<()> {
    let Receivers { policy_got, discovery_got, ready, mut report, failover_got } = r;
    let mut at = s % chans.len();
    let mut first_session = true;
    loop {
        let ch = chans[at].clone();
        let session = async {
            let mut watch = DiscoveryClient::new(ch.clone())
                .watch(v1::WatchRequest { services: vec![target.into()], node_id: format!("sim-{s}") })
                .await?
                .into_inner();
            watch.next().await.transpose()?;
            let (tx, rx) = mpsc::channel(8);
            let subscribe = v1::PolicySubscribe {
                node_id: format!("sim-{s}"),
                service: report.service.clone(),
                services: vec![target.into()],
            };
            tx.send(v1::PolicyStreamRequest { kind: Some(Kind::Subscribe(subscribe)) }).await?;
            let mut pushes = PolicyClient::new(ch).stream(ReceiverStream::new(rx)).await?.into_inner();
            let first = pushes.next().await.transpose()?.context("first push")?;
            tx.send(ack(&first)).await?;
            if first_session {
                ready.fetch_add(1, Ordering::Relaxed);
            } else {
                failover_got.lock().unwrap().push((s, Instant::now()));
            }
            loop {
                tokio::select! {
                    r = report.rx.changed() => {
                        if r.is_err() {
                            return Ok::<_, anyhow::Error>(());
                        }
                        tx.send(edge_report(&report.service, report.edges)).await?;
                    }
                    p = pushes.next() => {
                        let Some(p) = p.transpose()? else { return Ok(()) };
                        let now = Instant::now();
                        tx.send(ack(&p)).await?;
                        policy_got.lock().unwrap().push((p.version, now));
                    }
                    w = watch.next() => {
                        let Some(w) = w.transpose()? else { return Ok(()) };
                        let now = Instant::now();
                        if let Some(s) = w.services.first() {
                            discovery_got.lock().unwrap().push((s.endpoints.len(), now));
                        }
                    }
                }
            }
        };
        let ended = session.await;
        if chans.len() < 2 {
            return ended;
        }
        first_session = false;
        at = (at + 1) % chans.len();
        tokio::time::sleep(Duration::from_millis(100 + (s as u64 * 7919) % 100)).await;
    }
}

fn ack(p: &v1::PolicyPush) -> v1::PolicyStreamRequest {
    v1::PolicyStreamRequest {
        kind: Some(Kind::Ack(v1::PolicyAck {
            service: p.service.clone(),
            version: p.version,
            nonce: p.nonce.clone(),
        })),
    }
}
