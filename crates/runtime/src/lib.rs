//! What every Opinion Market Mesh binary shares: tracing setup, shutdown signals and duration
//! flags. Only binaries call these; libraries take a shutdown token instead.

use std::time::Duration;

/// Logs to stderr with an `EnvFilter` directive (`info`, `sidecar=debug,hyper=warn`, …); an
/// invalid directive falls back to `info` with a warning.
pub fn init_tracing(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|e| {
        eprintln!("warning: log filter {filter:?} is invalid ({e}); using info");
        tracing_subscriber::EnvFilter::new("info")
    });
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

/// Where a process listens for, or reaches, its local peer (an app and its sidecar): TCP, or a
/// Unix domain socket (`unix:/path`) that only the owner's user can open (mode 0600), so no
/// other user of the host can reach the app past its sidecar or use the sidecar as the app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalAddr {
    Tcp(std::net::SocketAddr),
    Unix(std::path::PathBuf),
}

impl std::str::FromStr for LocalAddr {
    type Err = String;

    /// `host:port` or `unix:/path`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.strip_prefix("unix:") {
            Some("") => Err("unix: needs a path (unix:/run/app.sock)".into()),
            Some(path) => Ok(LocalAddr::Unix(path.into())),
            None => s
                .parse()
                .map(LocalAddr::Tcp)
                .map_err(|e| format!("{s:?} is neither host:port nor unix:/path ({e})")),
        }
    }
}

impl std::fmt::Display for LocalAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LocalAddr::Tcp(a) => write!(f, "{a}"),
            LocalAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Binds a Unix domain socket at `path`, owner-only (0600). A socket left at `path` by an
/// earlier run is replaced; any other file there is an error.
pub fn bind_unix(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Err(_) => {}
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// A bound [`LocalAddr`].
pub enum LocalListener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener, std::path::PathBuf),
}

impl LocalListener {
    /// Binds `addr` (a Unix socket owner-only, see [`bind_unix`]).
    pub async fn bind(addr: &LocalAddr) -> std::io::Result<Self> {
        Ok(match addr {
            LocalAddr::Tcp(a) => LocalListener::Tcp(tokio::net::TcpListener::bind(a).await?),
            LocalAddr::Unix(p) => LocalListener::Unix(bind_unix(p)?, p.clone()),
        })
    }

    /// Where it listens (a TCP port 0 resolved to the port it got).
    pub fn local_addr(&self) -> std::io::Result<LocalAddr> {
        Ok(match self {
            LocalListener::Tcp(l) => LocalAddr::Tcp(l.local_addr()?),
            LocalListener::Unix(_, p) => LocalAddr::Unix(p.clone()),
        })
    }
}

/// Serves `app` on `listener` (TCP with Nagle off, or a Unix socket) until `shutdown`, then
/// waits for open requests.
pub async fn serve_http(
    listener: LocalListener,
    app: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    match listener {
        LocalListener::Tcp(l) => {
            let l = axum::serve::ListenerExt::tap_io(l, |s| {
                let _ = s.set_nodelay(true);
            });
            axum::serve(l, app).with_graceful_shutdown(shutdown).await
        }
        LocalListener::Unix(l, _) => axum::serve(l, app).with_graceful_shutdown(shutdown).await,
    }
}

impl From<tokio::net::TcpListener> for LocalListener {
    fn from(l: tokio::net::TcpListener) -> Self {
        LocalListener::Tcp(l)
    }
}

/// Reads a secret (a token) from `path`, trimmed. Refuses an empty file; warns (on stderr, the
/// secret never printed) when the file is readable by others than its owner.
pub fn read_secret(path: &std::path::Path) -> Result<String, String> {
    use std::{io::Read, os::unix::fs::PermissionsExt};
    let fail = |e: std::io::Error| format!("cannot read {}: {e}", path.display());
    let mut file = std::fs::File::open(path).map_err(fail)?;
    let mode = file.metadata().map_err(fail)?.permissions().mode();
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(fail)?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(format!("{} is empty: write the secret into it", path.display()));
    }
    if mode & 0o077 != 0 {
        eprintln!(
            "warning: {} is readable by other users (mode {:o}); chmod 600 it",
            path.display(),
            mode & 0o777
        );
    }
    Ok(secret.to_string())
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

/// The body of every binary's `main`: tracing with `log`, a runtime with `threads` workers,
/// `body` on it, and an exit code (failure printed as one `error: …` line with its causes).
pub fn main<F, E>(log: &str, threads: Option<usize>, body: F) -> std::process::ExitCode
where
    F: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    init_tracing(log);
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn local_addresses_parse_and_unix_sockets_are_owner_only() {
        use super::LocalAddr;
        assert_eq!(
            "127.0.0.1:8081".parse::<LocalAddr>(),
            Ok(LocalAddr::Tcp("127.0.0.1:8081".parse().unwrap()))
        );
        assert_eq!("unix:/run/a.sock".parse::<LocalAddr>(), Ok(LocalAddr::Unix("/run/a.sock".into())));
        assert_eq!(LocalAddr::Unix("/run/a.sock".into()).to_string(), "unix:/run/a.sock");
        assert!("unix:".parse::<LocalAddr>().is_err() && "nowhere".parse::<LocalAddr>().is_err());
        let dir = std::env::temp_dir().join(format!("mesh-sock-{}", std::process::id()));
        let path = dir.join("sub/app.sock");
        let first = super::bind_unix(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        drop(first);
        super::bind_unix(&path).expect("a stale socket is replaced");
        std::fs::write(dir.join("file"), b"").unwrap();
        assert!(super::bind_unix(&dir.join("file")).is_err(), "a regular file is not replaced");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn secrets_are_read_trimmed_and_an_empty_or_missing_file_is_an_error() {
        let dir = std::env::temp_dir().join(format!("mesh-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "  s3cret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(super::read_secret(&path).unwrap(), "s3cret");
        std::fs::write(&path, "\n").unwrap();
        assert!(super::read_secret(&path).unwrap_err().contains("is empty"));
        let missing = dir.join("missing");
        assert!(super::read_secret(&missing).unwrap_err().contains("missing"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
