//! Why the bus refused or failed.

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("event {index}: {reason}")]
    Invalid { index: usize, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("NATS JetStream: {0}")]
    Nats(String),
}
