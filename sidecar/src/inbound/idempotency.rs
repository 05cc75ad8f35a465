//! Idempotency at the receiving sidecar: within a window, a repeated `Idempotency-Key` for this
//! service gets the first answer instead of reaching the app again. A duplicate that arrives
//! while the first is still in flight waits for it (single flight).
//!
//! A key belongs to one client ([`scope`]: the verified caller, or its address without mTLS,
//! and its `Authorization`), and to one request ([`fingerprint`]: method, path and query, and a
//! SHA-256 of the body). The same key with a different request is refused
//! ([`Begin::Mismatch`], answered 422 as the IETF Idempotency-Key draft says), never given
//! another request's answer.
//!
//! Only answers that settle the request are kept (not 5xx, bodies up to [`MAX_BODY`]); when the
//! first attempt fails or its answer is not kept, waiting duplicates go to the app themselves.

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::{sync::watch, time::Instant};

/// The header a client sends to make a request safe to retry and apply once.
pub const IDEMPOTENCY_KEY: http::HeaderName = http::HeaderName::from_static("idempotency-key");

/// Largest response body kept for replay, and largest request body a keyed request may carry
/// (its digest needs all of it).
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

/// What a key was first used for: SHA-256 of method, path and query, and body.
pub type Fingerprint = [u8; 32];

struct Entry {
    at: Instant,
    fingerprint: Fingerprint,
    slot: Slot,
}

/// Whose key this is: the caller (verified identity, or address without mTLS), the client's
/// credential within it (the `Authorization` header, as a digest), and the key.
pub fn scope(caller: &str, authorization: Option<&[u8]>, key: &str) -> String {
    use std::fmt::Write;
    let who = mesh_runtime::sha256_parts(&[caller.as_bytes(), authorization.unwrap_or_default()]);
    let mut s = String::with_capacity(key.len() + 33);
    for b in &who[..16] {
        let _ = write!(s, "{b:02x}");
    }
    s.push(' ');
    s.push_str(key);
    s
}

/// What request a key is used for.
pub fn fingerprint(method: &http::Method, path_and_query: &str, body: &[u8]) -> Fingerprint {
    mesh_runtime::sha256_parts(&[method.as_str().as_bytes(), path_and_query.as_bytes(), body])
}

/// What to do with a request carrying a key.
pub enum Begin {
    /// Answer with this (the first response).
    Replay(Arc<Stored>),
    /// Another request with this key is in flight: wait for its answer.
    Wait(watch::Receiver<Option<Option<Arc<Stored>>>>),
    /// This request goes to the app; finish the guard with its answer.
    Owner(Guard),
    /// The key was used for a different request within the window.
    Mismatch,
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

    /// `key` is a [`scope`]; `fingerprint` says what request it is used for.
    pub fn begin(self: &Arc<Self>, key: &str, fingerprint: Fingerprint, now: Instant) -> Begin {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = keys.get(key)
            && now.duration_since(e.at) <= self.window
        {
            if e.fingerprint != fingerprint {
                return Begin::Mismatch;
            }
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
        keys.insert(key.to_string(), Entry { at: now, fingerprint, slot: slot.clone() });
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

    const F: Fingerprint = [1; 32];

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
        let Begin::Owner(g) = t.begin("k", F, now) else { panic!("first request owns the key") };
        g.finish(Some(ok("first")));
        let Begin::Replay(s) = t.begin("k", F, now + Duration::from_secs(59)) else { panic!("replayed") };
        assert!(matches!(t.begin("k", [2; 32], now), Begin::Mismatch), "another request, same key");
        assert_eq!(s.body, "first");
        assert!(matches!(t.begin("k", F, now + Duration::from_secs(61)), Begin::Owner(_)), "window over");
    }

    #[tokio::test(start_paused = true)]
    async fn a_duplicate_in_flight_waits_for_the_first_answer() {
        let t = Idempotency::new(Duration::from_secs(60));
        let now = Instant::now();
        let Begin::Owner(g) = t.begin("k", F, now) else { panic!() };
        let Begin::Wait(mut rx) = t.begin("k", F, now) else { panic!("waits") };
        g.finish(Some(ok("one")));
        let got = rx.wait_for(|v| v.is_some()).await.unwrap().clone().unwrap().unwrap();
        assert_eq!(got.body, "one");
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_not_kept_so_a_retry_reaches_the_app() {
        let t = Idempotency::new(Duration::from_secs(60));
        let now = Instant::now();
        let Begin::Owner(g) = t.begin("k", F, now) else { panic!() };
        let Begin::Wait(mut rx) = t.begin("k", F, now) else { panic!() };
        g.finish(Some(Stored { status: StatusCode::SERVICE_UNAVAILABLE, ..ok("") }));
        assert!(rx.wait_for(|v| v.is_some()).await.unwrap().clone().unwrap().is_none(), "waiters go through");
        assert!(matches!(t.begin("k", F, now), Begin::Owner(_)));
        let Begin::Owner(g) = t.begin("other", F, now) else { panic!() };
        drop(g); // the request died: nothing kept
        assert!(matches!(t.begin("other", F, now), Begin::Owner(_)));
    }

    #[test]
    fn keys_belong_to_one_client_and_one_request() {
        let alice = scope("spiffe://m/service/gateway", Some(b"Bearer alice"), "k");
        let bob = scope("spiffe://m/service/gateway", Some(b"Bearer bob"), "k");
        let web = scope("spiffe://m/service/web", Some(b"Bearer alice"), "k");
        assert!(alice != bob && alice != web && bob != web);
        assert_eq!(alice, scope("spiffe://m/service/gateway", Some(b"Bearer alice"), "k"));
        let post = http::Method::POST;
        let trade = fingerprint(&post, "/markets/m1/trades", br#"{"shares":"1"}"#);
        assert_ne!(trade, fingerprint(&post, "/markets/m1/trades", br#"{"shares":"2"}"#));
        assert_ne!(trade, fingerprint(&post, "/accounts", br#"{"shares":"1"}"#));
        assert_ne!(trade, fingerprint(&http::Method::PUT, "/markets/m1/trades", br#"{"shares":"1"}"#));
    }
}
