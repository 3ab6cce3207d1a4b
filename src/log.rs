//! The gateway's log: `text` for people, `json` (one flat object per line) for
//! machines, filtered by `RUST_LOG`. Lines gather in a bounded in-memory buffer that
//! a thread writes out every few milliseconds (`log_sink.rs`), so a slow terminal or
//! pipe never slows an answer; lines dropped when it is full are counted
//! (`cascade_log_dropped_total`).
//!
//! Two kinds of line are a contract: one per request (target [`REQUEST`], `info`) and
//! one per fallback (target [`FALLBACK`], `warn`). They carry names, classes, numbers
//! and ids only: never a prompt, an answer, a key or a header value.

use std::sync::OnceLock;

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
static SINK: OnceLock<std::sync::Arc<crate::log_sink::Sink>> = OnceLock::new();

pub fn dropped_lines() -> u64 {
    SINK.get().map_or(0, |s| s.dropped())
}

/// Keeps the log writer running; dropping it writes out what is queued.
pub struct LogGuard(#[allow(dead_code)] Option<crate::log_sink::Flusher>);

/// Installs the global subscriber, with a line buffer for each of `workers` threads.
/// A second call (tests) changes nothing.
pub fn init(settings: LogSettings, workers: usize) -> LogGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (sink, flusher) = match crate::log_sink::start(stdout_buffered(), workers) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cascade: cannot start the log writer: {e}");
            return LogGuard(None);
        }
    };
    let _ = SINK.set(sink.clone());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(crate::log_sink::SinkHandle(sink))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_target(false);
    let installed = match settings.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.event_format(FlatJson).try_init(),
    };
    LogGuard(installed.is_ok().then_some(flusher))
}

/// Standard output for the log thread, without `Stdout`'s line buffering (a syscall
/// per line): the sink writes whole batches.
fn stdout_buffered() -> Box<dyn std::io::Write + Send> {
    use std::os::fd::AsFd;
    match std::io::stdout().as_fd().try_clone_to_owned() {
        Ok(fd) => Box::new(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::fs::File::from(fd),
        )),
        Err(_) => Box::new(std::io::stdout()),
    }
}

/// One JSON object per line, event fields at the top level next to `timestamp`,
/// `level` and `message`. Written straight into the line buffer, with no map per event.
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
        write_json_line(&mut writer, event, crate::clock::now_ms())
    }
}

/// Writes the JSON text of one event, and a newline.
pub fn write_json_line(
    out: &mut dyn std::fmt::Write,
    event: &Event<'_>,
    now_ms: i64,
) -> std::fmt::Result {
    let meta = event.metadata();
    out.write_str("{\"timestamp\":\"")?;
    out.write_str(&crate::clock::rfc3339_ms(now_ms))?;
    out.write_str("\",\"level\":\"")?;
    out.write_str(meta.level().as_str())?;
    out.write_char('"')?;
    let required = match meta.target() {
        REQUEST => REQUEST_FIELDS,
        FALLBACK => FALLBACK_FIELDS,
        target => {
            out.write_str(",\"target\":")?;
            escaped(out, target)?;
            &[]
        }
    };
    let mut fields = Fields {
        out,
        seen: 0,
        next: 0,
        required,
        result: Ok(()),
    };
    event.record(&mut fields);
    fields.result?;
    let seen = fields.seen;
    for (i, key) in required.iter().enumerate() {
        if seen & (1 << i) == 0 {
            out.write_str(",\"")?;
            out.write_str(key)?;
            out.write_str("\":null")?;
        }
    }
    out.write_str("}\n")
}

/// A JSON string literal.
fn escaped(out: &mut dyn std::fmt::Write, s: &str) -> std::fmt::Result {
    out.write_char('"')?;
    escape_into(out, s)?;
    out.write_char('"')
}

/// The text of `s` as it goes inside a JSON string literal.
fn escape_into(out: &mut dyn std::fmt::Write, s: &str) -> std::fmt::Result {
    let mut from = 0;
    for (i, c) in s.char_indices() {
        let esc = match c {
            '"' => "\\\"",
            '\\' => "\\\\",
            '\n' => "\\n",
            '\r' => "\\r",
            '\t' => "\\t",
            c if (c as u32) < 0x20 => "",
            _ => continue,
        };
        out.write_str(&s[from..i])?;
        if esc.is_empty() {
            write!(out, "\\u{:04x}", c as u32)?;
        } else {
            out.write_str(esc)?;
        }
        from = i + c.len_utf8();
    }
    out.write_str(&s[from..])
}

/// Escapes what is written through it: a `Debug` value (the message) goes into the
/// line as it is formatted, with no `String` per event.
struct Escaping<'a>(&'a mut dyn std::fmt::Write);

impl std::fmt::Write for Escaping<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        escape_into(self.0, s)
    }
}

/// Writes each field as `,"name":value`, noting which required fields it saw.
struct Fields<'a> {
    out: &'a mut dyn std::fmt::Write,
    seen: u64,
    /// Where in `required` the next field is expected.
    next: usize,
    required: &'static [&'static str],
    result: std::fmt::Result,
}

impl Fields<'_> {
    fn key(&mut self, field: &Field) {
        // The contract lines declare their fields in `required`'s order: look at the
        // one after the last found first, and search only for a field out of place.
        let name = field.name();
        let found = match self.required.get(self.next) {
            Some(k) if *k == name => Some(self.next),
            _ if name == "message" => None,
            _ => self.required.iter().position(|k| *k == name),
        };
        if let Some(i) = found {
            self.seen |= 1 << i;
            self.next = i + 1;
        }
        if self.result.is_ok() {
            self.result = self
                .out
                .write_str(",\"")
                .and_then(|()| self.out.write_str(name))
                .and_then(|()| self.out.write_str("\":"));
        }
    }

    fn raw(&mut self, field: &Field, value: std::fmt::Arguments<'_>) {
        self.key(field);
        if self.result.is_ok() {
            self.result = self.out.write_fmt(value);
        }
    }
}

impl Visit for Fields<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        if value.is_finite() {
            self.raw(field, format_args!("{value}"));
        } else {
            self.raw(field, format_args!("null"));
        }
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.raw(field, format_args!("{value}"));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.raw(field, format_args!("{value}"));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.raw(field, format_args!("{value}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.key(field);
        if self.result.is_ok() {
            self.result = escaped(self.out, value);
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.key(field);
        if self.result.is_ok() {
            let out = &mut *self.out;
            self.result = out
                .write_char('"')
                .and_then(|()| {
                    std::fmt::Write::write_fmt(&mut Escaping(&mut *out), format_args!("{value:?}"))
                })
                .and_then(|()| out.write_char('"'));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captures the JSON line of one event.
    struct Capture(std::sync::Mutex<Vec<String>>);

    impl tracing::Subscriber for Capture {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, event: &Event<'_>) {
            let mut line = String::new();
            write_json_line(&mut line, event, 0).unwrap();
            self.0.lock().unwrap().push(line);
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    #[test]
    fn lines_are_flat_json_with_every_contract_field() {
        let capture = std::sync::Arc::new(Capture(Default::default()));
        tracing::subscriber::with_default(capture.clone(), || {
            tracing::warn!(
                target: FALLBACK,
                request_id = "r\"1\n",
                chain = "c",
                from = "a",
                to = "b",
                reason = "transient",
                status = None::<u16>,
                "fallback"
            );
            tracing::info!(ratio = 0.5, n = 3u64, ok = true, "plain \u{1} text");
        });
        let lines = capture.0.lock().unwrap().clone();
        let v: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(v["message"], "fallback");
        assert_eq!(v["request_id"], "r\"1\n");
        assert_eq!(v["level"], "WARN");
        assert_eq!(v["timestamp"], "1970-01-01T00:00:00.000Z");
        assert!(v.get("status").is_some_and(serde_json::Value::is_null));
        assert!(v.get("target").is_none());
        let v: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
        assert_eq!(
            (&v["ratio"], &v["n"], &v["ok"], &v["message"]),
            (
                &serde_json::json!(0.5),
                &serde_json::json!(3),
                &serde_json::json!(true),
                &serde_json::json!("plain \u{1} text")
            )
        );
        assert!(v["target"].is_string());
    }
}
