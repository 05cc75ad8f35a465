//! The application layer: loads aggregates (snapshot + tail), runs the pure domain commands,
//! appends the events with expected versions, and keeps an in-memory projection of every
//! market and account caught up from the log for reads.
//!
//! Optimistic concurrency: a command that loses a race (another writer appended to the same
//! aggregate first) is decided again on fresh state, up to [`MAX_ATTEMPTS`] times, unless the
//! caller pinned a version (`If-Match`), in which case the conflict is its answer.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{Mutex, MutexGuard, mpsc};

use crate::{
    domain::{self, Account, AccountEvent, DomainError, Market, MarketEvent, Micro},
    store::{Append, Idempotent, NewEvent, Recorded, Store, StoreError},
};

/// Decisions per command before a lost race is the caller's answer.
pub const MAX_ATTEMPTS: usize = 10;

/// A uniform pick in `0..n` from the clock's low bits and a counter (jitter, not security).
fn rand_below(n: u64) -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0x9e37_79b9_7f4a_7c15);
    let nanos =
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| u64::from(d.subsec_nanos())).unwrap_or(0);
    let mut x = SEQ.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed) ^ nanos;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    (x ^ (x >> 33)) % n.max(1)
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

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

/// Who asks and how: the verified end user, correlation for the audit trail, idempotency, a
/// pinned version.
#[derive(Debug, Clone, Default)]
pub struct Ctx {
    pub correlation_id: String,
    /// (key, hash of the request) when an `Idempotency-Key` was sent; the key is scoped to the
    /// caller, so two users' keys never meet.
    pub idempotency: Option<(String, String)>,
    pub expected_version: Option<u64>,
    /// The end user the gateway verified (`x-mesh-user`, the token's `sub`): whom a command
    /// acts as. Never taken from the body.
    pub user: Option<String>,
    /// The user has the `admin` role, or the caller presented the operator's token.
    pub is_admin: bool,
    /// An `Authorization` header or a user was sent (a wrong one is 403, none at all is 401).
    pub has_credential: bool,
}

/// What to tell a caller who is not signed in.
const SIGN_IN: &str = "send Authorization: Bearer <token> through the gateway (meshctl token issue prints one for the local mesh)";

impl Ctx {
    fn unauthenticated(what: &str) -> Refusal {
        Refusal::new(401, "unauthenticated", format!("{what} needs a signed-in user: {SIGN_IN}"))
    }

    /// The signed-in user a command acts as: 401 without one. The operator's token is no user
    /// (it has no account): 403.
    pub fn user(&self, what: &str) -> Result<&str, Refusal> {
        match &self.user {
            Some(u) => Ok(u),
            None if self.is_admin => Err(Refusal::new(
                403,
                "forbidden",
                format!("{what} acts as a signed-in user; the operator token is not one"),
            )),
            None => Err(Self::unauthenticated(what)),
        }
    }

    /// Who is acting, as the audit trail records it: the user, or `operator` for the
    /// operator's token; 401 for an anonymous caller.
    pub fn principal(&self, what: &str) -> Result<String, Refusal> {
        match &self.user {
            Some(u) => Ok(u.clone()),
            None if self.is_admin => Ok("operator".into()),
            None => Err(Self::unauthenticated(what)),
        }
    }

    /// Refuses unless the caller is an admin (the `admin` role, or the operator's token): 401
    /// without a credential (the answer carries `WWW-Authenticate`), 403 with another one.
    pub fn require_admin(&self, what: &str) -> Result<(), Refusal> {
        match (self.is_admin, self.has_credential) {
            (true, _) => Ok(()),
            (false, false) => Err(Self::unauthenticated(what)),
            (false, true) => Err(Refusal::new(
                403,
                "forbidden",
                format!("{what} needs the admin role (or the operator token); this caller has neither"),
            )),
        }
    }

    /// `owner` itself or an admin; 401 for an anonymous caller, 403 for anyone else.
    pub fn owner_or_admin(&self, owner: &str, what: &str) -> Result<(), Refusal> {
        if self.is_admin || self.user.as_deref() == Some(owner) {
            return Ok(());
        }
        match &self.user {
            None => Err(Self::unauthenticated(what)),
            Some(u) => Err(Refusal::new(403, "forbidden", format!("{what}: {u} is not {owner}"))),
        }
    }
}

fn precondition_failed(message: String) -> Refusal {
    Refusal::new(412, "precondition_failed", message)
}

/// A successful command's answer: status and JSON body.
pub type Answer = (u16, Value);

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
    fn apply(&mut self, r: &Recorded) {
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
fn unreadable(aggregate: &str, r: &Recorded, e: &serde_json::Error) -> String {
    format!(
        "{aggregate} cannot be served: its event {} (version {}) is unreadable ({e}); other aggregates are unaffected",
        r.event_id, r.version
    )
}

pub struct Markets {
    pub store: Store,
    projection: Mutex<Projection>,
    snapshot_every: u64,
    snapshots: mpsc::UnboundedSender<String>,
}

fn events<E: Serialize>(
    list: &[E],
    name: impl Fn(&E) -> &'static str,
    ctx: &Ctx,
    causation: &str,
) -> Vec<NewEvent> {
    list.iter()
        .map(|e| NewEvent {
            event_id: uuid::Uuid::now_v7().to_string(),
            event_type: name(e).to_string(),
            payload: serde_json::to_string(e).unwrap_or_default(),
            correlation_id: ctx.correlation_id.clone(),
            causation_id: causation.to_string(),
        })
        .collect()
}

fn market_events(list: &[MarketEvent], ctx: &Ctx, causation: &str) -> Vec<NewEvent> {
    events(list, MarketEvent::name, ctx, causation)
}

fn account_events(list: &[AccountEvent], ctx: &Ctx, causation: &str) -> Vec<NewEvent> {
    events(list, AccountEvent::name, ctx, causation)
}

pub fn market_id(id: &str) -> String {
    format!("market-{id}")
}

pub fn account_id(id: &str) -> String {
    format!("account-{id}")
}

impl Markets {
    /// The service over `store`, and the receiver of aggregates due for a snapshot.
    pub fn new(store: Store, snapshot_every: u64) -> (Arc<Markets>, mpsc::UnboundedReceiver<String>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let m = Markets {
            store,
            projection: Mutex::new(Projection::default()),
            snapshot_every: snapshot_every.max(1),
            snapshots: tx,
        };
        (Arc::new(m), rx)
    }

    /// The projection, caught up with everything committed so far.
    pub async fn read(&self) -> Result<MutexGuard<'_, Projection>, StoreError> {
        let mut p = self.projection.lock().await;
        loop {
            let batch = self.store.after(p.seq, 1000).await?;
            if batch.is_empty() {
                return Ok(p);
            }
            for r in &batch {
                p.apply(r);
            }
        }
    }

    /// Forgets the projection and rebuilds it from the log.
    pub async fn rebuild(&self) -> Result<i64, StoreError> {
        *self.projection.lock().await = Projection::default();
        Ok(self.read().await?.seq)
    }

    /// An aggregate from its snapshot plus the events after it, folded with `apply`.
    async fn load<T, E>(
        &self,
        aggregate: &str,
        id: &str,
        apply: fn(Option<T>, &str, &E) -> Option<T>,
    ) -> Result<Option<T>, StoreError>
    where
        T: serde::de::DeserializeOwned,
        E: serde::de::DeserializeOwned,
    {
        let (snap, tail) = self.store.load(aggregate).await?;
        let (mut state, tail): (Option<T>, _) = match snap {
            None => (None, tail),
            Some((version, json)) => match serde_json::from_str(&json) {
                Ok(state) => (Some(state), tail),
                Err(e) => {
                    // A snapshot is only a cache of the log: fold the whole stream instead.
                    tracing::warn!(%aggregate, version, error = %e, "snapshot unreadable; folding the whole log");
                    (None, self.store.stream(aggregate).await?)
                }
            },
        };
        for r in &tail {
            let e: E = serde_json::from_str(&r.payload)
                .map_err(|e| StoreError::Unreadable(unreadable(aggregate, r, &e)))?;
            state = apply(state, id, &e);
        }
        Ok(state)
    }

    pub async fn load_market(&self, id: &str) -> Result<Option<Market>, StoreError> {
        self.load(&market_id(id), id, Market::apply).await
    }

    pub async fn load_account(&self, id: &str) -> Result<Option<Account>, StoreError> {
        self.load(&account_id(id), id, Account::apply).await
    }

    /// Takes a snapshot of `aggregate` (`market-…` or `account-…`) at its current version.
    pub async fn snapshot(&self, aggregate: &str) -> Result<(), StoreError> {
        let (version, json) = if let Some(id) = aggregate.strip_prefix("market-") {
            match self.load_market(id).await? {
                Some(m) => (m.version, serde_json::to_string(&m).unwrap_or_default()),
                None => return Ok(()),
            }
        } else if let Some(id) = aggregate.strip_prefix("account-") {
            match self.load_account(id).await? {
                Some(a) => (a.version, serde_json::to_string(&a).unwrap_or_default()),
                None => return Ok(()),
            }
        } else {
            return Ok(());
        };
        self.store.save_snapshot(aggregate, version, &json).await
    }

    /// Appends, asks for snapshots that fell due, and returns the answer. An idempotency key
    /// that lost a race to an identical request gets that request's stored answer.
    async fn commit(&self, appends: Vec<Append>, ctx: &Ctx, answer: Answer) -> Result<Answer, StoreError> {
        let idem = ctx.idempotency.as_ref().map(|(key, hash)| Idempotent {
            key: key.clone(),
            request_hash: hash.clone(),
            status: answer.0,
            response: answer.1.to_string(),
        });
        match self.store.append(&appends, true, idem.as_ref(), now_ms() as i64).await {
            Ok(_) => {
                for a in &appends {
                    let before = a.expected_version / self.snapshot_every;
                    let after = (a.expected_version + a.events.len() as u64) / self.snapshot_every;
                    if after > before {
                        let _ = self.snapshots.send(a.aggregate_id.clone());
                    }
                }
                Ok(answer)
            }
            Err(StoreError::Db(msg)) if idem.is_some() => match self.replay(ctx).await {
                Ok(Some(stored)) => Ok(stored),
                _ => Err(StoreError::Db(msg)),
            },
            Err(e) => Err(e),
        }
    }

    /// The stored answer for this request's idempotency key: `Ok(None)` if there is none,
    /// a refusal if the key was used for a different request.
    pub async fn replay(&self, ctx: &Ctx) -> Result<Option<Answer>, Refusal> {
        let Some((key, hash)) = &ctx.idempotency else { return Ok(None) };
        match self.store.idempotent(key).await? {
            None => Ok(None),
            Some(stored) if &stored.request_hash == hash => {
                Ok(Some((stored.status, serde_json::from_str(&stored.response).unwrap_or(Value::Null))))
            }
            Some(_) => Err(Refusal::new(
                422,
                "idempotency_key_reused",
                format!("Idempotency-Key {key:?} was used for a different request"),
            )),
        }
    }

    /// Runs `attempt` until it commits, retrying lost races unless a version was pinned.
    async fn with_retries<F, Fut>(&self, ctx: &Ctx, mut attempt: F) -> Result<Answer, Refusal>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(Vec<Append>, Answer), Refusal>>,
    {
        if let Some(stored) = self.replay(ctx).await? {
            return Ok(stored);
        }
        for n in 1..=MAX_ATTEMPTS {
            let (appends, answer) = attempt().await?;
            match self.commit(appends, ctx, answer).await {
                Ok(a) => return Ok(a),
                Err(StoreError::Conflict { .. }) if ctx.expected_version.is_none() && n < MAX_ATTEMPTS => {
                    // Full jitter over a doubling cap (2 ms … 20 ms), so racing writers spread
                    // out instead of colliding again.
                    let cap_us = (1000u64 << n.min(5)).min(20_000);
                    tokio::time::sleep(std::time::Duration::from_micros(rand_below(cap_us))).await;
                    continue;
                }
                // A pinned version that lost the race: the precondition no longer holds.
                Err(StoreError::Conflict { .. }) if ctx.expected_version.is_some() => {
                    return Err(precondition_failed(
                        "If-Match: the market changed while this command was decided; read it again".into(),
                    ));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(Refusal::new(409, "version_conflict", "too much contention on this market; retry"))
    }

    /// `If-Match`: the market must still be at the version the caller read (its `ETag`);
    /// otherwise 412, and the caller reads it again.
    fn pinned(ctx: &Ctx, version: u64) -> Result<(), Refusal> {
        match ctx.expected_version {
            Some(v) if v != version => Err(precondition_failed(format!(
                "If-Match: the market is at version {version}, not {}; read it again",
                if v == u64::MAX { "the one named".to_string() } else { v.to_string() }
            ))),
            _ => Ok(()),
        }
    }

    async fn market(&self, id: &str) -> Result<Market, Refusal> {
        self.load_market(id)
            .await?
            .ok_or_else(|| Refusal::new(404, "not_found", format!("market {id} does not exist")))
    }

    /// The caller's own account: a 404 that says how to open it.
    async fn own_account(&self, user: &str) -> Result<Account, Refusal> {
        self.load_account(user).await?.ok_or_else(|| {
            Refusal::new(
                404,
                "no_account",
                format!("{user} has no account yet: POST /accounts opens it (an admin grants it funds)"),
            )
        })
    }

    async fn account(&self, id: &str) -> Result<Account, Refusal> {
        self.load_account(id)
            .await?
            .ok_or_else(|| Refusal::new(404, "not_found", format!("account {id} does not exist")))
    }

    /// Opens the caller's account: its id is the caller's subject. An admin may open one for
    /// another subject (`id`); anyone else naming another id is refused.
    pub async fn open_account(&self, id: Option<&str>, name: &str, ctx: &Ctx) -> Result<Answer, Refusal> {
        let id = match (id, ctx.user.as_deref()) {
            (Some(id), _) if ctx.is_admin => id,
            (None, None) if ctx.is_admin => {
                return Err(Refusal {
                    field: Some("id"),
                    ..Refusal::new(400, "invalid", "id: name the account to open for another user")
                });
            }
            (Some(id), Some(user)) if id != user => {
                return Err(Refusal {
                    field: Some("id"),
                    ..Refusal::new(
                        403,
                        "forbidden",
                        format!("an account's id is its owner's: yours is {user}, not {id}"),
                    )
                });
            }
            _ => ctx.user("opening an account")?,
        };
        if !domain::valid_account_id(id) {
            return Err(Refusal {
                field: Some("id"),
                ..Refusal::new(
                    400,
                    "invalid",
                    format!("id: 1..={} characters of A-Z, a-z, 0-9 and _.@:|+-", domain::MAX_ACCOUNT_ID),
                )
            });
        }
        if name.chars().count() > domain::MAX_NAME {
            return Err(Refusal {
                field: Some("name"),
                ..Refusal::new(400, "invalid", "name: at most 200 characters")
            });
        }
        self.with_retries(ctx, || async {
            if self.load_account(id).await?.is_some() {
                return Err(Refusal::new(409, "exists", format!("account {id} already exists")));
            }
            let evs = [AccountEvent::AccountOpened { name: name.to_string() }];
            let appends = vec![Append {
                aggregate_id: account_id(id),
                aggregate_type: "account",
                expected_version: 0,
                events: account_events(&evs, ctx, ""),
            }];
            Ok((appends, (201, json!({"id": id, "name": name, "balance": Micro::ZERO, "version": 1}))))
        })
        .await
    }

    pub async fn grant(&self, id: &str, amount: Micro, ctx: &Ctx) -> Result<Answer, Refusal> {
        ctx.require_admin("granting funds")?;
        let by = ctx.principal("granting funds")?;
        self.with_retries(ctx, || async {
            let a = self.account(id).await?;
            let evs = domain::grant(&a, amount, &by)?;
            let balance = Micro(a.balance.0 + amount.0);
            let appends = vec![Append {
                aggregate_id: account_id(id),
                aggregate_type: "account",
                expected_version: a.version,
                events: account_events(&evs, ctx, ""),
            }];
            Ok((appends, (200, json!({"id": id, "balance": balance, "version": a.version + 1}))))
        })
        .await
    }

    pub async fn create_market(&self, c: &domain::CreateMarket, ctx: &Ctx) -> Result<Answer, Refusal> {
        let id = uuid::Uuid::now_v7().to_string();
        let user = ctx.user("creating a market")?;
        self.with_retries(ctx, || async {
            let creator = self.own_account(user).await?;
            let (me, ae) = domain::create_market(&id, c, &creator, now_ms())?;
            let mevs = market_events(&me, ctx, "");
            let cause = mevs[0].event_id.clone();
            let appends = vec![
                Append {
                    aggregate_id: market_id(&id),
                    aggregate_type: "market",
                    expected_version: 0,
                    events: mevs,
                },
                Append {
                    aggregate_id: account_id(&creator.id),
                    aggregate_type: "account",
                    expected_version: creator.version,
                    events: account_events(&ae, ctx, &cause),
                },
            ];
            let m = Market::replay(None, &id, &me)
                .ok_or_else(|| Refusal::new(500, "internal", "market did not fold"))?;
            Ok((appends, (201, market_json(&m))))
        })
        .await
    }

    pub async fn update_market(
        &self,
        id: &str,
        description: Option<String>,
        close_time_ms: Option<u64>,
        ctx: &Ctx,
    ) -> Result<Answer, Refusal> {
        let by = ctx.principal("changing a market")?;
        self.with_retries(ctx, || async {
            let m = self.market(id).await?;
            Self::pinned(ctx, m.version)?;
            let me =
                domain::update_market(&m, description.clone(), close_time_ms, (&by, ctx.is_admin), now_ms())?;
            let next = Market::replay(Some(m.clone()), id, &me)
                .ok_or_else(|| Refusal::new(500, "internal", "fold"))?;
            let appends = vec![Append {
                aggregate_id: market_id(id),
                aggregate_type: "market",
                expected_version: m.version,
                events: market_events(&me, ctx, ""),
            }];
            Ok((appends, (200, market_json(&next))))
        })
        .await
    }

    pub async fn quote(
        &self,
        id: &str,
        outcome: usize,
        side: domain::Side,
        shares: Micro,
    ) -> Result<Value, Refusal> {
        let m = self.market(id).await?;
        let q = domain::quote(&m, outcome, side, shares)?;
        Ok(json!({ "market": id, "version": m.version, "quote": q }))
    }

    pub async fn trade(&self, id: &str, t: &domain::Trade, ctx: &Ctx) -> Result<Answer, Refusal> {
        let user = ctx.user("trading")?;
        self.with_retries(ctx, || async {
            let m = self.market(id).await?;
            Self::pinned(ctx, m.version)?;
            let a = self.own_account(user).await?;
            let (me, ae, q) = domain::trade(&m, &a, t, now_ms())?;
            let mevs = market_events(&me, ctx, "");
            let cause = mevs[0].event_id.clone();
            let body = json!({
                "trade_id": cause, "market": id, "market_version": m.version + 1, "account": a.id,
                "balance": Micro(a.balance.0 - match t.side { domain::Side::Buy => q.amount.0, domain::Side::Sell => -q.amount.0 }),
                "quote": q,
            });
            let appends = vec![
                Append { aggregate_id: market_id(id), aggregate_type: "market", expected_version: m.version, events: mevs },
                Append { aggregate_id: account_id(&a.id), aggregate_type: "account", expected_version: a.version, events: account_events(&ae, ctx, &cause) },
            ];
            Ok((appends, (201, body)))
        })
        .await
    }

    /// Resolve (and settle) or cancel: the market's events plus a credit to every account owed.
    pub async fn finish(&self, id: &str, resolve_to: Option<usize>, ctx: &Ctx) -> Result<Answer, Refusal> {
        let by =
            ctx.principal(if resolve_to.is_some() { "resolving a market" } else { "cancelling a market" })?;
        let by = by.as_str();
        self.with_retries(ctx, || async {
            let m = self.market(id).await?;
            Self::pinned(ctx, m.version)?;
            let (me, credits) = match resolve_to {
                Some(outcome) => domain::resolve(&m, outcome, by, ctx.is_admin, now_ms())?,
                None => domain::cancel(&m, by, ctx.is_admin, now_ms())?,
            };
            let reason = if resolve_to.is_some() { "settlement" } else { "refund" };
            let mevs = market_events(&me, ctx, "");
            let cause = mevs.last().map(|e| e.event_id.clone()).unwrap_or_default();
            let mut appends = vec![Append {
                aggregate_id: market_id(id),
                aggregate_type: "market",
                expected_version: m.version,
                events: mevs,
            }];
            for (acc, amount) in credits.iter().filter(|(_, a)| a.0 > 0) {
                let a = self.account(acc).await?;
                let ev = [domain::credit(&a, *amount, id, reason)?];
                appends.push(Append {
                    aggregate_id: account_id(acc),
                    aggregate_type: "account",
                    expected_version: a.version,
                    events: account_events(&ev, ctx, &cause),
                });
            }
            let next = Market::replay(Some(m.clone()), id, &me)
                .ok_or_else(|| Refusal::new(500, "internal", "fold"))?;
            Ok((appends, (200, json!({ "market": market_json(&next), "credits": credits }))))
        })
        .await
    }

    /// Closes markets whose close time has passed (the background closer).
    pub async fn close_due(&self) -> Result<usize, StoreError> {
        let now = now_ms();
        let due: Vec<String> = self
            .read()
            .await?
            .markets
            .values()
            .filter(|m| domain::close(m, now).is_some())
            .map(|m| m.id.clone())
            .collect();
        let mut closed = 0;
        for id in due {
            let Some(m) = self.load_market(&id).await? else { continue };
            let Some(e) = domain::close(&m, now) else { continue };
            let ctx = Ctx { correlation_id: format!("closer-{}", uuid::Uuid::now_v7()), ..Ctx::default() };
            let appends = vec![Append {
                aggregate_id: market_id(&id),
                aggregate_type: "market",
                expected_version: m.version,
                events: market_events(&[e], &ctx, ""),
            }];
            match self.commit(appends, &ctx, (200, Value::Null)).await {
                Ok(_) => closed += 1,
                Err(StoreError::Conflict { .. }) => {} // someone else changed it; next round
                Err(e) => return Err(e),
            }
        }
        Ok(closed)
    }
}

/// A market as the API shows it.
pub fn market_json(m: &Market) -> Value {
    json!({
        "id": m.id, "version": m.version, "question": m.question, "description": m.description,
        "category": m.category, "outcomes": m.outcomes, "prices": m.prices(), "status": m.status,
        "winner": m.winner, "close_time_ms": m.close_time_ms, "creator": m.creator,
        "created_at_ms": m.created_at_ms, "liquidity": m.liquidity, "subsidy": m.subsidy,
        "shares": m.shares, "pool": m.pool, "volume": m.volume, "trades": m.trades,
        "unique_traders": m.traders().len(),
    })
}
