//! The mock provider: one implementation that serves the tests, `bench/` and the demo.
//! It speaks the OpenAI wire format, counts calls per model, keeps the last request
//! bodies, and injects faults by knob (see `knobs`).
//!
//! Knobs come from, in order of precedence: the URL (`/k/<knobs>/v1/chat/completions`),
//! the per-model table (`MockServer::set` or `POST /_mock/knobs/<model>`), the defaults.

pub mod formats;
pub mod knobs;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use formats::{Answer, Format, Step, ToolPlan};

use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
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

#[derive(Deserialize, Default)]
struct RequestHead {
    #[serde(default)]
    model: String,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    /// OpenAI `tools[].function.name`, Anthropic `tools[].name`, Gemini
    /// `tools[].functionDeclarations[].name`: the mock calls the first.
    #[serde(default)]
    tools: Vec<ToolHead>,
    #[serde(default)]
    response_format: Option<FormatHead>,
    /// Anthropic's JSON mode arrives as an instruction in the system prompt.
    #[serde(default)]
    system: Option<serde_json::Value>,
    #[serde(default, rename = "generationConfig")]
    generation_config: Option<GenerationHead>,
}

#[derive(Deserialize)]
struct ToolHead {
    name: Option<String>,
    function: Option<NameHead>,
    #[serde(rename = "functionDeclarations")]
    function_declarations: Option<Vec<NameHead>>,
}

#[derive(Deserialize)]
struct NameHead {
    name: String,
}

#[derive(Deserialize)]
struct FormatHead {
    #[serde(rename = "type")]
    kind: String,
    json_schema: Option<SchemaHead>,
}

#[derive(Deserialize)]
struct SchemaHead {
    schema: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct GenerationHead {
    #[serde(rename = "responseMimeType")]
    response_mime_type: Option<String>,
    #[serde(rename = "responseSchema")]
    response_schema: Option<serde_json::Value>,
}

impl RequestHead {
    /// The first tool the request offers.
    fn first_tool(&self) -> Option<String> {
        let t = self.tools.first()?;
        t.name
            .clone()
            .or_else(|| t.function.as_ref().map(|f| f.name.clone()))
            .or_else(|| {
                t.function_declarations
                    .as_ref()
                    .and_then(|d| d.first())
                    .map(|f| f.name.clone())
            })
    }

    /// `Some(schema)` when the request asks for JSON (`Null` when no schema is given).
    fn wants_json(&self) -> Option<serde_json::Value> {
        if let Some(f) = &self.response_format {
            if f.kind == "json_object" || f.kind == "json_schema" {
                return Some(
                    f.json_schema
                        .as_ref()
                        .and_then(|s| s.schema.clone())
                        .unwrap_or_default(),
                );
            }
        }
        if let Some(g) = &self.generation_config {
            if g.response_mime_type.as_deref() == Some("application/json") {
                return Some(g.response_schema.clone().unwrap_or_default());
            }
        }
        let system = match &self.system {
            Some(serde_json::Value::String(s)) => s.as_str(),
            _ => "",
        };
        if system.contains("valid JSON object") {
            // cascade appends the schema after "and nothing else: ".
            let schema = system
                .split_once("and nothing else: ")
                .and_then(|(_, rest)| serde_json::Deserializer::from_str(rest).into_iter().next())
                .and_then(Result::ok)
                .unwrap_or_default();
            return Some(schema);
        }
        None
    }
}

/// A JSON value that satisfies `schema`'s required keys and types (enough for the
/// gateway's and the SDKs' checks).
fn sample_json(schema: &serde_json::Value, depth: usize) -> serde_json::Value {
    use serde_json::{json, Value};
    if depth > 8 {
        return Value::Null;
    }
    if let Some(e) = schema
        .get("enum")
        .and_then(Value::as_array)
        .and_then(|e| e.first())
    {
        return e.clone();
    }
    let kind = match schema.get("type") {
        Some(Value::String(t)) => t.as_str(),
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null")
            .unwrap_or("null"),
        _ if schema.get("properties").is_some() => "object",
        _ => "object",
    };
    match kind {
        "string" => json!("mock"),
        "integer" => json!(1),
        "number" => json!(1.5),
        "boolean" => json!(true),
        "null" => Value::Null,
        "array" => match schema.get("items") {
            Some(items) => json!([sample_json(items, depth + 1)]),
            None => json!([]),
        },
        _ => {
            let mut obj = serde_json::Map::new();
            let props = schema.get("properties").and_then(Value::as_object);
            let keys: Vec<String> = match schema.get("required").and_then(Value::as_array) {
                Some(r) => r
                    .iter()
                    .filter_map(Value::as_str)
                    .map(String::from)
                    .collect(),
                None => props
                    .map(|p| p.keys().cloned().collect())
                    .unwrap_or_default(),
            };
            for k in keys {
                let sub = props
                    .and_then(|p| p.get(&k))
                    .cloned()
                    .unwrap_or(json!({"type": "string"}));
                obj.insert(k, sample_json(&sub, depth + 1));
            }
            if obj.is_empty() && depth == 0 {
                obj.insert("answer".into(), json!("Hello from the mock"));
            }
            Value::Object(obj)
        }
    }
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

fn json_response(status: u16, body: &serde_json::Value) -> Response<MockBody> {
    full(
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        "application/json",
        body.to_string(),
    )
}

/// Where a path puts what the body would otherwise say.
struct FromPath {
    model: Option<String>,
    stream: Option<bool>,
}

/// The API a path belongs to. Gemini puts the model and the streaming flag in the URL;
/// Azure puts the deployment (the model) there.
fn route(path: &str) -> Option<(Format, FromPath)> {
    let none = FromPath {
        model: None,
        stream: None,
    };
    if path == "/v1/chat/completions" || path == "/chat/completions" {
        return Some((Format::OpenAi, none));
    }
    if path == "/v1/messages" {
        return Some((Format::Anthropic, none));
    }
    if let Some((_, rest)) = path.split_once("/openai/deployments/") {
        let deployment = rest.strip_suffix("/chat/completions")?;
        return Some((
            Format::OpenAi,
            FromPath {
                model: Some(deployment.to_string()),
                stream: None,
            },
        ));
    }
    let rest = path.strip_prefix("/v1beta/models/")?;
    let (model, method) = rest.rsplit_once(':')?;
    let stream = match method {
        "generateContent" => false,
        "streamGenerateContent" => true,
        _ => return None,
    };
    Some((
        Format::Gemini,
        FromPath {
            model: Some(model.to_string()),
            stream: Some(stream),
        },
    ))
}

/// The OpenAI paths the mock echoes (files, batches, moderations, audio, images).
fn is_passthrough_route(path: &str) -> bool {
    [
        "/v1/files",
        "/v1/batches",
        "/v1/moderations",
        "/v1/audio/",
        "/v1/images/",
    ]
    .iter()
    .any(|p| path.starts_with(p))
}

/// An embeddings path: OpenAI (`/v1/embeddings`), Azure (`…/deployments/D/embeddings`)
/// or Gemini (`…:batchEmbedContents`).
fn embeddings_route(path: &str) -> Option<Format> {
    if path.ends_with("/embeddings") {
        Some(Format::OpenAi)
    } else if path.ends_with(":batchEmbedContents") {
        Some(Format::Gemini)
    } else {
        None
    }
}

/// A deterministic unit-ish vector for `text`.
fn mock_vector(text: &str, dims: usize) -> Vec<f32> {
    let mut seed = xxhash_rust::xxh3::xxh3_64(text.as_bytes());
    (0..dims)
        .map(|_| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Answers an embeddings call in the request's format; the model's knobs apply
/// (`status`, `fail_first`, `latency`, `dims=N` for the vector size, default 8).
async fn embeddings(
    format: Format,
    path: &str,
    query: &str,
    headers: &HeaderMap,
    body: &Bytes,
    state: &MockState,
    path_knobs: Option<Knobs>,
) -> Result<Response<MockBody>, BoxError> {
    use serde_json::Value;
    if let Some(denied) = auth_error(format, headers, query) {
        return Ok(denied);
    }
    let req: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            let msg = json!({"error": {"message": format!("mock: invalid JSON: {e}"), "type": "invalid_request_error", "param": null, "code": null}});
            return Ok(json_response(400, &msg));
        }
    };
    let model = match format {
        Format::Gemini => path
            .rsplit_once("/models/")
            .and_then(|(_, rest)| rest.split_once(':'))
            .map(|(m, _)| m.to_string())
            .unwrap_or_default(),
        _ => match path.split_once("/openai/deployments/") {
            Some((_, rest)) => rest.trim_end_matches("/embeddings").to_string(),
            None => req["model"].as_str().unwrap_or_default().to_string(),
        },
    };
    let index = state.record(&model, body, headers);
    let k = path_knobs.unwrap_or_else(|| state.knobs_for(&model));
    if !k.latency.is_zero() {
        tokio::time::sleep(k.latency).await;
    }
    if k.fails(index) {
        let status = k.status.unwrap_or(500);
        return Ok(json_response(
            status,
            &formats::error_body(format, status, k.code.as_deref()),
        ));
    }
    let default_dims = k.dims.unwrap_or(8);
    match format {
        Format::Gemini => {
            let requests = req["requests"].as_array().cloned().unwrap_or_default();
            let embeddings: Vec<Value> = requests
                .iter()
                .map(|r| {
                    let text = r["content"]["parts"][0]["text"]
                        .as_str()
                        .unwrap_or_default();
                    let dims = r["outputDimensionality"]
                        .as_u64()
                        .map_or(default_dims, |d| d as usize);
                    json!({"values": mock_vector(text, dims)})
                })
                .collect();
            Ok(json_response(200, &json!({"embeddings": embeddings})))
        }
        _ => {
            let texts: Vec<String> = match &req["input"] {
                Value::String(s) => vec![s.clone()],
                Value::Array(items) if items.iter().all(Value::is_u64) => {
                    vec![Value::Array(items.clone()).to_string()]
                }
                Value::Array(items) => items
                    .iter()
                    .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_string))
                    .collect(),
                _ => Vec::new(),
            };
            let dims = req["dimensions"]
                .as_u64()
                .map_or(default_dims, |d| d as usize);
            let base64 = req["encoding_format"] == "base64";
            let data: Vec<Value> = texts
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    let v = mock_vector(t, dims);
                    let embedding = if base64 {
                        json!(crate::api::embeddings::to_base64(&v))
                    } else {
                        json!(v)
                    };
                    json!({"object": "embedding", "index": i, "embedding": embedding})
                })
                .collect();
            let tokens: usize = texts.iter().map(|t| t.len().div_ceil(4)).sum();
            Ok(json_response(
                200,
                &json!({
                    "object": "list", "data": data, "model": model,
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                }),
            ))
        }
    }
}

/// The credentials each API expects, checked the way the real services do.
fn auth_error(format: Format, headers: &HeaderMap, query: &str) -> Option<Response<MockBody>> {
    let has = |name: &str| headers.get(name).is_some_and(|v| !v.is_empty());
    match format {
        Format::OpenAi => None,
        Format::Anthropic if !has("x-api-key") || !has("anthropic-version") => Some(json_response(
            401,
            &json!({"type": "error", "error": {"type": "authentication_error",
                    "message": "mock: x-api-key and anthropic-version headers are required"}}),
        )),
        Format::Anthropic => None,
        Format::Gemini if query.split('&').any(|kv| kv.starts_with("key=")) => Some(json_response(
            400,
            &json!({"error": {"code": 400, "message": "mock: the API key must not be in the URL", "status": "INVALID_ARGUMENT"}}),
        )),
        Format::Gemini if !has("x-goog-api-key") => Some(json_response(
            403,
            &json!({"error": {"code": 403, "message": "mock: x-goog-api-key header is required", "status": "PERMISSION_DENIED"}}),
        )),
        Format::Gemini => None,
    }
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<MockState>,
    reset: Arc<tokio::sync::Notify>,
) -> Result<Response<MockBody>, BoxError> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
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
        (&Method::GET, p) if p.starts_with("/_mock/bodies/") => {
            // The request bodies the mock kept for a model, oldest first, as text.
            let model = &p["/_mock/bodies/".len()..];
            let bodies: Vec<String> = state
                .bodies
                .lock()
                .map(|b| {
                    b.get(model)
                        .into_iter()
                        .flatten()
                        .map(|x| String::from_utf8_lossy(x).into_owned())
                        .collect()
                })
                .unwrap_or_default();
            return Ok(full(
                StatusCode::OK,
                "application/json",
                serde_json::to_vec(&bodies)?,
            ));
        }
        (&Method::GET, "/_mock/last_headers") => {
            let map: std::collections::BTreeMap<String, String> = state
                .last_headers
                .lock()
                .ok()
                .and_then(|h| h.clone())
                .map(|h| {
                    h.iter()
                        .map(|(k, v)| {
                            (
                                k.to_string(),
                                String::from_utf8_lossy(v.as_bytes()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            return Ok(full(
                StatusCode::OK,
                "application/json",
                serde_json::to_vec(&map)?,
            ));
        }
        (&Method::POST, "/v1/messages/count_tokens") => {
            if let Some(denied) = auth_error(Format::Anthropic, &headers, &query) {
                return Ok(denied);
            }
            let model = serde_json::from_slice::<RequestHead>(&body)
                .map(|h| h.model)
                .unwrap_or_default();
            state.record(&format!("{model}:count_tokens"), &body, &headers);
            let n = (body.len() / 4).max(1);
            return Ok(full(
                StatusCode::OK,
                "application/json",
                format!("{{\"input_tokens\":{n}}}"),
            ));
        }
        (&Method::POST, "/_mock/reset") => {
            if let Ok(mut c) = state.calls.lock() {
                c.clear();
            }
            if let Ok(mut k) = state.knobs.write() {
                k.clear();
            }
            if let Ok(mut b) = state.bodies.lock() {
                b.clear();
            }
            if let Ok(mut h) = state.last_headers.lock() {
                *h = None;
            }
            state.total.store(0, Ordering::Relaxed);
            state.cancelled.store(0, Ordering::Relaxed);
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

    if is_passthrough_route(&path) {
        // Echoes what arrived, so tests can see what a pass-through forwarded.
        let echo = json!({
            "method": method.as_str(), "path": path, "query": query,
            "authorization": headers.get("authorization").and_then(|v| v.to_str().ok()),
            "x_api_key": headers.get("x-api-key").and_then(|v| v.to_str().ok()),
            "content_type": headers.get("content-type").and_then(|v| v.to_str().ok()),
            "bytes": body.len(),
        });
        state.record("passthrough", &body, &headers);
        let status = headers
            .get("x-mock-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(200);
        return Ok(json_response(status, &echo));
    }
    let (path_knobs, rest) = match path.strip_prefix("/k/") {
        Some(tail) => match tail.split_once('/') {
            Some((k, rest)) => (Some(k.to_string()), format!("/{rest}")),
            None => (Some(tail.to_string()), String::new()),
        },
        None => (None, path.clone()),
    };
    if let Some(format) = embeddings_route(&rest) {
        let knobs = match &path_knobs {
            Some(spec) => Some(Knobs::parse(spec).map_err(|e| -> BoxError { e.into() })?),
            None => None,
        };
        return embeddings(format, &rest, &query, &headers, &body, &state, knobs).await;
    }
    let Some((format, from_path)) = route(&rest).filter(|_| method == Method::POST) else {
        return Ok(json_response(
            404,
            &json!({"error": {"message": "mock: unknown route", "type": "invalid_request_error", "param": null, "code": null}}),
        ));
    };
    if from_path.model.is_some() && format == Format::OpenAi && !query.contains("api-version=") {
        return Ok(json_response(
            404,
            &json!({"error": {"code": "404", "message": "mock: Azure needs an api-version query parameter"}}),
        ));
    }
    if let Some(denied) = auth_error(format, &headers, &query) {
        return Ok(denied);
    }
    let mut head: RequestHead = match serde_json::from_slice(&body) {
        Ok(h) => h,
        Err(e) if format != Format::Gemini => {
            let msg = json!({"error": {"message": format!("mock: invalid JSON: {e}"), "type": "invalid_request_error", "param": null, "code": null}});
            return Ok(json_response(400, &msg));
        }
        Err(_) => RequestHead::default(),
    };
    if let Some(model) = from_path.model {
        head.model = model;
    }
    if let Some(stream) = from_path.stream {
        head.stream = stream;
    }
    let index = state.record(&head.model, &body, &headers);
    let knobs = match path_knobs {
        Some(spec) => Knobs::parse(&spec).map_err(|e| -> BoxError { e.into() })?,
        None => state.knobs_for(&head.model),
    };
    let knobs = if (knobs.mix || knobs.mix_slow) && knobs.fails(index) {
        mixed(knobs, index)
    } else {
        knobs
    };
    if knobs.reset {
        // Drop the connection without an answer (see `serve`).
        reset.notify_one();
        std::future::pending::<()>().await;
    }
    respond(
        format,
        &head,
        &knobs,
        index,
        body.len(),
        state.cancelled.clone(),
    )
    .await
}

/// Turns a failing call under `mix` into one concrete fault.
fn mixed(mut k: Knobs, index: u64) -> Knobs {
    k.error_rate = 0.0;
    k.fail_first = 0;
    k.status = None;
    if k.mix_slow {
        let pick = k.seed.map_or(index, |s| index.wrapping_add(s));
        match pick % 2 {
            0 => k.stall = true,
            _ => k.latency = Duration::from_secs(45),
        }
        return k;
    }
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

/// The format-neutral answer the knobs ask for.
fn plan_answer(
    format: Format,
    head: &RequestHead,
    k: &Knobs,
    index: u64,
    body_len: usize,
) -> Answer {
    // The mock follows the request: it calls the first tool offered (unless
    // `no_tools`), and answers JSON (matching a schema's required keys) when asked to.
    let tool_name = k
        .tool
        .clone()
        .or_else(|| head.first_tool().filter(|_| !k.no_tools));
    let content = if k.empty || k.blocked {
        String::new()
    } else {
        k.content.clone().unwrap_or_else(|| {
            if tool_name.is_some() {
                String::new()
            } else if let Some(schema) = head.wants_json() {
                sample_json(&schema, 0).to_string()
            } else {
                format!("Hello from {}! This is a mock answer.", head.model)
            }
        })
    };
    let pieces = split_pieces(&content, k.chunks);
    let tool = tool_name
        .as_ref()
        .filter(|_| !k.empty && !k.blocked)
        .map(|name| ToolPlan {
            id: format!("call_mock{index}"),
            name: name.clone(),
            fragments: vec!["{\"city\":".into(), " \"Par".into(), "is\"}".into()],
        });
    let finish = k.finish_reason.clone().unwrap_or_else(|| {
        if k.blocked {
            "content_filter".into()
        } else if tool.is_some() {
            "tool_calls".into()
        } else {
            "stop".into()
        }
    });
    let id = match format {
        Format::OpenAi => format!("chatcmpl-mock{index}"),
        Format::Anthropic => format!("msg_mock{index}"),
        Format::Gemini => format!("mockresp{index}"),
    };
    Answer {
        id,
        model: head.model.clone(),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        completion_tokens: (pieces.len() + usize::from(tool.is_some())) as u64,
        pieces,
        tool,
        finish,
        prompt_tokens: (body_len / 4).max(1) as u64,
        cached_tokens: k.cached.min((body_len / 4).max(1) as u64),
        include_usage: head
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage),
        blocked: k.blocked,
    }
}

async fn respond(
    format: Format,
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
        let status = k.status.unwrap_or(500);
        let mut r = json_response(
            status,
            &formats::error_body(format, status, k.code.as_deref()),
        );
        if let Some(ra) = k
            .retry_after
            .as_deref()
            .and_then(|v| header::HeaderValue::from_str(v).ok())
        {
            r.headers_mut().insert(header::RETRY_AFTER, ra);
        }
        return Ok(r);
    }
    if k.malformed && !head.stream {
        return Ok(full(
            StatusCode::OK,
            "application/json",
            r#"{"id":"chatcmpl-mock","choices":[{"#,
        ));
    }
    let answer = plan_answer(format, head, k, index, body_len);
    if !head.stream {
        return Ok(json_response(200, &formats::body(format, &answer)));
    }

    // The stream as steps, each with the wait before it.
    let mut steps: Vec<(Duration, Step)> = vec![(Duration::ZERO, Step::Start)];
    // A malformed stream sends its role chunk, then garbage.
    let mut cut = k.malformed;
    for i in (0..answer.pieces.len()).filter(|_| !k.malformed) {
        if k.cut_after == Some(i) || k.error_event_after == Some(i) {
            cut = true;
            break;
        }
        steps.push((if i == 0 { k.ttft } else { k.gap }, Step::Piece(i)));
    }
    if !cut {
        if let Some(t) = &answer.tool {
            steps.push((
                if answer.pieces.is_empty() {
                    k.ttft
                } else {
                    k.gap
                },
                Step::ToolStart,
            ));
            for i in 0..t.fragments.len() {
                steps.push((k.gap, Step::ToolFragment(i)));
            }
        }
        // Cut (or an error event) after every content chunk: before the finish.
        if k.cut_after == Some(answer.pieces.len())
            || k.error_event_after == Some(answer.pieces.len())
        {
            cut = true;
        } else {
            steps.push((k.gap, Step::Finish));
        }
    }
    let mut frames: Vec<(Duration, Result<Bytes, ()>)> = steps
        .iter()
        .filter_map(|(wait, step)| formats::event(format, &answer, step).map(|b| (*wait, Ok(b))))
        .collect();
    if k.malformed {
        frames.push((k.ttft, Ok(Bytes::from_static(b"data: {\"id\": oops\n\n"))));
    } else if k.error_event_after.is_some() && cut {
        if let Some(b) = formats::event(format, &answer, &Step::Error) {
            frames.push((k.gap, Ok(b)));
        }
    } else if cut {
        // The pause lets hyper flush what was sent before the connection drops.
        frames.push((k.gap.max(Duration::from_millis(1)), Err(())));
    } else {
        frames.extend(
            formats::tail(format, &answer)
                .into_iter()
                .map(|b| (Duration::ZERO, Ok(b))),
        );
    }

    let guard = StreamGuard {
        done: false,
        cancelled,
    };
    let stream = futures_util::stream::unfold(
        (frames.into_iter(), guard),
        |(mut frames, mut guard)| async move {
            let Some((wait, item)) = frames.next() else {
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
            Some((frame, (frames, guard)))
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
