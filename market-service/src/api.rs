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
    routing::get,
};
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::{Value, json};
use utoipa::{IntoParams, OpenApi, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    domain::{self, Micro, Status},
    service::{Answer, Ctx, Markets, Refusal},
    store::verify_chain,
    views::*,
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
    /// Where spans go.
    pub telemetry: mesh_runtime::telemetry::Telemetry,
}

type S = State<Arc<AppState>>;

/// Problem details (RFC 9457, `application/problem+json`): `type` names the problem
/// (`/problems/<code>`, described there), `title` its kind, `status`, `detail` what happened and
/// what to do; the mesh's own `error` (the code), `message` (the detail) and `field` (the input
/// at fault) ride along as extension members.
impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut body = mesh_runtime::error_body(status.as_u16(), self.code, &self.message, Value::Null);
        // This service describes its problem types at `/problems/<code>`.
        body["type"] = json!(format!("/problems/{}", self.code));
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

pub use mesh_runtime::PROBLEM_JSON;

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
        // No body (or `null`) reads as `{}`: a command without fields needs none.
        let json: &[u8] = if bytes.is_empty() || bytes.trim_ascii() == b"null" { b"{}" } else { &bytes };
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
        trace: crate::traced::caller(h),
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

/// The document's frame: title, security schemes, the error body.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Opinion Market Mesh — market service",
        description = "Opinion markets with an LMSR market maker, event-sourced. Errors are problem details (RFC 9457, application/problem+json). Reads carry a strong ETag (If-None-Match → 304); commands take If-Match (412 when the market moved on) and Idempotency-Key (the first answer again; 422 for another request under the same key)."
    ),
    components(schemas(Problem)),
    modifiers(&Security),
    tags(
        (name = "markets", description = "create, read, trade, resolve, cancel"),
        (name = "accounts", description = "the caller's account; grants by admins"),
        (name = "analytics"),
        (name = "audit", description = "the hash-chained log and its signed checkpoints"),
        (name = "operations", description = "health, the API description, admin actions")
    )
)]
struct ApiDoc;

struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "endUser",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some("an end user's token, verified by the gateway, which hands this service the user (its sub) as x-mesh-user and its roles as x-mesh-user-roles (admin: grants and any market); a client cannot send those headers itself"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "operator",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "the operator's token (a file given to the service): an admin without an account",
                    ))
                    .build(),
            ),
        );
    }
}

/// Every refusal an operation may answer, each a problem-details body.
struct Refused;

impl utoipa::IntoResponses for Refused {
    fn responses()
    -> std::collections::BTreeMap<String, utoipa::openapi::RefOr<utoipa::openapi::response::Response>> {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        [
            ("400", "the request is malformed: a field, the body or a query parameter (the field is named)"),
            ("401", "a signed-in user (or the operator token) is needed"),
            ("403", "the caller may not do this"),
            ("404", "no such market, account, trade or path"),
            ("405", "the path does not take this method"),
            ("409", "refused by the market's rules (not open, balance, shares, slippage) or by contention"),
            ("412", "If-Match named a version the market is no longer at"),
            ("413", "the body is too large"),
            ("415", "the body is not application/json"),
            ("422", "an amount past the bound, or an Idempotency-Key reused for another request"),
            (
                "429",
                "the edge's rate limit, or a client blocked after repeated refusals (Retry-After says when)",
            ),
            ("503", "the database or the aggregate's log cannot be read; nothing was changed"),
        ]
        .into_iter()
        .map(|(status, why)| {
            let content = ContentBuilder::new().schema(Some(Ref::from_schema_name("Problem"))).build();
            (
                status.to_string(),
                ResponseBuilder::new().description(why).content(PROBLEM_JSON, content).build().into(),
            )
        })
        .collect()
    }
}

/// The headers a command takes.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)] // read from the header map by `ctx`; here for the document
struct CommandHeaders {
    /// A repeated key with the same request gets the first answer (the change is applied
    /// once); the same key with another method, path or body is 422.
    #[param(
        rename = "Idempotency-Key",
        min_length = 1,
        max_length = 200,
        pattern = r"^[!-~]+$",
        nullable = false
    )]
    idempotency_key: Option<String>,
    /// The market's ETag (`"7"`) the command expects: 412 when it moved on; `*`: any version.
    #[param(rename = "If-Match", pattern = r#"^(\*|(W/)?"[0-9]{1,19}"|[0-9]{1,19})$"#, nullable = false)]
    if_match: Option<String>,
}

/// The headers a conditional read takes.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)] // read from the header map; here for the document
struct ReadHeaders {
    /// The ETag last read: 304 while it is still current.
    #[param(rename = "If-None-Match", nullable = false)]
    if_none_match: Option<String>,
}

pub fn router(state: Arc<AppState>) -> Router {
    let (router, api) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(healthz))
        .routes(routes!(problem))
        .routes(routes!(open_account))
        .routes(routes!(get_account))
        .routes(routes!(grant))
        .routes(routes!(create_market, list_markets))
        .routes(routes!(get_market, update_market))
        .routes(routes!(quote))
        .routes(routes!(trade))
        .routes(routes!(get_trade))
        .routes(routes!(resolve))
        .routes(routes!(cancel))
        .routes(routes!(positions))
        .routes(routes!(history))
        .routes(routes!(audit_trail))
        .routes(routes!(audit_verify))
        .routes(routes!(platform))
        .routes(routes!(market_analytics))
        .routes(routes!(rebuild))
        .routes(routes!(verify_audit))
        .split_for_parts();
    // The description (OpenAPI 3.1, as utoipa writes it), rendered once.
    let doc = bytes::Bytes::from(api.to_json().unwrap_or_default());
    router
        .route(
            "/openapi.json",
            get(move || async move { ([(header::CONTENT_TYPE, "application/json")], doc.clone()) }),
        )
        .fallback(|| async { Refusal::new(404, "not_found", "no such endpoint; see /openapi.json") })
        .method_not_allowed_fallback(|| async {
            Refusal::new(
                405,
                "method_not_allowed",
                "this endpoint does not take that method; see /openapi.json",
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(state.telemetry.clone(), crate::traced::server_span))
        .with_state(state)
}

/// Up while the database answers; aggregates left out of the projection because their log holds
/// an unreadable event are listed (the service keeps serving the rest).
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, body = Health, description = "up"), Refused))]
async fn healthz(State(s): S) -> Result<Json<Health>, Refusal> {
    let p = s.markets.read().await.map_err(|e| Refusal::new(503, "database_unavailable", e.to_string()))?;
    let load = |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed);
    Ok(Json(Health {
        status: "ok".into(),
        backend: s.markets.store.backend(),
        unreadable_aggregates: p.unreadable.clone(),
        group_commit: GroupCommit {
            batches: load(&s.markets.commits.batches),
            commands: load(&s.markets.commits.commands),
            most_decisions: load(&s.markets.commits.most_decisions),
        },
    }))
}

/// What a problem type (`/problems/<code>`) means.
#[utoipa::path(get, path = "/problems/{code}", tag = "operations",
    params(("code" = String, Path, description = "a problem's code (its type's last segment)")),
    responses((status = 200, body = ProblemType, description = "the problem type"), Refused))]
async fn problem(Path(code): Path<String>) -> Result<Json<ProblemType>, Refusal> {
    match crate::refusal::PROBLEMS.iter().find(|(c, ..)| *c == code) {
        Some((c, status, description)) => Ok(Json(ProblemType {
            kind: format!("/problems/{c}"),
            title: crate::refusal::title(c),
            status: *status,
            description: description.to_string(),
        })),
        None => Err(Refusal::new(404, "not_found", format!("no problem type {code}"))),
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct OpenAccount {
    /// Only an admin opening an account for someone else names it; otherwise it is the caller.
    #[serde(default)]
    #[schema(pattern = r"^[A-Za-z0-9_.@:|+-]{1,128}$")]
    id: Option<String>,
    #[serde(default)]
    #[schema(max_length = 200)]
    name: String,
}

/// Opens the caller's account (its id is the caller's subject).
#[utoipa::path(post, path = "/accounts", tag = "accounts", request_body(content = Option<OpenAccount>, description = "optional: no body opens the caller's account"), params(CommandHeaders),
    security(("endUser" = []), ("operator" = [])),
    responses((status = 201, body = AccountOpened, description = "opened", headers(("location" = String, description = "/accounts/{id}"))), Refused))]
async fn open_account(
    State(s): S,
    h: HeaderMap,
    Body(b, raw): Body<OpenAccount>,
) -> Result<Response, Refusal> {
    let c = ctx(&s, &h, "POST /accounts", &raw)?;
    let a = s.markets.open_account(b.id.as_deref(), &b.name, &c).await?;
    Ok(created(a, |b| Some(format!("/accounts/{}", b["id"].as_str()?))))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Grant {
    /// Positive.
    amount: Micro,
}

/// Credits an account (admins).
#[utoipa::path(post, path = "/accounts/{id}/grants", tag = "accounts", request_body = Grant,
    params(("id" = String, Path, description = "the account"), CommandHeaders),
    security(("operator" = []), ("endUser" = [])),
    responses((status = 200, body = Granted, description = "granted"), Refused))]
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
#[utoipa::path(get, path = "/accounts/{id}", tag = "accounts",
    params(("id" = String, Path, description = "the account, or `me`"), ReadHeaders),
    security(("endUser" = []), ("operator" = [])),
    responses((status = 200, body = AccountView, description = "the account", headers(("etag" = String, description = "its version"))),
        (status = 304, description = "unchanged since the ETag named"), Refused))]
async fn get_account(State(s): S, Path(id): Path<String>, h: HeaderMap) -> Result<Response, Refusal> {
    let c = ctx(&s, &h, "", b"")?;
    let id = match (id.as_str(), &c.user) {
        ("me", Some(user)) => user.clone(),
        _ => id,
    };
    c.owner_or_admin(&id, "reading an account")?;
    let p = s.markets.read().await?;
    let a = p.account(&id)?;
    let positions = p
        .markets
        .values()
        .filter_map(|m| m.positions.get(&id).map(|ps| (m, ps)))
        .flat_map(|(m, ps)| {
            ps.iter().enumerate().filter(|(_, p)| p.shares.0 > 0).map(move |(o, p)| Holding {
                market: m.id.clone(),
                outcome: o,
                outcome_name: m.outcomes[o].clone(),
                shares: p.shares,
                net_paid: p.net_paid,
                status: m.status,
            })
        })
        .collect();
    let body = AccountView {
        id: a.id.clone(),
        name: a.name.clone(),
        balance: a.balance,
        granted: a.granted,
        version: a.version,
        positions,
    };
    // One user's account: no shared cache may keep it.
    Ok(conditional(&h, a.version, ([(header::CACHE_CONTROL, "private, no-store")], Json(body))))
}

/// Creates a market; the creator pays the LMSR subsidy b·ln(n).
#[utoipa::path(post, path = "/markets", tag = "markets", request_body = domain::CreateMarket, params(CommandHeaders),
    security(("endUser" = [])),
    responses((status = 201, body = MarketView, description = "created", headers(("location" = String, description = "/markets/{id}"))), Refused))]
async fn create_market(
    State(s): S,
    h: HeaderMap,
    Body(b, raw): Body<domain::CreateMarket>,
) -> Result<Response, Refusal> {
    let c = ctx(&s, &h, "POST /markets", &raw)?;
    let a = s.markets.create_market(&b, &c).await?;
    Ok(created(a, |b| Some(format!("/markets/{}", b["id"].as_str()?))))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// open, closed, resolved or cancelled (read as text, so a wrong one is named).
    #[param(value_type = Option<Status>, nullable = false)]
    status: Option<String>,
    #[param(nullable = false)]
    category: Option<String>,
    /// 1..=500 (50).
    #[param(minimum = 1, maximum = 500, nullable = false)]
    limit: Option<usize>,
    #[param(nullable = false)]
    offset: Option<usize>,
}

/// Markets, newest first.
#[utoipa::path(get, path = "/markets", tag = "markets", params(ListQuery),
    responses((status = 200, body = MarketList, description = "a page of markets"), Refused))]
async fn list_markets(
    State(s): S,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<MarketList>, Refusal> {
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
    let markets = all.into_iter().skip(offset).take(limit).map(MarketView::from).collect();
    Ok(Json(MarketList { total, offset, limit, markets }))
}

/// A market with current prices, and its `ETag` (its version).
#[utoipa::path(get, path = "/markets/{id}", tag = "markets",
    params(("id" = String, Path, description = "the market"), ReadHeaders),
    responses((status = 200, body = MarketView, description = "the market", headers(("etag" = String, description = "its version"))),
        (status = 304, description = "unchanged since the ETag named"), Refused))]
async fn get_market(State(s): S, Path(id): Path<String>, h: HeaderMap) -> Result<Response, Refusal> {
    let p = s.markets.read().await?;
    let m = p.market(&id)?;
    Ok(conditional(&h, m.version, Json(MarketView::from(m))))
}

/// One trade as recorded: the market's `TradeExecuted` event (where a 201 trade points).
#[utoipa::path(get, path = "/markets/{id}/trades/{trade}", tag = "markets",
    params(("id" = String, Path, description = "the market"), ("trade" = String, Path, description = "the trade's id")),
    responses((status = 200, body = TradeRecord, description = "the trade"), Refused))]
async fn get_trade(
    State(s): S,
    Path((id, trade)): Path<(String, String)>,
) -> Result<Json<TradeRecord>, Refusal> {
    let missing = || Refusal::new(404, "not_found", format!("market {id} has no trade {trade}"));
    let e = s.markets.store.event(&trade).await?.ok_or_else(missing)?;
    if e.aggregate_id != crate::service::market_id(&id) || e.event_type != "TradeExecuted" {
        return Err(missing());
    }
    Ok(Json(TradeRecord {
        trade_id: e.event_id,
        market: id,
        market_version: e.version,
        trade: serde_json::from_str::<Value>(&e.payload).unwrap_or(Value::Null),
        recorded_at_ms: e.recorded_at_ms,
        correlation_id: e.correlation_id,
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct UpdateMarket {
    #[schema(max_length = 10000)]
    description: Option<String>,
    /// Unix milliseconds, in the future.
    #[serde(default, deserialize_with = "domain::whole::option_u64")]
    close_time_ms: Option<u64>,
}

/// Changes the description or close time while open (its creator or an admin).
#[utoipa::path(patch, path = "/markets/{id}", tag = "markets", request_body = UpdateMarket,
    params(("id" = String, Path, description = "the market"), CommandHeaders),
    security(("endUser" = []), ("operator" = [])),
    responses((status = 200, body = MarketView, description = "changed"), Refused))]
async fn update_market(
    State(s): S,
    Path(id): Path<String>,
    h: HeaderMap,
    Body(b, raw): Body<UpdateMarket>,
) -> Result<Response, Refusal> {
    let c = ctx(&s, &h, &format!("PATCH /markets/{id}"), &raw)?;
    Ok(answer(s.markets.update_market(&id, b.description, b.close_time_ms, &c).await?))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct QuoteReq {
    #[schema(maximum = 31)]
    #[serde(deserialize_with = "domain::whole::usize")]
    outcome: usize,
    side: domain::Side,
    shares: Micro,
}

/// Prices a trade without making it.
#[utoipa::path(post, path = "/markets/{id}/quote", tag = "markets", request_body = QuoteReq,
    params(("id" = String, Path, description = "the market")),
    responses((status = 200, body = Quoted, description = "the price"), Refused))]
async fn quote(
    State(s): S,
    Path(id): Path<String>,
    Body(b, _): Body<QuoteReq>,
) -> Result<Json<Quoted>, Refusal> {
    Ok(Json(s.markets.quote(&id, b.outcome, b.side, b.shares).await?))
}

/// Buys or sells shares of an outcome for the caller's own account.
#[utoipa::path(post, path = "/markets/{id}/trades", tag = "markets", request_body = domain::Trade,
    params(("id" = String, Path, description = "the market"), CommandHeaders),
    security(("endUser" = [])),
    responses((status = 201, body = TradeMade, description = "traded", headers(("location" = String, description = "/markets/{id}/trades/{trade_id}"))), Refused))]
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

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Resolve {
    #[schema(maximum = 31)]
    #[serde(deserialize_with = "domain::whole::usize")]
    outcome: usize,
}

/// Resolves to an outcome and settles (its creator or an admin).
#[utoipa::path(post, path = "/markets/{id}/resolve", tag = "markets", request_body = Resolve,
    params(("id" = String, Path, description = "the market"), CommandHeaders),
    security(("endUser" = []), ("operator" = [])),
    responses((status = 200, body = Finished, description = "resolved and settled"), Refused))]
async fn resolve(
    State(s): S,
    Path(id): Path<String>,
    h: HeaderMap,
    Body(b, raw): Body<Resolve>,
) -> Result<Response, Refusal> {
    let c = ctx(&s, &h, &format!("POST /markets/{id}/resolve"), &raw)?;
    Ok(answer(s.markets.finish(&id, Some(b.outcome), &c).await?))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Cancel {}

/// Cancels and refunds (its creator or an admin).
#[utoipa::path(post, path = "/markets/{id}/cancel", tag = "markets", request_body(content = Option<Cancel>, description = "optional: no fields"),
    params(("id" = String, Path, description = "the market"), CommandHeaders),
    security(("endUser" = []), ("operator" = [])),
    responses((status = 200, body = Finished, description = "cancelled and refunded"), Refused))]
async fn cancel(
    State(s): S,
    Path(id): Path<String>,
    h: HeaderMap,
    Body(Cancel {}, raw): Body<Cancel>,
) -> Result<Response, Refusal> {
    let c = ctx(&s, &h, &format!("POST /markets/{id}/cancel"), &raw)?;
    Ok(answer(s.markets.finish(&id, None, &c).await?))
}

/// Every account's positions in a market.
#[utoipa::path(get, path = "/markets/{id}/positions", tag = "markets",
    params(("id" = String, Path, description = "the market")),
    responses((status = 200, body = Positions, description = "positions"), Refused))]
async fn positions(State(s): S, Path(id): Path<String>) -> Result<Json<Positions>, Refusal> {
    let p = s.markets.read().await?;
    let m = p.market(&id)?;
    let positions = m
        .positions
        .iter()
        .flat_map(|(acc, ps)| {
            ps.iter().enumerate().filter(|(_, p)| p.shares.0 > 0 || p.net_paid.0 != 0).map(move |(o, p)| {
                PositionView { account: acc.clone(), outcome: o, shares: p.shares, net_paid: p.net_paid }
            })
        })
        .collect();
    Ok(Json(Positions { market: id, version: m.version, positions }))
}

/// Price history: a point after creation and after every trade.
#[utoipa::path(get, path = "/markets/{id}/history", tag = "markets",
    params(("id" = String, Path, description = "the market")),
    responses((status = 200, body = History, description = "price points"), Refused))]
async fn history(State(s): S, Path(id): Path<String>) -> Result<Json<History>, Refusal> {
    let p = s.markets.read().await?;
    p.market(&id)?;
    let points = p
        .history
        .get(&id)
        .into_iter()
        .flatten()
        .map(|(t, prices)| PricePoint { at_ms: *t, prices: prices.clone() })
        .collect();
    Ok(Json(History { market: id, points }))
}

/// The market's audit trail: every event with its hash chain.
#[utoipa::path(get, path = "/markets/{id}/events", tag = "audit",
    params(("id" = String, Path, description = "the market")),
    responses((status = 200, body = AuditTrail, description = "the events"), Refused))]
async fn audit_trail(State(s): S, Path(id): Path<String>) -> Result<Json<AuditTrail>, Refusal> {
    let events = s.markets.store.stream(&crate::service::market_id(&id)).await?;
    if events.is_empty() {
        return Err(Refusal::new(404, "not_found", format!("market {id} does not exist")));
    }
    let events = events
        .into_iter()
        .map(|e| EventView {
            version: e.version,
            data: serde_json::from_str::<Value>(&e.payload).unwrap_or(Value::Null),
            event_id: e.event_id,
            event_type: e.event_type,
            correlation_id: e.correlation_id,
            causation_id: e.causation_id,
            recorded_at_ms: e.recorded_at_ms,
            prev_hash: e.prev_hash,
            hash: e.hash,
        })
        .collect();
    Ok(Json(AuditTrail { market: id, events }))
}

/// Verifies the market's hash chain (each event's content against its hash and its link).
#[utoipa::path(get, path = "/markets/{id}/audit", tag = "audit",
    params(("id" = String, Path, description = "the market")),
    responses((status = 200, body = ChainCheck, description = "the chain checked"), Refused))]
async fn audit_verify(State(s): S, Path(id): Path<String>) -> Result<Json<ChainCheck>, Refusal> {
    let events = s.markets.store.stream(&crate::service::market_id(&id)).await?;
    if events.is_empty() {
        return Err(Refusal::new(404, "not_found", format!("market {id} does not exist")));
    }
    let check = ChainCheck {
        market: id,
        valid: true,
        events: events.len(),
        head: None,
        first_invalid_version: None,
        reason: None,
    };
    Ok(Json(match verify_chain(&events) {
        Ok(n) => ChainCheck { events: n, head: Some(events[n - 1].hash.clone()), ..check },
        Err((version, reason)) => {
            ChainCheck { valid: false, first_invalid_version: Some(version), reason: Some(reason), ..check }
        }
    }))
}

/// Volume, trades, traders and the top markets.
#[utoipa::path(get, path = "/analytics/platform", tag = "analytics",
    responses((status = 200, body = Platform, description = "the platform's figures"), Refused))]
async fn platform(State(s): S) -> Result<Json<Platform>, Refusal> {
    let p = s.markets.read().await?;
    let markets_by_status = ["open", "closed", "resolved", "cancelled"]
        .into_iter()
        .map(|st| {
            (st.to_string(), p.markets.values().filter(|m| Some(m.status) == Status::parse(st)).count())
        })
        .collect();
    let traders: std::collections::BTreeSet<&String> =
        p.markets.values().flat_map(|m| m.positions.keys()).collect();
    let mut top: Vec<_> = p.markets.values().collect();
    top.sort_by(|a, b| b.volume.cmp(&a.volume).then(a.id.cmp(&b.id)));
    let top_markets = top
        .iter()
        .take(10)
        .map(|m| TopMarket {
            id: m.id.clone(),
            question: m.question.clone(),
            volume: m.volume,
            trades: m.trades,
        })
        .collect();
    Ok(Json(Platform {
        markets: p.markets.len(),
        markets_by_status,
        accounts: p.accounts.len(),
        volume: Micro(crate::domain::money::sum(p.markets.values().map(|m| m.volume.0))),
        trades: p.markets.values().map(|m| m.trades).sum(),
        unique_traders: traders.len(),
        top_markets,
    }))
}

/// One market's analytics.
#[utoipa::path(get, path = "/analytics/markets/{id}", tag = "analytics",
    params(("id" = String, Path, description = "the market")),
    responses((status = 200, body = MarketAnalytics, description = "the market's figures"), Refused))]
async fn market_analytics(State(s): S, Path(id): Path<String>) -> Result<Json<MarketAnalytics>, Refusal> {
    let p = s.markets.read().await?;
    let m = p.market(&id)?;
    Ok(Json(MarketAnalytics {
        volume: m.volume,
        trades: m.trades,
        unique_traders: m.traders().len(),
        prices: m.prices(),
        pool: m.pool,
        price_points: p.history.get(&id).map_or(0, Vec::len),
        market: id,
    }))
}

/// Rebuilds the projection from the log (admins); who did it is recorded in the operations log.
#[utoipa::path(post, path = "/admin/projections/rebuild", tag = "operations",
    security(("operator" = []), ("endUser" = [])),
    responses((status = 200, body = Rebuilt, description = "rebuilt"), Refused))]
async fn rebuild(State(s): S, h: HeaderMap) -> Result<Json<Rebuilt>, Refusal> {
    let c = ctx(&s, &h, "", b"")?;
    c.require_admin("rebuilding projections")?;
    let seq = s.markets.rebuild().await?;
    let by = c.principal("rebuilding projections")?;
    s.markets.record_operation("ProjectionsRebuilt", json!({"by": by, "rebuilt_to_seq": seq}), &c).await?;
    Ok(Json(Rebuilt { rebuilt_to_seq: seq }))
}

/// Checks the log against the signed checkpoints read back from the bus (through the sidecar;
/// without one, the database's own copy, and the answer says so). Admins only.
#[utoipa::path(get, path = "/audit/verify", tag = "audit",
    security(("operator" = []), ("endUser" = [])),
    responses((status = 200, body = AuditVerified, description = "the report (valid or the first divergence)"), Refused))]
async fn verify_audit(State(s): S, h: HeaderMap) -> Result<Json<AuditVerified>, Refusal> {
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
    Ok(Json(AuditVerified { source: source.into(), key: signer.public.clone(), report }))
}
