//! The `sidecar` binary's configuration: flags, `MESH_*` variables and the YAML config file.

use std::process::{Command, Stdio};

use mesh_testkit::{Process, bin};

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(bin("sidecar")).args(args).stdin(Stdio::null()).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_config_file_with_an_unknown_key_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.yaml");
    std::fs::write(&path, "service: market-service\napp_addr: 127.0.0.1:8081\nupstream: [users]\n").unwrap();
    let (ok, err) = run(&["--config", path.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("unknown field `upstream`"), "{err}");
}

#[test]
fn bad_flags_are_one_line_errors() {
    for (args, want) in [
        (vec!["--service", "Bad_Name", "--app-addr", "127.0.0.1:1"], "--service"),
        (vec!["--app-addr", "127.0.0.1:1"], "--service is required"),
        (vec!["--mode", "gateway"], "--route"),
        (vec!["--mode", "gateway", "--route", "api=svc"], "must start with '/'"),
    ] {
        let (ok, err) = run(&args);
        assert!(!ok, "{args:?}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn the_config_file_is_read_and_flags_win_over_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    let data = dir.path().join("data");
    std::fs::write(
        &path,
        format!(
            "mode: gateway\ninstance_id: from-file\ncontrol_plane: [\"http://127.0.0.1:9\"]\noutbound_addr: 127.0.0.1:0\nadmin_addr: 127.0.0.1:0\ndata_dir: {}\nroutes:\n  - prefix: /api\n    service: market-service\ndrain_delay: 0s\n",
            data.display()
        ),
    )
    .unwrap();
    let p = Process::start(
        "sidecar",
        &[
            "--config".into(),
            path.display().to_string(),
            "--instance-id".into(),
            "from-flag".into(),
            "--log".into(),
            "warn".into(),
        ],
    );
    assert_eq!(p.listening["instance_id"], "from-flag", "a flag wins over the file");
    assert!(p.listening["inbound"].is_null(), "gateway mode from the file: no inbound listener");
    p.kill9();
}
