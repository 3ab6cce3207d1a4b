//! The engine's answer as the other surfaces read it: an OpenAI `chat.completion` body
//! or one `chat.completion.chunk`, typed just enough to be written out again as a
//! Responses object or an Anthropic message.

use serde::{Deserialize, Deserializer};

use super::Usage;

/// `null` read as the default: servers send `"tool_calls": null` and `"id": null`.
fn or_default<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(
    d: D,
) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A whole chat answer.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ChatAnswer {
    pub text: Option<String>,
    pub refusal: Option<String>,
    pub reasoning: Option<String>,
    /// (id, name, arguments as a JSON string), in order.
    pub tool_calls: Vec<(String, String, String)>,
    pub finish_reason: Option<String>,
    pub usage: Option<Usage>,
}

#[derive(Deserialize)]
struct CompletionWire {
    #[serde(default, deserialize_with = "or_default")]
    choices: Vec<ChoiceWire>,
    #[serde(default, deserialize_with = "or_default")]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct ChoiceWire {
    #[serde(default, deserialize_with = "or_default")]
    message: Option<MessageWire>,
    #[serde(default, deserialize_with = "or_default")]
    finish_reason: Option<String>,
}

#[derive(Deserialize, Default)]
struct MessageWire {
    #[serde(default, deserialize_with = "or_default")]
    content: Option<String>,
    #[serde(default, deserialize_with = "or_default")]
    refusal: Option<String>,
    #[serde(default, deserialize_with = "or_default")]
    reasoning_content: Option<String>,
    #[serde(default, deserialize_with = "or_default")]
    tool_calls: Vec<ToolCallWire>,
}

#[derive(Deserialize)]
struct ToolCallWire {
    #[serde(default, deserialize_with = "or_default")]
    id: String,
    #[serde(default, deserialize_with = "or_default")]
    function: FunctionWire,
}

#[derive(Deserialize, Default)]
struct FunctionWire {
    #[serde(default, deserialize_with = "or_default")]
    name: String,
    #[serde(default, deserialize_with = "or_default")]
    arguments: String,
}

impl ChatAnswer {
    /// Reads the first choice of a `chat.completion` body.
    pub fn parse(body: &[u8]) -> Result<ChatAnswer, serde_json::Error> {
        let w: CompletionWire = serde_json::from_slice(body)?;
        let choice = w.choices.into_iter().next();
        let finish_reason = choice.as_ref().and_then(|c| c.finish_reason.clone());
        let m = choice.and_then(|c| c.message).unwrap_or_default();
        Ok(ChatAnswer {
            text: m.content.filter(|t| !t.is_empty()),
            refusal: m.refusal.filter(|t| !t.is_empty()),
            reasoning: m.reasoning_content.filter(|t| !t.is_empty()),
            tool_calls: m
                .tool_calls
                .into_iter()
                .map(|c| (c.id, c.function.name, c.function.arguments))
                .collect(),
            finish_reason,
            usage: w.usage,
        })
    }
}

impl From<super::output::Assembled> for ChatAnswer {
    fn from(a: super::output::Assembled) -> ChatAnswer {
        ChatAnswer {
            text: a.content.filter(|t| !t.is_empty()),
            refusal: None,
            reasoning: a.reasoning.filter(|t| !t.is_empty()),
            tool_calls: a.tool_calls,
            finish_reason: Some(a.finish_reason.to_string()),
            usage: a.usage,
        }
    }
}

/// One stream chunk's first choice.
#[derive(Debug, Default)]
pub struct ChunkDelta {
    pub text: Option<String>,
    pub refusal: Option<String>,
    pub reasoning: Option<String>,
    pub tools: Vec<ToolDelta>,
    pub finish_reason: Option<String>,
    pub usage: Option<Usage>,
}

/// A fragment of one tool call: the first names it, the rest add arguments.
#[derive(Debug, Deserialize)]
pub struct ToolDelta {
    #[serde(default, deserialize_with = "or_default")]
    pub index: usize,
    #[serde(default, deserialize_with = "or_default")]
    pub id: Option<String>,
    #[serde(default, deserialize_with = "or_default")]
    pub function: Option<FunctionDelta>,
}

impl ToolDelta {
    /// The arguments fragment this delta carries (often empty).
    pub fn arguments(&self) -> &str {
        self.function
            .as_ref()
            .and_then(|f| f.arguments.as_deref())
            .unwrap_or_default()
    }

    /// The function's name, sent with the call's first delta.
    pub fn name(&self) -> &str {
        self.function
            .as_ref()
            .and_then(|f| f.name.as_deref())
            .unwrap_or_default()
    }
}

#[derive(Debug, Deserialize)]
pub struct FunctionDelta {
    #[serde(default, deserialize_with = "or_default")]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "or_default")]
    pub arguments: Option<String>,
}

#[derive(Deserialize)]
struct ChunkWire {
    #[serde(default, deserialize_with = "or_default")]
    choices: Vec<ChunkChoiceWire>,
    #[serde(default, deserialize_with = "or_default")]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct ChunkChoiceWire {
    #[serde(default, deserialize_with = "or_default")]
    delta: Option<DeltaWire>,
    #[serde(default, deserialize_with = "or_default")]
    finish_reason: Option<String>,
}

#[derive(Deserialize, Default)]
struct DeltaWire {
    #[serde(default, deserialize_with = "or_default")]
    content: Option<String>,
    #[serde(default, deserialize_with = "or_default")]
    refusal: Option<String>,
    #[serde(default, deserialize_with = "or_default")]
    reasoning_content: Option<String>,
    #[serde(default, deserialize_with = "or_default")]
    tool_calls: Vec<ToolDelta>,
}

impl ChunkDelta {
    pub fn parse(data: &[u8]) -> Result<ChunkDelta, serde_json::Error> {
        let w: ChunkWire = serde_json::from_slice(data)?;
        let choice = w.choices.into_iter().next();
        let finish_reason = choice.as_ref().and_then(|c| c.finish_reason.clone());
        let d = choice.and_then(|c| c.delta).unwrap_or_default();
        Ok(ChunkDelta {
            text: d.content.filter(|t| !t.is_empty()),
            refusal: d.refusal.filter(|t| !t.is_empty()),
            reasoning: d.reasoning_content.filter(|t| !t.is_empty()),
            tools: d.tool_calls,
            finish_reason,
            usage: w.usage,
        })
    }
}

/// Strips SSE framing from one `data: ...` event (a cached answer replayed as events).
pub fn unframe(event: &[u8]) -> Option<&[u8]> {
    let data = event.strip_prefix(b"data: ")?;
    let data = data.strip_suffix(b"\n\n").unwrap_or(data);
    (data != b"[DONE]").then_some(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_text_tools_and_usage() {
        let body = br#"{"id":"x","model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hi","tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{\"a\":1}"}}]},"finish_reason":"tool_calls"}],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#;
        let a = ChatAnswer::parse(body).unwrap();
        assert_eq!(a.text.as_deref(), Some("hi"));
        assert_eq!(
            a.tool_calls,
            vec![("c1".into(), "f".into(), "{\"a\":1}".into())]
        );
        assert_eq!(a.finish_reason.as_deref(), Some("tool_calls"));
        assert_eq!(a.usage.unwrap().total_tokens, 5);
    }

    #[test]
    fn nulls_are_defaults() {
        let c = ChunkDelta::parse(br#"{"choices":[{"index":0,"delta":{"content":"Hi","tool_calls":null,"refusal":null},"finish_reason":null}],"usage":null}"#).unwrap();
        assert_eq!(c.text.as_deref(), Some("Hi"));
        let a = ChatAnswer::parse(br#"{"choices":[{"message":{"content":"x","tool_calls":null},"finish_reason":"stop"}],"usage":null}"#).unwrap();
        assert_eq!(a.text.as_deref(), Some("x"));
        let t = ChunkDelta::parse(br#"{"choices":[{"delta":{"tool_calls":[{"index":0,"id":null,"function":{"name":null,"arguments":"{}"}}]}}]}"#).unwrap();
        assert_eq!(
            t.tools[0].function.as_ref().unwrap().arguments.as_deref(),
            Some("{}")
        );
    }

    #[test]
    fn reads_chunks() {
        let c = ChunkDelta::parse(
            br#"{"choices":[{"index":0,"delta":{"content":"He"},"finish_reason":null}]}"#,
        )
        .unwrap();
        assert_eq!(c.text.as_deref(), Some("He"));
        let t = ChunkDelta::parse(br#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"id":"c","function":{"name":"f","arguments":""}}]}}]}"#).unwrap();
        assert_eq!(t.tools[0].index, 1);
        assert_eq!(unframe(b"data: {}\n\n"), Some(&b"{}"[..]));
        assert_eq!(unframe(b"data: [DONE]\n\n"), None);
    }
}
