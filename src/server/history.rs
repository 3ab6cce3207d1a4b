//! The last 30 minutes of each pool model, for the status page's sparklines: calls,
//! failures and mean latency per 10-second step.
//!
//! A thread samples the metrics' counters every step (nothing on the request path);
//! it ends when the gateway's state is dropped.

use crate::name::Name;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use prometheus::core::Collector;

use super::AppState;

/// One sample's span.
pub const STEP: Duration = Duration::from_secs(10);
/// Samples kept: 30 minutes.
const KEPT: usize = 180;

/// One step of one model.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Point {
    pub calls: u64,
    pub failures: u64,
    /// Mean upstream latency over the step, when there were calls.
    pub latency_ms: Option<f64>,
}

/// Totals as the counters last read: calls, failures, latency sum (s), latency count.
type Totals = (u64, u64, f64, u64);

#[derive(Default)]
pub struct History {
    series: Mutex<HashMap<Name, VecDeque<Point>>>,
    last: Mutex<HashMap<Name, Totals>>,
}

impl History {
    /// The model's steps, oldest first (at most 30 minutes).
    pub fn of(&self, model: &str) -> Vec<Point> {
        self.series
            .lock()
            .ok()
            .and_then(|s| s.get(model).map(|q| q.iter().copied().collect()))
            .unwrap_or_default()
    }

    /// Reads the counters once and appends a step per model.
    pub fn sample(&self, app: &AppState) {
        let totals = totals(app);
        let (Ok(mut last), Ok(mut series)) = (self.last.lock(), self.series.lock()) else {
            return;
        };
        let models: Vec<Name> = app.config().models.values().map(|m| m.name).collect();
        series.retain(|name, _| models.contains(name));
        last.retain(|name, _| models.contains(name));
        for name in models {
            let now = totals.get(&*name).copied().unwrap_or_default();
            // The first read only sets the baseline.
            let Some(before) = last.insert(name, now) else {
                continue;
            };
            let calls = now.0.saturating_sub(before.0);
            let count = now.3.saturating_sub(before.3);
            let point = Point {
                calls,
                failures: now.1.saturating_sub(before.1),
                latency_ms: (count > 0)
                    .then(|| ((now.2 - before.2) / count as f64 * 1_000_000.0).round() / 1000.0),
            };
            let q = series.entry(name).or_default();
            q.push_back(point);
            while q.len() > KEPT {
                q.pop_front();
            }
        }
    }
}

/// Each model's totals from `cascade_attempts_total` and
/// `cascade_upstream_duration_seconds`.
fn totals(app: &AppState) -> HashMap<String, Totals> {
    let mut out: HashMap<String, Totals> = HashMap::new();
    let label = |m: &prometheus::proto::Metric, name: &str| {
        m.get_label()
            .iter()
            .find(|l| l.get_name() == name)
            .map(|l| l.get_value().to_string())
    };
    for family in app.metrics.attempts_total.collect() {
        for m in family.get_metric() {
            let Some(model) = label(m, "model") else {
                continue;
            };
            let n = m.get_counter().get_value() as u64;
            let t = out.entry(model).or_default();
            t.0 += n;
            // A race's or hedge's loser, dropped when another answered, is no failure.
            if !matches!(label(m, "outcome").as_deref(), Some("ok" | "cancelled")) {
                t.1 += n;
            }
        }
    }
    for family in app.metrics.upstream_duration.collect() {
        for m in family.get_metric() {
            let Some(model) = label(m, "model") else {
                continue;
            };
            let h = m.get_histogram();
            let t = out.entry(model).or_default();
            t.2 += h.get_sample_sum();
            t.3 += h.get_sample_count();
        }
    }
    out
}

/// Samples every `STEP` until the state is gone.
pub fn start(app: &Arc<AppState>) {
    let weak: Weak<AppState> = Arc::downgrade(app);
    let _ = std::thread::Builder::new()
        .name("cascade-history".into())
        .spawn(move || loop {
            let Some(app) = weak.upgrade() else {
                return;
            };
            app.history.sample(&app);
            drop(app);
            std::thread::sleep(STEP);
        });
}
