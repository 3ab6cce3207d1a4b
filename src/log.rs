//! The gateway's log: `text` for people, `json` (one flat object per line) for
//! machines, filtered by `RUST_LOG`. Lines go through a bounded in-memory queue to a
//! writer thread, so a slow terminal or pipe never slows an answer; lines dropped
//! when that queue is full are counted (`cascade_log_dropped_total`).
//!
//! Two kinds of line are a contract: one per request (target [`REQUEST`], `info`) and
//! one per fallback (target [`FALLBACK`], `warn`). They carry names, classes, numbers
//! and ids only: never a prompt, an answer, a key or a header value.

use std::sync::OnceLock;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::config::{LogFormat, LogSettings};

/// The target of the per-request line.
pub const REQUEST: &str = "cascade::request";
/// The target of the per-fallback line.
pub const FALLBACK: &str = "cascade::fallback";

/// Fields every request line has, `null` when they have no value.
const REQUEST_FIELDS: &[&str] = &[
    "request_id",
    "chain",
    "surface",
    "status",
    "model",
    "provider",
    "attempts",
    "fallbacks",
    "cache",
    "stream",
    "latency_ms",
    "ttft_ms",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "cost_usd",
    "error_type",
];
const FALLBACK_FIELDS: &[&str] = &["request_id", "chain", "from", "to", "reason", "status"];

/// Lines lost because the writer fell behind.
static DROPPED: OnceLock<tracing_appender::non_blocking::ErrorCounter> = OnceLock::new();

pub fn dropped_lines() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}

/// Keeps the log writer running; dropping it flushes what is queued.
pub struct LogGuard(#[allow(dead_code)] Option<tracing_appender::non_blocking::WorkerGuard>);

/// Installs the global subscriber. A second call (tests) changes nothing.
pub fn init(settings: LogSettings) -> LogGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(64 * 1024)
        .thread_name("cascade-log")
        .finish(std::io::stdout());
    let _ = DROPPED.set(writer.error_counter());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_target(false);
    let installed = match settings.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.event_format(FlatJson).try_init(),
    };
    LogGuard(installed.is_ok().then_some(guard))
}

/// One JSON object per line, event fields at the top level next to `timestamp`,
/// `level` and `message`.
pub struct FlatJson;

impl<S, N> FormatEvent<S, N> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        writeln!(writer, "{}", json_line(event, crate::clock::now_ms()))
    }
}

/// The JSON text of one event.
pub fn json_line(event: &Event<'_>, now_ms: i64) -> String {
    let meta = event.metadata();
    let mut map = Map::new();
    map.insert(
        "timestamp".into(),
        Value::String(crate::clock::rfc3339_ms(now_ms)),
    );
    map.insert("level".into(), Value::String(meta.level().as_str().into()));
    map.insert("message".into(), Value::String(String::new()));
    event.record(&mut Fields(&mut map));
    let required = match meta.target() {
        REQUEST => REQUEST_FIELDS,
        FALLBACK => FALLBACK_FIELDS,
        _ => {
            map.insert("target".into(), Value::String(meta.target().into()));
            &[]
        }
    };
    for key in required {
        map.entry(*key).or_insert(Value::Null);
    }
    serde_json::to_string(&map).unwrap_or_default()
}

struct Fields<'a>(&'a mut Map<String, Value>);

impl Visit for Fields<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        let v = serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number);
        self.0.insert(field.name().into(), v);
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().into(), Value::String(format!("{value:?}")));
    }
}
