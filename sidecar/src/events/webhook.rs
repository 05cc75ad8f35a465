//! Events from the bus, delivered to the local app and to the response cache.
//!
//! - **Webhooks.** Each [`Subscription`] (from the sidecar's config) follows its topic as its
//!   consumer group and POSTs every event to the app in CloudEvents binary mode (`ce-*`
//!   headers, the data as the body), one at a time, so in order per key. A `2xx` answer commits
//!   the event; anything else (or no answer within `timeout`) is retried with jittered backoff;
//!   after `max_attempts` the event is published to the dead-letter topic with the reason and
//!   then committed. Delivery waits while the app's health probe fails. Delivery is
//!   at-least-once: a crash between the app's answer and the commit delivers the event again.
//! - **Cache invalidation.** For every topic an upstream's cache policy names in
//!   `invalidate_on`, the sidecar follows the topic from its head (no group: it keeps the offset
//!   in memory and resumes from it after a reconnect) and drops the entries whose path starts
//!   with the rule's prefix, `{key}` replaced by the event's key.

use crate::{
    endpoint::local_app::LocalApp,
    events::{
        follow::{EventsClient, Handle, follow},
        subscription::Subscription,
    },
    http::body,
    shared::Shared,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use mesh_proto::v1;
use mesh_runtime::{
    Backoff,
    telemetry::{self, KeyValue, Span, SpanKind},
};
use std::{sync::Arc, time::Duration};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Delivers `sub`'s events to the app until `stop`.
pub async fn deliver(shared: Arc<Shared>, sub: Subscription, stop: CancellationToken) {
    let Some(app) = shared.app.clone() else { return };
    let group = sub.group.clone().or_else(|| shared.config.service.clone()).unwrap_or_default();
    let start = v1::SubscribeStart { topic: sub.topic.clone(), group, ..Default::default() };
    let span = tracing::info_span!("subscription", topic = %sub.topic, path = %sub.path);
    let mut webhook = Webhook {
        shared: shared.clone(),
        app,
        labels: vec![("topic", sub.topic.clone())],
        group: start.group.clone(),
        sub,
        stop: stop.clone(),
    };
    follow(&shared, start, &stop, &mut webhook).instrument(span).await
}

struct Webhook {
    shared: Arc<Shared>,
    app: LocalApp,
    sub: Subscription,
    group: String,
    labels: Vec<(&'static str, String)>,
    stop: CancellationToken,
}

impl Handle for Webhook {
    async fn handle(&mut self, client: &mut EventsClient, d: v1::Delivery) -> bool {
        let Some(event) = d.event else { return true };
        let mut span = self.delivery_span(&event);
        let traceparent = span.as_ref().map(|s| s.traceparent());
        let delivered = self.attempts(client, event, d.offset, traceparent.as_deref()).await;
        if let Some(mut s) = span.take() {
            if !delivered {
                s.fail("not delivered: dead-lettered, or stopped");
            }
            s.end();
        }
        delivered
    }
}

impl Webhook {
    /// The delivery's span (OpenTelemetry messaging conventions: `process <topic>`, a consumer
    /// span), linked to the span that published the event — the CloudEvents distributed tracing
    /// extension's `traceparent` — and sampled as that one was (a new trace otherwise, sampled
    /// by the service's share). The app's request carries it as its `traceparent`.
    fn delivery_span(&self, event: &v1::Event) -> Option<Span> {
        let (telemetry, attrs) = (&self.shared.telemetry, &event.attributes);
        if !telemetry.is_on() {
            return None;
        }
        let producer = attrs.get("traceparent").and_then(|tp| {
            let p = telemetry::parse_traceparent(tp.as_bytes())?;
            Some(p.span_context(attrs.get("tracestate").map(String::as_str)))
        });
        let sampled = match &producer {
            Some(p) => p.is_sampled(),
            None => self.shared.sampling.sample(rand::random()),
        };
        if !sampled {
            return None;
        }
        let attributes = vec![
            KeyValue::new("messaging.system", "opinion-market-mesh"),
            KeyValue::new("messaging.operation.type", "process"),
            KeyValue::new("messaging.destination.name", event.topic.clone()),
            KeyValue::new("messaging.message.id", event.id.clone()),
            KeyValue::new("messaging.consumer.group.name", self.group.clone()),
            KeyValue::new("url.path", self.sub.path.clone()),
        ];
        let name = format!("process {}", event.topic);
        telemetry.span_with(name, SpanKind::Consumer, None, attributes, None, producer.into_iter().collect())
    }

    /// Posts `event` to the app until it takes it (or it is dead-lettered); false when stopped.
    async fn attempts(
        &mut self,
        client: &mut EventsClient,
        event: v1::Event,
        offset: u64,
        traceparent: Option<&str>,
    ) -> bool {
        let (m, sub, stop) = (&self.shared.metrics, &self.sub, &self.stop);
        let mut backoff = Backoff::new(sub.backoff_base, sub.backoff_max);
        let mut last_error = String::new();
        for attempt in 1..=sub.max_attempts {
            let mut healthy = self.shared.app_healthy.subscribe();
            tokio::select! {
                _ = stop.cancelled() => return false,
                r = healthy.wait_for(|h| *h) => if r.is_err() { return false },
            }
            match post(&self.app, sub, &event, offset, traceparent).await {
                Ok(()) => {
                    m.events_delivered.get_or_create(&self.labels).inc();
                    return true;
                }
                Err(e) => {
                    m.event_delivery_failures.get_or_create(&self.labels).inc();
                    tracing::debug!(id = %event.id, attempt, error = %e, "delivery failed");
                    last_error = e;
                }
            }
            if attempt < sub.max_attempts && !backoff.wait(stop).await {
                return false;
            }
        }
        tracing::warn!(id = %event.id, error = %last_error, "event dead-lettered");
        let stored = dead_letter(client, sub, &self.group, event, offset, &last_error, stop).await;
        if stored {
            m.events_dead_lettered.get_or_create(&self.labels).inc();
        }
        stored
    }
}

async fn post(
    app: &LocalApp,
    sub: &Subscription,
    e: &v1::Event,
    offset: u64,
    traceparent: Option<&str>,
) -> Result<(), String> {
    let time =
        humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(e.time_unix_ms))
            .to_string();
    let mut req = http::Request::post(sub.path.as_str())
        .header(
            http::header::CONTENT_TYPE,
            if e.content_type.is_empty() { "application/json" } else { &e.content_type },
        )
        .header("ce-specversion", "1.0")
        .header("ce-id", &e.id)
        .header("ce-source", &e.source)
        .header("ce-type", &e.r#type)
        .header("ce-time", time)
        .header("ce-topic", &e.topic)
        .header("x-mesh-event-offset", offset.to_string());
    for (name, value) in
        [("ce-subject", &e.key), ("ce-correlationid", &e.correlation_id), ("ce-causationid", &e.causation_id)]
    {
        if !value.is_empty() {
            req = req.header(name, value);
        }
    }
    // Every other attribute (dataschema, traceparent, extensions) as it came in.
    for (name, value) in
        e.attributes.iter().filter(|(k, _)| !mesh_proto::cloudevents::OWN.contains(&k.as_str()))
    {
        req = req.header(format!("ce-{name}"), percent_encode(value));
    }
    // The delivery's own trace (the event's origin stays in `ce-traceparent`).
    if let Some(tp) = traceparent {
        req = req.header("traceparent", tp);
    }
    let req = req
        .body(body::boxed(Full::new(Bytes::from(e.data.clone()))))
        .map_err(|e| format!("invalid event header: {e}"))?;
    let resp = tokio::time::timeout(sub.timeout, async {
        let resp = app.send(req, None).await.map_err(|e| format!("cannot reach the app: {e}"))?;
        let status = resp.status();
        // Read the answer so the connection can be reused.
        let _ = resp.into_body().collect().await;
        Ok::<_, String>(status)
    })
    .await
    .map_err(|_| format!("the app did not answer within {:?}", sub.timeout))??;
    if resp.is_success() { Ok(()) } else { Err(format!("the app answered {resp}")) }
}

/// Publishes `event` to the subscription's dead-letter topic (retrying until it is stored or
/// `stop`); false when stopped first.
async fn dead_letter(
    client: &mut EventsClient,
    sub: &Subscription,
    group: &str,
    mut event: v1::Event,
    offset: u64,
    reason: &str,
    stop: &CancellationToken,
) -> bool {
    event.attributes.insert("deadletter_topic".into(), event.topic.clone());
    event.attributes.insert("deadletter_group".into(), group.to_string());
    event.attributes.insert("deadletter_offset".into(), offset.to_string());
    event.attributes.insert("deadletter_attempts".into(), sub.max_attempts.to_string());
    event.attributes.insert("deadletter_reason".into(), reason.chars().take(500).collect());
    event.topic = sub.dead_letter();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        match client.publish(v1::PublishRequest { events: vec![event.clone()] }).await {
            Ok(_) => return true,
            Err(s) => {
                tracing::warn!(error = %s, "publishing to the dead-letter topic failed; retrying");
                if !backoff.wait(stop).await {
                    return false;
                }
            }
        }
    }
}

/// A header-safe attribute value: printable ASCII but `%` as is, everything else `%XX`
/// (CloudEvents HTTP binding §3.1.3.2).
fn percent_encode(v: &str) -> String {
    v.bytes()
        .map(|b| {
            if (0x20..0x7f).contains(&b) && b != b'%' { (b as char).to_string() } else { format!("%{b:02X}") }
        })
        .collect()
}
