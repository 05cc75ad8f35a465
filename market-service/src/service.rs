//! The application layer: the commands, as decisions over a [`View`] of the projection that the
//! committer ([`crate::commit`]) runs in batches, and who may run them ([`Ctx`]).
//!
//! Concurrency: commands of this instance are decided in order, in memory, and committed
//! together; a command that loses a race with another instance is decided again on fresh state.
//! A caller who pinned a version (`If-Match`) gets 412 when the market is no longer at it.

use std::sync::Arc;

use mesh_runtime::telemetry::{self, KeyValue, Span, SpanContext, SpanKind, Telemetry};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{RwLock, RwLockReadGuard, mpsc, oneshot};

pub use crate::{
    commit::now_ms,
    projection::{Projection, View, account_id, market_id},
    refusal::{Answer, Refusal},
};
use crate::{
    commit::{self, Committer, Pending},
    domain::{self, Account, AccountEvent, Market, MarketEvent, Micro},
    refusal::precondition_failed,
    store::{Append, NewEvent, Store, StoreError},
    views::{AccountOpened, Finished, Granted, MarketView, Quoted, TradeMade},
};

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
    /// The request's span (or its caller's): the parent of the command's span, and the trace
    /// its events carry.
    pub trace: Option<SpanContext>,
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

pub struct Markets {
    pub store: Store,
    telemetry: Telemetry,
    projection: Arc<RwLock<Projection>>,
    queue: mpsc::Sender<Pending>,
    pub commits: Arc<commit::Stats>,
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

/// Events for market `id`, appended only if it is at `expected`.
fn on_market(id: &str, expected: u64, events: Vec<NewEvent>) -> Append {
    Append { aggregate_id: market_id(id), aggregate_type: "market", expected_version: expected, events }
}

/// Events for account `id`, appended only if it is at `expected`.
fn on_account(id: &str, expected: u64, events: Vec<NewEvent>) -> Append {
    Append { aggregate_id: account_id(id), aggregate_type: "account", expected_version: expected, events }
}

/// `If-Match`: the market must still be at the version the caller read (its `ETag`); otherwise
/// 412, and the caller reads it again.
fn pinned(ctx: &Ctx, version: u64) -> Result<(), Refusal> {
    match ctx.expected_version {
        Some(v) if v != version => Err(precondition_failed(format!(
            "If-Match: the market is at version {version}, not {}; read it again",
            if v == u64::MAX { "the one named".to_string() } else { v.to_string() }
        ))),
        _ => Ok(()),
    }
}

/// The caller's own account: a 404 that says how to open it.
fn own_account<'v>(v: &'v View<'_>, user: &str) -> Result<&'v Account, Refusal> {
    v.find_account(user)?.ok_or_else(|| {
        Refusal::new(
            404,
            "no_account",
            format!("{user} has no account yet: POST /accounts opens it (an admin grants it funds)"),
        )
    })
}

impl Markets {
    /// The service over `store` (its committer started), and the receiver of aggregates due for
    /// a snapshot. Must be called inside a Tokio runtime; the committer stops when the service
    /// is dropped.
    pub fn new(
        store: Store,
        snapshot_every: u64,
        telemetry: Telemetry,
    ) -> (Arc<Markets>, mpsc::UnboundedReceiver<String>) {
        let (snapshots, due) = mpsc::unbounded_channel();
        let (queue, rx) = mpsc::channel(4 * commit::MAX_BATCH);
        let projection = Arc::new(RwLock::new(Projection::default()));
        let commits = Arc::new(commit::Stats::default());
        let committer = Committer {
            telemetry: telemetry.clone(),
            stats: commits.clone(),
            store: store.clone(),
            projection: projection.clone(),
            snapshot_every: snapshot_every.max(1),
            snapshots,
        };
        mesh_runtime::spawn(tracing::info_span!("committer"), committer.run(rx));
        (Arc::new(Markets { store, telemetry, projection, queue, commits }), due)
    }

    /// The projection, caught up with everything committed so far (this instance's commits are
    /// in it before their callers are answered; one query picks up other instances').
    pub async fn read(&self) -> Result<RwLockReadGuard<'_, Projection>, StoreError> {
        commit::catch_up(&self.store, &self.projection).await?;
        Ok(self.projection.read().await)
    }

    /// Forgets the projection and rebuilds it from the log.
    pub async fn rebuild(&self) -> Result<i64, StoreError> {
        *self.projection.write().await = Projection::default();
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
                .map_err(|e| StoreError::Unreadable(crate::projection::unreadable(aggregate, r, &e)))?;
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

    /// Snapshots the `aggregates` (`market-…` or `account-…`) at the versions the projection
    /// holds — committed state, no reload from the log — all in one transaction.
    pub async fn snapshot(&self, aggregates: &[String]) -> Result<usize, StoreError> {
        let rows: Vec<(String, u64, String)> = {
            let p = self.projection.read().await;
            aggregates
                .iter()
                .filter_map(|aggregate| {
                    let (version, json) = if let Some(id) = aggregate.strip_prefix("market-") {
                        let m = p.markets.get(id)?;
                        (m.version, serde_json::to_string(m).ok()?)
                    } else {
                        let a = p.accounts.get(aggregate.strip_prefix("account-")?)?;
                        (a.version, serde_json::to_string(a).ok()?)
                    };
                    Some((aggregate.clone(), version, json))
                })
                .collect()
        };
        self.store.save_snapshots(&rows).await?;
        Ok(rows.len())
    }

    /// The stored answer for this request's idempotency key: `Ok(None)` if there is none,
    /// a refusal if the key was used for a different request.
    pub async fn replay(&self, ctx: &Ctx) -> Result<Option<Answer>, Refusal> {
        let Some((key, _)) = &ctx.idempotency else { return Ok(None) };
        match self.store.idempotent(key).await? {
            None => Ok(None),
            Some(stored) => commit::replayed(&ctx.idempotency, &stored).map(Some),
        }
    }

    /// Queues a command for the committer and waits for its answer: given once the batch that
    /// holds it is durable.
    /// `command` names it in its span (`market.trade`).
    async fn submit<F>(&self, command: &'static str, ctx: &Ctx, decide: F) -> Result<Answer, Refusal>
    where
        F: FnMut(&View<'_>) -> Result<(Vec<Append>, Answer), Refusal> + Send + 'static,
    {
        let sampled = ctx.trace.as_ref().filter(|c| c.is_sampled());
        let mut span = sampled.and_then(|parent| {
            let attributes = vec![KeyValue::new("market.command", command)];
            self.telemetry.span(format!("market.{command}"), SpanKind::Internal, Some(parent), attributes)
        });
        let answer = self.decide_and_commit(ctx, span.as_ref(), decide).await;
        if let Some(mut s) = span.take() {
            match &answer {
                Ok((status, _)) => s.set(KeyValue::new("market.status", i64::from(*status))),
                Err(r) => {
                    s.set(KeyValue::new("market.refusal", r.code));
                    if r.status >= 500 {
                        s.fail(r.message.clone());
                    }
                }
            }
            s.end();
        }
        answer
    }

    async fn decide_and_commit<F>(&self, ctx: &Ctx, span: Option<&Span>, decide: F) -> Result<Answer, Refusal>
    where
        F: FnMut(&View<'_>) -> Result<(Vec<Append>, Answer), Refusal> + Send + 'static,
    {
        if let Some(stored) = self.replay(ctx).await? {
            return Ok(stored);
        }
        let stopping =
            || Refusal::new(503, "shutting_down", "the service is stopping; retry on another instance");
        let (reply, answer) = oneshot::channel();
        // The events carry the command's span (or, unrecorded, the request's trace).
        let traceparent =
            span.map(Span::traceparent).or_else(|| ctx.trace.as_ref().map(telemetry::traceparent));
        let pending = Pending::new(Box::new(decide), ctx.idempotency.clone(), reply)
            .traced(span.map(|s| s.context().clone()), traceparent);
        self.queue.send(pending).await.map_err(|_| stopping())?;
        answer.await.map_err(|_| stopping())?
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
        let (id, name, c) = (id.to_string(), name.to_string(), ctx.clone());
        self.submit("open_account", ctx, move |v| {
            if v.find_account(&id)?.is_some() {
                return Err(Refusal::new(409, "exists", format!("account {id} already exists")));
            }
            let evs = [AccountEvent::AccountOpened { name: name.clone() }];
            let appends = vec![on_account(&id, 0, account_events(&evs, &c, ""))];
            let opened =
                AccountOpened { id: id.clone(), name: name.clone(), balance: Micro::ZERO, version: 1 };
            Ok((appends, (201, to_json(&opened))))
        })
        .await
    }

    pub async fn grant(&self, id: &str, amount: Micro, ctx: &Ctx) -> Result<Answer, Refusal> {
        ctx.require_admin("granting funds")?;
        let by = ctx.principal("granting funds")?;
        let (id, c) = (id.to_string(), ctx.clone());
        self.submit("grant", ctx, move |v| {
            let a = v.account(&id)?;
            let evs = domain::grant(a, amount, &by)?;
            let balance = Micro(a.balance.0 + amount.0);
            let appends = vec![on_account(&id, a.version, account_events(&evs, &c, ""))];
            Ok((appends, (200, to_json(&Granted { id: id.clone(), balance, version: a.version + 1 }))))
        })
        .await
    }

    pub async fn create_market(&self, c: &domain::CreateMarket, ctx: &Ctx) -> Result<Answer, Refusal> {
        let id = uuid::Uuid::now_v7().to_string();
        let user = ctx.user("creating a market")?.to_string();
        let (create, cx) = (c.clone(), ctx.clone());
        self.submit("create_market", ctx, move |v| {
            let creator = own_account(v, &user)?;
            let (me, ae) = domain::create_market(&id, &create, creator, now_ms())?;
            let mevs = market_events(&me, &cx, "");
            let cause = mevs[0].event_id.clone();
            let appends = vec![
                on_market(&id, 0, mevs),
                on_account(&creator.id, creator.version, account_events(&ae, &cx, &cause)),
            ];
            let m = Market::replay(None, &id, &me)
                .ok_or_else(|| Refusal::new(500, "internal", "market did not fold"))?;
            Ok((appends, (201, to_json(&MarketView::from(&m)))))
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
        let (id, c) = (id.to_string(), ctx.clone());
        self.submit("update_market", ctx, move |v| {
            let m = v.market(&id)?;
            pinned(&c, m.version)?;
            let me =
                domain::update_market(m, description.clone(), close_time_ms, (&by, c.is_admin), now_ms())?;
            let next = Market::replay(Some(m.clone()), &id, &me)
                .ok_or_else(|| Refusal::new(500, "internal", "fold"))?;
            let appends = vec![on_market(&id, m.version, market_events(&me, &c, ""))];
            Ok((appends, (200, to_json(&MarketView::from(&next)))))
        })
        .await
    }

    pub async fn quote(
        &self,
        id: &str,
        outcome: usize,
        side: domain::Side,
        shares: Micro,
    ) -> Result<Quoted, Refusal> {
        let p = self.read().await?;
        let m = p.market(id)?;
        let quote = domain::quote(m, outcome, side, shares)?;
        Ok(Quoted { market: id.to_string(), version: m.version, quote })
    }

    pub async fn trade(&self, id: &str, t: &domain::Trade, ctx: &Ctx) -> Result<Answer, Refusal> {
        let user = ctx.user("trading")?.to_string();
        let (id, t, c) = (id.to_string(), t.clone(), ctx.clone());
        self.submit("trade", ctx, move |v| {
            let m = v.market(&id)?;
            pinned(&c, m.version)?;
            let a = own_account(v, &user)?;
            let (me, ae, q) = domain::trade(m, a, &t, now_ms())?;
            let mevs = market_events(&me, &c, "");
            let cause = mevs[0].event_id.clone();
            let body = to_json(&TradeMade {
                trade_id: cause.clone(),
                market: id.clone(),
                market_version: m.version + 1,
                account: a.id.clone(),
                balance: Micro(
                    a.balance.0
                        - match t.side {
                            domain::Side::Buy => q.amount.0,
                            domain::Side::Sell => -q.amount.0,
                        },
                ),
                quote: q,
            });
            let appends = vec![
                on_market(&id, m.version, mevs),
                on_account(&a.id, a.version, account_events(&ae, &c, &cause)),
            ];
            Ok((appends, (201, body)))
        })
        .await
    }

    /// Resolve (and settle) or cancel: the market's events plus a credit to every account owed.
    pub async fn finish(&self, id: &str, resolve_to: Option<usize>, ctx: &Ctx) -> Result<Answer, Refusal> {
        let by =
            ctx.principal(if resolve_to.is_some() { "resolving a market" } else { "cancelling a market" })?;
        let (id, c) = (id.to_string(), ctx.clone());
        self.submit(if resolve_to.is_some() { "resolve" } else { "cancel" }, ctx, move |v| {
            let m = v.market(&id)?;
            pinned(&c, m.version)?;
            let (me, credits) = match resolve_to {
                Some(outcome) => domain::resolve(m, outcome, &by, c.is_admin, now_ms())?,
                None => domain::cancel(m, &by, c.is_admin, now_ms())?,
            };
            let reason = if resolve_to.is_some() { "settlement" } else { "refund" };
            let mevs = market_events(&me, &c, "");
            let cause = mevs.last().map(|e| e.event_id.clone()).unwrap_or_default();
            let mut appends = vec![on_market(&id, m.version, mevs)];
            for (acc, amount) in credits.iter().filter(|(_, a)| a.0 > 0) {
                let a = v.account(acc)?;
                let ev = [domain::credit(a, *amount, &id, reason)?];
                appends.push(on_account(acc, a.version, account_events(&ev, &c, &cause)));
            }
            let next = Market::replay(Some(m.clone()), &id, &me)
                .ok_or_else(|| Refusal::new(500, "internal", "fold"))?;
            Ok((appends, (200, to_json(&Finished { market: MarketView::from(&next), credits }))))
        })
        .await
    }

    /// Records an operator's action (what, with who did it) in the operations log: an aggregate
    /// of its own, chained and checkpointed like the rest.
    pub async fn record_operation(&self, event_type: &str, payload: Value, ctx: &Ctx) -> Result<(), Refusal> {
        const LOG: &str = "operations-log";
        for _ in 0..commit::MAX_ATTEMPTS {
            let version = self.store.version(LOG).await?;
            let member = crate::store::Member {
                appends: vec![Append {
                    aggregate_id: LOG.into(),
                    aggregate_type: "operations",
                    expected_version: version,
                    events: vec![NewEvent {
                        event_id: uuid::Uuid::now_v7().to_string(),
                        event_type: event_type.to_string(),
                        payload: payload.to_string(),
                        correlation_id: ctx.correlation_id.clone(),
                        causation_id: String::new(),
                    }],
                }],
                idem: None,
                traceparent: ctx.trace.as_ref().map(telemetry::traceparent),
            };
            let outcome = self.store.append_batch(&[member], true, now_ms() as i64, None).await?;
            if matches!(outcome.first(), Some(crate::store::Outcome::Committed(_))) {
                return Ok(());
            }
        }
        Err(Refusal::new(409, "version_conflict", "the operations log is busy; retry"))
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
            let ctx = Ctx { correlation_id: format!("closer-{}", uuid::Uuid::now_v7()), ..Ctx::default() };
            let c = ctx.clone();
            let answer = self
                .submit("close", &ctx, move |v| {
                    let m = v.market(&id)?;
                    // Someone else may have closed it since: nothing to do.
                    let Some(e) = domain::close(m, now) else {
                        return Err(Refusal::new(409, "market_not_open", "already closed"));
                    };
                    let appends = vec![on_market(&id, m.version, market_events(&[e], &c, ""))];
                    Ok((appends, (200, Value::Null)))
                })
                .await;
            match answer {
                Ok(_) => closed += 1,
                Err(r) if r.status == 409 => {}
                Err(r) => return Err(StoreError::Db(r.message)),
            }
        }
        Ok(closed)
    }
}

/// An answer as stored with its idempotency key and sent.
fn to_json(v: &impl Serialize) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}
