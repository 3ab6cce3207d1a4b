//! The chat surfaces (`POST /v1/chat/completions`, `/v1/responses`, `/v1/messages`):
//! read and parse the body once into the internal chat request, resolve the chain, run
//! the engine, and write its outcome in the surface's own JSON or events with the
//! `x-cascade-*` headers.

use crate::name::Name;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use bytes::Bytes;
use tokio::time::Instant;

use super::record::{failure_class, Answered, Ledger};
use super::sse::{self, InflightGuard};
use super::{surface_error, AppState};
use crate::api::surface::Surface;
use crate::api::{messages, responses, ApiError, ChatRequest};
use crate::cache::{self, Outcome as CacheOutcome, ResponseCache};
use crate::config::{Chain, Model};
use crate::providers::Completion;
use crate::routing::engine::{Answer, AttemptRecord, Outcome, Skipped};
use crate::routing::resolve;
use crate::routing::target::RequestCtx;
use crate::shadow::{Served, ServedChunks};

const X_CHAIN: HeaderName = HeaderName::from_static("x-cascade-chain");
const X_MODEL: HeaderName = HeaderName::from_static("x-cascade-model");
const X_PROVIDER: HeaderName = HeaderName::from_static("x-cascade-provider");
const X_ATTEMPTS: HeaderName = HeaderName::from_static("x-cascade-attempts");
const X_FALLBACKS: HeaderName = HeaderName::from_static("x-cascade-fallbacks");
const X_TRACE: HeaderName = HeaderName::from_static("x-cascade-trace");
const X_COST: HeaderName = HeaderName::from_static("x-cascade-cost-usd");
const X_CACHE: HeaderName = HeaderName::from_static("x-cascade-cache");
const X_SHADOW: HeaderName = HeaderName::from_static("x-cascade-shadow");
const X_DROPPED_TOOLS: HeaderName = HeaderName::from_static("x-cascade-dropped-tools");
pub(super) const X_TASK: &str = "x-cascade-task";
const X_TIMEOUT_MS: &str = "x-cascade-timeout-ms";
/// Room for every header an answer carries, reserved once (growing a `HeaderMap`
/// rehashes it).
const RESPONSE_HEADERS: usize = 13;
/// Label used for requests rejected before a chain was known.
const NO_CHAIN: &str = "none";

/// The surface a chat-like request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inbound {
    Chat,
    Responses,
    Messages,
    Embeddings,
}

impl Inbound {
    pub(super) fn label(self) -> &'static str {
        match self {
            Inbound::Chat => "chat",
            Inbound::Responses => "responses",
            Inbound::Messages => "messages",
            Inbound::Embeddings => "embeddings",
        }
    }

    /// The surface errors are written in before the request is parsed.
    pub(super) fn error_surface(self) -> Surface {
        match self {
            Inbound::Messages => Surface::Messages,
            _ => Surface::Chat,
        }
    }
}

/// A Responses turn: what is kept with its answer for a follow-up.
pub struct Turn {
    tenant: u128,
    history: Vec<serde_json::Value>,
    input: Vec<serde_json::Value>,
    store: bool,
}

/// A request on its surface, translated to the internal chat request.
pub(super) struct Prepared {
    pub(super) req: ChatRequest,
    pub(super) surface: Surface,
    turn: Option<Arc<Turn>>,
    pub(super) dropped_tools: Vec<String>,
}

pub(super) async fn prepare(
    app: &AppState,
    inbound: Inbound,
    body: Bytes,
    headers: &HeaderMap,
) -> Result<Prepared, ApiError> {
    match inbound {
        Inbound::Chat => Ok(Prepared {
            req: ChatRequest::parse(body)?,
            surface: Surface::Chat,
            turn: None,
            dropped_tools: Vec::new(),
        }),
        Inbound::Responses => {
            let wire = responses::parse(&body)?;
            let tenant = crate::api::tenant(headers);
            let history = match &wire.previous_response_id {
                Some(id) => {
                    let kept = app.responses.get(tenant, id).await.ok_or_else(|| {
                        ApiError::new(
                            StatusCode::NOT_FOUND,
                            "invalid_request_error",
                            format!("Previous response with id '{id}' not found."),
                        )
                        .with_param("previous_response_id")
                    })?;
                    serde_json::from_slice(&kept.items).unwrap_or_default()
                }
                None => Vec::new(),
            };
            let t = responses::translate(wire, &history)?;
            let req = t.chat;
            let store = t.echo.store;
            Ok(Prepared {
                req,
                surface: Surface::Responses(Box::new(responses::Meta::new(t.echo))),
                turn: Some(Arc::new(Turn {
                    tenant,
                    history,
                    input: t.input_items,
                    store,
                })),
                dropped_tools: t.dropped_tools,
            })
        }
        Inbound::Embeddings => Ok(Prepared {
            req: ChatRequest::for_embedding(crate::api::embeddings::EmbeddingRequest::parse(body)?),
            surface: Surface::Embeddings,
            turn: None,
            dropped_tools: Vec::new(),
        }),
        Inbound::Messages => {
            let (t, mut native) = messages::translate(&body)?;
            native.version = headers.get("anthropic-version").cloned();
            native.beta = headers.get("anthropic-beta").cloned();
            let mut req = t.chat;
            if req.messages == 0 {
                return Err(ApiError::invalid_request(
                    "messages: the request has no message cascade can send",
                )
                .with_param("messages"));
            }
            req.native = Some(Arc::new(native));
            Ok(Prepared {
                req,
                surface: Surface::Messages,
                turn: None,
                dropped_tools: t.dropped_tools,
            })
        }
    }
}

pub async fn chat_completions(app: State<Arc<AppState>>, request: Request) -> Response<Body> {
    handle(app, request, Inbound::Chat).await
}

pub async fn responses(app: State<Arc<AppState>>, request: Request) -> Response<Body> {
    handle(app, request, Inbound::Responses).await
}

pub async fn messages(app: State<Arc<AppState>>, request: Request) -> Response<Body> {
    handle(app, request, Inbound::Messages).await
}

pub async fn embeddings(app: State<Arc<AppState>>, request: Request) -> Response<Body> {
    handle(app, request, Inbound::Embeddings).await
}

async fn handle(
    State(app): State<Arc<AppState>>,
    request: Request,
    inbound: Inbound,
) -> Response<Body> {
    let start = Instant::now();
    // Taken apart rather than extracted: the `HeaderMap` extractor clones the headers.
    let (parts, body) = request.into_parts();
    let headers = parts.headers;
    let inflight = InflightGuard::new(&app.metrics.inflight);
    let ledger = Ledger::new(&app, &headers, start, inbound.label());
    let early = inbound.error_surface();

    let prepared = match read_body(body, &headers, ledger.config.server.max_body).await {
        Ok(bytes) => prepare(&app, inbound, bytes, &headers).await,
        Err(e) => Err(e),
    };
    let Prepared {
        req,
        surface,
        turn,
        dropped_tools,
    } = match prepared {
        Ok(p) => p,
        Err(e) => return rejected(&app, ledger, &e, &early),
    };
    let on = Surfaced { surface, turn };
    let request_id = ledger.request_id.clone();
    let work = answer(&app, &headers, start, inflight, ledger, req, &on);
    // The end of a drain answers what is still waiting (its ledger records 503).
    let mut resp = tokio::select! {
        biased;
        r = work => r,
        () = app.drain.stopped() => surface_error(&on.surface, &super::drain::shutting_down()),
    };
    if !dropped_tools.is_empty() {
        tracing::info!(
            request_id = &*request_id,
            tools = %dropped_tools.join(","),
            "tools no target can run were dropped from the upstream request"
        );
        if let Ok(v) = HeaderValue::from_str(&dropped_tools.join(",")) {
            resp.headers_mut().insert(X_DROPPED_TOOLS, v);
        }
    }
    resp
}

/// A whole answer as the engine (or the cache) has it.
#[derive(Clone, Copy)]
struct WholeAnswer<'a> {
    /// OpenAI `chat.completion` bytes.
    chat: &'a Bytes,
    /// The upstream's own body, when it speaks the surface's format.
    native: Option<&'a Bytes>,
    /// The answer already read, when judging read it.
    read: Option<&'a crate::api::answer::ChatAnswer>,
}

impl<'a> WholeAnswer<'a> {
    fn of(c: &'a Completion) -> WholeAnswer<'a> {
        WholeAnswer {
            chat: &c.body,
            native: c.native.as_ref(),
            read: c.answer.as_deref(),
        }
    }
}

/// The surface a request is answered on, and its Responses turn.
pub struct Surfaced {
    pub surface: Surface,
    pub turn: Option<Arc<Turn>>,
}

impl Surfaced {
    /// A whole answer in the surface's format; a Responses answer is kept for
    /// follow-ups unless the request said `store: false`.
    fn body(
        &self,
        app: &AppState,
        answer: WholeAnswer<'_>,
        model: &Model,
    ) -> Result<Bytes, serde_json::Error> {
        if let (Surface::Responses(meta), Some(turn)) = (&self.surface, &self.turn) {
            let v = match answer.read {
                Some(a) => responses::from_answer(meta, &model.model_id, a),
                None => responses::from_chat(meta, &model.model_id, answer.chat)?,
            };
            if turn.store {
                app.responses
                    .keep(turn.tenant, &turn.history, &turn.input, &v);
            }
            return serde_json::to_vec(&v).map(Bytes::from);
        }
        self.surface
            .complete(answer.chat, answer.native, answer.read, &model.model_id)
    }

    /// A whole answer as a JSON response; an answer that cannot be written in the
    /// surface's format (a judged body the surface cannot read) is a 502, never a chat
    /// body served to a client of another API.
    fn json_answer(
        &self,
        app: &AppState,
        answer: WholeAnswer<'_>,
        model: &Model,
    ) -> Response<Body> {
        match self.body(app, answer, model) {
            Ok(b) => {
                let mut r = Response::new(Body::from(b));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                r
            }
            Err(e) => self.error(
                &ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "server_error",
                    format!("the upstream answer could not be translated: {e}"),
                )
                .with_code("untranslatable_answer"),
            ),
        }
    }

    /// Where a completed Responses stream's final object goes.
    fn on_complete(&self, app: &AppState) -> Option<sse::OnComplete> {
        let turn = self.turn.clone().filter(|t| t.store)?;
        let state = app.responses.clone();
        Some(Box::new(move |v| {
            state.keep(turn.tenant, &turn.history, &turn.input, &v)
        }))
    }

    fn error(&self, e: &ApiError) -> Response<Body> {
        surface_error(&self.surface, e)
    }
}

async fn answer(
    app: &Arc<AppState>,
    headers: &HeaderMap,
    start: Instant,
    inflight: InflightGuard,
    mut ledger: Ledger,
    req: ChatRequest,
    on: &Surfaced,
) -> Response<Body> {
    ledger.stream = req.stream;
    let task = headers.get(X_TASK).and_then(|v| v.to_str().ok());
    let chain = match resolve(&ledger.config, task, req.model.as_deref()) {
        Ok(c) => c.clone(),
        Err(e) => return rejected(app, ledger, &e, &on.surface),
    };
    ledger.chain = Some(chain.clone());
    if let Err(e) = serves_kind(&chain, &req) {
        return rejected(app, ledger, &e, &on.surface);
    }
    let timeout = match request_timeout(headers, &chain) {
        Ok((t, _)) => t,
        Err(e) => return rejected(app, ledger, &e, &on.surface),
    };
    let ctx = Arc::new(RequestCtx::for_request(
        start + timeout,
        chain.max_attempts,
        ledger.request_id.clone(),
        chain.name,
        app.store.clone(),
    ));
    ledger.ctx = Some(ctx.clone());
    let req = Arc::new(req);

    let decision = app.cache.decide(&chain, &req, headers);
    if let (true, Some(key)) = (decision.read, decision.key) {
        if let Some(entry) = app.cache.get(key).await.filter(|e| e.is_fresh()) {
            if let Some(resp) = cached(app, &chain, &entry, &req, CacheOutcome::Hit, start, on) {
                ledger.cache = CacheOutcome::Hit.as_str();
                ledger.finish(from_cache(&chain, &entry, 0));
                return resp;
            }
        }
    }
    let label = decision.unread_outcome();
    ledger.cache = label.as_str();

    if req.stream {
        let outcome = app.engine.run(&chain, req.clone(), &ctx).await;
        if let Some(resp) = stale_instead(
            app,
            &chain,
            &req,
            &decision,
            outcome.result.as_ref().err(),
            start,
            on,
        )
        .await
        {
            ledger.cache = CacheOutcome::Stale.as_str();
            let attempts = outcome.attempts.len();
            ledger.finish(from_cache(&chain, &resp.1, attempts));
            return resp.0;
        }
        let store = match (decision.write, decision.key) {
            (true, Some(key)) => Some(StreamStore {
                cache: app.cache.clone(),
                key,
                ttl: decision.ttl,
                wants_json: req.wants_json,
            }),
            _ => None,
        };
        return respond_stream(
            app, &chain, &req, outcome, start, inflight, store, label, ledger, ctx, on,
        );
    }

    // Identical misses share one upstream call; the one that runs it stores the answer
    // (and its calls are recorded by its context). The others paid nothing for it.
    let ran = std::sync::atomic::AtomicBool::new(false);
    let run = || async {
        ran.store(true, std::sync::atomic::Ordering::Relaxed);
        let finished = Finished::from(app.engine.run(&chain, req.clone(), &ctx).await);
        if let (true, Some(key), Ok((model, c))) = (decision.write, decision.key, &finished.result)
        {
            if cache::storable_finish(c.finish_reason.as_deref()) && !c.refused {
                app.cache
                    .put(
                        key,
                        c.body.clone(),
                        model.name,
                        model.provider.name,
                        decision.ttl,
                        c.usage.is_some(),
                    )
                    .await;
            }
        }
        finished
    };
    // A caller with its own deadline does not share a flight (it could inherit a
    // shorter one, or hand its short one to others).
    let finished = match decision.key.filter(|_| !headers.contains_key(X_TIMEOUT_MS)) {
        Some(key) => app.cache.single_flight(key, run).await,
        None => Arc::new(run().await),
    };
    if let Some(resp) = stale_instead(
        app,
        &chain,
        &req,
        &decision,
        finished.result.as_ref().err(),
        start,
        on,
    )
    .await
    {
        ledger.cache = CacheOutcome::Stale.as_str();
        ledger.finish(from_cache(&chain, &resp.1, finished.attempts.len()));
        return resp.0;
    }
    let joined = !ran.load(std::sync::atomic::Ordering::Relaxed);
    // A sampled answer (one the gateway called for, not a shared one) is also tried
    // on the chain's shadow models, on their own tasks.
    let shadows = match &finished.result {
        Ok((model, c)) if !joined && req.embedding.is_none() && app.shadow.sampled(&chain) => {
            app.shadow.start(
                &chain,
                &req,
                &ledger.request_id,
                model,
                c.usage,
                Served::Now {
                    body: c.body.clone(),
                    latency_ms: ledger.elapsed_ms(),
                },
            )
        }
        _ => Vec::new(),
    };
    let mut resp = respond_complete(app, &chain, &finished, start, label, ledger, joined, on);
    if let Some(v) = shadow_header(&shadows) {
        resp.headers_mut().insert(X_SHADOW, v);
    }
    resp
}

/// A chat chain serves chat surfaces and an embedding chain `/v1/embeddings`.
pub(super) fn serves_kind(chain: &Chain, req: &ChatRequest) -> Result<(), ApiError> {
    use crate::config::ModelKind;
    let kind = chain
        .targets
        .first()
        .map_or(ModelKind::Chat, |t| t.model.kind);
    match (kind, req.embedding.is_some()) {
        (ModelKind::Chat, true) => Err(ApiError::invalid_request(format!(
            "The chain '{}' serves chat models, not embeddings: name an embedding chain.",
            chain.name
        ))
        .with_param("model")),
        (ModelKind::Embedding, false) => Err(ApiError::invalid_request(format!(
            "The chain '{}' serves embedding models: use /v1/embeddings.",
            chain.name
        ))
        .with_param("model")),
        _ => Ok(()),
    }
}

/// `x-cascade-shadow`: the shadow calls started, in config order.
fn shadow_header(names: &[Name]) -> Option<HeaderValue> {
    if names.is_empty() {
        return None;
    }
    let joined: Vec<&str> = names.iter().map(|n| &**n).collect();
    HeaderValue::from_str(&joined.join(",")).ok()
}

/// The pool model of `chain` named `name` (a cached answer's).
/// The model a cached entry is served as, when it can answer this request: usage
/// stored where usage is expected, and its model still in the chain.
pub(super) fn servable<'a>(
    chain: &'a Chain,
    entry: &cache::Entry,
    req: &ChatRequest,
) -> Option<&'a Model> {
    if !entry.serves(req) {
        return None;
    }
    chain_model(chain, &entry.model)
}

fn chain_model<'a>(chain: &'a Chain, name: &str) -> Option<&'a Model> {
    chain
        .targets
        .iter()
        .map(|t| &*t.model)
        .find(|m| &*m.name == name)
}

/// The record of an answer served from the cache: no cost, no call of its own.
fn from_cache<'a>(chain: &'a Chain, entry: &cache::Entry, attempts: usize) -> Answered<'a> {
    Answered {
        status: 200,
        model: chain_model(chain, &entry.model),
        attempts,
        fallbacks: 0,
        ttft: None,
        usage: None,
        charged: false,
        error_type: None,
    }
}

/// A non-streaming outcome, shareable between the callers of one single flight.
struct Finished {
    attempts: Vec<AttemptRecord>,
    skipped: Vec<Skipped>,
    fallbacks: usize,
    upstream_time: std::time::Duration,
    result: Result<(Arc<Model>, Completion), ApiError>,
}

impl From<Outcome> for Finished {
    fn from(o: Outcome) -> Self {
        let result = match o.result {
            Ok((model, Answer::Complete(c))) => Ok((model, c)),
            Ok((_, Answer::Stream(_))) => Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "a stream answered a non-streaming request",
            )),
            Err(e) => Err(e),
        };
        Finished {
            attempts: o.attempts,
            skipped: o.skipped,
            fallbacks: o.fallbacks,
            upstream_time: o.upstream_time,
            result,
        }
    }
}

/// Where a streamed answer is stored once it completes.
pub struct StreamStore {
    pub cache: Arc<ResponseCache>,
    pub key: cache::Key,
    pub ttl: std::time::Duration,
    pub wants_json: bool,
}

/// When the whole chain failed (not the caller's own error), a stale entry answers.
#[allow(clippy::too_many_arguments)]
async fn stale_instead(
    app: &AppState,
    chain: &Chain,
    req: &ChatRequest,
    decision: &cache::Decision,
    error: Option<&ApiError>,
    start: Instant,
    on: &Surfaced,
) -> Option<(Response<Body>, Arc<cache::Entry>)> {
    let e = error?;
    let chain_failed = e.status.is_server_error() || e.status == StatusCode::TOO_MANY_REQUESTS;
    if !(chain_failed && decision.stale) {
        return None;
    }
    let entry = app.cache.get(decision.key?).await?;
    let resp = cached(app, chain, &entry, req, CacheOutcome::Stale, start, on)?;
    Some((resp, entry))
}

/// An answer from the cache, as JSON or replayed as a stream; `None` when the entry
/// cannot answer this request (no usage stored where usage is expected, or a body that
/// does not replay), which then goes upstream like a miss.
fn cached(
    app: &AppState,
    chain: &Chain,
    entry: &cache::Entry,
    req: &ChatRequest,
    outcome: CacheOutcome,
    start: Instant,
    on: &Surfaced,
) -> Option<Response<Body>> {
    let model = servable(chain, entry, req)?;
    let mut resp = if req.stream {
        let chat = matches!(on.surface, Surface::Chat);
        let mut events = cache::replay(&entry.body, req.include_usage || !chat)?;
        if !chat {
            // The replayed chat chunks, written as this surface's events.
            let mut enc = on.surface.encoder(&model.model_id, false);
            let mut out = Vec::new();
            for e in &events {
                if let Some(data) = crate::api::answer::unframe(e) {
                    enc.chunk(data, &mut out);
                }
            }
            enc.done(None, &mut out);
            if let (Some(keep), Some(v)) = (on.on_complete(app), enc.take_completed()) {
                keep(v);
            }
            events = vec![Bytes::from(out)];
        }
        let stream =
            futures_util::stream::iter(events.into_iter().map(Ok::<_, std::convert::Infallible>));
        let mut r = Response::new(Body::from_stream(stream));
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        r
    } else {
        let answer = WholeAnswer {
            chat: &entry.body,
            native: None,
            read: None,
        };
        on.json_answer(app, answer, model)
    };
    app.metrics.count_cache(chain, outcome.as_str());
    observe(app, chain, start, std::time::Duration::ZERO, StatusCode::OK);
    let h = resp.headers_mut();
    h.insert(X_CACHE, HeaderValue::from_static(outcome.as_str()));
    if outcome == CacheOutcome::Stale {
        h.insert(header::AGE, HeaderValue::from(entry.age_secs()));
        h.insert(
            header::WARNING,
            HeaderValue::from_static("110 - \"Response is Stale\""),
        );
    }
    if let Ok(v) = HeaderValue::from_str(&chain.name) {
        h.insert(X_CHAIN, v);
    }
    if let Ok(v) = HeaderValue::from_str(&entry.model) {
        h.insert(X_MODEL, v);
    }
    if let Ok(v) = HeaderValue::from_str(&entry.provider) {
        h.insert(X_PROVIDER, v);
    }
    h.insert(X_ATTEMPTS, HeaderValue::from(0));
    h.insert(X_FALLBACKS, HeaderValue::from(0));
    Some(resp)
}

/// Request metrics shared by every way of answering.
fn observe(
    app: &AppState,
    chain: &Chain,
    start: Instant,
    upstream: std::time::Duration,
    status: StatusCode,
) {
    let elapsed = start.elapsed();
    app.metrics
        .overhead
        .observe(elapsed.saturating_sub(upstream).as_secs_f64());
    app.metrics.observe_request(chain, status, elapsed);
}

fn rejected(app: &AppState, ledger: Ledger, e: &ApiError, surface: &Surface) -> Response<Body> {
    ledger.finish(Answered::rejected(e));
    app.metrics
        .requests_total
        .with_label_values(&[NO_CHAIN, e.status.as_str()])
        .inc();
    let mut r = surface_error(surface, e);
    r.headers_mut()
        .insert(X_CACHE, HeaderValue::from_static("bypass"));
    r
}

/// The request's deadline on `chain`, and whether the client's header shortened it.
pub(super) fn request_timeout(
    headers: &HeaderMap,
    chain: &Chain,
) -> Result<(std::time::Duration, bool), ApiError> {
    Ok(match client_timeout(headers)? {
        Some(t) if t < chain.request_timeout => (t, true),
        _ => (chain.request_timeout, false),
    })
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
fn format_cost(usd: f64) -> Option<HeaderValue> {
    // Ten decimals as an integer count of 1e-10 USD, trailing zeros trimmed: no float
    // formatting (and its three allocations) on every answer.
    const UNITS_PER_USD: u64 = 10_000_000_000;
    let units = (usd * UNITS_PER_USD as f64).round();
    if !(0.0..1e19).contains(&units) {
        return None;
    }
    let units = units as u64;
    let mut out = [0u8; 40];
    let mut whole = itoa::Buffer::new();
    let whole = whole.format(units / UNITS_PER_USD).as_bytes();
    let mut len = whole.len();
    out[..len].copy_from_slice(whole);
    out[len] = b'.';
    len += 1;
    let mut frac = units % UNITS_PER_USD;
    if frac == 0 {
        out[len] = b'0';
        len += 1;
    } else {
        let mut digits = [b'0'; 10];
        for d in digits.iter_mut().rev() {
            *d = b'0' + (frac % 10) as u8;
            frac /= 10;
        }
        let used = digits.iter().rposition(|&d| d != b'0').map_or(1, |i| i + 1);
        out[len..len + used].copy_from_slice(&digits[..used]);
        len += used;
    }
    HeaderValue::from_bytes(&out[..len]).ok()
}

/// Small counts as static header values (no allocation); larger ones are formatted.
fn count_header(n: usize) -> HeaderValue {
    const SMALL: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
    match SMALL.get(n) {
        Some(s) => HeaderValue::from_static(s),
        None => HeaderValue::from(n),
    }
}

/// `x-cascade-trace`: `MODEL:skipped:REASON` per target left out without a call, then
/// `MODEL:OUTCOME:MS` per attempt, in order (`MODEL:OUTCOME:MS:last_resort` for a
/// target called through its open breaker before giving up).
fn trace(attempts: &[AttemptRecord], skipped: &[Skipped]) -> Option<HeaderValue> {
    if attempts.is_empty() && skipped.is_empty() {
        return None;
    }
    let mut out = String::with_capacity((attempts.len() + skipped.len()) * 32);
    for s in skipped {
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(&s.model.name);
        out.push_str(":skipped:");
        out.push_str(s.reason);
    }
    for a in attempts {
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(&a.model.name);
        out.push(':');
        a.write_outcome(&mut out);
        out.push(':');
        out.push_str(itoa::Buffer::new().format(a.latency.as_millis()));
        if a.last_resort {
            out.push_str(":last_resort");
        }
    }
    HeaderValue::from_str(&out).ok()
}

/// Reads the body up to `limit` bytes; a larger one is a 413.
pub(super) async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
) -> Result<Bytes, ApiError> {
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
    match crate::body::read_all(http_body_util::Limited::new(body, limit)).await {
        Ok(bytes) => Ok(bytes),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(ApiError::invalid_request(format!(
            "could not read the request body: {e}"
        ))),
    }
}

#[allow(clippy::too_many_arguments)]
fn respond_complete(
    app: &AppState,
    chain: &Chain,
    f: &Finished,
    start: Instant,
    label: CacheOutcome,
    ledger: Ledger,
    joined: bool,
    on: &Surfaced,
) -> Response<Body> {
    app.metrics.count_cache(chain, label.as_str());
    let (mut resp, answered_by) = match &f.result {
        Ok((model, c)) => {
            let cost = c.usage.map(|u| {
                app.metrics.record_usage(model, &u);
                model.cost_usd(&u)
            });
            let mut r = on.json_answer(app, WholeAnswer::of(c), model);
            let h = r.headers_mut();
            h.reserve(RESPONSE_HEADERS);
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            if let Some(v) = cost.and_then(format_cost) {
                h.insert(X_COST, v);
            }
            (r, Some(model))
        }
        Err(e) => (on.error(e), None),
    };
    observe(app, chain, start, f.upstream_time, resp.status());
    // A caller that joined another's flight made no call and paid nothing: its row
    // says who answered, with no attempts and no cost (the runner's row has them).
    ledger.finish(Answered {
        status: resp.status().as_u16(),
        model: answered_by.map(|m| &**m),
        attempts: if joined { 0 } else { f.attempts.len() },
        fallbacks: f.fallbacks,
        ttft: None,
        usage: f.result.as_ref().ok().and_then(|(_, c)| c.usage),
        charged: !joined,
        error_type: f
            .result
            .as_ref()
            .err()
            .map(|e| failure_class(e, &f.attempts)),
    });
    outcome_headers(
        resp.headers_mut(),
        chain,
        &f.attempts,
        &f.skipped,
        f.fallbacks,
        answered_by,
        label,
    );
    resp
}

#[allow(clippy::too_many_arguments)]
fn respond_stream(
    app: &AppState,
    chain: &Arc<Chain>,
    req: &Arc<ChatRequest>,
    outcome: Outcome,
    start: Instant,
    inflight: InflightGuard,
    store: Option<StreamStore>,
    label: CacheOutcome,
    ledger: Ledger,
    ctx: Arc<RequestCtx>,
    on: &Surfaced,
) -> Response<Body> {
    app.metrics.count_cache(chain, label.as_str());
    let mut ledger = Some(ledger);
    let mut shadows = Vec::new();
    let (mut resp, answered_by) = match outcome.result {
        Ok((model, Answer::Stream(committed))) => {
            // Shadow calls of a sampled stream start at its commit point and run beside
            // it; the comparison waits for the served stream's end.
            let mut shadow = None;
            if app.shadow.sampled(chain) {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let id = ledger
                    .as_ref()
                    .map(|l| l.request_id.clone())
                    .unwrap_or_default();
                shadows = app
                    .shadow
                    .start(chain, req, &id, &model, None, Served::Later(rx));
                if !shadows.is_empty() {
                    shadow = Some((ServedChunks::default(), tx));
                }
            }
            let end = sse::StreamEnd {
                ledger: ledger.take(),
                call: committed.call,
                shadow,
                ctx,
                attempts: outcome.attempts.len(),
                fallbacks: outcome.fallbacks,
                ttft: start.elapsed(),
                stopped: Box::pin(app.drain.stopped()),
            };
            let native = committed.rest.as_ref().is_some_and(|r| r.is_native());
            let encoder = on.surface.encoder(&model.model_id, native);
            let body = sse::body(
                *committed,
                model.clone(),
                app.metrics.clone(),
                inflight,
                store,
                end,
                sse::SurfaceOut {
                    encoder,
                    on_complete: on.on_complete(app),
                },
            );
            let mut r = Response::new(Body::from_stream(body));
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            h.insert("x-accel-buffering", HeaderValue::from_static("no"));
            (r, Ok(model))
        }
        Ok((model, Answer::Complete(c))) => {
            let r = on.json_answer(app, WholeAnswer::of(&c), &model);
            (r, Ok(model))
        }
        Err(e) => {
            let class = failure_class(&e, &outcome.attempts);
            (on.error(&e), Err(class))
        }
    };
    let answered_by = match answered_by {
        Ok(model) => Some(model),
        Err(class) => {
            if let Some(l) = ledger.take() {
                l.finish(Answered {
                    status: resp.status().as_u16(),
                    model: None,
                    attempts: outcome.attempts.len(),
                    fallbacks: outcome.fallbacks,
                    ttft: None,
                    usage: None,
                    charged: true,
                    error_type: Some(class),
                });
            }
            None
        }
    };
    if let (Some(l), Some(model)) = (ledger.take(), &answered_by) {
        // A whole answer to a streaming request (a refusal at the end of the chain).
        l.finish(Answered {
            status: resp.status().as_u16(),
            model: Some(model),
            attempts: outcome.attempts.len(),
            fallbacks: outcome.fallbacks,
            ttft: None,
            usage: None,
            charged: true,
            error_type: None,
        });
    }
    observe(app, chain, start, outcome.upstream_time, resp.status());
    outcome_headers(
        resp.headers_mut(),
        chain,
        &outcome.attempts,
        &outcome.skipped,
        outcome.fallbacks,
        answered_by.as_ref(),
        label,
    );
    if let Some(v) = shadow_header(&shadows) {
        resp.headers_mut().insert(X_SHADOW, v);
    }
    resp
}

/// The `x-cascade-*` headers of an answer that went upstream.
#[allow(clippy::too_many_arguments)]
fn outcome_headers(
    h: &mut HeaderMap,
    chain: &Chain,
    attempts: &[AttemptRecord],
    skipped: &[Skipped],
    fallbacks: usize,
    answered_by: Option<&Arc<Model>>,
    label: CacheOutcome,
) {
    // `reserve` counts headers beyond those already set.
    h.reserve(RESPONSE_HEADERS.saturating_sub(h.len()));
    h.insert(X_CACHE, HeaderValue::from_static(label.as_str()));
    if let Some(v) = &chain.name_header {
        h.insert(X_CHAIN, v.clone());
    }
    h.insert(X_ATTEMPTS, count_header(attempts.len()));
    h.insert(X_FALLBACKS, count_header(fallbacks));
    if let Some(v) = trace(attempts, skipped) {
        h.insert(X_TRACE, v);
    }
    if let Some(model) = answered_by {
        if let Some(v) = &model.name_header {
            h.insert(X_MODEL, v.clone());
        }
        if let Some(v) = &model.provider.name_header {
            h.insert(X_PROVIDER, v.clone());
        }
    }
}

/// `POST /v1/messages/count_tokens`: the first Anthropic target of the chain whose
/// breaker is not open counts; without one (or when it fails) cascade's estimate
/// answers, marked `x-cascade-estimate: true`.
pub async fn count_tokens(State(app): State<Arc<AppState>>, request: Request) -> Response<Body> {
    let (parts, body) = request.into_parts();
    let headers = parts.headers;
    let config = app.config();
    let counted = async {
        let bytes = read_body(body, &headers, config.server.max_body).await?;
        let (t, mut native) = messages::translate(&bytes)?;
        native.version = headers.get("anthropic-version").cloned();
        native.beta = headers.get("anthropic-beta").cloned();
        let task = headers.get(X_TASK).and_then(|v| v.to_str().ok());
        let chain = resolve(&config, task, t.model.as_deref())?.clone();
        Ok::<_, ApiError>((t, native, chain))
    }
    .await;
    let (t, native, chain) = match counted {
        Ok(v) => v,
        Err(e) => return surface_error(&Surface::Messages, &e),
    };
    let counter = chain.targets.iter().map(|t| &t.model).find(|m| {
        crate::providers::wire::for_kind(m.provider.kind).speaks_messages()
            && m.breaker.state() != crate::resilience::breaker::BreakerState::Open
    });
    if let Some(model) = counter {
        let client = app.engine.shared().http.local();
        let counted = tokio::time::timeout(
            config.server.attempt_timeout,
            crate::providers::anthropic::count_tokens(client, model, &native),
        )
        .await;
        if let Ok(Ok(body)) = counted {
            let mut r = super::json_response(body);
            if let Some(v) = &model.name_header {
                r.headers_mut().insert(X_MODEL, v.clone());
            }
            return r;
        }
    }
    let n = messages::count_tokens_estimate(&t.chat.body);
    let mut r = super::json_response(format!("{{\"input_tokens\":{n}}}").into());
    r.headers_mut()
        .insert("x-cascade-estimate", HeaderValue::from_static("true"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_header_has_ten_decimals_at_most_and_no_trailing_zeros() {
        let f = |usd: f64| format_cost(usd).map(|v| v.to_str().unwrap().to_string());
        assert_eq!(f(0.0).as_deref(), Some("0.0"));
        assert_eq!(f(2.0).as_deref(), Some("2.0"));
        assert_eq!(f(0.0001875).as_deref(), Some("0.0001875"));
        assert_eq!(f(12.5).as_deref(), Some("12.5"));
        assert_eq!(f(0.000_000_000_04).as_deref(), Some("0.0"));
        assert_eq!(f(0.000_000_000_06).as_deref(), Some("0.0000000001"));
        assert_eq!(f(1_234.000_000_000_04).as_deref(), Some("1234.0"));
        assert_eq!(f(1_234.000_000_000_1).as_deref(), Some("1234.0000000001"));
        assert_eq!(f(f64::NAN), None);
        assert_eq!(f(-1.0), None);
        assert_eq!(f(1e300), None);
    }

    #[test]
    fn counts_are_headers() {
        assert_eq!(count_header(0), "0");
        assert_eq!(count_header(9), "9");
        assert_eq!(count_header(10), "10");
        assert_eq!(count_header(123), "123");
    }
}
