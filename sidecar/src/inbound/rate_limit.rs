//! Token-bucket rate limits per service and per caller (at most 10,000 callers tracked).

use std::{sync::Mutex, time::Duration};
use tokio::time::Instant;

/// A token bucket: `rate` tokens per second up to `burst`.
#[derive(Debug, Clone)]
pub struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    pub fn new(rate: u32, burst: u32, now: Instant) -> Self {
        let burst = f64::from(if burst == 0 { rate } else { burst }).max(1.0);
        Bucket { rate: f64::from(rate), burst, tokens: burst, at: now }
    }

    fn same_shape(&self, rate: u32, burst: u32) -> bool {
        self.rate == f64::from(rate)
            && self.burst == f64::from(if burst == 0 { rate } else { burst }).max(1.0)
    }

    /// Takes a token, or says how long until one is there.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate.max(f64::MIN_POSITIVE)))
        }
    }
}

/// The rate limits of one service: one bucket for everyone, one per caller.
#[derive(Debug, Default)]
pub struct RateLimits {
    all: Mutex<Option<Bucket>>,
    callers: Mutex<std::collections::HashMap<String, Bucket>>,
}

/// Most callers tracked at once; beyond, the oldest state is forgotten (fails open, not closed).
const MAX_CALLERS: usize = 10_000;

impl RateLimits {
    /// Admits a request from `caller`, or says how long to wait (for `Retry-After`).
    pub fn check(
        &self,
        caller: &str,
        p: &mesh_proto::policy::RateLimitPolicy,
        now: Instant,
    ) -> Result<(), Duration> {
        if p.requests_per_second > 0 {
            let mut all = self.all.lock().unwrap_or_else(|e| e.into_inner());
            let b = all.get_or_insert_with(|| Bucket::new(p.requests_per_second, p.burst, now));
            if !b.same_shape(p.requests_per_second, p.burst) {
                *b = Bucket::new(p.requests_per_second, p.burst, now);
            }
            b.take(now)?;
        }
        if p.per_caller_requests_per_second > 0 {
            let mut callers = self.callers.lock().unwrap_or_else(|e| e.into_inner());
            if callers.len() >= MAX_CALLERS && !callers.contains_key(caller) {
                callers.clear();
            }
            // A known caller is looked up without copying its name.
            let b = match callers.get_mut(caller) {
                Some(b) => b,
                None => callers.entry(caller.to_string()).or_insert_with(|| {
                    Bucket::new(p.per_caller_requests_per_second, p.per_caller_burst, now)
                }),
            };
            if !b.same_shape(p.per_caller_requests_per_second, p.per_caller_burst) {
                *b = Bucket::new(p.per_caller_requests_per_second, p.per_caller_burst, now);
            }
            b.take(now)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::time::Duration;
    use tokio::time::Instant;

    #[tokio::test(start_paused = true)]
    async fn rate_limits_admit_a_burst_then_the_rate_per_service_and_per_caller() {
        use mesh_proto::policy::RateLimitPolicy;
        let p = RateLimitPolicy {
            requests_per_second: 10,
            burst: 5,
            per_caller_requests_per_second: 0,
            per_caller_burst: 0,
        };
        let l = RateLimits::default();
        let t = Instant::now();
        assert_eq!((0..20).filter(|_| l.check("a", &p, t).is_ok()).count(), 5, "the burst");
        let wait = l.check("a", &p, t).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(100), "{wait:?}");
        assert!(l.check("b", &p, t + Duration::from_millis(100)).is_ok(), "one more token after 1/rate");

        let per = RateLimitPolicy {
            requests_per_second: 0,
            burst: 0,
            per_caller_requests_per_second: 1,
            per_caller_burst: 2,
        };
        let l = RateLimits::default();
        assert_eq!((0..5).filter(|_| l.check("a", &per, t).is_ok()).count(), 2);
        assert_eq!(
            (0..5).filter(|_| l.check("b", &per, t).is_ok()).count(),
            2,
            "each caller has its own bucket"
        );
        let off = RateLimitPolicy::default();
        assert!((0..1000).all(|_| l.check("a", &off, t).is_ok()), "0 disables");
    }
}
