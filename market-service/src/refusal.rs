//! What the API answers: a command's answer, or a refusal with its status, code and reason.

use serde_json::Value;

use crate::{domain::DomainError, store::StoreError};

/// A successful command's answer: status and JSON body.
pub type Answer = (u16, Value);

/// A refusal, as the API answers it.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    pub field: Option<&'static str>,
}

impl Refusal {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), field: None }
    }
}

impl From<DomainError> for Refusal {
    fn from(e: DomainError) -> Self {
        let (status, code, field) = match &e {
            DomainError::Invalid { field, .. } => (400, "invalid", Some(*field)),
            DomainError::WrongStatus(..) => (409, "market_not_open", None),
            DomainError::InsufficientBalance { .. } => (409, "insufficient_balance", None),
            DomainError::InsufficientShares { .. } => (409, "insufficient_shares", None),
            DomainError::Slippage(_) => (409, "slippage", None),
            DomainError::Forbidden(_) => (403, "forbidden", None),
            DomainError::TooLarge(field, _) => (422, "amount_out_of_range", Some(*field)),
        };
        Refusal { status, code, message: e.to_string(), field }
    }
}

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unreadable(reason) => Refusal::new(503, "aggregate_unreadable", reason),
            StoreError::Conflict { .. } => {
                Refusal::new(409, "version_conflict", format!("{e}; reload and retry"))
            }
            other => {
                tracing::error!(error = %other, "database failure");
                Refusal::new(
                    503,
                    "database_unavailable",
                    format!("{other}; nothing was changed, retry later"),
                )
            }
        }
    }
}

/// `If-Match` named a version the aggregate is no longer (or never was) at.
pub fn precondition_failed(message: String) -> Refusal {
    Refusal::new(412, "precondition_failed", message)
}
