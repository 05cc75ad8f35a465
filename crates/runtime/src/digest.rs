//! SHA-256, the one digest the mesh uses: tokens at rest, request fingerprints, the audit chain.

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    sha256_of(|ctx| ctx.update(bytes))
}

/// SHA-256 of `parts`, each prefixed with its length (u64, big-endian), so no two different
/// lists of parts hash alike (`["ab", "c"]` and `["a", "bc"]` differ).
pub fn sha256_parts(parts: &[&[u8]]) -> [u8; 32] {
    sha256_of(|ctx| {
        for p in parts {
            ctx.update(&(p.len() as u64).to_be_bytes());
            ctx.update(p);
        }
    })
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_of(feed: impl FnOnce(&mut ring::digest::Context)) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    feed(&mut ctx);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}
