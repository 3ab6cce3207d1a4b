//! The store's SQLite writer connection: multi-row inserts in one transaction per
//! batch, chunked retention, and the file's identity, so a file deleted or replaced
//! under the writer is noticed and created again.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::{params, Connection};

use super::{
    round_ms, schema, CallRow, RequestRow, Row, ShadowRow, StoreError, Tokens, RETENTION_CHUNK,
};
use crate::clock;

pub(super) struct SqliteWriter {
    path: PathBuf,
    conn: Connection,
    /// The identity of the file `conn` has open, to notice a delete or a swap.
    file_id: Option<(u64, u64)>,
}

impl SqliteWriter {
    pub(super) fn open(path: &Path) -> Result<SqliteWriter, StoreError> {
        let conn = schema::open(path)?;
        Ok(SqliteWriter {
            path: path.to_path_buf(),
            conn,
            file_id: file_id(path),
        })
    }

    /// The file was deleted or replaced: rows written to the open handle would vanish.
    pub(super) fn lost(&self) -> bool {
        file_id(&self.path) != self.file_id
    }

    pub(super) fn insert(&mut self, batch: &[Row]) -> Result<[u64; 3], StoreError> {
        Ok(insert(&mut self.conn, batch)?)
    }

    /// Deletes rows older than `cutoff_ms`, a chunk at a time, for at most `budget`;
    /// true when some are left for the next turn.
    pub(super) fn retention(
        &mut self,
        cutoff_ms: i64,
        budget: Duration,
    ) -> Result<bool, StoreError> {
        let cutoff = clock::rfc3339_ms(cutoff_ms);
        let started = Instant::now();
        let mut left = false;
        for table in ["model_calls", "requests", "shadow_results"] {
            let sql = format!(
                "DELETE FROM {table} WHERE id IN \
                 (SELECT id FROM {table} WHERE timestamp < ?1 LIMIT {RETENTION_CHUNK})"
            );
            loop {
                let n = self.conn.execute(&sql, [&cutoff])?;
                if n < RETENTION_CHUNK {
                    break;
                }
                // Each table gets its turn; what is left waits for the next one.
                if started.elapsed() >= budget {
                    left = true;
                    break;
                }
            }
        }
        // Kept responses carry their own expiry (`responses.ttl`).
        self.conn.execute(
            "DELETE FROM responses WHERE expires_ms < ?1",
            [clock::now_ms()],
        )?;
        Ok(left)
    }
}

/// Errors that leave the connection usable: a lock held by another process, a full disk.
pub(super) fn keeps_handle(e: &StoreError) -> bool {
    let StoreError::Sqlite(e) = e else {
        return false;
    };
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

/// `INSERT OR FAIL INTO table (columns) VALUES (?, ...), ...` for `rows` rows.
///
/// `OR FAIL`, not the default `ABORT`: a statement that writes many rows and may abort
/// makes SQLite keep a statement journal (a copy of every page it touches, spilled to a
/// temporary file), a fifth of the writer's time. A failed statement fails the whole
/// batch's transaction anyway, so undoing that one statement's rows gains nothing.
fn insert_sql(table: &str, columns: &str, rows: usize) -> String {
    let n = columns.split(',').count();
    let group = format!("({})", vec!["?"; n].join(", "));
    format!(
        "INSERT OR FAIL INTO {table} ({columns}) VALUES {}",
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
        r.latency_ms.map(round_ms),
        r.ttft_ms.map(round_ms),
        r.served_latency_ms.map(round_ms),
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
    stmt.raw_bind_parameter(at + 9, round_ms(c.latency_ms))?;
    stmt.raw_bind_parameter(at + 10, c.ttft_ms.map(round_ms))?;
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
    stmt.raw_bind_parameter(at + 11, round_ms(r.latency_ms))?;
    stmt.raw_bind_parameter(at + 12, r.ttft_ms.map(round_ms))?;
    stmt.raw_bind_parameter(at + 13, input)?;
    stmt.raw_bind_parameter(at + 14, cached)?;
    stmt.raw_bind_parameter(at + 15, output)?;
    stmt.raw_bind_parameter(at + 16, r.cost_usd)?;
    stmt.raw_bind_parameter(at + 17, r.primary_cost_usd)?;
    stmt.raw_bind_parameter(at + 18, r.error_type)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::name::Name;
    use crate::store::CallKind;

    fn call(model: &str, started_ms: i64) -> Row {
        Row::Call(CallRow {
            started_ms,
            request_id: "r".into(),
            chain: Name::new("c"),
            model: Name::new(model),
            provider: Name::new("p"),
            kind: CallKind::Primary,
            success: true,
            status: Some(200),
            error_type: None,
            latency_ms: 1.0,
            ttft_ms: None,
            tokens: None,
            cost_usd: 0.0,
            deadline_cut: false,
        })
    }

    /// `OR FAIL` keeps the rows a failed statement wrote before the failure: the
    /// batch's transaction must still take all of them back, so a batch is written
    /// whole or not at all (and counted as dropped by the writer).
    #[test]
    fn a_row_that_fails_fails_its_whole_batch() {
        let dir = std::env::temp_dir().join(format!("cascade-sqlite-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.db");
        let _ = std::fs::remove_file(&path);
        let mut w = SqliteWriter::open(&path).unwrap();
        w.conn
            .execute_batch(
                "CREATE TRIGGER refuse BEFORE INSERT ON model_calls WHEN NEW.model_name = 'bad'
                 BEGIN SELECT RAISE(FAIL, 'refused'); END",
            )
            .unwrap();
        // The bad row is in the middle of the second 32-row statement.
        let mut batch: Vec<Row> = (0..70).map(|i| call("ok", i)).collect();
        batch[40] = call("bad", 40);
        assert!(w.insert(&batch).is_err());
        let count = |w: &SqliteWriter| -> i64 {
            w.conn
                .query_row("SELECT COUNT(*) FROM model_calls", [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(count(&w), 0);
        // The connection goes on: the next batch is written whole.
        batch[40] = call("ok", 40);
        assert_eq!(w.insert(&batch).unwrap(), [70, 0, 0]);
        assert_eq!(count(&w), 70);
        std::fs::remove_dir_all(&dir).ok();
    }
}
