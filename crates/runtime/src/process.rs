//! The frame of every binary: tracing, the async runtime, SIGTERM / SIGINT, the exit code.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Logs to stderr with an `EnvFilter` directive (`info`, `sidecar=debug,hyper=warn`, …); an
/// invalid directive falls back to `info` with a warning.
pub fn init_tracing(filter: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|e| {
        eprintln!("warning: log filter {filter:?} is invalid ({e}); using info");
        tracing_subscriber::EnvFilter::new("info")
    });
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        // One object per line: time, level, target, the event's fields, and the fields of the
        // span it happened in (a request's `trace_id` and `request_id`).
        LogFormat::Json => {
            logs.json().flatten_event(true).with_current_span(true).with_span_list(false).init()
        }
        // Colours only for a person at a terminal: a log file or a pipe gets plain text (and
        // NO_COLOR turns them off anywhere).
        LogFormat::Text => {
            use std::io::IsTerminal;
            let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            logs.with_ansi(ansi).init()
        }
    }
}

/// How logs are written: `text` for people, `json` (one object per line) for log stores.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("{other:?}: the log format is text or json")),
        }
    }
}

impl std::fmt::Display for LogFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// Resolves on SIGTERM or SIGINT with the signal's name.
pub async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        // Without handlers the default disposition still ends the process on a signal.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

/// Parses `250ms`, `15s`, `1m 30s` (for clap `value_parser`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration like 250ms or 15s: {e}"))
}

/// A runtime with `threads` workers (default: one per core; exactly one: a current-thread
/// runtime), or the reason it could not start.
pub fn runtime(threads: Option<usize>) -> Result<tokio::runtime::Runtime, String> {
    // One worker: a current-thread runtime, everything on the calling thread — no wake-ups
    // across threads, no work-stealing bookkeeping. For the sidecar at one worker this is
    // 20–30 % less CPU per request under load than a one-worker multi-thread runtime (whose
    // `block_on` thread is a second thread doing proxy work): BENCHMARKS.md, data plane. Blocking work still goes to `spawn_blocking`'s pool.
    if threads == Some(1) {
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the async runtime: {e}"));
    }
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads.filter(|n| *n > 0) {
        b.worker_threads(n);
    }
    b.enable_all().build().map_err(|e| format!("cannot start the async runtime: {e}"))
}

/// The body of every binary's `main`: tracing with `log` (a filter) in `format`, a runtime with
/// `threads` workers, `body` on it, and an exit code (failure printed as one `error: …` line
/// with its causes).
pub fn main<F, E>(log: &str, format: LogFormat, threads: Option<usize>, body: F) -> std::process::ExitCode
where
    F: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    init_tracing(log, format);
    let result = match runtime(threads) {
        Ok(rt) => rt.block_on(body).map_err(|e| format!("{e:#}")),
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs the server `serve` starts until it ends by itself or SIGTERM / SIGINT arrives; then
/// cancels the token it was given and waits for it to finish (at most `drain`, when given).
/// `what` names it in logs and errors.
pub async fn serve_until_signal<F, E>(
    what: &str,
    drain: Option<Duration>,
    serve: impl FnOnce(CancellationToken) -> F,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    F: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    let shutdown = CancellationToken::new();
    let mut task = crate::task::spawn(tracing::info_span!("server", what), serve(shutdown.clone()));
    let failed = |e: tokio::task::JoinError| format!("the {what} task failed: {e}");
    tokio::select! {
        r = &mut task => return r.map_err(failed)?.map_err(Into::into),
        sig = shutdown_signal() => tracing::info!(signal = sig, "shutting down {what}"),
    }
    shutdown.cancel();
    match drain {
        None => task.await.map_err(failed)?.map_err(Into::into)?,
        Some(d) => match tokio::time::timeout(d, task).await {
            Ok(r) => r.map_err(failed)?.map_err(Into::into)?,
            Err(_) => tracing::warn!(timeout = ?d, "{what}: drain deadline passed; exiting anyway"),
        },
    }
    tracing::info!("{what} stopped");
    Ok(())
}
