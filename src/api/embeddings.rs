//! `POST /v1/embeddings`: the request as cascade reads it (the original bytes go to
//! OpenAI-format upstreams with only `model` rewritten), and the OpenAI-shaped answer
//! written for upstreams that speak another format.

use std::ops::Range;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::{span_in, ApiError};

/// What to embed.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Texts(Vec<String>),
    /// Token arrays: only OpenAI-format upstreams take them.
    Tokens(usize),
}

impl Input {
    pub fn len(&self) -> usize {
        match self {
            Input::Texts(t) => t.len(),
            Input::Tokens(n) => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A validated embeddings request.
#[derive(Debug, Clone)]
pub struct EmbeddingRequest {
    pub body: Bytes,
    pub model: Option<String>,
    pub model_span: Option<Range<usize>>,
    pub input: Input,
    pub base64: bool,
    pub dimensions: Option<u32>,
}

#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(default)]
    input: Option<Value>,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<u32>,
}

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid_request(message).with_param(param)
}

impl EmbeddingRequest {
    pub fn parse(body: Bytes) -> Result<EmbeddingRequest, ApiError> {
        let text = super::json_text(&body)
            .map_err(|e| ApiError::invalid_request(format!("The body is not valid JSON: {e}")))?;
        let w: Wire = serde_json::from_str(text).map_err(|e| {
            ApiError::invalid_request(format!("The body is not a valid embeddings request: {e}"))
        })?;
        let model = match w.model {
            Some(raw) => Some(
                serde_json::from_str::<String>(raw.get())
                    .map_err(|_| bad("model", "Invalid type for 'model': expected a string."))?,
            ),
            None => None,
        };
        let model_span = w.model.map(|m| span_in(&body, m));
        let (input, encoding_format, dimensions) = (w.input, w.encoding_format, w.dimensions);
        let input = match input {
            Some(Value::String(s)) => Input::Texts(vec![s]),
            Some(Value::Array(items)) if items.iter().all(Value::is_string) => Input::Texts(
                items
                    .into_iter()
                    .filter_map(|v| match v {
                        Value::String(s) => Some(s),
                        _ => None,
                    })
                    .collect(),
            ),
            Some(Value::Array(items)) if items.iter().all(Value::is_u64) => Input::Tokens(1),
            Some(Value::Array(items))
                if items
                    .iter()
                    .all(|i| i.as_array().is_some_and(|t| t.iter().all(Value::is_u64))) =>
            {
                Input::Tokens(items.len())
            }
            None => return Err(bad("input", "Missing required parameter: 'input'.")),
            Some(_) => {
                return Err(bad(
                    "input",
                    "Invalid 'input': expected a string, a list of strings, or token arrays.",
                ))
            }
        };
        if input.is_empty() {
            return Err(bad("input", "Invalid 'input': empty array."));
        }
        if let Input::Texts(t) = &input {
            if t.iter().any(|s| s.is_empty()) {
                return Err(bad("input", "Invalid 'input': an input string is empty."));
            }
        }
        let base64 = match encoding_format.as_deref() {
            None | Some("float") => false,
            Some("base64") => true,
            Some(other) => {
                return Err(bad(
                    "encoding_format",
                    format!("Invalid 'encoding_format': {other:?} (expected float or base64)."),
                ))
            }
        };
        Ok(EmbeddingRequest {
            model_span,
            body,
            model,
            input,
            base64,
            dimensions,
        })
    }

    /// A rough token count, for answers whose upstream reports none.
    pub fn estimated_tokens(&self) -> u64 {
        match &self.input {
            Input::Texts(t) => t.iter().map(|s| (s.len() as u64).div_ceil(4)).sum(),
            Input::Tokens(_) => (self.body.len() as u64).div_ceil(4),
        }
    }
}

/// The little-endian `f32` bytes of a vector, base64-encoded (OpenAI's `base64` form).
pub fn to_base64(v: &[f32]) -> String {
    use base64::Engine;
    let mut bytes = Vec::with_capacity(v.len() * 4);
    for x in v {
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The OpenAI embeddings answer for vectors from another format.
pub fn answer(model_id: &str, vectors: &[Vec<f32>], base64: bool, tokens: u64) -> Bytes {
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                json!(to_base64(v))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    let body = json!({
        "object": "list", "data": data, "model": model_id,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    });
    serde_json::to_vec(&body).unwrap_or_default().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs() {
        let r = EmbeddingRequest::parse(Bytes::from_static(
            br#"{"model":"e","input":["a","bb"],"encoding_format":"base64","dimensions":8}"#,
        ))
        .unwrap();
        assert_eq!(r.input, Input::Texts(vec!["a".into(), "bb".into()]));
        assert!(r.base64);
        assert_eq!(r.dimensions, Some(8));
        let t =
            EmbeddingRequest::parse(Bytes::from_static(br#"{"model":"e","input":[[1,2],[3]]}"#))
                .unwrap();
        assert_eq!(t.input, Input::Tokens(2));
        let e = EmbeddingRequest::parse(Bytes::from_static(br#"{"model":"e","input":[]}"#))
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("input"));
        assert!(EmbeddingRequest::parse(Bytes::from_static(br#"{"model":"e"}"#)).is_err());
        assert!(EmbeddingRequest::parse(Bytes::from_static(
            br#"{"model":"e","input":"x","encoding_format":"hex"}"#
        ))
        .is_err());
    }

    #[test]
    fn base64_is_little_endian_f32() {
        assert_eq!(to_base64(&[1.0]), "AACAPw==");
    }
}
