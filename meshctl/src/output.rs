//! What meshctl prints: a table by default, JSON with `-o json`; writes to a closed stdout
//! (`meshctl … | head`) are ignored instead of panicking.

/// `println!` that ignores a closed stdout (`meshctl … | head`) instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `print!` counterpart of [`out!`].
macro_rules! out_raw {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($arg)*);
    }};
}

use crate::args::Output;

use mesh_proto::v1;
use serde_json::{Value, json};
use std::collections::BTreeMap;

pub use mesh_proto::json::health_name;

pub fn dash(s: &str) -> String {
    if s.is_empty() { "-".into() } else { s.to_string() }
}

pub fn blank_line() {
    out!();
}

pub fn print_json(v: &Value) {
    out!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

pub fn emit(out: Output, headers: &[&str], rows: Vec<Vec<String>>, js: Value) {
    match out {
        Output::Json => print_json(&js),
        Output::Table => print_table(headers, rows),
    }
}

/// Key/value listing for single objects.
pub fn emit_kv(out: Output, js: Value) {
    match (out, &js) {
        (Output::Table, Value::Object(map)) => {
            let sorted: BTreeMap<_, _> = map.iter().collect();
            let w = sorted.keys().map(|k| k.len()).max().unwrap_or(0);
            for (k, v) in sorted {
                let v = match v {
                    Value::String(s) => s.clone(),
                    Value::Number(n) if n.is_f64() => format!("{:.2}", n.as_f64().unwrap_or_default()),
                    other => other.to_string(),
                };
                out!("{k:<w$}  {v}");
            }
        }
        _ => print_json(&js),
    }
}

pub fn print_table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out!("{}", s.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

pub fn changes_json(changes: &[v1::FieldChange]) -> Value {
    Value::Array(
        changes.iter().map(|c| json!({"field": c.field, "old": c.old_value, "new": c.new_value})).collect(),
    )
}

pub fn print_changes(changes: &[v1::FieldChange]) {
    if changes.is_empty() {
        return;
    }
    let rows =
        changes.iter().map(|c| vec![c.field.clone(), c.old_value.clone(), c.new_value.clone()]).collect();
    print_table(&["FIELD", "OLD", "NEW"], rows);
}

/// Where a proxy stands on one policy: it ACKed the current version, it refused the current
/// version (with why), or it has not applied it yet. `proxy-status` shows it (`SYNCED`,
/// `NACKED: why`, `STALE`), `check` fails on anything but synced.
pub enum SyncState<'a> {
    Synced,
    Nacked(&'a str),
    Stale,
}

pub fn sync_state(s: &mesh_proto::v1::PolicySyncStatus) -> SyncState<'_> {
    if s.acked_version >= s.current_version {
        SyncState::Synced
    } else if s.nacked_version == s.current_version && s.current_version > 0 {
        SyncState::Nacked(&s.nack_reason)
    } else {
        SyncState::Stale
    }
}

impl std::fmt::Display for SyncState<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SyncState::Synced => f.write_str("SYNCED"),
            SyncState::Nacked(why) => write!(f, "NACKED: {why}"),
            SyncState::Stale => f.write_str("STALE"),
        }
    }
}
