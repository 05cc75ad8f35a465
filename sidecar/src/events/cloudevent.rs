//! CloudEvents 1.0 over HTTP, in and out. In (`POST /events`): structured mode (one event,
//! `application/cloudevents+json` or a JSON object), batch mode
//! (`application/cloudevents-batch+json` or a JSON array) and binary mode (`ce-*` headers, the
//! body as the data). Out: a bus event as CloudEvents JSON (`meshctl events replay -o json`, the
//! sidecar's `GET /events/{topic}`) and as binary-mode headers (webhook deliveries).
//!
//! The mesh names the bus topic in the extension attribute `topic`; `correlationid` and
//! `causationid` are kept in their own fields; every other optional or extension attribute
//! (`dataschema`, `traceparent`, …) rides in the event's attributes and comes out as it went in.
//! Data is kept as bytes: JSON data as its JSON text, a string under a non-JSON content type as
//! the string's bytes, `data_base64` decoded.

use http::HeaderMap;
use mesh_proto::{cloudevents::is_json, names, v1};
use serde_json::{Map, Value};

/// Why an event was refused: the attribute at fault and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub attribute: String,
    pub message: String,
}

fn refused(attribute: &str, message: impl Into<String>) -> Refused {
    Refused { attribute: attribute.to_string(), message: message.into() }
}

/// The events of one `POST /events`, or why (with the 0-based event number in a batch).
pub fn parse(headers: &HeaderMap, body: &[u8], default_source: &str) -> Result<Vec<v1::Event>, Refused> {
    if headers.contains_key("ce-specversion") {
        return binary(headers, body).map(|e| vec![e]);
    }
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|c| c.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
        .unwrap_or_default();
    let value: Value = serde_json::from_slice(body).map_err(|e| refused("body", format!("not JSON: {e}")))?;
    let items = match (content_type.as_str(), value) {
        ("application/cloudevents-batch+json", Value::Array(items)) => items,
        ("application/cloudevents-batch+json", _) => {
            return Err(refused("body", "a batch (application/cloudevents-batch+json) is a JSON array"));
        }
        ("application/cloudevents+json", Value::Array(_)) => {
            return Err(refused(
                "body",
                "a structured event (application/cloudevents+json) is one JSON object",
            ));
        }
        (_, Value::Array(items)) => items,
        (_, one) => vec![one],
    };
    if items.is_empty() || items.len() > 1000 {
        return Err(refused("body", "send 1..=1000 events"));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            structured(item, default_source)
                .map_err(|r| Refused { message: format!("event {i}: {}", r.message), ..r })
        })
        .collect()
}

/// One event in the structured JSON format.
fn structured(item: Value, default_source: &str) -> Result<v1::Event, Refused> {
    let Value::Object(mut obj) = item else { return Err(refused("body", "an event is a JSON object")) };
    let mut take = |name: &str| -> Result<Option<String>, Refused> {
        match obj.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(refused(name, format!("{name} must be a string, not {other}"))),
        }
    };
    let specversion = take("specversion")?;
    let id = take("id")?;
    let source = take("source")?;
    let kind = take("type")?;
    let topic = take("topic")?;
    let subject = take("subject")?;
    let time = take("time")?;
    let datacontenttype = take("datacontenttype")?;
    let correlation = take("correlationid")?;
    let causation = take("causationid")?;
    let data_base64 = take("data_base64")?;
    let data = obj.remove("data");
    let content_type = datacontenttype.clone().unwrap_or_else(|| "application/json".into());
    let data = match (data, data_base64) {
        (Some(d), Some(_)) if !d.is_null() => {
            return Err(refused("data_base64", "give data or data_base64, not both"));
        }
        (_, Some(b64)) => mesh_runtime::base64_decode(&b64)
            .ok_or_else(|| refused("data_base64", "data_base64 is not base64"))?,
        (None | Some(Value::Null), None) => Vec::new(),
        // Under a non-JSON content type a JSON string is the data itself (no quotes).
        (Some(Value::String(s)), None) if !is_json(&content_type) => s.into_bytes(),
        (Some(d), None) => d.to_string().into_bytes(),
    };
    let mut attributes = std::collections::HashMap::new();
    for (name, value) in obj {
        check_extension_name(&name)?;
        let value = match value {
            Value::String(s) => s,
            Value::Bool(_) | Value::Number(_) => value.to_string(),
            Value::Null => continue,
            other => {
                return Err(refused(
                    &name,
                    format!("{name}: an attribute is a string, number or boolean, not {other}"),
                ));
            }
        };
        attributes.insert(name, value);
    }
    let raw = Raw {
        specversion,
        id,
        source: source.or_else(|| (!default_source.is_empty()).then(|| default_source.to_string())),
        kind,
        topic,
        subject,
        time,
        content_type: datacontenttype,
        correlation,
        causation,
    };
    raw.into_event(data, attributes)
}

/// One event in binary mode: attributes in `ce-*` headers (percent-encoded), the body as data.
fn binary(headers: &HeaderMap, body: &[u8]) -> Result<v1::Event, Refused> {
    let mut attrs: Map<String, Value> = Map::new();
    for (name, value) in headers {
        let Some(attr) = name.as_str().strip_prefix("ce-") else { continue };
        let text = value.to_str().map_err(|_| refused(attr, format!("ce-{attr} is not text")))?;
        attrs.insert(attr.to_string(), Value::String(percent_decode(text)));
    }
    let get = |attrs: &mut Map<String, Value>, k: &str| match attrs.remove(k) {
        Some(Value::String(s)) => Some(s),
        _ => None,
    };
    let raw = Raw {
        specversion: get(&mut attrs, "specversion"),
        id: get(&mut attrs, "id"),
        source: get(&mut attrs, "source"),
        kind: get(&mut attrs, "type"),
        topic: get(&mut attrs, "topic"),
        subject: get(&mut attrs, "subject"),
        time: get(&mut attrs, "time"),
        content_type: headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        correlation: get(&mut attrs, "correlationid"),
        causation: get(&mut attrs, "causationid"),
    };
    let mut attributes = std::collections::HashMap::new();
    for (name, value) in attrs {
        check_extension_name(&name)?;
        if let Value::String(v) = value {
            attributes.insert(name, v);
        }
    }
    raw.into_event(body.to_vec(), attributes)
}

/// The attributes as received, before they are checked.
struct Raw {
    specversion: Option<String>,
    id: Option<String>,
    source: Option<String>,
    kind: Option<String>,
    topic: Option<String>,
    subject: Option<String>,
    time: Option<String>,
    content_type: Option<String>,
    correlation: Option<String>,
    causation: Option<String>,
}

impl Raw {
    fn into_event(
        self,
        data: Vec<u8>,
        attributes: std::collections::HashMap<String, String>,
    ) -> Result<v1::Event, Refused> {
        let required = |name: &str, v: Option<String>| {
            v.filter(|s| !s.is_empty())
                .ok_or_else(|| refused(name, format!("{name} is required (CloudEvents 1.0)")))
        };
        let specversion = required("specversion", self.specversion)?;
        if specversion != "1.0" {
            return Err(refused("specversion", format!("specversion must be 1.0, not {specversion:?}")));
        }
        let id = required("id", self.id)?;
        if id.len() > 200 {
            return Err(refused("id", "id is longer than 200 characters"));
        }
        let source = required("source", self.source)?;
        let kind = required("type", self.kind)?;
        let topic = required("topic", self.topic)?;
        if !names::is_topic(&topic) {
            return Err(refused("topic", format!("topic {topic:?} must be {}", names::TOPIC_RULE)));
        }
        let time_unix_ms = match &self.time {
            None => mesh_proto::unix_ms(std::time::SystemTime::now()),
            Some(t) => rfc3339_ms(t).ok_or_else(|| refused("time", format!("time {t:?} is not RFC 3339")))?,
        };
        Ok(v1::Event {
            id,
            topic,
            source,
            r#type: kind,
            key: self.subject.unwrap_or_default(),
            time_unix_ms,
            data,
            content_type: self.content_type.unwrap_or_else(|| "application/json".into()),
            correlation_id: self.correlation.unwrap_or_default(),
            causation_id: self.causation.unwrap_or_default(),
            attributes,
        })
    }
}

/// CloudEvents attribute names: lowercase letters and digits, at most 20 characters.
fn check_extension_name(name: &str) -> Result<(), Refused> {
    if name.is_empty()
        || name.len() > 20
        || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(refused(
            name,
            format!("{name:?} is not a CloudEvents attribute name (a-z, 0-9, at most 20)"),
        ));
    }
    Ok(())
}

/// `%XX` sequences decoded (binary mode's header encoding); anything else as it is.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && let (Some(h), Some(l)) =
                (b.get(i + 1).and_then(|c| hex(*c)), b.get(i + 2).and_then(|c| hex(*c)))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap_or_else(|_| s.to_string())
}

/// RFC 3339 (`2026-01-02T03:04:05.678+02:00`, `Z`, any offset) → Unix milliseconds.
pub fn rfc3339_ms(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(r)?;
        if part.iter().all(u8::is_ascii_digit) { std::str::from_utf8(part).ok()?.parse().ok() } else { None }
    };
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (y, mo, d, h, mi, sec) =
        (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut millis = 0i64;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return None;
        }
        let frac = std::str::from_utf8(&b[start..i.min(start + 3)]).ok()?;
        millis = format!("{frac:0<3}").parse().ok()?;
    }
    let offset_min = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let (oh, om) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            if oh > 23 || om > 59 {
                return None;
            }
            let m = oh * 60 + om;
            if *sign == b'-' { -m } else { m }
        }
        _ => return None,
    };
    // Days since the epoch of a civil date (Howard Hinnant's algorithm).
    let (yy, mm) = if mo <= 2 { (y - 1, mo + 9) } else { (y, mo - 3) };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let doy = (153 * mm + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec.min(59) - offset_min * 60;
    u64::try_from(secs * 1000 + millis).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_with_any_offset_name_the_same_instant() {
        let utc = rfc3339_ms("2026-01-02T03:04:05.678Z").unwrap();
        assert_eq!(rfc3339_ms("2026-01-02T05:04:05.678+02:00"), Some(utc));
        assert_eq!(rfc3339_ms("2026-01-01T22:34:05.678-04:30"), Some(utc));
        assert_eq!(rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(rfc3339_ms("2026-01-02T03:04:05.678901234Z"), Some(utc));
        for bad in ["yesterday", "2026-13-02T03:04:05Z", "2026-01-02T03:04:05", "2026-01-02T03:04:05+2:00"] {
            assert_eq!(rfc3339_ms(bad), None, "{bad}");
        }
    }

    #[test]
    fn structured_binary_and_batch_modes_keep_every_attribute_and_the_data_bytes() {
        let mut h = HeaderMap::new();
        let body = br#"{"specversion":"1.0","id":"1","source":"/s","type":"t","topic":"tp","dataschema":"https://x/s.json","traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01","datacontenttype":"text/plain","data":"hello"}"#;
        let e = &parse(&h, body, "").unwrap()[0];
        assert_eq!((e.data.as_slice(), e.content_type.as_str()), (&b"hello"[..], "text/plain"), "no quotes");
        assert_eq!(e.attributes["dataschema"], "https://x/s.json");
        assert!(e.attributes["traceparent"].starts_with("00-4bf9"));
        let b64 = br#"{"specversion":"1.0","id":"2","source":"/s","type":"t","topic":"tp","datacontenttype":"application/octet-stream","data_base64":"AAEC/w=="}"#;
        assert_eq!(parse(&h, b64, "").unwrap()[0].data, vec![0, 1, 2, 255]);
        for (missing, body) in [
            ("type", r#"{"specversion":"1.0","id":"1","source":"/s","topic":"tp"}"#),
            ("id", r#"{"specversion":"1.0","source":"/s","type":"t","topic":"tp"}"#),
            ("specversion", r#"{"id":"1","source":"/s","type":"t","topic":"tp"}"#),
            ("source", r#"{"specversion":"1.0","id":"1","type":"t","topic":"tp"}"#),
            (
                "Bad_Name",
                r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","topic":"tp","Bad_Name":"x"}"#,
            ),
        ] {
            assert_eq!(parse(&h, body.as_bytes(), "").unwrap_err().attribute, missing, "{body}");
        }
        h.insert("ce-specversion", "1.0".parse().unwrap());
        h.insert("ce-id", "3".parse().unwrap());
        h.insert("ce-source", "%2Fs".parse().unwrap());
        h.insert("ce-type", "t".parse().unwrap());
        h.insert("ce-topic", "tp".parse().unwrap());
        h.insert("ce-myext", "v".parse().unwrap());
        h.insert(http::header::CONTENT_TYPE, "application/octet-stream".parse().unwrap());
        let e = &parse(&h, &[9, 8, 7], "").unwrap()[0];
        assert_eq!(
            (e.source.as_str(), e.data.as_slice(), e.attributes["myext"].as_str()),
            ("/s", &[9u8, 8, 7][..], "v")
        );
        let out = mesh_proto::delivery_json(&v1::Delivery { event: Some(e.clone()), offset: 4 });
        assert_eq!((out["data_base64"].as_str(), out["myext"].as_str()), (Some("CQgH"), Some("v")));
    }
}
