//! Rate limits at the edge, per route: GCRA (`governor`), keyed by the verified subject, an API
//! key header, or the client's address, with a bounded key set (idle keys evicted).
//!
//! Every answer of a limited route carries the IETF `RateLimit-Policy` and `RateLimit` headers
//! (draft-ietf-httpapi-ratelimit-headers); a refusal is 429 with `Retry-After`.

use std::{net::IpAddr, num::NonZeroU32, time::Duration};

use governor::{
    Quota, RateLimiter,
    clock::{Clock, DefaultClock},
    middleware::StateInformationMiddleware,
    state::keyed::DefaultKeyedStateStore,
};
use http::{HeaderMap, HeaderName, HeaderValue};
pub use mesh_proto::gateway::{RateKey, RateLimitSpec};

/// Most keys one route's limiter tracks; past it, idle keys are evicted, and if that is not
/// enough every new key shares one state (limited together rather than not at all).
pub const MAX_KEYS: usize = 100_000;

type Keyed = RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock, StateInformationMiddleware>;

/// One route's limiter.
pub struct RouteLimiter {
    spec: RateLimitSpec,
    name: String,
    limiter: Keyed,
    policy_header: HeaderValue,
}

/// A request let through: how many more may follow at once, for the `RateLimit` header.
pub struct Admitted {
    pub remaining: u32,
}

/// A request refused: how long until the key may send again.
pub struct Limited {
    pub retry_after: Duration,
}

const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");

impl RouteLimiter {
    /// The limiter of the route named `name` (used as the policy's name in the headers).
    pub fn new(name: &str, spec: &RateLimitSpec) -> Result<Self, String> {
        spec.validate()?;
        let rps = NonZeroU32::new(spec.requests_per_second).ok_or("requests_per_second: at least 1")?;
        let burst = NonZeroU32::new(spec.burst()).ok_or("burst: at least 1")?;
        let quota = Quota::per_second(rps).allow_burst(burst);
        // The window in which the whole burst is replenished.
        let window = u64::from(burst.get()).div_ceil(u64::from(rps.get()));
        let name = sanitize(name);
        let policy_header =
            HeaderValue::from_str(&format!("\"{name}\";q={};w={}", burst.get(), window.max(1)))
                .map_err(|e| e.to_string())?;
        Ok(Self {
            spec: spec.clone(),
            name,
            limiter: RateLimiter::keyed(quota).with_middleware::<StateInformationMiddleware>(),
            policy_header,
        })
    }

    /// The key a request counts under.
    pub fn key(&self, headers: &HeaderMap, subject: Option<&str>, client: IpAddr) -> String {
        let by_ip = || format!("ip:{client}");
        match &self.spec.key {
            RateKey::Subject => subject.map_or_else(by_ip, |s| format!("sub:{s}")),
            RateKey::Ip => by_ip(),
            RateKey::Header(h) => headers
                .get(h)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty() && v.len() <= 256)
                .map_or_else(by_ip, |v| format!("key:{v}")),
        }
    }

    /// Counts one request under `key`.
    pub fn check(&self, key: String) -> Result<Admitted, Limited> {
        let key = if self.limiter.len() >= MAX_KEYS {
            self.limiter.retain_recent();
            if self.limiter.len() >= MAX_KEYS { "overflow".to_string() } else { key }
        } else {
            key
        };
        match self.limiter.check_key(&key) {
            Ok(snapshot) => Ok(Admitted { remaining: snapshot.remaining_burst_capacity() }),
            Err(not_until) => {
                Err(Limited { retry_after: not_until.wait_time_from(self.limiter.clock().now()) })
            }
        }
    }

    /// Evicts keys whose state is back to full (idle): the periodic sweep.
    pub fn sweep(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// Keys tracked now.
    pub fn keys(&self) -> usize {
        self.limiter.len()
    }

    /// `RateLimit-Policy` and `RateLimit` for an answer: `remaining` requests now, the full
    /// allowance back in `reset`.
    pub fn headers(&self, headers: &mut HeaderMap, remaining: u32, reset: Duration) {
        headers.insert(RATELIMIT_POLICY, self.policy_header.clone());
        let t = reset.as_secs() + u64::from(reset.subsec_nanos() > 0);
        if let Ok(v) = HeaderValue::from_str(&format!("\"{}\";r={remaining};t={t}", self.name)) {
            headers.insert(RATELIMIT, v);
        }
    }

    /// How long until a key that has `remaining` of the burst left is full again.
    pub fn reset_after(&self, remaining: u32) -> Duration {
        let missing = self.spec.burst().saturating_sub(remaining);
        Duration::from_secs_f64(f64::from(missing) / f64::from(self.spec.requests_per_second))
    }
}

/// A policy name as a header's quoted string can carry it.
fn sanitize(name: &str) -> String {
    let s: String = name.chars().filter(|c| c.is_ascii_graphic() && *c != '"' && *c != '\\').collect();
    if s.is_empty() { "route".into() } else { s }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(rps: u32, burst: u32, key: &str) -> RateLimitSpec {
        RateLimitSpec { requests_per_second: rps, burst, key: RateKey::parse(key).unwrap() }
    }

    #[test]
    fn a_key_gets_its_burst_then_429_with_how_long_to_wait_and_other_keys_are_apart() {
        let l = RouteLimiter::new("api", &spec(1, 3, "subject")).unwrap();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let alice = l.key(&HeaderMap::new(), Some("alice"), ip);
        let remaining: Vec<u32> = (0..3).map(|_| l.check(alice.clone()).ok().unwrap().remaining).collect();
        assert_eq!(remaining, [2, 1, 0]);
        let refused = l.check(alice).err().expect("the fourth within the second is refused");
        assert!(refused.retry_after > Duration::ZERO && refused.retry_after <= Duration::from_secs(1));
        // Another subject, and the anonymous client at the same address, have their own.
        assert!(l.check(l.key(&HeaderMap::new(), Some("bob"), ip)).is_ok());
        assert!(l.check(l.key(&HeaderMap::new(), None, ip)).is_ok());
        let mut h = HeaderMap::new();
        l.headers(&mut h, 0, refused.retry_after);
        assert_eq!(h["ratelimit-policy"], "\"api\";q=3;w=3");
        assert_eq!(h["ratelimit"], "\"api\";r=0;t=1");
    }

    #[test]
    fn keys_come_from_the_subject_an_api_key_or_the_address() {
        let ip: IpAddr = "2001:db8::1".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_static("k1"));
        assert_eq!(
            RouteLimiter::new("r", &spec(1, 1, "ip")).unwrap().key(&h, Some("a"), ip),
            "ip:2001:db8::1"
        );
        let by_key = RouteLimiter::new("r", &spec(1, 1, "header:x-api-key")).unwrap();
        assert_eq!(by_key.key(&h, Some("a"), ip), "key:k1");
        assert_eq!(by_key.key(&HeaderMap::new(), Some("a"), ip), "ip:2001:db8::1");
        assert!(RateKey::parse("cookie").is_err());
        assert!(RouteLimiter::new("r", &spec(0, 1, "ip")).is_err());
    }

    #[test]
    #[allow(clippy::disallowed_types, reason = "governor's clock is the real one; this waits on it, bounded")]
    fn idle_keys_are_evicted() {
        let l = RouteLimiter::new("r", &spec(1000, 1, "ip")).unwrap();
        for i in 0..50 {
            assert!(l.check(format!("k{i}")).is_ok());
        }
        assert_eq!(l.keys(), 50);
        // A burst of one at 1000/s is replenished within a millisecond.
        let until = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            l.sweep();
            if l.keys() == 0 || std::time::Instant::now() > until {
                break;
            }
            std::thread::yield_now();
        }
        assert_eq!(l.keys(), 0, "every key is back to full, so none is kept");
    }
}
