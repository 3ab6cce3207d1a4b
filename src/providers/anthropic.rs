//! Anthropic Messages API: OpenAI request -> Anthropic request, Anthropic answer and
//! stream events -> OpenAI. The translation functions are pure; `request` adds headers.

use std::collections::HashMap;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::sse::SseEvent;
use super::stream::StreamItem;
use super::wire::UpstreamAnswer;
use super::{push_turn, typed, AttemptError, Outgoing};
use crate::api::chat::{parse_data_url, Content, Message, Part, Role, ToolChoice, TypedChat};
use crate::api::messages::Native;
use crate::api::output::{self, Assembled, ChunkWriter};
use crate::api::{ChatRequest, Usage};
use crate::classify::ErrorClass;
use crate::config::Model;

const ANTHROPIC_VERSION: HeaderName = HeaderName::from_static("anthropic-version");
/// Output cap when neither the request nor the model sets one (`max_tokens` is required).
const DEFAULT_MAX_TOKENS: u64 = 4096;

pub fn request(model: &Model, req: &ChatRequest) -> Result<Outgoing, AttemptError> {
    if let Some(native) = &req.native {
        return Ok(native_request(model, super::url_for(model, req), native));
    }
    let chat = typed(req)?;
    let body = to_anthropic(
        chat,
        &model.model_id,
        model.max_tokens.map(u64::from),
        req.stream,
    )
    .map_err(|e| AttemptError::new(ErrorClass::BadRequest, e))?;
    let mut headers = HeaderMap::new();
    headers.insert(
        ANTHROPIC_VERSION,
        HeaderValue::from_str(&model.provider.api_version)
            .unwrap_or_else(|_| HeaderValue::from_static("2023-06-01")),
    );
    Ok(Outgoing {
        url: super::url_for(model, req),
        body: serde_json::to_vec(&body).unwrap_or_default().into(),
        headers,
    })
}

/// The client's own Messages request, with only `model` rewritten (and `max_tokens`
/// added when it was left out): `cache_control`, thinking signatures and fields cascade
/// does not know all reach the upstream. The client's version and beta headers win.
fn native_request(model: &Model, url: http::Uri, native: &Native) -> Outgoing {
    let open = native.body.iter().position(|&b| b == b'{').unwrap_or(0) + 1;
    let cap = (!native.has_max_tokens).then(|| {
        format!(
            "\"max_tokens\":{},",
            model
                .max_tokens
                .map(u64::from)
                .unwrap_or(DEFAULT_MAX_TOKENS)
        )
    });
    let inserted_model = format!("\"model\":{},", model.model_id_json);
    let mut edits: Vec<(std::ops::Range<usize>, &[u8])> = Vec::with_capacity(2);
    if let Some(c) = &cap {
        edits.push((open..open, c.as_bytes()));
    }
    match &native.model_span {
        Some(span) => edits.push((span.clone(), model.model_id_json.as_bytes())),
        None => edits.push((open..open, inserted_model.as_bytes())),
    }
    let body = crate::api::splice_all(&native.body, &edits);
    let mut headers = HeaderMap::new();
    let version = native.version.clone().unwrap_or_else(|| {
        HeaderValue::from_str(&model.provider.api_version)
            .unwrap_or_else(|_| HeaderValue::from_static("2023-06-01"))
    });
    headers.insert(ANTHROPIC_VERSION, version);
    if let Some(beta) = &native.beta {
        headers.insert(HeaderName::from_static("anthropic-beta"), beta.clone());
    }
    Outgoing { url, body, headers }
}

const JSON_OBJECT_INSTRUCTION: &str = "Respond with a single valid JSON object and nothing else.";

/// The Anthropic request for an OpenAI request.
pub fn to_anthropic(
    chat: &TypedChat,
    model_id: &str,
    default_max: Option<u64>,
    stream: bool,
) -> Result<Value, String> {
    let mut system = chat.system_prompt();
    let mut turns: Vec<(&'static str, Vec<Value>)> = Vec::new();
    for m in &chat.messages {
        match m.role {
            Role::System | Role::Developer => {}
            Role::User => push_turn(&mut turns, "user", user_blocks(m)?),
            Role::Assistant => push_turn(&mut turns, "assistant", assistant_blocks(m)?),
            Role::Tool | Role::Function => {
                let text = m.content.as_ref().map(Content::text).unwrap_or_default();
                let block = match &m.tool_call_id {
                    Some(id) => json!({"type": "tool_result", "tool_use_id": id, "content": text}),
                    None => json!({"type": "text", "text": text}),
                };
                push_turn(&mut turns, "user", vec![block]);
            }
        }
    }
    let last = turns.len().saturating_sub(1);
    let mut messages = Vec::with_capacity(turns.len() + 1);
    for (i, (role, mut blocks)) in turns.into_iter().enumerate() {
        blocks.retain(|b| {
            b.get("type") != Some(&json!("text"))
                || b["text"].as_str().is_some_and(|t| !t.is_empty())
        });
        if role == "user" {
            // Within a merged user turn, tool results come first.
            blocks.sort_by_key(|b| b.get("type") != Some(&json!("tool_result")));
        }
        if blocks.is_empty() {
            if role == "assistant" && i == last {
                continue;
            }
            blocks.push(json!({"type": "text", "text": "."}));
        }
        messages.push(json!({"role": role, "content": blocks}));
    }
    if messages.first().is_some_and(|m| m["role"] == "assistant") {
        messages.insert(
            0,
            json!({"role": "user", "content": [{"type": "text", "text": "."}]}),
        );
    }
    if messages.is_empty() {
        return Err("the request has no user or assistant messages".into());
    }

    if let Some(rf) = &chat.response_format {
        match (rf.kind.as_str(), rf.json_schema.as_ref().and_then(|s| s.schema.as_ref())) {
            ("json_schema", Some(schema)) => system.push(format!(
                "Respond with a single valid JSON object that conforms to this JSON schema, and nothing else: {schema}"
            )),
            ("json_object" | "json_schema", _) => system.push(JSON_OBJECT_INSTRUCTION.into()),
            _ => {}
        }
    }

    let mut body = Map::new();
    body.insert("model".into(), json!(model_id));
    body.insert(
        "max_tokens".into(),
        json!(chat
            .max_output()
            .or(default_max)
            .unwrap_or(DEFAULT_MAX_TOKENS)),
    );
    body.insert("messages".into(), Value::Array(messages));
    if !system.is_empty() {
        body.insert("system".into(), json!(system.join("\n\n")));
    }
    if let Some(t) = chat.temperature {
        body.insert("temperature".into(), json!(t.clamp(0.0, 1.0)));
    }
    // Newer models reject both at once; temperature wins.
    if let (Some(p), None) = (chat.top_p, chat.temperature) {
        body.insert("top_p".into(), json!(p));
    }
    if let Some(k) = chat.top_k {
        body.insert("top_k".into(), json!(k));
    }
    let stops = chat.stop_sequences();
    if !stops.is_empty() {
        body.insert("stop_sequences".into(), json!(stops));
    }
    if stream {
        body.insert("stream".into(), json!(true));
    }
    if let Some(user) = chat.user.as_ref().filter(|u| !u.contains('@')) {
        body.insert("metadata".into(), json!({"user_id": user}));
    }
    if let Some(tools) = chat.tools.as_ref().filter(|t| !t.is_empty()) {
        let defs: Vec<Value> = tools
            .iter()
            .map(|t| {
                let mut schema = t
                    .function
                    .parameters
                    .clone()
                    .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
                if let Some(obj) = schema.as_object_mut() {
                    obj.entry("type").or_insert(json!("object"));
                }
                let mut def = json!({"name": t.function.name, "input_schema": schema});
                if let Some(d) = &t.function.description {
                    def["description"] = json!(d);
                }
                def
            })
            .collect();
        body.insert("tools".into(), Value::Array(defs));
        let mut choice = match &chat.tool_choice {
            None => json!({"type": "auto"}),
            Some(ToolChoice::Mode(m)) => match m.as_str() {
                "required" => json!({"type": "any"}),
                "none" => json!({"type": "none"}),
                _ => json!({"type": "auto"}),
            },
            Some(ToolChoice::Named(n)) => json!({"type": "tool", "name": n.function.name}),
        };
        if chat.parallel_tool_calls == Some(false) && choice["type"] != "none" {
            choice["disable_parallel_tool_use"] = json!(true);
        }
        if chat.tool_choice.is_some() || chat.parallel_tool_calls == Some(false) {
            body.insert("tool_choice".into(), choice);
        }
    }
    Ok(Value::Object(body))
}

fn image_block(url: &str) -> Value {
    match parse_data_url(url) {
        Some((mime, data)) if mime == "application/pdf" => {
            json!({"type": "document", "source": {"type": "base64", "media_type": mime, "data": data}})
        }
        Some((mime, data)) => {
            json!({"type": "image", "source": {"type": "base64", "media_type": mime, "data": data}})
        }
        None => json!({"type": "image", "source": {"type": "url", "url": url}}),
    }
}

fn user_blocks(m: &Message) -> Result<Vec<Value>, String> {
    let Some(content) = &m.content else {
        return Ok(Vec::new());
    };
    let parts = match content {
        Content::Text(t) => return Ok(vec![json!({"type": "text", "text": t})]),
        Content::Parts(p) => p,
    };
    parts
        .iter()
        .map(|p| match p {
            Part::Text { text } | Part::Refusal { refusal: text } => Ok(json!({"type": "text", "text": text})),
            Part::ImageUrl { image_url } => Ok(image_block(&image_url.url)),
            Part::InputAudio { .. } => Err("audio input is not supported by Anthropic models".to_string()),
            Part::File { file } => match (&file.file_data, &file.file_id) {
                (Some(data), _) => {
                    let (mime, b64) = parse_data_url(data).unwrap_or(("application/pdf", data.as_str()));
                    Ok(json!({"type": "document", "source": {"type": "base64", "media_type": mime, "data": b64}}))
                }
                _ => Err("file_id references are OpenAI-specific; send file_data instead".to_string()),
            },
        })
        .collect()
}

fn assistant_blocks(m: &Message) -> Result<Vec<Value>, String> {
    let mut blocks = Vec::new();
    if let Some(text) = m
        .content
        .as_ref()
        .map(Content::text)
        .filter(|t| !t.is_empty())
    {
        blocks.push(json!({"type": "text", "text": text}));
    }
    for call in m.tool_calls.iter().flatten() {
        blocks.push(json!({
            "type": "tool_use",
            "id": call.id,
            "name": call.function.name,
            "input": call.function.arguments_json()?,
        }));
    }
    Ok(blocks)
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
struct AnthropicUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens_details: Option<ThinkingDetails>,
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
struct ThinkingDetails {
    #[serde(default)]
    thinking_tokens: Option<u64>,
}

impl AnthropicUsage {
    /// Later values (message_delta) override earlier ones (message_start).
    fn merge(&mut self, later: AnthropicUsage) {
        self.input_tokens = later.input_tokens.or(self.input_tokens);
        self.output_tokens = later.output_tokens.or(self.output_tokens);
        self.cache_creation_input_tokens = later
            .cache_creation_input_tokens
            .or(self.cache_creation_input_tokens);
        self.cache_read_input_tokens = later
            .cache_read_input_tokens
            .or(self.cache_read_input_tokens);
        self.output_tokens_details = later.output_tokens_details.or(self.output_tokens_details);
    }

    fn to_openai(self) -> Usage {
        let cached = self.cache_read_input_tokens.unwrap_or(0);
        let prompt =
            self.input_tokens.unwrap_or(0) + self.cache_creation_input_tokens.unwrap_or(0) + cached;
        let completion = self.output_tokens.unwrap_or(0);
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            cached_tokens: cached,
            reasoning_tokens: self
                .output_tokens_details
                .and_then(|d| d.thinking_tokens)
                .unwrap_or(0)
                .min(completion),
        }
    }
}

/// `stop_reason` -> `finish_reason`.
pub fn finish_reason(stop_reason: Option<&str>) -> &'static str {
    match stop_reason {
        Some("max_tokens" | "model_context_window_exceeded") => "length",
        Some("tool_use") => "tool_calls",
        Some("refusal") => "content_filter",
        _ => "stop",
    }
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block {
    Text {
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        input: Value,
    },
    Thinking {
        thinking: String,
    },
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct MessageResponse {
    id: String,
    #[serde(default)]
    content: Vec<Block>,
    stop_reason: Option<String>,
    #[serde(default)]
    usage: AnthropicUsage,
}

/// The OpenAI answer for an Anthropic message.
pub fn from_anthropic(body: &[u8], model_id: &str) -> Result<Bytes, String> {
    assemble(body, model_id).map(|(b, _)| b)
}

/// The answer read once: its OpenAI body and the parts it was written from.
pub fn assemble(body: &[u8], model_id: &str) -> Result<(Bytes, Assembled), String> {
    let m: MessageResponse = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let mut text = String::new();
    let mut reasoning = String::new();
    let mut tool_calls = Vec::new();
    for block in m.content {
        match block {
            Block::Text { text: t } => text.push_str(&t),
            Block::Thinking { thinking } => reasoning.push_str(&thinking),
            Block::ToolUse { id, name, input } => tool_calls.push((id, name, input.to_string())),
            Block::Other => {}
        }
    }
    let a = Assembled {
        content: (!text.is_empty()).then_some(text),
        reasoning: (!reasoning.is_empty()).then_some(reasoning),
        tool_calls,
        finish_reason: finish_reason(m.stop_reason.as_deref()),
        usage: Some(m.usage.to_openai()),
    };
    Ok((output::completion(&m.id, model_id, &a), a))
}

pub fn completion(body: &[u8], model: &Model) -> Result<(Bytes, Assembled), AttemptError> {
    assemble(body, &model.model_id).map_err(|e| {
        AttemptError::new(
            ErrorClass::Transient,
            format!("malformed Anthropic answer: {e}"),
        )
    })
}

#[derive(Deserialize)]
struct Event {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    message: Option<StartMessage>,
    #[serde(default)]
    index: Option<u64>,
    #[serde(default)]
    content_block: Option<Value>,
    #[serde(default)]
    delta: Option<Value>,
    #[serde(default)]
    usage: Option<AnthropicUsage>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct StartMessage {
    id: String,
    #[serde(default)]
    usage: AnthropicUsage,
}

/// Translates Anthropic stream events into OpenAI chunks.
pub struct StreamState {
    writer: ChunkWriter,
    /// Anthropic block index -> OpenAI tool-call index.
    tool_index: HashMap<u64, usize>,
    next_tool: usize,
    usage: AnthropicUsage,
}

impl StreamState {
    pub(crate) fn new(model: &Model, include_usage: bool) -> Self {
        Self::with_model_id(model.model_id.clone(), include_usage)
    }

    pub fn with_model_id(model_id: String, include_usage: bool) -> Self {
        StreamState {
            writer: ChunkWriter::new(String::new(), model_id, include_usage),
            tool_index: HashMap::new(),
            next_tool: 0,
            usage: AnthropicUsage::default(),
        }
    }

    pub fn on_event(&mut self, ev: &SseEvent) -> Result<Vec<StreamItem>, AttemptError> {
        let e: Event = serde_json::from_slice(&ev.data).map_err(|err| {
            AttemptError::new(
                ErrorClass::Transient,
                format!("malformed Anthropic event: {err}"),
            )
        })?;
        let w = &self.writer;
        Ok(match e.kind.as_str() {
            "message_start" => {
                if let Some(m) = e.message {
                    self.writer.id = m.id;
                    self.usage.merge(m.usage);
                }
                vec![StreamItem::delta(self.writer.role(), false)]
            }
            "content_block_start" => {
                let block = e.content_block.unwrap_or_default();
                match block["type"].as_str() {
                    Some("tool_use") => {
                        let k = self.next_tool;
                        self.next_tool += 1;
                        self.tool_index.insert(e.index.unwrap_or(0), k);
                        let id = block["id"].as_str().unwrap_or_default();
                        let name = block["name"].as_str().unwrap_or_default();
                        vec![StreamItem::delta(w.tool_start(k, id, name, ""), true)]
                    }
                    Some("text") => match block["text"].as_str().filter(|t| !t.is_empty()) {
                        Some(t) => vec![StreamItem::delta(w.content(t), true)],
                        None => Vec::new(),
                    },
                    _ => Vec::new(),
                }
            }
            "content_block_delta" => {
                let delta = e.delta.unwrap_or_default();
                match delta["type"].as_str() {
                    Some("text_delta") => match delta["text"].as_str().filter(|t| !t.is_empty()) {
                        Some(t) => vec![StreamItem::delta(w.content(t), true)],
                        None => Vec::new(),
                    },
                    Some("input_json_delta") => {
                        let k = e.index.and_then(|i| self.tool_index.get(&i).copied());
                        match (k, delta["partial_json"].as_str().filter(|t| !t.is_empty())) {
                            (Some(k), Some(frag)) => {
                                vec![StreamItem::delta(w.tool_arguments(k, frag), true)]
                            }
                            _ => Vec::new(),
                        }
                    }
                    Some("thinking_delta") => {
                        match delta["thinking"].as_str().filter(|t| !t.is_empty()) {
                            Some(t) => vec![StreamItem::delta(w.reasoning(t), true)],
                            None => Vec::new(),
                        }
                    }
                    _ => Vec::new(),
                }
            }
            "message_delta" => {
                if let Some(u) = e.usage {
                    self.usage.merge(u);
                }
                let stop = e
                    .delta
                    .as_ref()
                    .and_then(|d| d["stop_reason"].as_str().map(str::to_string));
                let reason = finish_reason(stop.as_deref());
                vec![StreamItem::Chunk {
                    data: w.finish(reason),
                    has_content: false,
                    finish_reason: Some(reason.to_string()),
                    usage: Some(self.usage.to_openai()),
                }]
            }
            "message_stop" => {
                let usage = self.usage.to_openai();
                let mut items = Vec::new();
                if w.include_usage {
                    items.push(StreamItem::Chunk {
                        data: w.usage(&usage),
                        has_content: false,
                        finish_reason: None,
                        usage: Some(usage),
                    });
                }
                items.push(StreamItem::Done);
                items
            }
            "error" => {
                let err = e.error.unwrap_or_default();
                let kind = err["type"].as_str().unwrap_or("api_error");
                let class = match kind {
                    "rate_limit_error" => ErrorClass::RateLimited,
                    "timeout_error" => ErrorClass::Timeout,
                    _ => ErrorClass::Transient,
                };
                let message = err["message"].as_str().unwrap_or("upstream stream error");
                return Err(AttemptError::new(
                    class,
                    format!("Anthropic {kind}: {message}"),
                ));
            }
            // `ping`, `content_block_stop`, and event types added later.
            _ => Vec::new(),
        })
    }
}

/// `POST …/v1/messages/count_tokens` with the client's own request (model rewritten):
/// the upstream's `{"input_tokens": N}` on success.
pub async fn count_tokens(
    client: &super::HttpClient,
    model: &Model,
    native: &Native,
) -> Result<Bytes, AttemptError> {
    let url: http::Uri = format!(
        "{}/count_tokens",
        model.url.to_string().trim_end_matches('/')
    )
    .parse()
    .map_err(|e| AttemptError::new(ErrorClass::BadRequest, format!("bad count_tokens URL: {e}")))?;
    // count_tokens takes no `max_tokens`: never add one.
    let as_sent = Native {
        has_max_tokens: true,
        ..native.clone()
    };
    let out = native_request(model, url, &as_sent);
    let mut headers = out.headers;
    super::provider_headers(model, &mut headers);
    let resp = super::client::post(client, out.url, headers, out.body).await?;
    if !resp.status().is_success() {
        return Err(super::errors::from_response(resp, model).await);
    }
    super::client::read_body(resp.into_body(), Some(1 << 20)).await
}

/// Anthropic Messages: translated from chat, or the Messages surface's own bytes.
pub struct AnthropicFormat;

impl super::wire::WireFormat for AnthropicFormat {
    fn request(&self, model: &Model, req: &ChatRequest) -> Result<Outgoing, AttemptError> {
        request(model, req)
    }

    fn completion(&self, body: Bytes, model: &Model) -> Result<UpstreamAnswer, AttemptError> {
        completion(&body, model).map(|(b, a)| UpstreamAnswer::Assembled(b, a))
    }

    fn stream(&self, model: &Model, req: &ChatRequest) -> Box<dyn super::wire::StreamTranslator> {
        Box::new(StreamState::new(model, req.include_usage))
    }

    fn stream_accept(&self) -> Option<HeaderValue> {
        Some(HeaderValue::from_static("text/event-stream"))
    }

    fn speaks_messages(&self) -> bool {
        true
    }
}

// An Anthropic stream is complete only at `message_stop`.
impl super::wire::StreamTranslator for StreamState {
    fn on_event(&mut self, ev: &SseEvent) -> Result<Vec<StreamItem>, AttemptError> {
        StreamState::on_event(self, ev)
    }
}
