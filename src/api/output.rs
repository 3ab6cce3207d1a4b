//! Writes OpenAI-format answers and stream chunks for translated upstreams, so every
//! translator emits the same shapes (same `id`, `created` and `model` in every chunk).

use bytes::Bytes;
use serde::Serialize;
use serde_json::{json, Value};

use super::Usage;

/// A whole answer assembled from another wire format.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Assembled {
    pub content: Option<String>,
    pub reasoning: Option<String>,
    /// (id, name, arguments as a JSON string)
    pub tool_calls: Vec<(String, String, String)>,
    pub finish_reason: &'static str,
    pub usage: Option<Usage>,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The `chat.completion` body for an assembled answer, written straight from typed
/// fields (no intermediate `Value`: this runs on every translated answer).
pub fn completion(id: &str, model_id: &str, a: &Assembled) -> Bytes {
    #[derive(Serialize)]
    struct Body<'a> {
        id: &'a str,
        object: &'static str,
        created: u64,
        model: &'a str,
        choices: [Choice<'a>; 1],
        #[serde(skip_serializing_if = "Option::is_none")]
        usage: Option<&'a Usage>,
    }
    #[derive(Serialize)]
    struct Choice<'a> {
        index: u32,
        message: Message<'a>,
        logprobs: (),
        finish_reason: &'a str,
    }
    #[derive(Serialize)]
    struct Message<'a> {
        role: &'static str,
        content: Option<&'a str>,
        refusal: (),
        #[serde(skip_serializing_if = "Option::is_none")]
        reasoning_content: Option<&'a str>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        tool_calls: Vec<Call<'a>>,
    }
    #[derive(Serialize)]
    struct Call<'a> {
        id: &'a str,
        #[serde(rename = "type")]
        kind: &'static str,
        function: Function<'a>,
    }
    #[derive(Serialize)]
    struct Function<'a> {
        name: &'a str,
        arguments: &'a str,
    }
    let body = Body {
        id,
        object: "chat.completion",
        created: now_secs(),
        model: model_id,
        choices: [Choice {
            index: 0,
            message: Message {
                role: "assistant",
                content: a.content.as_deref(),
                refusal: (),
                reasoning_content: a.reasoning.as_deref(),
                tool_calls: a
                    .tool_calls
                    .iter()
                    .map(|(id, name, arguments)| Call {
                        id,
                        kind: "function",
                        function: Function { name, arguments },
                    })
                    .collect(),
            },
            logprobs: (),
            finish_reason: a.finish_reason,
        }],
        usage: a.usage.as_ref(),
    };
    serde_json::to_vec(&body).unwrap_or_default().into()
}

/// The same, as a JSON value.
pub fn completion_value(id: &str, model_id: &str, a: &Assembled) -> Value {
    let mut message = json!({"role": "assistant", "content": a.content, "refusal": null});
    if let Some(r) = &a.reasoning {
        message["reasoning_content"] = Value::String(r.clone());
    }
    if !a.tool_calls.is_empty() {
        message["tool_calls"] = a
            .tool_calls
            .iter()
            .map(|(id, name, args)| json!({"id": id, "type": "function", "function": {"name": name, "arguments": args}}))
            .collect();
    }
    let mut body = json!({
        "id": id,
        "object": "chat.completion",
        "created": now_secs(),
        "model": model_id,
        "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": a.finish_reason}],
    });
    if let Some(u) = &a.usage {
        body["usage"] = serde_json::to_value(u).unwrap_or(Value::Null);
    }
    body
}

/// Writes the chunks of one stream.
#[derive(Debug, Clone)]
pub struct ChunkWriter {
    pub id: String,
    pub created: u64,
    pub model_id: String,
    /// The client asked for `stream_options.include_usage`: every chunk carries
    /// `"usage": null` and a last chunk carries the totals.
    pub include_usage: bool,
}

#[derive(Serialize)]
struct Chunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Value>,
}

impl ChunkWriter {
    pub fn new(id: String, model_id: String, include_usage: bool) -> Self {
        ChunkWriter {
            id,
            created: now_secs(),
            model_id,
            include_usage,
        }
    }

    fn write(&self, delta: Value, finish: Option<&str>) -> Bytes {
        let chunk = Chunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model_id,
            choices: vec![
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}),
            ],
            usage: self.include_usage.then_some(Value::Null),
        };
        serde_json::to_vec(&chunk).unwrap_or_default().into()
    }

    pub fn role(&self) -> Bytes {
        self.write(json!({"role": "assistant", "content": ""}), None)
    }

    pub fn content(&self, text: &str) -> Bytes {
        self.write(json!({"content": text}), None)
    }

    pub fn reasoning(&self, text: &str) -> Bytes {
        self.write(json!({"reasoning_content": text}), None)
    }

    /// The first delta of tool call `index`: id, type and name.
    pub fn tool_start(&self, index: usize, id: &str, name: &str, arguments: &str) -> Bytes {
        self.write(
            json!({"tool_calls": [{"index": index, "id": id, "type": "function", "function": {"name": name, "arguments": arguments}}]}),
            None,
        )
    }

    pub fn tool_arguments(&self, index: usize, fragment: &str) -> Bytes {
        self.write(
            json!({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}),
            None,
        )
    }

    pub fn finish(&self, reason: &str) -> Bytes {
        self.write(json!({}), Some(reason))
    }

    /// The final usage chunk: `choices` empty, totals in `usage`.
    pub fn usage(&self, usage: &Usage) -> Bytes {
        self.usage_value(serde_json::to_value(usage).unwrap_or(Value::Null))
    }

    /// The final usage chunk with `usage` exactly as given.
    pub fn usage_value(&self, usage: Value) -> Bytes {
        let chunk = Chunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model_id,
            choices: Vec::new(),
            usage: Some(usage),
        };
        serde_json::to_vec(&chunk).unwrap_or_default().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_body_matches_the_value_form() {
        let a = Assembled {
            content: Some("hi".into()),
            reasoning: Some("think".into()),
            tool_calls: vec![("c1".into(), "f".into(), "{\"a\":1}".into())],
            finish_reason: "tool_calls",
            usage: Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 2,
                total_tokens: 5,
                cached_tokens: 1,
                reasoning_tokens: 0,
            }),
        };
        let mut typed: Value = serde_json::from_slice(&completion("x", "m", &a)).unwrap();
        let mut value = completion_value("x", "m", &a);
        typed["created"] = json!(0);
        value["created"] = json!(0);
        assert_eq!(typed, value);
        let bare = Assembled {
            finish_reason: "stop",
            ..Default::default()
        };
        let mut typed: Value = serde_json::from_slice(&completion("x", "m", &bare)).unwrap();
        let mut value = completion_value("x", "m", &bare);
        typed["created"] = json!(0);
        value["created"] = json!(0);
        assert_eq!(typed, value);
    }
}
