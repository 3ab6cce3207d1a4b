//! The mock's answers in each wire format. An answer is planned once, format-neutral
//! (`Answer`), then written as an OpenAI, Anthropic or Gemini body or event stream.

use bytes::Bytes;
use serde_json::{json, Value};

/// Which API a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    OpenAi,
    Anthropic,
    Gemini,
}

/// A planned tool call.
#[derive(Debug, Clone)]
pub struct ToolPlan {
    pub id: String,
    pub name: String,
    /// The arguments JSON, split as a stream would send it.
    pub fragments: Vec<String>,
}

impl ToolPlan {
    pub fn arguments(&self) -> String {
        self.fragments.concat()
    }
}

/// One answer, before it is written in a format.
#[derive(Debug, Clone)]
pub struct Answer {
    pub id: String,
    pub model: String,
    pub created: u64,
    pub pieces: Vec<String>,
    pub tool: Option<ToolPlan>,
    /// In OpenAI's words: stop, length, tool_calls, content_filter.
    pub finish: String,
    pub prompt_tokens: u64,
    /// The part of the prompt read from the provider's prompt cache.
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    pub include_usage: bool,
    /// Gemini: the prompt was blocked (no candidates).
    pub blocked: bool,
}

/// OpenAI's usage object; `prompt_tokens` includes the cached part.
fn openai_usage(a: &Answer) -> Value {
    json!({"prompt_tokens": a.prompt_tokens, "completion_tokens": a.completion_tokens,
           "total_tokens": a.prompt_tokens + a.completion_tokens,
           "prompt_tokens_details": {"cached_tokens": a.cached_tokens}})
}

impl Answer {
    fn text(&self) -> String {
        self.pieces.concat()
    }
}

/// One step of a streamed answer.
#[derive(Debug, Clone)]
pub enum Step {
    Start,
    Piece(usize),
    ToolStart,
    ToolFragment(usize),
    Finish,
    /// An error event inside the stream.
    Error,
}

fn anthropic_stop(finish: &str) -> &'static str {
    match finish {
        "length" => "max_tokens",
        "tool_calls" => "tool_use",
        "content_filter" => "refusal",
        _ => "end_turn",
    }
}

fn gemini_finish(finish: &str) -> &'static str {
    match finish {
        "length" => "MAX_TOKENS",
        "content_filter" => "SAFETY",
        _ => "STOP",
    }
}

/// The non-streaming body.
pub fn body(format: Format, a: &Answer) -> Value {
    let text = a.text();
    match format {
        Format::OpenAi => {
            let mut message = json!({"role": "assistant", "content": text, "refusal": null});
            if let Some(t) = &a.tool {
                message["content"] = Value::Null;
                message["tool_calls"] = json!([{"id": t.id, "type": "function", "function": {"name": t.name, "arguments": t.arguments()}}]);
            }
            json!({
                "id": a.id, "object": "chat.completion", "created": a.created, "model": a.model,
                "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": a.finish}],
                "usage": openai_usage(a),
            })
        }
        Format::Anthropic => {
            let mut content = Vec::new();
            if !text.is_empty() || a.tool.is_none() {
                content.push(json!({"type": "text", "text": text}));
            }
            if let Some(t) = &a.tool {
                let input: Value =
                    serde_json::from_str(&t.arguments()).unwrap_or_else(|_| json!({}));
                content
                    .push(json!({"type": "tool_use", "id": t.id, "name": t.name, "input": input}));
            }
            json!({
                "id": a.id, "type": "message", "role": "assistant", "model": a.model, "content": content,
                "stop_reason": anthropic_stop(&a.finish), "stop_sequence": null,
                "usage": {"input_tokens": a.prompt_tokens - a.cached_tokens, "output_tokens": a.completion_tokens,
                          "cache_creation_input_tokens": 0, "cache_read_input_tokens": a.cached_tokens},
            })
        }
        Format::Gemini => {
            let usage = json!({"promptTokenCount": a.prompt_tokens, "candidatesTokenCount": a.completion_tokens,
                               "totalTokenCount": a.prompt_tokens + a.completion_tokens,
                               "cachedContentTokenCount": a.cached_tokens});
            if a.blocked {
                return json!({"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": usage,
                              "modelVersion": a.model, "responseId": a.id});
            }
            let mut parts = vec![json!({"text": text})];
            if let Some(t) = &a.tool {
                let args: Value =
                    serde_json::from_str(&t.arguments()).unwrap_or_else(|_| json!({}));
                parts.push(json!({"functionCall": {"name": t.name, "args": args}}));
            }
            json!({
                "candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": gemini_finish(&a.finish), "index": 0}],
                "usageMetadata": usage, "modelVersion": a.model, "responseId": a.id,
            })
        }
    }
}

fn sse(event: Option<&str>, data: &Value) -> Bytes {
    match event {
        Some(e) => Bytes::from(format!("event: {e}\ndata: {data}\n\n")),
        None => Bytes::from(format!("data: {data}\n\n")),
    }
}

/// The bytes for one step of a streamed answer (`None`: nothing to send for it).
pub fn event(format: Format, a: &Answer, step: &Step) -> Option<Bytes> {
    match format {
        Format::OpenAi => openai_event(a, step),
        Format::Anthropic => anthropic_event(a, step),
        Format::Gemini => gemini_event(a, step),
    }
}

/// Bytes after the last step (the usage chunk and terminator, where the format has them).
pub fn tail(format: Format, a: &Answer) -> Vec<Bytes> {
    match format {
        Format::OpenAi => {
            let mut out = Vec::new();
            if a.include_usage {
                let u = json!({"id": a.id, "object": "chat.completion.chunk", "created": a.created, "model": a.model, "choices": [],
                    "usage": openai_usage(a)});
                out.push(sse(None, &u));
            }
            out.push(Bytes::from_static(b"data: [DONE]\n\n"));
            out
        }
        Format::Anthropic => vec![sse(Some("message_stop"), &json!({"type": "message_stop"}))],
        Format::Gemini => Vec::new(),
    }
}

fn openai_event(a: &Answer, step: &Step) -> Option<Bytes> {
    let chunk = |delta: Value, finish: Option<&str>| {
        let mut c = json!({"id": a.id, "object": "chat.completion.chunk", "created": a.created, "model": a.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]});
        if a.include_usage {
            c["usage"] = Value::Null;
        }
        sse(None, &c)
    };
    Some(match step {
        Step::Start => chunk(json!({"role": "assistant", "content": ""}), None),
        Step::Piece(i) => chunk(json!({"content": a.pieces[*i]}), None),
        Step::ToolStart => {
            let t = a.tool.as_ref()?;
            chunk(
                json!({"tool_calls": [{"index": 0, "id": t.id, "type": "function", "function": {"name": t.name, "arguments": ""}}]}),
                None,
            )
        }
        Step::ToolFragment(i) => {
            let t = a.tool.as_ref()?;
            chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": t.fragments[*i]}}]}),
                None,
            )
        }
        Step::Finish => chunk(json!({}), Some(&a.finish)),
        Step::Error => sse(
            None,
            &json!({"error": {"message": "mock: overloaded", "type": "server_error", "param": null, "code": "overloaded"}}),
        ),
    })
}

fn anthropic_event(a: &Answer, step: &Step) -> Option<Bytes> {
    let tool_block = if a.pieces.is_empty() { 0 } else { 1 };
    Some(match step {
        Step::Start => {
            let start = json!({"type": "message_start", "message": {"id": a.id, "type": "message", "role": "assistant",
                "content": [], "model": a.model, "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": a.prompt_tokens - a.cached_tokens, "output_tokens": 1, "cache_creation_input_tokens": 0, "cache_read_input_tokens": a.cached_tokens}}});
            let mut out = sse(Some("message_start"), &start).to_vec();
            if !a.pieces.is_empty() {
                out.extend_from_slice(&sse(
                    Some("content_block_start"),
                    &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
                ));
            }
            out.extend_from_slice(&sse(Some("ping"), &json!({"type": "ping"})));
            Bytes::from(out)
        }
        Step::Piece(i) => {
            let mut out = sse(
                Some("content_block_delta"),
                &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": a.pieces[*i]}}),
            )
            .to_vec();
            if *i + 1 == a.pieces.len() {
                out.extend_from_slice(&sse(
                    Some("content_block_stop"),
                    &json!({"type": "content_block_stop", "index": 0}),
                ));
            }
            Bytes::from(out)
        }
        Step::ToolStart => {
            let t = a.tool.as_ref()?;
            sse(
                Some("content_block_start"),
                &json!({"type": "content_block_start", "index": tool_block,
                        "content_block": {"type": "tool_use", "id": t.id, "name": t.name, "input": {}}}),
            )
        }
        Step::ToolFragment(i) => {
            let t = a.tool.as_ref()?;
            let mut out = sse(
                Some("content_block_delta"),
                &json!({"type": "content_block_delta", "index": tool_block,
                        "delta": {"type": "input_json_delta", "partial_json": t.fragments[*i]}}),
            )
            .to_vec();
            if *i + 1 == t.fragments.len() {
                out.extend_from_slice(&sse(
                    Some("content_block_stop"),
                    &json!({"type": "content_block_stop", "index": tool_block}),
                ));
            }
            Bytes::from(out)
        }
        Step::Finish => sse(
            Some("message_delta"),
            &json!({"type": "message_delta", "delta": {"stop_reason": anthropic_stop(&a.finish), "stop_sequence": null},
                    "usage": {"output_tokens": a.completion_tokens}}),
        ),
        Step::Error => sse(
            Some("error"),
            &json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
        ),
    })
}

fn gemini_event(a: &Answer, step: &Step) -> Option<Bytes> {
    let usage = json!({"promptTokenCount": a.prompt_tokens, "totalTokenCount": a.prompt_tokens});
    let event = |parts: Value, finish: Option<&str>, usage: Value| {
        let mut cand = json!({"content": {"role": "model", "parts": parts}, "index": 0});
        if let Some(f) = finish {
            cand["finishReason"] = json!(f);
        }
        sse(
            None,
            &json!({"candidates": [cand], "usageMetadata": usage, "modelVersion": a.model, "responseId": a.id}),
        )
    };
    Some(match step {
        // Gemini has no start event; a blocked prompt is the whole stream.
        Step::Start if a.blocked => sse(
            None,
            &json!({"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": usage, "modelVersion": a.model, "responseId": a.id}),
        ),
        Step::Start => return None,
        Step::Piece(i) => event(json!([{"text": a.pieces[*i]}]), None, usage),
        // Function calls arrive whole.
        Step::ToolStart => {
            let t = a.tool.as_ref()?;
            let args: Value = serde_json::from_str(&t.arguments()).unwrap_or_else(|_| json!({}));
            event(
                json!([{"functionCall": {"name": t.name, "args": args}}]),
                None,
                usage,
            )
        }
        Step::ToolFragment(_) => return None,
        Step::Finish if a.blocked => return None,
        Step::Finish => event(
            json!([{"text": ""}]),
            Some(gemini_finish(&a.finish)),
            json!({"promptTokenCount": a.prompt_tokens, "candidatesTokenCount": a.completion_tokens,
                   "totalTokenCount": a.prompt_tokens + a.completion_tokens,
                   "cachedContentTokenCount": a.cached_tokens}),
        ),
        Step::Error => sse(
            None,
            &json!({"error": {"code": 503, "message": "mock: overloaded", "status": "UNAVAILABLE"}}),
        ),
    })
}

/// An error answer in the format's own error shape.
pub fn error_body(format: Format, status: u16, code_override: Option<&str>) -> Value {
    let (kind, code, message) = match status {
        400 => (
            "invalid_request_error",
            "invalid_value",
            "mock: the request is invalid",
        ),
        401 => (
            "authentication_error",
            "invalid_api_key",
            "mock: incorrect API key provided",
        ),
        403 => (
            "permission_error",
            "forbidden",
            "mock: no access to this model",
        ),
        404 => (
            "not_found_error",
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
        529 => ("overloaded_error", "overloaded", "mock: overloaded"),
        _ => ("api_error", "server_error", "mock: the server had an error"),
    };
    let code = code_override.unwrap_or(code);
    match format {
        Format::OpenAi => {
            let kind = match status {
                400 | 401 | 403 | 404 | 422 => "invalid_request_error",
                429 => "rate_limit_error",
                _ => "server_error",
            };
            json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
        }
        Format::Anthropic => {
            // Anthropic says "prompt is too long" for a context overflow.
            let message = if code == "context_length_exceeded" {
                "prompt is too long: 208656 tokens > 200000 maximum"
            } else {
                message
            };
            json!({"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_mock"})
        }
        Format::Gemini => {
            let status_name = match status {
                400 => "INVALID_ARGUMENT",
                401 => "UNAUTHENTICATED",
                403 => "PERMISSION_DENIED",
                404 => "NOT_FOUND",
                429 => "RESOURCE_EXHAUSTED",
                503 => "UNAVAILABLE",
                504 => "DEADLINE_EXCEEDED",
                _ => "INTERNAL",
            };
            let message = if code == "context_length_exceeded" {
                "The input token count (1200293) exceeds the maximum number of tokens allowed (1048576)."
            } else {
                message
            };
            json!({"error": {"code": status, "message": message, "status": status_name}})
        }
    }
}
