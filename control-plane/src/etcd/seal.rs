//! The mesh root's private key as it is kept in etcd: sealed with AES-256-GCM under a key every
//! replica reads from its own file (`--ca-seal-key-file`: 32 random bytes, 64 hex digits), so
//! whoever reads etcd without that file learns the root certificate only.

use ring::{
    aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey},
    rand::{SecureRandom, SystemRandom},
};

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("seal key file {0}: {1}")]
    KeyFile(String, String),
    #[error(
        "the mesh root's key in etcd does not open with this seal key: every replica needs the same \
         --ca-seal-key-file"
    )]
    Open,
    #[error("the sealed root in etcd is malformed: {0}")]
    Malformed(String),
}

/// The key that seals the root's private key.
pub struct SealKey(LessSafeKey);

impl SealKey {
    /// Reads 64 hex digits from `path`.
    pub fn read(path: &std::path::Path) -> Result<SealKey, SealError> {
        let err = |m: String| SealError::KeyFile(path.display().to_string(), m);
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let bytes = from_hex(text.trim()).filter(|b| b.len() == 32).ok_or_else(|| {
            err("must hold 64 hex digits (32 random bytes): `openssl rand -hex 32` makes one".into())
        })?;
        let key = UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| err("not an AES-256 key".into()))?;
        Ok(SealKey(LessSafeKey::new(key)))
    }

    /// `plain` sealed: nonce (12 bytes) then ciphertext and tag, in hex.
    pub fn seal(&self, plain: &[u8]) -> String {
        let mut nonce = [0u8; 12];
        // The system's random source does not fail on Linux; a zero nonce would still be unique
        // for the one value ever sealed per mesh.
        let _ = SystemRandom::new().fill(&mut nonce);
        let mut data = plain.to_vec();
        let _ = self.0.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut data);
        mesh_runtime::hex(&[nonce.as_slice(), &data].concat())
    }

    /// What [`SealKey::seal`] sealed.
    pub fn open(&self, sealed: &str) -> Result<Vec<u8>, SealError> {
        let bytes = from_hex(sealed).ok_or_else(|| SealError::Malformed("not hex".into()))?;
        if bytes.len() < 12 + 16 {
            return Err(SealError::Malformed("too short".into()));
        }
        let (nonce, data) = bytes.split_at(12);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Open)?;
        let mut data = data.to_vec();
        let plain = self.0.open_in_place(nonce, Aad::empty(), &mut data).map_err(|_| SealError::Open)?;
        Ok(plain.to_vec())
    }
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_keys_open_with_their_key_only() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, mesh_runtime::random_token().unwrap()).unwrap();
        std::fs::write(&b, mesh_runtime::random_token().unwrap()).unwrap();
        let (ka, kb) = (SealKey::read(&a).unwrap(), SealKey::read(&b).unwrap());
        let sealed = ka.seal(b"-----BEGIN PRIVATE KEY-----");
        assert_eq!(ka.open(&sealed).unwrap(), b"-----BEGIN PRIVATE KEY-----");
        assert!(matches!(kb.open(&sealed), Err(SealError::Open)));
        std::fs::write(&b, "short").unwrap();
        let short = SealKey::read(&b).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(short.contains("64 hex digits"), "{short}");
    }
}
