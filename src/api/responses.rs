//! `POST /v1/responses` (OpenAI Responses API): the request translated into the one
//! internal chat request, and the engine's answer written back as a `response` object
//! or as the Responses stream's semantic events. Pure: no I/O, no providers.

use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::answer::{ChatAnswer, ChunkDelta};
use super::{ApiError, Usage};

/// A Responses request after translation.
#[derive(Debug)]
pub struct Translated {
    /// The chat request the engine runs.
    pub chat: super::ChatRequest,
    pub echo: Echo,
    /// This turn's input as Responses items (stored with the answer).
    pub input_items: Vec<Value>,
    /// Types of the tools no chat target can run, dropped from the upstream request.
    pub dropped_tools: Vec<String>,
}

/// What a `response` object repeats from its request.
#[derive(Debug, Clone, Default)]
pub struct Echo {
    pub instructions: Value,
    pub tools: Value,
    pub tool_choice: Value,
    pub temperature: Value,
    pub top_p: Value,
    pub text: Value,
    pub previous_response_id: Value,
    pub metadata: Value,
    pub store: bool,
    pub parallel_tool_calls: bool,
    pub max_output_tokens: Value,
    pub user: Value,
    pub reasoning: Value,
}

/// The fields cascade reads; the rest (`include`, `reasoning`, `prompt_cache_key`,
/// `client_metadata`, `truncation`, ...) are accepted and do not apply to a chat target.
#[derive(Deserialize)]
pub struct Wire {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    input: Option<Value>,
    #[serde(default)]
    instructions: Option<Value>,
    #[serde(default)]
    tools: Option<Vec<Value>>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    parallel_tool_calls: Option<bool>,
    #[serde(default)]
    max_output_tokens: Option<u64>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    text: Option<Value>,
    #[serde(default)]
    metadata: Option<Value>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    store: Option<bool>,
    #[serde(default)]
    pub previous_response_id: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    reasoning: Option<Value>,
}

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid_request(message).with_param(param)
}

/// Parses the body (once). `model` and `previous_response_id` are then known, so the
/// caller can fetch the earlier turn before [`translate`].
pub fn parse(body: &[u8]) -> Result<Wire, ApiError> {
    let text = super::json_text(body)
        .map_err(|e| ApiError::invalid_request(format!("The body is not valid JSON: {e}")))?;
    serde_json::from_str(text).map_err(|e| {
        ApiError::invalid_request(format!("The body is not a valid Responses request: {e}"))
    })
}

/// The chat request for `wire`, after the `history` of an earlier response (its input
/// and output items, in order).
pub fn translate(wire: Wire, history: &[Value]) -> Result<Translated, ApiError> {
    let input_items = match wire.input {
        None | Some(Value::Null) => {
            return Err(bad("input", "Missing required parameter: 'input'."))
        }
        Some(Value::String(s)) => vec![json!({"type": "message", "role": "user", "content": s})],
        Some(Value::Array(items)) => items,
        Some(_) => {
            return Err(bad(
                "input",
                "Invalid 'input': expected a string or a list of items.",
            ))
        }
    };
    let mut messages = Vec::with_capacity(history.len() + input_items.len() + 1);
    match &wire.instructions {
        Some(Value::String(s)) if !s.is_empty() => {
            messages.push(json!({"role": "system", "content": s}))
        }
        Some(Value::Array(items)) => items_to_messages(items, &mut messages, "instructions")?,
        _ => {}
    }
    items_to_messages(history, &mut messages, "previous_response_id")?;
    items_to_messages(&input_items, &mut messages, "input")?;
    if messages.is_empty() {
        return Err(bad(
            "input",
            "Invalid 'input': the request has no messages.",
        ));
    }

    let mut chat = Map::new();
    if let Some(m) = &wire.model {
        chat.insert("model".into(), json!(m));
    }
    chat.insert("messages".into(), Value::Array(messages));

    let mut dropped_tools = Vec::new();
    let mut chat_tools = Vec::new();
    let mut echo_tools = Vec::new();
    for tool in wire.tools.iter().flatten() {
        let kind = tool
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("function");
        if kind != "function" {
            dropped_tools.push(kind.to_string());
            echo_tools.push(tool.clone());
            continue;
        }
        let name = tool
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("tools", "Invalid 'tools': a function tool needs a 'name'."))?;
        let parameters = tool.get("parameters").cloned().unwrap_or(Value::Null);
        let strict = tool.get("strict").and_then(Value::as_bool);
        let description = tool.get("description").cloned().unwrap_or(Value::Null);
        let mut function = json!({"name": name});
        if !description.is_null() {
            function["description"] = description.clone();
        }
        if !parameters.is_null() {
            function["parameters"] = parameters.clone();
        }
        if let Some(s) = strict {
            function["strict"] = json!(s);
        }
        chat_tools.push(json!({"type": "function", "function": function}));
        echo_tools.push(json!({
            "type": "function", "name": name, "description": description,
            "parameters": if parameters.is_null() { json!({"type": "object", "properties": {}}) } else { parameters },
            "strict": strict.unwrap_or(false),
        }));
    }
    let tool_choice = wire.tool_choice.clone().unwrap_or(json!("auto"));
    match &tool_choice {
        Value::String(mode) if ["auto", "none", "required"].contains(&mode.as_str()) => {
            if !chat_tools.is_empty() && wire.tool_choice.is_some() {
                chat.insert("tool_choice".into(), json!(mode));
            }
        }
        Value::Object(o) => match o.get("type").and_then(Value::as_str) {
            Some("function") => {
                let name = o.get("name").and_then(Value::as_str).ok_or_else(|| {
                    bad("tool_choice", "Invalid 'tool_choice': a function choice needs a 'name'.")
                })?;
                chat.insert(
                    "tool_choice".into(),
                    json!({"type": "function", "function": {"name": name}}),
                );
            }
            Some("allowed_tools") => {
                if let Some(mode) = o.get("mode").and_then(Value::as_str) {
                    chat.insert("tool_choice".into(), json!(mode));
                }
            }
            Some(kind) => {
                return Err(bad(
                    "tool_choice",
                    format!("Invalid 'tool_choice': it requires a tool of type '{kind}', which the chain's targets cannot run."),
                ))
            }
            None => return Err(bad("tool_choice", "Invalid 'tool_choice': missing 'type'.")),
        },
        _ => return Err(bad("tool_choice", "Invalid 'tool_choice'.")),
    }
    if !chat_tools.is_empty() {
        chat.insert("tools".into(), Value::Array(chat_tools));
        if let Some(p) = wire.parallel_tool_calls {
            chat.insert("parallel_tool_calls".into(), json!(p));
        }
    } else {
        chat.remove("tool_choice");
    }
    if let Some(n) = wire.max_output_tokens {
        chat.insert("max_completion_tokens".into(), json!(n));
    }
    if let Some(t) = wire.temperature {
        chat.insert("temperature".into(), json!(t));
    }
    if let Some(p) = wire.top_p {
        chat.insert("top_p".into(), json!(p));
    }
    if let Some(u) = &wire.user {
        chat.insert("user".into(), json!(u));
    }
    // Only an effort that is set goes upstream; a target without the `reasoning`
    // capability is then skipped.
    if let Some(effort) = wire
        .reasoning
        .as_ref()
        .and_then(|r| r.get("effort"))
        .and_then(Value::as_str)
    {
        chat.insert("reasoning_effort".into(), json!(effort));
    }
    if let Some(format) = wire.text.as_ref().and_then(|t| t.get("format")) {
        match format.get("type").and_then(Value::as_str) {
            Some("json_schema") => {
                let mut schema = Map::new();
                for key in ["name", "schema", "strict", "description"] {
                    if let Some(v) = format.get(key) {
                        schema.insert(key.into(), v.clone());
                    }
                }
                schema.entry("name").or_insert(json!("response"));
                chat.insert(
                    "response_format".into(),
                    json!({"type": "json_schema", "json_schema": schema}),
                );
            }
            Some("json_object") => {
                chat.insert("response_format".into(), json!({"type": "json_object"}));
            }
            Some("text") | None => {}
            Some(other) => {
                return Err(bad(
                    "text.format",
                    format!("Invalid 'text.format.type': '{other}'."),
                ))
            }
        }
    }
    if wire.stream == Some(true) {
        chat.insert("stream".into(), json!(true));
    }
    let echo = Echo {
        instructions: wire.instructions.unwrap_or(Value::Null),
        tools: Value::Array(echo_tools),
        tool_choice,
        temperature: wire.temperature.map_or(json!(1.0), |t| json!(t)),
        top_p: wire.top_p.map_or(json!(1.0), |t| json!(t)),
        text: wire
            .text
            .filter(|t| t.get("format").is_some())
            .unwrap_or(json!({"format": {"type": "text"}})),
        previous_response_id: wire.previous_response_id.map_or(Value::Null, Value::String),
        metadata: wire.metadata.unwrap_or(json!({})),
        store: wire.store != Some(false),
        parallel_tool_calls: wire.parallel_tool_calls.unwrap_or(true),
        max_output_tokens: wire.max_output_tokens.map_or(Value::Null, |n| json!(n)),
        user: wire.user.map_or(Value::Null, Value::String),
        reasoning: json!({
            "effort": wire.reasoning.as_ref().and_then(|r| r.get("effort")).cloned().unwrap_or(Value::Null),
            "summary": null,
        }),
    };
    Ok(Translated {
        chat: super::ChatRequest::from_translation(chat)?,
        echo,
        input_items,
        dropped_tools,
    })
}

/// Appends the chat messages for Responses input items.
fn items_to_messages(items: &[Value], out: &mut Vec<Value>, param: &str) -> Result<(), ApiError> {
    for item in items {
        let kind = item.get("type").and_then(Value::as_str);
        match kind {
            Some("message") | None if item.get("role").is_some() => {
                let role = match item.get("role").and_then(Value::as_str) {
                    Some("developer") | Some("system") => "system",
                    Some("user") => "user",
                    Some("assistant") => "assistant",
                    other => {
                        return Err(bad(
                            param,
                            format!("Invalid '{param}': unknown role {other:?}."),
                        ))
                    }
                };
                let content = content_to_chat(item.get("content"), role, param)?;
                out.push(json!({"role": role, "content": content}));
            }
            Some("function_call") => {
                let call = json!({
                    "id": item.get("call_id").or_else(|| item.get("id")).cloned().unwrap_or(json!("")),
                    "type": "function",
                    "function": {
                        "name": item.get("name").cloned().unwrap_or(json!("")),
                        "arguments": item.get("arguments").cloned().unwrap_or(json!("{}")),
                    },
                });
                // Consecutive calls are one assistant turn.
                match out.last_mut() {
                    Some(last)
                        if last["role"] == "assistant" && last.get("tool_calls").is_some() =>
                    {
                        if let Some(calls) = last["tool_calls"].as_array_mut() {
                            calls.push(call);
                        }
                    }
                    _ => out
                        .push(json!({"role": "assistant", "content": null, "tool_calls": [call]})),
                }
            }
            Some("function_call_output") => {
                let output = match item.get("output") {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Array(parts)) => parts
                        .iter()
                        .filter_map(|p| p.get("text").and_then(Value::as_str))
                        .collect::<Vec<_>>()
                        .join("\n"),
                    Some(other) => other.to_string(),
                    None => String::new(),
                };
                out.push(json!({
                    "role": "tool",
                    "tool_call_id": item.get("call_id").cloned().unwrap_or(json!("")),
                    "content": output,
                }));
            }
            // Reasoning items, references and built-in tool calls have no chat form.
            _ => {}
        }
    }
    Ok(())
}

fn content_to_chat(content: Option<&Value>, role: &str, param: &str) -> Result<Value, ApiError> {
    let parts = match content {
        None | Some(Value::Null) => return Ok(json!("")),
        Some(Value::String(s)) => return Ok(json!(s)),
        Some(Value::Array(parts)) => parts,
        Some(_) => {
            return Err(bad(
                param,
                format!("Invalid '{param}': message content must be a string or a list of parts."),
            ))
        }
    };
    if role == "assistant" || role == "system" {
        // Chat assistant and system content is text.
        let text: Vec<&str> = parts
            .iter()
            .filter_map(|p| {
                p.get("text")
                    .or_else(|| p.get("refusal"))
                    .and_then(Value::as_str)
            })
            .collect();
        return Ok(json!(text.join("")));
    }
    let mut out = Vec::with_capacity(parts.len());
    for p in parts {
        match p.get("type").and_then(Value::as_str) {
            Some("input_text") | Some("output_text") | Some("text") => out
                .push(json!({"type": "text", "text": p.get("text").cloned().unwrap_or(json!(""))})),
            Some("input_image") => {
                let Some(url) = p.get("image_url").and_then(Value::as_str) else {
                    return Err(bad(param, format!("Invalid '{param}': input_image needs an 'image_url' (file ids are not supported).")));
                };
                let mut image = json!({"url": url});
                if let Some(d) = p.get("detail") {
                    image["detail"] = d.clone();
                }
                out.push(json!({"type": "image_url", "image_url": image}));
            }
            Some("input_file") => {
                let mut file = Map::new();
                for key in ["file_data", "filename", "file_id"] {
                    if let Some(v) = p.get(key) {
                        file.insert(key.into(), v.clone());
                    }
                }
                out.push(json!({"type": "file", "file": file}));
            }
            other => {
                return Err(bad(
                    param,
                    format!("Invalid '{param}': unsupported content part type {other:?}."),
                ))
            }
        }
    }
    Ok(Value::Array(out))
}

/// A response's identity: id, creation time and the echoed request.
#[derive(Debug, Clone)]
pub struct Meta {
    pub id: String,
    pub created_at: u64,
    pub echo: Echo,
}

impl Meta {
    pub fn new(echo: Echo) -> Meta {
        Meta {
            id: new_id("resp"),
            created_at: now_secs(),
            echo,
        }
    }
}

/// `PREFIX_` and 32 hex digits (time-ordered).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The `usage` object, with the detail objects the schema requires.
pub fn usage_value(u: &Usage) -> Value {
    json!({
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
        "total_tokens": u.total_tokens,
    })
}

/// The status and `incomplete_details` for a chat finish reason.
fn status_for(finish: Option<&str>) -> (&'static str, Value) {
    match finish {
        Some("length") => ("incomplete", json!({"reason": "max_output_tokens"})),
        Some("content_filter") => ("incomplete", json!({"reason": "content_filter"})),
        _ => ("completed", Value::Null),
    }
}

/// The `response` object.
pub fn response_value(
    meta: &Meta,
    model_id: &str,
    status: &str,
    output: Vec<Value>,
    usage: Option<&Usage>,
    error: Value,
    incomplete_details: Value,
) -> Value {
    let e = &meta.echo;
    let output_text: String = output
        .iter()
        .filter(|i| i["type"] == "message")
        .flat_map(|i| i["content"].as_array().into_iter().flatten())
        .filter(|p| p["type"] == "output_text")
        .filter_map(|p| p["text"].as_str())
        .collect();
    let mut r = json!({
        "id": meta.id,
        "object": "response",
        "created_at": meta.created_at,
        "status": status,
        "completed_at": if status == "completed" { json!(now_secs()) } else { Value::Null },
        "error": error,
        "incomplete_details": incomplete_details,
        "instructions": e.instructions,
        "max_output_tokens": e.max_output_tokens,
        "model": model_id,
        "output": output,
        "output_text": output_text,
        "parallel_tool_calls": e.parallel_tool_calls,
        "previous_response_id": e.previous_response_id,
        "reasoning": e.reasoning,
        "store": e.store,
        "temperature": e.temperature,
        "text": e.text,
        "tool_choice": e.tool_choice,
        "tools": e.tools,
        "top_p": e.top_p,
        "truncation": "disabled",
        "metadata": e.metadata,
    });
    if let Some(u) = usage {
        r["usage"] = usage_value(u);
    }
    if !e.user.is_null() {
        r["user"] = e.user.clone();
    }
    r
}

fn text_part(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

fn message_item(id: &str, status: &str, content: Vec<Value>) -> Value {
    json!({"type": "message", "id": id, "status": status, "role": "assistant", "content": content})
}

fn function_item(id: &str, call_id: &str, name: &str, arguments: &str, status: &str) -> Value {
    json!({"type": "function_call", "id": id, "call_id": call_id, "name": name, "arguments": arguments, "status": status})
}

/// The output items of a whole chat answer.
pub fn output_items(a: &ChatAnswer) -> Vec<Value> {
    let mut items = Vec::with_capacity(1 + a.tool_calls.len());
    let mut content = Vec::new();
    if let Some(t) = &a.text {
        content.push(text_part(t));
    }
    if let Some(r) = &a.refusal {
        content.push(json!({"type": "refusal", "refusal": r}));
    }
    if !content.is_empty() {
        items.push(message_item(&new_id("msg"), "completed", content));
    }
    for (call_id, name, arguments) in &a.tool_calls {
        items.push(function_item(
            &new_id("fc"),
            call_id,
            name,
            arguments,
            "completed",
        ));
    }
    items
}

/// The `response` object for a whole chat answer.
pub fn from_chat(meta: &Meta, model_id: &str, body: &[u8]) -> Result<Value, serde_json::Error> {
    Ok(from_answer(meta, model_id, &ChatAnswer::parse(body)?))
}

/// The `response` object for an answer already read.
pub fn from_answer(meta: &Meta, model_id: &str, a: &ChatAnswer) -> Value {
    let (status, incomplete) = status_for(a.finish_reason.as_deref());
    response_value(
        meta,
        model_id,
        status,
        output_items(a),
        a.usage.as_ref(),
        Value::Null,
        incomplete,
    )
}

/// A function call being streamed.
#[derive(Debug, Clone)]
struct OpenCall {
    index: usize,
    id: String,
    call_id: String,
    name: String,
    args: String,
    /// Its `.done` events are out: later fragments for it are dropped, never a new item.
    closed: bool,
}

/// The message item being streamed: one output text or one refusal part.
#[derive(Debug, Clone)]
struct OpenMessage {
    index: usize,
    id: String,
    text: String,
    refusal: bool,
}

/// Writes the Responses stream for a chat stream, chunk by chunk. Nothing is written
/// before the first chunk the engine hands over, which is its commit point: until then
/// `response.created` is held, so a failover stays invisible.
#[derive(Debug)]
pub struct Events {
    meta: Meta,
    model_id: String,
    seq: u64,
    started: bool,
    message: Option<OpenMessage>,
    /// Tool calls by chat index.
    tools: Vec<Option<OpenCall>>,
    /// Finished items, by output index.
    output: Vec<Value>,
    finish: Option<String>,
    /// Usage carried by a chunk (a replayed answer), if `done` is given none.
    usage: Option<Usage>,
    /// The final `response` object, once the stream completed.
    pub completed: Option<Value>,
}

fn refusal_part(text: &str) -> Value {
    json!({"type": "refusal", "refusal": text})
}

impl Events {
    pub fn new(meta: Meta, model_id: &str) -> Events {
        Events {
            meta,
            model_id: model_id.to_string(),
            seq: 0,
            started: false,
            message: None,
            tools: Vec::new(),
            output: Vec::new(),
            finish: None,
            usage: None,
            completed: None,
        }
    }

    fn emit(&mut self, out: &mut Vec<u8>, kind: &str, mut data: Value) {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(self.seq);
        self.seq += 1;
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(kind.as_bytes());
        out.extend_from_slice(b"\ndata: ");
        // Serialising a Value into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, &data);
        out.extend_from_slice(b"\n\n");
    }

    fn start(&mut self, out: &mut Vec<u8>) {
        if self.started {
            return;
        }
        self.started = true;
        let r = response_value(
            &self.meta,
            &self.model_id,
            "in_progress",
            Vec::new(),
            None,
            Value::Null,
            Value::Null,
        );
        self.emit(out, "response.created", json!({"response": r}));
        self.emit(out, "response.in_progress", json!({"response": r}));
    }

    /// The index the next output item takes: every item opened so far.
    fn next_index(&self) -> usize {
        self.output.len()
            + usize::from(self.message.is_some())
            + self.tools.iter().flatten().filter(|c| !c.closed).count()
    }

    fn close_message(&mut self, out: &mut Vec<u8>) {
        let Some(m) = self.message.take() else {
            return;
        };
        let (index, id) = (m.index, m.id.clone());
        let part = if m.refusal {
            self.emit(out, "response.refusal.done", json!({"item_id": id, "output_index": index, "content_index": 0, "refusal": m.text}));
            refusal_part(&m.text)
        } else {
            self.emit(out, "response.output_text.done", json!({"item_id": id, "output_index": index, "content_index": 0, "text": m.text, "logprobs": []}));
            text_part(&m.text)
        };
        self.emit(
            out,
            "response.content_part.done",
            json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
        );
        let item = message_item(&id, "completed", vec![part]);
        self.emit(
            out,
            "response.output_item.done",
            json!({"output_index": index, "item": item}),
        );
        self.place(index, item);
    }

    fn close_tools(&mut self, out: &mut Vec<u8>) {
        let open: Vec<OpenCall> = self
            .tools
            .iter_mut()
            .flatten()
            .filter(|c| !c.closed)
            .map(|c| {
                c.closed = true;
                c.clone()
            })
            .collect();
        for c in open {
            self.emit(out, "response.function_call_arguments.done", json!({"item_id": c.id, "output_index": c.index, "arguments": c.args, "name": c.name}));
            let item = function_item(&c.id, &c.call_id, &c.name, &c.args, "completed");
            self.emit(
                out,
                "response.output_item.done",
                json!({"output_index": c.index, "item": item}),
            );
            self.place(c.index, item);
        }
    }

    fn place(&mut self, index: usize, item: Value) {
        if self.output.len() <= index {
            self.output.resize(index + 1, Value::Null);
        }
        self.output[index] = item;
    }

    /// Text or a refusal: into the open message part of that kind, else a new item.
    fn message_delta(&mut self, text: &str, refusal: bool, out: &mut Vec<u8>) {
        if self.message.as_ref().is_some_and(|m| m.refusal != refusal) {
            self.close_message(out);
        }
        if self.message.is_none() {
            self.close_tools(out);
            let index = self.next_index();
            let id = new_id("msg");
            let item = message_item(&id, "in_progress", Vec::new());
            self.emit(
                out,
                "response.output_item.added",
                json!({"output_index": index, "item": item}),
            );
            let part = if refusal {
                refusal_part("")
            } else {
                text_part("")
            };
            self.emit(
                out,
                "response.content_part.added",
                json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
            );
            self.message = Some(OpenMessage {
                index,
                id,
                text: String::new(),
                refusal,
            });
        }
        let Some(m) = self.message.as_mut() else {
            return;
        };
        m.text.push_str(text);
        let (index, id) = (m.index, m.id.clone());
        if refusal {
            self.emit(
                out,
                "response.refusal.delta",
                json!({"item_id": id, "output_index": index, "content_index": 0, "delta": text}),
            );
        } else {
            self.emit(out, "response.output_text.delta", json!({"item_id": id, "output_index": index, "content_index": 0, "delta": text, "logprobs": []}));
        }
    }

    /// Events for one chat chunk (its JSON).
    pub fn chunk(&mut self, data: &[u8], out: &mut Vec<u8>) {
        let Ok(d) = ChunkDelta::parse(data) else {
            return;
        };
        self.start(out);
        // Fragments of open calls first; then text (whitespace between a call's
        // fragments would otherwise close it with half its arguments).
        let calls_open = !d.tools.is_empty() || self.tools.iter().flatten().any(|c| !c.closed);
        for t in d.tools {
            if t.index >= super::MAX_TOOL_CALLS {
                continue;
            }
            let fragment = t.arguments().to_string();
            if self.tools.get(t.index).is_none_or(|s| s.is_none()) {
                self.close_message(out);
                let index = self.next_index();
                let id = new_id("fc");
                let call_id = t.id.clone().unwrap_or_else(|| new_id("call"));
                let name = t.name().to_string();
                let item = function_item(&id, &call_id, &name, "", "in_progress");
                self.emit(
                    out,
                    "response.output_item.added",
                    json!({"output_index": index, "item": item}),
                );
                if self.tools.len() <= t.index {
                    self.tools.resize(t.index + 1, None);
                }
                self.tools[t.index] = Some(OpenCall {
                    index,
                    id,
                    call_id,
                    name,
                    args: String::new(),
                    closed: false,
                });
            }
            if fragment.is_empty() {
                continue;
            }
            if let Some(Some(call)) = self
                .tools
                .get_mut(t.index)
                .filter(|c| c.as_ref().is_some_and(|c| !c.closed))
            {
                call.args.push_str(&fragment);
                let (index, id) = (call.index, call.id.clone());
                self.emit(
                    out,
                    "response.function_call_arguments.delta",
                    json!({"item_id": id, "output_index": index, "delta": fragment}),
                );
            }
        }
        if let Some(text) = d
            .text
            .as_deref()
            .filter(|t| !(calls_open && t.trim().is_empty()))
        {
            self.message_delta(text, false, out);
        }
        if let Some(refusal) = &d.refusal {
            self.message_delta(refusal, true, out);
        }
        if d.finish_reason.is_some() {
            self.finish = d.finish_reason;
        }
        if d.usage.is_some() {
            self.usage = d.usage;
        }
    }

    /// The items finished so far, in output order.
    fn finished_items(&self) -> Vec<Value> {
        self.output
            .iter()
            .filter(|v| !v.is_null())
            .cloned()
            .collect()
    }

    /// The stream completed: close what is open and send `response.completed`.
    pub fn done(&mut self, usage: Option<&Usage>, out: &mut Vec<u8>) {
        let usage = usage.copied().or(self.usage);
        let usage = usage.as_ref();
        self.start(out);
        self.close_message(out);
        self.close_tools(out);
        let (status, incomplete) = status_for(self.finish.as_deref());
        let output = self.finished_items();
        let r = response_value(
            &self.meta,
            &self.model_id,
            status,
            output,
            usage,
            Value::Null,
            incomplete,
        );
        let kind = if status == "completed" {
            "response.completed"
        } else {
            "response.incomplete"
        };
        self.emit(out, kind, json!({"response": r}));
        self.completed = Some(r);
    }

    /// The stream failed after its commit point: `error`, then `response.failed`.
    pub fn fail(&mut self, code: &str, message: &str, out: &mut Vec<u8>) {
        self.start(out);
        self.emit(
            out,
            "error",
            json!({"code": code, "message": message, "param": null}),
        );
        let output = self.finished_items();
        let r = response_value(
            &self.meta,
            &self.model_id,
            "failed",
            output,
            None,
            json!({"code": "server_error", "message": message}),
            Value::Null,
        );
        self.emit(out, "response.failed", json!({"response": r}));
    }
}

/// The items a follow-up turn prepends: this turn's input and its output.
pub fn conversation(history: &[Value], input: &[Value], response: &Value) -> Vec<Value> {
    let mut items = Vec::with_capacity(history.len() + input.len() + 2);
    items.extend_from_slice(history);
    items.extend_from_slice(input);
    if let Some(out) = response["output"].as_array() {
        items.extend(out.iter().cloned());
    }
    items
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Value {
        let t = translate(parse(body.as_bytes()).unwrap(), &[]).unwrap();
        serde_json::from_slice(&t.chat.body).unwrap()
    }

    #[test]
    fn string_input_and_instructions() {
        let c =
            chat(r#"{"model":"m","input":"hi","instructions":"be brief","max_output_tokens":9}"#);
        assert_eq!(
            c,
            json!({"messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}],"max_completion_tokens":9})
        );
    }

    #[test]
    fn items_tools_and_format() {
        let c = chat(
            r#"{"model":"m","input":[
                {"role":"developer","content":"sys"},
                {"type":"message","role":"user","content":[{"type":"input_text","text":"look"},{"type":"input_image","image_url":"data:image/png;base64,AA","detail":"low"}]},
                {"type":"function_call","call_id":"c1","name":"f","arguments":"{}"},
                {"type":"function_call","call_id":"c2","name":"g","arguments":"{}"},
                {"type":"function_call_output","call_id":"c1","output":"one"},
                {"type":"reasoning","id":"rs_1","summary":[]}
            ],
            "tools":[{"type":"function","name":"f","parameters":{"type":"object"}},{"type":"web_search"}],
            "tool_choice":"auto","text":{"format":{"type":"json_schema","name":"x","schema":{"type":"object"},"strict":true}},
            "store":false,"include":["reasoning.encrypted_content"],"reasoning":{"effort":"low"}}"#,
        );
        let m = c["messages"].as_array().unwrap();
        assert_eq!(m[0], json!({"role":"system","content":"sys"}));
        assert_eq!(
            m[1]["content"][1],
            json!({"type":"image_url","image_url":{"url":"data:image/png;base64,AA","detail":"low"}})
        );
        assert_eq!(m[2]["tool_calls"].as_array().unwrap().len(), 2);
        assert_eq!(
            m[3],
            json!({"role":"tool","tool_call_id":"c1","content":"one"})
        );
        assert_eq!(m.len(), 4);
        assert_eq!(
            c["tools"],
            json!([{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}])
        );
        assert_eq!(c["tool_choice"], "auto");
        assert_eq!(c["response_format"]["json_schema"]["name"], "x");
    }

    #[test]
    fn required_builtin_tool_is_refused() {
        let w = parse(br#"{"model":"m","input":"x","tools":[{"type":"web_search"}],"tool_choice":{"type":"web_search"}}"#).unwrap();
        let e = translate(w, &[]).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tool_choice"));
        assert!(e.message.contains("web_search"));
        let w = parse(br#"{"model":"m","input":"x","tools":[{"type":"web_search"}]}"#).unwrap();
        assert_eq!(translate(w, &[]).unwrap().dropped_tools, vec!["web_search"]);
    }

    #[test]
    fn a_closed_call_is_never_reopened() {
        let mut ev = Events::new(Meta::new(Echo::default()), "m");
        let mut out = Vec::new();
        ev.chunk(br#"{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"c","function":{"name":"f","arguments":"{}"}}]}}]}"#, &mut out);
        ev.chunk(br#"{"choices":[{"delta":{"content":"done"}}]}"#, &mut out);
        ev.chunk(
            br#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"x"}}]}}]}"#,
            &mut out,
        );
        ev.chunk(br#"{"choices":[{"delta":{"refusal":"no"}}]}"#, &mut out);
        ev.done(None, &mut out);
        let done = ev.completed.unwrap();
        let kinds: Vec<&str> = done["output"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["type"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["function_call", "message", "message"]);
        assert_eq!(done["output"][0]["arguments"], "{}");
        assert_eq!(done["output"][2]["content"][0]["type"], "refusal");
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("event: response.refusal.delta"));
    }

    #[test]
    fn stream_events_in_order() {
        let meta = Meta::new(Echo::default());
        let mut ev = Events::new(meta, "m");
        let mut out = Vec::new();
        ev.chunk(
            br#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#,
            &mut out,
        );
        ev.chunk(
            br#"{"choices":[{"index":0,"delta":{"content":"Hi"}}]}"#,
            &mut out,
        );
        ev.chunk(br#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"c","function":{"name":"f","arguments":"{\"a\""}}]}}]}"#, &mut out);
        ev.chunk(br#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":":1}"}}]},"finish_reason":"tool_calls"}]}"#, &mut out);
        ev.done(
            Some(&Usage {
                prompt_tokens: 2,
                completion_tokens: 3,
                total_tokens: 5,
                ..Usage::default()
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
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        let done = ev.completed.unwrap();
        assert_eq!(done["output"][1]["arguments"], "{\"a\":1}");
        assert_eq!(done["usage"]["total_tokens"], 5);
        assert_eq!(done["output_text"], "Hi");
    }
}
