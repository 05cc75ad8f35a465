//! Secrets (tokens) read from files.

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

/// Whether [`write_secret`] may replace an existing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Replace its contents (and make it owner-only if it was not).
    Replace,
    /// Fail with `AlreadyExists`: a key that exists is never overwritten.
    Keep,
}

/// Writes a secret to `path`, owner-only (0600) and fsync'd, creating its directory.
pub fn write_secret(path: &std::path::Path, text: &str, existing: Existing) -> std::io::Result<()> {
    use std::{
        io::Write,
        os::unix::fs::{OpenOptionsExt, PermissionsExt},
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut open = std::fs::OpenOptions::new();
    open.write(true).mode(0o600);
    match existing {
        Existing::Replace => open.create(true).truncate(true),
        Existing::Keep => open.create_new(true),
    };
    let mut f = open.open(path)?;
    // `mode` applies only when the file is created: an older file keeps its bits otherwise.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

/// 32 random bytes from the operating system, in hex: a bearer token. `None` when the system
/// has no randomness to give.
pub fn random_token() -> Option<String> {
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).ok()?;
    Some(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
