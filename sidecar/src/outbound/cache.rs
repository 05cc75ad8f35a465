//! The response cache of one upstream service, configured by its policy's `cache` section.
//!
//! - What: the policy's methods (GET/HEAD) and path prefixes; `200` answers only; bodies up to
//!   [`MAX_ENTRY_BYTES`] (and the policy's `max_bytes`); never when the request says `no-cache`
//!   or `no-store`, nor answers marked `no-store`, `private` or `no-cache` (this is a shared cache).
//! - Key: method, path and query, the policy's `key_headers`, the answer's `Vary` headers, and
//!   the request's `Authorization` — dropped only for answers marked `public`, so a response is
//!   never served across identities unless it says it may be.
//! - Freshness: the policy's TTL, shortened by `max-age` / `s-maxage` when `honor_cache_control`;
//!   a stale entry may answer for `stale_if_error` past its expiry when the upstream fails.
//! - Size: at most `max_entries` and `max_bytes`; the oldest entries go first.
//! - Concurrent misses on one key make a single upstream request (the others wait for it).

use bytes::Bytes;
use http::{HeaderMap, HeaderName, Method, StatusCode, header};
use mesh_proto::policy::CachePolicy;
use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::{sync::watch, time::Instant};

/// Largest body kept for one entry.
pub const MAX_ENTRY_BYTES: usize = 1024 * 1024;

#[derive(Debug, Clone)]
pub struct Entry {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub expires: Instant,
    pub stale_until: Instant,
    path: String,
}

impl Entry {
    fn size(&self) -> usize {
        self.body.len()
            + self.headers.iter().map(|(k, v)| k.as_str().len() + v.len()).sum::<usize>()
            + self.path.len()
    }
}

/// A lookup's result.
pub enum Lookup {
    Fresh(Arc<Entry>),
    /// Expired but usable if the upstream fails.
    Stale(Arc<Entry>),
    Miss,
}

type Flight = watch::Sender<bool>;

#[derive(Default)]
struct Inner {
    entries: HashMap<String, Arc<Entry>>,
    order: VecDeque<String>,
    bytes: usize,
    /// Vary header names seen per base key.
    vary: HashMap<String, Vec<HeaderName>>,
    inflight: HashMap<String, Flight>,
    /// Bumped by every invalidation.
    generation: u64,
}

#[derive(Default)]
pub struct Cache(Mutex<Inner>);

/// The request facts the cache needs.
pub struct Request<'a> {
    pub method: &'a Method,
    pub path_and_query: &'a str,
    pub headers: &'a HeaderMap,
    /// The cache's [`Cache::generation`] when the answer being stored was asked for: an answer
    /// fetched before a later invalidation may predate the change that invalidated, so it is
    /// not kept. `None`: no such check.
    pub since: Option<u64>,
}

fn directives(h: &HeaderMap) -> Vec<String> {
    h.get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|d| d.trim().to_ascii_lowercase())
        .collect()
}

fn max_age(d: &[String]) -> Option<Duration> {
    let pick = |prefix: &str| d.iter().find_map(|x| x.strip_prefix(prefix)?.parse::<u64>().ok());
    pick("s-maxage=").or_else(|| pick("max-age=")).map(Duration::from_secs)
}

impl Cache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this request may use the cache at all.
    pub fn applies(p: &CachePolicy, r: &Request<'_>) -> bool {
        if p.ttl.is_zero() || !p.methods.iter().any(|m| m == r.method.as_str()) {
            return false;
        }
        let path = r.path_and_query.split('?').next().unwrap_or("");
        if !p.path_prefixes.is_empty() && !p.path_prefixes.iter().any(|pre| path.starts_with(pre.as_str())) {
            return false;
        }
        let d = directives(r.headers);
        !(p.honor_cache_control && d.iter().any(|x| x == "no-cache" || x == "no-store"))
    }

    fn base_key(p: &CachePolicy, r: &Request<'_>) -> String {
        let mut k = format!("{} {}", r.method, r.path_and_query);
        for h in &p.key_headers {
            k.push_str(&format!(
                "\n{h}:{}",
                r.headers.get(h.as_str()).and_then(|v| v.to_str().ok()).unwrap_or("")
            ));
        }
        k
    }

    fn full_key(base: &str, vary: &[HeaderName], headers: &HeaderMap, auth: Option<&str>) -> String {
        let mut k = base.to_string();
        for name in vary {
            k.push_str(&format!(
                "\nvary {name}:{}",
                headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
            ));
        }
        if let Some(a) = auth {
            k.push_str("\nauthorization:");
            k.push_str(a);
        }
        k
    }

    /// The keys to look under, most specific first: with this caller's authorization (if any),
    /// then the public one.
    pub fn keys(&self, p: &CachePolicy, r: &Request<'_>) -> Vec<String> {
        let base = Self::base_key(p, r);
        let vary = self.lock().vary.get(&base).cloned().unwrap_or_default();
        let auth = r.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        let mut keys = Vec::new();
        if auth.is_some() {
            keys.push(Self::full_key(&base, &vary, r.headers, auth));
        }
        keys.push(Self::full_key(&base, &vary, r.headers, None));
        keys
    }

    pub fn lookup(&self, keys: &[String], now: Instant) -> Lookup {
        let inner = self.lock();
        for k in keys {
            if let Some(e) = inner.entries.get(k) {
                if now < e.expires {
                    return Lookup::Fresh(e.clone());
                }
                if now < e.stale_until {
                    return Lookup::Stale(e.clone());
                }
            }
        }
        Lookup::Miss
    }

    /// Joins an in-flight miss for `key`, or becomes its leader (`None`).
    pub fn join(&self, key: &str) -> Option<watch::Receiver<bool>> {
        let mut inner = self.lock();
        if let Some(f) = inner.inflight.get(key) {
            return Some(f.subscribe());
        }
        inner.inflight.insert(key.to_string(), watch::channel(false).0);
        None
    }

    /// Ends the leader's flight (stored or not), waking the followers.
    pub fn land(&self, key: &str) {
        if let Some(f) = self.lock().inflight.remove(key) {
            f.send_replace(true);
        }
    }

    /// Counts invalidations; see [`Request::since`].
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Stores an answer if the policy and the answer allow it. Returns whether it was stored.
    pub fn store(
        &self,
        p: &CachePolicy,
        r: &Request<'_>,
        status: StatusCode,
        headers: &HeaderMap,
        body: &Bytes,
        now: Instant,
    ) -> bool {
        if status != StatusCode::OK || body.len() > MAX_ENTRY_BYTES {
            return false;
        }
        let d = directives(headers);
        if p.honor_cache_control && d.iter().any(|x| x == "no-store" || x == "private" || x == "no-cache") {
            return false;
        }
        if headers.get(header::VARY).is_some_and(|v| v.as_bytes() == b"*") {
            return false;
        }
        let ttl = match (p.honor_cache_control, max_age(&d)) {
            (true, Some(age)) => age.min(p.ttl),
            _ => p.ttl,
        };
        if ttl.is_zero() {
            return false;
        }
        let base = Self::base_key(p, r);
        let vary: Vec<HeaderName> = headers
            .get_all(header::VARY)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().to_ascii_lowercase().as_bytes()).ok())
            .collect();
        let public = d.iter().any(|x| x == "public");
        let auth = r.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).filter(|_| !public);
        let key = Self::full_key(&base, &vary, r.headers, auth);
        let entry = Arc::new(Entry {
            status,
            headers: headers.clone(),
            body: body.clone(),
            expires: now + ttl,
            stale_until: now + ttl + p.stale_if_error,
            path: r.path_and_query.to_string(),
        });
        let size = entry.size();
        if size as u64 > p.max_bytes {
            return false;
        }
        let mut inner = self.lock();
        if r.since.is_some_and(|g| g != inner.generation) {
            return false;
        }
        inner.vary.insert(base, vary);
        if let Some(old) = inner.entries.insert(key.clone(), entry) {
            inner.bytes -= old.size();
        } else {
            inner.order.push_back(key);
        }
        inner.bytes += size;
        while inner.entries.len() as u64 > p.max_entries || inner.bytes as u64 > p.max_bytes {
            let Some(oldest) = inner.order.pop_front() else { break };
            if let Some(e) = inner.entries.remove(&oldest) {
                inner.bytes -= e.size();
            }
        }
        true
    }

    /// Drops every entry whose path starts with `prefix`; returns how many.
    pub fn invalidate(&self, prefix: &str) -> usize {
        self.drop_where(|path| path.starts_with(prefix))
    }

    /// After an unsafe request to `path` succeeded: drops the entries of that path and of each
    /// of its ancestors (any query) — `/markets/7/trades` drops `/markets/7/trades`,
    /// `/markets/7` and `/markets` — so a client that changed a resource through this cache
    /// reads its own write (RFC 9111 §4.4 asks for the target; the parents are where such a
    /// change is read). Returns how many.
    pub fn invalidate_written(&self, path: &str) -> usize {
        let path = path.split('?').next().unwrap_or("").trim_end_matches('/');
        let mut targets = vec![path];
        let mut rest = path;
        while let Some((parent, _)) = rest.rsplit_once('/') {
            targets.push(if parent.is_empty() { "/" } else { parent });
            rest = parent;
        }
        self.drop_where(|p| {
            let p = p.split('?').next().unwrap_or("");
            targets.contains(&p.trim_end_matches('/')) || (p == "/" && targets.contains(&"/"))
        })
    }

    fn drop_where(&self, doomed: impl Fn(&str) -> bool) -> usize {
        let mut inner = self.lock();
        inner.generation += 1;
        let gone: Vec<String> =
            inner.entries.iter().filter(|(_, e)| doomed(&e.path)).map(|(k, _)| k.clone()).collect();
        for k in &gone {
            if let Some(e) = inner.entries.remove(k) {
                inner.bytes -= e.size();
            }
        }
        inner.order.retain(|k| !gone.contains(k));
        gone.len()
    }

    /// (entries, bytes).
    pub fn size(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.entries.len(), inner.bytes)
    }
}

#[cfg(test)]
mod tests;
