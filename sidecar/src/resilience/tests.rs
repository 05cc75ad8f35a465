use std::time::Duration;

use mesh_proto::policy::{CircuitBreakerPolicy, RetryPolicy};
use tokio::time::Instant;

use super::*;

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

#[tokio::test]
async fn the_limiter_refuses_at_once_beyond_the_pending_limit() {
    let p =
        CircuitBreakerPolicy { max_concurrent_requests: 2, max_pending_requests: 1, ..Default::default() };
    let l = Arc::new(Limiter::new(&p));
    let a = l.acquire().await.unwrap();
    let _b = l.acquire().await.unwrap();
    assert_eq!(l.in_flight(), 2);
    let waiter = tokio::spawn({
        let l = l.clone();
        async move { l.acquire().await.map(|_| ()) }
    });
    while l.pending.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    let refused = l.acquire().await.unwrap_err();
    assert_eq!(refused.pending, 1);
    drop(a);
    waiter.await.unwrap().unwrap();
    let unlimited = Limiter::new(&CircuitBreakerPolicy { max_concurrent_requests: 0, ..Default::default() });
    assert!(unlimited.acquire().await.unwrap().is_none());
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
    assert_eq!((0..5).filter(|_| l.check("b", &per, t).is_ok()).count(), 2, "each caller has its own bucket");
    let off = RateLimitPolicy::default();
    assert!((0..1000).all(|_| l.check("a", &off, t).is_ok()), "0 disables");
}
