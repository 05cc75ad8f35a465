//! Retries: which outcomes a policy may retry ([`classify`]), the retry budget (a share of the
//! requests over a sliding window, plus a floor), and the jittered backoff between attempts.

use std::{sync::Mutex, time::Duration};

use http::Response;
use mesh_proto::policy::{RetryOn, RetryPolicy};
use rand::Rng;
use tokio::time::Instant;

use crate::outbound::window::Window;

/// The retry budget of one service: first attempts and retries over a sliding window.
#[derive(Debug, Default)]
pub struct Budget(Mutex<Window>);

impl Budget {
    /// Counts a first attempt.
    pub fn request(&self, now: Instant, p: &RetryPolicy) {
        self.lock().add(now, p.budget_window, false);
    }

    /// Takes a retry from the budget if there is room.
    pub fn try_retry(&self, now: Instant, p: &RetryPolicy) -> bool {
        let mut w = self.lock();
        let (attempts, retries) = w.counts(now, p.budget_window);
        let requests = attempts - retries;
        let allowed = requests * u64::from(p.budget_percent) / 100
            + u64::from(p.budget_min_per_second) * p.budget_window.as_secs().max(1);
        if retries >= allowed {
            return false;
        }
        w.add(now, p.budget_window, true);
        true
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Full-jitter backoff before retry `attempt` (1 = the first retry).
pub fn backoff(p: &RetryPolicy, attempt: u32) -> Duration {
    let cap = p.backoff_base.saturating_mul(1u32 << attempt.saturating_sub(1).min(16)).min(p.backoff_max);
    Duration::from_nanos(rand::rng().random_range(0..=cap.as_nanos() as u64))
}

const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

/// The retry class of an outcome, if it is a failure of a class the policy can name.
pub(crate) fn classify(
    r: &Result<Response<crate::endpoint::pool::Pooled>, crate::endpoint::forward::ForwardError>,
) -> Option<RetryOn> {
    match r {
        Err(crate::endpoint::forward::ForwardError::Connect(..)) => Some(RetryOn::ConnectFailure),
        Err(crate::endpoint::forward::ForwardError::Failed(..)) => Some(RetryOn::Reset),
        Err(crate::endpoint::forward::ForwardError::Timeout(..)) => Some(RetryOn::Status504),
        Ok(resp) => match resp.status().as_u16() {
            502 => Some(RetryOn::Status502),
            503 => Some(RetryOn::Status503),
            504 => Some(RetryOn::Status504),
            _ => match resp.headers().get(&GRPC_STATUS).and_then(|v| v.to_str().ok()) {
                Some("14") => Some(RetryOn::Unavailable),
                Some("8") => Some(RetryOn::ResourceExhausted),
                _ => None,
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::policy::RetryPolicy;
    use std::time::Duration;
    use tokio::time::Instant;

    #[tokio::test(start_paused = true)]
    async fn the_budget_allows_a_share_of_requests_plus_a_floor() {
        let p = RetryPolicy {
            budget_percent: 20,
            budget_min_per_second: 0,
            budget_window: Duration::from_secs(10),
            ..Default::default()
        };
        let b = Budget::default();
        let t = Instant::now();
        for _ in 0..100 {
            b.request(t, &p);
        }
        let granted = (0..100).filter(|_| b.try_retry(t, &p)).count();
        assert_eq!(granted, 20);
        // The window slides: after it, the old requests no longer count.
        assert!(!b.try_retry(t + Duration::from_secs(11), &p));
        let floor = RetryPolicy { budget_min_per_second: 2, ..p };
        let b = Budget::default();
        assert_eq!((0..100).filter(|_| b.try_retry(t, &floor)).count(), 20, "2/s × 10 s with no traffic");
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_slides_a_slice_at_a_time_in_constant_memory() {
        let window = Duration::from_secs(10);
        let mut w = Window::default();
        let t = Instant::now();
        for i in 0..100_000u64 {
            // 100,000 events over 10 s, every fifth marked.
            w.add(t + Duration::from_micros(i * 100), window, i % 5 == 0);
        }
        assert_eq!(w.counts(t + Duration::from_millis(9_999), window), (100_000, 20_000));
        // 10.5 s in, the first second's slice has left; 18.5 s in, only the last one is left; its
        // events leave 9 to 10 s after they happened.
        assert_eq!(w.counts(t + Duration::from_millis(10_500), window), (90_000, 18_000));
        assert_eq!(w.counts(t + Duration::from_millis(18_500), window), (10_000, 2_000));
        assert_eq!(w.counts(t + Duration::from_secs(19), window), (0, 0));
        // An event stamped before the newest one seen counts in the newest slice, not in the past.
        w.add(t, window, true);
        assert_eq!(w.counts(t + Duration::from_secs(20), window), (1, 1));
        // Another window length starts afresh; so does clear.
        assert_eq!(w.counts(t + Duration::from_secs(20), Duration::from_secs(5)), (0, 0));
        w.add(t, window, false);
        w.clear();
        assert_eq!(w.counts(t, window), (0, 0));
        assert_eq!(std::mem::size_of::<Window>(), 280, "fixed size, whatever the rate");
    }

    #[test]
    fn backoff_is_full_jitter_under_a_doubling_cap() {
        let p = RetryPolicy {
            backoff_base: Duration::from_millis(10),
            backoff_max: Duration::from_millis(50),
            ..Default::default()
        };
        for attempt in 1..8u32 {
            let cap = Duration::from_millis(10 * (1 << (attempt - 1))).min(Duration::from_millis(50));
            for _ in 0..50 {
                assert!(backoff(&p, attempt) <= cap);
            }
        }
    }
}
