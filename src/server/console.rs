//! The operator's console as JSON, for the status page and for scripts:
//! `/admin/chains` (each chain's targets in their live order), `/admin/events` (the
//! newest fallbacks, from the store) and `/admin/stats` (the gateway at a glance).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{Response, StatusCode};
use prometheus::core::Collector;
use serde_json::{json, Value};

use super::{error_response, json_response, AppState};
use crate::api::ApiError;
use crate::clock;
use crate::config::{Chain, HedgeDelay, Strategy};
use crate::resilience::breaker::BreakerState;

/// The status page: one static file in the binary (no build step, no CDN). It holds no
/// data, so it loads without the admin token; its requests carry the token.
const PAGE: &str = include_str!("ui.html");

/// `GET /ui`.
pub async fn page() -> Response<Body> {
    use axum::http::{header, HeaderValue};
    let mut r = Response::new(Body::from(PAGE));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
             frame-ancestors 'none'",
        ),
    );
    r
}

/// The last config reload: when, how it went, and the hash it brought.
#[derive(Debug, Clone)]
pub struct LastReload {
    pub at_ms: i64,
    pub result: &'static str,
    pub hash: Option<String>,
}

impl AppState {
    pub(super) fn note_reload(&self, result: &'static str, hash: Option<String>) {
        if let Ok(mut last) = self.last_reload.lock() {
            *last = Some(LastReload {
                at_ms: clock::now_ms(),
                result,
                hash,
            });
        }
    }
}

/// A chain's targets in the order a request would meet them now: degraded targets
/// moved last (as routing does); an open breaker leaves its target in place, marked
/// open, since routing skips it only while it is open. Positions in `chain.targets`.
pub fn live_order(chain: &Chain) -> Vec<usize> {
    let (mut ahead, mut last) = (Vec::new(), Vec::new());
    for (pos, t) in chain.targets.iter().enumerate() {
        let open = t.model.breaker.state() == BreakerState::Open;
        if !open && t.model.health.is_degraded() {
            last.push(pos);
        } else {
            ahead.push(pos);
        }
    }
    ahead.extend(last);
    ahead
}

pub(super) fn strategy(s: &Strategy) -> Value {
    match s {
        Strategy::Sequential => json!("sequential"),
        Strategy::Race { k } => json!({"race": {"k": k}}),
        Strategy::Hedge {
            delay: HedgeDelay::Fixed(d),
        } => json!({"hedge": {"delay_ms": d.as_secs_f64() * 1000.0}}),
        Strategy::Hedge {
            delay: HedgeDelay::P95,
        } => json!({"hedge": {"delay": "p95"}}),
    }
}

/// An `Instant` ahead, as RFC 3339 wall time.
fn wall(at: tokio::time::Instant, now: tokio::time::Instant, now_ms: i64) -> String {
    clock::rfc3339_s(clock::ms_at(at, now, now_ms))
}

fn ms(d: Option<Duration>) -> Option<f64> {
    d.map(|d| (d.as_secs_f64() * 1_000_000.0).round() / 1000.0)
}

/// The model's last 30 minutes, oldest step first.
fn history(app: &AppState, model: &str) -> Value {
    let points = app.history.of(model);
    json!({
        "step_s": super::history::STEP.as_secs(),
        "calls": points.iter().map(|p| p.calls).collect::<Vec<_>>(),
        "failures": points.iter().map(|p| p.failures).collect::<Vec<_>>(),
        "latency_ms": points.iter().map(|p| p.latency_ms).collect::<Vec<_>>(),
    })
}

/// `GET /admin/chains`.
pub async fn chains(State(app): State<Arc<AppState>>) -> Response<Body> {
    let config = app.config();
    let (now, now_ms) = (tokio::time::Instant::now(), clock::now_ms());
    // A pool model with fallbacks is a chain too, for a client that names it.
    let implicit = config.models.values().filter_map(|m| {
        let chain = config.model_chains.get(&*m.name)?;
        (!m.fallbacks.is_empty()).then_some((chain, true))
    });
    let chains: Vec<Value> = config
        .chains
        .values()
        .map(|c| (c, false))
        .chain(implicit)
        .map(|(chain, implicit)| {
            let targets: Vec<Value> = live_order(chain)
                .into_iter()
                .enumerate()
                .map(|(live, pos)| {
                    let m = &chain.targets[pos].model;
                    let h = m.health.snapshot();
                    json!({
                        "model": &*m.name,
                        "provider": &*m.provider.name,
                        "position": live,
                        "configured_position": pos,
                        "state": m.breaker.state().as_str(),
                        "retry_at": m.breaker.retry_at().map(|t| wall(t, now, now_ms)),
                        "degraded": h.degraded,
                        "success_rate": (h.calls > 0).then_some(h.success_rate),
                        "calls": h.calls,
                        "p50_ms": ms(h.p50),
                        "p95_ms": ms(h.p95),
                        "ttft_p95_ms": ms(h.ttft_p95),
                        "history": history(&app, &m.name),
                    })
                })
                .collect();
            json!({
                "name": &*chain.name,
                "implicit": implicit,
                "strategy": strategy(&chain.strategy),
                "targets": targets,
            })
        })
        .collect();
    json_response(
        serde_json::to_vec(&json!({ "chains": chains }))
            .unwrap_or_default()
            .into(),
    )
}

/// Events at most per `/admin/events` answer.
const MAX_EVENTS: usize = 500;

/// `GET /admin/events?limit=50`: the newest fallbacks, newest first.
pub async fn events(
    State(app): State<Arc<AppState>>,
    Query(params): Query<HashMap<String, String>>,
) -> Response<Body> {
    let limit = match params.get("limit").map(|l| l.parse::<usize>()) {
        None => 50,
        Some(Ok(n)) if (1..=MAX_EVENTS).contains(&n) => n,
        Some(_) => {
            return error_response(
                &ApiError::invalid_request(format!(
                    "limit must be a whole number from 1 to {MAX_EVENTS}"
                ))
                .with_param("limit")
                .with_code("invalid_value"),
            )
        }
    };
    let Some(settings) = &app.config().store else {
        return error_response(
            &ApiError::new(
                StatusCode::CONFLICT,
                "invalid_request_error",
                "The store is off (store.enabled: false), so there are no events to show.",
            )
            .with_code("store_disabled"),
        );
    };
    match crate::store::recent_fallbacks(&settings.backend, limit).await {
        Ok(events) => {
            let events: Vec<Value> = events
                .into_iter()
                .map(|e| {
                    let mut v = serde_json::to_value(&e).unwrap_or(Value::Null);
                    v["timestamp"] = json!(clock::rfc3339_ms(e.timestamp_ms));
                    v
                })
                .collect();
            json_response(
                serde_json::to_vec(&json!({ "events": events }))
                    .unwrap_or_default()
                    .into(),
            )
        }
        Err(e) => error_response(&ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            format!("The store could not be read: {e}"),
        )),
    }
}

/// Requests per second are measured over about this long (between `/admin/stats`
/// calls; the first one measures since start).
const RATE_WINDOW: Duration = Duration::from_secs(60);

fn counter_sum<C: Collector>(c: &C) -> f64 {
    c.collect()
        .iter()
        .flat_map(|f| f.get_metric())
        .map(|m| m.get_counter().get_value())
        .sum()
}

/// The `q` quantile of a histogram from its buckets (as PromQL's
/// `histogram_quantile`: linear within the bucket), in its unit.
fn quantile(h: &prometheus::Histogram, q: f64) -> Option<f64> {
    let families = h.collect();
    let hist = families
        .first()?
        .get_metric()
        .first()?
        .get_histogram()
        .clone();
    let total = hist.get_sample_count();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let (mut lower, mut below) = (0.0, 0u64);
    for b in hist.get_bucket() {
        let (upper, count) = (b.get_upper_bound(), b.get_cumulative_count());
        if count as f64 >= rank {
            let inside = (count - below).max(1) as f64;
            return Some(lower + (upper - lower) * (rank - below as f64) / inside);
        }
        (lower, below) = (upper, count);
    }
    Some(lower)
}

/// `GET /admin/stats`.
pub async fn stats(State(app): State<Arc<AppState>>) -> Response<Body> {
    let config = app.config();
    let now_ms = clock::now_ms();
    let m = &app.metrics;
    let mut requests = counter_sum(&m.requests_total) as u64;
    let rps = {
        let uptime = Duration::from_millis(u64::try_from(now_ms - app.started_ms).unwrap_or(0));
        match app.rate_samples.lock() {
            Ok(mut samples) => {
                // Read under the lock, so samples go in the order they were counted.
                let now = Instant::now();
                requests = requests.max(counter_sum(&m.requests_total) as u64);
                samples.push_back((now, requests));
                // Keep the newest sample at least RATE_WINDOW old as the base, and none
                // older than two windows (a page opened after a long pause).
                while samples.len() > 2 && samples[1].0 + RATE_WINDOW <= now {
                    samples.pop_front();
                }
                while samples.len() > 1 && samples[0].0 + 2 * RATE_WINDOW <= now {
                    samples.pop_front();
                }
                let (then, count) = samples[0];
                let span = now.duration_since(then);
                if samples.len() > 1 && span >= Duration::from_millis(500) {
                    requests.saturating_sub(count) as f64 / span.as_secs_f64()
                } else {
                    requests as f64 / uptime.as_secs_f64().max(1.0)
                }
            }
            Err(_) => 0.0,
        }
    };
    let cache = |result: &str| {
        m.cache_requests
            .collect()
            .iter()
            .flat_map(|f| f.get_metric())
            .filter(|metric| {
                metric
                    .get_label()
                    .iter()
                    .any(|l| l.get_name() == "result" && l.get_value() == result)
            })
            .map(|metric| metric.get_counter().get_value())
            .sum::<f64>()
    };
    let (hits, misses, stale) = (cache("hit"), cache("miss"), cache("stale"));
    let looked_up = hits + misses + stale;
    let last_reload = app.last_reload.lock().ok().and_then(|l| l.clone());
    let body = json!({
        "uptime_s": (now_ms - app.started_ms) / 1000,
        "version": env!("CARGO_PKG_VERSION"),
        "config_hash": config.hash,
        "last_reload": last_reload.map(|r| json!({
            "at": clock::rfc3339_s(r.at_ms),
            "result": r.result,
            "hash": r.hash,
        })),
        "requests": requests,
        "requests_per_second": (rps * 100.0).round() / 100.0,
        "overhead_p99_ms": quantile(&m.overhead, 0.99).map(|s| (s * 1_000_000.0).round() / 1000.0),
        "cache_hit_ratio": (looked_up > 0.0).then(|| ((hits + stale) / looked_up * 10_000.0).round() / 10_000.0),
        "store": if config.store.is_some() { "on" } else { "off" },
        "store_queue": m.store.queue_depth.get(),
        "store_dropped": m.store.dropped.get(),
    });
    json_response(serde_json::to_vec(&body).unwrap_or_default().into())
}
