//! The store's one writer: a thread that takes rows off the queue and commits them in
//! batches, one transaction per batch, at least every `flush_interval`.
//!
//! Faults end in counted drops, never in a blocked caller: a batch that fails to
//! commit (disk full, locked by another process, a database that went away) is
//! dropped and counted, the error is logged at most once a minute, and the store is
//! reopened on the next batch (at most once a second). A SQLite file deleted or
//! replaced under it, or a PostgreSQL connection that closed, is noticed before each
//! commit. Retention runs at start and then hourly.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::IntCounter;

use super::postgres::PgWriter;
use super::sqlite::{self, SqliteWriter};
use super::{Backend, Msg, Queued, Row, StoreError, StoreMetrics, StoreSettings};
use crate::clock;

/// A writing connection to either store.
pub(super) enum Conn {
    Sqlite(SqliteWriter),
    Postgres(PgWriter),
}

impl Conn {
    pub(super) fn open(backend: &Backend) -> Result<Conn, StoreError> {
        match backend {
            Backend::Sqlite(path) => SqliteWriter::open(path).map(Conn::Sqlite),
            Backend::Postgres(url) => url.open_writer().map(Conn::Postgres),
        }
    }

    /// Why the connection can no longer be written to, if it can't.
    fn lost(&self) -> Option<&'static str> {
        match self {
            Conn::Sqlite(c) => c
                .lost()
                .then_some("the store file was deleted or replaced; creating it again"),
            Conn::Postgres(c) => c
                .lost()
                .then_some("the connection to PostgreSQL closed; connecting again"),
        }
    }

    /// Commits `batch` and empties it (keeping its memory).
    fn insert(&mut self, batch: &mut Vec<Row>) -> Result<[u64; 3], StoreError> {
        let result = match self {
            Conn::Sqlite(c) => c.insert(batch),
            Conn::Postgres(c) => c.insert(batch),
        };
        batch.clear();
        result
    }

    fn retention(&mut self, cutoff_ms: i64, budget: Duration) -> Result<bool, StoreError> {
        match self {
            Conn::Sqlite(c) => c.retention(cutoff_ms, budget),
            Conn::Postgres(c) => c.retention(cutoff_ms, budget),
        }
    }

    /// An error after which the same connection can go on.
    fn keeps_handle(&self, e: &StoreError) -> bool {
        match self {
            Conn::Sqlite(_) => sqlite::keeps_handle(e),
            // A statement that failed leaves a live connection usable; a closed one is
            // seen by `lost`.
            Conn::Postgres(c) => !c.lost(),
        }
    }
}

/// Rows per transaction at most: large enough that commits are rare under load, small
/// enough that a failed one loses little.
const BATCH: usize = 4096;
/// How often the writer looks at its queue (at most; `flush_interval` if shorter).
const TICK: Duration = Duration::from_millis(10);
const RETENTION_EVERY: Duration = Duration::from_secs(3600);
const ERROR_LOG_EVERY: Duration = Duration::from_secs(60);
/// Retention deletes for at most this long per turn of the writer's loop, so a large
/// backlog of old rows never stalls the queue.
const RETENTION_BUDGET: Duration = Duration::from_millis(50);
/// How often a store that could not be opened is tried again.
const REOPEN_EVERY: Duration = Duration::from_secs(1);

/// Rows the writer holds: the batch being filled, and buffers reused each turn.
struct Pending {
    batch: Vec<Row>,
    /// The lanes' rows, taken in one go.
    taken: Vec<Row>,
    /// An empty buffer swapped into each lane.
    spare: Vec<Row>,
    last_commit: Instant,
}

pub(super) struct Writer {
    settings: StoreSettings,
    metrics: StoreMetrics,
    calls_written: IntCounter,
    requests_written: IntCounter,
    shadows_written: IntCounter,
    conn: Option<Conn>,
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
    /// `conn` is `None` when the store could not be reached at start (PostgreSQL): the
    /// writer keeps trying, and drops and counts rows until it answers.
    pub(super) fn new(settings: StoreSettings, metrics: StoreMetrics, conn: Option<Conn>) -> Self {
        Writer {
            calls_written: metrics.rows.with_label_values(&["model_calls"]),
            requests_written: metrics.rows.with_label_values(&["requests"]),
            shadows_written: metrics.rows.with_label_values(&["shadow_results"]),
            settings,
            metrics,
            last_reopen: conn.is_none().then(Instant::now),
            conn,
            last_retention: None,
            retention_pending: false,
            last_error_log: None,
            dropped_unlogged: 0,
            failing: false,
        }
    }

    pub(super) fn run(mut self, rx: Receiver<Msg>, queued: Arc<Queued>) {
        self.start_retention();
        // At start, retention runs to the end before the first batch.
        while self.retention_pending {
            self.retention();
        }
        let mut p = Pending {
            batch: Vec::with_capacity(BATCH),
            taken: Vec::new(),
            spare: Vec::new(),
            last_commit: Instant::now(),
        };
        let tick = self.settings.flush_interval.min(TICK);
        loop {
            // Take what has queued since the last turn. The writer never blocks on the
            // queue: a receiver waiting in `recv` would make every row's send wake it
            // (a syscall and a context switch per row, taken from the request path's
            // cores); polling on a short tick costs one timer wake-up per tick instead.
            let mut closed = false;
            loop {
                match rx.try_recv() {
                    Ok(Msg::Row(row)) => {
                        queued.channel.fetch_sub(1, Ordering::Relaxed);
                        self.add(&mut p, row);
                    }
                    Ok(Msg::Flush(ack)) => {
                        // Everything recorded before the flush is in a lane by now.
                        self.take_lanes(&queued, &mut p);
                        if !p.batch.is_empty() {
                            self.commit(&mut p.batch);
                            p.last_commit = Instant::now();
                        }
                        self.metrics.queue_depth.set(queued.waiting() as i64);
                        let _ = ack.send(());
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                }
            }
            self.take_lanes(&queued, &mut p);
            if !p.batch.is_empty()
                && (closed || p.last_commit.elapsed() >= self.settings.flush_interval)
            {
                self.commit(&mut p.batch);
                p.last_commit = Instant::now();
            }
            self.metrics
                .queue_depth
                .set((p.batch.len() + queued.waiting()) as i64);
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

    /// Moves the lanes' rows into the batch, committing each full one.
    fn take_lanes(&mut self, queued: &Queued, p: &mut Pending) {
        queued.lanes.take(&mut p.taken, &mut p.spare);
        let mut taken = std::mem::take(&mut p.taken);
        for row in taken.drain(..) {
            self.add(p, row);
        }
        p.taken = taken;
    }

    fn add(&mut self, p: &mut Pending, row: Row) {
        p.batch.push(row);
        if p.batch.len() >= BATCH {
            self.commit(&mut p.batch);
            p.last_commit = Instant::now();
        }
    }

    fn commit(&mut self, batch: &mut Vec<Row>) {
        // What waits, as the commit starts (a stalled one may take a while).
        self.metrics.queue_depth.set(batch.len() as i64);
        self.check_file();
        let Some(conn) = self.connection() else {
            self.drop_rows(batch.len() as u64, "the store is not open");
            batch.clear();
            return;
        };
        let started = Instant::now();
        let n = batch.len() as u64;
        match conn.insert(batch) {
            Ok([calls, requests, shadows]) => {
                self.calls_written.inc_by(calls);
                self.requests_written.inc_by(requests);
                self.shadows_written.inc_by(shadows);
                self.metrics
                    .flush_seconds
                    .observe(started.elapsed().as_secs_f64());
                if std::mem::take(&mut self.failing) {
                    tracing::warn!(store = %self.settings.backend, "store: writing again");
                }
            }
            Err(e) => {
                // A lock held elsewhere or a full disk passes with the same handle;
                // anything else may be a broken one.
                if !conn.keeps_handle(&e) {
                    self.conn = None;
                }
                self.failing = true;
                self.drop_rows(n, &e.to_string());
            }
        }
        batch.clear();
    }

    /// The open connection, reopening the file if it was lost (at most once a second).
    fn connection(&mut self) -> Option<&mut Conn> {
        if self.conn.is_none() && self.last_reopen.is_none_or(|t| t.elapsed() >= REOPEN_EVERY) {
            self.last_reopen = Some(Instant::now());
            match Conn::open(&self.settings.backend) {
                Ok(c) => self.conn = Some(c),
                Err(e) => self.log_error(&format!("cannot open the store: {e}")),
            }
        }
        self.conn.as_mut()
    }

    /// A file deleted or replaced under the open connection would swallow every row
    /// written to it, and a closed connection fails every one: notice it before
    /// writing, and open the store again.
    fn check_file(&mut self) {
        if let Some(why) = self.conn.as_ref().and_then(Conn::lost) {
            self.log_error(why);
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
                store = %self.settings.backend,
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
        let Some(conn) = self.connection() else {
            self.retention_pending = false;
            return;
        };
        match conn.retention(cutoff_ms, RETENTION_BUDGET) {
            Ok(left) => self.retention_pending = left,
            Err(e) => {
                self.retention_pending = false;
                self.log_error(&format!("retention: {e}"));
            }
        }
    }
}
