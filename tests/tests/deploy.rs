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
        "deploy/docker-compose.ha.yml",
        "deploy/k8s/control-plane.yaml",
        "deploy/k8s/control-plane-ha.yaml",
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

const K8S: [&str; 4] = [
    "deploy/k8s/control-plane.yaml",
    "deploy/k8s/control-plane-ha.yaml",
    "deploy/k8s/market-service.yaml",
    "deploy/k8s/gateway.yaml",
];

/// The stock validators `scripts/test-deps` installs (`MESH_TEST_VENV`): required when
/// `MESH_REQUIRE_POSTGRES=1` says the test dependencies were set up (CI), skipped otherwise.
pub fn validator(name: &str) -> Option<std::path::PathBuf> {
    match std::env::var("MESH_TEST_VENV") {
        Ok(venv) => Some(Path::new(&venv).join("bin").join(name)),
        Err(_) if std::env::var("MESH_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") => {
            panic!("MESH_TEST_VENV is not set: scripts/test-deps installs the deploy validators")
        }
        Err(_) => {
            eprintln!("skipped: no MESH_TEST_VENV (run scripts/test-deps)");
            None
        }
    }
}

/// An installed program (Debian's `prometheus` package has both `prometheus` and `promtool`):
/// required in CI.
pub fn program(name: &str) -> Option<std::path::PathBuf> {
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    match found {
        Some(p) => Some(p),
        None if std::env::var("MESH_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") => {
            panic!("{name} is not installed: scripts/test-deps installs Debian's prometheus package")
        }
        None => {
            eprintln!("skipped: no {name} (run scripts/test-deps)");
            None
        }
    }
}

fn run(tool: &Path, args: &[&str], file: &Path) -> std::process::Output {
    Command::new(tool).args(args).arg(file).output().unwrap_or_else(|e| panic!("{}: {e}", tool.display()))
}

/// Issue #15.14: the compose file against the compose-spec JSON schema (check-jsonschema's
/// vendored copy) and the manifests against Kubernetes' schemas (`kubernetes-validate
/// --strict`); each with a negative control, a copy with one misspelt field, that must fail.
#[test]
fn deploy_files_pass_the_stock_schema_validators() {
    let (Some(jsonschema), Some(k8s)) = (validator("check-jsonschema"), validator("kubernetes-validate"))
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let compose = ["--builtin-schema", "vendor.compose-spec"];
    let strict = ["--strict"];
    // (validator, its arguments, file, a field to misspell for the negative control)
    let mut checks: Vec<(&Path, &[&str], &str, &str)> = vec![
        (&jsonschema, &compose, "deploy/docker-compose.yml", "    command:"),
        (&jsonschema, &compose, "deploy/docker-compose.ha.yml", "    command:"),
    ];
    for m in K8S {
        checks.push((&k8s, &strict, m, "image:"));
    }
    for (tool, args, path, field) in checks {
        let file = root().join(path);
        let out = run(tool, args, &file);
        assert!(
            out.status.success(),
            "{path}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // Negative control: one field misspelt.
        let text = std::fs::read_to_string(&file).unwrap();
        let broken = text.replacen(field, &field.replace(':', "x:"), 1);
        assert_ne!(broken, text, "{path} names an image");
        let copy = dir.path().join(Path::new(path).file_name().unwrap());
        std::fs::write(&copy, broken).unwrap();
        assert!(
            !run(tool, args, &copy).status.success(),
            "{path} with a misspelt field passed the validator"
        );
    }
}

/// `key` of a compose service, also through YAML merge keys (`<<: *image`), which the parser
/// leaves as they are.
fn merged<'a>(svc: &'a Value, key: &str) -> Option<&'a Value> {
    svc.get(key).or_else(|| merged(svc.get("<<")?, key))
}

/// Issue #15.14, the permission logic: everything the containers write or read as uid 10001 is
/// theirs. Compose: every named volume our image mounts read-write is a directory the
/// Dockerfile hands to the `mesh` user (a fresh named volume copies the image's owner).
/// Kubernetes: every pod runs as 10001 with `fsGroup: 10001`, and every secret volume is
/// readable by that group.
#[test]
fn containers_run_unprivileged_and_can_read_and_write_what_they_mount() {
    let dockerfile = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    let chown = dockerfile
        .lines()
        .find(|l| l.contains("chown mesh"))
        .expect("the Dockerfile gives directories to the mesh user");
    let owned: Vec<&str> = chown
        .split("chown mesh")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .take_while(|w| w.starts_with('/'))
        .collect();
    assert!(dockerfile.contains("USER mesh") && dockerfile.contains("--uid 10001"), "{dockerfile}");
    let files = [docs("deploy/docker-compose.yml"), docs("deploy/docker-compose.ha.yml")];
    for compose in files.iter().map(|d| &d[0]) {
        let named: Vec<&String> = compose["volumes"].as_object().unwrap().keys().collect();
        for (name, svc) in compose["services"].as_object().unwrap() {
            if merged(svc, "image") != Some(&Value::from("opinion-market-mesh:latest"))
                || merged(svc, "user").is_some()
            {
                continue;
            }
            for v in merged(svc, "volumes")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                let parts: Vec<&str> = v.split(':').collect();
                let (source, target) = (parts[0], parts.get(1).copied().unwrap_or(parts[0]));
                let read_only = parts.get(2) == Some(&"ro");
                if named.iter().any(|n| n.as_str() == source) && !read_only {
                    assert!(
                        owned.contains(&target),
                        "service {name} writes to volume {source} at {target}, which the image does not give to uid 10001 ({chown})"
                    );
                }
            }
        }
    }
    for path in K8S {
        for d in docs(path).iter().filter(|d| d["kind"] == "Deployment" || d["kind"] == "StatefulSet") {
            let pod = &d["spec"]["template"]["spec"];
            let sc = &pod["securityContext"];
            assert_eq!(
                (sc["runAsUser"].as_u64(), sc["fsGroup"].as_u64()),
                (Some(10001), Some(10001)),
                "{path}"
            );
            assert_eq!(sc["runAsNonRoot"], true, "{path}");
            for v in pod["volumes"].as_array().into_iter().flatten().filter(|v| v.get("secret").is_some()) {
                // Kubernetes reads `0440` as octal (YAML 1.1); this parser keeps it as written.
                let mode = match &v["secret"]["defaultMode"] {
                    Value::Null => 0o644,
                    Value::String(s) => u64::from_str_radix(s.trim_start_matches("0o"), 8).unwrap(),
                    n => n.as_u64().unwrap(),
                };
                assert!(
                    mode & 0o040 != 0,
                    "{path}: secret volume {} is not group-readable ({mode:o})",
                    v["name"]
                );
            }
        }
    }
}
