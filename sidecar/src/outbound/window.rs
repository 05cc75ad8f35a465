//! A sliding window of counts over ten slices of its length, in constant memory: what the retry
//! budget and the breaker's failure rate count over.

use std::time::Duration;

use tokio::time::Instant;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
