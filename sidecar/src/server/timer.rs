//! Coarse deadlines for hyper's HTTP/1 header-read timeout (the slow-header defence).
//!
//! hyper arms that timeout on every keep-alive connection for every request it waits for, and
//! drops it as soon as the request's head has arrived — so nearly every deadline is cancelled,
//! and it only has to be right to within a fraction of its length (seconds of a 30 s limit).
//! tokio's timer is exact and costs for that: a boxed `Sleep`, a clock read, a wheel insertion
//! and a removal under the driver's lock (~1.2k instructions per request, measured with
//! `bench/callgrind.sh`). Here a deadline is a slot in a table that one task per listener
//! sweeps every tick, firing those past due: arming one takes a free slot and a dropped one
//! gives it back, each under a short lock, with no allocation (the table grows to the most
//! deadlines armed at once — about the idle keep-alive connections — and is reused).

// hyper's `Timer` is given `std::time::Instant` deadlines; this timer keeps them as they come.
#![allow(clippy::disallowed_types)]

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex, Weak},
    task::{Context, Poll, Waker},
    time::{Duration, Instant},
};

/// A [`hyper::rt::Timer`] whose sleeps end within one tick after their deadline. Cheap to
/// clone; clones share the deadlines. Its sweeper ([`CoarseTimer::start`]) ends with the timer.
#[derive(Clone, Default)]
pub struct CoarseTimer(Arc<Mutex<Table>>);

#[derive(Default)]
struct Table {
    slots: Vec<Slot>,
    /// Indices of the slots no sleep holds.
    free: Vec<usize>,
}

#[derive(Default)]
struct Slot {
    /// The deadline of the sleep holding this slot (`None`: free).
    at: Option<Instant>,
    fired: bool,
    waker: Option<Waker>,
}

impl CoarseTimer {
    /// Starts the task that fires due deadlines every `tick`; it ends once every clone of the
    /// timer (and every sleep it made) is gone.
    pub fn start(&self, tick: Duration) {
        every_while_alive("header_timer", &self.0, tick, |table| CoarseTimer(table).fire(Instant::now()));
    }

    /// Fires every deadline past due at `now`.
    pub fn fire(&self, now: Instant) {
        let wakers: Vec<Waker> = {
            let mut table = self.lock();
            table
                .slots
                .iter_mut()
                .filter(|s| !s.fired && s.at.is_some_and(|at| at <= now))
                .filter_map(|s| {
                    s.fired = true;
                    s.waker.take()
                })
                .collect()
        };
        wakers.into_iter().for_each(Waker::wake);
    }

    /// Deadlines armed and not yet dropped (for tests).
    #[cfg(test)]
    fn armed(&self) -> usize {
        let table = self.lock();
        table.slots.len() - table.free.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl hyper::rt::Timer for CoarseTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(Instant::now() + duration)
    }

    fn sleep_until(&self, at: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(CoarseSleep { at, timer: self.clone(), slot: None })
    }
}

/// Spawns a task (`name` in its span) that calls `f` every `tick` with `owner`, for as long as `owner` is alive
/// elsewhere (the task holds it only while calling `f`).
pub fn every_while_alive<T, F>(name: &'static str, owner: &Arc<T>, tick: Duration, f: F)
where
    T: Send + Sync + 'static,
    F: Fn(Arc<T>) + Send + 'static,
{
    let owner: Weak<T> = Arc::downgrade(owner);
    mesh_runtime::spawn(tracing::debug_span!("ticker", task = name), async move {
        let mut every = tokio::time::interval(tick);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let Some(owner) = owner.upgrade() else { break };
            f(owner);
        }
    });
}

/// A sleep until `at`; it takes a slot when first polled and gives it back when dropped.
struct CoarseSleep {
    at: Instant,
    timer: CoarseTimer,
    slot: Option<usize>,
}

impl hyper::rt::Sleep for CoarseSleep {}

impl Future for CoarseSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let mut table = this.timer.lock();
        let i = match this.slot {
            Some(i) => i,
            None => {
                let i = table.free.pop().unwrap_or_else(|| {
                    table.slots.push(Slot::default());
                    table.slots.len() - 1
                });
                table.slots[i] = Slot { at: Some(this.at), fired: false, waker: None };
                *this.slot.insert(i)
            }
        };
        let slot = &mut table.slots[i];
        if slot.fired {
            return Poll::Ready(());
        }
        match &mut slot.waker {
            Some(w) => w.clone_from(cx.waker()),
            None => slot.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl Drop for CoarseSleep {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            let mut table = self.timer.lock();
            table.slots[i] = Slot::default();
            table.free.push(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;
    use hyper::rt::Timer;

    use super::*;

    #[test]
    fn a_sleep_ends_when_fired_past_its_deadline_and_not_before() {
        let timer = CoarseTimer::default();
        let t0 = Instant::now();
        let mut sleep = timer.sleep_until(t0 + Duration::from_secs(30));
        assert!(sleep.as_mut().now_or_never().is_none(), "armed on first poll");
        assert_eq!(timer.armed(), 1);
        timer.fire(t0 + Duration::from_secs(29));
        assert!(sleep.as_mut().now_or_never().is_none(), "not before its deadline");
        timer.fire(t0 + Duration::from_secs(30));
        assert!(sleep.as_mut().now_or_never().is_some(), "fired at its deadline");
        drop(sleep);
        assert_eq!(timer.armed(), 0, "a dropped sleep gives its slot back");
    }

    #[test]
    fn dropped_sleeps_give_their_slots_back_so_the_table_stays_small() {
        let timer = CoarseTimer::default();
        let far = Instant::now() + Duration::from_secs(3600);
        let mut live: Vec<_> = (0..10).map(|_| timer.sleep_until(far)).collect();
        for s in &mut live {
            assert!(s.as_mut().now_or_never().is_none());
        }
        for _ in 0..100_000 {
            // One request's deadline: armed, then dropped when its head arrives.
            let mut s = timer.sleep_until(far);
            assert!(s.as_mut().now_or_never().is_none());
        }
        assert_eq!(timer.armed(), live.len());
        assert_eq!(timer.lock().slots.len(), live.len() + 1, "one slot reused 100,000 times");
        timer.fire(far);
        assert!(live.iter_mut().all(|s| s.as_mut().now_or_never().is_some()), "the live ones still fire");
    }
}
