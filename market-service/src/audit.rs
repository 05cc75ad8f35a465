//! Signed checkpoints of the audit trail. The per-aggregate SHA-256 chain shows an event that
//! was changed in place, but not a chain recomputed after the change, nor a log cut short. So
//! the service signs (Ed25519, a key file outside the database) the heads of every aggregate
//! that changed since the last checkpoint, chains each checkpoint to the one before, and
//! publishes it to the event bus (topic [`TOPIC`]) — outside the database. [`verify`] checks the
//! database against the checkpoints and names the first divergence.

use std::{collections::BTreeMap, path::Path};

use ring::signature::{self, Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreError, verify_chain};

/// Where checkpoints are published.
pub const TOPIC: &str = "audit-checkpoints";

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The service's signing key: an Ed25519 key pair (PKCS#8, hex) in a file only its owner reads.
pub struct Signer {
    pair: Ed25519KeyPair,
    /// The public key, hex: what verifiers trust.
    pub public: String,
}

impl Signer {
    /// Reads the key from `path`, creating it (owner-only) when the file does not exist.
    pub fn load_or_create(path: &Path) -> Result<Signer, String> {
        if !path.exists() {
            let rng = ring::rand::SystemRandom::new();
            let doc = Ed25519KeyPair::generate_pkcs8(&rng)
                .map_err(|_| "cannot generate an Ed25519 key: the system has no randomness".to_string())?;
            mesh_runtime::write_secret(path, &mesh_runtime::hex(doc.as_ref()), mesh_runtime::Existing::Keep)
                .or_else(|e| if e.kind() == std::io::ErrorKind::AlreadyExists { Ok(()) } else { Err(e) })
                .map_err(|e| format!("cannot write the audit key {}: {e}", path.display()))?;
        }
        let text = mesh_runtime::read_secret(path)?;
        let der = unhex(&text).ok_or_else(|| format!("{}: not a hex PKCS#8 Ed25519 key", path.display()))?;
        let pair = Ed25519KeyPair::from_pkcs8(&der)
            .map_err(|e| format!("{}: not an Ed25519 PKCS#8 key ({e})", path.display()))?;
        let public = mesh_runtime::hex(pair.public_key().as_ref());
        Ok(Signer { pair, public })
    }

    fn sign(&self, message: &[u8]) -> String {
        mesh_runtime::hex(self.pair.sign(message).as_ref())
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// An aggregate's head as signed: its last version and that event's chain hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub version: u64,
    pub hash: String,
}

/// What a checkpoint signs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Body {
    /// 1, 2, … with no gap.
    pub number: u64,
    /// Every event up to this sequence number is covered.
    pub seq: i64,
    pub at_ms: u64,
    /// The digest of the previous checkpoint's body (zeros for the first).
    pub prev: String,
    /// The heads of the aggregates that changed since the previous checkpoint.
    pub heads: BTreeMap<String, Head>,
    /// The signer's public key (hex).
    pub key: String,
}

/// A signed checkpoint, as published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    #[serde(flatten)]
    pub body: Body,
    /// Ed25519 over the body's JSON (hex).
    pub signature: String,
}

impl Body {
    fn bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    fn digest(&self) -> String {
        mesh_runtime::hex(&mesh_runtime::sha256(&self.bytes()))
    }
}

/// Signs and stores the next checkpoint when the log moved since the last one (published to
/// the bus by the outbox publisher). Returns its number.
pub async fn checkpoint(store: &Store, signer: &Signer) -> Result<Option<u64>, StoreError> {
    let written = store
        .write_checkpoint(
            |last, heads, seq| {
                let (number, prev) = match last {
                    None => (1, GENESIS.to_string()),
                    Some((n, _, body)) => {
                        let c: Checkpoint = serde_json::from_str(&body)
                            .map_err(|e| format!("the stored checkpoint {n} does not parse: {e}"))?;
                        (n + 1, c.body.digest())
                    }
                };
                let body = Body {
                    number,
                    seq,
                    at_ms: crate::commit::now_ms(),
                    prev,
                    heads: heads.into_iter().map(|(a, version, hash)| (a, Head { version, hash })).collect(),
                    key: signer.public.clone(),
                };
                let signature = signer.sign(&body.bytes());
                serde_json::to_string(&Checkpoint { body, signature }).map_err(|e| e.to_string())
            },
            crate::commit::now_ms() as i64,
        )
        .await?;
    Ok(written.map(|(n, _)| n))
}

/// Where the log and the checkpoints first disagree.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Divergence {
    pub aggregate: Option<String>,
    pub version: Option<u64>,
    pub checkpoint: Option<u64>,
    pub reason: String,
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Report {
    pub valid: bool,
    pub checkpoints: usize,
    /// Every event up to this sequence number was checked against a signed checkpoint.
    pub covered_seq: i64,
    pub aggregates_checked: usize,
    /// Events after the last checkpoint: consistent chains, not yet signed.
    pub events_not_yet_checkpointed: u64,
    pub first_divergence: Option<Divergence>,
}

fn diverged(
    aggregate: Option<&str>,
    version: Option<u64>,
    checkpoint: Option<u64>,
    reason: String,
) -> Divergence {
    Divergence { aggregate: aggregate.map(str::to_string), version, checkpoint, reason }
}

/// Checks the checkpoints (signed by a `trusted` key, numbered without a gap, each chained to
/// the one before) and then the database against them: every aggregate a checkpoint signed
/// must still reach the signed version with the signed hash, along a chain that verifies; and
/// no aggregate may have events in the covered range that no checkpoint signed.
pub async fn verify(
    store: &Store,
    checkpoints: &[Checkpoint],
    trusted: &[String],
) -> Result<Report, StoreError> {
    let mut report = Report {
        valid: false,
        checkpoints: checkpoints.len(),
        covered_seq: 0,
        aggregates_checked: 0,
        events_not_yet_checkpointed: 0,
        first_divergence: None,
    };
    // The checkpoints themselves; every version each signed per aggregate.
    let mut signed: BTreeMap<String, Vec<(u64, String, u64)>> = BTreeMap::new();
    let mut prev = GENESIS.to_string();
    for (i, c) in checkpoints.iter().enumerate() {
        let n = c.body.number;
        let bad = |reason: String| diverged(None, None, Some(n), reason);
        let problem = if n != i as u64 + 1 {
            Some(bad(format!("checkpoint {} is missing: the checkpoints jump to {n}", i + 1)))
        } else if !trusted.contains(&c.body.key) {
            Some(bad(format!("checkpoint {n} is signed by key {}, which is not trusted", c.body.key)))
        } else if !signature_ok(c) {
            Some(bad(format!("checkpoint {n}'s signature does not verify: it was altered")))
        } else if c.body.prev != prev {
            Some(bad(format!("checkpoint {n} does not follow checkpoint {}", i)))
        } else {
            None
        };
        if problem.is_some() {
            report.first_divergence = problem;
            return Ok(report);
        }
        prev = c.body.digest();
        report.covered_seq = c.body.seq;
        for (aggregate, h) in &c.body.heads {
            signed.entry(aggregate.clone()).or_default().push((h.version, h.hash.clone(), n));
        }
    }
    // The log against them.
    for (aggregate, versions) in &signed {
        report.aggregates_checked += 1;
        let events = store.stream(aggregate).await?;
        if let Err((version, why)) = verify_chain(&events) {
            report.first_divergence = Some(diverged(Some(aggregate), Some(version), None, why));
            return Ok(report);
        }
        for (version, hash, n) in versions {
            let found = events.get((*version as usize).wrapping_sub(1));
            let reason = match found {
                None => Some(format!(
                    "the log ends at version {} but checkpoint {n} signed version {version}: events were deleted",
                    events.len()
                )),
                Some(e) if &e.hash != hash => Some(format!(
                    "version {version}'s hash is not the one checkpoint {n} signed: the log was rewritten at or before it"
                )),
                Some(_) => None,
            };
            if let Some(reason) = reason {
                report.first_divergence = Some(diverged(Some(aggregate), Some(*version), Some(*n), reason));
                return Ok(report);
            }
        }
    }
    for aggregate in store.aggregates_through(report.covered_seq).await? {
        if !signed.contains_key(&aggregate) {
            let reason =
                "has events no checkpoint signed, in the range the checkpoints cover: they were inserted"
                    .to_string();
            report.first_divergence = Some(diverged(Some(&aggregate), None, None, reason));
            return Ok(report);
        }
    }
    report.events_not_yet_checkpointed = store.count_after(report.covered_seq).await?;
    report.valid = true;
    Ok(report)
}

fn signature_ok(c: &Checkpoint) -> bool {
    let (Some(key), Some(sig)) = (unhex(&c.body.key), unhex(&c.signature)) else { return false };
    signature::UnparsedPublicKey::new(&signature::ED25519, key).verify(&c.body.bytes(), &sig).is_ok()
}

/// Checkpoints from bodies as published (JSON) — or as bus deliveries carrying one as `data`
/// (`meshctl events replay audit-checkpoints -o json`) — oldest first; one that does not parse
/// is named.
pub fn parse(bodies: &[String]) -> Result<Vec<Checkpoint>, String> {
    let one = |i: usize, b: &String| {
        let bad = |e: serde_json::Error| format!("checkpoint {} does not parse: {e}", i + 1);
        let v: serde_json::Value = serde_json::from_str(b).map_err(bad)?;
        let v = match v.get("data") {
            Some(data) if v.get("signature").is_none() => data.clone(),
            _ => v,
        };
        serde_json::from_value::<Checkpoint>(v).map_err(bad)
    };
    let mut list: Vec<Checkpoint> =
        bodies.iter().enumerate().map(|(i, b)| one(i, b)).collect::<Result<_, _>>()?;
    list.sort_by_key(|c| c.body.number);
    list.dedup_by_key(|c| c.body.number);
    Ok(list)
}
