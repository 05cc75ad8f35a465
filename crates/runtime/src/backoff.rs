//! Reconnect backoff, and the rotation over a list of control-plane URLs that goes with it.

use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;

/// Full jitter over an exponentially growing cap: the n-th delay is uniform in
/// `0..=min(base·2ⁿ, max)`.
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self { base, max, attempt: 0 }
    }

    pub fn next_delay(&mut self) -> Duration {
        let cap = self.base.saturating_mul(2u32.saturating_pow(self.attempt.min(16))).min(self.max);
        self.attempt += 1;
        Duration::from_nanos(rand::rng().random_range(0..=cap.as_nanos() as u64))
    }

    /// After a success: the next delay starts from `base` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Sleeps `delay`; false when `stop` came first.
    pub async fn sleep(delay: Duration, stop: &CancellationToken) -> bool {
        tokio::select! {
            _ = stop.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }

    /// Sleeps the next delay; false when `stop` came first.
    pub async fn wait(&mut self, stop: &CancellationToken) -> bool {
        Self::sleep(self.next_delay(), stop).await
    }
}

/// The control planes a client tries in turn: each failure moves on to the next URL.
pub struct Rotation<'a> {
    urls: &'a [String],
    next: usize,
}

impl<'a> Rotation<'a> {
    /// Over `urls`, which must not be empty (every binary refuses to start without one).
    pub fn new(urls: &'a [String]) -> Self {
        assert!(!urls.is_empty(), "Rotation over no control-plane URL");
        Self { urls, next: 0 }
    }

    /// The URL to try now; the one after it next time.
    pub fn next_url(&mut self) -> &'a str {
        let url = &self.urls[self.next % self.urls.len()];
        self.next = self.next.wrapping_add(1);
        url
    }
}
