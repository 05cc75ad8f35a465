//! Retries: which outcomes a policy may retry ([`classify`]), the retry budget (a share of the
//! requests over a sliding window, plus a floor), and the jittered backoff between attempts.

use std::{sync::Mutex, time::Duration};

use bytes::Bytes;
use http::{Method, Request, Response, request::Parts};
use http_body_util::{BodyExt, Full};
use mesh_proto::policy::{RetryOn, RetryPolicy};
use rand::Rng;
use tokio::time::Instant;

use crate::{
    endpoint::{forward::ForwardError, pool::Pooled},
    http::body::{Body, boxed, empty},
    inbound::idempotency::IDEMPOTENCY_KEY,
    outbound::window::Window,
};

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
pub(crate) fn classify(r: &Result<Response<Pooled>, ForwardError>) -> Option<RetryOn> {
    match r {
        Err(ForwardError::Connect(..)) => Some(RetryOn::ConnectFailure),
        Err(ForwardError::Failed(..)) => Some(RetryOn::Reset),
        Err(ForwardError::Timeout(..)) => Some(RetryOn::Status504),
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

/// The attempts one request may make, and its body kept for them: a request may be sent again
/// only when it is idempotent (by method, or it carries an `Idempotency-Key`) and its body is
/// known to be at most the policy's `max_body_bytes`; otherwise it gets one attempt and its body
/// streams.
pub struct Attempts<B> {
    allowed: u32,
    made: u32,
    /// The body to stream (one attempt), or…
    body: Option<B>,
    /// …the body read whole for replays.
    replay: Option<Bytes>,
}

impl<B> Attempts<B> {
    /// Attempts made so far.
    pub fn made(&self) -> u32 {
        self.made
    }

    /// Whether another attempt is allowed after those made.
    pub fn more_allowed(&self) -> bool {
        self.made < self.allowed
    }
}

impl<B> Attempts<B>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<crate::http::body::BoxError>,
{
    /// Decides how many attempts `parts` may make under `retry`, reading `body` whole when
    /// it will be replayed. Fails when reading it does.
    pub async fn prepare(retry: &RetryPolicy, parts: &Parts, body: B) -> Result<Self, B::Error> {
        let idempotent = matches!(
            parts.method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
        ) || parts.headers.contains_key(&IDEMPOTENCY_KEY);
        let mut a = Attempts {
            allowed: if idempotent { retry.max_attempts.max(1) } else { 1 },
            made: 0,
            body: None,
            replay: None,
        };
        if a.allowed == 1 {
            a.body = Some(body);
            return Ok(a);
        }
        match body.size_hint().upper() {
            // No body (a GET, say): nothing to read or keep.
            Some(0) if body.is_end_stream() => a.replay = Some(Bytes::new()),
            Some(n) if n <= retry.max_body_bytes => a.replay = Some(body.collect().await?.to_bytes()),
            _ => {
                a.allowed = 1;
                a.body = Some(body);
            }
        }
        Ok(a)
    }

    /// The request for the next attempt. On the last one allowed the request's parts move into
    /// it instead of being copied.
    pub fn next_request(&mut self, parts: &mut Parts) -> Request<Body> {
        self.made += 1;
        let body = match &self.replay {
            Some(bytes) if bytes.is_empty() => empty(),
            Some(bytes) => boxed(Full::new(bytes.clone())),
            None => self.body.take().map(boxed).unwrap_or_else(empty),
        };
        let mut r = Request::new(body);
        *r.method_mut() = parts.method.clone();
        *r.version_mut() = parts.version;
        if self.more_allowed() {
            *r.uri_mut() = parts.uri.clone();
            *r.headers_mut() = parts.headers.clone();
        } else {
            *r.uri_mut() = std::mem::take(&mut parts.uri);
            *r.headers_mut() = std::mem::take(&mut parts.headers);
        }
        r
    }
}

/// How long one attempt sent at `sent` may wait for its answer: the policy's per-try timeout,
/// cut to what is left of the request's `deadline`.
pub fn per_try(retry: &RetryPolicy, deadline: Option<Instant>, sent: Instant) -> Option<Duration> {
    let left = deadline.map(|d| d.saturating_duration_since(sent));
    match (left, (!retry.per_try_timeout.is_zero()).then_some(retry.per_try_timeout)) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// What follows an attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Try again (on another endpoint), after [`backoff`].
    Retry,
    /// It could be retried, but the budget has no room: this answer stands.
    BudgetExhausted,
    /// This answer stands.
    Done,
}

impl Decision {
    /// As a span attribute (`mesh.retry`).
    pub fn as_str(&self) -> &'static str {
        match self {
            Decision::Retry => "retry",
            Decision::BudgetExhausted => "budget_exhausted",
            Decision::Done => "done",
        }
    }
}

/// Whether an attempt whose outcome has retry class `class`, answered at `done`, is retried:
/// the policy names the class, another attempt is allowed, the deadline has not passed, and the
/// budget has room (taking a retry from it).
pub fn decide<B>(
    class: Option<RetryOn>,
    retry: &RetryPolicy,
    attempts: &Attempts<B>,
    deadline: Option<Instant>,
    done: Instant,
    budget: &Budget,
) -> Decision {
    let retryable = class.is_some_and(|c| retry.retry_on.contains(&c));
    let time_left = deadline.is_none_or(|d| done < d);
    if !(retryable && attempts.more_allowed() && time_left) {
        return Decision::Done;
    }
    if budget.try_retry(done, retry) { Decision::Retry } else { Decision::BudgetExhausted }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn attempts(allowed: u32, made: u32) -> Attempts<hyper::body::Incoming> {
        Attempts { allowed, made, body: None, replay: Some(Bytes::new()) }
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_needs_a_named_class_an_attempt_left_time_left_and_budget() {
        let p = RetryPolicy {
            max_attempts: 2,
            retry_on: vec![RetryOn::Status503],
            budget_percent: 0,
            budget_min_per_second: 1,
            budget_window: Duration::from_secs(1),
            ..Default::default()
        };
        let (b, now) = (Budget::default(), Instant::now());
        let later = Some(now + Duration::from_secs(1));
        let decide = |class, a: &Attempts<hyper::body::Incoming>, deadline, b: &Budget| {
            decide(class, &p, a, deadline, now, b)
        };
        assert_eq!(
            decide(Some(RetryOn::Status502), &attempts(2, 1), later, &b),
            Decision::Done,
            "class not named"
        );
        assert_eq!(decide(None, &attempts(2, 1), later, &b), Decision::Done, "a success");
        assert_eq!(
            decide(Some(RetryOn::Status503), &attempts(2, 2), later, &b),
            Decision::Done,
            "no attempt left"
        );
        assert_eq!(
            decide(Some(RetryOn::Status503), &attempts(2, 1), Some(now), &b),
            Decision::Done,
            "deadline passed"
        );
        assert_eq!(decide(Some(RetryOn::Status503), &attempts(2, 1), later, &b), Decision::Retry);
        assert_eq!(decide(Some(RetryOn::Status503), &attempts(2, 1), None, &b), Decision::BudgetExhausted);
    }

    #[tokio::test(start_paused = true)]
    async fn each_try_waits_the_per_try_timeout_cut_to_the_deadline() {
        let now = Instant::now();
        let p = RetryPolicy { per_try_timeout: Duration::from_millis(300), ..Default::default() };
        assert_eq!(per_try(&p, None, now), Some(Duration::from_millis(300)));
        assert_eq!(
            per_try(&p, Some(now + Duration::from_millis(100)), now),
            Some(Duration::from_millis(100))
        );
        let none = RetryPolicy { per_try_timeout: Duration::ZERO, ..p };
        assert_eq!(per_try(&none, None, now), None);
        assert_eq!(per_try(&none, Some(now + Duration::from_secs(2)), now), Some(Duration::from_secs(2)));
    }

    #[test]
    fn the_last_attempt_takes_the_parts_and_earlier_ones_copy_them() {
        let (mut parts, ()) = Request::put("/markets/7").header("x-a", "1").body(()).unwrap().into_parts();
        let mut a = attempts(2, 0);
        let first = a.next_request(&mut parts);
        assert_eq!(
            (first.uri().path(), parts.uri.path(), a.more_allowed()),
            ("/markets/7", "/markets/7", true)
        );
        let last = a.next_request(&mut parts);
        assert_eq!((last.uri().path(), last.headers()["x-a"].to_str().unwrap()), ("/markets/7", "1"));
        assert!(parts.headers.is_empty() && !a.more_allowed() && a.made() == 2);
    }
}
