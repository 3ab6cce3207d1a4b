//! A per-target health window: success rate, latency p50/p95 and TTFT p95 over a
//! sliding window. Feeds chain ordering (degraded targets go last), hedging ("p95")
//! and `GET /admin/health`.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::window::Window;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HealthSettings {
    pub window: Duration,
    pub degraded_below: f64,
    pub min_calls: u64,
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            window: Duration::from_secs(300),
            degraded_below: 0.8,
            min_calls: 20,
        }
    }
}

/// Latency samples kept for percentiles: the most recent ones within the window.
const SAMPLES: usize = 512;

#[derive(Debug, Clone)]
struct Inner {
    /// a: successes, b: failures.
    counts: Window,
    /// (when, latency, time to first token for streams)
    samples: VecDeque<(Instant, Duration, Option<Duration>)>,
    /// Live calls (successes, failures) not yet shared with other replicas.
    unshared: (u64, u64),
    /// The whole fleet's (successes, failures) over the window, and when they were
    /// read: used instead of the local counts while fresh.
    fleet: Option<(u64, u64, Instant)>,
}

/// How long the fleet's counts stand in for the local ones without a new reading.
const FLEET_FRESH: Duration = Duration::from_secs(3);

#[derive(Debug)]
pub struct Health {
    settings: HealthSettings,
    inner: Mutex<Inner>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HealthSnapshot {
    pub success_rate: f64,
    pub calls: u64,
    pub p50: Option<Duration>,
    pub p95: Option<Duration>,
    pub ttft_p95: Option<Duration>,
    pub avg_latency: Option<Duration>,
    /// Below `degraded_below` success over at least `min_calls` calls.
    pub degraded: bool,
}

fn percentile(mut values: Vec<Duration>, p: f64) -> Option<Duration> {
    if values.is_empty() {
        return None;
    }
    values.sort_unstable();
    let rank = ((p * values.len() as f64).ceil() as usize).clamp(1, values.len());
    Some(values[rank - 1])
}

impl Health {
    pub fn new(settings: HealthSettings) -> Health {
        Health {
            inner: Mutex::new(Inner {
                counts: Window::new(settings.window, 30),
                samples: VecDeque::with_capacity(SAMPLES),
                unshared: (0, 0),
                fleet: None,
            }),
            settings,
        }
    }

    /// A window with new settings that keeps this one's calls, for a reload that
    /// changed only thresholds; a window of another length starts empty.
    pub fn with_settings(&self, settings: HealthSettings) -> Health {
        if settings.window != self.settings.window {
            return Health::new(settings);
        }
        Health {
            inner: Mutex::new(self.lock().clone()),
            settings,
        }
    }

    pub fn settings(&self) -> &HealthSettings {
        &self.settings
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    pub fn record_success(&self, latency: Duration, ttft: Option<Duration>) {
        let mut g = self.lock();
        g.unshared.0 += 1;
        Self::push_success(&mut g, Instant::now(), latency, ttft);
    }

    /// A success at `at`: now, or a call from the store's history at start.
    pub fn record_success_at(&self, at: Instant, latency: Duration, ttft: Option<Duration>) {
        Self::push_success(&mut self.lock(), at, latency, ttft);
    }

    fn push_success(g: &mut Inner, at: Instant, latency: Duration, ttft: Option<Duration>) {
        g.counts.add(at, 1, 0);
        if g.samples.len() == SAMPLES {
            g.samples.pop_front();
        }
        g.samples.push_back((at, latency, ttft));
    }

    pub fn record_failure(&self) {
        let mut g = self.lock();
        g.unshared.1 += 1;
        g.counts.add(Instant::now(), 0, 1);
    }

    /// Takes the live calls not yet shared with the fleet.
    pub fn take_unshared(&self) -> (u64, u64) {
        std::mem::take(&mut self.lock().unshared)
    }

    /// The fleet's counts over the window, just read from the shared store.
    pub fn set_fleet(&self, ok: u64, failed: u64) {
        self.lock().fleet = Some((ok, failed, Instant::now()));
    }

    /// The counts that decide degradation: the fleet's while fresh, else this
    /// process's own.
    fn totals(g: &Inner, now: Instant) -> (u64, u64) {
        match g.fleet {
            Some((ok, failed, at)) if now.saturating_duration_since(at) < FLEET_FRESH => {
                (ok, failed)
            }
            _ => g.counts.totals(now),
        }
    }

    pub fn record_failure_at(&self, at: Instant) {
        self.lock().counts.add(at, 0, 1);
    }

    pub fn snapshot(&self) -> HealthSnapshot {
        let g = self.lock();
        let now = Instant::now();
        let (ok, failed) = Self::totals(&g, now);
        let calls = ok + failed;
        let horizon = now.checked_sub(self.settings.window);
        let recent = g
            .samples
            .iter()
            .filter(|(t, _, _)| horizon.is_none_or(|h| *t >= h));
        let latencies: Vec<Duration> = recent.clone().map(|(_, l, _)| *l).collect();
        let ttfts: Vec<Duration> = recent.filter_map(|(_, _, t)| *t).collect();
        let avg_latency = (!latencies.is_empty())
            .then(|| latencies.iter().sum::<Duration>() / latencies.len() as u32);
        HealthSnapshot {
            avg_latency,
            degraded: self.degraded(ok, failed),
            success_rate: if calls == 0 {
                1.0
            } else {
                ok as f64 / calls as f64
            },
            calls,
            p50: percentile(latencies.clone(), 0.50),
            p95: percentile(latencies, 0.95),
            ttft_p95: percentile(ttfts, 0.95),
        }
    }

    /// Below `degraded_below` success over at least `min_calls` calls.
    pub fn is_degraded(&self) -> bool {
        let (ok, failed) = Self::totals(&self.lock(), Instant::now());
        self.degraded(ok, failed)
    }

    fn degraded(&self, ok: u64, failed: u64) -> bool {
        let calls = ok + failed;
        calls > 0
            && calls >= self.settings.min_calls
            && (ok as f64 / calls as f64) < self.settings.degraded_below
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rates_percentiles_and_degradation() {
        let h = Health::new(HealthSettings {
            window: Duration::from_secs(60),
            degraded_below: 0.8,
            min_calls: 10,
        });
        for ms in 1..=20 {
            h.record_success(
                Duration::from_millis(ms * 10),
                Some(Duration::from_millis(ms)),
            );
        }
        let s = h.snapshot();
        assert_eq!((s.calls, s.success_rate), (20, 1.0));
        assert_eq!(s.p50, Some(Duration::from_millis(100)));
        assert_eq!(s.p95, Some(Duration::from_millis(190)));
        assert_eq!(s.ttft_p95, Some(Duration::from_millis(19)));
        assert!(!h.is_degraded());
        assert_eq!(s.avg_latency, Some(Duration::from_millis(105)));
        for _ in 0..10 {
            h.record_failure();
        }
        assert!(h.is_degraded(), "20/30 < 0.8");
        tokio::time::advance(Duration::from_secs(120)).await;
        assert!(!h.is_degraded(), "the window forgets");
        assert_eq!(h.snapshot().p95, None);
    }
}
