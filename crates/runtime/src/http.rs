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

/// The body of every error answer of every HTTP listener in the mesh:
/// `{"error": "<code>", "message": "<what failed and what to do>"}` plus `extra`'s fields.
pub fn error_body(code: &str, message: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut body = serde_json::json!({ "error": code, "message": message });
    if let (Some(b), serde_json::Value::Object(extra)) = (body.as_object_mut(), extra) {
        b.extend(extra);
    }
    body
}

/// An axum answer with `status` and [`error_body`]`(code, message)`.
pub fn error_response(
    status: axum::http::StatusCode,
    code: &str,
    message: impl AsRef<str>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    (status, axum::Json(error_body(code, message.as_ref(), serde_json::Value::Null))).into_response()
}
