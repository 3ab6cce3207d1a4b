//! `POST /v1/chat/completions` request: parsed once, validated, and kept as the original
//! bytes so an OpenAI-format upstream gets them back with only `model` rewritten.

use std::ops::Range;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::chat::Role;
use super::{span_in, splice_all, ApiError};

/// A validated chat request.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    /// The body exactly as the client sent it.
    pub body: Bytes,
    pub model: Option<String>,
    model_span: Option<Range<usize>>,
    /// Where the client's `stream_options` value sits, if it sent one.
    stream_options_span: Option<Range<usize>>,
    pub stream: bool,
    pub include_usage: bool,
    pub max_tokens: Option<u64>,
    pub wants_json: bool,
    pub messages: usize,
    pub temperature: Option<f64>,
    pub seed: Option<i64>,
    /// The typed request, parsed on first use by a translating upstream.
    typed: std::sync::OnceLock<Result<super::chat::TypedChat, String>>,
    /// The client's own Anthropic request (the Messages surface), which an Anthropic
    /// target gets as bytes with only `model` rewritten.
    pub native: Option<std::sync::Arc<super::messages::Native>>,
    /// An embeddings request (`/v1/embeddings`), run through the same engine.
    pub embedding: Option<std::sync::Arc<super::embeddings::EmbeddingRequest>>,
    /// What a target must be able to do for this request.
    pub needs: Capabilities,
    /// Another surface writes the answer: it reads the whole answer (once, when it is
    /// judged) rather than getting OpenAI bytes with `model` set.
    pub reads_answer: bool,
}

#[derive(Deserialize)]
struct MessageHead<'a> {
    #[allow(dead_code)]
    role: Role,
    #[serde(default, borrow)]
    content: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct ResponseFormat {
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
#[allow(dead_code)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// The fields cascade reads. Unknown fields are skipped here and forwarded untouched.
/// Each typed field doubles as a type check whose error names the parameter.
#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    messages: Option<Vec<MessageHead<'a>>>,
    stream: Option<bool>,
    #[serde(borrow)]
    stream_options: Option<&'a RawValue>,
    temperature: Option<f64>,
    #[allow(dead_code)]
    top_p: Option<f64>,
    #[allow(dead_code)]
    n: Option<u32>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    seed: Option<i64>,
    #[allow(dead_code)]
    presence_penalty: Option<f64>,
    #[allow(dead_code)]
    frequency_penalty: Option<f64>,
    #[allow(dead_code)]
    stop: Option<Stop>,
    response_format: Option<ResponseFormat>,
    #[allow(dead_code)]
    user: Option<String>,
    #[serde(borrow)]
    tools: Option<&'a RawValue>,
    #[serde(borrow)]
    functions: Option<&'a RawValue>,
    #[serde(borrow)]
    reasoning_effort: Option<&'a RawValue>,
}

/// What a request may need of a model: tools, images, a JSON schema, reasoning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities(u8);

impl Capabilities {
    pub const TOOLS: Capabilities = Capabilities(1);
    pub const VISION: Capabilities = Capabilities(2);
    pub const JSON_SCHEMA: Capabilities = Capabilities(4);
    pub const REASONING: Capabilities = Capabilities(8);
    pub const ALL: Capabilities = Capabilities(15);
    pub const NONE: Capabilities = Capabilities(0);
    const NAMES: [(&'static str, Capabilities); 4] = [
        ("tools", Capabilities::TOOLS),
        ("vision", Capabilities::VISION),
        ("json_schema", Capabilities::JSON_SCHEMA),
        ("reasoning", Capabilities::REASONING),
    ];

    pub fn from_name(name: &str) -> Option<Capabilities> {
        Self::NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, c)| *c)
    }

    pub fn with(self, other: Capabilities) -> Capabilities {
        Capabilities(self.0 | other.0)
    }

    /// Whether every capability in `needed` is here.
    pub fn covers(self, needed: Capabilities) -> bool {
        self.0 & needed.0 == needed.0
    }

    /// The first capability of `needed` missing here, by name.
    pub fn first_missing(self, needed: Capabilities) -> Option<&'static str> {
        Self::NAMES
            .iter()
            .find(|(_, c)| needed.covers(*c) && !self.covers(*c))
            .map(|(n, _)| *n)
    }
}

impl ChatRequest {
    pub fn parse(body: Bytes) -> Result<ChatRequest, ApiError> {
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(invalid_json());
        }
        // The plain parse runs on every request; only a failed one is parsed again to
        // find the path for the error (tracking it allocates a string per key).
        let Some(wire) = Wire::from_slice(&body) else {
            return Err(parse_error(&body));
        };

        let (model, model_span) = match wire.model {
            None => (None, None),
            Some(raw) => {
                let name: String = serde_json::from_str(raw.get()).map_err(|_| {
                    ApiError::invalid_request("Invalid type for 'model': expected a string.")
                        .with_param("model")
                        .with_code("invalid_type")
                })?;
                (Some(name), Some(span_in(&body, raw)))
            }
        };

        let messages = wire.messages.ok_or_else(|| {
            ApiError::invalid_request("Missing required parameter: 'messages'.")
                .with_param("messages")
                .with_code("missing_required_parameter")
        })?;
        if messages.is_empty() {
            return Err(ApiError::invalid_request(
                "Invalid 'messages': empty array. Expected an array with minimum length 1.",
            )
            .with_param("messages")
            .with_code("empty_array"));
        }
        for (i, m) in messages.iter().enumerate() {
            if let Some(c) = m.content {
                let first = c.get().as_bytes().first().copied();
                if !matches!(first, Some(b'"' | b'[' | b'n')) {
                    return Err(ApiError::invalid_request(format!(
                        "Invalid type for 'messages[{i}].content': expected a string, an array of content parts, or null."
                    ))
                    .with_param(format!("messages[{i}].content"))
                    .with_code("invalid_type"));
                }
            }
        }

        let mut needs = Capabilities::NONE;
        let listed = |v: Option<&RawValue>| v.is_some_and(|v| !matches!(v.get(), "null" | "[]"));
        if listed(wire.tools) || listed(wire.functions) {
            needs = needs.with(Capabilities::TOOLS);
        }
        if wire.reasoning_effort.is_some_and(|v| v.get() != "null") {
            needs = needs.with(Capabilities::REASONING);
        }
        if wire
            .response_format
            .as_ref()
            .is_some_and(|f| f.kind == "json_schema")
        {
            needs = needs.with(Capabilities::JSON_SCHEMA);
        }
        // Content parts are only scanned when there are any (a string is text).
        if messages.iter().any(|m| {
            m.content
                .is_some_and(|c| c.get().starts_with('[') && c.get().contains("\"image_url\""))
        }) {
            needs = needs.with(Capabilities::VISION);
        }
        let stream = wire.stream.unwrap_or(false);
        let stream_options_span = wire.stream_options.map(|raw| span_in(&body, raw));
        let stream_options = match wire.stream_options {
            Some(raw) if raw.get() != "null" => {
                let opts: StreamOptions = serde_json::from_str(raw.get()).map_err(|_| {
                    ApiError::invalid_request(
                        "Invalid type for 'stream_options': expected an object with a boolean 'include_usage'.",
                    )
                    .with_param("stream_options")
                    .with_code("invalid_type")
                })?;
                Some(opts)
            }
            _ => None,
        };
        Ok(ChatRequest {
            model,
            model_span,
            stream,
            include_usage: stream
                && stream_options
                    .and_then(|o| o.include_usage)
                    .unwrap_or(false),
            stream_options_span,
            max_tokens: wire.max_completion_tokens.or(wire.max_tokens),
            wants_json: wire
                .response_format
                .is_some_and(|f| f.kind == "json_object" || f.kind == "json_schema"),
            messages: messages.len(),
            temperature: wire.temperature,
            seed: wire.seed,
            typed: std::sync::OnceLock::new(),
            native: None,
            embedding: None,
            needs,
            reads_answer: false,
            body,
        })
    }

    /// The engine's request for a chat body another surface translated (as a JSON
    /// object): its fields are read from the object, not parsed again. `model` is kept
    /// apart and written into the body for each target, like a request routed by header.
    pub fn from_translation(
        mut chat: serde_json::Map<String, serde_json::Value>,
    ) -> Result<ChatRequest, ApiError> {
        use serde_json::Value;
        let model = match chat.remove("model") {
            Some(Value::String(s)) => Some(s),
            _ => None,
        };
        // An empty list is the caller's to refuse (`count_tokens` counts one anyway).
        let messages = chat.get("messages").and_then(Value::as_array);
        let count = messages.map_or(0, Vec::len);
        let mut needs = Capabilities::NONE;
        if chat
            .get("tools")
            .and_then(Value::as_array)
            .is_some_and(|t| !t.is_empty())
        {
            needs = needs.with(Capabilities::TOOLS);
        }
        if chat.contains_key("reasoning_effort") {
            needs = needs.with(Capabilities::REASONING);
        }
        let format = chat
            .get("response_format")
            .and_then(|f| f.get("type"))
            .and_then(Value::as_str);
        if format == Some("json_schema") {
            needs = needs.with(Capabilities::JSON_SCHEMA);
        }
        let has_image = messages.into_iter().flatten().any(|m| {
            m.get("content")
                .and_then(Value::as_array)
                .is_some_and(|parts| {
                    parts
                        .iter()
                        .any(|p| p.get("type") == Some(&Value::from("image_url")))
                })
        });
        if has_image {
            needs = needs.with(Capabilities::VISION);
        }
        let stream = chat.get("stream") == Some(&Value::Bool(true));
        let max_tokens = chat
            .get("max_completion_tokens")
            .or_else(|| chat.get("max_tokens"))
            .and_then(Value::as_u64);
        let temperature = chat.get("temperature").and_then(Value::as_f64);
        let seed = chat.get("seed").and_then(Value::as_i64);
        let wants_json = matches!(format, Some("json_object" | "json_schema"));
        let body = serde_json::to_vec(&Value::Object(chat)).map_err(|e| {
            ApiError::invalid_request(format!("could not translate the request: {e}"))
        })?;
        Ok(ChatRequest {
            body: body.into(),
            model,
            model_span: None,
            stream_options_span: None,
            stream,
            include_usage: false,
            max_tokens,
            wants_json,
            messages: count,
            temperature,
            seed,
            typed: std::sync::OnceLock::new(),
            native: None,
            embedding: None,
            needs,
            reads_answer: true,
        })
    }

    /// The engine's request for an embeddings call.
    pub fn for_embedding(e: super::embeddings::EmbeddingRequest) -> ChatRequest {
        ChatRequest {
            body: e.body.clone(),
            model: e.model.clone(),
            model_span: e.model_span.clone(),
            stream_options_span: None,
            stream: false,
            include_usage: false,
            max_tokens: Some(0),
            wants_json: false,
            messages: 0,
            temperature: Some(0.0),
            seed: None,
            typed: std::sync::OnceLock::new(),
            native: None,
            embedding: Some(std::sync::Arc::new(e)),
            needs: Capabilities::NONE,
            reads_answer: false,
        }
    }

    /// The whole request, typed, for upstreams that translate it. Parsed once.
    pub fn typed(&self) -> Result<&super::chat::TypedChat, String> {
        self.typed
            .get_or_init(|| serde_json::from_slice(&self.body).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(Clone::clone)
    }

    /// A rough, cheap upper estimate of the prompt's tokens: about four bytes of JSON per
    /// token, not counting inline `data:` URLs (images are priced by the provider in
    /// other ways). Used to skip targets whose context window cannot fit the prompt.
    pub fn estimated_prompt_tokens(&self) -> u64 {
        let body = &self.body[..];
        let mut counted = 0usize;
        let mut i = 0;
        while i < body.len() {
            if body[i] == b'"' && body[i + 1..].starts_with(b"data:") {
                // Skip to the closing quote of the data URL.
                match body[i + 1..].iter().position(|&b| b == b'"') {
                    Some(end) => i += end + 2,
                    None => break,
                }
                continue;
            }
            counted += 1;
            i += 1;
        }
        (counted / 4) as u64
    }

    /// The body for an OpenAI-format upstream: the original bytes with `model` set to
    /// `model_id_json` (an already-encoded JSON string). No re-serialisation.
    pub fn body_for_model(&self, model_id_json: &str) -> Bytes {
        self.body_for(model_id_json, None, false)
    }

    /// Like `body_for_model`, also adding `"FIELD":N` (the model's default output cap)
    /// when the request sets neither `max_tokens` nor `max_completion_tokens`, and with
    /// `ask_usage` setting `stream_options.include_usage` on a stream whose client did
    /// not ask for it (so every stream's tokens are counted).
    pub fn body_for(
        &self,
        model_id_json: &str,
        default_max: Option<(&str, u64)>,
        ask_usage: bool,
    ) -> Bytes {
        // Everything after the object's opening brace; the body was validated as an object.
        let open = self.body.iter().position(|&b| b == b'{').unwrap_or(0) + 1;
        let cap = default_max
            .filter(|_| self.max_tokens.is_none())
            .map(|(field, n)| format!("\"{field}\":{n},"));
        let mut inserted_model = Vec::new();
        let mut edits: Vec<(Range<usize>, &[u8])> = Vec::with_capacity(3);
        if let Some(c) = &cap {
            edits.push((open..open, c.as_bytes()));
        }
        let usage_edit = self.usage_edit(ask_usage);
        if let Some((None, with)) = &usage_edit {
            edits.push((open..open, with.as_bytes()));
        }
        match &self.model_span {
            Some(span) if &self.body[span.clone()] == model_id_json.as_bytes() => {}
            Some(span) => edits.push((span.clone(), model_id_json.as_bytes())),
            None => {
                // Routed by header with no `model` in the body: add it after the brace.
                inserted_model.extend_from_slice(b"\"model\":");
                inserted_model.extend_from_slice(model_id_json.as_bytes());
                let rest_empty =
                    self.body[open..].iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'}');
                if !rest_empty {
                    inserted_model.push(b',');
                }
                edits.push((open..open, &inserted_model));
            }
        }
        if let Some((Some(span), with)) = &usage_edit {
            edits.push((span.clone(), with.as_bytes()));
        }
        if edits.is_empty() {
            return self.body.clone();
        }
        edits.sort_by_key(|(r, _)| r.start);
        splice_all(&self.body, &edits)
    }

    /// The edit that makes a stream report its usage: a `stream_options` member to
    /// insert (no span), or the client's own `stream_options` value to replace.
    fn usage_edit(&self, ask_usage: bool) -> Option<(Option<Range<usize>>, String)> {
        if !(ask_usage && self.stream && !self.include_usage) {
            return None;
        }
        match &self.stream_options_span {
            None => Some((None, r#""stream_options":{"include_usage":true},"#.into())),
            Some(span) => {
                let mut opts: serde_json::Map<String, serde_json::Value> =
                    serde_json::from_slice::<Option<_>>(&self.body[span.clone()])
                        .ok()?
                        .unwrap_or_default();
                opts.insert("include_usage".into(), true.into());
                Some((Some(span.clone()), serde_json::to_string(&opts).ok()?))
            }
        }
    }
}

fn invalid_json() -> ApiError {
    ApiError::invalid_request(
        "We could not parse the JSON body of your request. The body must be a JSON object.",
    )
    .with_code("invalid_json")
}

impl<'a> Wire<'a> {
    fn from_slice(body: &'a [u8]) -> Option<Wire<'a>> {
        let mut de = serde_json::Deserializer::from_str(super::json_text(body).ok()?);
        let wire = Wire::deserialize(&mut de).ok()?;
        de.end().ok()?;
        Some(wire)
    }
}

/// The error for a body that failed to parse: invalid JSON, or the path and type of
/// the first field that does not fit.
fn parse_error(body: &[u8]) -> ApiError {
    let mut de = serde_json::Deserializer::from_slice(body);
    match serde_path_to_error::deserialize::<_, Wire>(&mut de) {
        Ok(_) => invalid_json(), // trailing characters after the object
        Err(e) => type_error(body, e),
    }
}

fn type_error(body: &[u8], e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = e.path().to_string();
    let inner = e.into_inner();
    if inner.is_syntax()
        || inner.is_eof()
        || path == "."
        || serde_json::from_slice::<serde::de::IgnoredAny>(body).is_err()
    {
        return invalid_json();
    }
    let detail = inner.to_string();
    let detail = detail.split(" at line ").next().unwrap_or(&detail);
    ApiError::invalid_request(format!("Invalid value for '{path}': {detail}."))
        .with_param(path)
        .with_code("invalid_type")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ChatRequest, ApiError> {
        ChatRequest::parse(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn rewrites_only_the_model() {
        let r = parse(
            r#"{"model":"fast","messages":[{"role":"user","content":"hi"}],"x_custom":{"a":1}}"#,
        )
        .unwrap();
        assert_eq!(r.model.as_deref(), Some("fast"));
        assert_eq!(
            &r.body_for_model("\"gpt-4o\"")[..],
            br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"x_custom":{"a":1}}"#
        );
        // Same model: the very same bytes come back.
        assert_eq!(r.body_for_model("\"fast\""), r.body);
    }

    #[test]
    fn adds_the_default_output_cap_only_when_absent() {
        let r = parse(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        let v: serde_json::Value =
            serde_json::from_slice(&r.body_for("\"x\"", Some(("max_tokens", 77)), false)).unwrap();
        assert_eq!(
            (v["max_tokens"].as_u64(), v["model"].as_str()),
            (Some(77), Some("x"))
        );
        let r =
            parse(r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#)
                .unwrap();
        let v: serde_json::Value =
            serde_json::from_slice(&r.body_for("\"x\"", Some(("max_tokens", 77)), false)).unwrap();
        assert_eq!(v["max_tokens"], 5);
    }

    #[test]
    fn both_edits_in_one_copy() {
        for body in [
            r#"{"messages":[{"role":"user","content":"hi"}]}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
        ] {
            let r = parse(body).unwrap();
            let v: serde_json::Value =
                serde_json::from_slice(&r.body_for("\"x\"", Some(("max_tokens", 9)), false))
                    .unwrap();
            assert_eq!(
                (v["model"].as_str(), v["max_tokens"].as_u64()),
                (Some("x"), Some(9)),
                "{body}"
            );
            assert_eq!(v["messages"][0]["content"], "hi");
        }
    }

    #[test]
    fn inserts_model_when_absent() {
        let r = parse(r#"{ "messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        let out = r.body_for_model("\"m\"");
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], "m");
    }

    #[test]
    fn errors_name_the_param() {
        let e = parse("{not json").unwrap_err();
        assert_eq!(e.code.as_deref(), Some("invalid_json"));
        let bad_utf8 = b"{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"\xff\"}]}";
        let e = ChatRequest::parse(Bytes::from_static(bad_utf8)).unwrap_err();
        assert_eq!(e.code.as_deref(), Some("invalid_json"));
        let e = parse(r#"{"model":"m"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"));
        let e = parse(r#"{"model":"m","messages":[]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"));
        let e = parse(r#"{"model":"m","messages":"hi"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"));
        let e = parse(
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":"hot"}"#,
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temperature"));
        let e = parse(r#"{"model":"m","messages":[{"role":"robot","content":"x"}]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
        let e = parse(r#"{"model":"m","messages":[{"role":"user","content":5}]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].content"));
        let e = parse(r#"{"model":7,"messages":[{"role":"user","content":"x"}]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("model"));
        let e = parse(r#"[1,2]"#).unwrap_err();
        assert_eq!(e.code.as_deref(), Some("invalid_json"));
    }

    #[test]
    fn estimates_prompt_tokens_without_inline_images() {
        let text = "x".repeat(4000);
        let r = parse(&format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"{text}"}}]}}"#
        ))
        .unwrap();
        let plain = r.estimated_prompt_tokens();
        assert!((1000..1030).contains(&plain), "{plain}");
        let img = "A".repeat(100_000);
        let r = parse(&format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":[{{"type":"text","text":"{text}"}},{{"type":"image_url","image_url":{{"url":"data:image/png;base64,{img}"}}}}]}}]}}"#
        ))
        .unwrap();
        assert!(r.estimated_prompt_tokens() < plain + 40);
    }

    #[test]
    fn asks_a_stream_for_its_usage() {
        let plain =
            parse(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream":true}"#)
                .unwrap();
        let v: serde_json::Value =
            serde_json::from_slice(&plain.body_for("\"x\"", Some(("max_tokens", 9)), true))
                .unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(
            (v["model"].as_str(), v["max_tokens"].as_u64()),
            (Some("x"), Some(9))
        );
        // The client's own options are kept, with include_usage turned on.
        let own = parse(r#"{"stream_options":{"include_usage":false,"x":1},"model":"m","messages":[{"role":"user","content":"x"}],"stream":true}"#).unwrap();
        assert!(!own.include_usage);
        let v: serde_json::Value =
            serde_json::from_slice(&own.body_for("\"x\"", None, true)).unwrap();
        assert_eq!(
            v["stream_options"],
            serde_json::json!({"include_usage": true, "x": 1})
        );
        assert_eq!(v["model"], "x");
        // Not a stream, or the client asked already: the body is left alone.
        let asked = parse(r#"{"model":"x","messages":[{"role":"user","content":"x"}],"stream":true,"stream_options":{"include_usage":true}}"#).unwrap();
        assert_eq!(asked.body_for("\"x\"", None, true), asked.body);
        let whole = parse(r#"{"model":"x","messages":[{"role":"user","content":"x"}]}"#).unwrap();
        assert_eq!(whole.body_for("\"x\"", None, true), whole.body);
        let e = parse(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream":true,"stream_options":5}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("stream_options"));
    }

    #[test]
    fn reads_stream_flags() {
        let r = parse(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream":true,"stream_options":{"include_usage":true}}"#).unwrap();
        assert!(r.stream && r.include_usage);
    }
}
