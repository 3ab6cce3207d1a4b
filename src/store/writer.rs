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
        // Kept responses carry their own expiry (`responses.ttl`).
        if failed.is_none() {
            match conn.execute(
                "DELETE FROM responses WHERE expires_ms < ?1",
                [clock::now_ms()],
            ) {
                Ok(_) => {}
                Err(e) => failed = Some(e.to_string()),
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

/// Rows per INSERT statement: one statement for many rows costs SQLite far less than
/// one each (parse-free, but each step and reset has its price).
const ROWS_PER_INSERT: usize = 32;

const CALL_COLUMNS: &str = "timestamp, request_id, chain, model_name, provider, kind, success, \
     status, error_type, latency_ms, ttft_ms, input_tokens, cached_input_tokens, output_tokens, \
     cost_usd, deadline_cut";
const REQUEST_COLUMNS: &str = "request_id, timestamp, surface, chain, status, model_name, \
     provider, attempts, fallbacks, cache, stream, latency_ms, ttft_ms, input_tokens, \
     cached_input_tokens, output_tokens, cost_usd, primary_cost_usd, error_type";

/// `INSERT INTO table (columns) VALUES (?, ...), ...` for `rows` rows.
fn insert_sql(table: &str, columns: &str, rows: usize) -> String {
    let n = columns.split(',').count();
    let group = format!("({})", vec!["?"; n].join(", "));
    format!(
        "INSERT INTO {table} ({columns}) VALUES {}",
        vec![group; rows].join(", ")
    )
}

/// Inserts `rows` of one table, `ROWS_PER_INSERT` to a statement; `bind` binds one
/// row's values from the given parameter index on.
fn insert_many<T>(
    tx: &rusqlite::Transaction<'_>,
    table: &str,
    columns: &str,
    rows: &[&T],
    bind: fn(&mut rusqlite::CachedStatement<'_>, usize, &T) -> rusqlite::Result<()>,
) -> rusqlite::Result<()> {
    let n = columns.split(',').count();
    for chunk in rows.chunks(ROWS_PER_INSERT) {
        let mut stmt = tx.prepare_cached(&insert_sql(table, columns, chunk.len()))?;
        for (i, row) in chunk.iter().enumerate() {
            bind(&mut stmt, i * n + 1, row)?;
        }
        stmt.raw_execute()?;
    }
    Ok(())
}

/// Inserts a batch in one transaction; the counts of call, request and shadow rows.
fn insert(conn: &mut Connection, batch: &[Row]) -> rusqlite::Result<[u64; 3]> {
    conn.set_prepared_statement_cache_capacity(2 * ROWS_PER_INSERT + 8);
    let tx = conn.transaction()?;
    let (mut calls, mut requests) = (Vec::new(), Vec::new());
    let mut shadows = 0;
    {
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
                Row::Call(c) => calls.push(c),
                Row::Request(r) => requests.push(r),
                Row::Response(r) => {
                    tx.prepare_cached(
                        "INSERT OR REPLACE INTO responses (tenant, id, created_at, expires_ms, response, items)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    )?
                    .execute(params![
                        r.tenant,
                        r.id,
                        clock::rfc3339_ms(r.created_ms),
                        r.expires_ms,
                        &r.response[..],
                        &r.items[..],
                    ])?;
                }
                Row::ForgetResponse { tenant, id } => {
                    tx.prepare_cached("DELETE FROM responses WHERE tenant = ?1 AND id = ?2")?
                        .execute(params![tenant, id])?;
                }
            }
        }
    }
    insert_many(&tx, "model_calls", CALL_COLUMNS, &calls, bind_call)?;
    insert_many(&tx, "requests", REQUEST_COLUMNS, &requests, bind_request)?;
    tx.commit()?;
    Ok([calls.len() as u64, requests.len() as u64, shadows])
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

fn bind_call(
    stmt: &mut rusqlite::CachedStatement<'_>,
    at: usize,
    c: &CallRow,
) -> rusqlite::Result<()> {
    let (input, cached, output) = token_columns(c.tokens);
    stmt.raw_bind_parameter(at, clock::rfc3339_ms(c.started_ms))?;
    stmt.raw_bind_parameter(at + 1, &*c.request_id)?;
    stmt.raw_bind_parameter(at + 2, &*c.chain)?;
    stmt.raw_bind_parameter(at + 3, &*c.model)?;
    stmt.raw_bind_parameter(at + 4, &*c.provider)?;
    stmt.raw_bind_parameter(at + 5, c.kind.as_str())?;
    stmt.raw_bind_parameter(at + 6, c.success)?;
    stmt.raw_bind_parameter(at + 7, c.status)?;
    stmt.raw_bind_parameter(at + 8, c.error_type)?;
    stmt.raw_bind_parameter(at + 9, ms(c.latency_ms))?;
    stmt.raw_bind_parameter(at + 10, c.ttft_ms.map(ms))?;
    stmt.raw_bind_parameter(at + 11, input)?;
    stmt.raw_bind_parameter(at + 12, cached)?;
    stmt.raw_bind_parameter(at + 13, output)?;
    stmt.raw_bind_parameter(at + 14, c.cost_usd)?;
    stmt.raw_bind_parameter(at + 15, c.deadline_cut)
}

fn bind_request(
    stmt: &mut rusqlite::CachedStatement<'_>,
    at: usize,
    r: &RequestRow,
) -> rusqlite::Result<()> {
    let (input, cached, output) = token_columns(r.tokens);
    stmt.raw_bind_parameter(at, &*r.request_id)?;
    stmt.raw_bind_parameter(at + 1, clock::rfc3339_ms(r.arrived_ms))?;
    stmt.raw_bind_parameter(at + 2, r.surface)?;
    stmt.raw_bind_parameter(at + 3, r.chain.as_deref())?;
    stmt.raw_bind_parameter(at + 4, r.status)?;
    stmt.raw_bind_parameter(at + 5, r.model.as_deref())?;
    stmt.raw_bind_parameter(at + 6, r.provider.as_deref())?;
    stmt.raw_bind_parameter(at + 7, r.attempts)?;
    stmt.raw_bind_parameter(at + 8, r.fallbacks)?;
    stmt.raw_bind_parameter(at + 9, r.cache)?;
    stmt.raw_bind_parameter(at + 10, r.stream)?;
    stmt.raw_bind_parameter(at + 11, ms(r.latency_ms))?;
    stmt.raw_bind_parameter(at + 12, r.ttft_ms.map(ms))?;
    stmt.raw_bind_parameter(at + 13, input)?;
    stmt.raw_bind_parameter(at + 14, cached)?;
    stmt.raw_bind_parameter(at + 15, output)?;
    stmt.raw_bind_parameter(at + 16, r.cost_usd)?;
    stmt.raw_bind_parameter(at + 17, r.primary_cost_usd)?;
    stmt.raw_bind_parameter(at + 18, r.error_type)
}
