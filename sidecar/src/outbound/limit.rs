//! The concurrency limit of one upstream service: a bounded wait queue, then refusal at once.

use http::{Response, StatusCode};
use mesh_proto::policy::CircuitBreakerPolicy;
use serde_json::json;

use crate::{
    http::{body::Body, errors::error_response},
    metrics::Metrics,
};

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};
use tokio::sync::Semaphore;

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

/// A slot under `service`'s concurrency limit (`None` when it has none), or the 503 that
/// refuses the request at once beyond it: no unbounded queue.
pub async fn admit(
    limiter: &Limiter,
    service: &str,
    metrics: &Metrics,
) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, Response<Body>> {
    limiter.acquire().await.map_err(|o| {
        metrics.overload_rejections.get_or_create(&vec![("service", service.to_string())]).inc();
        error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            format!(
                "service {service} is at its concurrency limit ({} in flight, {} waiting): refused at once",
                o.in_flight, o.pending
            ),
            json!({ "service": service }),
        )
    })
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // Tests spawn plain tasks.
mod tests {
    use super::*;
    use mesh_proto::policy::CircuitBreakerPolicy;

    #[tokio::test]
    async fn the_limiter_refuses_at_once_beyond_the_pending_limit() {
        let p = CircuitBreakerPolicy {
            max_concurrent_requests: 2,
            max_pending_requests: 1,
            ..Default::default()
        };
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
        let unlimited =
            Limiter::new(&CircuitBreakerPolicy { max_concurrent_requests: 0, ..Default::default() });
        assert!(unlimited.acquire().await.unwrap().is_none());
    }
}
