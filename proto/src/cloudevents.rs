//! CloudEvents 1.0 as the mesh writes them: a bus event in the JSON format.

use serde_json::{Value, json};

use crate::v1;

/// Attributes with a place of their own in a bus event.
pub const OWN: [&str; 12] = [
    "specversion",
    "id",
    "source",
    "type",
    "subject",
    "time",
    "datacontenttype",
    "data",
    "data_base64",
    "topic",
    "correlationid",
    "causationid",
];

/// Whether a `datacontenttype` names JSON (`application/json`, `text/json`, `…+json`).
pub fn is_json(content_type: &str) -> bool {
    let t = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    t == "application/json" || t == "text/json" || t.ends_with("+json")
}

/// A bus event as CloudEvents JSON (structured format), with the bus `offset` as an extension:
/// JSON data as JSON, other data as `data_base64`, text as a string.
pub fn delivery_json(d: &v1::Delivery) -> Value {
    let e = d.event.clone().unwrap_or_default();
    let time = humantime::format_rfc3339_millis(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(e.time_unix_ms),
    )
    .to_string();
    let mut out = json!({
        "specversion": "1.0", "id": e.id, "source": e.source, "type": e.r#type, "time": time,
        "topic": e.topic, "offset": d.offset,
        "datacontenttype": if e.content_type.is_empty() { "application/json" } else { e.content_type.as_str() },
    });
    for (k, v) in
        [("subject", &e.key), ("correlationid", &e.correlation_id), ("causationid", &e.causation_id)]
    {
        if !v.is_empty() {
            out[k] = json!(v);
        }
    }
    for (k, v) in &e.attributes {
        if !OWN.contains(&k.as_str()) {
            out[k.as_str()] = json!(v);
        }
    }
    if !e.data.is_empty() {
        let text = std::str::from_utf8(&e.data).ok();
        match text {
            Some(t) if is_json(&e.content_type) || e.content_type.is_empty() => {
                match serde_json::from_str::<Value>(t) {
                    Ok(v) => out["data"] = v,
                    Err(_) => out["data_base64"] = json!(mesh_runtime::base64(&e.data)),
                }
            }
            Some(t) if e.content_type.starts_with("text/") => out["data"] = json!(t),
            _ => out["data_base64"] = json!(mesh_runtime::base64(&e.data)),
        }
    }
    out
}

/// A replay read to its end, each event as CloudEvents JSON ([`delivery_json`]); the first
/// error ends it (part of a replay is not the replay).
pub async fn replay_json<S>(stream: S) -> Result<Vec<Value>, tonic::Status>
where
    S: tonic::codegen::tokio_stream::Stream<Item = Result<v1::Delivery, tonic::Status>>,
{
    use tonic::codegen::tokio_stream::StreamExt;
    let mut stream = std::pin::pin!(stream);
    let mut events = Vec::new();
    while let Some(d) = stream.next().await {
        events.push(delivery_json(&d?));
    }
    Ok(events)
}
