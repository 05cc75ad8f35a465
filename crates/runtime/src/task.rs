//! Spawning tasks that carry a span, so whatever a task logs says which part of which server
//! it belongs to (clippy.toml bans the bare `tokio::spawn` and `TaskTracker::spawn`).

use std::future::Future;

use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, Span};

/// `tokio::spawn` of `future` inside `span`.
#[allow(clippy::disallowed_methods)] // The one place the bare spawn is called.
pub fn spawn<F>(span: Span, future: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(future.instrument(span))
}

/// `tracker.spawn` of `future` inside `span`: the tracker waits for it on shutdown.
#[allow(clippy::disallowed_methods)] // The one place the bare spawn is called.
pub fn spawn_tracked<F>(tracker: &TaskTracker, span: Span, future: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tracker.spawn(future.instrument(span))
}
