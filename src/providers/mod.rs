//! Upstream providers: one file per wire format (pure translation functions) plus the
//! client that sends them. Every outcome leaves this module already classified
//! (`AttemptError::class`); a provider never decides about fallback.

pub mod anthropic;
pub mod client;
pub mod embeddings;
pub mod errors;
pub mod gemini;
pub mod openai;
pub mod sse;
pub mod stream;
pub mod wire;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::HeaderValue;

use crate::api::answer::ChatAnswer;
use crate::api::{splice, ChatRequest, CompletionView, Usage};
pub use crate::classify::AttemptError;
use crate::classify::ErrorClass;
use crate::config::Model;
pub use stream::{ChunkStream, StreamItem};

pub use client::{HttpClient, HttpClients};

/// A complete (non-streaming) answer, already in OpenAI format.
#[derive(Debug, Clone)]
pub struct Completion {
    pub body: Bytes,
    pub usage: Option<Usage>,
    pub finish_reason: Option<String>,
    /// The answer is a refusal (returned, never cached).
    pub refused: bool,
    /// The upstream's own body when it speaks the client's format (an Anthropic answer
    /// to the Messages surface), sent as it came.
    pub native: Option<Bytes>,
    /// The answer read whole, when it was (translated, or read for another surface).
    pub answer: Option<std::sync::Arc<ChatAnswer>>,
}

/// What an upstream call produced.
pub enum Reply {
    Complete(Completion),
    Stream(Box<ChunkStream>),
}

/// The model's URL for this request (plain or streaming).
pub(crate) fn url_for(model: &Model, req: &ChatRequest) -> http::Uri {
    if req.stream {
        model.stream_url.clone()
    } else {
        model.url.clone()
    }
}

/// One upstream HTTP request, built by a wire format's translator.
pub struct Outgoing {
    pub url: http::Uri,
    pub body: Bytes,
    pub headers: http::HeaderMap,
}

/// One call to `model`'s provider: translate, send, classify, translate back.
pub async fn call(
    client: &HttpClient,
    model: &Model,
    req: &ChatRequest,
) -> Result<Reply, AttemptError> {
    if let Some(e) = &req.embedding {
        return embed(client, model, e).await;
    }
    let wire = wire::for_kind(model.provider.kind);
    let out = wire.request(model, req)?;
    let mut headers = out.headers;
    provider_headers(model, &mut headers);
    if req.stream {
        if let Some(accept) = wire.stream_accept() {
            headers.insert(http::header::ACCEPT, accept);
        }
    }
    let native = wire.speaks_messages() && req.native.is_some();
    let resp = client::post(client, out.url, headers, out.body).await?;
    let status = resp.status();
    if !status.is_success() {
        return Err(errors::from_response(resp, model).await);
    }
    if req.stream {
        let is_sse = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if !is_sse {
            return Err(AttemptError::new(
                ErrorClass::Transient,
                "upstream answered a streaming request without an event stream",
            ));
        }
        return Ok(Reply::Stream(Box::new(ChunkStream::new(
            resp.into_body(),
            model,
            req,
            wire,
        ))));
    }
    let body = client::read_body(resp.into_body(), None).await?;
    let judged = wire
        .completion(body.clone(), model)
        .and_then(|answer| match answer {
            // The chat surface gets the upstream's bytes with `model` set: a light view judges them.
            wire::UpstreamAnswer::Chat(b) if !req.reads_answer => judge(b, model, req.wants_json),
            // Another surface reads the whole answer anyway: read it once, judge that.
            wire::UpstreamAnswer::Chat(b) => match ChatAnswer::parse(&b) {
                Ok(a) => judge_answer(b, a, req.wants_json),
                Err(e) => Err(AttemptError::new(
                    ErrorClass::Transient,
                    format!("malformed upstream body: {e}"),
                )),
            },
            wire::UpstreamAnswer::Assembled(b, a) => {
                judge_answer(b, ChatAnswer::from(a), req.wants_json)
            }
        });
    judged
        .map(|mut c| {
            if native {
                c.native = Some(body);
            }
            Reply::Complete(c)
        })
        .map_err(|mut e| {
            e.status.get_or_insert(status.as_u16());
            e
        })
}

/// The headers every call to `model`'s provider carries: content type, host, the
/// provider's credential and its extra headers.
pub(crate) fn provider_headers(model: &Model, headers: &mut http::HeaderMap) {
    headers.reserve(4 + model.provider.extra_headers.len());
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(host) = &model.provider.host {
        headers.insert(http::header::HOST, host.clone());
    }
    if let Some((name, value)) = &model.provider.auth {
        headers.insert(name.clone(), value.clone());
    }
    for (name, value) in &model.provider.extra_headers {
        headers.insert(name.clone(), value.clone());
    }
}

/// One embeddings call.
async fn embed(
    client: &HttpClient,
    model: &Model,
    e: &crate::api::embeddings::EmbeddingRequest,
) -> Result<Reply, AttemptError> {
    let Some(url) = model.embed_url.clone() else {
        return Err(AttemptError::new(
            ErrorClass::BadRequest,
            format!("{} is not an embedding model", model.name),
        ));
    };
    let body = embeddings::request_body(model, e)?;
    let mut headers = http::HeaderMap::new();
    provider_headers(model, &mut headers);
    let resp = client::post(client, url, headers, body).await?;
    let status = resp.status();
    if !status.is_success() {
        return Err(errors::from_response(resp, model).await);
    }
    let body = client::read_body(resp.into_body(), None).await?;
    embeddings::completion(model, e, body).map_err(|mut err| {
        err.status.get_or_insert(status.as_u16());
        err
    })
}

/// Judges a 200 answer in OpenAI format: malformed, filtered, empty, not the JSON asked
/// for, or fine. Sets `model` to the target's id.
pub fn judge(body: Bytes, model: &Model, wants_json: bool) -> Result<Completion, AttemptError> {
    let view = CompletionView::parse(&body, wants_json).map_err(|e| {
        AttemptError::new(
            ErrorClass::Transient,
            format!("malformed upstream body: {e}"),
        )
    })?;
    let body = match view.model_span {
        Some(span) if body[span.clone()] != *model.model_id_json.as_bytes() => {
            splice(&body, span, model.model_id_json.as_bytes())
        }
        _ => body,
    };
    if view.finish_reason.as_deref() == Some("content_filter") {
        let mut e = AttemptError::new(ErrorClass::ContentPolicy, "the answer was filtered");
        e.filtered = Some(vec![body]);
        return Err(e);
    }
    if !view.has_content {
        return Err(AttemptError::new(
            ErrorClass::Empty,
            "the upstream answer has no content and no tool calls",
        ));
    }
    if wants_json && view.text_not_json {
        return Err(AttemptError::new(
            ErrorClass::InvalidOutput,
            "JSON was asked for and the answer does not parse",
        ));
    }
    Ok(Completion {
        body,
        usage: view.usage,
        finish_reason: view.finish_reason,
        refused: view.refused,
        native: None,
        answer: None,
    })
}

/// Judges an answer already read (translated, or read whole for another surface):
/// the same verdicts as [`judge`], with no parse.
pub fn judge_answer(
    body: Bytes,
    a: ChatAnswer,
    wants_json: bool,
) -> Result<Completion, AttemptError> {
    if a.finish_reason.as_deref() == Some("content_filter") {
        let mut e = AttemptError::new(ErrorClass::ContentPolicy, "the answer was filtered");
        e.filtered = Some(vec![body]);
        return Err(e);
    }
    let text = a.text.as_deref().filter(|t| !t.trim().is_empty());
    let refused = a.refusal.as_deref().is_some_and(|r| !r.trim().is_empty());
    if text.is_none() && !refused && a.tool_calls.is_empty() {
        return Err(AttemptError::new(
            ErrorClass::Empty,
            "the upstream answer has no content and no tool calls",
        ));
    }
    // As in `judge`: a tool call or a refusal is not judged as JSON.
    if wants_json
        && a.tool_calls.is_empty()
        && !refused
        && text.is_some_and(|t| !crate::api::response::parses_as_json(t))
    {
        return Err(AttemptError::new(
            ErrorClass::InvalidOutput,
            "JSON was asked for and the answer does not parse",
        ));
    }
    Ok(Completion {
        body,
        usage: a.usage,
        finish_reason: a.finish_reason.clone(),
        refused,
        native: None,
        answer: Some(std::sync::Arc::new(a)),
    })
}

/// The typed request, or a classified error if it cannot be translated.
pub(crate) fn typed(req: &ChatRequest) -> Result<&crate::api::chat::TypedChat, AttemptError> {
    req.typed().map_err(|e| {
        AttemptError::new(
            ErrorClass::BadRequest,
            format!("cannot translate the request: {e}"),
        )
    })
}

/// Appends a turn, merging it into the previous one when the role is the same
/// (Anthropic and Gemini both want alternating turns).
pub(crate) fn push_turn<T>(
    turns: &mut Vec<(&'static str, Vec<T>)>,
    role: &'static str,
    items: Vec<T>,
) {
    match turns.last_mut() {
        Some((r, existing)) if *r == role => existing.extend(items),
        _ => turns.push((role, items)),
    }
}

/// Removes any provider key from text that may reach a client or a log.
pub(crate) fn redact(text: &str, model: &Model) -> String {
    redact_key(text, model.provider.api_key.as_ref())
}

/// Removes `key` from text that may reach a client or a log.
pub(crate) fn redact_key(text: &str, key: Option<&crate::secret::Secret>) -> String {
    match key {
        Some(k) if k.expose().len() >= 4 && text.contains(k.expose()) => {
            text.replace(k.expose(), "***")
        }
        _ => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(text: Option<&str>, tools: bool) -> ChatAnswer {
        ChatAnswer {
            text: text.map(str::to_string),
            tool_calls: if tools {
                vec![("c".into(), "f".into(), "{}".into())]
            } else {
                Vec::new()
            },
            finish_reason: Some("stop".into()),
            ..ChatAnswer::default()
        }
    }

    #[test]
    fn judging_a_read_answer_matches_the_view() {
        let b = Bytes::new;
        // JSON mode judges text, not tool calls.
        assert!(judge_answer(b(), answer(Some("I'll look."), true), true).is_ok());
        let e = judge_answer(b(), answer(Some("not json"), false), true).unwrap_err();
        assert_eq!(e.class, ErrorClass::InvalidOutput);
        assert!(judge_answer(b(), answer(Some("```json\n{\"a\":1}\n```"), false), true).is_ok());
        let e = judge_answer(b(), answer(Some("  "), false), false).unwrap_err();
        assert_eq!(e.class, ErrorClass::Empty);
        let mut filtered = answer(Some("x"), false);
        filtered.finish_reason = Some("content_filter".into());
        let e = judge_answer(b(), filtered, false).unwrap_err();
        assert_eq!(e.class, ErrorClass::ContentPolicy);
        let mut refusal = answer(None, false);
        refusal.refusal = Some("no".into());
        assert!(judge_answer(b(), refusal, true).unwrap().refused);
    }
}
