//! The mock provider: one implementation that serves the tests, `bench/` and the demo.
//! It speaks the OpenAI wire format, counts calls per model, keeps the last request
//! bodies, and injects faults by knob (see `knobs`).
//!
//! Knobs come from, in order of precedence: the URL (`/k/<knobs>/v1/chat/completions`),
//! the per-model table (`MockServer::set` or `POST /_mock/knobs/<model>`), the defaults.

pub mod knobs;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use knobs::Knobs;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type MockBody = BoxBody<Bytes, BoxError>;

const KEPT_BODIES: usize = 32;

#[derive(Default)]
pub struct MockState {
    knobs: RwLock<HashMap<String, Knobs>>,
    calls: Mutex<HashMap<String, u64>>,
    bodies: Mutex<HashMap<String, Vec<Bytes>>>,
    /// Headers of the last request, for auth assertions.
    last_headers: Mutex<Option<http::HeaderMap>>,
    total: AtomicU64,
    /// Streams whose client went away before the end.
    cancelled: Arc<AtomicU64>,
}

/// A running mock; stops accepting when dropped.
pub struct MockServer {
    pub addr: SocketAddr,
    pub state: Arc<MockState>,
    task: JoinHandle<()>,
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MockServer {
    /// Starts a mock on `addr` (use port 0 for an ephemeral port).
    pub async fn start(addr: &str) -> std::io::Result<MockServer> {
        let listener = TcpListener::bind(addr).await?;
        let state = Arc::new(MockState::default());
        let addr = listener.local_addr()?;
        let task = tokio::spawn(serve(listener, state.clone()));
        Ok(MockServer { addr, state, task })
    }

    /// Base URL for an `openai` provider: `http://ADDR/v1`.
    pub fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Base URL whose every call uses `knobs` (e.g. `status=500`).
    pub fn url_with(&self, knobs: &str) -> String {
        format!("http://{}/k/{knobs}/v1", self.addr)
    }

    /// Sets the knobs for requests whose `model` is `model`.
    pub fn set(&self, model: &str, knobs: &str) {
        self.state
            .set(model, Knobs::parse(knobs).expect("valid mock knobs"));
    }

    pub fn calls(&self, model: &str) -> u64 {
        self.state.calls(model)
    }

    /// Streams the client closed before they ended (a lost race, a cancelled hedge).
    pub fn cancelled(&self) -> u64 {
        self.state.cancelled.load(Ordering::Relaxed)
    }

    pub fn total_calls(&self) -> u64 {
        self.state.total.load(Ordering::Relaxed)
    }

    /// The request bodies received for `model`, oldest first (the last 32).
    pub fn bodies(&self, model: &str) -> Vec<serde_json::Value> {
        self.state
            .bodies
            .lock()
            .map(|b| {
                b.get(model)
                    .map(|v| {
                        v.iter()
                            .filter_map(|b| serde_json::from_slice(b).ok())
                            .collect()
                    })
                    .unwrap_or_default()
            })
            .unwrap_or_default()
    }

    pub fn last_headers(&self) -> Option<http::HeaderMap> {
        self.state.last_headers.lock().ok().and_then(|h| h.clone())
    }
}

impl MockState {
    pub fn set(&self, model: &str, knobs: Knobs) {
        if let Ok(mut k) = self.knobs.write() {
            k.insert(model.to_string(), knobs);
        }
    }

    pub fn calls(&self, model: &str) -> u64 {
        self.calls
            .lock()
            .map(|c| c.get(model).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Counts a call and returns its 0-based index for this model.
    fn record(&self, model: &str, body: &Bytes, headers: &http::HeaderMap) -> u64 {
        self.total.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut h) = self.last_headers.lock() {
            *h = Some(headers.clone());
        }
        if let Ok(mut b) = self.bodies.lock() {
            let list = b.entry(model.to_string()).or_default();
            if list.len() == KEPT_BODIES {
                list.remove(0);
            }
            list.push(body.clone());
        }
        let mut calls = match self.calls.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        };
        let n = calls.entry(model.to_string()).or_insert(0);
        *n += 1;
        *n - 1
    }

    fn knobs_for(&self, model: &str) -> Knobs {
        self.knobs
            .read()
            .ok()
            .and_then(|k| k.get(model).cloned())
            .unwrap_or_default()
    }
}

/// Accepts connections on `listener` forever.
pub async fn serve(listener: TcpListener, state: Arc<MockState>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            // `reset` asks for this connection to be dropped with no answer.
            let reset = Arc::new(tokio::sync::Notify::new());
            let svc = {
                let reset = reset.clone();
                hyper::service::service_fn(move |req| handle(req, state.clone(), reset.clone()))
            };
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                _ = reset.notified() => {}
            }
        });
    }
}

#[derive(Deserialize)]
struct RequestHead {
    #[serde(default)]
    model: String,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

fn full(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<MockBody> {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|e: Infallible| match e {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<MockState>,
    reset: Arc<tokio::sync::Notify>,
) -> Result<Response<MockBody>, BoxError> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let headers = req.headers().clone();
    let body = req.into_body().collect().await?.to_bytes();

    match (&method, path.as_str()) {
        (&Method::GET, "/_mock/calls") => {
            let calls = state.calls.lock().map(|c| c.clone()).unwrap_or_default();
            return Ok(full(
                StatusCode::OK,
                "application/json",
                serde_json::to_vec(&calls)?,
            ));
        }
        (&Method::POST, "/_mock/reset") => {
            if let Ok(mut c) = state.calls.lock() {
                c.clear();
            }
            if let Ok(mut k) = state.knobs.write() {
                k.clear();
            }
            return Ok(full(StatusCode::OK, "application/json", "{}"));
        }
        (&Method::POST, p) if p.starts_with("/_mock/knobs/") => {
            let model = &p["/_mock/knobs/".len()..];
            return match Knobs::parse(&String::from_utf8_lossy(&body)) {
                Ok(k) => {
                    state.set(model, k);
                    Ok(full(StatusCode::OK, "application/json", "{}"))
                }
                Err(e) => Ok(full(StatusCode::BAD_REQUEST, "text/plain", e)),
            };
        }
        _ => {}
    }

    let (path_knobs, rest) = match path.strip_prefix("/k/") {
        Some(tail) => match tail.split_once('/') {
            Some((k, rest)) => (Some(k.to_string()), format!("/{rest}")),
            None => (Some(tail.to_string()), String::new()),
        },
        None => (None, path.clone()),
    };
    if method != Method::POST || !(rest == "/v1/chat/completions" || rest == "/chat/completions") {
        return Ok(full(
            StatusCode::NOT_FOUND,
            "application/json",
            r#"{"error":{"message":"mock: unknown route","type":"invalid_request_error","param":null,"code":null}}"#,
        ));
    }

    let head: RequestHead = match serde_json::from_slice(&body) {
        Ok(h) => h,
        Err(e) => {
            let msg = json!({"error":{"message": format!("mock: invalid JSON: {e}"),"type":"invalid_request_error","param":null,"code":null}});
            return Ok(full(
                StatusCode::BAD_REQUEST,
                "application/json",
                msg.to_string(),
            ));
        }
    };
    let index = state.record(&head.model, &body, &headers);
    let knobs = match path_knobs {
        Some(spec) => Knobs::parse(&spec).map_err(|e| -> BoxError { e.into() })?,
        None => state.knobs_for(&head.model),
    };
    let knobs = if knobs.mix && knobs.fails(index) {
        mixed(knobs, index)
    } else {
        knobs
    };
    if knobs.reset {
        // Drop the connection without an answer (see `serve`).
        reset.notify_one();
        std::future::pending::<()>().await;
    }
    respond(&head, &knobs, index, body.len(), state.cancelled.clone()).await
}

/// Turns a failing call under `mix` into one concrete fault.
fn mixed(mut k: Knobs, index: u64) -> Knobs {
    k.error_rate = 0.0;
    k.fail_first = 0;
    k.status = None;
    match k.mixed_fault(index) {
        knobs::Fault::Status500 => k.status = Some(500),
        knobs::Fault::RateLimited => {
            k.status = Some(429);
            k.retry_after = Some("1".into());
        }
        knobs::Fault::Stall => k.stall = true,
        knobs::Fault::Reset => k.reset = true,
        knobs::Fault::Empty => k.empty = true,
        knobs::Fault::CutBeforeFirstToken => k.cut_after = Some(0),
    }
    if k.status.is_some() {
        // `fails` must say yes for the status to be used.
        k.fail_first = u64::MAX;
    }
    k
}

/// Counts a stream as cancelled if it is dropped before its last frame.
struct StreamGuard {
    done: bool,
    cancelled: Arc<AtomicU64>,
}

impl StreamGuard {
    fn finish(&mut self) {
        self.done = true;
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if !self.done {
            self.cancelled.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn respond(
    head: &RequestHead,
    k: &Knobs,
    index: u64,
    body_len: usize,
    cancelled: Arc<AtomicU64>,
) -> Result<Response<MockBody>, BoxError> {
    if k.stall {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    if !k.latency.is_zero() {
        tokio::time::sleep(k.latency).await;
    }
    if k.fails(index) {
        return Ok(error_response(
            k.status.unwrap_or(500),
            k.retry_after.as_deref(),
            k.code.as_deref(),
        ));
    }
    if k.malformed && !head.stream {
        return Ok(full(
            StatusCode::OK,
            "application/json",
            r#"{"id":"chatcmpl-mock","choices":[{"#,
        ));
    }

    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let content = if k.empty {
        String::new()
    } else {
        k.content
            .clone()
            .unwrap_or_else(|| format!("Hello from {}! This is a mock answer.", head.model))
    };
    let prompt_tokens = (body_len / 4).max(1) as u64;
    let pieces = split_pieces(&content, k.chunks);
    let completion_tokens = pieces.len() as u64;
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens});
    let id = format!("chatcmpl-mock{index}");

    if !head.stream {
        let body = json!({
            "id": id, "object": "chat.completion", "created": created, "model": head.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": null}, "logprobs": null, "finish_reason": k.finish_reason}],
            "usage": usage,
        });
        return Ok(full(
            StatusCode::OK,
            "application/json",
            serde_json::to_vec(&body)?,
        ));
    }

    let include_usage = head
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    let chunk = |delta: serde_json::Value, finish: Option<&str>| -> Bytes {
        let mut c = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": head.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]});
        if include_usage {
            c["usage"] = serde_json::Value::Null;
        }
        Bytes::from(format!("data: {c}\n\n"))
    };
    let mut plan: Vec<(Duration, Result<Bytes, ()>)> = vec![(
        Duration::ZERO,
        Ok(chunk(json!({"role": "assistant", "content": ""}), None)),
    )];
    if k.malformed {
        plan.push((k.ttft, Ok(Bytes::from_static(b"data: {\"id\": oops\n\n"))));
    } else {
        for (i, piece) in pieces.iter().enumerate() {
            if k.cut_after == Some(i) {
                // The pause lets hyper flush what was sent before the connection drops.
                plan.push((k.gap.max(Duration::from_millis(1)), Err(())));
                break;
            }
            let wait = if i == 0 { k.ttft } else { k.gap };
            plan.push((wait, Ok(chunk(json!({"content": piece}), None))));
        }
        if plan.last().is_some_and(|(_, p)| p.is_ok()) {
            plan.push((k.gap, Ok(chunk(json!({}), Some(&k.finish_reason)))));
            if include_usage {
                let u = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": head.model, "choices": [], "usage": usage});
                plan.push((Duration::ZERO, Ok(Bytes::from(format!("data: {u}\n\n")))));
            }
            plan.push((Duration::ZERO, Ok(Bytes::from_static(b"data: [DONE]\n\n"))));
        }
    }

    let guard = StreamGuard {
        done: false,
        cancelled,
    };
    let stream = futures_util::stream::unfold(
        (plan.into_iter(), guard),
        |(mut plan, mut guard)| async move {
            let Some((wait, item)) = plan.next() else {
                guard.finish();
                return None;
            };
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            if item.is_err() {
                // A deliberate cut is not a client cancellation.
                guard.finish();
            }
            let frame = item
                .map(Frame::data)
                .map_err(|_| -> BoxError { "mock: stream cut".into() });
            Some((frame, (plan, guard)))
        },
    );
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    Ok(r)
}

/// Splits `text` into at most `n` pieces on character boundaries (empty text: no pieces).
fn split_pieces(text: &str, n: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    if chars.is_empty() {
        return Vec::new();
    }
    let size = chars.len().div_ceil(n.max(1));
    chars.chunks(size).map(|c| c.iter().collect()).collect()
}

fn error_response(
    status: u16,
    retry_after: Option<&str>,
    code_override: Option<&str>,
) -> Response<MockBody> {
    let (kind, code, message) = match status {
        400 => (
            "invalid_request_error",
            "invalid_value",
            "mock: the request is invalid",
        ),
        401 => (
            "invalid_request_error",
            "invalid_api_key",
            "mock: incorrect API key provided",
        ),
        403 => (
            "invalid_request_error",
            "forbidden",
            "mock: no access to this model",
        ),
        404 => (
            "invalid_request_error",
            "model_not_found",
            "mock: the model does not exist",
        ),
        422 => (
            "invalid_request_error",
            "unprocessable_entity",
            "mock: unprocessable request",
        ),
        429 => (
            "rate_limit_error",
            "rate_limit_exceeded",
            "mock: rate limit reached",
        ),
        _ => (
            "server_error",
            "server_error",
            "mock: the server had an error",
        ),
    };
    let code = code_override.unwrap_or(code);
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    let mut r = full(status, "application/json", body.to_string());
    if let Some(ra) = retry_after.and_then(|v| header::HeaderValue::from_str(v).ok()) {
        r.headers_mut().insert(header::RETRY_AFTER, ra);
    }
    r
}
