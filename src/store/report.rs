//! The fallback-cost report: requests, success and fallback rates, latency and what
//! fallbacks cost, grouped by chain, day or model, over a window of the store.
//!
//! One query per report reads the window through the time index; grouping and
//! percentiles are computed here, in one pass, the same way for both stores (a SQLite
//! file is read in parallel slices; PostgreSQL streams its rows). The same JSON value feeds `cascade
//! report` (table, JSON, CSV), `GET /admin/report` and the scheduled Markdown file.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use std::path::Path;

use rusqlite::Connection;
use serde_json::{json, Map, Value};

use super::{Backend, PgUrl, StoreError};
use crate::clock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Chain,
    Model,
    Day,
    /// Shadow calls, by chain, served model and shadow model.
    Shadow,
}

impl GroupBy {
    pub fn parse(s: &str) -> Result<GroupBy, String> {
        match s {
            "chain" => Ok(GroupBy::Chain),
            "model" => Ok(GroupBy::Model),
            "day" => Ok(GroupBy::Day),
            "shadow" => Ok(GroupBy::Shadow),
            other => Err(format!(
                "unknown grouping {other:?} (expected chain, model, day or shadow)"
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            GroupBy::Chain => "chain",
            GroupBy::Model => "model",
            GroupBy::Day => "day",
            GroupBy::Shadow => "shadow",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReportQuery {
    pub since_ms: i64,
    pub until_ms: i64,
    pub by: GroupBy,
    /// `health.degraded_below` and `health.min_calls`, for the model report's `degraded`.
    pub degraded_below: f64,
    pub min_calls: u64,
}

/// The report as JSON: `{"since", "until", "by", "rows": [...], "totals": {...}}`.
/// Reads the store read-only (gateways may be writing to it). Blocks: call it off
/// the request path.
pub fn run(backend: &Backend, q: &ReportQuery) -> Result<Value, StoreError> {
    let (rows, totals) = match q.by {
        GroupBy::Chain | GroupBy::Day => request_report(backend, q)?,
        GroupBy::Model => model_report(backend, q)?,
        GroupBy::Shadow => shadow_report(backend, q)?,
    };
    Ok(json!({
        "since": clock::rfc3339_s(q.since_ms),
        "until": clock::rfc3339_s(q.until_ms),
        "by": q.by.as_str(),
        "rows": rows,
        "totals": totals,
    }))
}

/// Reading rows is the cost of a report (a few hundred nanoseconds each in SQLite), so
/// the window is cut into equal slices of time, each read on its own thread with its
/// own connection, and the partial groups are merged.
fn slices(q: &ReportQuery) -> Vec<(String, String)> {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get().min(4)) as i64;
    let span = (q.until_ms - q.since_ms).max(1);
    (0..n)
        .map(|i| {
            let from = q.since_ms + span * i / n;
            let to = if i + 1 == n {
                q.until_ms
            } else {
                q.since_ms + span * (i + 1) / n
            };
            (clock::rfc3339_ms(from), clock::rfc3339_ms(to))
        })
        .collect()
}

/// Runs `scan` over every slice in parallel and merges what they found.
fn scan_slices<G, F>(path: &Path, q: &ReportQuery, scan: F) -> rusqlite::Result<G>
where
    F: Fn(&Connection, &str, &str) -> rusqlite::Result<G> + Sync,
    G: Merge + Default + Send,
{
    let parts: Vec<rusqlite::Result<G>> = std::thread::scope(|s| {
        let handles: Vec<_> = slices(q)
            .into_iter()
            .map(|(from, to)| {
                let scan = &scan;
                s.spawn(move || {
                    let conn = super::open_read_only(path)?;
                    scan(&conn, &from, &to)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(rusqlite::Error::InvalidParameterName(
                        "a report thread failed".into(),
                    ))
                })
            })
            .collect()
    });
    let mut out = G::default();
    for part in parts {
        out.merge(part?);
    }
    Ok(out)
}

trait Merge {
    fn merge(&mut self, other: Self);
}

impl<K: Ord, V: Merge + Default> Merge for BTreeMap<K, V> {
    fn merge(&mut self, other: Self) {
        for (k, v) in other {
            self.entry(k).or_default().merge(v);
        }
    }
}

impl<A: Merge, B: Merge> Merge for (A, B) {
    fn merge(&mut self, other: Self) {
        self.0.merge(other.0);
        self.1.merge(other.1);
    }
}

/// Finds the slot of a group by its key, borrowing the key from the row (no
/// allocation per row: there are few distinct keys).
fn slot<'a, G: Default>(groups: &'a mut Vec<(Option<String>, G)>, key: Option<&str>) -> &'a mut G {
    let i = match groups.iter().position(|(k, _)| k.as_deref() == key) {
        Some(i) => i,
        None => {
            groups.push((key.map(str::to_string), G::default()));
            groups.len() - 1
        }
    };
    &mut groups[i].1
}

fn text(v: rusqlite::types::ValueRef<'_>) -> Option<&str> {
    match v {
        rusqlite::types::ValueRef::Text(t) => std::str::from_utf8(t).ok(),
        _ => None,
    }
}

/// Latencies of one group, for nearest-rank percentiles.
#[derive(Default)]
struct Latencies(Vec<f64>);

impl Merge for Latencies {
    fn merge(&mut self, other: Self) {
        self.0.extend(other.0);
    }
}

impl Latencies {
    fn percentile(&mut self, p: f64) -> Option<f64> {
        if self.0.is_empty() {
            return None;
        }
        self.0.sort_unstable_by(f64::total_cmp);
        let rank = ((p * self.0.len() as f64).ceil() as usize).clamp(1, self.0.len());
        Some(self.0[rank - 1])
    }
}

#[derive(Default)]
struct RequestGroup {
    requests: u64,
    /// Requests that count for the success rate: all but clients that left.
    judged: u64,
    succeeded: u64,
    via_fallback: u64,
    latencies: Latencies,
    input_tokens: u64,
    output_tokens: u64,
    cost: f64,
    primary_cost: f64,
}

impl Merge for RequestGroup {
    fn merge(&mut self, o: Self) {
        self.requests += o.requests;
        self.judged += o.judged;
        self.succeeded += o.succeeded;
        self.via_fallback += o.via_fallback;
        self.latencies.merge(o.latencies);
        self.input_tokens += o.input_tokens;
        self.output_tokens += o.output_tokens;
        self.cost += o.cost;
        self.primary_cost += o.primary_cost;
    }
}

impl RequestGroup {
    fn add(&mut self, r: &RequestFields<'_>) {
        self.requests += 1;
        let ok = r.error_type.is_none() && r.status < 400;
        if r.error_type != Some("cancelled") {
            self.judged += 1;
        }
        if ok {
            self.succeeded += 1;
            if r.fallbacks > 0 {
                self.via_fallback += 1;
            }
        }
        self.latencies.0.push(r.latency_ms);
        self.input_tokens += r.input_tokens;
        self.output_tokens += r.output_tokens;
        self.cost += r.cost;
        self.primary_cost += r.primary_cost;
    }

    fn columns(&mut self, key: (&str, Value)) -> Value {
        let mut m = Map::new();
        m.insert(key.0.into(), key.1);
        m.insert("requests".into(), json!(self.requests));
        m.insert("success_rate".into(), rate(self.succeeded, self.judged));
        m.insert(
            "fallback_rate".into(),
            rate(self.via_fallback, self.requests),
        );
        m.insert(
            "p50_ms".into(),
            json!(self.latencies.percentile(0.50).map(round3)),
        );
        m.insert(
            "p95_ms".into(),
            json!(self.latencies.percentile(0.95).map(round3)),
        );
        m.insert("input_tokens".into(), json!(self.input_tokens));
        m.insert("output_tokens".into(), json!(self.output_tokens));
        m.insert("cost_usd".into(), json!(usd(self.cost)));
        m.insert("primary_cost_usd".into(), json!(usd(self.primary_cost)));
        m.insert(
            "fallback_cost_delta_usd".into(),
            json!(usd(self.cost - self.primary_cost)),
        );
        Value::Object(m)
    }
}

struct RequestFields<'a> {
    status: i64,
    error_type: Option<&'a str>,
    fallbacks: i64,
    latency_ms: f64,
    input_tokens: u64,
    output_tokens: u64,
    cost: f64,
    primary_cost: f64,
}

impl RequestFields<'_> {
    fn from_pg(row: &tokio_postgres::Row) -> Result<RequestFields<'_>, tokio_postgres::Error> {
        Ok(RequestFields {
            status: i64::from(row.try_get::<_, i32>(1)?),
            error_type: row.try_get(2)?,
            fallbacks: i64::from(row.try_get::<_, i32>(3)?),
            latency_ms: row.try_get(4)?,
            input_tokens: count(row.try_get(5)?),
            output_tokens: count(row.try_get(6)?),
            cost: row.try_get(7)?,
            primary_cost: row.try_get(8)?,
        })
    }
}

fn count(v: Option<i64>) -> u64 {
    v.unwrap_or(0).max(0) as u64
}

type Groups<G> = Vec<(Option<String>, G)>;

fn pg_request_row(
    groups: &mut Groups<RequestGroup>,
    row: &tokio_postgres::Row,
) -> Result<(), tokio_postgres::Error> {
    let f = RequestFields::from_pg(row)?;
    slot(groups, row.try_get(0)?).add(&f);
    Ok(())
}

/// The requests in `[since, until)`, grouped by the key `sqlite_key` (SQLite) or
/// `pg_sql`'s first column.
fn request_groups(
    backend: &Backend,
    q: &ReportQuery,
) -> Result<BTreeMap<Option<String>, RequestGroup>, StoreError> {
    const COLUMNS: &str = "status, error_type, fallbacks, latency_ms, input_tokens, \
        output_tokens, cost_usd, primary_cost_usd FROM requests";
    let path = match backend {
        Backend::Sqlite(path) => path,
        Backend::Postgres(url) => {
            let sql: &'static str = match q.by {
                GroupBy::Day => {
                    "SELECT to_char(timestamp AT TIME ZONE 'UTC', 'YYYY-MM-DD'), \
                    status, error_type, fallbacks, latency_ms, input_tokens, output_tokens, \
                    cost_usd, primary_cost_usd FROM requests \
                    WHERE timestamp >= $1 AND timestamp < $2"
                }
                _ => {
                    "SELECT chain, status, error_type, fallbacks, latency_ms, input_tokens, \
                    output_tokens, cost_usd, primary_cost_usd FROM requests \
                    WHERE timestamp >= $1 AND timestamp < $2"
                }
            };
            let groups = url.scan(sql, q.since_ms, q.until_ms, Vec::new(), pg_request_row)?;
            return Ok(groups.into_iter().collect());
        }
    };
    let key_sql = match q.by {
        GroupBy::Day => "substr(timestamp, 1, 10)",
        _ => "chain",
    };
    let sql = format!("SELECT {key_sql}, {COLUMNS} WHERE timestamp >= ?1 AND timestamp < ?2");
    Ok(scan_slices(path, q, |conn, from, to| {
        let mut stmt = conn.prepare(&sql)?;
        let mut groups: Groups<RequestGroup> = Vec::new();
        let mut rows = stmt.query([from, to])?;
        while let Some(row) = rows.next()? {
            let f = RequestFields {
                status: row.get(1)?,
                error_type: text(row.get_ref(2)?),
                fallbacks: row.get(3)?,
                latency_ms: row.get(4)?,
                input_tokens: count(row.get(5)?),
                output_tokens: count(row.get(6)?),
                cost: row.get(7)?,
                primary_cost: row.get(8)?,
            };
            slot(&mut groups, text(row.get_ref(0)?)).add(&f);
        }
        Ok(groups.into_iter().collect())
    })?)
}

fn request_report(backend: &Backend, q: &ReportQuery) -> Result<(Vec<Value>, Value), StoreError> {
    let groups = request_groups(backend, q)?;
    let mut total = RequestGroup::default();
    let name = q.by.as_str();
    let mut out = Vec::with_capacity(groups.len());
    for (k, mut g) in groups {
        out.push(g.columns((name, json!(k))));
        total.merge(g);
    }
    Ok((out, total.columns((name, json!("total")))))
}

#[derive(Default)]
struct ModelGroup {
    calls: u64,
    judged: u64,
    succeeded: u64,
    latency_sum: f64,
    latencies: Latencies,
    cost: f64,
    errors: BTreeMap<String, u64>,
    served_as_fallback: u64,
}

impl Merge for ModelGroup {
    fn merge(&mut self, o: Self) {
        self.calls += o.calls;
        self.judged += o.judged;
        self.succeeded += o.succeeded;
        self.latency_sum += o.latency_sum;
        self.latencies.merge(o.latencies);
        self.cost += o.cost;
        for (k, v) in o.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.served_as_fallback += o.served_as_fallback;
    }
}

impl ModelGroup {
    fn add(&mut self, success: bool, error_type: Option<&str>, latency_ms: f64, cost: f64) {
        self.calls += 1;
        if error_type != Some("cancelled") {
            self.judged += 1;
        }
        if success {
            self.succeeded += 1;
        }
        self.latency_sum += latency_ms;
        self.latencies.0.push(latency_ms);
        self.cost += cost;
        if let Some(e) = error_type {
            match self.errors.get_mut(e) {
                Some(n) => *n += 1,
                None => {
                    self.errors.insert(e.to_string(), 1);
                }
            }
        }
    }

    fn columns(&mut self, key: Value, degraded: Option<bool>) -> Value {
        let mut m = Map::new();
        m.insert("model".into(), key);
        m.insert("calls".into(), json!(self.calls));
        m.insert("success_rate".into(), rate(self.succeeded, self.judged));
        m.insert(
            "avg_latency_ms".into(),
            json!((self.calls > 0).then(|| round3(self.latency_sum / self.calls as f64))),
        );
        m.insert(
            "p50_ms".into(),
            json!(self.latencies.percentile(0.50).map(round3)),
        );
        m.insert(
            "p95_ms".into(),
            json!(self.latencies.percentile(0.95).map(round3)),
        );
        m.insert("degraded".into(), json!(degraded));
        m.insert("served_as_fallback".into(), json!(self.served_as_fallback));
        m.insert("cost_usd".into(), json!(usd(self.cost)));
        m.insert("errors".into(), json!(&self.errors));
        Value::Object(m)
    }
}

/// Counts of requests answered from a position other than the chain's first.
#[derive(Default)]
struct Count(u64);

impl Merge for Count {
    fn merge(&mut self, o: Self) {
        self.0 += o.0;
    }
}

type ModelPart = (BTreeMap<String, ModelGroup>, BTreeMap<String, Count>);

const MODEL_CALLS_SQL: &str = "SELECT model_name, success, error_type, latency_ms, cost_usd
     FROM model_calls WHERE timestamp >= ?1 AND timestamp < ?2";
/// Requests answered by a fallback, per model (cache hits are nobody's fallback).
const SERVED_SQL: &str = "SELECT model_name, COUNT(*) FROM requests
     WHERE timestamp >= ?1 AND timestamp < ?2 AND fallbacks > 0
       AND model_name IS NOT NULL AND error_type IS NULL AND cache NOT IN ('hit', 'stale')
     GROUP BY model_name";

fn model_parts(backend: &Backend, q: &ReportQuery) -> Result<ModelPart, StoreError> {
    let path = match backend {
        Backend::Sqlite(path) => path,
        Backend::Postgres(url) => return pg_model_parts(url, q),
    };
    Ok(scan_slices(path, q, |conn, from, to| {
        let mut stmt = conn.prepare_cached(MODEL_CALLS_SQL)?;
        let mut groups: Groups<ModelGroup> = Vec::new();
        let mut rows = stmt.query([from, to])?;
        while let Some(row) = rows.next()? {
            let success: bool = row.get(1)?;
            let latency: f64 = row.get(3)?;
            let cost: f64 = row.get(4)?;
            slot(&mut groups, text(row.get_ref(0)?)).add(
                success,
                text(row.get_ref(2)?),
                latency,
                cost,
            );
        }
        let mut stmt = conn.prepare_cached(SERVED_SQL)?;
        let mut served = BTreeMap::new();
        let mut rows = stmt.query([from, to])?;
        while let Some(row) = rows.next()? {
            let model: String = row.get(0)?;
            let n: i64 = row.get(1)?;
            served.insert(model, Count(n.max(0) as u64));
        }
        let groups = groups
            .into_iter()
            .map(|(k, g)| (k.unwrap_or_default(), g))
            .collect();
        Ok((groups, served))
    })?)
}

/// The same queries as SQLite's, in PostgreSQL's placeholders.
fn pg_model_parts(url: &PgUrl, q: &ReportQuery) -> Result<ModelPart, StoreError> {
    static CALLS: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    static SERVED: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let pg_sql = |s: &str| s.replace("?1", "$1").replace("?2", "$2");
    let calls: &'static str = CALLS.get_or_init(|| pg_sql(MODEL_CALLS_SQL));
    let served: &'static str = SERVED.get_or_init(|| pg_sql(SERVED_SQL));
    let groups = url.scan(
        calls,
        q.since_ms,
        q.until_ms,
        Vec::new(),
        |groups: &mut Groups<ModelGroup>, row| {
            slot(groups, row.try_get(0)?).add(
                row.try_get::<_, i32>(1)? != 0,
                row.try_get(2)?,
                row.try_get(3)?,
                row.try_get(4)?,
            );
            Ok(())
        },
    )?;
    let served = url.scan(served, q.since_ms, q.until_ms, BTreeMap::new(), |m, row| {
        let n: i64 = row.try_get(1)?;
        m.insert(row.try_get(0)?, Count(n.max(0) as u64));
        Ok(())
    })?;
    let groups: Groups<ModelGroup> = groups;
    Ok((
        groups
            .into_iter()
            .map(|(k, g)| (k.unwrap_or_default(), g))
            .collect(),
        served,
    ))
}

fn model_report(backend: &Backend, q: &ReportQuery) -> Result<(Vec<Value>, Value), StoreError> {
    let (mut groups, served) = model_parts(backend, q)?;
    for (model, n) in served {
        groups.entry(model).or_default().served_as_fallback += n.0;
    }
    let mut total = ModelGroup::default();
    let mut out = Vec::with_capacity(groups.len());
    for (k, mut g) in groups {
        let degraded =
            g.judged >= q.min_calls && (g.succeeded as f64) < q.degraded_below * g.judged as f64;
        out.push(g.columns(json!(k), Some(degraded)));
        total.merge(g);
    }
    Ok((out, total.columns(json!("total"), None)))
}

/// One (chain, served model, shadow model) group of shadow results.
#[derive(Default)]
struct ShadowGroup {
    calls: u64,
    judged: u64,
    succeeded: u64,
    latencies: Latencies,
    served_latencies: Latencies,
    similarity_sum: f64,
    similarity_n: u64,
    json_checked: u64,
    json_valid: u64,
    tools_checked: u64,
    tools_matched: u64,
    cost: f64,
}

impl Merge for ShadowGroup {
    fn merge(&mut self, o: Self) {
        self.calls += o.calls;
        self.judged += o.judged;
        self.succeeded += o.succeeded;
        self.latencies.merge(o.latencies);
        self.served_latencies.merge(o.served_latencies);
        self.similarity_sum += o.similarity_sum;
        self.similarity_n += o.similarity_n;
        self.json_checked += o.json_checked;
        self.json_valid += o.json_valid;
        self.tools_checked += o.tools_checked;
        self.tools_matched += o.tools_matched;
        self.cost += o.cost;
    }
}

impl ShadowGroup {
    fn columns(&mut self, key: [Value; 3]) -> Value {
        let [chain, served, shadow] = key;
        let mut m = Map::new();
        m.insert("chain".into(), chain);
        m.insert("served_model".into(), served);
        m.insert("shadow_model".into(), shadow);
        m.insert("calls".into(), json!(self.calls));
        m.insert("success_rate".into(), rate(self.succeeded, self.judged));
        m.insert(
            "p50_ms".into(),
            json!(self.latencies.percentile(0.50).map(round3)),
        );
        m.insert(
            "p95_ms".into(),
            json!(self.latencies.percentile(0.95).map(round3)),
        );
        m.insert(
            "served_p50_ms".into(),
            json!(self.served_latencies.percentile(0.50).map(round3)),
        );
        m.insert(
            "served_p95_ms".into(),
            json!(self.served_latencies.percentile(0.95).map(round3)),
        );
        m.insert(
            "avg_similarity".into(),
            json!((self.similarity_n > 0)
                .then(|| round4(self.similarity_sum / self.similarity_n as f64))),
        );
        m.insert(
            "json_valid_rate".into(),
            rate(self.json_valid, self.json_checked),
        );
        m.insert(
            "tool_calls_match_rate".into(),
            rate(self.tools_matched, self.tools_checked),
        );
        m.insert("cost_usd".into(), json!(usd(self.cost)));
        Value::Object(m)
    }
}

type ShadowKey = (Option<String>, Option<String>, Option<String>);

/// One `shadow_results` row, as the report reads it.
struct ShadowFields {
    success: bool,
    cancelled: bool,
    latency_ms: Option<f64>,
    served_latency_ms: Option<f64>,
    similarity: Option<f64>,
    json_valid: Option<bool>,
    tool_calls_match: Option<bool>,
    cost: f64,
}

impl ShadowGroup {
    fn add(&mut self, f: ShadowFields) {
        self.calls += 1;
        if !f.cancelled {
            self.judged += 1;
        }
        if f.success {
            self.succeeded += 1;
        }
        if let Some(l) = f.latency_ms {
            self.latencies.0.push(l);
        }
        if let Some(l) = f.served_latency_ms {
            self.served_latencies.0.push(l);
        }
        if let Some(s) = f.similarity {
            self.similarity_sum += s;
            self.similarity_n += 1;
        }
        if let Some(v) = f.json_valid {
            self.json_checked += 1;
            self.json_valid += u64::from(v);
        }
        if let Some(v) = f.tool_calls_match {
            self.tools_checked += 1;
            self.tools_matched += u64::from(v);
        }
        self.cost += f.cost;
    }
}

const SHADOW_SQL: &str = "SELECT chain, served_model, shadow_model, success, error_type, \
    latency_ms, served_latency_ms, similarity, json_valid, tool_calls_match, cost_usd \
    FROM shadow_results WHERE timestamp >= ?1 AND timestamp < ?2";

fn shadow_groups(
    backend: &Backend,
    q: &ReportQuery,
) -> Result<BTreeMap<ShadowKey, ShadowGroup>, StoreError> {
    let path = match backend {
        Backend::Sqlite(path) => path,
        Backend::Postgres(url) => {
            static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
            let sql: &'static str =
                SQL.get_or_init(|| SHADOW_SQL.replace("?1", "$1").replace("?2", "$2"));
            return url.scan(
                sql,
                q.since_ms,
                q.until_ms,
                BTreeMap::new(),
                |groups, row| {
                    let key = (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
                    let flag = |i| -> Result<Option<bool>, tokio_postgres::Error> {
                        Ok(row.try_get::<_, Option<i32>>(i)?.map(|v| v != 0))
                    };
                    let f = ShadowFields {
                        success: row.try_get::<_, i32>(3)? != 0,
                        cancelled: row.try_get::<_, Option<&str>>(4)? == Some("cancelled"),
                        latency_ms: row.try_get(5)?,
                        served_latency_ms: row.try_get(6)?,
                        similarity: row.try_get(7)?,
                        json_valid: flag(8)?,
                        tool_calls_match: flag(9)?,
                        cost: row.try_get(10)?,
                    };
                    groups
                        .entry(key)
                        .or_insert_with(ShadowGroup::default)
                        .add(f);
                    Ok(())
                },
            );
        }
    };
    Ok(scan_slices(path, q, |conn, from, to| {
        let mut stmt = conn.prepare_cached(SHADOW_SQL)?;
        let mut groups: BTreeMap<ShadowKey, ShadowGroup> = BTreeMap::new();
        let mut rows = stmt.query([from, to])?;
        while let Some(row) = rows.next()? {
            let key = (row.get(0)?, row.get(1)?, row.get(2)?);
            let f = ShadowFields {
                success: row.get(3)?,
                cancelled: text(row.get_ref(4)?) == Some("cancelled"),
                latency_ms: row.get(5)?,
                served_latency_ms: row.get(6)?,
                similarity: row.get(7)?,
                json_valid: row.get(8)?,
                tool_calls_match: row.get(9)?,
                cost: row.get(10)?,
            };
            groups.entry(key).or_default().add(f);
        }
        Ok(groups)
    })?)
}

fn shadow_report(backend: &Backend, q: &ReportQuery) -> Result<(Vec<Value>, Value), StoreError> {
    let groups = shadow_groups(backend, q)?;
    let mut total = ShadowGroup::default();
    let mut out = Vec::with_capacity(groups.len());
    for ((chain, served, shadow), mut g) in groups {
        out.push(g.columns([json!(chain), json!(served), json!(shadow)]));
        total.merge(g);
    }
    Ok((
        out,
        total.columns([json!("total"), Value::Null, Value::Null]),
    ))
}

fn round4(v: f64) -> f64 {
    (v * 10_000.0).round() / 10_000.0
}

fn rate(n: u64, of: u64) -> Value {
    if of == 0 {
        Value::Null
    } else {
        json!(((n as f64 / of as f64) * 10_000.0).round() / 10_000.0)
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Dollars to ten decimals: float sums without their last-digit noise.
fn usd(v: f64) -> f64 {
    (v * 1e10).round() / 1e10
}

/// The columns of a report as flat cells: `errors` becomes one `errors_<class>` column
/// per class seen.
fn flat(report: &Value) -> (Vec<String>, Vec<Vec<String>>, Vec<String>) {
    let rows: Vec<&Map<String, Value>> = report["rows"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_object).collect())
        .unwrap_or_default();
    let totals = report["totals"].as_object();
    let mut classes: Vec<String> = Vec::new();
    for r in rows.iter().copied().chain(totals) {
        if let Some(e) = r.get("errors").and_then(Value::as_object) {
            for k in e.keys() {
                if !classes.contains(k) {
                    classes.push(k.clone());
                }
            }
        }
    }
    classes.sort();
    let mut header: Vec<String> = Vec::new();
    if let Some(first) = totals {
        for k in first.keys() {
            if k == "errors" {
                header.extend(classes.iter().map(|c| format!("errors_{c}")));
            } else {
                header.push(k.clone());
            }
        }
    }
    let cells = |r: &Map<String, Value>| -> Vec<String> {
        let mut out = Vec::with_capacity(header.len());
        for (k, v) in r {
            if k == "errors" {
                for c in &classes {
                    out.push(v.get(c).and_then(Value::as_u64).unwrap_or(0).to_string());
                }
            } else {
                out.push(cell(k, v));
            }
        }
        out
    };
    let body = rows.iter().map(|r| cells(r)).collect();
    let total = totals.map(cells).unwrap_or_default();
    (header, body, total)
}

fn cell(key: &str, v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if key.ends_with("_usd") => format!("{f:.6}"),
            Some(f) if key.ends_with("_rate") => format!("{f:.4}"),
            Some(f) if key.ends_with("_ms") => format!("{f:.1}"),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

fn is_empty(report: &Value) -> bool {
    report["rows"].as_array().is_none_or(Vec::is_empty)
}

const NO_TRAFFIC: &str = "no traffic in this window";

/// Aligned columns for a terminal; the totals last.
pub fn to_table(report: &Value) -> String {
    let (header, rows, total) = flat(report);
    let mut out = format!(
        "cascade report by {} from {} to {}\n\n",
        report["by"].as_str().unwrap_or(""),
        report["since"].as_str().unwrap_or(""),
        report["until"].as_str().unwrap_or("")
    );
    let mut all: Vec<&Vec<String>> = rows.iter().collect();
    if !is_empty(report) {
        all.push(&total);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            all.iter()
                .filter_map(|r| r.get(i))
                .map(String::len)
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String], out: &mut String| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i == 0 {
                    format!("{c:<w$}", w = widths[i])
                } else {
                    format!("{c:>w$}", w = widths[i])
                }
            })
            .collect();
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    line(&header, &mut out);
    if is_empty(report) {
        out.push_str(NO_TRAFFIC);
        out.push('\n');
        return out;
    }
    for r in &rows {
        line(r, &mut out);
    }
    line(&total, &mut out);
    out
}

/// CSV with a header line; the totals row last, keyed `total`.
pub fn to_csv(report: &Value) -> String {
    let (header, rows, total) = flat(report);
    let esc = |c: &String| {
        if c.contains([',', '"', '\n']) {
            format!("\"{}\"", c.replace('"', "\"\""))
        } else {
            c.clone()
        }
    };
    let mut out = String::new();
    let mut line = |cells: &[String]| {
        out.push_str(&cells.iter().map(esc).collect::<Vec<_>>().join(","));
        out.push('\n');
    };
    line(&header);
    if !is_empty(report) {
        for r in &rows {
            line(r);
        }
        line(&total);
    }
    out
}

/// A Markdown document: a title and one table (the scheduled report's file).
pub fn to_markdown(report: &Value) -> String {
    let (header, rows, total) = flat(report);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# cascade report by {}\n\n{} to {}\n",
        report["by"].as_str().unwrap_or(""),
        report["since"].as_str().unwrap_or(""),
        report["until"].as_str().unwrap_or("")
    );
    let _ = writeln!(out, "| {} |", header.join(" | "));
    let _ = writeln!(out, "|{}", "---|".repeat(header.len()));
    if is_empty(report) {
        let _ = writeln!(out, "\n{NO_TRAFFIC}");
        return out;
    }
    for r in rows.iter().chain([&total]) {
        let _ = writeln!(out, "| {} |", r.join(" | "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut l = Latencies((1..=20).map(f64::from).collect());
        assert_eq!(l.percentile(0.5), Some(10.0));
        assert_eq!(l.percentile(0.95), Some(19.0));
        assert_eq!(Latencies::default().percentile(0.5), None);
    }

    #[test]
    fn flat_cells_spread_the_error_map() {
        let r = json!({"by": "model", "since": "a", "until": "b",
            "rows": [{"model": "m", "calls": 3, "success_rate": 0.5, "errors": {"timeout": 1, "transient": 2}}],
            "totals": {"model": "total", "calls": 3, "success_rate": 0.5, "errors": {"timeout": 1, "transient": 2}}});
        let csv = to_csv(&r);
        assert_eq!(
            csv,
            "model,calls,success_rate,errors_timeout,errors_transient\nm,3,0.5000,1,2\ntotal,3,0.5000,1,2\n"
        );
        let table = to_table(&r);
        assert!(table.contains("errors_transient"), "{table}");
        let empty = json!({"by": "chain", "since": "a", "until": "b", "rows": [],
            "totals": {"chain": "total", "requests": 0}});
        assert!(to_table(&empty).ends_with("chain  requests\nno traffic in this window\n"));
        assert_eq!(to_csv(&empty), "chain,requests\n");
    }
}
