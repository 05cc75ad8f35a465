//! Circuit breaking per endpoint: consecutive failures or a failure rate over a window open the
//! breaker, a half-open probe closes it, each reopening lasts longer up to a cap.

use crate::outbound::window::Window;

use mesh_proto::policy::CircuitBreakerPolicy;
use std::{sync::Mutex, time::Duration};
use tokio::time::Instant;

/// Where a breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    /// Skipped until `until`.
    Open {
        until: Instant,
    },
    /// Probing: this many probes may still be sent.
    HalfOpen {
        probes_left: u32,
    },
}

impl BreakerState {
    pub fn name(&self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open { .. } => "open",
            BreakerState::HalfOpen { .. } => "half_open",
        }
    }
}

#[derive(Debug)]
struct BreakerInner {
    state: BreakerState,
    consecutive: u32,
    /// Outcomes within the failure-rate window (marked: failed).
    window: Window,
    /// Openings in a row without a full recovery (drives the open-duration backoff).
    openings: u32,
}

#[derive(Debug)]
pub struct Breaker(Mutex<BreakerInner>);

impl Default for Breaker {
    fn default() -> Self {
        Breaker(Mutex::new(BreakerInner {
            state: BreakerState::Closed,
            consecutive: 0,
            window: Window::default(),
            openings: 0,
        }))
    }
}

impl Breaker {
    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerInner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The state as of `now` (an open breaker past its time is due for probing; [`Self::admit`]
    /// moves it to half-open with the policy's probe count).
    pub fn state(&self, now: Instant) -> BreakerState {
        let _ = now;
        self.lock().state
    }

    /// May a request go to this endpoint now? Takes a half-open probe slot when probing.
    pub fn admit(&self, now: Instant, p: &CircuitBreakerPolicy) -> bool {
        let mut b = self.lock();
        match b.state {
            BreakerState::Closed => true,
            BreakerState::Open { until } if now < until => false,
            BreakerState::Open { .. } => {
                b.state = BreakerState::HalfOpen { probes_left: p.half_open_probes.max(1) - 1 };
                true
            }
            BreakerState::HalfOpen { probes_left: 0 } => false,
            BreakerState::HalfOpen { probes_left } => {
                b.state = BreakerState::HalfOpen { probes_left: probes_left - 1 };
                true
            }
        }
    }

    /// Records an outcome. Returns true when the breaker wants to open (the caller decides).
    pub fn record(&self, failed: bool, now: Instant, p: &CircuitBreakerPolicy) -> bool {
        let mut b = self.lock();
        if !p.failure_rate_window.is_zero() {
            b.window.add(now, p.failure_rate_window, failed);
        }
        if !failed {
            b.consecutive = 0;
            if matches!(b.state, BreakerState::HalfOpen { .. }) {
                b.state = BreakerState::Closed;
                b.openings = 0;
                b.window.clear();
            }
            return false;
        }
        b.consecutive += 1;
        if matches!(b.state, BreakerState::HalfOpen { .. }) {
            return true; // a failed probe re-opens
        }
        if b.state != BreakerState::Closed {
            return false;
        }
        let by_count = p.consecutive_failures > 0 && b.consecutive >= p.consecutive_failures;
        let by_rate = p.failure_rate_percent > 0 && !p.failure_rate_window.is_zero() && {
            let (outcomes, failures) = b.window.counts(now, p.failure_rate_window);
            outcomes >= u64::from(p.failure_rate_min_requests)
                && failures * 100 >= u64::from(p.failure_rate_percent) * outcomes
        };
        by_count || by_rate
    }

    /// Opens (after the caller checked the ejection limits); the duration doubles per opening.
    pub fn open(&self, now: Instant, p: &CircuitBreakerPolicy) -> Duration {
        let mut b = self.lock();
        let d = p
            .open_duration
            .saturating_mul(1u32 << b.openings.min(16))
            .min(p.max_open_duration.max(p.open_duration));
        b.openings += 1;
        b.state = BreakerState::Open { until: now + d };
        b.consecutive = 0;
        b.window.clear();
        d
    }

    /// Open and not yet due for a probe.
    pub fn is_open(&self, now: Instant) -> bool {
        matches!(self.lock().state, BreakerState::Open { until } if now < until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::policy::CircuitBreakerPolicy;
    use std::time::Duration;
    use tokio::time::Instant;

    fn breaker_policy() -> CircuitBreakerPolicy {
        CircuitBreakerPolicy {
            consecutive_failures: 3,
            failure_rate_percent: 50,
            failure_rate_min_requests: 10,
            failure_rate_window: Duration::from_secs(10),
            open_duration: Duration::from_secs(1),
            max_open_duration: Duration::from_secs(5),
            half_open_probes: 1,
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_open_then_a_probe_closes() {
        let p = breaker_policy();
        let b = Breaker::default();
        let t0 = Instant::now();
        assert!(!b.record(true, t0, &p));
        assert!(!b.record(true, t0, &p));
        assert!(b.record(true, t0, &p), "third failure in a row wants to open");
        assert_eq!(b.open(t0, &p), Duration::from_secs(1));
        assert!(!b.admit(t0 + Duration::from_millis(999), &p), "skipped while open");
        assert!(b.is_open(t0 + Duration::from_millis(999)));
        assert!(!b.is_open(t0 + Duration::from_secs(1)), "due for a probe: no longer skipped");
        assert!(b.admit(t0 + Duration::from_secs(1), &p), "one probe after the open duration");
        assert!(!b.admit(t0 + Duration::from_secs(1), &p), "only one probe at a time");
        assert!(!b.record(false, t0 + Duration::from_secs(1), &p));
        assert_eq!(b.state(t0 + Duration::from_secs(1)), BreakerState::Closed);
        assert!(!b.is_open(t0 + Duration::from_secs(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_for_longer_up_to_the_cap() {
        let p = breaker_policy();
        let b = Breaker::default();
        let mut now = Instant::now();
        let mut durations = Vec::new();
        for _ in 0..5 {
            durations.push(b.open(now, &p));
            now += *durations.last().unwrap();
            assert!(b.admit(now, &p));
            assert!(b.record(true, now, &p), "a failed probe wants to re-open");
        }
        let secs: Vec<u64> = durations.iter().map(|d| d.as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 5, 5]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_rate_over_the_window_opens_only_past_the_minimum() {
        let mut p = breaker_policy();
        p.consecutive_failures = 0;
        let b = Breaker::default();
        let t = Instant::now();
        for i in 0..9 {
            // Alternate: 50 % failures, but fewer than 10 requests so far.
            assert!(!b.record(i % 2 == 0, t, &p), "not below the minimum (request {i})");
        }
        assert!(b.record(true, t, &p), "the 10th request makes 50 %: open");
    }
}
