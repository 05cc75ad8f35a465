//! Idempotency at the receiving sidecar: within a window, a repeated `Idempotency-Key` for this
//! service gets the first answer instead of reaching the app again. A duplicate that arrives
//! while the first is still in flight waits for it (single flight).
//!
//! Only answers that settle the request are kept (not 5xx, bodies up to [`MAX_BODY`]); when the
//! first attempt fails or its answer is not kept, waiting duplicates go to the app themselves.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use tokio::{sync::watch, time::Instant};

/// The header a client sends to make a request safe to retry and apply once.
pub const IDEMPOTENCY_KEY: http::HeaderName = http::HeaderName::from_static("idempotency-key");

/// Largest response body kept for replay.
pub const MAX_BODY: usize = 1024 * 1024;
/// Most keys remembered; the oldest go first.
const MAX_KEYS: usize = 10_000;

/// A kept answer.
#[derive(Debug, Clone)]
pub struct Stored {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

type Slot = watch::Sender<Option<Option<Arc<Stored>>>>;

struct Entry {
    at: Instant,
    slot: Slot,
}

/// What to do with a request carrying a key.
pub enum Begin {
    /// Answer with this (the first response).
    Replay(Arc<Stored>),
    /// Another request with this key is in flight: wait for its answer.
    Wait(watch::Receiver<Option<Option<Arc<Stored>>>>),
    /// This request goes to the app; finish the guard with its answer.
    Owner(Guard),
}

pub struct Idempotency {
    window: Duration,
    keys: Mutex<HashMap<String, Entry>>,
}

/// Held by the request that reaches the app; dropping it unfinished releases the waiters.
pub struct Guard {
    key: String,
    slot: Slot,
    table: Arc<Idempotency>,
    done: bool,
}

impl Idempotency {
    pub fn new(window: Duration) -> Arc<Self> {
        Arc::new(Idempotency { window, keys: Mutex::new(HashMap::new()) })
    }

    pub fn begin(self: &Arc<Self>, key: &str, now: Instant) -> Begin {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = keys.get(key)
            && now.duration_since(e.at) <= self.window
        {
            match e.slot.borrow().clone() {
                Some(Some(stored)) => return Begin::Replay(stored),
                None => return Begin::Wait(e.slot.subscribe()),
                Some(None) => {} // the first attempt kept nothing: this one goes through
            }
        }
        if keys.len() >= MAX_KEYS {
            keys.retain(|_, e| now.duration_since(e.at) <= self.window);
            if keys.len() >= MAX_KEYS
                && let Some(oldest) = keys.iter().min_by_key(|(_, e)| e.at).map(|(k, _)| k.clone())
            {
                keys.remove(&oldest);
            }
        }
        let slot = watch::channel(None).0;
        keys.insert(key.to_string(), Entry { at: now, slot: slot.clone() });
        Begin::Owner(Guard { key: key.to_string(), slot, table: self.clone(), done: false })
    }
}

impl Guard {
    /// Keeps `answer` for replay (when it settles the request) and hands it to the waiters.
    pub fn finish(mut self, answer: Option<Stored>) {
        let kept = answer.filter(|a| !a.status.is_server_error() && a.body.len() <= MAX_BODY).map(Arc::new);
        if kept.is_none() {
            self.forget();
        }
        self.slot.send_replace(Some(kept));
        self.done = true;
    }

    fn forget(&self) {
        let mut keys = self.table.keys.lock().unwrap_or_else(|p| p.into_inner());
        if keys.get(&self.key).is_some_and(|e| e.slot.same_channel(&self.slot)) {
            keys.remove(&self.key);
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if !self.done {
            self.forget();
            self.slot.send_replace(Some(None));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(body: &'static str) -> Stored {
        Stored {
            status: StatusCode::CREATED,
            headers: HeaderMap::new(),
            body: Bytes::from_static(body.as_bytes()),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_repeat_within_the_window_replays_and_after_it_goes_through() {
        let t = Idempotency::new(Duration::from_secs(60));
        let now = Instant::now();
        let Begin::Owner(g) = t.begin("k", now) else { panic!("first request owns the key") };
        g.finish(Some(ok("first")));
        let Begin::Replay(s) = t.begin("k", now + Duration::from_secs(59)) else { panic!("replayed") };
        assert_eq!(s.body, "first");
        assert!(matches!(t.begin("k", now + Duration::from_secs(61)), Begin::Owner(_)), "window over");
    }

    #[tokio::test(start_paused = true)]
    async fn a_duplicate_in_flight_waits_for_the_first_answer() {
        let t = Idempotency::new(Duration::from_secs(60));
        let now = Instant::now();
        let Begin::Owner(g) = t.begin("k", now) else { panic!() };
        let Begin::Wait(mut rx) = t.begin("k", now) else { panic!("waits") };
        g.finish(Some(ok("one")));
        let got = rx.wait_for(|v| v.is_some()).await.unwrap().clone().unwrap().unwrap();
        assert_eq!(got.body, "one");
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_not_kept_so_a_retry_reaches_the_app() {
        let t = Idempotency::new(Duration::from_secs(60));
        let now = Instant::now();
        let Begin::Owner(g) = t.begin("k", now) else { panic!() };
        let Begin::Wait(mut rx) = t.begin("k", now) else { panic!() };
        g.finish(Some(Stored { status: StatusCode::SERVICE_UNAVAILABLE, ..ok("") }));
        assert!(rx.wait_for(|v| v.is_some()).await.unwrap().clone().unwrap().is_none(), "waiters go through");
        assert!(matches!(t.begin("k", now), Begin::Owner(_)));
        let Begin::Owner(g) = t.begin("other", now) else { panic!() };
        drop(g); // the request died: nothing kept
        assert!(matches!(t.begin("other", now), Begin::Owner(_)));
    }
}
