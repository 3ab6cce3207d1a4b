//! The store's one writer: a thread that takes rows off the queue and commits them in
//! batches, one transaction per batch, at least every `flush_interval`.
//!
//! Faults end in counted drops, never in a blocked caller: a batch that fails to
//! commit (disk full, locked by another process, I/O error) is dropped and counted,
//! the error is logged at most once a minute, and the file is reopened on the next
//! batch. A file deleted or replaced under it is noticed before each commit and
//! created again at `store.path`. Retention runs at start and then hourly.

use std::path::Path;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{Duration, Instant};

use prometheus::IntCounter;
use rusqlite::{params, Connection};

use super::{
    schema, CallRow, Msg, RequestRow, Row, ShadowRow, StoreMetrics, StoreSettings, Tokens,
};
use crate::clock;

/// Rows per transaction at most: large enough that commits are rare under load, small
/// enough that a failed one loses little.
const BATCH: usize = 4096;
/// How often the writer looks at its queue (at most; `flush_interval` if shorter).
const TICK: Duration = Duration::from_millis(10);
const RETENTION_EVERY: Duration = Duration::from_secs(3600);
/// Rows deleted per statement by retention, so the writer never stalls for long.
const RETENTION_CHUNK: usize = 10_000;
const ERROR_LOG_EVERY: Duration = Duration::from_secs(60);
/// Retention deletes for at most this long per turn of the writer's loop, so a large
/// backlog of old rows never stalls the queue.
const RETENTION_BUDGET: Duration = Duration::from_millis(50);
/// How often a store that could not be opened is tried again.
const REOPEN_EVERY: Duration = Duration::from_secs(1);

pub(super) struct Writer {
    settings: StoreSettings,
    metrics: StoreMetrics,
    calls_written: IntCounter,
    requests_written: IntCounter,
    shadows_written: IntCounter,
    conn: Option<Connection>,
    /// The identity of the file `conn` has open, to notice a delete or a swap.
    file_id: Option<(u64, u64)>,
    last_reopen: Option<Instant>,
    last_retention: Option<Instant>,
    /// Retention has old rows left to delete.
    retention_pending: bool,
    last_error_log: Option<Instant>,
    /// Rows dropped since the last error line.
    dropped_unlogged: u64,
    /// A write failed since the last successful commit.
    failing: bool,
}

impl Writer {
    pub(super) fn new(settings: StoreSettings, metrics: StoreMetrics, conn: Connection) -> Self {
        Writer {
            file_id: file_id(&settings.path),
            calls_written: metrics.rows.with_label_values(&["model_calls"]),
            requests_written: metrics.rows.with_label_values(&["requests"]),
            shadows_written: metrics.rows.with_label_values(&["shadow_results"]),
            settings,
            metrics,
            conn: Some(conn),
            last_reopen: None,
            last_retention: None,
            retention_pending: false,
            last_error_log: None,
            dropped_unlogged: 0,
            failing: false,
        }
    }

    pub(super) fn run(mut self, rx: Receiver<Msg>) {
        self.start_retention();
        // At start, retention runs to the end before the first batch.
        while self.retention_pending {
            self.retention();
        }
        let mut batch: Vec<Row> = Vec::with_capacity(BATCH);
        let tick = self.settings.flush_interval.min(TICK);
        let mut last_commit = Instant::now();
        loop {
            // Drain what has queued since the last turn. The writer never blocks on the
            // queue: a receiver waiting in `recv` would make every row's send wake it
            // (a syscall and a context switch per row, taken from the request path's
            // cores); polling on a short tick costs one timer wake-up per tick instead.
            let mut closed = false;
            let mut drained = 0;
            loop {
                match rx.try_recv() {
                    Ok(Msg::Row(row)) => {
                        drained += 1;
                        batch.push(row);
                        if batch.len() >= BATCH {
                            self.metrics.queue_depth.sub(drained);
                            drained = 0;
                            self.commit(&mut batch);
                            last_commit = Instant::now();
                        }
                    }
                    Ok(Msg::Flush(ack)) => {
                        self.metrics.queue_depth.sub(drained);
                        drained = 0;
                        if !batch.is_empty() {
                            self.commit(&mut batch);
                            last_commit = Instant::now();
                        }
                        let _ = ack.send(());
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                }
            }
            self.metrics.queue_depth.sub(drained);
            if !batch.is_empty()
                && (closed || last_commit.elapsed() >= self.settings.flush_interval)
            {
                self.commit(&mut batch);
                last_commit = Instant::now();
            }
            if closed {
                return;
            }
            if self
                .last_retention
                .is_none_or(|t| t.elapsed() >= RETENTION_EVERY)
            {
                self.start_retention();
            }
            if self.retention_pending {
                self.retention();
            }
            std::thread::sleep(tick);
        }
    }

    fn commit(&mut self, batch: &mut Vec<Row>) {
        self.check_file();
        let Some(conn) = self.connection() else {
            self.drop_rows(batch.len() as u64, "the store is not open");
            batch.clear();
            return;
        };
        let started = Instant::now();
        match insert(conn, batch) {
            Ok([calls, requests, shadows]) => {
                self.calls_written.inc_by(calls);
                self.requests_written.inc_by(requests);
                self.shadows_written.inc_by(shadows);
                self.metrics
                    .flush_seconds
                    .observe(started.elapsed().as_secs_f64());
                if std::mem::take(&mut self.failing) {
                    tracing::warn!(path = %self.settings.path.display(), "store: writing again");
                }
            }
            Err(e) => {
                // A lock held elsewhere or a full disk passes with the same handle;
                // anything else may be a broken one.
                if !keeps_handle(&e) {
                    self.conn = None;
                }
                self.failing = true;
                self.drop_rows(batch.len() as u64, &e.to_string());
            }
        }
        batch.clear();
    }

    /// The open connection, reopening the file if it was lost (at most once a second).
    fn connection(&mut self) -> Option<&mut Connection> {
        if self.conn.is_none() && self.last_reopen.is_none_or(|t| t.elapsed() >= REOPEN_EVERY) {
            self.last_reopen = Some(Instant::now());
            match schema::open(&self.settings.path) {
                Ok(c) => {
                    self.file_id = file_id(&self.settings.path);
                    self.conn = Some(c);
                }
                Err(e) => self.log_error(&format!("cannot open the store: {e}")),
            }
        }
        self.conn.as_mut()
    }

    /// A file deleted or replaced under the open connection would swallow every row
    /// written to it: notice it before writing, and create the file again.
    fn check_file(&mut self) {
        if self.conn.is_some() && file_id(&self.settings.path) != self.file_id {
            self.log_error("the store file was deleted or replaced; creating it again");
            self.conn = None;
            self.last_reopen = None;
        }
    }

    fn drop_rows(&mut self, n: u64, why: &str) {
        self.metrics.dropped.inc_by(n);
        self.dropped_unlogged += n;
        self.log_error(why);
    }

    fn log_error(&mut self, why: &str) {
        if self
            .last_error_log
            .is_none_or(|t| t.elapsed() >= ERROR_LOG_EVERY)
        {
            self.last_error_log = Some(Instant::now());
            tracing::error!(
                path = %self.settings.path.display(),
                dropped_rows = self.dropped_unlogged,
                error = why,
                "store: write failed; rows are dropped and counted in cascade_store_dropped_total"
            );
            self.dropped_unlogged = 0;
        }
    }

    fn start_retention(&mut self) {
        self.last_retention = Some(Instant::now());
        self.retention_pending = true;
    }

    /// Deletes rows older than `retention`, a chunk at a time, for at most
    /// `RETENTION_BUDGET`; what is left is picked up on the next turn.
    fn retention(&mut self) {
        let cutoff_ms = clock::now_ms()
            - i64::try_from(self.settings.retention.as_millis()).unwrap_or(i64::MAX / 2);
        let cutoff = clock::rfc3339_ms(cutoff_ms);
        let Some(conn) = self.connection() else {
            self.retention_pending = false;
            return;
        };
        let started = Instant::now();
        let mut left = false;
        let mut failed = None;
        for table in ["model_calls", "requests", "shadow_results"] {
            let sql = format!(
                "DELETE FROM {table} WHERE id IN \
                 (SELECT id FROM {table} WHERE timestamp < ?1 LIMIT {RETENTION_CHUNK})"
            );
            loop {
                match conn.execute(&sql, [&cutoff]) {
                    Ok(n) if n < RETENTION_CHUNK => break,
                    Ok(_) if started.elapsed() >= RETENTION_BUDGET => {
                        left = true;
                        break;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        failed = Some(e.to_string());
                        break;
                    }
                }
            }
        }
        self.retention_pending = left && failed.is_none();
        if let Some(e) = failed {
            self.log_error(&format!("retention: {e}"));
        }
    }
}

/// Errors that leave the connection usable: a lock held by another process, a full disk.
fn keeps_handle(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(
            rusqlite::ErrorCode::DatabaseBusy
                | rusqlite::ErrorCode::DatabaseLocked
                | rusqlite::ErrorCode::DiskFull
        )
    )
}

#[cfg(unix)]
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn file_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|_| (0, 0))
}

/// Inserts a batch in one transaction; the counts of call, request and shadow rows.
fn insert(conn: &mut Connection, batch: &[Row]) -> rusqlite::Result<[u64; 3]> {
    let tx = conn.transaction()?;
    let (mut calls, mut requests, mut shadows) = (0, 0, 0);
    {
        let mut call_stmt = tx.prepare_cached(
            "INSERT INTO model_calls (timestamp, request_id, chain, model_name, provider, kind,
             success, status, error_type, latency_ms, ttft_ms, input_tokens, cached_input_tokens,
             output_tokens, cost_usd, deadline_cut)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
        )?;
        let mut request_stmt = tx.prepare_cached(
            "INSERT INTO requests (request_id, timestamp, surface, chain, status, model_name,
             provider, attempts, fallbacks, cache, stream, latency_ms, ttft_ms, input_tokens,
             cached_input_tokens, output_tokens, cost_usd, primary_cost_usd, error_type)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
             ?18, ?19)",
        )?;
        let mut shadow_stmt = tx.prepare_cached(
            "INSERT INTO shadow_results (request_id, timestamp, chain, served_model, shadow_model,
             success, error_type, latency_ms, ttft_ms, served_latency_ms, length_ratio, json_valid,
             tool_calls_match, similarity, served_finish_reason, shadow_finish_reason, cost_usd)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
        )?;
        for row in batch {
            match row {
                Row::Shadow(r) => {
                    insert_shadow(&mut shadow_stmt, r)?;
                    shadows += 1;
                }
                Row::Call(c) => {
                    insert_call(&mut call_stmt, c)?;
                    calls += 1;
                }
                Row::Request(r) => {
                    insert_request(&mut request_stmt, r)?;
                    requests += 1;
                }
            }
        }
    }
    tx.commit()?;
    Ok([calls, requests, shadows])
}

fn insert_shadow(stmt: &mut rusqlite::CachedStatement<'_>, r: &ShadowRow) -> rusqlite::Result<()> {
    stmt.execute(params![
        &*r.request_id,
        clock::rfc3339_ms(r.started_ms),
        &*r.chain,
        &*r.served_model,
        &*r.shadow_model,
        r.success,
        r.error_type,
        r.latency_ms.map(ms),
        r.ttft_ms.map(ms),
        r.served_latency_ms.map(ms),
        r.length_ratio,
        r.json_valid,
        r.tool_calls_match,
        r.similarity,
        r.served_finish_reason,
        r.shadow_finish_reason,
        r.cost_usd,
    ])?;
    Ok(())
}

fn token_columns(t: Option<Tokens>) -> (Option<i64>, Option<i64>, Option<i64>) {
    let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    match t {
        Some(t) => (Some(n(t.input)), Some(n(t.cached_input)), Some(n(t.output))),
        None => (None, None, None),
    }
}

/// Milliseconds rounded to microseconds: enough for sub-millisecond upstreams.
fn ms(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

fn insert_call(stmt: &mut rusqlite::CachedStatement<'_>, c: &CallRow) -> rusqlite::Result<()> {
    let (input, cached, output) = token_columns(c.tokens);
    stmt.execute(params![
        clock::rfc3339_ms(c.started_ms),
        &*c.request_id,
        &*c.chain,
        &*c.model,
        &*c.provider,
        c.kind.as_str(),
        c.success,
        c.status,
        c.error_type,
        ms(c.latency_ms),
        c.ttft_ms.map(ms),
        input,
        cached,
        output,
        c.cost_usd,
        c.deadline_cut,
    ])?;
    Ok(())
}

fn insert_request(
    stmt: &mut rusqlite::CachedStatement<'_>,
    r: &RequestRow,
) -> rusqlite::Result<()> {
    let (input, cached, output) = token_columns(r.tokens);
    stmt.execute(params![
        &*r.request_id,
        clock::rfc3339_ms(r.arrived_ms),
        r.surface,
        r.chain.as_deref(),
        r.status,
        r.model.as_deref(),
        r.provider.as_deref(),
        r.attempts,
        r.fallbacks,
        r.cache,
        r.stream,
        ms(r.latency_ms),
        r.ttft_ms.map(ms),
        input,
        cached,
        output,
        r.cost_usd,
        r.primary_cost_usd,
        r.error_type,
    ])?;
    Ok(())
}
