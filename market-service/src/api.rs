//! The HTTP JSON API (axum). Every refusal is a JSON body `{"error", "message", "field"?}`
//! with a 4xx status; bodies are parsed strictly (unknown fields, wrong types and malformed JSON
//! are 400s naming the problem). Every POST honours `Idempotency-Key`: a repeated key with the
//! same request gets the first answer, and the change it made is applied once. A market read
//! carries a strong `ETag` (its version; `If-None-Match` → 304); `If-Match` with it pins the
//! version a command expects (412 when it moved on; `*`: the market must exist).
//!
//! Who acts is the end user the gateway verified ([`USER_HEADER`], with [`ROLES_HEADER`]), never
//! a name in the body: a trade debits the caller's own account, a new market is the caller's,
//! only its creator or an admin changes, resolves or cancels it, accounts are read by their
//! owner. A write without a user is 401, acting on someone else's market or account is 403.
//! The operator's bearer token (a file given to the binary) is an admin without an account.

use std::sync::Arc;

use axum::{
    Json, Router,
    body::Bytes,
    extract::{FromRequest, Path, Query, Request, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::{Value, json};

use crate::{
    domain::{self, Micro, Status},
    service::{Answer, Ctx, Markets, Refusal, market_json},
    store::verify_chain,
};

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;

pub struct AppState {
    pub markets: Arc<Markets>,
    pub admin_token: Option<String>,
    /// The checkpoint signer (its public key is what `/audit/verify` trusts).
    pub signer: Option<Arc<crate::audit::Signer>>,
    /// Where the checkpoints are read back from the bus.
    pub sidecar_admin: Option<String>,
}

type S = State<Arc<AppState>>;

/// Problem details (RFC 9457, `application/problem+json`): `type` names the problem
/// (`/problems/<code>`, described there), `title` its kind, `status`, `detail` what happened and
/// what to do; the mesh's own `error` (the code), `message` (the detail) and `field` (the input
/// at fault) ride along as extension members.
impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut body = mesh_runtime::error_body(
            self.code,
            &self.message,
            json!({
                "type": format!("/problems/{}", self.code),
                "title": crate::refusal::title(self.code),
                "status": status.as_u16(),
                "detail": self.message,
            }),
        );
        if let Some(f) = self.field {
            body["field"] = json!(f);
        }
        let mut resp = (status, [(header::CONTENT_TYPE, PROBLEM_JSON)], body.to_string()).into_response();
        if self.status == 401 {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer realm=\"market-service\""),
            );
        }
        resp
    }
}

pub const PROBLEM_JSON: &str = "application/problem+json";

fn answer((status, body): Answer) -> Response {
    (StatusCode::from_u16(status).unwrap_or(StatusCode::OK), Json(body)).into_response()
}

/// A 201 names what it created (`Location`, RFC 9110 §15.3.2); other answers as they are.
fn created(a: Answer, location: impl FnOnce(&Value) -> Option<String>) -> Response {
    let place = if a.0 == 201 { location(&a.1) } else { None };
    let mut resp = answer(a);
    if let Some(l) = place.and_then(|l| http::HeaderValue::from_str(&l).ok()) {
        resp.headers_mut().insert(header::LOCATION, l);
    }
    resp
}

/// A read of an aggregate at `version`: its strong `ETag`, or 304 when `If-None-Match` names
/// it (or `*`).
fn conditional(h: &HeaderMap, version: u64, resp: impl IntoResponse) -> Response {
    let tag = etag(version);
    let unchanged = h
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == "*" || t.trim().trim_start_matches("W/") == tag));
    if unchanged {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, tag)]).into_response();
    }
    let mut resp = resp.into_response();
    if let Ok(v) = http::HeaderValue::from_str(&tag) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    resp
}

/// What a problem type (`/problems/<code>`) means.
async fn problem(Path(code): Path<String>) -> Result<Json<Value>, Refusal> {
    match crate::refusal::PROBLEMS.iter().find(|(c, ..)| *c == code) {
        Some((c, status, description)) => Ok(Json(json!({
            "type": format!("/problems/{c}"), "title": crate::refusal::title(c), "status": status,
            "description": description,
        }))),
        None => Err(Refusal::new(404, "not_found", format!("no problem type {code}"))),
    }
}

/// A JSON body parsed strictly (an empty one is `{}`); failures are 400s with the parser's
/// reason.
pub struct Body<T>(pub T, pub Bytes);

impl<T: DeserializeOwned, St: Send + Sync> FromRequest<St> for Body<T> {
    type Rejection = Refusal;

    async fn from_request(req: Request, state: &St) -> Result<Self, Refusal> {
        if let Some(ct) = req.headers().get(header::CONTENT_TYPE)
            && !ct.to_str().unwrap_or("").starts_with("application/json")
        {
            return Err(Refusal::new(415, "unsupported_media_type", "send the body as application/json"));
        }
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| Refusal::new(413, "body_too_large", format!("cannot read the body: {e}")))?;
        // No body reads as `{}`: a command without fields needs none.
        let json: &[u8] = if bytes.is_empty() { b"{}" } else { &bytes };
        let value = serde_json::from_slice(json)
            .map_err(|e| Refusal::new(400, "invalid_body", format!("invalid JSON body: {e}")))?;
        Ok(Body(value, bytes))
    }
}

/// The verified end user: set by the gateway from a checked token, and kept by this service's
/// sidecar only on calls from a trusted edge (a client can never send it). The service listens
/// where only its sidecar reaches it, so it takes the header as given.
pub const USER_HEADER: &str = "x-mesh-user";
/// The verified end user's roles, comma separated; `admin` may grant funds and act on any
/// market.
pub const ROLES_HEADER: &str = "x-mesh-user-roles";
pub const ADMIN_ROLE: &str = "admin";

fn ctx(s: &AppState, h: &HeaderMap, method_path: &str, body: &[u8]) -> Result<Ctx, Refusal> {
    let header = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let user = header(USER_HEADER).filter(|u| !u.is_empty());
    let idempotency = match header("idempotency-key") {
        None => None,
        Some(k) if k.is_empty() || k.len() > 200 => {
            return Err(Refusal::new(400, "invalid", "Idempotency-Key: 1..=200 characters"));
        }
        Some(k) => {
            let digest = mesh_runtime::sha256(&[method_path.as_bytes(), b"\n", body].concat());
            // Scoped to the caller (an account id holds no '/'), so users' keys never collide.
            Some((format!("{}/{k}", user.as_deref().unwrap_or("")), mesh_runtime::hex(&digest)))
        }
    };
    let expected_version = match header("if-match") {
        None => None,
        Some(v) => if_match(&v)?,
    };
    let role_admin =
        user.is_some() && header(ROLES_HEADER).is_some_and(|r| r.split(',').any(|r| r.trim() == ADMIN_ROLE));
    let operator = match (&s.admin_token, header("authorization")) {
        (Some(token), Some(auth)) => auth.strip_prefix("Bearer ").is_some_and(|t| t == token),
        _ => false,
    };
    let correlation_id = header("x-correlation-id")
        .or_else(|| header("x-request-id"))
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let has_credential = user.is_some() || h.contains_key(header::AUTHORIZATION);
    Ok(Ctx {
        correlation_id,
        idempotency,
        expected_version,
        user,
        is_admin: role_admin || operator,
        has_credential,
    })
}

/// A market's strong entity tag: its version.
fn etag(version: u64) -> String {
    format!("\"{version}\"")
}

/// `If-Match`: `*` (the market must exist: no pin), or the strong tag (`"7"`, or a bare `7`)
/// the caller read. A weak tag never matches a strong comparison: it pins a version that cannot
/// be, so the command is refused with 412.
fn if_match(v: &str) -> Result<Option<u64>, Refusal> {
    let v = v.trim();
    if v == "*" {
        return Ok(None);
    }
    if v.starts_with("W/") {
        return Ok(Some(u64::MAX));
    }
    v.trim_matches('"').parse::<u64>().map(Some).map_err(|_| {
        Refusal::new(400, "invalid", "If-Match: the market's ETag (\"7\"), a version number, or *")
    })
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/openapi.json", get(openapi))
        .route("/accounts", post(open_account))
        .route("/accounts/{id}", get(get_account))
        .route("/accounts/{id}/grants", post(grant))
        .route("/markets", post(create_market).get(list_markets))
        .route("/markets/{id}", get(get_market).patch(update_market))
        .route("/markets/{id}/quote", post(quote))
        .route("/markets/{id}/trades", post(trade))
        .route("/markets/{id}/trades/{trade}", get(get_trade))
        .route("/problems/{code}", get(problem))
        .route("/markets/{id}/resolve", post(resolve))
        .route("/markets/{id}/cancel", post(cancel))
        .route("/markets/{id}/positions", get(positions))
        .route("/markets/{id}/history", get(history))
        .route("/markets/{id}/events", get(audit_trail))
        .route("/markets/{id}/audit", get(audit_verify))
        .route("/analytics/platform", get(platform))
        .route("/analytics/markets/{id}", get(market_analytics))
        .route("/admin/projections/rebuild", post(rebuild))
        .route("/audit/verify", get(verify_audit))
        .fallback(|| async { Refusal::new(404, "not_found", "no such endpoint; see /openapi.json") })
        .method_not_allowed_fallback(|| async {
            Refusal::new(
                405,
                "method_not_allowed",
                "this endpoint does not take that method; see /openapi.json",
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// Up while the database answers; aggregates left out of the projection because their log holds
/// an unreadable event are listed (the service keeps serving the rest).
async fn healthz(State(s): S) -> Response {
    match s.markets.read().await {
        Ok(p) => Json(json!({
            "status": "ok",
            "backend": s.markets.store.backend(),
            "unreadable_aggregates": p.unreadable,
            "group_commit": {
                "batches": s.markets.commits.batches.load(std::sync::atomic::Ordering::Relaxed),
                "commands": s.markets.commits.commands.load(std::sync::atomic::Ordering::Relaxed),
            },
        }))
        .into_response(),
        Err(e) => Refusal::new(503, "database_unavailable", e.to_string()).into_response(),
    }
}

async fn openapi() -> Json<Value> {
    Json(crate::openapi::document())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OpenAccount {
    /// Only an admin opening an account for someone else names it; otherwise it is the caller.
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: String,
}

async fn open_account(
    State(s): S,
    h: HeaderMap,
    Body(b, raw): Body<OpenAccount>,
) -> Result<Response, Refusal> {
    let c = ctx(&s, &h, "POST /accounts", &raw)?;
    let a = s.markets.open_account(b.id.as_deref(), &b.name, &c).await?;
    Ok(created(a, |b| Some(format!("/accounts/{}", b["id"].as_str()?))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Grant {
    amount: Micro,
}

async fn grant(
    State(s): S,
    Path(id): Path<String>,
    h: HeaderMap,
    Body(b, raw): Body<Grant>,
) -> Result<Response, Refusal> {
    let c = ctx(&s, &h, &format!("POST /accounts/{id}/grants"), &raw)?;
    Ok(answer(s.markets.grant(&id, b.amount, &c).await?))
}

/// An account: its owner's or an admin's to read (`me`: the caller's own).
async fn get_account(State(s): S, Path(id): Path<String>, h: HeaderMap) -> Result<Response, Refusal> {
    let c = ctx(&s, &h, "", b"")?;
    let id = match (id.as_str(), &c.user) {
        ("me", Some(user)) => user.clone(),
        _ => id,
    };
    c.owner_or_admin(&id, "reading an account")?;
    let p = s.markets.read().await?;
    let a = p.account(&id)?;
    let positions: Vec<Value> = p
        .markets
        .values()
        .filter_map(|m| m.positions.get(&id).map(|ps| (m, ps)))
        .flat_map(|(m, ps)| {
            ps.iter().enumerate().filter(|(_, p)| p.shares.0 > 0).map(move |(o, p)| {
                json!({"market": m.id, "outcome": o, "outcome_name": m.outcomes[o], "shares": p.shares, "net_paid": p.net_paid, "status": m.status})
            })
        })
        .collect();
    let body = json!({"id": a.id, "name": a.name, "balance": a.balance, "granted": a.granted, "version": a.version, "positions": positions});
    // One user's account: no shared cache may keep it.
    Ok(conditional(&h, a.version, ([(header::CACHE_CONTROL, "private, no-store")], Json(body))))
}

async fn create_market(
    State(s): S,
    h: HeaderMap,
    Body(b, raw): Body<domain::CreateMarket>,
) -> Result<Response, Refusal> {
    let c = ctx(&s, &h, "POST /markets", &raw)?;
    let a = s.markets.create_market(&b, &c).await?;
    Ok(created(a, |b| Some(format!("/markets/{}", b["id"].as_str()?))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    status: Option<String>,
    category: Option<String>,
    limit: Option<usize>,
    offset: Option<usize>,
}

async fn list_markets(
    State(s): S,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, Refusal> {
    let Query(q) = q.map_err(|e| Refusal::new(400, "invalid_query", e.body_text()))?;
    let status = match q.status.as_deref() {
        None => None,
        Some(st) => Some(Status::parse(st).ok_or_else(|| Refusal {
            field: Some("status"),
            ..Refusal::new(400, "invalid", "status: open, closed, resolved or cancelled")
        })?),
    };
    let limit = q.limit.unwrap_or(50);
    if limit == 0 || limit > 500 {
        return Err(Refusal { field: Some("limit"), ..Refusal::new(400, "invalid", "limit: 1..=500") });
    }
    let offset = q.offset.unwrap_or(0);
    let p = s.markets.read().await?;
    let mut all: Vec<_> = p
        .markets
        .values()
        .filter(|m| {
            status.is_none_or(|st| m.status == st) && q.category.as_deref().is_none_or(|c| m.category == c)
        })
        .collect();
    all.sort_by(|a, b| b.created_at_ms.cmp(&a.created_at_ms).then(b.id.cmp(&a.id)));
    let total = all.len();
    let page: Vec<Value> = all.into_iter().skip(offset).take(limit).map(market_json).collect();
    Ok(Json(json!({"total": total, "offset": offset, "limit": limit, "markets": page})))
}

/// A market with its `ETag` (its version); `If-None-Match` naming it (or `*`) is 304.
async fn get_market(State(s): S, Path(id): Path<String>, h: HeaderMap) -> Result<Response, Refusal> {
    let p = s.markets.read().await?;
    let m = p.market(&id)?;
    Ok(conditional(&h, m.version, Json(market_json(m))))
}

/// One trade as recorded: the market's `TradeExecuted` event (where a 201 trade points).
async fn get_trade(State(s): S, Path((id, trade)): Path<(String, String)>) -> Result<Json<Value>, Refusal> {
    let missing = || Refusal::new(404, "not_found", format!("market {id} has no trade {trade}"));
    let e = s.markets.store.event(&trade).await?.ok_or_else(missing)?;
    if e.aggregate_id != crate::service::market_id(&id) || e.event_type != "TradeExecuted" {
        return Err(missing());
    }
    Ok(Json(json!({
        "trade_id": e.event_id, "market": id, "market_version": e.version,
        "trade": serde_json::from_str::<Value>(&e.payload).unwrap_or(Value::Null),
        "recorded_at_ms": e.recorded_at_ms, "correlation_id": e.correlation_id,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateMarket {
    description: Option<String>,
    close_time_ms: Option<u64>,
}

async fn update_market(
    State(s): S,
    Path(id): Path<String>,
    h: HeaderMap,
    Body(b, raw): Body<UpdateMarket>,
) -> Result<Response, Refusal> {
    let c = ctx(&s, &h, &format!("PATCH /markets/{id}"), &raw)?;
    Ok(answer(s.markets.update_market(&id, b.description, b.close_time_ms, &c).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QuoteReq {
    outcome: usize,
    side: domain::Side,
    shares: Micro,
}

async fn quote(
    State(s): S,
    Path(id): Path<String>,
    Body(b, _): Body<QuoteReq>,
) -> Result<Json<Value>, Refusal> {
    Ok(Json(s.markets.quote(&id, b.outcome, b.side, b.shares).await?))
}

async fn trade(
    State(s): S,
    Path(id): Path<String>,
    h: HeaderMap,
    Body(b, raw): Body<domain::Trade>,
) -> Result<Response, Refusal> {
    let c = ctx(&s, &h, &format!("POST /markets/{id}/trades"), &raw)?;
    let a = s.markets.trade(&id, &b, &c).await?;
    Ok(created(a, |b| Some(format!("/markets/{id}/trades/{}", b["trade_id"].as_str()?))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Resolve {
    outcome: usize,
}

async fn resolve(
    State(s): S,
    Path(id): Path<String>,
    h: HeaderMap,
    Body(b, raw): Body<Resolve>,
) -> Result<Response, Refusal> {
    let c = ctx(&s, &h, &format!("POST /markets/{id}/resolve"), &raw)?;
    Ok(answer(s.markets.finish(&id, Some(b.outcome), &c).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Cancel {}

async fn cancel(
    State(s): S,
    Path(id): Path<String>,
    h: HeaderMap,
    Body(Cancel {}, raw): Body<Cancel>,
) -> Result<Response, Refusal> {
    let c = ctx(&s, &h, &format!("POST /markets/{id}/cancel"), &raw)?;
    Ok(answer(s.markets.finish(&id, None, &c).await?))
}

async fn positions(State(s): S, Path(id): Path<String>) -> Result<Json<Value>, Refusal> {
    let p = s.markets.read().await?;
    let m = p.market(&id)?;
    let list: Vec<Value> = m
        .positions
        .iter()
        .flat_map(|(acc, ps)| {
            ps.iter().enumerate().filter(|(_, p)| p.shares.0 > 0 || p.net_paid.0 != 0).map(move |(o, p)| {
                json!({"account": acc, "outcome": o, "shares": p.shares, "net_paid": p.net_paid})
            })
        })
        .collect();
    Ok(Json(json!({"market": id, "version": m.version, "positions": list})))
}

async fn history(State(s): S, Path(id): Path<String>) -> Result<Json<Value>, Refusal> {
    let p = s.markets.read().await?;
    p.market(&id)?;
    let points: Vec<Value> = p
        .history
        .get(&id)
        .into_iter()
        .flatten()
        .map(|(t, prices)| json!({"at_ms": t, "prices": prices}))
        .collect();
    Ok(Json(json!({"market": id, "points": points})))
}

async fn audit_trail(State(s): S, Path(id): Path<String>) -> Result<Json<Value>, Refusal> {
    let events = s.markets.store.stream(&crate::service::market_id(&id)).await?;
    if events.is_empty() {
        return Err(Refusal::new(404, "not_found", format!("market {id} does not exist")));
    }
    let list: Vec<Value> = events
        .iter()
        .map(|e| {
            json!({
                "version": e.version, "event_id": e.event_id, "type": e.event_type,
                "data": serde_json::from_str::<Value>(&e.payload).unwrap_or(Value::Null),
                "correlation_id": e.correlation_id, "causation_id": e.causation_id,
                "recorded_at_ms": e.recorded_at_ms, "prev_hash": e.prev_hash, "hash": e.hash,
            })
        })
        .collect();
    Ok(Json(json!({"market": id, "events": list})))
}

async fn audit_verify(State(s): S, Path(id): Path<String>) -> Result<Json<Value>, Refusal> {
    let events = s.markets.store.stream(&crate::service::market_id(&id)).await?;
    if events.is_empty() {
        return Err(Refusal::new(404, "not_found", format!("market {id} does not exist")));
    }
    Ok(Json(match verify_chain(&events) {
        Ok(n) => json!({"market": id, "valid": true, "events": n, "head": events[n - 1].hash}),
        Err((version, reason)) => {
            json!({"market": id, "valid": false, "events": events.len(), "first_invalid_version": version, "reason": reason})
        }
    }))
}

async fn platform(State(s): S) -> Result<Json<Value>, Refusal> {
    let p = s.markets.read().await?;
    let mut by_status = serde_json::Map::new();
    for st in ["open", "closed", "resolved", "cancelled"] {
        let n = p.markets.values().filter(|m| Some(m.status) == Status::parse(st)).count();
        by_status.insert(st.into(), json!(n));
    }
    let volume = Micro(crate::domain::money::sum(p.markets.values().map(|m| m.volume.0)));
    let trades: u64 = p.markets.values().map(|m| m.trades).sum();
    let traders: std::collections::BTreeSet<&String> =
        p.markets.values().flat_map(|m| m.positions.keys()).collect();
    let mut top: Vec<_> = p.markets.values().collect();
    top.sort_by(|a, b| b.volume.cmp(&a.volume).then(a.id.cmp(&b.id)));
    let top: Vec<Value> = top
        .iter()
        .take(10)
        .map(|m| json!({"id": m.id, "question": m.question, "volume": m.volume, "trades": m.trades}))
        .collect();
    Ok(Json(json!({
        "markets": p.markets.len(), "markets_by_status": by_status, "accounts": p.accounts.len(),
        "volume": volume, "trades": trades, "unique_traders": traders.len(), "top_markets": top,
    })))
}

async fn market_analytics(State(s): S, Path(id): Path<String>) -> Result<Json<Value>, Refusal> {
    let p = s.markets.read().await?;
    let m = p.market(&id)?;
    Ok(Json(json!({
        "market": id, "volume": m.volume, "trades": m.trades, "unique_traders": m.traders().len(),
        "prices": m.prices(), "pool": m.pool, "price_points": p.history.get(&id).map_or(0, Vec::len),
    })))
}

/// Rebuilds the projection from the log; who did it is recorded in the operations log.
async fn rebuild(State(s): S, h: HeaderMap) -> Result<Json<Value>, Refusal> {
    let c = ctx(&s, &h, "", b"")?;
    c.require_admin("rebuilding projections")?;
    let seq = s.markets.rebuild().await?;
    let by = c.principal("rebuilding projections")?;
    s.markets.record_operation("ProjectionsRebuilt", json!({"by": by, "rebuilt_to_seq": seq}), &c).await?;
    Ok(Json(json!({"rebuilt_to_seq": seq})))
}

/// Checks the log against the signed checkpoints read back from the bus (through the sidecar;
/// without one, the database's own copy, and the answer says so). Admins only.
async fn verify_audit(State(s): S, h: HeaderMap) -> Result<Json<Value>, Refusal> {
    ctx(&s, &h, "", b"")?.require_admin("verifying the audit trail")?;
    let Some(signer) = &s.signer else {
        return Err(Refusal::new(
            409,
            "no_audit_key",
            "this instance signs no checkpoints: start it with --audit-key-file",
        ));
    };
    let (source, bodies) = match &s.sidecar_admin {
        Some(admin) => {
            let events = crate::publisher::read_topic(admin, crate::audit::TOPIC).await.map_err(|e| {
                Refusal::new(503, "bus_unavailable", format!("reading the checkpoints back: {e}"))
            })?;
            ("bus", events.iter().map(Value::to_string).collect::<Vec<_>>())
        }
        None => ("database", s.markets.store.checkpoints().await?),
    };
    let checkpoints =
        crate::audit::parse(&bodies).map_err(|e| Refusal::new(422, "checkpoint_unreadable", e))?;
    let report =
        crate::audit::verify(&s.markets.store, &checkpoints, std::slice::from_ref(&signer.public)).await?;
    Ok(Json(json!({"source": source, "key": signer.public, "report": report})))
}
