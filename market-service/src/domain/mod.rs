//! The opinion-market domain: pure data and functions, no I/O, no clock (time is passed in).
//!
//! Two aggregates, each a fold of its own event stream: a [`Market`] (question, outcomes, the
//! LMSR state, positions, its pool of credits) and an [`Account`] (a balance). Commands are pure
//! `decide` functions from current state to new events; the service appends those events with an
//! expected version per aggregate.
//!
//! Money is conserved: credits enter only through grants; a market's pool holds its creator's
//! subsidy plus what traders paid in, and pays out exactly what settlement or cancellation
//! distributes, so Σ balances + Σ pools = Σ grants at all times.

pub mod lmsr;
pub mod money;
pub mod whole;

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

pub use self::money::Micro;

/// Limits on what a market may hold.
pub const MAX_OUTCOMES: usize = 32;
pub const MAX_QUESTION: usize = 500;
pub const MAX_DESCRIPTION: usize = 10_000;
pub const MAX_NAME: usize = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Open,
    Closed,
    Resolved,
    Cancelled,
}

impl Status {
    pub fn parse(s: &str) -> Option<Status> {
        match s {
            "open" => Some(Status::Open),
            "closed" => Some(Status::Closed),
            "resolved" => Some(Status::Resolved),
            "cancelled" => Some(Status::Cancelled),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    Buy,
    Sell,
}

/// Why a command was refused. Each names the field or rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("market is {0:?}: {1}")]
    WrongStatus(Status, &'static str),
    #[error("insufficient balance: {needed} needed, {available} available")]
    InsufficientBalance { needed: Micro, available: Micro },
    #[error("insufficient shares: selling {selling}, holding {holding}")]
    InsufficientShares { selling: Micro, holding: Micro },
    #[error("slippage limit: {0}")]
    Slippage(String),
    #[error("only the market's creator or an admin may {0}")]
    Forbidden(&'static str),
    /// The command would take an amount past [`money::MAX`].
    #[error("{0}")]
    TooLarge(&'static str, String),
}

fn invalid(field: &'static str, reason: impl Into<String>) -> DomainError {
    DomainError::Invalid { field, reason: reason.into() }
}

/// `v` if it is within the one bound on amounts, else a refusal naming `field`.
fn bounded(field: &'static str, v: Micro) -> Result<Micro, DomainError> {
    money::within(field, v).map_err(|reason| DomainError::TooLarge(field, reason))
}

/// `a + b`, refused past the bound (or an `i64`) and naming `field`.
fn bounded_sum(field: &'static str, a: Micro, b: Micro) -> Result<Micro, DomainError> {
    let sum = a.checked_add(b).ok_or_else(|| {
        DomainError::TooLarge(field, format!("{field}: {a} + {b} is beyond the largest amount allowed"))
    })?;
    bounded(field, sum)
}

// ---- events ---------------------------------------------------------------------------------

/// What happened to a market.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "PascalCase")]
pub enum MarketEvent {
    MarketCreated {
        question: String,
        description: String,
        category: String,
        outcomes: Vec<String>,
        close_time_ms: u64,
        creator: String,
        liquidity: Micro,
        subsidy: Micro,
        created_at_ms: u64,
    },
    MarketUpdated {
        description: Option<String>,
        close_time_ms: Option<u64>,
        /// Who changed it (the creator, or an admin); absent in events from before it was kept.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
    },
    /// `shares` and `cost` are signed: positive for a buy (the trader pays `cost`), negative
    /// for a sell (the trader receives `-cost`).
    TradeExecuted {
        account: String,
        outcome: usize,
        shares: Micro,
        cost: Micro,
        at_ms: u64,
    },
    MarketClosed {
        at_ms: u64,
    },
    MarketResolved {
        outcome: usize,
        by: String,
        at_ms: u64,
    },
    /// Winning shares paid one credit each; what is left goes back to the creator.
    MarketSettled {
        payouts: BTreeMap<String, Micro>,
        creator_refund: Micro,
    },
    /// Traders get back what they paid net (pro rata if the pool cannot cover all); the rest
    /// goes back to the creator.
    MarketCancelled {
        by: String,
        refunds: BTreeMap<String, Micro>,
        creator_refund: Micro,
        at_ms: u64,
    },
}

/// What happened to an account.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "PascalCase")]
pub enum AccountEvent {
    AccountOpened { name: String },
    FundsGranted { amount: Micro, by: String },
    FundsDebited { amount: Micro, market: String, reason: String },
    FundsCredited { amount: Micro, market: String, reason: String },
}

impl MarketEvent {
    pub fn name(&self) -> &'static str {
        match self {
            MarketEvent::MarketCreated { .. } => "MarketCreated",
            MarketEvent::MarketUpdated { .. } => "MarketUpdated",
            MarketEvent::TradeExecuted { .. } => "TradeExecuted",
            MarketEvent::MarketClosed { .. } => "MarketClosed",
            MarketEvent::MarketResolved { .. } => "MarketResolved",
            MarketEvent::MarketSettled { .. } => "MarketSettled",
            MarketEvent::MarketCancelled { .. } => "MarketCancelled",
        }
    }
}

impl AccountEvent {
    pub fn name(&self) -> &'static str {
        match self {
            AccountEvent::AccountOpened { .. } => "AccountOpened",
            AccountEvent::FundsGranted { .. } => "FundsGranted",
            AccountEvent::FundsDebited { .. } => "FundsDebited",
            AccountEvent::FundsCredited { .. } => "FundsCredited",
        }
    }
}

// ---- aggregates -----------------------------------------------------------------------------

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub shares: Micro,
    /// Net credits paid into this position (buys minus sells).
    pub net_paid: Micro,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Market {
    pub id: String,
    pub version: u64,
    pub question: String,
    pub description: String,
    pub category: String,
    pub outcomes: Vec<String>,
    pub close_time_ms: u64,
    pub creator: String,
    pub created_at_ms: u64,
    pub liquidity: Micro,
    pub subsidy: Micro,
    pub status: Status,
    pub winner: Option<usize>,
    /// Outstanding shares per outcome (the LMSR's q).
    pub shares: Vec<Micro>,
    /// Credits the market maker holds.
    pub pool: Micro,
    /// account → per-outcome positions.
    pub positions: BTreeMap<String, Vec<Position>>,
    pub volume: Micro,
    pub trades: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Account {
    pub id: String,
    pub version: u64,
    pub name: String,
    pub balance: Micro,
    pub granted: Micro,
}

impl Market {
    /// Folds one event; `None` state means "not created yet".
    pub fn apply(state: Option<Market>, id: &str, e: &MarketEvent) -> Option<Market> {
        let mut m = match (state, e) {
            (
                None,
                MarketEvent::MarketCreated {
                    question,
                    description,
                    category,
                    outcomes,
                    close_time_ms,
                    creator,
                    liquidity,
                    subsidy,
                    created_at_ms,
                },
            ) => {
                return Some(Market {
                    id: id.to_string(),
                    version: 1,
                    question: question.clone(),
                    description: description.clone(),
                    category: category.clone(),
                    outcomes: outcomes.clone(),
                    close_time_ms: *close_time_ms,
                    creator: creator.clone(),
                    created_at_ms: *created_at_ms,
                    liquidity: *liquidity,
                    subsidy: *subsidy,
                    status: Status::Open,
                    winner: None,
                    shares: vec![Micro::ZERO; outcomes.len()],
                    pool: *subsidy,
                    positions: BTreeMap::new(),
                    volume: Micro::ZERO,
                    trades: 0,
                });
            }
            (None, _) | (Some(_), MarketEvent::MarketCreated { .. }) => return None,
            (Some(m), _) => m,
        };
        m.version += 1;
        match e {
            MarketEvent::MarketCreated { .. } => {}
            MarketEvent::MarketUpdated { description, close_time_ms, .. } => {
                if let Some(d) = description {
                    m.description = d.clone();
                }
                if let Some(t) = close_time_ms {
                    m.close_time_ms = *t;
                }
            }
            MarketEvent::TradeExecuted { account, outcome, shares, cost, .. } => {
                // Folds saturate: stored data always folds, whatever bound wrote it.
                m.shares[*outcome].0 = m.shares[*outcome].0.saturating_add(shares.0);
                m.pool.0 = m.pool.0.saturating_add(cost.0);
                m.volume.0 = m.volume.0.saturating_add(cost.0.saturating_abs());
                m.trades += 1;
                let n = m.outcomes.len();
                let p =
                    &mut m.positions.entry(account.clone()).or_insert_with(|| vec![Position::default(); n])
                        [*outcome];
                p.shares.0 = p.shares.0.saturating_add(shares.0);
                p.net_paid.0 = p.net_paid.0.saturating_add(cost.0);
            }
            MarketEvent::MarketClosed { .. } => m.status = Status::Closed,
            MarketEvent::MarketResolved { outcome, .. } => {
                m.status = Status::Resolved;
                m.winner = Some(*outcome);
            }
            MarketEvent::MarketSettled { payouts, creator_refund } => {
                m.pool.0 = m.pool.0.saturating_sub(
                    money::sum(payouts.values().map(|v| v.0)).saturating_add(creator_refund.0),
                );
            }
            MarketEvent::MarketCancelled { refunds, creator_refund, .. } => {
                m.status = Status::Cancelled;
                m.pool.0 = m.pool.0.saturating_sub(
                    money::sum(refunds.values().map(|v| v.0)).saturating_add(creator_refund.0),
                );
            }
        }
        Some(m)
    }

    /// Folds `events` onto `state` (`None`: from the beginning).
    pub fn replay<'a>(
        state: Option<Market>,
        id: &str,
        events: impl IntoIterator<Item = &'a MarketEvent>,
    ) -> Option<Market> {
        events.into_iter().fold(state, |s, e| Market::apply(s, id, e))
    }

    pub fn prices(&self) -> Vec<f64> {
        lmsr::prices(&self.shares, self.liquidity)
    }

    pub fn traders(&self) -> BTreeSet<&String> {
        self.positions.keys().collect()
    }

    fn outcome(&self, outcome: usize) -> Result<(), DomainError> {
        if outcome >= self.outcomes.len() {
            return Err(invalid(
                "outcome",
                format!("{outcome} is not an outcome of this market (0..{})", self.outcomes.len()),
            ));
        }
        Ok(())
    }

    /// Open for trading at `now`.
    fn tradable(&self, now_ms: u64) -> Result<(), DomainError> {
        if self.status != Status::Open {
            return Err(DomainError::WrongStatus(self.status, "no trading"));
        }
        if now_ms >= self.close_time_ms {
            return Err(DomainError::WrongStatus(Status::Closed, "trading ended at the close time"));
        }
        Ok(())
    }
}

impl Account {
    pub fn apply(state: Option<Account>, id: &str, e: &AccountEvent) -> Option<Account> {
        let mut a = match (state, e) {
            (None, AccountEvent::AccountOpened { name }) => {
                return Some(Account {
                    id: id.to_string(),
                    version: 1,
                    name: name.clone(),
                    ..Default::default()
                });
            }
            (None, _) | (Some(_), AccountEvent::AccountOpened { .. }) => return None,
            (Some(a), _) => a,
        };
        a.version += 1;
        match e {
            AccountEvent::AccountOpened { .. } => {}
            AccountEvent::FundsGranted { amount, .. } => {
                a.balance.0 = a.balance.0.saturating_add(amount.0);
                a.granted.0 = a.granted.0.saturating_add(amount.0);
            }
            AccountEvent::FundsDebited { amount, .. } => a.balance.0 = a.balance.0.saturating_sub(amount.0),
            AccountEvent::FundsCredited { amount, .. } => a.balance.0 = a.balance.0.saturating_add(amount.0),
        }
        Some(a)
    }
}

// ---- commands -------------------------------------------------------------------------------

/// Money enters an account (an admin's grant): positive, and the balance stays within bounds.
pub fn grant(a: &Account, amount: Micro, by: &str) -> Result<Vec<AccountEvent>, DomainError> {
    if amount.0 <= 0 {
        return Err(invalid("amount", "must be positive"));
    }
    bounded("amount", amount)?;
    bounded_sum("balance", a.balance, amount)?;
    Ok(vec![AccountEvent::FundsGranted { amount, by: by.to_string() }])
}

/// What a market pays an account (settlement or refund), refused if the balance would pass the
/// bound.
pub fn credit(a: &Account, amount: Micro, market: &str, reason: &str) -> Result<AccountEvent, DomainError> {
    bounded_sum("balance", a.balance, amount)?;
    Ok(AccountEvent::FundsCredited { amount, market: market.to_string(), reason: reason.to_string() })
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateMarket {
    /// Not blank; no control characters.
    #[schema(min_length = 1, max_length = 500)]
    pub question: String,
    #[serde(default)]
    #[schema(max_length = 10000)]
    pub description: String,
    #[serde(default)]
    #[schema(max_length = 200)]
    pub category: String,
    /// Distinct names, none blank.
    #[schema(min_items = 2, max_items = 32)]
    pub outcomes: Vec<String>,
    /// Unix milliseconds, in the future.
    #[serde(deserialize_with = "whole::u64")]
    pub close_time_ms: u64,
    /// The LMSR's b: larger means prices move less per share. The creator pays b · ln n.
    pub liquidity: Micro,
}

fn text(field: &'static str, s: &str, max: usize, required: bool) -> Result<(), DomainError> {
    if required && s.trim().is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if s.chars().count() > max {
        return Err(invalid(field, format!("at most {max} characters")));
    }
    if s.chars().any(|c| c.is_control() && c != '\n') {
        return Err(invalid(field, "must not contain control characters"));
    }
    Ok(())
}

/// Longest account id: an account's id is its owner's subject (a token's `sub`).
pub const MAX_ACCOUNT_ID: usize = 128;

/// Account ids: 1..=128 of `[A-Za-z0-9_.@:|+-]`, which covers the subjects identity providers
/// issue (`alice`, `auth0|5f7c…`, `user@example.com`, UUIDs).
pub fn valid_account_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ACCOUNT_ID
        && id.bytes().all(|c| c.is_ascii_alphanumeric() || b"_.@:|+-".contains(&c))
}

/// Only a market's creator or an admin may change, resolve or cancel it.
fn creator_or_admin(m: &Market, by: &str, is_admin: bool, what: &'static str) -> Result<(), DomainError> {
    if by == m.creator || is_admin { Ok(()) } else { Err(DomainError::Forbidden(what)) }
}

/// A new market, funded by its creator's subsidy: (market events, creator account events).
pub fn create_market(
    id: &str,
    c: &CreateMarket,
    creator: &Account,
    now_ms: u64,
) -> Result<(Vec<MarketEvent>, Vec<AccountEvent>), DomainError> {
    text("question", &c.question, MAX_QUESTION, true)?;
    text("description", &c.description, MAX_DESCRIPTION, false)?;
    text("category", &c.category, MAX_NAME, false)?;
    if c.outcomes.len() < 2 || c.outcomes.len() > MAX_OUTCOMES {
        return Err(invalid(
            "outcomes",
            format!("a market needs 2..={MAX_OUTCOMES} outcomes, got {}", c.outcomes.len()),
        ));
    }
    for o in &c.outcomes {
        text("outcomes", o, MAX_NAME, true)?;
    }
    if c.outcomes.iter().collect::<BTreeSet<_>>().len() != c.outcomes.len() {
        return Err(invalid("outcomes", "outcome names must be distinct"));
    }
    if c.close_time_ms <= now_ms {
        return Err(invalid("close_time_ms", "must be in the future"));
    }
    if c.liquidity < Micro::units(1) || c.liquidity > Micro::units(1_000_000_000) {
        return Err(invalid("liquidity", "must be between 1 and 1000000000"));
    }
    let subsidy = lmsr::subsidy(c.liquidity, c.outcomes.len());
    if creator.balance < subsidy {
        return Err(DomainError::InsufficientBalance { needed: subsidy, available: creator.balance });
    }
    let market = MarketEvent::MarketCreated {
        question: c.question.trim().to_string(),
        description: c.description.clone(),
        category: c.category.trim().to_string(),
        outcomes: c.outcomes.iter().map(|o| o.trim().to_string()).collect(),
        close_time_ms: c.close_time_ms,
        creator: creator.id.clone(),
        liquidity: c.liquidity,
        subsidy,
        created_at_ms: now_ms,
    };
    let debit = AccountEvent::FundsDebited {
        amount: subsidy,
        market: id.to_string(),
        reason: "market subsidy".into(),
    };
    Ok((vec![market], vec![debit]))
}

/// Changes the description or close time while trading has not ended (creator or admin).
pub fn update_market(
    m: &Market,
    description: Option<String>,
    close_time_ms: Option<u64>,
    (by, is_admin): (&str, bool),
    now_ms: u64,
) -> Result<Vec<MarketEvent>, DomainError> {
    creator_or_admin(m, by, is_admin, "change it")?;
    m.tradable(now_ms)?;
    if let Some(d) = &description {
        text("description", d, MAX_DESCRIPTION, false)?;
    }
    if let Some(t) = close_time_ms
        && t <= now_ms
    {
        return Err(invalid("close_time_ms", "must be in the future"));
    }
    if description.is_none() && close_time_ms.is_none() {
        return Err(invalid("body", "name description, close_time_ms or both"));
    }
    Ok(vec![MarketEvent::MarketUpdated { description, close_time_ms, by: Some(by.to_string()) }])
}

/// A priced trade, before it is applied.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Quote {
    pub outcome: usize,
    pub side: Side,
    pub shares: Micro,
    /// Paid (buy) or received (sell).
    pub amount: Micro,
    pub average_price: f64,
    pub prices_before: Vec<f64>,
    pub prices_after: Vec<f64>,
}

pub fn quote(m: &Market, outcome: usize, side: Side, shares: Micro) -> Result<Quote, DomainError> {
    m.outcome(outcome)?;
    if shares.0 <= 0 {
        return Err(invalid("shares", "must be positive"));
    }
    bounded("shares", shares)?;
    let (amount, after) = match side {
        Side::Buy => {
            let mut q = m.shares.clone();
            q[outcome].0 += shares.0;
            (lmsr::buy_cost(&m.shares, m.liquidity, outcome, shares), q)
        }
        Side::Sell => {
            if shares > m.shares[outcome] {
                return Err(DomainError::InsufficientShares { selling: shares, holding: m.shares[outcome] });
            }
            let mut q = m.shares.clone();
            q[outcome].0 -= shares.0;
            (lmsr::sell_proceeds(&m.shares, m.liquidity, outcome, shares), q)
        }
    };
    Ok(Quote {
        outcome,
        side,
        shares,
        amount,
        average_price: amount.as_f64() / shares.as_f64(),
        prices_before: m.prices(),
        prices_after: lmsr::prices(&after, m.liquidity),
    })
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Trade {
    /// An outcome's index.
    #[schema(maximum = 31)]
    #[serde(deserialize_with = "whole::usize")]
    pub outcome: usize,
    pub side: Side,
    pub shares: Micro,
    /// Buy: refuse if the cost would exceed this.
    #[serde(default)]
    pub max_cost: Option<Micro>,
    /// Sell: refuse if the proceeds would fall below this.
    #[serde(default)]
    pub min_proceeds: Option<Micro>,
}

/// A trade: (market events, trader account events).
pub fn trade(
    m: &Market,
    a: &Account,
    t: &Trade,
    now_ms: u64,
) -> Result<(Vec<MarketEvent>, Vec<AccountEvent>, Quote), DomainError> {
    m.tradable(now_ms)?;
    let q = quote(m, t.outcome, t.side, t.shares)?;
    let (shares, cost, account_event) = match t.side {
        Side::Buy => {
            if let Some(max) = t.max_cost
                && q.amount > max
            {
                return Err(DomainError::Slippage(format!("cost {} exceeds max_cost {max}", q.amount)));
            }
            if a.balance < q.amount {
                return Err(DomainError::InsufficientBalance { needed: q.amount, available: a.balance });
            }
            let e =
                AccountEvent::FundsDebited { amount: q.amount, market: m.id.clone(), reason: "buy".into() };
            (t.shares, q.amount, e)
        }
        Side::Sell => {
            let holding = m.positions.get(&a.id).map(|p| p[t.outcome].shares).unwrap_or_default();
            if t.shares > holding {
                return Err(DomainError::InsufficientShares { selling: t.shares, holding });
            }
            if let Some(min) = t.min_proceeds
                && q.amount < min
            {
                return Err(DomainError::Slippage(format!(
                    "proceeds {} fall below min_proceeds {min}",
                    q.amount
                )));
            }
            let e =
                AccountEvent::FundsCredited { amount: q.amount, market: m.id.clone(), reason: "sell".into() };
            (Micro(-t.shares.0), Micro(-q.amount.0), e)
        }
    };
    // The pool must always cover the largest possible payout (LMSR guarantees it up to
    // rounding; refuse rather than ever be insolvent).
    let mut after = m.shares.clone();
    after[t.outcome] = bounded_sum("shares", after[t.outcome], shares)?;
    let pool_after = bounded_sum("pool", m.pool, cost)?.0;
    if after.iter().any(|s| s.0 > pool_after) {
        return Err(invalid("shares", "the market maker cannot cover this trade"));
    }
    let held = m.positions.get(&a.id).map(|p| p[t.outcome].shares).unwrap_or_default();
    bounded_sum("shares", held, shares)?;
    if t.side == Side::Sell {
        bounded_sum("balance", a.balance, q.amount)?;
    }
    let event =
        MarketEvent::TradeExecuted { account: a.id.clone(), outcome: t.outcome, shares, cost, at_ms: now_ms };
    Ok((vec![event], vec![account_event], q))
}

/// Ends trading once the close time has passed.
pub fn close(m: &Market, now_ms: u64) -> Option<MarketEvent> {
    (m.status == Status::Open && now_ms >= m.close_time_ms)
        .then_some(MarketEvent::MarketClosed { at_ms: now_ms })
}

/// Resolves to `outcome` and settles: winning shares pay one credit each, the rest of the pool
/// returns to the creator. Returns the market events and the credits per account.
pub fn resolve(
    m: &Market,
    outcome: usize,
    by: &str,
    is_admin: bool,
    now_ms: u64,
) -> Result<(Vec<MarketEvent>, BTreeMap<String, Micro>), DomainError> {
    creator_or_admin(m, by, is_admin, "resolve it")?;
    if !matches!(m.status, Status::Open | Status::Closed) {
        return Err(DomainError::WrongStatus(m.status, "already final"));
    }
    m.outcome(outcome)?;
    let payouts: BTreeMap<String, Micro> = m
        .positions
        .iter()
        .map(|(acc, p)| (acc.clone(), p[outcome].shares))
        .filter(|(_, s)| s.0 > 0)
        .collect();
    let paid = money::sum(payouts.values().map(|v| v.0));
    let creator_refund = Micro(m.pool.0 - paid);
    debug_assert!(creator_refund.0 >= 0, "the trade solvency check keeps the pool covering payouts");
    let mut credits = payouts.clone();
    *credits.entry(m.creator.clone()).or_default() =
        Micro(credits.get(&m.creator).map_or(0, |v| v.0) + creator_refund.0);
    let events = vec![
        MarketEvent::MarketResolved { outcome, by: by.to_string(), at_ms: now_ms },
        MarketEvent::MarketSettled { payouts, creator_refund },
    ];
    Ok((events, credits))
}

/// Cancels: each trader gets back what they paid net (pro rata, rounded down, if the pool
/// cannot cover everyone — possible when others already took profits), the rest returns to the
/// creator.
pub fn cancel(
    m: &Market,
    by: &str,
    is_admin: bool,
    now_ms: u64,
) -> Result<(Vec<MarketEvent>, BTreeMap<String, Micro>), DomainError> {
    creator_or_admin(m, by, is_admin, "cancel it")?;
    if !matches!(m.status, Status::Open | Status::Closed) {
        return Err(DomainError::WrongStatus(m.status, "already final"));
    }
    let owed: BTreeMap<String, i64> = m
        .positions
        .iter()
        .map(|(acc, ps)| (acc.clone(), money::sum(ps.iter().map(|p| p.net_paid.0))))
        .filter(|(_, v)| *v > 0)
        .collect();
    let total = money::sum(owed.values().copied());
    let refunds: BTreeMap<String, Micro> = owed
        .into_iter()
        .map(|(acc, v)| {
            let r = if total <= m.pool.0 {
                v
            } else {
                (i128::from(v) * i128::from(m.pool.0) / i128::from(total)) as i64
            };
            (acc, Micro(r))
        })
        .collect();
    let creator_refund = Micro(m.pool.0.saturating_sub(money::sum(refunds.values().map(|v| v.0))));
    let mut credits = refunds.clone();
    *credits.entry(m.creator.clone()).or_default() =
        Micro(credits.get(&m.creator).map_or(0, |v| v.0) + creator_refund.0);
    Ok((
        vec![MarketEvent::MarketCancelled { by: by.to_string(), refunds, creator_refund, at_ms: now_ms }],
        credits,
    ))
}

#[cfg(test)]
mod tests;
