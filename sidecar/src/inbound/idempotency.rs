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
//! Only answers that settle the request are kept (not 5xx, 401, 408 or 429; bodies up to
//! [`MAX_BODY`]); from a trusted edge a key is scoped to the end user it names, and an anonymous
//! edge request's key is left to the app (the edge speaks for many clients); when the
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

/// Whether an answer settles its request (and is kept for the key): not a server error, and
/// not one the client is meant to retry after fixing something — 401 (sign in), 408, 429.
fn settled(status: StatusCode) -> bool {
    !status.is_server_error() && !matches!(status.as_u16(), 401 | 408 | 429)
}

/// Whose key this is, and for what: the caller (verified identity, or address without mTLS),
/// the client's credential within it (the `Authorization` header, or the end user from a
/// trusted edge, as a digest), the method and path it is used on, and the key. A key reused on
/// another method or path is another key here: the app answers that (its routing, 405 or 404,
/// and its own idempotency record come first), the sidecar refuses only a changed body or query.
pub fn scope(
    caller: &str,
    credential: Option<&[u8]>,
    method: &http::Method,
    path: &str,
    key: &str,
) -> String {
    use std::fmt::Write;
    let who = mesh_runtime::sha256_parts(&[
        caller.as_bytes(),
        b"\n",
        credential.unwrap_or_default(),
        b"\n",
        method.as_str().as_bytes(),
        b" ",
        path.as_bytes(),
    ]);
    let mut s = String::with_capacity(key.len() + 33);
    for b in &who[..16] {
        let _ = write!(s, "{b:02x}");
    }
    s.push(' ');
    s.push_str(key);
    s
}

/// The headers that make a request conditional: a retry under another precondition is
/// another request.
const CONDITIONS: [http::HeaderName; 4] = [
    http::header::IF_MATCH,
    http::header::IF_NONE_MATCH,
    http::header::IF_UNMODIFIED_SINCE,
    http::header::IF_MODIFIED_SINCE,
];

/// What request a key is used for: method, path and query, preconditions and body.
pub fn fingerprint(
    method: &http::Method,
    path_and_query: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Fingerprint {
    let conditions: Vec<u8> = CONDITIONS
        .iter()
        .flat_map(|h| headers.get_all(h).iter().flat_map(|v| [v.as_bytes(), b"\n"].concat()).chain([0u8]))
        .collect();
    mesh_runtime::sha256_parts(&[method.as_str().as_bytes(), path_and_query.as_bytes(), &conditions, body])
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
        let kept = answer.filter(|a| settled(a.status) && a.body.len() <= MAX_BODY).map(Arc::new);
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
    async fn answers_to_fix_and_retry_are_not_kept() {
        let t = Idempotency::new(Duration::from_secs(60));
        let now = Instant::now();
        for status in [StatusCode::UNAUTHORIZED, StatusCode::REQUEST_TIMEOUT, StatusCode::TOO_MANY_REQUESTS] {
            let Begin::Owner(g) = t.begin("k", F, now) else { panic!("{status}: the key is free") };
            g.finish(Some(Stored { status, ..ok("") }));
        }
        // A settled refusal (400, 403, 409 …) is the request's answer, like a success.
        let Begin::Owner(g) = t.begin("k", F, now) else { panic!() };
        g.finish(Some(Stored { status: StatusCode::CONFLICT, ..ok("no") }));
        assert!(matches!(t.begin("k", F, now), Begin::Replay(_)));
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
        let post = http::Method::POST;
        let at =
            |caller: &str, credential: &[u8], path: &str| scope(caller, Some(credential), &post, path, "k");
        let alice = at("spiffe://m/service/gateway", b"Bearer alice", "/a");
        let bob = at("spiffe://m/service/gateway", b"Bearer bob", "/a");
        let web = at("spiffe://m/service/web", b"Bearer alice", "/a");
        assert!(alice != bob && alice != web && bob != web);
        assert_eq!(alice, at("spiffe://m/service/gateway", b"Bearer alice", "/a"));
        assert_ne!(
            alice,
            at("spiffe://m/service/gateway", b"Bearer alice", "/b"),
            "another path, another key"
        );
        let none = HeaderMap::new();
        let trade = fingerprint(&post, "/markets/m1/trades", &none, br#"{"shares":"1"}"#);
        assert_ne!(trade, fingerprint(&post, "/markets/m1/trades", &none, br#"{"shares":"2"}"#));
        assert_ne!(trade, fingerprint(&post, "/accounts", &none, br#"{"shares":"1"}"#));
        assert_ne!(trade, fingerprint(&http::Method::PUT, "/markets/m1/trades", &none, br#"{"shares":"1"}"#));
        let mut pinned = HeaderMap::new();
        pinned.insert(http::header::IF_MATCH, http::HeaderValue::from_static("\"7\""));
        assert_ne!(
            trade,
            fingerprint(&post, "/markets/m1/trades", &pinned, br#"{"shares":"1"}"#),
            "another precondition"
        );
    }
}
