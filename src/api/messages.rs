//! `POST /v1/messages` (Anthropic Messages), inbound: the request translated into the
//! internal chat request (its original bytes kept for Anthropic targets, which get them
//! with only `model` rewritten), and the engine's answer written back as an Anthropic
//! message, stream events or error. Pure: no I/O, no providers.

use std::ops::Range;

use bytes::Bytes;
use http::StatusCode;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use super::answer::{ChatAnswer, ChunkDelta};
use super::{span_in, ApiError, Usage};

/// The client's own Anthropic request, for Anthropic targets.
#[derive(Debug, Clone)]
pub struct Native {
    pub body: Bytes,
    pub model_span: Option<Range<usize>>,
    /// Whether the body already has `max_tokens` (Anthropic requires it).
    pub has_max_tokens: bool,
    pub version: Option<http::HeaderValue>,
    pub beta: Option<http::HeaderValue>,
}

/// A Messages request after translation.
#[derive(Debug)]
pub struct Translated {
    pub chat: super::ChatRequest,
    pub model: Option<String>,
    pub stream: bool,
    /// Server tools (`web_search_…`, `bash_…`) a translated target cannot run.
    pub dropped_tools: Vec<String>,
}

#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(default)]
    messages: Option<Vec<Value>>,
    #[serde(default)]
    system: Option<Value>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    stop_sequences: Option<Vec<String>>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    metadata: Option<Value>,
    #[serde(default)]
    tools: Option<Vec<Value>>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    stream: Option<bool>,
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::invalid_request(message)
}

/// Parses the body once and translates it; `native` keeps the bytes for pass-through.
pub fn translate(body: &Bytes) -> Result<(Translated, Native), ApiError> {
    let text =
        super::json_text(body).map_err(|e| bad(format!("The body is not valid JSON: {e}")))?;
    let w: Wire = serde_json::from_str(text)
        .map_err(|e| bad(format!("The body is not a valid Messages request: {e}")))?;
    let model = match w.model {
        Some(raw) => Some(
            serde_json::from_str::<String>(raw.get())
                .map_err(|_| bad("model: expected a string").with_param("model"))?,
        ),
        None => None,
    };
    let native = Native {
        body: body.clone(),
        model_span: w.model.map(|m| span_in(body, m)),
        has_max_tokens: w.max_tokens.is_some(),
        version: None,
        beta: None,
    };
    let Some(turns) = w.messages else {
        return Err(bad("messages: Field required").with_param("messages"));
    };
    let mut messages = Vec::with_capacity(turns.len() + 1);
    match &w.system {
        Some(Value::String(s)) if !s.is_empty() => {
            messages.push(json!({"role": "system", "content": s}))
        }
        Some(Value::Array(blocks)) => {
            let text = blocks_text(blocks);
            if !text.is_empty() {
                messages.push(json!({"role": "system", "content": text}));
            }
        }
        _ => {}
    }
    for (i, turn) in turns.iter().enumerate() {
        let role = turn.get("role").and_then(Value::as_str);
        let content = turn.get("content");
        match role {
            Some("user") => user_turn(content, &mut messages, i)?,
            Some("assistant") => messages.push(assistant_turn(content, i)?),
            other => {
                return Err(bad(format!("messages.{i}.role: unknown role {other:?}"))
                    .with_param(format!("messages.{i}.role")))
            }
        }
    }

    let mut chat = Map::new();
    if let Some(m) = &model {
        chat.insert("model".into(), json!(m));
    }
    chat.insert("messages".into(), Value::Array(messages));
    if let Some(n) = w.max_tokens {
        chat.insert("max_tokens".into(), json!(n));
    }
    if let Some(s) = w.stop_sequences.filter(|s| !s.is_empty()) {
        chat.insert("stop".into(), json!(s));
    }
    if let Some(t) = w.temperature {
        chat.insert("temperature".into(), json!(t));
    }
    if let Some(p) = w.top_p {
        chat.insert("top_p".into(), json!(p));
    }
    if let Some(u) = w
        .metadata
        .as_ref()
        .and_then(|m| m.get("user_id"))
        .and_then(Value::as_str)
    {
        chat.insert("user".into(), json!(u));
    }
    let mut dropped_tools = Vec::new();
    let mut tools = Vec::new();
    for t in w.tools.iter().flatten() {
        // Client tools have no `type` (or `custom`); server tools name a versioned type.
        match t.get("type").and_then(Value::as_str) {
            None | Some("custom") => {}
            Some(kind) => {
                dropped_tools.push(kind.to_string());
                continue;
            }
        }
        let Some(name) = t.get("name").and_then(Value::as_str) else {
            return Err(bad("tools: a tool needs a 'name'").with_param("tools"));
        };
        let mut f = json!({"name": name});
        if let Some(d) = t.get("description") {
            f["description"] = d.clone();
        }
        f["parameters"] = t
            .get("input_schema")
            .cloned()
            .unwrap_or(json!({"type": "object", "properties": {}}));
        tools.push(json!({"type": "function", "function": f}));
    }
    if !tools.is_empty() {
        chat.insert("tools".into(), Value::Array(tools));
        if let Some(choice) = &w.tool_choice {
            let mapped = match choice.get("type").and_then(Value::as_str) {
                Some("any") => json!("required"),
                Some("none") => json!("none"),
                Some("tool") => {
                    json!({"type": "function", "function": {"name": choice.get("name").cloned().unwrap_or(json!(""))}})
                }
                _ => json!("auto"),
            };
            chat.insert("tool_choice".into(), mapped);
            if choice.get("disable_parallel_tool_use") == Some(&json!(true)) {
                chat.insert("parallel_tool_calls".into(), json!(false));
            }
        }
    }
    let stream = w.stream == Some(true);
    if stream {
        chat.insert("stream".into(), json!(true));
    }
    Ok((
        Translated {
            chat: super::ChatRequest::from_translation(chat)?,
            model,
            stream,
            dropped_tools,
        },
        native,
    ))
}

fn blocks_text(blocks: &[Value]) -> String {
    blocks
        .iter()
        .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
        .filter_map(|b| b.get("text").and_then(Value::as_str))
        .collect::<Vec<_>>()
        .join("\n")
}

fn image_url(source: Option<&Value>) -> Option<String> {
    let s = source?;
    match s.get("type").and_then(Value::as_str)? {
        "base64" => Some(format!(
            "data:{};base64,{}",
            s.get("media_type").and_then(Value::as_str)?,
            s.get("data").and_then(Value::as_str)?
        )),
        "url" => s.get("url").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// A user turn: its tool results become `tool` messages (first, as Anthropic orders
/// them), the rest one user message.
fn user_turn(content: Option<&Value>, out: &mut Vec<Value>, i: usize) -> Result<(), ApiError> {
    let blocks = match content {
        Some(Value::String(s)) => {
            out.push(json!({"role": "user", "content": s}));
            return Ok(());
        }
        Some(Value::Array(b)) => b,
        _ => {
            return Err(bad(format!(
                "messages.{i}.content: expected a string or a list of blocks"
            ))
            .with_param(format!("messages.{i}.content")))
        }
    };
    let mut parts = Vec::new();
    for b in blocks {
        match b.get("type").and_then(Value::as_str) {
            Some("text") => parts
                .push(json!({"type": "text", "text": b.get("text").cloned().unwrap_or(json!(""))})),
            Some("image") => {
                if let Some(url) = image_url(b.get("source")) {
                    parts.push(json!({"type": "image_url", "image_url": {"url": url}}));
                }
            }
            Some("document") => {
                if let Some(url) = image_url(b.get("source")) {
                    parts.push(json!({"type": "file", "file": {"file_data": url, "filename": "document.pdf"}}));
                }
            }
            Some("tool_result") => {
                let text = match b.get("content") {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Array(inner)) => blocks_text(inner),
                    _ => String::new(),
                };
                let text = if b.get("is_error") == Some(&json!(true)) {
                    format!("Error: {text}")
                } else {
                    text
                };
                out.push(json!({"role": "tool", "tool_call_id": b.get("tool_use_id").cloned().unwrap_or(json!("")), "content": text}));
            }
            // Blocks with no chat form (search results, container uploads...) are dropped.
            _ => {}
        }
    }
    if !parts.is_empty() {
        out.push(json!({"role": "user", "content": parts}));
    }
    Ok(())
}

fn assistant_turn(content: Option<&Value>, i: usize) -> Result<Value, ApiError> {
    let blocks = match content {
        Some(Value::String(s)) => return Ok(json!({"role": "assistant", "content": s})),
        Some(Value::Array(b)) => b,
        _ => {
            return Err(bad(format!(
                "messages.{i}.content: expected a string or a list of blocks"
            ))
            .with_param(format!("messages.{i}.content")))
        }
    };
    let text = blocks_text(blocks);
    let calls: Vec<Value> = blocks
        .iter()
        .filter(|b| b.get("type").and_then(Value::as_str) == Some("tool_use"))
        .map(|b| {
            json!({
                "id": b.get("id").cloned().unwrap_or(json!("")),
                "type": "function",
                "function": {
                    "name": b.get("name").cloned().unwrap_or(json!("")),
                    "arguments": b.get("input").map_or("{}".to_string(), Value::to_string),
                },
            })
        })
        .collect();
    let mut m = json!({"role": "assistant", "content": if text.is_empty() { Value::Null } else { json!(text) }});
    if !calls.is_empty() {
        m["tool_calls"] = Value::Array(calls);
    }
    Ok(m)
}

/// The chat finish reason as Anthropic's `stop_reason`.
fn stop_reason(finish: Option<&str>) -> &'static str {
    match finish {
        Some("length") => "max_tokens",
        Some("tool_calls") | Some("function_call") => "tool_use",
        Some("content_filter") => "refusal",
        _ => "end_turn",
    }
}

/// Usage in Anthropic's meaning: `input_tokens` excludes the cache reads.
fn usage_value(u: &Usage) -> Value {
    json!({
        "input_tokens": u.prompt_tokens.saturating_sub(u.cached_tokens),
        "output_tokens": u.completion_tokens,
        "cache_read_input_tokens": u.cached_tokens,
        "cache_creation_input_tokens": 0,
    })
}

pub fn new_id() -> String {
    format!("msg_{}", uuid::Uuid::now_v7().simple())
}

/// The Anthropic message for a whole chat answer.
pub fn from_chat(model_id: &str, body: &[u8]) -> Result<Value, serde_json::Error> {
    Ok(from_answer(model_id, &ChatAnswer::parse(body)?))
}

/// The Anthropic message for an answer already read.
pub fn from_answer(model_id: &str, a: &ChatAnswer) -> Value {
    // Reasoning from another provider has no Anthropic signature: a `thinking` block
    // without one would be refused when the client sends it back next turn.
    let mut content = Vec::new();
    if let Some(t) = a.text.as_ref().or(a.refusal.as_ref()) {
        content.push(json!({"type": "text", "text": t}));
    }
    for (id, name, args) in &a.tool_calls {
        let input: Value = serde_json::from_str(args).unwrap_or(json!({}));
        content.push(json!({"type": "tool_use", "id": id, "name": name, "input": input}));
    }
    json!({
        "id": new_id(),
        "type": "message",
        "role": "assistant",
        "model": model_id,
        "content": content,
        "stop_reason": stop_reason(a.finish_reason.as_deref()),
        "stop_sequence": null,
        "usage": usage_value(&a.usage.unwrap_or_default()),
    })
}

/// The error type and status Anthropic uses for a gateway error.
fn error_kind(e: &ApiError) -> (StatusCode, &'static str) {
    match e.status.as_u16() {
        400 | 422 => (StatusCode::BAD_REQUEST, "invalid_request_error"),
        401 => (e.status, "authentication_error"),
        403 => (e.status, "permission_error"),
        404 => (e.status, "not_found_error"),
        413 => (e.status, "request_too_large"),
        429 => (e.status, "rate_limit_error"),
        504 => (e.status, "timeout_error"),
        500 => (e.status, "api_error"),
        // Every target failed (502), or every breaker is open (503): overloaded.
        s if s >= 500 => (
            StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            "overloaded_error",
        ),
        _ => (e.status, "invalid_request_error"),
    }
}

/// An error in Anthropic's shape, with Anthropic's status.
pub fn error_body(e: &ApiError) -> (StatusCode, Bytes) {
    let (status, kind) = error_kind(e);
    let body = json!({"type": "error", "error": {"type": kind, "message": e.message}});
    (status, serde_json::to_vec(&body).unwrap_or_default().into())
}

/// Writes Anthropic stream events for a chat stream. Like every surface, nothing is
/// written before the engine's commit point (so `message_start` is held until then).
///
/// Anthropic blocks are contiguous, chat tool calls may interleave: the first call
/// streams live, calls that start while it is open are buffered and written whole
/// when it closes.
#[derive(Debug)]
pub struct Events {
    id: String,
    model_id: String,
    started: bool,
    /// The open block: its index and kind.
    open: Option<(usize, Block)>,
    next_index: usize,
    /// Tool calls by chat index.
    tools: Vec<Option<ToolSlot>>,
    finish: Option<String>,
    /// Usage carried by a chunk (a replayed answer), if `done` is given none.
    usage: Option<Usage>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Block {
    Text,
    Tool(usize),
}

#[derive(Debug)]
struct ToolSlot {
    id: String,
    name: String,
    /// Arguments not yet written (a buffered call).
    args: String,
    state: ToolState,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum ToolState {
    Streaming,
    Buffered,
    Written,
}

fn write_event(out: &mut Vec<u8>, kind: &str, data: &Value) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(kind.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    let _ = serde_json::to_writer(&mut *out, data);
    out.extend_from_slice(b"\n\n");
}

impl Events {
    pub fn new(model_id: &str) -> Events {
        Events {
            id: new_id(),
            model_id: model_id.to_string(),
            started: false,
            open: None,
            next_index: 0,
            tools: Vec::new(),
            finish: None,
            usage: None,
        }
    }

    fn start(&mut self, out: &mut Vec<u8>) {
        if self.started {
            return;
        }
        self.started = true;
        let message = json!({
            "id": self.id, "type": "message", "role": "assistant", "model": self.model_id,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        });
        write_event(
            out,
            "message_start",
            &json!({"type": "message_start", "message": message}),
        );
    }

    /// Closes the open block; a tool call closing lets the buffered ones out.
    fn close(&mut self, out: &mut Vec<u8>) {
        let Some((index, kind)) = self.open.take() else {
            return;
        };
        write_event(
            out,
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": index}),
        );
        if let Block::Tool(i) = kind {
            if let Some(Some(slot)) = self.tools.get_mut(i) {
                slot.state = ToolState::Written;
            }
            self.flush_buffered(out);
        }
    }

    fn flush_buffered(&mut self, out: &mut Vec<u8>) {
        for i in 0..self.tools.len() {
            let Some(slot) = self.tools[i]
                .as_mut()
                .filter(|s| s.state == ToolState::Buffered)
            else {
                continue;
            };
            slot.state = ToolState::Written;
            let (id, name, args) = (
                slot.id.clone(),
                slot.name.clone(),
                std::mem::take(&mut slot.args),
            );
            let index = self.next_index;
            self.next_index += 1;
            write_event(
                out,
                "content_block_start",
                &json!({"type": "content_block_start", "index": index, "content_block": {"type": "tool_use", "id": id, "name": name, "input": {}}}),
            );
            if !args.is_empty() {
                Self::delta(
                    out,
                    index,
                    json!({"type": "input_json_delta", "partial_json": args}),
                );
            }
            write_event(
                out,
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": index}),
            );
        }
    }

    fn open(&mut self, out: &mut Vec<u8>, kind: Block, block: Value) -> usize {
        self.close(out);
        let index = self.next_index;
        self.next_index += 1;
        write_event(
            out,
            "content_block_start",
            &json!({"type": "content_block_start", "index": index, "content_block": block}),
        );
        self.open = Some((index, kind));
        index
    }

    fn delta(out: &mut Vec<u8>, index: usize, delta: Value) {
        write_event(
            out,
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": index, "delta": delta}),
        );
    }

    pub fn chunk(&mut self, data: &[u8], out: &mut Vec<u8>) {
        let Ok(d) = ChunkDelta::parse(data) else {
            return;
        };
        self.start(out);
        // Fragments of open calls first; then text (whitespace between a call's
        // fragments would otherwise close its block with half its arguments).
        let text = d.text.or(d.refusal);
        let tool_open = !d.tools.is_empty() || matches!(self.open, Some((_, Block::Tool(_))));
        for t in d.tools {
            if t.index >= super::MAX_TOOL_CALLS {
                continue;
            }
            let fragment = t.arguments().to_string();
            if self.tools.get(t.index).is_none_or(|s| s.is_none()) {
                let id =
                    t.id.clone()
                        .unwrap_or_else(|| format!("toolu_{}", uuid::Uuid::now_v7().simple()));
                let name = t.name().to_string();
                if self.tools.len() <= t.index {
                    self.tools.resize_with(t.index + 1, || None);
                }
                let another_streams = matches!(self.open, Some((_, Block::Tool(_))));
                let state = if another_streams {
                    ToolState::Buffered
                } else {
                    self.open(
                        out,
                        Block::Tool(t.index),
                        json!({"type": "tool_use", "id": id, "name": name, "input": {}}),
                    );
                    ToolState::Streaming
                };
                self.tools[t.index] = Some(ToolSlot {
                    id,
                    name,
                    args: String::new(),
                    state,
                });
            }
            if fragment.is_empty() {
                continue;
            }
            let open_index = self.open.map(|(i, _)| i);
            let Some(Some(slot)) = self.tools.get_mut(t.index) else {
                continue;
            };
            match slot.state {
                ToolState::Streaming => {
                    if let Some(index) = open_index {
                        Self::delta(
                            out,
                            index,
                            json!({"type": "input_json_delta", "partial_json": fragment}),
                        );
                    }
                }
                ToolState::Buffered => slot.args.push_str(&fragment),
                // Its block is closed: Anthropic blocks cannot be reopened.
                ToolState::Written => {}
            }
        }
        if let Some(t) = text.filter(|t| !(tool_open && t.trim().is_empty())) {
            let index = match self.open {
                Some((i, Block::Text)) => i,
                _ => self.open(out, Block::Text, json!({"type": "text", "text": ""})),
            };
            Self::delta(out, index, json!({"type": "text_delta", "text": t}));
        }
        if d.finish_reason.is_some() {
            self.finish = d.finish_reason;
        }
        if d.usage.is_some() {
            self.usage = d.usage;
        }
    }

    pub fn done(&mut self, usage: Option<&Usage>, out: &mut Vec<u8>) {
        let usage = usage.copied().or(self.usage);
        self.start(out);
        self.close(out);
        self.flush_buffered(out);
        let u = usage
            .as_ref()
            .map(usage_value)
            .unwrap_or(json!({"output_tokens": 0}));
        write_event(
            out,
            "message_delta",
            &json!({
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason(self.finish.as_deref()), "stop_sequence": null},
                "usage": u,
            }),
        );
        write_event(out, "message_stop", &json!({"type": "message_stop"}));
    }

    /// A failure after the commit point: an `error` event ends the stream.
    pub fn fail(&mut self, e: &ApiError, out: &mut Vec<u8>) {
        let (_, kind) = error_kind(e);
        write_event(
            out,
            "error",
            &json!({"type": "error", "error": {"type": kind, "message": e.message}}),
        );
    }
}

/// The `input_tokens` estimate for `count_tokens` when no Anthropic target answers it.
pub fn count_tokens_estimate(chat_body: &[u8]) -> u64 {
    // The same rough rule as the context-window check: four bytes a token.
    (chat_body.len() as u64).div_ceil(4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translates_a_tool_loop() {
        let body = Bytes::from_static(br#"{"model":"claude","max_tokens":100,"system":[{"type":"text","text":"sys","cache_control":{"type":"ephemeral"}}],
            "messages":[{"role":"user","content":"weather?"},
              {"role":"assistant","content":[{"type":"thinking","thinking":"t","signature":"s"},{"type":"text","text":"checking"},{"type":"tool_use","id":"tu1","name":"get","input":{"city":"Paris"}}]},
              {"role":"user","content":[{"type":"tool_result","tool_use_id":"tu1","content":"sunny"},{"type":"text","text":"thanks"}]}],
            "tools":[{"name":"get","input_schema":{"type":"object"}},{"type":"web_search_20250305","name":"web_search"}],
            "tool_choice":{"type":"any","disable_parallel_tool_use":true},"context_management":{"edits":[]},"top_k":5}"#);
        let (t, native) = translate(&body).unwrap();
        assert_eq!(&body[native.model_span.unwrap()], b"\"claude\"");
        assert_eq!(t.dropped_tools, vec!["web_search_20250305"]);
        let c: Value = serde_json::from_slice(&t.chat.body).unwrap();
        let m = c["messages"].as_array().unwrap();
        assert_eq!(m[0], json!({"role":"system","content":"sys"}));
        assert_eq!(
            m[2]["tool_calls"][0]["function"]["arguments"],
            "{\"city\":\"Paris\"}"
        );
        assert_eq!(
            m[3],
            json!({"role":"tool","tool_call_id":"tu1","content":"sunny"})
        );
        assert_eq!(m[4]["content"][0]["text"], "thanks");
        assert_eq!(c["tool_choice"], "required");
        assert_eq!(c["parallel_tool_calls"], false);
        assert!(c.get("top_k").is_none());
    }

    #[test]
    fn errors_take_anthropic_statuses() {
        let e = ApiError::new(StatusCode::BAD_GATEWAY, "server_error", "all failed");
        assert_eq!(error_body(&e).0.as_u16(), 529);
        let e = ApiError::new(StatusCode::GATEWAY_TIMEOUT, "timeout_error", "late");
        let (s, b) = error_body(&e);
        assert_eq!(s.as_u16(), 504);
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(
            v,
            json!({"type":"error","error":{"type":"timeout_error","message":"late"}})
        );
    }

    #[test]
    fn interleaved_tool_calls_keep_their_arguments() {
        let mut ev = Events::new("m");
        let mut out = Vec::new();
        ev.chunk(br#"{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"a","function":{"name":"a","arguments":""}},{"index":1,"id":"b","function":{"name":"b","arguments":""}}]}}]}"#, &mut out);
        ev.chunk(br#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"x\":1}"}}]}}]}"#, &mut out);
        ev.chunk(br#"{"choices":[{"delta":{"tool_calls":[{"index":1,"function":{"arguments":"{\"y\":2}"}}]}}]}"#, &mut out);
        ev.done(None, &mut out);
        let text = String::from_utf8(out).unwrap();
        let events: Vec<Value> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        let args: Vec<(u64, &str)> = events
            .iter()
            .filter(|e| e["type"] == "content_block_delta")
            .map(|e| {
                (
                    e["index"].as_u64().unwrap(),
                    e["delta"]["partial_json"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(args, vec![(0, "{\"x\":1}"), (1, "{\"y\":2}")]);
        // Blocks are contiguous: each start is followed by its own stop before the next.
        let order: Vec<String> = events
            .iter()
            .filter(|e| e["type"].as_str().unwrap().starts_with("content_block"))
            .map(|e| format!("{}{}", e["type"], e["index"]))
            .collect();
        assert_eq!(
            order,
            [
                "\"content_block_start\"0",
                "\"content_block_delta\"0",
                "\"content_block_stop\"0",
                "\"content_block_start\"1",
                "\"content_block_delta\"1",
                "\"content_block_stop\"1"
            ]
        );
    }

    #[test]
    fn whitespace_between_fragments_keeps_the_call_open() {
        let mut ev = Events::new("m");
        let mut out = Vec::new();
        ev.chunk(br#"{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"a","function":{"name":"a","arguments":"{\"x\""}}]}}]}"#, &mut out);
        ev.chunk(br#"{"choices":[{"delta":{"content":"\n"}}]}"#, &mut out);
        ev.chunk(br#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":":1}"}}]}}]}"#, &mut out);
        ev.done(None, &mut out);
        let text = String::from_utf8(out).unwrap();
        let args: String = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter_map(|e| e["delta"]["partial_json"].as_str().map(str::to_string))
            .collect();
        assert_eq!(args, "{\"x\":1}");
        assert!(!text.contains("text_delta"));
    }

    #[test]
    fn stream_events() {
        let mut ev = Events::new("m");
        let mut out = Vec::new();
        ev.chunk(
            br#"{"choices":[{"index":0,"delta":{"content":"Hi"}}]}"#,
            &mut out,
        );
        ev.chunk(br#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"c","function":{"name":"f","arguments":"{}"}}]},"finish_reason":"tool_calls"}]}"#, &mut out);
        ev.done(
            Some(&Usage {
                prompt_tokens: 10,
                completion_tokens: 2,
                total_tokens: 12,
                cached_tokens: 4,
                reasoning_tokens: 0,
            }),
            &mut out,
        );
        let text = String::from_utf8(out).unwrap();
        let kinds: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("event: "))
            .collect();
        assert_eq!(
            kinds,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert!(text.contains(r#""stop_reason":"tool_use""#));
        assert!(text.contains(r#""input_tokens":6"#));
    }
}
