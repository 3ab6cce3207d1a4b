//! What a shadow answer is compared on, and the comparison itself. Pure functions:
//! an answer (complete body or stream chunks, OpenAI format) becomes a [`Summary`],
//! and two summaries give a [`Comparison`].

use std::collections::HashSet;

use serde_json::Value;

/// Tool calls compared at most.
const MAX_TOOLS: usize = 64;

/// The parts of an answer that a comparison reads.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub text: String,
    /// Names of the tools called, in order.
    pub tools: Vec<String>,
    pub finish_reason: Option<String>,
    /// `None` when the provider reported no usage.
    pub output_tokens: Option<u64>,
}

impl Summary {
    /// From a complete `chat.completion` body.
    pub fn from_completion(body: &[u8]) -> Summary {
        let Ok(v) = serde_json::from_slice::<Value>(body) else {
            return Summary::default();
        };
        let choice = &v["choices"][0];
        let message = &choice["message"];
        Summary {
            text: message["content"].as_str().unwrap_or_default().to_string(),
            tools: message["tool_calls"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t["function"]["name"].as_str().map(str::to_string))
                .collect(),
            finish_reason: choice["finish_reason"].as_str().map(str::to_string),
            output_tokens: v["usage"]["completion_tokens"].as_u64(),
        }
    }

    /// Feeds one `chat.completion.chunk` of a stream.
    pub fn push_chunk(&mut self, data: &[u8]) {
        let Ok(v) = serde_json::from_slice::<Value>(data) else {
            return;
        };
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            self.output_tokens = Some(n);
        }
        for choice in v["choices"].as_array().into_iter().flatten() {
            if choice["index"].as_u64().unwrap_or(0) != 0 {
                continue;
            }
            let delta = &choice["delta"];
            if let Some(t) = delta["content"].as_str() {
                self.text.push_str(t);
            }
            for tc in delta["tool_calls"].as_array().into_iter().flatten() {
                let i = tc["index"].as_u64().unwrap_or(0) as usize;
                // An upstream's index is not trusted with an allocation.
                if i >= MAX_TOOLS {
                    continue;
                }
                if let Some(name) = tc["function"]["name"].as_str() {
                    if self.tools.len() <= i {
                        self.tools.resize(i + 1, String::new());
                    }
                    self.tools[i].push_str(name);
                }
            }
            if let Some(f) = choice["finish_reason"].as_str() {
                self.finish_reason = Some(f.to_string());
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// Shadow output tokens / served output tokens; `None` when the served answer has none.
    pub length_ratio: Option<f64>,
    /// When JSON was asked for: does the shadow answer parse.
    pub json_valid: Option<bool>,
    /// Same tools called in the same order; `None` when neither called tools.
    pub tool_calls_match: Option<bool>,
    /// Jaccard index of the two texts' word sets, 0..=1 (1 when both are empty).
    pub similarity: f64,
}

pub fn compare(served: &Summary, shadow: &Summary, wants_json: bool) -> Comparison {
    Comparison {
        length_ratio: match (served.output_tokens, shadow.output_tokens) {
            (Some(s), Some(o)) if s > 0 => Some(o as f64 / s as f64),
            _ => None,
        },
        json_valid: wants_json.then(|| json_valid(&shadow.text)),
        tool_calls_match: (!served.tools.is_empty() || !shadow.tools.is_empty())
            .then(|| served.tools == shadow.tools),
        similarity: similarity(&served.text, &shadow.text),
    }
}

/// Whether an answer's text is JSON (a ```json fence around it is allowed).
pub fn json_valid(text: &str) -> bool {
    crate::api::response::parses_as_json(text)
}

/// Lower-cased runs of letters and digits.
fn words(text: &str) -> HashSet<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

pub fn similarity(a: &str, b: &str) -> f64 {
    let (a, b) = (words(a), words(b));
    let union = a.union(&b).count();
    if union == 0 {
        return 1.0;
    }
    a.intersection(&b).count() as f64 / union as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jaccard_of_word_sets() {
        assert_eq!(similarity("", ""), 1.0);
        assert_eq!(similarity("Hello, world!", "hello WORLD"), 1.0);
        assert_eq!(similarity("a b c d", "a b"), 0.5);
        assert_eq!(similarity("x", ""), 0.0);
        assert!((similarity("from p 42", "from s 42") - 0.5).abs() < 1e-9);
    }

    #[test]
    fn summaries_of_bodies_and_streams_agree() {
        let body = br#"{"choices":[{"index":0,"message":{"role":"assistant","content":"Hi there","tool_calls":[{"id":"c1","type":"function","function":{"name":"get_weather","arguments":"{}"}}]},"finish_reason":"tool_calls"}],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}"#;
        let whole = Summary::from_completion(body);
        let mut streamed = Summary::default();
        for chunk in [
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":"Hi "}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"there"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"c1","function":{"name":"get_weather","arguments":""}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}"#,
        ] {
            streamed.push_chunk(chunk.as_bytes());
        }
        assert_eq!(whole, streamed);
        assert_eq!(whole.tools, ["get_weather"]);
        assert_eq!(whole.output_tokens, Some(7));
    }

    #[test]
    fn comparisons() {
        let served = Summary {
            text: "{\"a\": 1}".into(),
            tools: vec![],
            finish_reason: Some("stop".into()),
            output_tokens: Some(4),
        };
        let shadow = Summary {
            text: "not json".into(),
            output_tokens: Some(6),
            ..Summary::default()
        };
        let c = compare(&served, &shadow, true);
        assert_eq!(c.length_ratio, Some(1.5));
        assert_eq!(c.json_valid, Some(false));
        assert_eq!(c.tool_calls_match, None);
        let c = compare(&served, &served, false);
        assert_eq!((c.json_valid, c.similarity), (None, 1.0));
        let no_tokens = Summary {
            output_tokens: Some(0),
            ..served.clone()
        };
        assert_eq!(compare(&no_tokens, &shadow, false).length_ratio, None);
        let tools = Summary {
            tools: vec!["f".into()],
            ..Summary::default()
        };
        assert_eq!(
            compare(&tools, &shadow, false).tool_calls_match,
            Some(false)
        );
        assert_eq!(compare(&tools, &tools, false).tool_calls_match, Some(true));
    }
}
