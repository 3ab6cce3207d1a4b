//! A gateway-wide budget for extra calls (same-target retries, or hedges): extra calls
//! stay under `ratio` of first calls over a sliding window, plus a floor per second so
//! a quiet gateway can still retry. An outage then cannot become a retry storm.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::window::Window;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetSettings {
    pub ratio: f64,
    pub min_per_second: f64,
    pub window: Duration,
}

#[derive(Debug)]
pub struct Budget {
    settings: BudgetSettings,
    /// a: first calls (deposits); b: extra calls (withdrawals).
    counts: Mutex<Window>,
}

impl Budget {
    pub fn new(settings: BudgetSettings) -> Budget {
        Budget {
            counts: Mutex::new(Window::new(settings.window, 10)),
            settings,
        }
    }

    /// Records a first call.
    pub fn deposit(&self) {
        if let Ok(mut w) = self.counts.lock() {
            w.add(Instant::now(), 1, 0);
        }
    }

    /// Takes one extra call from the budget, if there is room.
    pub fn try_withdraw(&self) -> bool {
        let Ok(mut w) = self.counts.lock() else {
            return false;
        };
        let now = Instant::now();
        let (firsts, extras) = w.totals(now);
        let floor = self.settings.min_per_second * w.span().as_secs_f64();
        let allowed = self.settings.ratio * firsts as f64 + floor;
        if (extras as f64) < allowed {
            w.add(now, 0, 1);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn ratio_plus_floor() {
        let b = Budget::new(BudgetSettings {
            ratio: 0.2,
            min_per_second: 1.0,
            window: Duration::from_secs(10),
        });
        for _ in 0..100 {
            b.deposit();
        }
        // 0.2 * 100 + 1/s * 10s = 30 extra calls.
        let granted = (0..50).filter(|_| b.try_withdraw()).count();
        assert_eq!(granted, 30);
        // The window slides: after it has passed, only the floor is left.
        tokio::time::advance(Duration::from_secs(11)).await;
        let granted = (0..50).filter(|_| b.try_withdraw()).count();
        assert_eq!(granted, 10);
    }
}
