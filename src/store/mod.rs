//! The operator's record: one row per upstream call (`model_calls`) and one per client
//! request (`requests`), in an embedded SQLite file (WAL mode, the default) or, for a
//! fleet, in PostgreSQL (`store.url`), with the same tables.
//!
//! The request path never writes: it hands a [`Row`] to [`Store::record`], which puts
//! it on a bounded queue and returns at once. One background thread (`writer.rs`)
//! commits batches in transactions. A full queue, a full disk, a locked or deleted file
//! or a lost database drop rows and count them (`cascade_store_dropped_total`); an
//! answer never waits.

mod lanes;
pub mod postgres;
pub mod report;
mod schema;
mod sqlite;
mod writer;

use std::path::PathBuf;
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::time::Duration;

use crate::name::Name;
use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge};

pub use postgres::PgUrl;
pub use schema::open_read_only;

/// Where the store lives.
#[derive(Debug, Clone, PartialEq)]
pub enum Backend {
    /// `store.path`: a SQLite file.
    Sqlite(PathBuf),
    /// `store.url`: a PostgreSQL database.
    Postgres(PgUrl),
}

impl std::fmt::Display for Backend {
    /// The file, or the database without its credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Sqlite(p) => write!(f, "{}", p.display()),
            Backend::Postgres(u) => f.write_str(&u.redacted()),
        }
    }
}

/// A store that could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL's message (never the URL, so never its password).
    #[error("{0}")]
    Postgres(String),
}

/// Rows deleted per statement by retention, so the writer never stalls for long.
const RETENTION_CHUNK: usize = 10_000;

/// Milliseconds rounded to microseconds: enough for sub-millisecond upstreams.
fn round_ms(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// How a call came to be made, as `model_calls.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    /// The request's first call (whichever target the health order put first).
    Primary,
    /// The first call to any later target.
    Fallback,
    /// A same-target retry.
    Retry,
    /// A hedged extra call.
    Hedge,
    /// Every call of a race after the first.
    Race,
    /// A shadow call, compared with the served answer.
    Shadow,
}

impl CallKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CallKind::Primary => "primary",
            CallKind::Fallback => "fallback",
            CallKind::Retry => "retry",
            CallKind::Hedge => "hedge",
            CallKind::Race => "race",
            CallKind::Shadow => "shadow",
        }
    }
}

/// Token counts as the store keeps them. `input` counts every prompt token, cached
/// ones included; `cached_input` is the part read from the provider's prompt cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tokens {
    pub input: u64,
    pub cached_input: u64,
    pub output: u64,
}

impl From<&crate::api::Usage> for Tokens {
    fn from(u: &crate::api::Usage) -> Self {
        Tokens {
            input: u.prompt_tokens,
            cached_input: u.cached_tokens.min(u.prompt_tokens),
            output: u.completion_tokens,
        }
    }
}

/// Dollars to ten decimals, as the store keeps them: a cheap call costs about 1e-6,
/// and float products carry noise in their last digits.
pub fn round_usd(v: f64) -> f64 {
    (v * 1e10).round() / 1e10
}

/// One upstream call.
#[derive(Debug, Clone)]
pub struct CallRow {
    /// When the call started, Unix milliseconds.
    pub started_ms: i64,
    pub request_id: Arc<str>,
    pub chain: Name,
    pub model: Name,
    pub provider: Name,
    pub kind: CallKind,
    pub success: bool,
    pub status: Option<u16>,
    /// The error class; `None` on success.
    pub error_type: Option<&'static str>,
    pub latency_ms: f64,
    pub ttft_ms: Option<f64>,
    /// `None` when the provider reported no usage.
    pub tokens: Option<Tokens>,
    pub cost_usd: f64,
    /// The call failed because the request's own deadline cut it: not the target's
    /// fault, so it does not count against the target's health.
    pub deadline_cut: bool,
}

/// One client request.
#[derive(Debug, Clone)]
pub struct RequestRow {
    pub request_id: Arc<str>,
    /// When the request arrived, Unix milliseconds.
    pub arrived_ms: i64,
    pub surface: &'static str,
    /// `None` when no chain was resolved (bad input).
    pub chain: Option<Name>,
    pub status: u16,
    /// Who answered, or whose cached answer was served.
    pub model: Option<Name>,
    pub provider: Option<Name>,
    pub attempts: u32,
    pub fallbacks: u32,
    pub cache: &'static str,
    pub stream: bool,
    pub latency_ms: f64,
    pub ttft_ms: Option<f64>,
    pub tokens: Option<Tokens>,
    pub cost_usd: f64,
    pub primary_cost_usd: f64,
    pub error_type: Option<&'static str>,
}

/// One shadow call compared with the answer that was served.
#[derive(Debug, Clone)]
pub struct ShadowRow {
    pub request_id: Arc<str>,
    /// When the shadow call started, Unix milliseconds.
    pub started_ms: i64,
    pub chain: Name,
    pub served_model: Name,
    pub shadow_model: Name,
    pub success: bool,
    pub error_type: Option<&'static str>,
    pub latency_ms: Option<f64>,
    pub ttft_ms: Option<f64>,
    pub served_latency_ms: Option<f64>,
    pub length_ratio: Option<f64>,
    pub json_valid: Option<bool>,
    pub tool_calls_match: Option<bool>,
    pub similarity: Option<f64>,
    pub served_finish_reason: Option<String>,
    pub shadow_finish_reason: Option<String>,
    pub cost_usd: f64,
}

#[derive(Debug, Clone)]
pub enum Row {
    Call(CallRow),
    Request(RequestRow),
    Shadow(Box<ShadowRow>),
    /// A Responses object kept (replaced if it exists).
    Response(Box<ResponseRow>),
    /// A Responses object deleted.
    ForgetResponse {
        tenant: String,
        id: String,
    },
}

/// A kept Responses object: the served object and the conversation up to it.
#[derive(Debug, Clone)]
pub struct ResponseRow {
    /// The caller's tenant (a hash of its credential, never the credential).
    pub tenant: String,
    pub id: String,
    pub created_ms: i64,
    pub expires_ms: i64,
    pub response: bytes::Bytes,
    pub items: bytes::Bytes,
}

/// A kept response read back: (response, items, expires_ms).
pub type StoredResponse = (Vec<u8>, Vec<u8>, i64);

/// A kept response, if it has not expired (off the request thread).
pub async fn read_response(
    backend: &Backend,
    tenant: &str,
    id: &str,
) -> Result<Option<StoredResponse>, StoreError> {
    match backend {
        Backend::Sqlite(path) => {
            let (path, tenant, id) = (path.clone(), tenant.to_string(), id.to_string());
            tokio::task::spawn_blocking(move || {
                use rusqlite::OptionalExtension;
                let conn = open_read_only(&path)?;
                Ok(conn
                    .query_row(
                        "SELECT response, items, expires_ms FROM responses
                         WHERE tenant = ?1 AND id = ?2 AND expires_ms > ?3",
                        rusqlite::params![tenant, id, crate::clock::now_ms()],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                    )
                    .optional()?)
            })
            .await
            .map_err(|_| StoreError::Postgres("the read failed".into()))?
        }
        Backend::Postgres(url) => url.read_response(tenant.into(), id.into()).await,
    }
}

/// What the writer is sent.
enum Msg {
    Row(Row),
    /// Commit everything queued before this, then answer.
    Flush(mpsc::SyncSender<()>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct StoreSettings {
    pub backend: Backend,
    pub retention: Duration,
    pub queue: usize,
    pub flush_interval: Duration,
}

/// The store's metrics, registered by `Metrics`.
#[derive(Clone)]
pub struct StoreMetrics {
    pub rows: IntCounterVec,
    pub dropped: IntCounter,
    pub queue_depth: IntGauge,
    pub flush_seconds: Histogram,
}

/// A cheap handle to the store; clone it freely.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    /// Kept Responses objects, their deletions and flushes, in order (rare, and a
    /// deletion must follow its insert). Unbounded underneath: the bound is
    /// `settings.queue`, checked against `queued.channel`.
    tx: Sender<Msg>,
    queued: Arc<Queued>,
    metrics: StoreMetrics,
    settings: StoreSettings,
    /// The store answered when the gateway started (a PostgreSQL server may not have).
    open_at_start: bool,
}

/// What waits for the writer besides the channel's messages.
struct Queued {
    /// Calls, requests and shadow results, one lane per worker.
    lanes: lanes::Lanes,
    /// Rows sent on the channel and not yet received.
    channel: std::sync::atomic::AtomicUsize,
}

impl Queued {
    /// Rows recorded and not yet taken by the writer.
    fn waiting(&self) -> usize {
        self.lanes.len() + self.channel.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The store could not be opened at start.
#[derive(Debug, thiserror::Error)]
#[error("config error at {key}: {message}")]
pub struct OpenError {
    /// `store.path` or `store.url`.
    pub key: &'static str,
    pub message: String,
}

impl Store {
    /// Opens (or creates) the store, applies migrations and starts the writer thread.
    ///
    /// A SQLite file that can't be created or opened is a start error: a wrong path
    /// is a mistake, not a silent loss of every row. A PostgreSQL server that does not
    /// answer is not: it is another machine, down for a while, and the gateway must
    /// still serve. That is logged, and rows are dropped and counted until it answers.
    pub fn open(settings: StoreSettings, metrics: StoreMetrics) -> Result<Store, OpenError> {
        Self::open_lanes(settings, metrics, 1)
    }

    /// [`Store::open`] with one lane per worker thread (`lanes` is the number of
    /// per-core workers, or 1).
    pub fn open_lanes(
        settings: StoreSettings,
        metrics: StoreMetrics,
        lanes: usize,
    ) -> Result<Store, OpenError> {
        let conn = match &settings.backend {
            Backend::Sqlite(path) => {
                check_path(path)?;
                Some(
                    writer::Conn::open(&settings.backend).map_err(|e| OpenError {
                        key: "store.path",
                        message: format!("cannot open {}: {e}", path.display()),
                    })?,
                )
            }
            Backend::Postgres(url) => match writer::Conn::open(&settings.backend) {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::error!(
                        store = %url.redacted(),
                        error = %e,
                        "store: cannot reach PostgreSQL; rows are dropped and counted in \
                         cascade_store_dropped_total until it answers"
                    );
                    None
                }
            },
        };
        let open_at_start = conn.is_some();
        let (tx, rx) = mpsc::channel();
        let writer = writer::Writer::new(settings.clone(), metrics.clone(), conn);
        let queued = Arc::new(Queued {
            lanes: lanes::Lanes::new(lanes, settings.queue),
            channel: Default::default(),
        });
        let for_writer = queued.clone();
        std::thread::Builder::new()
            .name("cascade-store".into())
            .spawn(move || writer.run(rx, for_writer))
            .map_err(|e| OpenError {
                key: "store",
                message: format!("cannot start the store writer: {e}"),
            })?;
        Ok(Store {
            inner: Arc::new(Inner {
                tx,
                queued,
                metrics,
                settings,
                open_at_start,
            }),
        })
    }

    /// The store answered at start, so reading it (the health window) is worth a try.
    pub fn open_at_start(&self) -> bool {
        self.inner.open_at_start
    }

    /// Queues a row for the writer. Never blocks: a full queue drops the row and counts it.
    pub fn record(&self, row: Row) {
        match row {
            // Kept responses and their deletions go in order on the channel.
            Row::Response(_) | Row::ForgetResponse { .. } => self.send(row),
            row => self.record_all([row]),
        }
    }

    /// Queues call, request and shadow rows in this worker's lane, in order (a
    /// request's calls, then its row). Rows that don't fit are dropped and counted.
    pub fn record_all(&self, rows: impl IntoIterator<Item = Row>) {
        let dropped = self.inner.queued.lanes.push(rows);
        if dropped > 0 {
            self.inner.metrics.dropped.inc_by(dropped);
        }
    }

    fn send(&self, row: Row) {
        use std::sync::atomic::Ordering;
        let (m, q) = (&self.inner.metrics, &self.inner.queued);
        // Concurrent callers may pass the bound by a few rows; it bounds memory, so that
        // is fine.
        if q.channel.load(Ordering::Relaxed) >= self.inner.settings.queue {
            m.dropped.inc();
            return;
        }
        q.channel.fetch_add(1, Ordering::Relaxed);
        if self.inner.tx.send(Msg::Row(row)).is_err() {
            q.channel.fetch_sub(1, Ordering::Relaxed);
            m.dropped.inc();
        }
    }

    /// Rows recorded and not yet taken by the writer (a loader's back-pressure; the
    /// gauge `cascade_store_queue_depth` also counts rows taken and not yet committed).
    pub fn waiting(&self) -> usize {
        self.inner.queued.waiting()
    }

    /// Waits (blocking, off the request path) until every row queued so far is
    /// committed or counted as dropped.
    pub fn flush_blocking(&self) {
        let (ack, done) = mpsc::sync_channel(1);
        if self.inner.tx.send(Msg::Flush(ack)).is_ok() {
            let _ = done.recv();
        }
    }

    /// [`Self::flush_blocking`] for at most `limit`; false when rows were still
    /// waiting (a store that stopped answering must not hold the exit forever).
    pub fn flush_within(&self, limit: Duration) -> bool {
        let (ack, done) = mpsc::sync_channel(1);
        // A writer that is gone can't write what is queued.
        if self.inner.tx.send(Msg::Flush(ack)).is_err() {
            return false;
        }
        done.recv_timeout(limit).is_ok()
    }

    /// [`Self::flush_blocking`] from async code.
    pub async fn flush(&self) {
        let store = self.clone();
        let _ = tokio::task::spawn_blocking(move || store.flush_blocking()).await;
    }
}

/// The directory must exist; the store creates the file, not the directories above it.
pub fn check_path(path: &std::path::Path) -> Result<(), OpenError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(OpenError {
            key: "store.path",
            message: format!("{} is not a directory", dir.display()),
        }),
        Err(e) => Err(OpenError {
            key: "store.path",
            message: format!("the directory {} does not exist ({e})", dir.display()),
        }),
    }
}

/// One fallback: the call to `to` and the call before it in the same request.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FallbackEvent {
    #[serde(skip)]
    pub timestamp_ms: i64,
    pub request_id: Option<String>,
    pub chain: Option<String>,
    pub from: Option<String>,
    pub to: String,
    /// The class of the call that failed over.
    pub reason: Option<String>,
    /// Its upstream status.
    pub status: Option<i64>,
}

/// The newest `?1` fallback calls (through the partial index), each with the call
/// before it in its request (through the request-id index).
const FALLBACKS_SQL: &str = "SELECT f.timestamp, f.request_id, f.chain, f.model_name,
    (SELECT p.model_name FROM model_calls p WHERE p.request_id = f.request_id AND p.id < f.id
     ORDER BY p.id DESC LIMIT 1),
    (SELECT p.error_type FROM model_calls p WHERE p.request_id = f.request_id AND p.id < f.id
     ORDER BY p.id DESC LIMIT 1),
    (SELECT p.status FROM model_calls p WHERE p.request_id = f.request_id AND p.id < f.id
     ORDER BY p.id DESC LIMIT 1)
  FROM model_calls f WHERE f.kind = 'fallback' ORDER BY f.id DESC LIMIT ?1";

/// The newest `limit` fallback events, newest first (off the request thread).
pub async fn recent_fallbacks(
    backend: &Backend,
    limit: usize,
) -> Result<Vec<FallbackEvent>, StoreError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    match backend {
        Backend::Postgres(url) => url.recent_fallbacks(limit).await,
        Backend::Sqlite(path) => {
            let path = path.clone();
            tokio::task::spawn_blocking(move || -> Result<Vec<FallbackEvent>, StoreError> {
                let conn = open_read_only(&path)?;
                let mut stmt = conn.prepare(FALLBACKS_SQL)?;
                let rows = stmt.query_map([limit], |r| {
                    let ts: String = r.get(0)?;
                    Ok(FallbackEvent {
                        timestamp_ms: humantime::parse_rfc3339(&ts)
                            .map(crate::clock::to_ms)
                            .unwrap_or(0),
                        request_id: r.get(1)?,
                        chain: r.get(2)?,
                        to: r.get(3)?,
                        from: r.get(4)?,
                        reason: r.get(5)?,
                        status: r.get(6)?,
                    })
                })?;
                Ok(rows.collect::<rusqlite::Result<_>>()?)
            })
            .await
            .map_err(|_| StoreError::Postgres("the read failed".into()))?
        }
    }
}

/// A call from the store's history, as the health window needs it.
#[derive(Debug, Clone)]
pub struct PastCall {
    pub model: String,
    pub started_ms: i64,
    pub latency_ms: f64,
    pub ttft_ms: Option<f64>,
    pub error_type: Option<String>,
    pub deadline_cut: bool,
}

/// Calls that started at or after `since_ms`, oldest first.
pub fn recent_calls(backend: &Backend, since_ms: i64) -> Result<Vec<PastCall>, StoreError> {
    match backend {
        Backend::Sqlite(path) => Ok(sqlite_recent_calls(path, since_ms)?),
        Backend::Postgres(url) => url.recent_calls(since_ms),
    }
}

fn sqlite_recent_calls(path: &std::path::Path, since_ms: i64) -> rusqlite::Result<Vec<PastCall>> {
    let conn = open_read_only(path)?;
    let mut stmt = conn.prepare(
        "SELECT model_name, timestamp, latency_ms, ttft_ms, error_type, deadline_cut
         FROM model_calls WHERE timestamp >= ?1 ORDER BY timestamp",
    )?;
    let rows = stmt.query_map([crate::clock::rfc3339_ms(since_ms)], |r| {
        let ts: String = r.get(1)?;
        Ok(PastCall {
            model: r.get(0)?,
            started_ms: humantime::parse_rfc3339(&ts)
                .map(crate::clock::to_ms)
                .unwrap_or(since_ms),
            latency_ms: r.get(2)?,
            ttft_ms: r.get(3)?,
            error_type: r.get(4)?,
            deadline_cut: r.get(5)?,
        })
    })?;
    rows.collect()
}
