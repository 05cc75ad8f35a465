//! The OpenAPI 3.1 description served at `/openapi.json`.

use serde_json::{Value, json};

fn op(summary: &str, body: Option<&str>, ok: &str) -> Value {
    let mut o = json!({
        "summary": summary,
        "responses": {
            ok: {"description": "success", "content": {"application/json": {}}},
            "400": {"$ref": "#/components/responses/Error"},
            "401": {"$ref": "#/components/responses/Error"},
            "403": {"$ref": "#/components/responses/Error"},
            "404": {"$ref": "#/components/responses/Error"},
            "409": {"$ref": "#/components/responses/Error"},
            "412": {"$ref": "#/components/responses/Error"},
        }
    });
    if let Some(schema) = body {
        o["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}});
        o["parameters"] = json!([
            {"name": "Idempotency-Key", "in": "header", "schema": {"type": "string"}, "description": "a repeated key with the same request returns the first answer; the change is applied once"},
            {"name": "If-Match", "in": "header", "schema": {"type": "string"}, "description": "the market's ETag (its version, \"7\") the command expects: 412 when the market moved on; * for any version"}
        ]);
    }
    o
}

pub fn document() -> Value {
    let amount = json!({"type": "string", "pattern": "^-?[0-9]*(\\.[0-9]{1,6})?$", "description": "decimal with up to six places (a whole JSON integer is accepted too)"});
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Opinion Market Mesh — market service", "version": env!("CARGO_PKG_VERSION")},
        "paths": {
            "/healthz": {"get": op("Liveness and database reachability", None, "200")},
            "/accounts": {"post": op("Open the caller's account (its id is the caller's subject)", Some("OpenAccount"), "201")},
            "/accounts/{id}": {"get": op("Balance and open positions (the owner or an admin; `me` is the caller's)", None, "200")},
            "/accounts/{id}/grants": {"post": op("Credit an account (admin)", Some("Grant"), "200")},
            "/markets": {
                "post": op("Create a market; the creator pays the LMSR subsidy b·ln(n)", Some("CreateMarket"), "201"),
                "get": op("List markets (?status=open|closed|resolved|cancelled&category=&limit=1..500&offset=)", None, "200"),
            },
            "/markets/{id}": {"get": op("A market with current prices", None, "200"), "patch": op("Change description or close time while open (creator or admin)", Some("UpdateMarket"), "200")},
            "/markets/{id}/quote": {"post": op("Price a trade without making it", Some("Quote"), "200")},
            "/markets/{id}/trades": {"post": op("Buy or sell shares of an outcome for the caller's account", Some("Trade"), "201")},
            "/markets/{id}/resolve": {"post": op("Resolve to an outcome and settle (creator or admin)", Some("Resolve"), "200")},
            "/markets/{id}/cancel": {"post": op("Cancel and refund (creator or admin)", Some("Cancel"), "200")},
            "/markets/{id}/positions": {"get": op("Positions in a market", None, "200")},
            "/markets/{id}/history": {"get": op("Price history", None, "200")},
            "/markets/{id}/events": {"get": op("The market's audit trail: every event with its hash chain", None, "200")},
            "/markets/{id}/audit": {"get": op("Verify the market's hash chain", None, "200")},
            "/analytics/platform": {"get": op("Volume, trades, traders and top markets", None, "200")},
            "/analytics/markets/{id}": {"get": op("One market's analytics", None, "200")},
            "/admin/projections/rebuild": {"post": op("Rebuild the read projections from the log (admin)", None, "200")},
        },
        "components": {
            "securitySchemes": {"endUser": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT", "description": "an end user's token, verified by the gateway, which hands the service the user as x-mesh-user (and roles as x-mesh-user-roles; admin may grant and act on any market). Writes act as that user; without one they are 401. The operator's token (a file) is an admin without an account."}},
            "responses": {"Error": {"description": "refused", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}},
            "schemas": {
                "Error": {"type": "object", "required": ["error", "message"], "properties": {"error": {"type": "string"}, "message": {"type": "string"}, "field": {"type": "string"}}},
                "Amount": amount,
                "OpenAccount": {"type": "object", "additionalProperties": false, "properties": {"id": {"type": "string", "pattern": "^[A-Za-z0-9_.@:|+-]{1,128}$", "description": "the caller's own subject (the default); only an admin names another"}, "name": {"type": "string"}}},
                "Grant": {"type": "object", "additionalProperties": false, "required": ["amount"], "properties": {"amount": {"$ref": "#/components/schemas/Amount"}}},
                "CreateMarket": {"type": "object", "additionalProperties": false, "required": ["question", "outcomes", "close_time_ms", "liquidity"], "properties": {
                    "question": {"type": "string", "maxLength": 500}, "description": {"type": "string"}, "category": {"type": "string"},
                    "outcomes": {"type": "array", "minItems": 2, "maxItems": 32, "items": {"type": "string"}},
                    "close_time_ms": {"type": "integer", "description": "Unix milliseconds, in the future"},
                    "liquidity": {"$ref": "#/components/schemas/Amount"}}},
                "UpdateMarket": {"type": "object", "additionalProperties": false, "properties": {"description": {"type": "string"}, "close_time_ms": {"type": "integer"}}},
                "Quote": {"type": "object", "additionalProperties": false, "required": ["outcome", "side", "shares"], "properties": {"outcome": {"type": "integer", "minimum": 0}, "side": {"enum": ["buy", "sell"]}, "shares": {"$ref": "#/components/schemas/Amount"}}},
                "Trade": {"type": "object", "additionalProperties": false, "required": ["outcome", "side", "shares"], "properties": {
                    "outcome": {"type": "integer", "minimum": 0}, "side": {"enum": ["buy", "sell"]},
                    "shares": {"$ref": "#/components/schemas/Amount"}, "max_cost": {"$ref": "#/components/schemas/Amount"}, "min_proceeds": {"$ref": "#/components/schemas/Amount"}}},
                "Resolve": {"type": "object", "additionalProperties": false, "required": ["outcome"], "properties": {"outcome": {"type": "integer", "minimum": 0}}},
                "Cancel": {"type": "object", "additionalProperties": false, "properties": {}},
            }
        }
    })
}
