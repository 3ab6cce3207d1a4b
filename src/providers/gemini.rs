//! Google Gemini (`generateContent`, `streamGenerateContent?alt=sse`): OpenAI request ->
//! Gemini request, Gemini answers and stream events -> OpenAI. The key travels in the
//! `x-goog-api-key` header, never in the URL.

use std::collections::HashMap;

use bytes::Bytes;
use http::HeaderMap;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::sse::SseEvent;
use super::stream::StreamItem;
use super::wire::UpstreamAnswer;
use super::{push_turn, typed, AttemptError, Outgoing};
use crate::api::chat::{parse_data_url, Content, Part, Role, ToolChoice, TypedChat};
use crate::api::output::{self, Assembled, ChunkWriter};
use crate::api::{ChatRequest, Usage};
use crate::classify::ErrorClass;
use crate::config::Model;

pub fn request(model: &Model, req: &ChatRequest) -> Result<Outgoing, AttemptError> {
    let chat = typed(req)?;
    let body = to_gemini(chat, model.max_tokens.map(u64::from))
        .map_err(|e| AttemptError::new(ErrorClass::BadRequest, e))?;
    let headers = HeaderMap::new();
    Ok(Outgoing {
        url: super::url_for(model, req),
        body: serde_json::to_vec(&body).unwrap_or_default().into(),
        headers,
    })
}

fn guess_mime(url: &str) -> &'static str {
    let lower = url.to_ascii_lowercase();
    match lower.rsplit('.').next().unwrap_or_default() {
        "png" => "image/png",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "pdf" => "application/pdf",
        _ => "image/jpeg",
    }
}

/// The Gemini request for an OpenAI request.
pub fn to_gemini(chat: &TypedChat, default_max: Option<u64>) -> Result<Value, String> {
    // Tool results need the function's name, which only the assistant turn carries.
    let names: HashMap<&str, &str> = chat
        .messages
        .iter()
        .flat_map(|m| m.tool_calls.iter().flatten())
        .map(|c| (c.id.as_str(), c.function.name.as_str()))
        .collect();
    let system = chat.system_prompt();
    let mut contents: Vec<(&'static str, Vec<Value>)> = Vec::new();
    let mut push = |role: &'static str, parts: Vec<Value>| push_turn(&mut contents, role, parts);
    for m in &chat.messages {
        match m.role {
            Role::System | Role::Developer => {}
            Role::User => {
                let parts = match &m.content {
                    None => Vec::new(),
                    Some(Content::Text(t)) => vec![json!({"text": t})],
                    Some(Content::Parts(ps)) => {
                        ps.iter().map(user_part).collect::<Result<_, _>>()?
                    }
                };
                push("user", parts);
            }
            Role::Assistant => {
                let mut parts = Vec::new();
                if let Some(t) = m
                    .content
                    .as_ref()
                    .map(Content::text)
                    .filter(|t| !t.is_empty())
                {
                    parts.push(json!({"text": t}));
                }
                for call in m.tool_calls.iter().flatten() {
                    parts.push(json!({"functionCall": {"name": call.function.name, "args": call.function.arguments_json()?}}));
                }
                push("model", parts);
            }
            Role::Tool | Role::Function => {
                let text = m.content.as_ref().map(Content::text).unwrap_or_default();
                let name = m
                    .tool_call_id
                    .as_deref()
                    .and_then(|id| names.get(id).copied())
                    .or(m.name.as_deref())
                    .ok_or("a tool result does not match any earlier tool call")?;
                // The response must be an object: a JSON object answer goes as it is.
                let response = match serde_json::from_str::<Value>(&text) {
                    Ok(v @ Value::Object(_)) => v,
                    _ => json!({"output": text}),
                };
                push(
                    "user",
                    vec![json!({"functionResponse": {"name": name, "response": response}})],
                );
            }
        }
    }
    let mut out_contents = Vec::with_capacity(contents.len() + 1);
    for (role, mut parts) in contents {
        parts.retain(|p| {
            p.get("text")
                .is_none_or(|t| t.as_str().is_some_and(|t| !t.is_empty()))
        });
        if !parts.is_empty() {
            out_contents.push(json!({"role": role, "parts": parts}));
        }
    }
    if out_contents.first().is_some_and(|c| c["role"] == "model") {
        out_contents.insert(0, json!({"role": "user", "parts": [{"text": "."}]}));
    }
    if out_contents.is_empty() {
        return Err("the request has no user or assistant messages".into());
    }

    let mut body = Map::new();
    body.insert("contents".into(), Value::Array(out_contents));
    if !system.is_empty() {
        body.insert(
            "systemInstruction".into(),
            json!({"parts": [{"text": system.join("\n\n")}]}),
        );
    }
    let mut gen = Map::new();
    let mut set = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            gen.insert(k.into(), v);
        }
    };
    set("temperature", chat.temperature.map(|t| json!(t)));
    set("topP", chat.top_p.map(|t| json!(t)));
    set("topK", chat.top_k.map(|t| json!(t)));
    set(
        "maxOutputTokens",
        chat.max_output().or(default_max).map(|t| json!(t)),
    );
    // `n` is not sent: the translation returns one choice, and extra candidates would be
    // paid for and dropped.
    set("seed", chat.seed.map(|t| json!(t)));
    set("presencePenalty", chat.presence_penalty.map(|t| json!(t)));
    set("frequencyPenalty", chat.frequency_penalty.map(|t| json!(t)));
    let stops = chat.stop_sequences();
    set("stopSequences", (!stops.is_empty()).then(|| json!(stops)));
    if let Some(rf) = &chat.response_format {
        if rf.kind == "json_object" || rf.kind == "json_schema" {
            set("responseMimeType", Some(json!("application/json")));
        }
        if let Some(schema) = rf.json_schema.as_ref().and_then(|s| s.schema.clone()) {
            set("responseJsonSchema", Some(schema));
        }
    }
    if !gen.is_empty() {
        body.insert("generationConfig".into(), Value::Object(gen));
    }
    if let Some(tools) = chat.tools.as_ref().filter(|t| !t.is_empty()) {
        let decls: Vec<Value> = tools
            .iter()
            .map(|t| {
                let mut d = json!({"name": t.function.name});
                if let Some(desc) = &t.function.description {
                    d["description"] = json!(desc);
                }
                if let Some(p) = &t.function.parameters {
                    d["parametersJsonSchema"] = p.clone();
                }
                d
            })
            .collect();
        body.insert("tools".into(), json!([{"functionDeclarations": decls}]));
        let config = match &chat.tool_choice {
            None => None,
            Some(ToolChoice::Mode(m)) => Some(match m.as_str() {
                "required" => json!({"mode": "ANY"}),
                "none" => json!({"mode": "NONE"}),
                _ => json!({"mode": "AUTO"}),
            }),
            Some(ToolChoice::Named(n)) => {
                Some(json!({"mode": "ANY", "allowedFunctionNames": [n.function.name]}))
            }
        };
        if let Some(c) = config {
            body.insert("toolConfig".into(), json!({"functionCallingConfig": c}));
        }
    }
    Ok(Value::Object(body))
}

fn user_part(p: &Part) -> Result<Value, String> {
    Ok(match p {
        Part::Text { text } | Part::Refusal { refusal: text } => json!({"text": text}),
        Part::ImageUrl { image_url } => match parse_data_url(&image_url.url) {
            Some((mime, data)) => json!({"inlineData": {"mimeType": mime, "data": data}}),
            None => {
                json!({"fileData": {"mimeType": guess_mime(&image_url.url), "fileUri": image_url.url}})
            }
        },
        Part::InputAudio { input_audio } => {
            json!({"inlineData": {"mimeType": format!("audio/{}", input_audio.format), "data": input_audio.data}})
        }
        Part::File { file } => match &file.file_data {
            Some(data) => {
                let (mime, b64) =
                    parse_data_url(data).unwrap_or(("application/pdf", data.as_str()));
                json!({"inlineData": {"mimeType": mime, "data": b64}})
            }
            None => {
                return Err("file_id references are OpenAI-specific; send file_data instead".into())
            }
        },
    })
}

/// `finishReason` -> `finish_reason` (a turn with function calls is `tool_calls`).
pub fn finish_reason(reason: Option<&str>, called_tools: bool) -> &'static str {
    match reason {
        Some("MAX_TOKENS") => "length",
        Some(
            "SAFETY"
            | "RECITATION"
            | "BLOCKLIST"
            | "PROHIBITED_CONTENT"
            | "SPII"
            | "IMAGE_SAFETY"
            | "IMAGE_PROHIBITED_CONTENT"
            | "IMAGE_RECITATION"
            | "LANGUAGE"
            | "OTHER"
            | "IMAGE_OTHER",
        ) => "content_filter",
        _ if called_tools => "tool_calls",
        _ => "stop",
    }
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(rename_all = "camelCase")]
struct UsageMetadata {
    #[serde(default)]
    prompt_token_count: u64,
    #[serde(default)]
    candidates_token_count: u64,
    #[serde(default)]
    thoughts_token_count: u64,
    #[serde(default)]
    tool_use_prompt_token_count: u64,
    #[serde(default)]
    cached_content_token_count: u64,
}

impl UsageMetadata {
    fn to_openai(self) -> Usage {
        let prompt = self.prompt_token_count + self.tool_use_prompt_token_count;
        let completion = self.candidates_token_count + self.thoughts_token_count;
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            cached_tokens: self.cached_content_token_count.min(prompt),
            reasoning_tokens: self.thoughts_token_count,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct GenerateResponse {
    #[serde(default)]
    candidates: Vec<Candidate>,
    #[serde(default)]
    prompt_feedback: Option<PromptFeedback>,
    #[serde(default)]
    usage_metadata: Option<UsageMetadata>,
    #[serde(default)]
    response_id: Option<String>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PromptFeedback {
    #[serde(default)]
    block_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Candidate {
    #[serde(default)]
    content: Option<CandidateContent>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct CandidateContent {
    #[serde(default)]
    parts: Vec<GeminiPart>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct GeminiPart {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    thought: Option<bool>,
    #[serde(default)]
    function_call: Option<FunctionCallPart>,
}

#[derive(Debug, Deserialize)]
struct FunctionCallPart {
    #[serde(default)]
    id: Option<String>,
    name: String,
    #[serde(default)]
    args: Option<Value>,
}

/// An OpenAI tool-call id for a Gemini call (which may have none).
fn call_id(response_id: &str, call: &FunctionCallPart, k: usize) -> String {
    call.id.clone().unwrap_or_else(|| {
        format!(
            "call_{}_{k}",
            response_id
                .chars()
                .filter(char::is_ascii_alphanumeric)
                .take(16)
                .collect::<String>()
        )
    })
}

/// The OpenAI answer for a Gemini response. A blocked prompt becomes an empty answer
/// with `finish_reason: content_filter` (a `content_policy` failure to the engine).
pub fn from_gemini(body: &[u8], model_id: &str) -> Result<Bytes, String> {
    assemble(body, model_id).map(|(b, _)| b)
}

/// The answer read once: its OpenAI body and the parts it was written from.
pub fn assemble(body: &[u8], model_id: &str) -> Result<(Bytes, Assembled), String> {
    let r: GenerateResponse = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let id = r.response_id.clone().unwrap_or_else(|| "gemini".into());
    let mut a = Assembled {
        usage: r.usage_metadata.map(UsageMetadata::to_openai),
        finish_reason: "stop",
        ..Default::default()
    };
    let Some(cand) = r.candidates.first() else {
        if r.prompt_feedback.and_then(|f| f.block_reason).is_some() {
            a.finish_reason = "content_filter";
        }
        return Ok((output::completion(&id, model_id, &a), a));
    };
    let mut text = String::new();
    let mut reasoning = String::new();
    for part in cand.content.iter().flat_map(|c| &c.parts) {
        if let Some(call) = &part.function_call {
            let k = a.tool_calls.len();
            let args = call.args.clone().unwrap_or_else(|| json!({})).to_string();
            a.tool_calls
                .push((call_id(&id, call, k), call.name.clone(), args));
        } else if let Some(t) = &part.text {
            if part.thought == Some(true) {
                reasoning.push_str(t);
            } else {
                text.push_str(t);
            }
        }
    }
    a.content = (!text.is_empty()).then_some(text);
    a.reasoning = (!reasoning.is_empty()).then_some(reasoning);
    a.finish_reason = finish_reason(cand.finish_reason.as_deref(), !a.tool_calls.is_empty());
    Ok((output::completion(&id, model_id, &a), a))
}

pub fn completion(body: &[u8], model: &Model) -> Result<(Bytes, Assembled), AttemptError> {
    assemble(body, &model.model_id).map_err(|e| {
        AttemptError::new(
            ErrorClass::Transient,
            format!("malformed Gemini answer: {e}"),
        )
    })
}

/// Translates Gemini stream events (each a partial `GenerateContentResponse`) into
/// OpenAI chunks. Gemini has no terminator: the end of the upstream body ends it.
pub struct StreamState {
    writer: ChunkWriter,
    started: bool,
    tools: usize,
    finished: bool,
    usage: Option<UsageMetadata>,
}

impl StreamState {
    pub(crate) fn new(model: &Model, include_usage: bool) -> Self {
        Self::with_model_id(model.model_id.clone(), include_usage)
    }

    pub fn with_model_id(model_id: String, include_usage: bool) -> Self {
        StreamState {
            writer: ChunkWriter::new(String::new(), model_id, include_usage),
            started: false,
            tools: 0,
            finished: false,
            usage: None,
        }
    }

    pub fn on_event(&mut self, ev: &SseEvent) -> Result<Vec<StreamItem>, AttemptError> {
        let r: GenerateResponse = serde_json::from_slice(&ev.data).map_err(|e| {
            AttemptError::new(
                ErrorClass::Transient,
                format!("malformed Gemini event: {e}"),
            )
        })?;
        if let Some(err) = r.error {
            let status = err["code"].as_u64().unwrap_or(500) as u16;
            let class = match status {
                429 => ErrorClass::RateLimited,
                504 => ErrorClass::Timeout,
                _ => ErrorClass::Transient,
            };
            let message = err["message"].as_str().unwrap_or("upstream stream error");
            return Err(AttemptError::new(class, format!("Gemini: {message}")));
        }
        let mut items = Vec::new();
        if !self.started {
            self.started = true;
            if let Some(id) = &r.response_id {
                self.writer.id = id.clone();
            }
            items.push(StreamItem::delta(self.writer.role(), false));
        }
        if r.usage_metadata.is_some() {
            self.usage = r.usage_metadata;
        }
        let w = &self.writer;
        let Some(cand) = r.candidates.first() else {
            if r.prompt_feedback.and_then(|f| f.block_reason).is_some() {
                self.finished = true;
                items.push(StreamItem::Chunk {
                    data: w.finish("content_filter"),
                    has_content: false,
                    finish_reason: Some("content_filter".into()),
                    usage: self.usage.map(UsageMetadata::to_openai),
                });
            }
            return Ok(items);
        };
        for part in cand.content.iter().flat_map(|c| &c.parts) {
            if let Some(call) = &part.function_call {
                let k = self.tools;
                self.tools += 1;
                let args = call.args.clone().unwrap_or_else(|| json!({})).to_string();
                items.push(StreamItem::delta(
                    w.tool_start(k, &call_id(&w.id, call, k), &call.name, &args),
                    true,
                ));
            } else if let Some(t) = part.text.as_deref().filter(|t| !t.is_empty()) {
                let data = if part.thought == Some(true) {
                    w.reasoning(t)
                } else {
                    w.content(t)
                };
                items.push(StreamItem::delta(data, true));
            }
        }
        if let Some(reason) = cand.finish_reason.as_deref() {
            self.finished = true;
            let mapped = finish_reason(Some(reason), self.tools > 0);
            items.push(StreamItem::Chunk {
                data: w.finish(mapped),
                has_content: false,
                finish_reason: Some(mapped.to_string()),
                usage: self.usage.map(UsageMetadata::to_openai),
            });
        }
        Ok(items)
    }

    /// At the end of the body: the usage chunk (if asked for) and the end, or nothing if
    /// the stream never finished (the caller reports it as cut).
    pub fn at_eof(&mut self) -> Vec<StreamItem> {
        if !self.finished {
            return Vec::new();
        }
        let usage = self.usage.map(UsageMetadata::to_openai).unwrap_or_default();
        let mut items = Vec::new();
        if self.writer.include_usage {
            items.push(StreamItem::Chunk {
                data: self.writer.usage(&usage),
                has_content: false,
                finish_reason: None,
                usage: Some(usage),
            });
        }
        items.push(StreamItem::Done);
        items
    }
}

/// Google Gemini (`generateContent`, `streamGenerateContent?alt=sse`).
pub struct GeminiFormat;

impl super::wire::WireFormat for GeminiFormat {
    fn request(&self, model: &Model, req: &ChatRequest) -> Result<Outgoing, AttemptError> {
        request(model, req)
    }

    fn completion(&self, body: Bytes, model: &Model) -> Result<UpstreamAnswer, AttemptError> {
        completion(&body, model).map(|(b, a)| UpstreamAnswer::Assembled(b, a))
    }

    fn stream(&self, model: &Model, req: &ChatRequest) -> Box<dyn super::wire::StreamTranslator> {
        Box::new(StreamState::new(model, req.include_usage))
    }
}

// Gemini has no terminator: the end of the body is the end of the answer.
impl super::wire::StreamTranslator for StreamState {
    fn on_event(&mut self, ev: &SseEvent) -> Result<Vec<StreamItem>, AttemptError> {
        StreamState::on_event(self, ev)
    }

    fn at_eof(&mut self) -> Vec<StreamItem> {
        StreamState::at_eof(self)
    }
}
