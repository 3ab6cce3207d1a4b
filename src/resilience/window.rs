//! A time-bucketed sliding window of two counters. Memory is fixed (one slot per
//! bucket) whatever the request rate; time comes from `tokio::time` so tests can pause it.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    epoch: u64,
    a: u64,
    b: u64,
}

#[derive(Debug, Clone)]
pub struct Window {
    origin: Instant,
    width: Duration,
    slots: Vec<Slot>,
}

impl Window {
    /// A window of length `span`, kept in `buckets` slots. Its origin lies one span in
    /// the past, so events from before it was made (restored history) still land in
    /// their own buckets.
    pub fn new(span: Duration, buckets: usize) -> Window {
        let buckets = buckets.max(1);
        let width = (span / buckets as u32).max(Duration::from_millis(1));
        let now = Instant::now();
        Window {
            origin: now.checked_sub(span).unwrap_or(now),
            width,
            slots: vec![Slot::default(); buckets],
        }
    }

    fn epoch(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.origin).as_nanos() / self.width.as_nanos()) as u64 + 1
    }

    pub fn add(&mut self, now: Instant, a: u64, b: u64) {
        let epoch = self.epoch(now);
        let n = self.slots.len() as u64;
        let slot = &mut self.slots[(epoch % n) as usize];
        if slot.epoch != epoch {
            *slot = Slot { epoch, a: 0, b: 0 };
        }
        slot.a += a;
        slot.b += b;
    }

    /// Sums of both counters over the window ending at `now`.
    pub fn totals(&self, now: Instant) -> (u64, u64) {
        let epoch = self.epoch(now);
        let n = self.slots.len() as u64;
        self.slots
            .iter()
            .filter(|s| s.epoch != 0 && s.epoch + n > epoch && s.epoch <= epoch)
            .fold((0, 0), |(a, b), s| (a + s.a, b + s.b))
    }

    pub fn clear(&mut self) {
        self.slots.iter_mut().for_each(|s| *s = Slot::default());
    }

    pub fn span(&self) -> Duration {
        self.width * self.slots.len() as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn old_buckets_fall_out() {
        let mut w = Window::new(Duration::from_secs(10), 10);
        let t0 = Instant::now();
        w.add(t0, 5, 1);
        w.add(t0 + Duration::from_secs(3), 2, 0);
        assert_eq!(w.totals(t0 + Duration::from_secs(3)), (7, 1));
        assert_eq!(w.totals(t0 + Duration::from_millis(10_500)), (2, 0));
        assert_eq!(w.totals(t0 + Duration::from_secs(30)), (0, 0));
    }
}
