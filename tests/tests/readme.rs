//! Every command the README shows, run as a user would paste it (issue #15.12), so the README
//! cannot drift from the code.
//!
//! Each ```sh or ```console block in README.md carries a marker comment on the line before it:
//!
//! - `<!-- readme-test: up [expect="…"]… -->`: run in order against one `meshctl up` mesh, from
//!   the directory holding its `.mesh/`, with the binaries on `PATH` and `MESH_CONTROL_PLANE`,
//!   `GATEWAY_ADMIN` and `SIDECAR_ADMIN` set to what `meshctl up` printed; the
//!   gateway's and the control plane's admin listener's documented addresses are replaced by
//!   the ones they got (the test binds port 0). A
//!   block must exit 0 and print every `expect`. `console` blocks are `$ command` lines each
//!   followed by the output it must print.
//! - `<!-- readme-test: parts -->`: "running the parts yourself" in a fresh directory: every
//!   documented port is mapped to a free one on 127.0.0.1; servers run in the background until
//!   they print their `listening` line; then the gateway must route to the market service.
//! - `<!-- readme-test: skip: REASON -->`: not run here, for the reason given.
//!
//! A block with no marker fails the test.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    path::Path,
    process::Command,
    time::Duration,
};

use bytes::Bytes;
use mesh_testkit::{MeshctlUp, Process, WAIT, bin_dir, eventually, request};
use serde_json::Value;

#[derive(Debug)]
struct Block {
    line: usize,
    kind: String,
    console: bool,
    expect: Vec<String>,
    text: String,
}

/// The marked blocks of README.md, in order.
fn blocks() -> Vec<Block> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap();
    let lines: Vec<&str> = readme.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let fence = lines[i].trim();
        if fence == "```sh" || fence == "```console" {
            let marker = lines[..i]
                .last()
                .and_then(|l| l.trim().strip_prefix("<!-- readme-test:"))
                .and_then(|l| l.strip_suffix("-->"))
                .unwrap_or_else(|| panic!("README.md:{}: a {fence} block with no readme-test marker", i + 1))
                .trim();
            let end = i + 1 + lines[i + 1..].iter().position(|l| l.trim() == "```").expect("closing fence");
            let kind = marker.split([' ', ':']).next().unwrap().to_string();
            out.push(Block {
                line: i + 1,
                console: fence == "```console",
                expect: expects(marker),
                kind,
                text: lines[i + 1..end].join("\n"),
            });
            i = end;
        }
        i += 1;
    }
    out
}

/// The `expect="…"` values of a marker (`\"` stands for a quote).
fn expects(marker: &str) -> Vec<String> {
    marker
        .split("expect=\"")
        .skip(1)
        .map(|rest| {
            let mut value = String::new();
            let mut chars = rest.chars();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
            value
        })
        .collect()
}

/// Runs `script` in bash (errexit, pipefail) in `dir` with `env`; (success, stdout + stderr).
async fn bash(script: &str, dir: &Path, env: &BTreeMap<&str, String>) -> (bool, String) {
    let mut cmd = tokio::process::Command::new("bash");
    cmd.args(["-euo", "pipefail", "-c", script]).current_dir(dir).envs(env).kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("timed out after 60 s:\n{script}"))
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// `PATH` with the workspace's binaries first.
fn path() -> String {
    format!("{}:{}", bin_dir().display(), std::env::var("PATH").unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_readme_command_runs_as_written() {
    let blocks = blocks();
    assert!(blocks.iter().all(|b| ["up", "parts", "skip"].contains(&b.kind.as_str())), "{blocks:?}");
    assert!(blocks.iter().filter(|b| b.kind == "up").count() >= 5, "{blocks:?}");

    // One `meshctl up` for the blocks that need it.
    let dir = tempfile::tempdir().unwrap();
    let (_up, stdout) = MeshctlUp::start(&dir.path().join(".mesh"), &["-o", "json"], &[]);
    let mut first = String::new();
    BufReader::new(stdout).read_line(&mut first).unwrap();
    let ready: Value = serde_json::from_str(&first).unwrap_or_else(|e| panic!("{e}: {first}"));
    let rows = ready["listeners"].as_array().unwrap_or_else(|| panic!("{ready}"));
    let find = |what: &dyn Fn(&Value) -> bool| -> String {
        rows.iter()
            .find(|r| what(r))
            .and_then(|r| r["address"].as_str())
            .unwrap_or_else(|| panic!("{ready}"))
            .to_string()
    };
    let gateway = find(&|r| r["process"] == "gateway").trim_end_matches("/api/markets").to_string();
    let cp_admin = find(&|r| r["what"].as_str().is_some_and(|w| w.contains("/api/v1")))
        .trim_end_matches("/metrics")
        .to_string();
    let admin_url = |row: &str| find(&|r| r["what"].as_str().is_some_and(|w| w.starts_with(row)));
    let env: BTreeMap<&str, String> = [
        ("PATH", path()),
        ("MESH_CONTROL_PLANE", find(&|r| r["process"] == "control-plane")),
        ("GATEWAY_ADMIN", admin_url("gateway admin").trim_end_matches("/config").to_string()),
        ("SIDECAR_ADMIN", admin_url("sidecar admin").trim_end_matches("/config").to_string()),
    ]
    .into_iter()
    .collect();
    let gw: std::net::SocketAddr = gateway.trim_start_matches("http://").parse().unwrap();
    eventually(WAIT, "the gateway routes to the market service", || async {
        request(gw, "GET", "example.com", "/api/markets", &[], Bytes::new()).await.0 == 200
    })
    .await;

    for b in blocks.iter().filter(|b| b.kind == "up") {
        let text =
            b.text.replace("http://127.0.0.1:8080", &gateway).replace("http://127.0.0.1:7071", &cp_admin);
        if b.console {
            // `$ command` lines, each followed by the lines it must print.
            let mut steps: Vec<(String, Vec<String>)> = Vec::new();
            for l in text.lines() {
                match l.strip_prefix("$ ") {
                    Some(cmd) => steps.push((cmd.to_string(), Vec::new())),
                    None => steps.last_mut().expect("a console block starts with $").1.push(l.to_string()),
                }
            }
            for (cmd, want) in steps {
                let (_, got) = bash(&cmd, dir.path(), &env).await;
                assert_eq!(got.trim_end(), want.join("\n"), "README.md:{} `{cmd}`", b.line);
            }
            continue;
        }
        let (ok, got) = bash(&text, dir.path(), &env).await;
        assert!(ok, "README.md:{} failed:\n{text}\n--- output:\n{got}", b.line);
        for e in &b.expect {
            assert!(got.contains(e.as_str()), "README.md:{}: no {e:?} in the output:\n{got}", b.line);
        }
    }

    for b in blocks.iter().filter(|b| b.kind == "parts") {
        run_the_parts(b).await;
    }
}

/// The "running the parts yourself" block: documented ports mapped to free ones, servers in
/// the background (each awaited until it listens), then a request through the gateway.
async fn run_the_parts(b: &Block) {
    let dir = tempfile::tempdir().unwrap();
    // Join continued lines: one command per line.
    let joined = b.text.replace("\\\n", " ");
    let mut ports = BTreeMap::new();
    let mut text = joined.replace("0.0.0.0:", "127.0.0.1:");
    for word in joined.replace("0.0.0.0:", "127.0.0.1:").split(|c: char| c.is_whitespace() || c == '/') {
        if let Some(port) = word.strip_prefix("127.0.0.1:").and_then(|p| p.parse::<u16>().ok()) {
            ports.entry(port).or_insert_with(|| {
                std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
            });
        }
    }
    for (from, to) in &ports {
        text = text.replace(&format!("127.0.0.1:{from}"), &format!("127.0.0.1:{to}"));
    }
    let cp = format!("https://127.0.0.1:{}", ports[&7070]);
    let env: BTreeMap<&str, String> = [("PATH", path()), ("MESH_CONTROL_PLANE", cp)].into_iter().collect();
    let mut servers = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let program = line.split_whitespace().next().unwrap();
        if ["control-plane", "market-service", "sidecar"].contains(&program) {
            let mut cmd = Command::new("bash");
            cmd.args(["-c", &format!("exec {line}")]).current_dir(dir.path()).envs(&env);
            servers.push(Process::spawn(cmd, program));
        } else {
            let (ok, got) = bash(line, dir.path(), &env).await;
            assert!(ok, "README.md:{} `{line}` failed: {got}", b.line);
        }
    }
    let gw: std::net::SocketAddr = format!("127.0.0.1:{}", ports[&8080]).parse().unwrap();
    eventually(WAIT, "the hand-started gateway routes to the hand-started market service", || async {
        request(gw, "GET", "example.com", "/api/markets", &[], Bytes::new()).await.0 == 200
    })
    .await;
    drop(servers);
}
