//! Read-only views of OpenAI-format answers: just enough to judge an answer (empty?
//! filtered? where is `model`?) without building the whole object.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;
use std::ops::Range;

use serde::de::{self, IgnoredAny, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;

use super::span_in;

/// Token usage, normalised to OpenAI's `usage` (cached prompt tokens and reasoning
/// tokens are subsets of prompt and completion tokens).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub cached_tokens: u64,
    pub reasoning_tokens: u64,
}

#[derive(Deserialize, Serialize, Default)]
struct UsageWire {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    #[serde(default)]
    total_tokens: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prompt_tokens_details: Option<PromptDetails>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    completion_tokens_details: Option<CompletionDetails>,
    /// DeepSeek's name for cached prompt tokens.
    #[serde(default, skip_serializing)]
    prompt_cache_hit_tokens: Option<u64>,
}

#[derive(Deserialize, Serialize, Default)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

#[derive(Deserialize, Serialize, Default)]
struct CompletionDetails {
    #[serde(default)]
    reasoning_tokens: Option<u64>,
}

impl<'de> Deserialize<'de> for Usage {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = UsageWire::deserialize(d)?;
        Ok(Usage {
            prompt_tokens: w.prompt_tokens,
            completion_tokens: w.completion_tokens,
            total_tokens: w.total_tokens.max(w.prompt_tokens + w.completion_tokens),
            cached_tokens: w
                .prompt_tokens_details
                .and_then(|p| p.cached_tokens)
                .or(w.prompt_cache_hit_tokens)
                .unwrap_or(0),
            reasoning_tokens: w
                .completion_tokens_details
                .and_then(|c| c.reasoning_tokens)
                .unwrap_or(0),
        })
    }
}

impl Serialize for Usage {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        UsageWire {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            total_tokens: self.total_tokens,
            prompt_tokens_details: Some(PromptDetails {
                cached_tokens: Some(self.cached_tokens),
            }),
            completion_tokens_details: Some(CompletionDetails {
                reasoning_tokens: Some(self.reasoning_tokens),
            }),
            prompt_cache_hit_tokens: None,
        }
        .serialize(s)
    }
}

/// Text that some servers send as a string and others as content parts. Read with a
/// visitor rather than `#[serde(untagged)]`, which would buffer and copy every value;
/// a string without escapes is borrowed from the body.
#[derive(Debug)]
enum Text<'a> {
    Str(Cow<'a, str>),
    Parts(usize),
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct TextVisitor<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for TextVisitor<'a> {
            type Value = Text<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or an array of content parts")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Text<'a>, E> {
                Ok(Text::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text<'a>, E> {
                Ok(Text::Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Text<'a>, E> {
                Ok(Text::Str(Cow::Owned(v)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Text<'a>, A::Error> {
                let mut parts = 0;
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    parts += 1;
                }
                Ok(Text::Parts(parts))
            }
        }
        d.deserialize_any(TextVisitor(PhantomData))
    }
}

impl Text<'_> {
    fn has_content(&self) -> bool {
        match self {
            Text::Str(s) => !s.trim().is_empty(),
            Text::Parts(n) => *n > 0,
        }
    }
}

/// Whether an answer's text is JSON (a Markdown code fence around it is accepted).
pub fn parses_as_json(text: &str) -> bool {
    serde_json::from_str::<IgnoredAny>(strip_fence(text)).is_ok()
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
struct MessageView<'a> {
    #[serde(borrow)]
    content: Option<Text<'a>>,
    tool_calls: Option<Vec<IgnoredAny>>,
    function_call: Option<IgnoredAny>,
    #[serde(borrow)]
    refusal: Option<Text<'a>>,
}

#[derive(Debug, Deserialize)]
struct ChoiceView<'a> {
    #[serde(borrow)]
    message: Option<MessageView<'a>>,
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
    /// Some choice answered with text that is not valid JSON; only checked when the
    /// request asked for JSON. A tool call or refusal is not judged.
    pub text_not_json: bool,
    /// Some choice is a refusal.
    pub refused: bool,
}

#[derive(Deserialize)]
struct CompletionWire<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    #[serde(borrow)]
    choices: Vec<ChoiceView<'a>>,
    usage: Option<Usage>,
}

impl CompletionView {
    /// Reads `body`; `judge_json` also checks that the answer's text parses as JSON.
    pub fn parse(body: &[u8], judge_json: bool) -> Result<CompletionView, serde_json::Error> {
        let w: CompletionWire = serde_json::from_str(super::json_text(body)?)?;
        let has_content = w.choices.iter().any(|c| {
            c.message.as_ref().is_some_and(|m| {
                has_text(&m.content)
                    || non_empty(&m.tool_calls)
                    || m.function_call.is_some()
                    || has_text(&m.refusal)
            })
        });
        let text_not_json = judge_json
            && w.choices.iter().any(|c| {
                c.message.as_ref().is_some_and(|m| {
                    !non_empty(&m.tool_calls)
                        && matches!(&m.content, Some(Text::Str(t))
                        if serde_json::from_str::<IgnoredAny>(strip_fence(t)).is_err())
                })
            });
        let refused = w
            .choices
            .iter()
            .any(|c| c.message.as_ref().is_some_and(|m| has_text(&m.refusal)));
        Ok(CompletionView {
            model_span: w.model.map(|m| span_in(body, m)),
            has_content,
            finish_reason: w.choices.first().and_then(|c| c.finish_reason.clone()),
            usage: w.usage,
            text_not_json,
            refused,
        })
    }
}

#[derive(Debug, Deserialize)]
struct DeltaView<'a> {
    #[serde(borrow)]
    content: Option<Text<'a>>,
    tool_calls: Option<Vec<IgnoredAny>>,
    function_call: Option<IgnoredAny>,
    #[serde(borrow)]
    refusal: Option<Text<'a>>,
    #[serde(borrow)]
    reasoning_content: Option<Text<'a>>,
}

#[derive(Debug, Deserialize)]
struct ChunkChoiceView<'a> {
    #[serde(borrow)]
    delta: Option<DeltaView<'a>>,
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
    /// Carries nothing for the client: no choices and no usage (Azure's filter-results
    /// chunks), or only choices without a delta or finish (Azure annotations).
    pub skippable: bool,
    /// Only usage, no choices: the last chunk of a stream that asked for usage.
    pub usage_only: bool,
}

#[derive(Deserialize)]
struct ChunkWire<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    #[serde(default, borrow)]
    choices: Vec<ChunkChoiceView<'a>>,
    usage: Option<Usage>,
    error: Option<StreamErrorView>,
}

impl ChunkView {
    pub fn parse(data: &[u8]) -> Result<ChunkView, serde_json::Error> {
        let w: ChunkWire = serde_json::from_str(super::json_text(data)?)?;
        let has_content = w.choices.iter().any(|c| {
            c.delta.as_ref().is_some_and(|d| {
                has_text(&d.content)
                    || non_empty(&d.tool_calls)
                    || d.function_call.is_some()
                    || has_text(&d.refusal)
                    || has_text(&d.reasoning_content)
            })
        });
        let finish_reason = w.choices.iter().find_map(|c| c.finish_reason.clone());
        let skippable = w.error.is_none()
            && w.usage.is_none()
            && finish_reason.is_none()
            && w.choices.iter().all(|c| c.delta.is_none());
        Ok(ChunkView {
            usage_only: w.usage.is_some() && w.choices.is_empty() && w.error.is_none(),
            model_span: w.model.map(|m| span_in(data, m)),
            has_content,
            finish_reason,
            usage: w.usage,
            error: w.error,
            skippable,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_content_and_empty() {
        let full = br#"{"id":"x","model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;
        let v = CompletionView::parse(full, false).unwrap();
        assert!(v.has_content);
        assert_eq!(&full[v.model_span.unwrap()], b"\"m\"");
        assert_eq!(v.usage.unwrap().total_tokens, 4);
        let empty = br#"{"model":"m","choices":[{"message":{"role":"assistant","content":""},"finish_reason":"stop"}]}"#;
        assert!(!CompletionView::parse(empty, false).unwrap().has_content);
        let tools = br#"{"model":"m","choices":[{"message":{"role":"assistant","content":null,"tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{}"}}]},"finish_reason":"tool_calls"}]}"#;
        assert!(CompletionView::parse(tools, false).unwrap().has_content);
        assert!(!CompletionView::parse(tools, true).unwrap().text_not_json);
        let bad_utf8 = b"{\"model\":\"m\",\"choices\":[{\"message\":{\"content\":\"\xff\"}}]}";
        assert!(CompletionView::parse(bad_utf8, false).is_err());
        assert!(ChunkView::parse(bad_utf8).is_err());
        assert!(CompletionView::parse(full, true).unwrap().text_not_json);
        assert!(!CompletionView::parse(full, false).unwrap().text_not_json);
        let json = br#"{"model":"m","choices":[{"message":{"role":"assistant","content":"```json\n{\"a\":1}\n```"},"finish_reason":"stop"}]}"#;
        assert!(!CompletionView::parse(json, true).unwrap().text_not_json);
    }

    #[test]
    fn chunk_views() {
        let role = br#"{"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#;
        assert!(!ChunkView::parse(role).unwrap().has_content);
        let text = br#"{"model":"m","choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}"#;
        assert!(ChunkView::parse(text).unwrap().has_content);
        let err = br#"{"error":{"message":"overloaded","type":"server_error"}}"#;
        assert!(ChunkView::parse(err).unwrap().error.is_some());
        assert!(!ChunkView::parse(role).unwrap().skippable);
        let azure_filter = br#"{"id":"","object":"","created":0,"model":"","choices":[],"prompt_filter_results":[]}"#;
        assert!(ChunkView::parse(azure_filter).unwrap().skippable);
        let annotation = br#"{"id":"x","choices":[{"index":0,"finish_reason":null,"content_filter_results":{}}]}"#;
        assert!(ChunkView::parse(annotation).unwrap().skippable);
    }
}
