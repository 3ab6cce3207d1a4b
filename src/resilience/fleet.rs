//! Breakers and health windows shared across replicas through Redis
//! (`state: { redis_url }`).
//!
//! One background thread per gateway, never on the request path:
//! - every `TICK` it writes the breakers this process opened or closed since the last
//!   tick, then reads every target's breaker and applies what other replicas wrote (an
//!   open or close made elsewhere arrives within two ticks, with the same `retry_at`);
//! - every `HEALTH_EVERY` it adds this process's new calls to per-target counters in
//!   5-second buckets and reads the fleet's sums over the health window, which then
//!   decide degradation on every replica alike.
//!
//! Every Redis operation is limited to 150 ms. While Redis is unreachable each replica
//! uses its own state (the fleet's counts go stale after 3 s) and catches up when
//! Redis returns; the counts of a write that failed are not sent again (it may have
//! been applied, and late counts would land in the wrong bucket). Retry and hedge budgets stay
//! local: they bound each replica's own load.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::breaker::{Breaker, SharedBreaker};
use super::health::Health;

/// How often breakers are written and read.
pub const TICK: Duration = Duration::from_millis(200);
/// How often health counts are shared.
const HEALTH_EVERY: Duration = Duration::from_millis(500);
/// The longest wait for one Redis operation.
const OP_TIMEOUT: Duration = Duration::from_millis(150);
const RECONNECT_EVERY: Duration = Duration::from_secs(1);
/// Width of one shared health bucket.
const BUCKET_MS: i64 = 5_000;
const WARN_EVERY: Duration = Duration::from_secs(10);

/// One target as the fleet knows it.
pub struct SharedTarget {
    /// Stable across replicas and reloads: a hash of the target's identity.
    pub id: String,
    pub breaker: Arc<Breaker>,
    pub health: Arc<Health>,
}

/// What a replica writes for a breaker.
#[derive(Serialize, Deserialize)]
struct Written {
    #[serde(flatten)]
    state: SharedBreaker,
    /// When it was written (Unix ms): a replica applies only newer writes.
    at_ms: i64,
    replica: u64,
}

/// The targets of the config in use, read on every tick (a reload changes them).
pub type Targets = Box<dyn Fn() -> Option<Vec<SharedTarget>> + Send>;

/// Starts the sharing thread. `targets` returns `None` once the gateway is gone,
/// which ends the thread.
pub fn start(url: &str, targets: Targets, errors: prometheus::IntCounter) -> std::io::Result<()> {
    let client = redis::Client::open(url).map_err(std::io::Error::other)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("cascade-fleet".into())
        .spawn(move || {
            rt.block_on(
                Sync {
                    client,
                    replica: rand::random(),
                    conn: None,
                    retry_at: None,
                    last_warning: None,
                    published: HashMap::new(),
                    applied: HashMap::new(),
                    errors,
                }
                .run(targets),
            )
        })?;
    Ok(())
}

struct Sync {
    client: redis::Client,
    replica: u64,
    conn: Option<ConnectionManager>,
    retry_at: Option<Instant>,
    last_warning: Option<Instant>,
    /// By target id: which breaker (its address: a reload may replace it) and its
    /// transition count last written.
    published: HashMap<String, (usize, u64)>,
    /// By target id: the time of the last write applied (ours or another's).
    applied: HashMap<String, i64>,
    errors: prometheus::IntCounter,
}

fn breaker_key(id: &str) -> String {
    format!("cascade:state:v1:breaker:{id}")
}

fn health_key(id: &str, bucket: i64) -> String {
    format!("cascade:state:v1:health:{id}:{bucket}")
}

async fn op<T>(fut: impl std::future::Future<Output = redis::RedisResult<T>>) -> Result<T, String> {
    match tokio::time::timeout(OP_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

impl Sync {
    async fn run(mut self, targets: Targets) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_health = Instant::now();
        loop {
            tick.tick().await;
            let Some(targets) = targets() else {
                return;
            };
            let Some(mut conn) = self.connection().await else {
                // Calls made while Redis is away stay local: shared later they would
                // land in the wrong bucket.
                if last_health.elapsed() >= HEALTH_EVERY {
                    last_health = Instant::now();
                    for t in &targets {
                        let _ = t.health.take_unshared();
                    }
                }
                continue;
            };
            let mut result = self.breakers(&mut conn, &targets).await;
            if result.is_ok() && last_health.elapsed() >= HEALTH_EVERY {
                last_health = Instant::now();
                result = self.health(&mut conn, &targets).await;
            }
            if let Err(e) = result {
                self.failed(&e);
            }
        }
    }

    async fn connection(&mut self) -> Option<ConnectionManager> {
        if let Some(c) = &self.conn {
            return Some(c.clone());
        }
        if self.retry_at.is_some_and(|t| Instant::now() < t) {
            return None;
        }
        match crate::redis_conn::connect(&self.client, OP_TIMEOUT).await {
            Ok(c) => {
                if self.retry_at.take().is_some() {
                    tracing::info!(
                        "shared state: Redis is back; sharing breakers and health again"
                    );
                }
                self.conn = Some(c.clone());
                Some(c)
            }
            Err(e) => {
                self.failed(&e);
                None
            }
        }
    }

    fn failed(&mut self, what: &str) {
        self.errors.inc();
        self.conn = None;
        self.retry_at = Some(Instant::now() + RECONNECT_EVERY);
        if self.last_warning.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            self.last_warning = Some(Instant::now());
            tracing::warn!(
                error = what,
                "shared state: Redis unreachable; each replica uses its own breakers and health until it returns"
            );
        }
    }

    /// Writes this process's new opens and closes, then applies newer ones from others.
    async fn breakers(
        &mut self,
        conn: &mut ConnectionManager,
        targets: &[SharedTarget],
    ) -> Result<(), String> {
        for t in targets {
            let (transitions, state) = t.breaker.shared();
            let which = Arc::as_ptr(&t.breaker) as usize;
            let seen = self
                .published
                .get(&t.id)
                .filter(|(w, _)| *w == which)
                .map(|(_, n)| *n);
            if seen == Some(transitions) {
                continue;
            }
            // A breaker first seen (at start, or new after a reload) writes nothing
            // for its starting state; later transitions are written.
            if seen.is_none() && transitions == 0 {
                self.published.insert(t.id.clone(), (which, 0));
                continue;
            }
            let at_ms = crate::clock::now_ms();
            let body = serde_json::to_string(&Written {
                state,
                at_ms,
                replica: self.replica,
            })
            .map_err(|e| e.to_string())?;
            op(redis::cmd("SET")
                .arg(breaker_key(&t.id))
                .arg(body)
                .arg("EX")
                .arg(86_400)
                .query_async::<()>(conn))
            .await?;
            self.published.insert(t.id.clone(), (which, transitions));
            self.applied.insert(t.id.clone(), at_ms);
        }
        if targets.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = targets.iter().map(|t| breaker_key(&t.id)).collect();
        let values: Vec<Option<String>> =
            op(redis::cmd("MGET").arg(&keys).query_async(conn)).await?;
        for (t, v) in targets.iter().zip(values) {
            let Some(w) = v.and_then(|v| serde_json::from_str::<Written>(&v).ok()) else {
                continue;
            };
            if w.replica == self.replica || self.applied.get(&t.id).is_some_and(|&a| a >= w.at_ms) {
                continue;
            }
            self.applied.insert(t.id.clone(), w.at_ms);
            // An open that has already run out says nothing new.
            if w.state.open && w.state.until_ms <= crate::clock::now_ms() {
                continue;
            }
            // Not a transition of ours (the count does not move): nothing to write back.
            t.breaker.apply_shared(w.state);
        }
        Ok(())
    }

    /// Adds this process's new calls to the current bucket and reads the fleet's sums.
    async fn health(
        &mut self,
        conn: &mut ConnectionManager,
        targets: &[SharedTarget],
    ) -> Result<(), String> {
        let now_ms = crate::clock::now_ms();
        let bucket = now_ms.div_euclid(BUCKET_MS);
        let taken: Vec<(u64, u64)> = targets.iter().map(|t| t.health.take_unshared()).collect();
        let mut write = redis::pipe();
        for (t, &(ok, failed)) in targets.iter().zip(&taken) {
            if ok == 0 && failed == 0 {
                continue;
            }
            let key = health_key(&t.id, bucket);
            let keep = t.health.settings().window.as_secs() as i64 + 2 * BUCKET_MS / 1000;
            write
                .hincr(&key, "s", ok)
                .ignore()
                .hincr(&key, "f", failed)
                .ignore()
                .expire(&key, keep)
                .ignore();
        }
        // A failed or timed-out write is not retried: it may have been applied (a
        // retry would count twice), and calls shared late would land in the wrong
        // bucket. Each replica's own window still has them.
        op(write.query_async::<()>(conn)).await?;
        let mut read = redis::pipe();
        let mut spans = Vec::with_capacity(targets.len());
        for t in targets {
            let n = (t.health.settings().window.as_millis() as i64 + BUCKET_MS - 1) / BUCKET_MS;
            let n = n.max(1);
            for b in (bucket - n + 1)..=bucket {
                read.cmd("HMGET")
                    .arg(health_key(&t.id, b))
                    .arg("s")
                    .arg("f");
            }
            spans.push(n as usize);
        }
        let sums: Vec<(Option<u64>, Option<u64>)> = op(read.query_async(conn)).await?;
        let mut at = 0;
        for (t, n) in targets.iter().zip(spans) {
            let (ok, failed) = sums[at..at + n].iter().fold((0, 0), |(a, b), (s, f)| {
                (a + s.unwrap_or(0), b + f.unwrap_or(0))
            });
            at += n;
            t.health.set_fleet(ok, failed);
        }
        Ok(())
    }
}

/// Ends the thread when the gateway it serves is gone.
pub fn targets_of<T: Send + std::marker::Sync + 'static>(
    app: Weak<T>,
    list: impl Fn(&T) -> Vec<SharedTarget> + Send + 'static,
) -> Targets {
    Box::new(move || app.upgrade().map(|a| list(&a)))
}
