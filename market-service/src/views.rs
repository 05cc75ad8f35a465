//! What the API answers, as types: the handlers build these and the OpenAPI document is
//! generated from the same types (`utoipa`), so the two cannot drift.

use std::collections::BTreeMap;

use serde::Serialize;
use utoipa::ToSchema;

use crate::{
    audit::Report,
    domain::{Market, Micro, Quote, Status},
};

/// A market as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct MarketView {
    pub id: String,
    /// Its version: also its `ETag`.
    pub version: u64,
    pub question: String,
    pub description: String,
    pub category: String,
    pub outcomes: Vec<String>,
    /// The LMSR price of each outcome (sums to 1).
    pub prices: Vec<f64>,
    pub status: Status,
    /// The outcome it resolved to.
    pub winner: Option<usize>,
    pub close_time_ms: u64,
    pub creator: String,
    pub created_at_ms: u64,
    pub liquidity: Micro,
    pub subsidy: Micro,
    /// Outstanding shares per outcome.
    pub shares: Vec<Micro>,
    /// Credits the market maker holds.
    pub pool: Micro,
    pub volume: Micro,
    pub trades: u64,
    pub unique_traders: usize,
}

impl From<&Market> for MarketView {
    fn from(m: &Market) -> Self {
        MarketView {
            id: m.id.clone(),
            version: m.version,
            question: m.question.clone(),
            description: m.description.clone(),
            category: m.category.clone(),
            outcomes: m.outcomes.clone(),
            prices: m.prices(),
            status: m.status,
            winner: m.winner,
            close_time_ms: m.close_time_ms,
            creator: m.creator.clone(),
            created_at_ms: m.created_at_ms,
            liquidity: m.liquidity,
            subsidy: m.subsidy,
            shares: m.shares.clone(),
            pool: m.pool,
            volume: m.volume,
            trades: m.trades,
            unique_traders: m.traders().len(),
        }
    }
}

/// A page of markets, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct MarketList {
    pub total: usize,
    pub offset: usize,
    pub limit: usize,
    pub markets: Vec<MarketView>,
}

/// A newly opened account.
#[derive(Debug, Serialize, ToSchema)]
pub struct AccountOpened {
    pub id: String,
    pub name: String,
    pub balance: Micro,
    pub version: u64,
}

/// An account after a grant.
#[derive(Debug, Serialize, ToSchema)]
pub struct Granted {
    pub id: String,
    pub balance: Micro,
    pub version: u64,
}

/// An open position of an account.
#[derive(Debug, Serialize, ToSchema)]
pub struct Holding {
    pub market: String,
    pub outcome: usize,
    pub outcome_name: String,
    pub shares: Micro,
    pub net_paid: Micro,
    pub status: Status,
}

/// An account as its owner (or an admin) reads it.
#[derive(Debug, Serialize, ToSchema)]
pub struct AccountView {
    pub id: String,
    pub name: String,
    pub balance: Micro,
    pub granted: Micro,
    /// Its version: also its `ETag`.
    pub version: u64,
    pub positions: Vec<Holding>,
}

/// A trade as made.
#[derive(Debug, Serialize, ToSchema)]
pub struct TradeMade {
    /// Where it can be read again: `/markets/{market}/trades/{trade_id}`.
    pub trade_id: String,
    pub market: String,
    pub market_version: u64,
    pub account: String,
    /// The account's balance after it.
    pub balance: Micro,
    pub quote: Quote,
}

/// A trade as recorded.
#[derive(Debug, Serialize, ToSchema)]
pub struct TradeRecord {
    pub trade_id: String,
    pub market: String,
    pub market_version: u64,
    /// The `TradeExecuted` event.
    pub trade: serde_json::Value,
    pub recorded_at_ms: i64,
    pub correlation_id: String,
}

/// A price without a trade.
#[derive(Debug, Serialize, ToSchema)]
pub struct Quoted {
    pub market: String,
    pub version: u64,
    pub quote: Quote,
}

/// A market resolved (and settled) or cancelled, and what each account was credited.
#[derive(Debug, Serialize, ToSchema)]
pub struct Finished {
    pub market: MarketView,
    pub credits: BTreeMap<String, Micro>,
}

/// One account's position in one outcome.
#[derive(Debug, Serialize, ToSchema)]
pub struct PositionView {
    pub account: String,
    pub outcome: usize,
    pub shares: Micro,
    pub net_paid: Micro,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Positions {
    pub market: String,
    pub version: u64,
    pub positions: Vec<PositionView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PricePoint {
    pub at_ms: u64,
    pub prices: Vec<f64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct History {
    pub market: String,
    pub points: Vec<PricePoint>,
}

/// One event of the audit trail.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventView {
    pub version: u64,
    pub event_id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub data: serde_json::Value,
    pub correlation_id: String,
    pub causation_id: String,
    pub recorded_at_ms: i64,
    pub prev_hash: String,
    pub hash: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditTrail {
    pub market: String,
    pub events: Vec<EventView>,
}

/// The market's hash chain checked.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChainCheck {
    pub market: String,
    pub valid: bool,
    pub events: usize,
    /// The last event's hash, when valid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub head: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_invalid_version: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TopMarket {
    pub id: String,
    pub question: String,
    pub volume: Micro,
    pub trades: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Platform {
    pub markets: usize,
    pub markets_by_status: BTreeMap<String, usize>,
    pub accounts: usize,
    pub volume: Micro,
    pub trades: u64,
    pub unique_traders: usize,
    pub top_markets: Vec<TopMarket>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MarketAnalytics {
    pub market: String,
    pub volume: Micro,
    pub trades: u64,
    pub unique_traders: usize,
    pub prices: Vec<f64>,
    pub pool: Micro,
    pub price_points: usize,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Rebuilt {
    pub rebuilt_to_seq: i64,
}

/// What group commit carried since the start.
#[derive(Debug, Serialize, ToSchema)]
pub struct GroupCommit {
    pub batches: u64,
    pub commands: u64,
    /// The most times one committed command was decided (more than once only after it lost a
    /// race to another instance).
    pub most_decisions: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub status: String,
    pub backend: crate::store::Backend,
    /// Aggregates left out because their log holds an unreadable event, and why.
    pub unreadable_aggregates: BTreeMap<String, String>,
    pub group_commit: GroupCommit,
}

/// The audit trail checked against the signed checkpoints.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditVerified {
    /// Where the checkpoints came from: `bus` (outside the database) or `database`.
    pub source: String,
    /// The public key trusted (hex).
    pub key: String,
    pub report: Report,
}

/// A problem type, as described at its `type` URI.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProblemType {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub description: String,
}

/// An error (RFC 9457 problem details, `application/problem+json`).
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// `/problems/<code>`, described there.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    /// What happened and what to do.
    pub detail: String,
    /// The code (the last segment of `type`).
    pub error: String,
    /// The same as `detail`.
    pub message: String,
    /// The input at fault, when one is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}
