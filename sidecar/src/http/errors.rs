//! The mesh's refusals: the one JSON error body (`mesh_runtime::error_body`) with an
//! `x-mesh-error` header, or a trailers-only answer for gRPC callers.

use crate::http::body::{Body, boxed, empty};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;

/// A problem-details error answer (`application/problem+json`: `type`, `title`, `status`,
/// `detail`, and `{"error": code, "message": …}`) plus any extra fields, and an
/// `x-mesh-error` header so callers can tell the mesh's refusals from their app's.
pub fn error_response(
    status: StatusCode,
    code: &str,
    message: String,
    extra: serde_json::Value,
) -> Response<Body> {
    let body = mesh_runtime::error_body(status.as_u16(), code, &message, extra);
    let mut resp = Response::new(boxed(Full::new(Bytes::from(body.to_string()))));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(mesh_runtime::PROBLEM_JSON));
    if let Ok(v) = HeaderValue::from_str(code) {
        h.insert("x-mesh-error", v);
    }
    resp.extensions_mut().insert(MeshError { message });
    resp
}

/// What [`error_response`] refused with, kept for [`for_grpc`].
#[derive(Debug, Clone)]
pub struct MeshError {
    pub message: String,
}

/// A mesh refusal in the shape a gRPC client understands: a trailers-only response (HTTP 200,
/// `grpc-status`, `grpc-message`) instead of a JSON body. Other responses pass unchanged.
pub fn for_grpc(resp: Response<Body>) -> Response<Body> {
    let Some(e) = resp.extensions().get::<MeshError>().cloned() else { return resp };
    let code = match resp.status().as_u16() {
        400 => 3,  // INVALID_ARGUMENT
        403 => 7,  // PERMISSION_DENIED
        404 => 12, // UNIMPLEMENTED (no route)
        429 => 8,  // RESOURCE_EXHAUSTED
        504 => 4,  // DEADLINE_EXCEEDED
        _ => 14,   // UNAVAILABLE
    };
    let mut out = Response::new(empty());
    let h = out.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert("grpc-status", HeaderValue::from(code));
    let msg: String =
        e.message.chars().map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' }).collect();
    if let Ok(v) = HeaderValue::from_str(&msg.replace('%', "%25")) {
        h.insert("grpc-message", v);
    }
    if let Some(v) = resp.headers().get("x-mesh-error") {
        h.insert("x-mesh-error", v.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    #[tokio::test]
    async fn error_responses_are_json_naming_the_problem() {
        let r = error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_endpoints",
            "no healthy endpoints".into(),
            serde_json::json!({"service": "market"}),
        );
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["x-mesh-error"], "no_endpoints");
        let body = r.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!((v["error"].as_str(), v["service"].as_str()), (Some("no_endpoints"), Some("market")));
    }
}
