//! Resilience state, one piece per concern, each driven by the policy and an explicit `now`:
//!
//! - [`Breaker`]: per endpoint. Opens after `consecutive_failures` failures in a row or a
//!   failure rate over a window (with a minimum of requests); stays open for `open_duration`,
//!   doubling on each repeated opening up to `max_open_duration`; then lets `half_open_probes`
//!   requests through: a success closes it, a failure opens it again.
//! - [`Budget`]: per service. Retries may add at most `budget_percent` of the requests seen in
//!   the window, plus `budget_min_per_second` × the window.
//! - [`Limiter`]: per service. At most `max_concurrent_requests` in flight and
//!   `max_pending_requests` waiting; beyond, refuse at once (no unbounded queue).
//! - [`backoff`]: full jitter over an exponentially growing cap.
//!
//! Both windows (failure rate, retry budget) are counts in fixed time slices ([`Window`]): a
//! request costs the same, and the state takes the same memory, at any request rate.
//!
//! Whether an opening may happen at all (the max-ejection share, never the last endpoint) is the
//! endpoint set's decision: [`Breaker::record`] reports that the breaker wants to open and the
//! caller confirms with [`Breaker::open`].

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use mesh_proto::policy::{CircuitBreakerPolicy, RetryPolicy};
use rand::Rng;
use tokio::{sync::Semaphore, time::Instant};

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

/// Slices a [`Window`] is kept in.
const SLICES: usize = 10;

/// Counts of events, and of those marked (failed, retried), over a sliding time window kept as
/// [`SLICES`] slices: constant work per event and constant memory at any rate (a list of events
/// would grow with the request rate, and each failure or retry would scan it). Events leave the
/// window a slice at a time: between nine and ten tenths of the window after they happened.
#[derive(Debug, Default)]
pub struct Window {
    /// When slice 0 began (set by the first event).
    origin: Option<Instant>,
    /// The window's length over [`SLICES`]; a different window starts the counts afresh.
    slice: Duration,
    /// The newest slice seen: an event stamped earlier (taken before a lock) counts in it.
    newest: u64,
    /// Per slot: (slice number since `origin`, events, marked events).
    slots: [(u64, u64, u64); SLICES],
}

impl Window {
    /// Counts an event at `now`.
    pub fn add(&mut self, now: Instant, window: Duration, marked: bool) {
        let i = self.slice_of(now, window);
        let slot = &mut self.slots[(i % SLICES as u64) as usize];
        if slot.0 != i {
            *slot = (i, 0, 0);
        }
        slot.1 += 1;
        slot.2 += u64::from(marked);
    }

    /// (events, marked events) within the window as of `now`.
    pub fn counts(&mut self, now: Instant, window: Duration) -> (u64, u64) {
        let i = self.slice_of(now, window);
        self.slots
            .iter()
            .filter(|(n, ..)| *n <= i && i - *n < SLICES as u64)
            .fold((0, 0), |(e, m), (_, se, sm)| (e + se, m + sm))
    }

    /// Forgets every event.
    pub fn clear(&mut self) {
        *self = Window::default();
    }

    fn slice_of(&mut self, now: Instant, window: Duration) -> u64 {
        let slice = (window / SLICES as u32).max(Duration::from_micros(1));
        let origin = match self.origin {
            Some(origin) if self.slice == slice => origin,
            _ => {
                *self = Window { origin: Some(now), slice, ..Window::default() };
                now
            }
        };
        // In 64 bits (584 years of nanoseconds): a 128-bit division costs ten times more.
        let since = u64::try_from(now.saturating_duration_since(origin).as_nanos()).unwrap_or(u64::MAX);
        let i = since / u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX);
        self.newest = self.newest.max(i);
        self.newest
    }
}

/// Per-service concurrency: in-flight permits plus a bounded number of waiters.
#[derive(Debug)]
pub struct Limiter {
    permits: Option<Arc<Semaphore>>,
    max_concurrent: usize,
    pending: AtomicUsize,
    max_pending: usize,
}

/// Why the limiter refused.
#[derive(Debug, PartialEq, Eq)]
pub struct Overloaded {
    pub in_flight: usize,
    pub pending: usize,
}

impl Limiter {
    pub fn new(p: &CircuitBreakerPolicy) -> Self {
        let permits = (p.max_concurrent_requests > 0)
            .then(|| Arc::new(Semaphore::new(p.max_concurrent_requests as usize)));
        Limiter {
            permits,
            max_concurrent: p.max_concurrent_requests as usize,
            pending: AtomicUsize::new(0),
            max_pending: p.max_pending_requests as usize,
        }
    }

    /// A slot, waiting only if fewer than `max_pending` already wait; otherwise refused at once.
    pub async fn acquire(&self) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, Overloaded> {
        let Some(sem) = &self.permits else { return Ok(None) };
        if let Ok(p) = sem.clone().try_acquire_owned() {
            return Ok(Some(p));
        }
        let waiting = self.pending.fetch_add(1, Ordering::SeqCst);
        struct Leave<'a>(&'a AtomicUsize);
        impl Drop for Leave<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let _leave = Leave(&self.pending);
        if waiting >= self.max_pending {
            return Err(Overloaded { in_flight: self.in_flight(), pending: waiting });
        }
        sem.clone().acquire_owned().await.map(Some).map_err(|_| Overloaded { in_flight: 0, pending: 0 })
    }

    /// Requests holding a slot now.
    pub fn in_flight(&self) -> usize {
        self.permits.as_ref().map_or(0, |s| self.max_concurrent.saturating_sub(s.available_permits()))
    }
}

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

/// Full-jitter backoff before retry `attempt` (1 = the first retry).
pub fn backoff(p: &RetryPolicy, attempt: u32) -> Duration {
    let cap = p.backoff_base.saturating_mul(1u32 << attempt.saturating_sub(1).min(16)).min(p.backoff_max);
    Duration::from_nanos(rand::rng().random_range(0..=cap.as_nanos() as u64))
}

#[cfg(test)]
mod tests;
