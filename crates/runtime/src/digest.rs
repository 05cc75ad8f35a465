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

/// Unpadded base64url (RFC 4648 §5) of `bytes`, as JOSE (JWK, JWT) writes binary values.
pub fn base64url(bytes: &[u8]) -> String {
    encode64(bytes, b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", false)
}

/// Base64 (RFC 4648 §4, with padding): what CloudEvents' `data_base64` carries.
pub fn base64(bytes: &[u8]) -> String {
    encode64(bytes, b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/", true)
}

/// Base64 in `alphabet`, each 3 bytes as 4 characters; a short last group padded with `=` when
/// `pad`.
fn encode64(bytes: &[u8], alphabet: &[u8; 64], pad: bool) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            match i <= chunk.len() {
                true => out.push(alphabet[(n >> (18 - 6 * i) & 63) as usize] as char),
                false if pad => out.push('='),
                false => {}
            }
        }
    }
    out
}

/// Decodes base64 (standard or URL-safe alphabet, padding optional); `None` for anything else.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' | b'-' => Some(62),
        b'/' | b'_' => Some(63),
        _ => None,
    };
    if text.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    for chunk in text.as_bytes().chunks(4) {
        let n = chunk.iter().try_fold(0u32, |n, c| Some(n << 6 | u32::from(value(*c)?)))?
            << (6 * (4 - chunk.len()));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    Some(out)
}

/// The two lowercase hex digits of every byte: hex is spelled with one lookup per byte (trace
/// and span ids are spelled on every request).
pub const HEX_PAIRS: [[u8; 2]; 256] = {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut t = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = [DIGITS[i >> 4], DIGITS[i & 15]];
        i += 1;
    }
    t
};

/// Writes `bytes` as lowercase hex into `out` (twice as long).
pub fn write_hex(bytes: &[u8], out: &mut [u8]) {
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair.copy_from_slice(&HEX_PAIRS[usize::from(*b)]);
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = vec![0u8; bytes.len() * 2];
    write_hex(bytes, &mut out);
    String::from_utf8(out).unwrap_or_default()
}

fn sha256_of(feed: impl FnOnce(&mut ring::digest::Context)) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    feed(&mut ctx);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}
