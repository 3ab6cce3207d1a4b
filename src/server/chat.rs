//! `POST /v1/chat/completions`: read and parse the body once, resolve the chain, run
//! the engine, and turn its outcome into JSON or SSE with the `x-cascade-*` headers.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::time::Instant;

use super::sse::{self, InflightGuard};
use super::{error_response, AppState};
use crate::api::{ApiError, ChatRequest};
use crate::config::Chain;
use crate::routing::engine::{Answer, AttemptRecord, Outcome};
use crate::routing::resolve;

const X_CHAIN: HeaderName = HeaderName::from_static("x-cascade-chain");
const X_MODEL: HeaderName = HeaderName::from_static("x-cascade-model");
const X_PROVIDER: HeaderName = HeaderName::from_static("x-cascade-provider");
const X_ATTEMPTS: HeaderName = HeaderName::from_static("x-cascade-attempts");
const X_FALLBACKS: HeaderName = HeaderName::from_static("x-cascade-fallbacks");
const X_TRACE: HeaderName = HeaderName::from_static("x-cascade-trace");
const X_COST: HeaderName = HeaderName::from_static("x-cascade-cost-usd");
const X_TASK: &str = "x-cascade-task";
const X_TIMEOUT_MS: &str = "x-cascade-timeout-ms";
/// Label used for requests rejected before a chain was known.
const NO_CHAIN: &str = "none";

pub async fn chat_completions(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response<Body> {
    let start = Instant::now();
    let inflight = InflightGuard::new(&app.metrics.inflight);

    let req = match read_body(body, &headers, app.config.server.max_body)
        .await
        .and_then(ChatRequest::parse)
    {
        Ok(r) => r,
        Err(e) => return rejected(&app, &e),
    };
    let task = headers.get(X_TASK).and_then(|v| v.to_str().ok());
    let chain = match resolve(&app.config, task, req.model.as_deref()) {
        Ok(c) => c.clone(),
        Err(e) => return rejected(&app, &e),
    };

    let timeout = match client_timeout(&headers) {
        Ok(Some(t)) => t.min(chain.request_timeout),
        Ok(None) => chain.request_timeout,
        Err(e) => return rejected(&app, &e),
    };
    let deadline = start + timeout;
    let outcome = app.engine.run(&chain, Arc::new(req), deadline).await;
    respond(&app, &chain, outcome, start, deadline, inflight)
}

fn rejected(app: &AppState, e: &ApiError) -> Response<Body> {
    app.metrics
        .requests_total
        .with_label_values(&[NO_CHAIN, e.status.as_str()])
        .inc();
    error_response(e)
}

/// `x-cascade-timeout-ms`: a client may shorten the request's deadline, never lengthen it.
fn client_timeout(headers: &HeaderMap) -> Result<Option<std::time::Duration>, ApiError> {
    let Some(v) = headers.get(X_TIMEOUT_MS) else {
        return Ok(None);
    };
    v.to_str()
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .filter(|&ms| ms > 0)
        .map(|ms| Some(std::time::Duration::from_millis(ms)))
        .ok_or_else(|| {
            ApiError::invalid_request("Invalid 'x-cascade-timeout-ms' header: expected a positive whole number of milliseconds.")
                .with_param(X_TIMEOUT_MS)
                .with_code("invalid_value")
        })
}

/// Dollars with enough digits for a single cheap call, without trailing zeros.
fn format_cost(usd: f64) -> String {
    let s = format!("{usd:.10}");
    let s = s.trim_end_matches('0');
    s.strip_suffix('.')
        .map(|t| format!("{t}.0"))
        .unwrap_or_else(|| s.to_string())
}

/// `x-cascade-trace`: `MODEL:OUTCOME:MS` per attempt, in order.
fn trace(attempts: &[AttemptRecord]) -> Option<HeaderValue> {
    if attempts.is_empty() {
        return None;
    }
    let mut out = String::with_capacity(attempts.len() * 24);
    for (i, a) in attempts.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&a.model.name);
        out.push(':');
        out.push_str(&a.outcome());
        out.push(':');
        out.push_str(&a.latency.as_millis().to_string());
    }
    HeaderValue::from_str(&out).ok()
}

/// Reads the body up to `limit` bytes; a larger one is a 413.
async fn read_body(body: Body, headers: &HeaderMap, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("The request body is larger than the limit of {limit} bytes."),
        )
        .with_code("request_too_large")
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(ApiError::invalid_request(format!(
            "could not read the request body: {e}"
        ))),
    }
}

fn respond(
    app: &AppState,
    chain: &Chain,
    outcome: Outcome,
    start: Instant,
    deadline: Instant,
    inflight: InflightGuard,
) -> Response<Body> {
    let elapsed = start.elapsed();
    app.metrics
        .overhead
        .observe(elapsed.saturating_sub(outcome.upstream_time).as_secs_f64());
    app.metrics
        .request_duration
        .with_label_values(&[&chain.name])
        .observe(elapsed.as_secs_f64());

    let (mut resp, answered_by) = match outcome.result {
        Ok((model, Answer::Complete(c))) => {
            let cost = c.usage.map(|u| {
                sse::record_usage(&app.metrics, &model, &u);
                model.cost_usd(&u)
            });
            let mut r = Response::new(Body::from(c.body));
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            if let Some(v) = cost.and_then(|c| HeaderValue::from_str(&format_cost(c)).ok()) {
                h.insert(X_COST, v);
            }
            (r, Some(model))
        }
        Ok((model, Answer::Stream(committed))) => {
            let body = sse::body(
                *committed,
                model.clone(),
                app.metrics.clone(),
                deadline,
                inflight,
            );
            let mut r = Response::new(Body::from_stream(body));
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            h.insert("x-accel-buffering", HeaderValue::from_static("no"));
            (r, Some(model))
        }
        Err(e) => (error_response(&e), None),
    };
    app.metrics
        .requests_total
        .with_label_values(&[&chain.name, resp.status().as_str()])
        .inc();

    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&chain.name) {
        h.insert(X_CHAIN, v);
    }
    h.insert(X_ATTEMPTS, HeaderValue::from(outcome.attempts.len()));
    h.insert(X_FALLBACKS, HeaderValue::from(outcome.fallbacks));
    if let Some(v) = trace(&outcome.attempts) {
        h.insert(X_TRACE, v);
    }
    if let Some(model) = answered_by {
        if let Ok(v) = HeaderValue::from_str(&model.name) {
            h.insert(X_MODEL, v);
        }
        if let Ok(v) = HeaderValue::from_str(&model.provider.name) {
            h.insert(X_PROVIDER, v);
        }
    }
    resp
}
