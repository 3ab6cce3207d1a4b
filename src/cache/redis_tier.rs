//! The shared tier: Redis, behind moka. Every operation has a short timeout and every
//! failure is a miss (counted and logged, never a failed request).

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::{Entry, Key};
use crate::metrics::Metrics;

/// Longest wait for one Redis operation before it counts as a miss.
const OP_TIMEOUT: Duration = Duration::from_millis(150);
/// After a failed connection attempt, wait this long before trying again.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

pub struct RedisTier {
    client: redis::Client,
    state: Mutex<Conn>,
    metrics: Arc<Metrics>,
}

struct Conn {
    manager: Option<ConnectionManager>,
    /// After a failure the tier is skipped (every lookup a miss, at no cost) until then.
    down_until: Option<Instant>,
    connecting: bool,
    last_warning: Option<Instant>,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    model: String,
    provider: String,
    /// When the answer was stored, in Unix milliseconds (shared across processes).
    stored_ms: u64,
    fresh_ms: u64,
    #[serde(default = "yes")]
    has_usage: bool,
    body: String,
}

fn yes() -> bool {
    true
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn redis_key(key: Key) -> String {
    format!("cascade:v1:{key:032x}")
}

impl RedisTier {
    pub fn new(url: &str, metrics: Arc<Metrics>) -> Option<RedisTier> {
        match redis::Client::open(url) {
            Ok(client) => Some(RedisTier {
                client,
                state: Mutex::new(Conn {
                    manager: None,
                    down_until: None,
                    connecting: false,
                    last_warning: None,
                }),
                metrics,
            }),
            Err(e) => {
                tracing::warn!(error = %e, "cache: invalid Redis URL; running without the shared tier");
                None
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Conn> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A live connection, or `None` at once while the tier is down or another caller is
    /// connecting. Connecting happens outside the lock, so nobody queues behind it.
    async fn connection(&self) -> Option<ConnectionManager> {
        {
            let mut c = self.lock();
            if let Some(m) = &c.manager {
                return Some(m.clone());
            }
            if c.connecting || c.down_until.is_some_and(|t| Instant::now() < t) {
                return None;
            }
            c.connecting = true;
        }
        let result = crate::redis_conn::connect(&self.client, OP_TIMEOUT).await;
        let mut c = self.lock();
        c.connecting = false;
        match result {
            Ok(m) => {
                c.manager = Some(m.clone());
                c.down_until = None;
                Some(m)
            }
            Err(e) => {
                drop(c);
                self.failed(&e);
                None
            }
        }
    }

    /// Counts a failure, drops the connection, skips the tier for a while, and warns at
    /// most every 10 seconds.
    fn failed(&self, what: &str) {
        self.metrics
            .cache_errors
            .with_label_values(&["redis"])
            .inc();
        let mut c = self.lock();
        c.manager = None;
        c.down_until = Some(Instant::now() + RECONNECT_EVERY);
        if c.last_warning
            .is_none_or(|t| t.elapsed() > Duration::from_secs(10))
        {
            c.last_warning = Some(Instant::now());
            tracing::warn!(
                error = what,
                "cache: Redis unavailable; serving without the shared tier"
            );
        }
    }

    pub async fn get(&self, key: Key) -> Option<Entry> {
        let mut conn = self.connection().await?;
        let cmd = redis::cmd("GET").arg(redis_key(key)).to_owned();
        let reply: Option<Vec<u8>> =
            match tokio::time::timeout(OP_TIMEOUT, cmd.query_async(&mut conn)).await {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => {
                    self.failed(&e.to_string());
                    return None;
                }
                Err(_) => {
                    self.failed("GET timed out");
                    return None;
                }
            };
        let stored: Stored = serde_json::from_slice(&reply?).ok()?;
        // A model this gateway's config never named (another fleet's entry) is a miss.
        let model = crate::name::Name::known(&stored.model)?;
        let provider = crate::name::Name::known(&stored.provider)?;
        let age = Duration::from_millis(unix_ms().saturating_sub(stored.stored_ms));
        let now = Instant::now();
        let stored_at = now.checked_sub(age).unwrap_or(now);
        Some(Entry {
            body: Bytes::from(stored.body),
            model,
            provider,
            stored: stored_at,
            fresh_until: stored_at + Duration::from_millis(stored.fresh_ms),
            has_usage: stored.has_usage,
        })
    }

    pub async fn set(&self, key: Key, entry: &Entry, keep_for: Duration) {
        let Some(mut conn) = self.connection().await else {
            return;
        };
        let now = Instant::now();
        let stored = Stored {
            model: entry.model.to_string(),
            provider: entry.provider.to_string(),
            stored_ms: unix_ms()
                .saturating_sub(now.saturating_duration_since(entry.stored).as_millis() as u64),
            fresh_ms: entry
                .fresh_until
                .saturating_duration_since(entry.stored)
                .as_millis() as u64,
            has_usage: entry.has_usage,
            body: String::from_utf8_lossy(&entry.body).into_owned(),
        };
        let Ok(value) = serde_json::to_vec(&stored) else {
            return;
        };
        let cmd = redis::cmd("SET")
            .arg(redis_key(key))
            .arg(value)
            .arg("PX")
            .arg(keep_for.as_millis().max(1) as u64)
            .to_owned();
        match tokio::time::timeout(OP_TIMEOUT, cmd.query_async::<()>(&mut conn)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.failed(&e.to_string()),
            Err(_) => self.failed("SET timed out"),
        }
    }
}
