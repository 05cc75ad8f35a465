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

/// Every problem type the service answers with: code, status, what it means and what to do.
pub const PROBLEMS: &[(&str, u16, &str)] = &[
    ("invalid", 400, "A field of the request is malformed or out of range; `field` names it."),
    ("invalid_body", 400, "The body is not the JSON the operation takes (unknown fields are refused)."),
    ("invalid_query", 400, "A query parameter is malformed."),
    (
        "unauthenticated",
        401,
        "The operation acts as a signed-in user: send a bearer token through the gateway.",
    ),
    ("forbidden", 403, "The caller may not do this: it is neither the owner nor an admin."),
    ("not_found", 404, "No such market, account, trade or path."),
    ("no_account", 404, "The caller has no account yet: POST /accounts opens it."),
    ("method_not_allowed", 405, "The path does not take this method."),
    ("exists", 409, "The account already exists."),
    ("market_not_open", 409, "The market is not open for this command (closed, resolved or cancelled)."),
    ("insufficient_balance", 409, "The account cannot pay for this trade."),
    ("insufficient_shares", 409, "The account does not hold the shares it sells."),
    ("slippage", 409, "The price moved past max_cost or min_proceeds; quote again."),
    ("no_audit_key", 409, "This instance signs no audit checkpoints: start it with --audit-key-file."),
    ("version_conflict", 409, "Too many concurrent changes to the same aggregate; retry."),
    ("precondition_failed", 412, "If-Match named a version the market is no longer at; read it again."),
    ("body_too_large", 413, "The request body is larger than the service accepts."),
    ("unsupported_media_type", 415, "Send the body as application/json."),
    ("amount_out_of_range", 422, "An amount is past what the service can represent; `field` names it."),
    (
        "idempotency_key_reused",
        422,
        "The Idempotency-Key was used before for another request (method, path or body).",
    ),
    ("checkpoint_unreadable", 422, "A published audit checkpoint does not parse."),
    ("internal", 500, "The service failed; nothing was changed."),
    ("aggregate_unreadable", 503, "The aggregate's stored log cannot be read; the others are served."),
    ("database_unavailable", 503, "The database did not answer; nothing was changed, retry later."),
    ("bus_unavailable", 503, "The checkpoints could not be read back from the bus; retry when it is back."),
    ("shutting_down", 503, "The instance is stopping; retry (another instance will answer)."),
];

/// A problem type's title: its code in words (`insufficient_balance` → "Insufficient balance").
pub use mesh_runtime::problem_title as title;
