//! A circuit breaker per target: closed, open, half-open.
//!
//! - Opens after `consecutive_failures` failures in a row, or when at least `min_calls`
//!   calls in `window` failed at `failure_rate` or more.
//! - Stays open for a cooldown that doubles on each re-opening (up to `max_cooldown`);
//!   a new deadline never shortens the current one, and a Retry-After extends it.
//! - Then half-open: admits `half_open_probes` probes at a time and closes after
//!   `close_after` successes; a failed probe re-opens it.
//! - Only target-scoped failures count (see `counts_against_target`).

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::window::Window;
use crate::classify::ErrorClass;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerSettings {
    pub consecutive_failures: u32,
    pub failure_rate: f64,
    pub min_calls: u64,
    pub window: Duration,
    pub cooldown: Duration,
    pub max_cooldown: Duration,
    pub half_open_probes: u32,
    pub close_after: u32,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            consecutive_failures: 3,
            failure_rate: 0.5,
            min_calls: 20,
            window: Duration::from_secs(60),
            cooldown: Duration::from_secs(30),
            max_cooldown: Duration::from_secs(300),
            half_open_probes: 1,
            close_after: 2,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    HalfOpen,
    Open,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::HalfOpen => "half_open",
            BreakerState::Open => "open",
        }
    }

    /// The gauge value: 0 closed, 1 half-open, 2 open.
    pub fn gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        }
    }
}

/// What the breaker says about one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Closed: go ahead.
    Allowed,
    /// Half-open: go ahead as a probe; the outcome decides the state.
    Probe,
    /// Open (or out of probes) until this instant.
    Rejected { until: Instant },
    /// Called through an open breaker (`when_all_open: try_soonest`): a success moves
    /// it to half-open, a failure re-opens it for longer.
    Forced,
}

/// The outcome of an admitted call, as the breaker sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallResult {
    Success,
    Failure {
        retry_after: Option<Duration>,
    },
    /// Not the target's fault (the caller's bad request, a refusal...): no effect.
    Neutral,
}

impl CallResult {
    pub fn of(class: Option<ErrorClass>, retry_after: Option<Duration>) -> CallResult {
        match class {
            None => CallResult::Success,
            Some(c) if counts_against_target(c) => CallResult::Failure { retry_after },
            Some(_) => CallResult::Neutral,
        }
    }
}

/// Classes that say something about the target rather than the request.
pub fn counts_against_target(class: ErrorClass) -> bool {
    matches!(
        class,
        ErrorClass::Transient
            | ErrorClass::Timeout
            | ErrorClass::RateLimited
            | ErrorClass::Auth
            | ErrorClass::Quota
    )
}

#[derive(Debug, Clone)]
struct Inner {
    state: BreakerState,
    open_until: Instant,
    consecutive: u32,
    /// How many times it opened since it was last closed: the cooldown grows with it.
    reopenings: u32,
    probes_in_flight: u32,
    probe_successes: u32,
    /// a: successes, b: failures.
    window: Window,
    /// Counts this process's own opens and closes, for sharing them with other replicas.
    transitions: u64,
    /// When a last-resort probe was last claimed.
    last_resort_at: Option<Instant>,
}

/// A breaker's state as replicas share it: open until a wall-clock time, or closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SharedBreaker {
    pub open: bool,
    /// Unix milliseconds (meaningful when `open`).
    pub until_ms: i64,
    pub reopenings: u32,
}

#[derive(Debug)]
pub struct Breaker {
    settings: BreakerSettings,
    inner: Mutex<Inner>,
}

impl Breaker {
    pub fn new(settings: BreakerSettings) -> Breaker {
        Breaker {
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                open_until: Instant::now(),
                consecutive: 0,
                reopenings: 0,
                probes_in_flight: 0,
                probe_successes: 0,
                window: Window::new(settings.window, 12),
                transitions: 0,
                last_resort_at: None,
            }),
            settings,
        }
    }

    /// The state to share, and how many opens and closes this process made so far (a
    /// change in that count means there is something new to share).
    pub fn shared(&self) -> (u64, SharedBreaker) {
        let g = self.lock();
        let open = g.state != BreakerState::Closed;
        let left = g.open_until.saturating_duration_since(Instant::now());
        let until_ms = crate::clock::now_ms() + i64::try_from(left.as_millis()).unwrap_or(0);
        (
            g.transitions,
            SharedBreaker {
                open,
                until_ms,
                reopenings: g.reopenings,
            },
        )
    }

    /// Takes another replica's open or close. Not counted as this process's own
    /// transition, so it is not shared back.
    pub fn apply_shared(&self, s: SharedBreaker) {
        let mut g = self.lock();
        let now = Instant::now();
        if s.open {
            // Another replica's clock may run ahead: never longer than our own limit.
            let left = u64::try_from(s.until_ms - crate::clock::now_ms())
                .map(Duration::from_millis)
                .unwrap_or_default()
                .min(self.settings.max_cooldown);
            let until = now + left;
            g.open_until = if g.state == BreakerState::Open {
                g.open_until.max(until)
            } else {
                until
            };
            g.state = BreakerState::Open;
            g.reopenings = g.reopenings.max(s.reopenings);
            g.probes_in_flight = 0;
            g.probe_successes = 0;
        } else if g.state != BreakerState::Closed {
            g.state = BreakerState::Closed;
            g.reopenings = 0;
            g.consecutive = 0;
            g.window.clear();
        }
    }

    /// A breaker with new settings and this one's state, for a reload that changed
    /// only thresholds: an open breaker stays open until the same `retry_at`. Its
    /// failure-rate window starts again if its length changed.
    pub fn with_settings(&self, settings: BreakerSettings) -> Breaker {
        let mut inner = self.lock().clone();
        if settings.window != self.settings.window {
            inner.window = Window::new(settings.window, 12);
        }
        // Probes in flight report to the old breaker: their slots start free here.
        inner.probes_in_flight = 0;
        inner.probe_successes = 0;
        Breaker {
            settings,
            inner: Mutex::new(inner),
        }
    }

    pub fn settings(&self) -> &BreakerSettings {
        &self.settings
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// The state as of now (an open breaker past its cooldown reads as half-open).
    pub fn state(&self) -> BreakerState {
        let g = self.lock();
        match g.state {
            BreakerState::Open if Instant::now() >= g.open_until => BreakerState::HalfOpen,
            s => s,
        }
    }

    /// When the target may be tried again, if it is open now.
    pub fn retry_at(&self) -> Option<Instant> {
        let g = self.lock();
        (g.state == BreakerState::Open && Instant::now() < g.open_until).then_some(g.open_until)
    }

    /// Asks to make a call. A `Probe` or `Allowed` must be followed by `record`.
    pub fn admit(&self) -> Admission {
        let mut g = self.lock();
        let now = Instant::now();
        if g.state == BreakerState::Open {
            if now < g.open_until {
                return Admission::Rejected {
                    until: g.open_until,
                };
            }
            g.state = BreakerState::HalfOpen;
            g.probes_in_flight = 0;
            g.probe_successes = 0;
        }
        match g.state {
            BreakerState::Closed => Admission::Allowed,
            _ if g.probes_in_flight < self.settings.half_open_probes => {
                g.probes_in_flight += 1;
                Admission::Probe
            }
            // Out of probe slots: wait for the probes in flight to report.
            _ => Admission::Rejected { until: now },
        }
    }

    /// Whether a call would be admitted now (it admits nothing): closed, or a probe
    /// slot free once the breaker is (or would turn) half-open.
    pub fn probe_available(&self) -> bool {
        let g = self.lock();
        match g.state {
            BreakerState::Closed => true,
            BreakerState::Open if Instant::now() < g.open_until => false,
            // An open breaker past its time turns half-open with every slot free.
            BreakerState::Open => true,
            BreakerState::HalfOpen => g.probes_in_flight < self.settings.half_open_probes,
        }
    }

    /// Whether [`Breaker::claim_last_resort`] would succeed now (it claims nothing).
    pub fn last_resort_available(&self) -> bool {
        let g = self.lock();
        g.state != BreakerState::Closed
            && g.last_resort_at.is_none_or(|t| {
                Instant::now().saturating_duration_since(t) >= self.settings.cooldown
            })
    }

    /// Claims a last-resort probe of an open breaker: at most one per `cooldown`, so
    /// however many requests fail, an open target sees at most one such call per
    /// cooldown from this process (a failed one also reopens it for longer).
    pub fn claim_last_resort(&self) -> bool {
        let mut g = self.lock();
        let now = Instant::now();
        if g.state == BreakerState::Closed
            || g.last_resort_at
                .is_some_and(|t| now.saturating_duration_since(t) < self.settings.cooldown)
        {
            return false;
        }
        g.last_resort_at = Some(now);
        true
    }

    /// Forces a call through whatever the state (for `when_all_open: try_soonest`).
    pub fn force(&self) -> Admission {
        if self.lock().state == BreakerState::Closed {
            Admission::Allowed
        } else {
            Admission::Forced
        }
    }

    /// Reports the outcome of an admitted call.
    pub fn record(&self, admission: Admission, result: CallResult) {
        let mut g = self.lock();
        let now = Instant::now();
        if admission == Admission::Probe {
            g.probes_in_flight = g.probes_in_flight.saturating_sub(1);
        }
        let forced = admission == Admission::Forced;
        if forced && result == CallResult::Success && g.state == BreakerState::Open {
            g.state = BreakerState::HalfOpen;
            g.probes_in_flight = 0;
            g.probe_successes = 0;
        }
        match result {
            CallResult::Neutral => {}
            CallResult::Success => {
                g.consecutive = 0;
                g.window.add(now, 1, 0);
                if g.state == BreakerState::HalfOpen {
                    g.probe_successes += 1;
                    if g.probe_successes >= self.settings.close_after {
                        g.state = BreakerState::Closed;
                        g.reopenings = 0;
                        g.window.clear();
                        g.transitions += 1;
                    }
                }
            }
            CallResult::Failure { retry_after } => {
                g.consecutive += 1;
                g.window.add(now, 0, 1);
                let (ok, failed) = g.window.totals(now);
                let calls = ok + failed;
                let trip = g.state == BreakerState::HalfOpen
                    || forced
                    || g.consecutive >= self.settings.consecutive_failures
                    || (calls >= self.settings.min_calls
                        && calls > 0
                        && failed as f64 / calls as f64 >= self.settings.failure_rate);
                if trip && (g.state != BreakerState::Open || forced) {
                    let factor = 1u32.checked_shl(g.reopenings.min(16)).unwrap_or(u32::MAX);
                    let cooldown = self
                        .settings
                        .cooldown
                        .saturating_mul(factor)
                        .min(self.settings.max_cooldown);
                    g.state = BreakerState::Open;
                    g.reopenings += 1;
                    g.probe_successes = 0;
                    g.open_until = g.open_until.max(now + cooldown);
                    g.transitions += 1;
                }
                if g.state == BreakerState::Open {
                    if let Some(ra) = retry_after {
                        // Capped: a hostile or broken hint must not park a target for years.
                        let until = g.open_until.max(now + ra.min(self.settings.max_cooldown));
                        if until != g.open_until {
                            g.open_until = until;
                            g.transitions += 1;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail(b: &Breaker) {
        let a = b.admit();
        assert_ne!(
            a,
            Admission::Rejected {
                until: Instant::now()
            }
        );
        b.record(a, CallResult::Failure { retry_after: None });
    }

    fn ok(b: &Breaker) {
        let a = b.admit();
        b.record(a, CallResult::Success);
    }

    fn settings() -> BreakerSettings {
        BreakerSettings {
            cooldown: Duration::from_secs(30),
            max_cooldown: Duration::from_secs(100),
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn new_settings_keep_the_state_but_free_the_probe_slots() {
        let b = Breaker::new(BreakerSettings {
            consecutive_failures: 1,
            half_open_probes: 1,
            ..settings()
        });
        fail(&b);
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(
            b.admit(),
            Admission::Probe,
            "one probe in flight on the old breaker"
        );
        let next = b.with_settings(BreakerSettings {
            consecutive_failures: 2,
            half_open_probes: 1,
            ..settings()
        });
        // Its probe reports to the old breaker: the new one must not wait for it.
        assert_eq!(next.admit(), Admission::Probe);
        assert!(
            next.claim_last_resort(),
            "open: a last resort may be claimed"
        );
        assert!(!next.claim_last_resort(), "once per cooldown");
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_and_closes_through_half_open() {
        let b = Breaker::new(settings());
        fail(&b);
        ok(&b);
        fail(&b);
        fail(&b);
        assert_eq!(b.state(), BreakerState::Closed, "a success resets the run");
        fail(&b);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(matches!(b.admit(), Admission::Rejected { .. }));

        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(b.state(), BreakerState::HalfOpen);
        let probe = b.admit();
        assert_eq!(probe, Admission::Probe);
        assert!(
            matches!(b.admit(), Admission::Rejected { .. }),
            "one probe at a time"
        );
        b.record(probe, CallResult::Success);
        assert_eq!(
            b.state(),
            BreakerState::HalfOpen,
            "needs close_after=2 successes"
        );
        let probe = b.admit();
        b.record(probe, CallResult::Success);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn cooldown_grows_on_reopening_and_caps() {
        let b = Breaker::new(settings());
        for _ in 0..3 {
            fail(&b);
        }
        let t0 = Instant::now();
        assert_eq!(b.retry_at(), Some(t0 + Duration::from_secs(30)));
        tokio::time::advance(Duration::from_secs(30)).await;
        fail(&b); // the probe fails: open again for twice as long
        assert_eq!(b.retry_at(), Some(Instant::now() + Duration::from_secs(60)));
        tokio::time::advance(Duration::from_secs(60)).await;
        fail(&b); // 120s, capped at 100s
        assert_eq!(
            b.retry_at(),
            Some(Instant::now() + Duration::from_secs(100))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_extends_never_shortens() {
        let b = Breaker::new(settings());
        fail(&b);
        fail(&b);
        let a = b.admit();
        b.record(
            a,
            CallResult::Failure {
                retry_after: Some(Duration::from_secs(90)),
            },
        );
        assert_eq!(b.retry_at(), Some(Instant::now() + Duration::from_secs(90)));
        // A shorter hint later does not bring it forward (the breaker is open: force a call).
        let a = b.force();
        assert_eq!(a, Admission::Forced);
        let fail = |secs| CallResult::Failure {
            retry_after: Some(Duration::from_secs(secs)),
        };
        b.record(a, fail(5));
        assert_eq!(b.retry_at(), Some(Instant::now() + Duration::from_secs(90)));
        // A neutral forced call changes nothing; the cooldown still holds.
        b.record(b.force(), CallResult::Neutral);
        assert_eq!(b.state(), BreakerState::Open);
        // A huge hint is capped at max_cooldown.
        b.record(b.force(), fail(10_000_000));
        assert_eq!(
            b.retry_at(),
            Some(Instant::now() + Duration::from_secs(100))
        );
        // A forced success moves it to half-open.
        b.record(b.force(), CallResult::Success);
        assert_eq!(b.state(), BreakerState::HalfOpen);
    }

    #[tokio::test(start_paused = true)]
    async fn opens_on_failure_rate_and_ignores_neutral() {
        let b = Breaker::new(BreakerSettings {
            consecutive_failures: 100,
            min_calls: 10,
            ..settings()
        });
        for _ in 0..20 {
            let a = b.admit();
            b.record(a, CallResult::of(Some(ErrorClass::BadRequest), None));
        }
        assert_eq!(
            b.state(),
            BreakerState::Closed,
            "the caller's errors never count"
        );
        for i in 0..10 {
            if i % 2 == 0 {
                ok(&b)
            } else {
                fail(&b)
            }
        }
        assert_eq!(b.state(), BreakerState::Open, "50% of 10 calls failed");
    }
}
