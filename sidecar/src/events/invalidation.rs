//! Cache invalidation by events: the entries an upstream's `invalidate_on` rules name are dropped as events pass.

use crate::{
    events::follow::{EventsClient, Handle, follow},
    shared::Shared,
};

use mesh_proto::v1;
use std::{collections::HashMap, sync::Arc, time::Duration};
use tokio_util::sync::CancellationToken;

/// Keeps one follower per topic named by an upstream's cache `invalidate_on` rules, and drops
/// matching entries as their events pass. Rechecks the policies every `every`. A cache naming
/// a topic serves nothing until that topic's follower is positioned.
pub async fn invalidate_caches(shared: Arc<Shared>, every: Duration, stop: CancellationToken) {
    let mut followers: HashMap<String, CancellationToken> = HashMap::new();
    loop {
        let mut wanted: Vec<String> = shared
            .upstreams
            .all()
            .iter()
            .flat_map(|u| {
                u.policy().policy.cache.invalidate_on.iter().map(|r| r.topic.clone()).collect::<Vec<_>>()
            })
            .collect();
        wanted.sort();
        wanted.dedup();
        followers.retain(|topic, token| {
            let keep = wanted.contains(topic);
            if !keep {
                token.cancel();
            }
            keep
        });
        for topic in wanted {
            if followers.contains_key(&topic) {
                continue;
            }
            let token = stop.child_token();
            followers.insert(topic.clone(), token.clone());
            let s = shared.clone();
            let span = tracing::info_span!("cache_invalidation", topic = %topic);
            mesh_runtime::spawn(span, async move {
                let start = v1::SubscribeStart { topic: topic.clone(), from_end: true, ..Default::default() };
                let mut invalidator = Invalidator { shared: s.clone(), topic: topic.clone(), live: false };
                follow(&s, start, &token, &mut invalidator).await;
                if invalidator.live {
                    s.upstreams.set_topic_live(&topic, false);
                    s.metrics.cache_invalidation_followers.dec();
                }
            });
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

struct Invalidator {
    shared: Arc<Shared>,
    topic: String,
    /// Positioned once: from then on it resumes from its last offset, missing nothing.
    live: bool,
}

impl Handle for Invalidator {
    async fn handle(&mut self, _: &mut EventsClient, d: v1::Delivery) -> bool {
        if let Some(e) = d.event {
            invalidate_for(&self.shared, &e);
        }
        true
    }

    /// The first time: entries kept before (while this topic was not followed) may have missed
    /// their invalidation, so they go; then the caches that name the topic may serve again.
    fn positioned(&mut self) {
        if self.live {
            return;
        }
        self.live = true;
        for up in self.shared.upstreams.all() {
            if up.policy().policy.cache.invalidate_on.iter().any(|r| r.topic == self.topic) {
                up.cache.invalidate("");
            }
        }
        self.shared.upstreams.set_topic_live(&self.topic, true);
        self.shared.metrics.cache_invalidation_followers.inc();
    }
}

/// Drops, in every upstream whose cache policy names `e.topic`, the entries its rules select.
pub fn invalidate_for(shared: &Shared, e: &v1::Event) {
    for up in shared.upstreams.all() {
        let policy = up.policy();
        for rule in policy.policy.cache.invalidate_on.iter().filter(|r| r.topic == e.topic) {
            let prefix = rule.prefix_for(&e.key);
            let n = up.cache.invalidate(&prefix);
            shared
                .metrics
                .cache_invalidations
                .get_or_create(&vec![("service", up.name.clone()), ("topic", e.topic.clone())])
                .inc_by(n as u64);
            tracing::debug!(service = %up.name, %prefix, dropped = n, "cache entries invalidated by an event");
        }
    }
}
