//! `deploy/` cannot run here (no container engine), so check what can be checked: every file
//! parses, and every flag and `MESH_*` variable it hands our binaries exists in that binary's
//! `--help` — a renamed flag fails here instead of in a user's cluster.

use std::{collections::BTreeMap, path::Path, process::Command};

use serde::Deserialize;
use serde_json::Value;

const BINARIES: [&str; 4] = ["control-plane", "sidecar", "market-service", "meshctl"];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

fn docs(path: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{path} does not parse: {e}")))
        .collect()
}

/// Every (binary, arguments, env names) a document runs.
fn invocations(v: &Value, out: &mut Vec<(String, Vec<String>, Vec<String>)>) {
    match v {
        Value::Object(map) => {
            let strings = |k: &str| -> Vec<String> {
                map.get(k)
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
                    .unwrap_or_default()
            };
            let mut cmd = strings("command");
            cmd.extend(strings("args"));
            if let Some(bin) = cmd.first().filter(|b| BINARIES.contains(&b.as_str())) {
                let env = match map.get("env").or_else(|| map.get("environment")) {
                    Some(Value::Array(list)) => {
                        list.iter().filter_map(|e| e["name"].as_str().map(str::to_string)).collect()
                    }
                    Some(Value::Object(m)) => m.keys().cloned().collect(),
                    _ => vec![],
                };
                out.push((bin.clone(), cmd[1..].to_vec(), env));
            }
            for v in map.values() {
                invocations(v, out);
            }
        }
        Value::Array(list) => list.iter().for_each(|v| invocations(v, out)),
        _ => {}
    }
}

#[test]
fn deploy_files_parse_and_use_only_flags_the_binaries_have() {
    // The help of the binary, or of the subcommand the invocation names (`meshctl identity
    // token create …`): the words that are neither flags nor a flag's value.
    let mut help = BTreeMap::new();
    let mut help_for = |bin: &str, args: &[String]| -> String {
        let mut words = Vec::new();
        let mut after_flag = false;
        for a in args {
            if a.starts_with("--") {
                after_flag = !a.contains('=');
            } else if after_flag {
                after_flag = false;
            } else {
                words.push(a.clone());
            }
        }
        help.entry((bin.to_string(), words.clone()))
            .or_insert_with(|| {
                let out = Command::new(mesh_testkit::bin(bin)).args(&words).arg("--help").output().unwrap();
                assert!(out.status.success(), "{bin} {words:?} --help failed: {out:?}");
                String::from_utf8(out.stdout).unwrap()
            })
            .clone()
    };
    let mut found = Vec::new();
    for path in [
        "deploy/docker-compose.yml",
        "deploy/k8s/control-plane.yaml",
        "deploy/k8s/market-service.yaml",
        "deploy/k8s/gateway.yaml",
        "deploy/prometheus/prometheus.yml",
    ] {
        for d in docs(path) {
            invocations(&d, &mut found);
        }
    }
    let bins: std::collections::BTreeSet<&str> = found.iter().map(|(b, _, _)| b.as_str()).collect();
    assert_eq!(
        bins,
        ["control-plane", "market-service", "meshctl", "sidecar"].into_iter().collect(),
        "every part is deployed"
    );
    for (bin, args, env) in &found {
        let h = &help_for(bin, args);
        for flag in args.iter().filter(|a| a.starts_with("--")) {
            let name = flag.split('=').next().unwrap();
            assert!(
                h.contains(&format!("{name} ")) || h.contains(&format!("{name}\n")),
                "{bin} has no flag {name} (deploy files use it)"
            );
        }
        for var in env.iter().filter(|v| v.starts_with("MESH_")) {
            assert!(h.contains(&format!("env: {var}")), "{bin} reads no {var} (deploy files set it)");
        }
    }
}
