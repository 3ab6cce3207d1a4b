//! Read-only views of OpenAI-format answers: just enough to judge an answer (empty?
//! filtered? where is `model`?) without building the whole object.

use std::ops::Range;

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::span_in;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
}

/// Text that some servers send as a string and others as content parts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Text {
    Str(String),
    Parts(Vec<IgnoredAny>),
}

impl Text {
    fn has_content(&self) -> bool {
        match self {
            Text::Str(s) => !s.trim().is_empty(),
            Text::Parts(p) => !p.is_empty(),
        }
    }
}

/// JSON answers sometimes come wrapped in a Markdown code fence; accept those.
fn strip_fence(t: &str) -> &str {
    let t = t.trim();
    t.strip_prefix("```json")
        .or_else(|| t.strip_prefix("```"))
        .and_then(|rest| rest.strip_suffix("```"))
        .unwrap_or(t)
}

fn has_text(t: &Option<Text>) -> bool {
    t.as_ref().is_some_and(Text::has_content)
}

fn non_empty(v: &Option<Vec<IgnoredAny>>) -> bool {
    v.as_ref().is_some_and(|v| !v.is_empty())
}

#[derive(Debug, Deserialize)]
struct MessageView {
    content: Option<Text>,
    tool_calls: Option<Vec<IgnoredAny>>,
    function_call: Option<IgnoredAny>,
    refusal: Option<Text>,
}

#[derive(Debug, Deserialize)]
struct ChoiceView {
    message: Option<MessageView>,
    finish_reason: Option<String>,
}

/// A non-streaming `chat.completion` as seen by the gateway.
#[derive(Debug)]
pub struct CompletionView {
    /// Where the top-level `model` value sits in the body, if present.
    pub model_span: Option<Range<usize>>,
    /// Some choice carries text, a tool call or a refusal.
    pub has_content: bool,
    pub finish_reason: Option<String>,
    pub usage: Option<Usage>,
    /// Some choice answered with text that is not valid JSON (only meaningful when the
    /// request asked for JSON); a tool call or refusal is not judged.
    pub text_not_json: bool,
}

#[derive(Deserialize)]
struct CompletionWire<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    choices: Vec<ChoiceView>,
    usage: Option<Usage>,
}

impl CompletionView {
    pub fn parse(body: &[u8]) -> Result<CompletionView, serde_json::Error> {
        let w: CompletionWire = serde_json::from_slice(body)?;
        let has_content = w.choices.iter().any(|c| {
            c.message.as_ref().is_some_and(|m| {
                has_text(&m.content)
                    || non_empty(&m.tool_calls)
                    || m.function_call.is_some()
                    || has_text(&m.refusal)
            })
        });
        let text_not_json = w.choices.iter().any(|c| {
            c.message.as_ref().is_some_and(|m| {
                !non_empty(&m.tool_calls)
                    && matches!(&m.content, Some(Text::Str(t))
                        if serde_json::from_str::<IgnoredAny>(strip_fence(t)).is_err())
            })
        });
        Ok(CompletionView {
            model_span: w.model.map(|m| span_in(body, m)),
            has_content,
            finish_reason: w.choices.first().and_then(|c| c.finish_reason.clone()),
            usage: w.usage,
            text_not_json,
        })
    }
}

#[derive(Debug, Deserialize)]
struct DeltaView {
    content: Option<Text>,
    tool_calls: Option<Vec<IgnoredAny>>,
    function_call: Option<IgnoredAny>,
    refusal: Option<Text>,
    reasoning_content: Option<Text>,
}

#[derive(Debug, Deserialize)]
struct ChunkChoiceView {
    delta: Option<DeltaView>,
    finish_reason: Option<String>,
}

/// An in-stream error object (`{"error":{...}}` inside a 200 stream).
#[derive(Debug, Clone, Deserialize)]
pub struct StreamErrorView {
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub code: Option<serde_json::Value>,
}

/// One `chat.completion.chunk` (or in-stream error) as seen by the gateway.
#[derive(Debug)]
pub struct ChunkView {
    pub model_span: Option<Range<usize>>,
    /// Carries content: text, a tool-call delta, a refusal or reasoning. The first such
    /// chunk is a stream's commit point.
    pub has_content: bool,
    pub finish_reason: Option<String>,
    pub usage: Option<Usage>,
    pub error: Option<StreamErrorView>,
}

#[derive(Deserialize)]
struct ChunkWire<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    #[serde(default)]
    choices: Vec<ChunkChoiceView>,
    usage: Option<Usage>,
    error: Option<StreamErrorView>,
}

impl ChunkView {
    pub fn parse(data: &[u8]) -> Result<ChunkView, serde_json::Error> {
        let w: ChunkWire = serde_json::from_slice(data)?;
        let has_content = w.choices.iter().any(|c| {
            c.delta.as_ref().is_some_and(|d| {
                has_text(&d.content)
                    || non_empty(&d.tool_calls)
                    || d.function_call.is_some()
                    || has_text(&d.refusal)
                    || has_text(&d.reasoning_content)
            })
        });
        Ok(ChunkView {
            model_span: w.model.map(|m| span_in(data, m)),
            has_content,
            finish_reason: w.choices.iter().find_map(|c| c.finish_reason.clone()),
            usage: w.usage,
            error: w.error,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_content_and_empty() {
        let full = br#"{"id":"x","model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;
        let v = CompletionView::parse(full).unwrap();
        assert!(v.has_content);
        assert_eq!(&full[v.model_span.unwrap()], b"\"m\"");
        assert_eq!(v.usage.unwrap().total_tokens, 4);
        let empty = br#"{"model":"m","choices":[{"message":{"role":"assistant","content":""},"finish_reason":"stop"}]}"#;
        assert!(!CompletionView::parse(empty).unwrap().has_content);
        let tools = br#"{"model":"m","choices":[{"message":{"role":"assistant","content":null,"tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{}"}}]},"finish_reason":"tool_calls"}]}"#;
        assert!(CompletionView::parse(tools).unwrap().has_content);
        assert!(!CompletionView::parse(tools).unwrap().text_not_json);
        assert!(CompletionView::parse(full).unwrap().text_not_json);
        let json = br#"{"model":"m","choices":[{"message":{"role":"assistant","content":"```json\n{\"a\":1}\n```"},"finish_reason":"stop"}]}"#;
        assert!(!CompletionView::parse(json).unwrap().text_not_json);
    }

    #[test]
    fn chunk_views() {
        let role = br#"{"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#;
        assert!(!ChunkView::parse(role).unwrap().has_content);
        let text = br#"{"model":"m","choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}"#;
        assert!(ChunkView::parse(text).unwrap().has_content);
        let err = br#"{"error":{"message":"overloaded","type":"server_error"}}"#;
        assert!(ChunkView::parse(err).unwrap().error.is_some());
    }
}
