//! The read model: every market and account folded from the log, kept in memory, updated by the
//! committer as each batch commits (so a caller's next read sees its write) and caught up from
//! the log for other instances' writes. Commands are decided against a [`View`] of it: the
//! projection plus what earlier commands of the same batch changed.

use std::collections::{BTreeMap, HashMap};

use crate::{
    domain::{Account, AccountEvent, Market, MarketEvent},
    refusal::Refusal,
    store::{Append, Recorded, StoreError},
};

pub fn market_id(id: &str) -> String {
    format!("market-{id}")
}

pub fn account_id(id: &str) -> String {
    format!("account-{id}")
}

/// Every market and account, folded from the log.
#[derive(Default)]
pub struct Projection {
    pub seq: i64,
    pub markets: BTreeMap<String, Market>,
    pub accounts: BTreeMap<String, Account>,
    /// Price points per market: (time, prices) after creation and every trade.
    pub history: BTreeMap<String, Vec<(u64, Vec<f64>)>>,
    /// Aggregates whose log holds an event that does not parse, and why (`/healthz` lists them).
    pub unreadable: BTreeMap<String, String>,
}

impl Projection {
    /// Folds one committed event. An event that does not parse takes its aggregate out of the
    /// projection (reported in `unreadable`, its later events skipped) instead of failing every
    /// read: one bad aggregate never stops the service or the others.
    /// Events at or before the projection's sequence number are already in it and skipped, so
    /// the committer and a reader catching up may both offer the same events.
    pub(crate) fn apply(&mut self, r: &Recorded) {
        if r.seq <= self.seq {
            return;
        }
        self.seq = r.seq;
        if self.unreadable.contains_key(&r.aggregate_id) {
            return;
        }
        let id = r.aggregate_id.split_once('-').map_or(r.aggregate_id.as_str(), |(_, id)| id);
        let parsed = match r.aggregate_type.as_str() {
            "market" => serde_json::from_str::<MarketEvent>(&r.payload).map(|e| self.apply_market(id, r, &e)),
            "account" => serde_json::from_str::<AccountEvent>(&r.payload).map(|e| {
                if let Some(a) = Account::apply(self.accounts.remove(id), id, &e) {
                    self.accounts.insert(id.to_string(), a);
                }
            }),
            // Operators' actions: kept in the log for the audit trail, nothing to project.
            "operations" => Ok(()),
            other => {
                tracing::warn!(aggregate_type = other, "unknown aggregate type in the log; skipped");
                Ok(())
            }
        };
        if let Err(e) = parsed {
            let reason = unreadable(&r.aggregate_id, r, &e);
            tracing::error!(aggregate = %r.aggregate_id, %reason, "aggregate left out of the projection; the rest is served");
            if r.aggregate_type == "market" {
                self.markets.remove(id);
                self.history.remove(id);
            } else {
                self.accounts.remove(id);
            }
            self.unreadable.insert(r.aggregate_id.clone(), reason);
        }
    }

    /// A market as read: 404 if it does not exist, 503 naming the event if its log is unreadable.
    pub fn market(&self, id: &str) -> Result<&Market, Refusal> {
        self.markets.get(id).ok_or_else(|| self.missing(&market_id(id), "market", id))
    }

    /// An account as read, like [`Projection::market`].
    pub fn account(&self, id: &str) -> Result<&Account, Refusal> {
        self.accounts.get(id).ok_or_else(|| self.missing(&account_id(id), "account", id))
    }

    fn missing(&self, aggregate: &str, kind: &str, id: &str) -> Refusal {
        match self.unreadable.get(aggregate) {
            Some(reason) => StoreError::Unreadable(reason.clone()).into(),
            None => Refusal::new(404, "not_found", format!("{kind} {id} does not exist")),
        }
    }

    fn apply_market(&mut self, id: &str, r: &Recorded, e: &MarketEvent) {
        if let Some(m) = Market::apply(self.markets.remove(id), id, e) {
            if matches!(e, MarketEvent::MarketCreated { .. } | MarketEvent::TradeExecuted { .. }) {
                self.history.entry(m.id.clone()).or_default().push((r.recorded_at_ms as u64, m.prices()));
            }
            self.markets.insert(id.to_string(), m);
        }
    }
}

/// Why `aggregate` cannot be served: event `r` does not parse.
pub(crate) fn unreadable(aggregate: &str, r: &Recorded, e: &serde_json::Error) -> String {
    format!(
        "{aggregate} cannot be served: its event {} (version {}) is unreadable ({e}); other aggregates are unaffected",
        r.event_id, r.version
    )
}

/// The state a command is decided against: the projection, overlaid with the aggregates earlier
/// members of the same batch changed (decided in order, in memory, committed together).
pub struct View<'a> {
    base: &'a Projection,
    markets: HashMap<String, Market>,
    accounts: HashMap<String, Account>,
}

impl<'a> View<'a> {
    pub fn new(base: &'a Projection) -> Self {
        Self { base, markets: HashMap::new(), accounts: HashMap::new() }
    }

    /// A market: 404 if it does not exist, 503 if its log is unreadable.
    pub fn market(&self, id: &str) -> Result<&Market, Refusal> {
        match self.markets.get(id) {
            Some(m) => Ok(m),
            None => self.base.market(id),
        }
    }

    /// An account, `None` if it does not exist; 503 if its log is unreadable.
    pub fn find_account(&self, id: &str) -> Result<Option<&Account>, Refusal> {
        if let Some(a) = self.accounts.get(id) {
            return Ok(Some(a));
        }
        match self.base.account(id) {
            Ok(a) => Ok(Some(a)),
            Err(r) if r.status == 404 => Ok(None),
            Err(r) => Err(r),
        }
    }

    /// An account: 404 if it does not exist.
    pub fn account(&self, id: &str) -> Result<&Account, Refusal> {
        self.find_account(id)?
            .ok_or_else(|| Refusal::new(404, "not_found", format!("account {id} does not exist")))
    }

    /// Folds a decided command's events into the view, for the next member of the batch.
    pub fn fold(&mut self, appends: &[Append]) {
        for a in appends {
            let id = a.aggregate_id.split_once('-').map_or(a.aggregate_id.as_str(), |(_, id)| id);
            match a.aggregate_type {
                "market" => fold_one(&mut self.markets, &self.base.markets, id, a, Market::apply),
                "account" => fold_one(&mut self.accounts, &self.base.accounts, id, a, Account::apply),
                _ => {}
            }
        }
    }
}

/// Folds one aggregate's new events over its state in the overlay (or, the first time, in the
/// projection).
fn fold_one<T: Clone, E: serde::de::DeserializeOwned>(
    overlay: &mut HashMap<String, T>,
    base: &BTreeMap<String, T>,
    id: &str,
    append: &Append,
    apply: fn(Option<T>, &str, &E) -> Option<T>,
) {
    let mut state = overlay.remove(id).or_else(|| base.get(id).cloned());
    for e in &append.events {
        if let Ok(e) = serde_json::from_str::<E>(&e.payload) {
            state = apply(state, id, &e);
        }
    }
    if let Some(s) = state {
        overlay.insert(id.to_string(), s);
    }
}
