//! HTTP listeners: serving an axum app on a [`LocalListener`], and the one JSON error body every
//! HTTP listener of the mesh answers with.

use crate::addr::LocalListener;

/// Serves `app` on `listener` (TCP with Nagle off, or a Unix socket) until `shutdown`, then
/// waits for open requests.
pub async fn serve_http(
    listener: LocalListener,
    app: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    match listener {
        LocalListener::Tcp(l) => {
            let l = axum::serve::ListenerExt::tap_io(l, |s| {
                let _ = s.set_nodelay(true);
            });
            axum::serve(l, app).with_graceful_shutdown(shutdown).await
        }
        LocalListener::Unix(l, _) => axum::serve(l, app).with_graceful_shutdown(shutdown).await,
    }
}

/// The media type of every error answer in the mesh (RFC 9457).
pub const PROBLEM_JSON: &str = "application/problem+json";

/// The body of every error answer of every HTTP listener in the mesh: problem details (RFC
/// 9457) — `type` (`urn:mesh:problem:<code>`), `title` (the code in words), `status`, `detail`
/// (what failed and what to do) — with the mesh's `error` (the code) and `message` (the detail)
/// kept as extension members, plus `extra`'s fields.
pub fn error_body(status: u16, code: &str, message: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut body = serde_json::json!({
        "type": format!("urn:mesh:problem:{code}"),
        "title": problem_title(code),
        "status": status,
        "detail": message,
        "error": code,
        "message": message,
    });
    if let (Some(b), serde_json::Value::Object(extra)) = (body.as_object_mut(), extra) {
        b.extend(extra);
    }
    body
}

/// A problem's title: its code in words (`rate_limited` → "Rate limited").
pub fn problem_title(code: &str) -> String {
    let words = code.replace('_', " ");
    let mut chars = words.chars();
    chars.next().map(|c| c.to_uppercase().chain(chars).collect()).unwrap_or_default()
}

/// An axum answer with `status` and [`error_body`]`(code, message)`, as `application/problem+json`.
pub fn error_response(
    status: axum::http::StatusCode,
    code: &str,
    message: impl AsRef<str>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let body = error_body(status.as_u16(), code, message.as_ref(), serde_json::Value::Null);
    (status, [(axum::http::header::CONTENT_TYPE, PROBLEM_JSON)], body.to_string()).into_response()
}
