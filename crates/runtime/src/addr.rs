//! Local addresses: a TCP socket address, or an owner-only Unix domain socket.

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

impl From<tokio::net::TcpListener> for LocalListener {
    fn from(l: tokio::net::TcpListener) -> Self {
        LocalListener::Tcp(l)
    }
}
