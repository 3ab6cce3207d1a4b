//! What a request did, told once when it ends: its `requests` row (through the store's
//! queue), its log line, and the cost counters.
//!
//! A [`Ledger`] is made when a request arrives and travels with it (into the SSE body
//! for a stream). It is finished exactly once: by the handler for a JSON answer, by
//! the stream when it ends, or by its own `Drop` when the client leaves first.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use tokio::time::Instant;

use super::AppState;
use crate::api::{ApiError, Usage};
use crate::config::{Chain, Config, Model};
use crate::routing::engine::AttemptRecord;
use crate::routing::target::RequestCtx;
use crate::store::{round_usd, RequestRow, Row, Tokens};

/// A request id longer than this (a client may send its own) is cut for the record.
const MAX_REQUEST_ID: usize = 128;

/// The status recorded for a client that left before its answer (nginx's convention).
pub const CLIENT_CLOSED: u16 = 499;

/// How a request ended, as the ledger records it.
pub struct Answered<'a> {
    pub status: u16,
    /// Who answered (or whose cached answer was served).
    pub model: Option<&'a Model>,
    pub attempts: usize,
    pub fallbacks: usize,
    pub ttft: Option<Duration>,
    pub usage: Option<Usage>,
    /// The answer came from an upstream now (not the cache): it has a cost.
    pub charged: bool,
    pub error_type: Option<&'static str>,
}

impl Answered<'_> {
    /// Refused before any upstream call.
    pub fn rejected(e: &ApiError) -> Answered<'static> {
        Answered {
            status: e.status.as_u16(),
            model: None,
            attempts: 0,
            fallbacks: 0,
            ttft: None,
            usage: None,
            charged: false,
            error_type: Some(rejection_class(e)),
        }
    }
}

pub struct Ledger {
    app: Arc<AppState>,
    /// The config this request runs on, from its start to its end (a reload swaps
    /// the gateway's, not this one).
    pub config: Arc<Config>,
    pub request_id: Arc<str>,
    arrived_ms: i64,
    start: Instant,
    surface: &'static str,
    pub chain: Option<Arc<Chain>>,
    pub stream: bool,
    pub cache: &'static str,
    /// The request's call context, to count its calls if the client leaves.
    pub ctx: Option<Arc<RequestCtx>>,
    done: bool,
}

impl Ledger {
    pub fn new(
        app: &Arc<AppState>,
        headers: &HeaderMap,
        start: Instant,
        surface: &'static str,
    ) -> Ledger {
        Ledger {
            config: app.config(),
            app: app.clone(),
            request_id: request_id(headers),
            arrived_ms: crate::clock::now_ms(),
            start,
            surface,
            chain: None,
            stream: false,
            cache: "bypass",
            ctx: None,
            done: false,
        }
    }

    /// Milliseconds since the request arrived.
    pub fn elapsed_ms(&self) -> f64 {
        (self.start.elapsed().as_secs_f64() * 1e6).round() / 1000.0
    }

    pub fn finish(mut self, a: Answered<'_>) {
        self.done = true;
        self.write(&a);
    }

    fn write(&self, a: &Answered<'_>) {
        let app = &self.app;
        let latency = self.start.elapsed();
        let chain = self.chain.as_deref();
        let (cost, primary_cost) = match (a.charged, a.model, &a.usage, chain) {
            (true, Some(m), Some(u), Some(c)) => {
                let primary = c.targets.first().map_or(0.0, |t| t.model.cost_usd(u));
                (m.cost_usd(u), primary)
            }
            _ => (0.0, 0.0),
        };
        if let (Some(c), true) = (chain, a.charged) {
            app.metrics.record_request_cost(c, cost, primary_cost);
        }
        let tokens = a.usage.as_ref().map(Tokens::from);
        // Microsecond precision: no float noise in the log or the store.
        let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1000.0;
        let (cost, primary_cost) = (round_usd(cost), round_usd(primary_cost));
        if self.config.log.requests {
            tracing::info!(
                target: crate::log::REQUEST,
                request_id = &*self.request_id,
                chain = chain.map(|c| &*c.name),
                surface = self.surface,
                status = a.status,
                model = a.model.map(|m| &*m.name),
                provider = a.model.map(|m| &*m.provider.name),
                attempts = a.attempts,
                fallbacks = a.fallbacks,
                cache = self.cache,
                stream = self.stream,
                latency_ms = ms(latency),
                ttft_ms = a.ttft.map(ms),
                input_tokens = tokens.map(|t| t.input),
                cached_input_tokens = tokens.map(|t| t.cached_input),
                output_tokens = tokens.map(|t| t.output),
                cost_usd = cost,
                error_type = a.error_type,
                "request"
            );
        }
        if let Some(store) = &app.store {
            // The calls first, then their request: a reader who sees the request row
            // sees every call that had ended by then.
            let calls = self
                .ctx
                .as_deref()
                .into_iter()
                .flat_map(RequestCtx::take_rows);
            let request = RequestRow {
                request_id: self.request_id.clone(),
                arrived_ms: self.arrived_ms,
                surface: self.surface,
                chain: chain.map(|c| c.name),
                status: a.status,
                model: a.model.map(|m| m.name),
                provider: a.model.map(|m| m.provider.name),
                attempts: u32::try_from(a.attempts).unwrap_or(u32::MAX),
                fallbacks: u32::try_from(a.fallbacks).unwrap_or(u32::MAX),
                cache: self.cache,
                stream: self.stream,
                latency_ms: ms(latency),
                ttft_ms: a.ttft.map(ms),
                tokens,
                cost_usd: cost,
                primary_cost_usd: primary_cost,
                error_type: a.error_type,
            };
            store.record_all(
                calls
                    .map(Row::Call)
                    .chain(std::iter::once(Row::Request(request))),
            );
        }
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // The client left before its answer was complete (or the handler panicked, and
        // the client got a 500 from the panic layer).
        let attempts = self.ctx.as_ref().map_or(0, |c| c.calls_started());
        let (status, error_type) = if std::thread::panicking() {
            (500, "internal")
        } else if self.app.drain.is_stopped() {
            // Cut by the end of the drain, and answered 503.
            (503, "shutting_down")
        } else {
            (CLIENT_CLOSED, "cancelled")
        };
        self.write(&Answered {
            status,
            model: None,
            attempts,
            fallbacks: 0,
            ttft: None,
            usage: None,
            charged: false,
            error_type: Some(error_type),
        });
    }
}

/// The request's `x-request-id` (set by the request-id layer when the client sent none).
fn request_id(headers: &HeaderMap) -> Arc<str> {
    let id = headers
        .get(super::request_id::X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    match id.char_indices().nth(MAX_REQUEST_ID) {
        Some((cut, _)) => id[..cut].into(),
        None => id.into(),
    }
}

/// The class of our own refusal of a request.
fn rejection_class(e: &ApiError) -> &'static str {
    match e.status.as_u16() {
        404 => "not_found",
        _ => "bad_request",
    }
}

/// The class that decided a chain's failure: the deadline, every breaker open, or the
/// last call's class.
pub fn failure_class(e: &ApiError, attempts: &[AttemptRecord]) -> &'static str {
    match e.code.as_deref() {
        Some("deadline_exceeded") => return "timeout",
        Some("all_targets_open") => return "circuit_open",
        Some("context_length_exceeded") if attempts.is_empty() => return "context_overflow",
        _ => {}
    }
    attempts
        .iter()
        .rev()
        .find(|a| !a.cancelled)
        .and_then(|a| a.class.map(crate::classify::ErrorClass::as_str))
        .unwrap_or(if e.status.is_client_error() {
            "bad_request"
        } else {
            "transient"
        })
}
