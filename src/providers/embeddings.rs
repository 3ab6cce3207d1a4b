//! Embeddings upstream: OpenAI-format and Azure get the client's bytes with only `model`
//! rewritten; Gemini gets `batchEmbedContents`, and its vectors come back in OpenAI's
//! shape. A wrong number of vectors, or vectors of another size than the model declares,
//! is a failure: a silent change of vector space would corrupt the caller's index.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{AttemptError, Completion, Reply};
use crate::api::embeddings::{answer, EmbeddingRequest, Input};
use crate::api::Usage;
use crate::classify::ErrorClass;
use crate::config::{Model, ProviderKind};

/// The upstream request body for `model`.
pub fn request_body(model: &Model, e: &EmbeddingRequest) -> Result<Bytes, AttemptError> {
    match model.provider.kind {
        ProviderKind::Gemini => {
            let Input::Texts(texts) = &e.input else {
                return Err(AttemptError::new(
                    ErrorClass::BadRequest,
                    "Gemini embeds text only, not token arrays",
                ));
            };
            let requests: Vec<Value> = texts
                .iter()
                .map(|t| {
                    let mut r = json!({"model": format!("models/{}", model.model_id), "content": {"parts": [{"text": t}]}});
                    if let Some(d) = e.dimensions {
                        r["outputDimensionality"] = json!(d);
                    }
                    r
                })
                .collect();
            Ok(serde_json::to_vec(&json!({"requests": requests}))
                .unwrap_or_default()
                .into())
        }
        _ => {
            let id = model.model_id_json.as_bytes();
            Ok(match &e.model_span {
                Some(span) => crate::api::splice(&e.body, span.clone(), id),
                None => {
                    let open = e.body.iter().position(|&b| b == b'{').unwrap_or(0) + 1;
                    let field = [b"\"model\":".as_slice(), id, b","].concat();
                    crate::api::splice(&e.body, open..open, &field)
                }
            })
        }
    }
}

#[derive(Deserialize)]
struct OpenAiAnswer {
    #[serde(default)]
    data: Vec<OpenAiVector>,
    #[serde(default)]
    usage: Option<OpenAiUsage>,
}

#[derive(Deserialize)]
struct OpenAiVector {
    embedding: Value,
}

#[derive(Deserialize)]
struct OpenAiUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    total_tokens: u64,
}

#[derive(Deserialize)]
struct GeminiAnswer {
    #[serde(default)]
    embeddings: Vec<GeminiVector>,
}

#[derive(Deserialize)]
struct GeminiVector {
    #[serde(default)]
    values: Vec<f32>,
}

fn malformed(e: impl std::fmt::Display) -> AttemptError {
    AttemptError::new(
        ErrorClass::Transient,
        format!("malformed embeddings answer: {e}"),
    )
}

/// Judges an upstream answer and puts it in OpenAI's shape.
pub fn completion(model: &Model, e: &EmbeddingRequest, body: Bytes) -> Result<Reply, AttemptError> {
    let wanted = e.input.len();
    let size = e.dimensions.or(model.dimensions);
    let (body, usage) = match model.provider.kind {
        ProviderKind::Gemini => {
            let a: GeminiAnswer = serde_json::from_slice(&body).map_err(malformed)?;
            check(
                a.embeddings.len(),
                wanted,
                a.embeddings.iter().map(|v| v.values.len()),
                size,
            )?;
            let vectors: Vec<Vec<f32>> = a.embeddings.into_iter().map(|v| v.values).collect();
            // Gemini reports no tokens: the client's answer needs integers (an estimate),
            // the store keeps none.
            let body = answer(&model.model_id, &vectors, e.base64, e.estimated_tokens());
            (body, None)
        }
        _ => {
            let a: OpenAiAnswer = serde_json::from_slice(&body).map_err(malformed)?;
            let sizes = a.data.iter().map(|v| match &v.embedding {
                Value::Array(x) => x.len(),
                // base64 of little-endian f32s.
                Value::String(s) => s.trim_end_matches('=').len() * 3 / 4 / 4,
                _ => 0,
            });
            check(a.data.len(), wanted, sizes, size)?;
            let usage = a.usage.map(|u| Usage {
                prompt_tokens: u.prompt_tokens,
                completion_tokens: 0,
                total_tokens: u.total_tokens.max(u.prompt_tokens),
                cached_tokens: 0,
                reasoning_tokens: 0,
            });
            (body, usage)
        }
    };
    Ok(Reply::Complete(Completion {
        body,
        usage,
        finish_reason: Some("stop".into()),
        refused: false,
        native: None,
        answer: None,
    }))
}

fn check(
    got: usize,
    wanted: usize,
    sizes: impl Iterator<Item = usize>,
    size: Option<u32>,
) -> Result<(), AttemptError> {
    if got != wanted {
        return Err(AttemptError::new(
            ErrorClass::Empty,
            format!("the upstream returned {got} vectors for {wanted} inputs"),
        ));
    }
    if let Some(want) = size {
        for s in sizes {
            if s != want as usize {
                return Err(AttemptError::new(
                    ErrorClass::InvalidOutput,
                    format!("the upstream returned a vector of {s} dimensions where {want} were declared"),
                ));
            }
        }
    }
    Ok(())
}
