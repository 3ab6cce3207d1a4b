//! OpenAI, Azure OpenAI and OpenAI-compatible upstreams. The fast path forwards the
//! client's body as it is with only `model` rewritten; a provider with `drop_params` or
//! `extra_body` gets the body rewritten once. Answers pass back as they are, checked.

use bytes::Bytes;
use http::HeaderMap;
use serde_json::Value;

use super::errors::code_string;
use super::sse::SseEvent;
use super::stream::StreamItem;
use super::{AttemptError, Outgoing};
use crate::api::{splice, ChatRequest, ChunkView};
use crate::classify::ErrorClass;
use crate::config::{Model, ProviderKind};

pub fn request(model: &Model, req: &ChatRequest) -> Result<Outgoing, AttemptError> {
    let p = &model.provider;
    // The model's `max_tokens` is the default output cap. OpenAI itself takes the newer
    // name; Azure (older api-versions) and compatible servers know `max_tokens`.
    let cap_field = if p.kind == ProviderKind::Openai {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    let default_max = model.max_tokens.map(|n| (cap_field, u64::from(n)));
    let body = if p.rewrites_body() {
        rewrite(model, req, default_max)?
    } else {
        req.body_for(&model.model_id_json, default_max, asks_usage(model))
    };
    Ok(Outgoing {
        url: super::url_for(model, req),
        body,
        headers: HeaderMap::new(),
    })
}

/// Whether streams to this provider ask for usage: always, unless the provider lists
/// `stream_options` in `drop_params` (its server rejects it; its stream tokens are then
/// unknown, never guessed).
fn asks_usage(model: &Model) -> bool {
    !model
        .provider
        .drop_params
        .iter()
        .any(|p| p == "stream_options")
}

/// The body with the provider's `drop_params` removed and `extra_body` merged in.
fn rewrite(
    model: &Model,
    req: &ChatRequest,
    default_max: Option<(&str, u64)>,
) -> Result<Bytes, AttemptError> {
    let mut map: serde_json::Map<String, Value> =
        serde_json::from_slice(&req.body).map_err(|e| {
            AttemptError::new(
                ErrorClass::BadRequest,
                format!("cannot rewrite the request: {e}"),
            )
        })?;
    for name in &model.provider.drop_params {
        map.shift_remove(name);
    }
    if let Some(extra) = &model.provider.extra_body {
        for (k, v) in extra {
            map.insert(k.clone(), v.clone());
        }
    }
    map.insert("model".into(), Value::String(model.model_id.clone()));
    if req.stream && !req.include_usage && asks_usage(model) {
        let opts = map
            .entry("stream_options")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Value::Object(o) = opts {
            o.insert("include_usage".into(), Value::Bool(true));
        }
    }
    if let Some((field, n)) = default_max.filter(|_| req.max_tokens.is_none()) {
        map.insert(field.into(), Value::from(n));
    }
    serde_json::to_vec(&map)
        .map(Bytes::from)
        .map_err(|e| AttemptError::new(ErrorClass::BadRequest, e.to_string()))
}

/// OpenAI chunks pass through; `model` is set to the target's id, in-stream errors are
/// classified, and chunks that carry nothing for the client are dropped.
pub struct StreamState {
    model_id_json: Box<str>,
    /// The client asked for the usage chunk; otherwise it is counted and not sent.
    client_wants_usage: bool,
}

impl StreamState {
    pub(crate) fn new(model: &Model, client_wants_usage: bool) -> Self {
        StreamState {
            model_id_json: model.model_id_json.clone(),
            client_wants_usage,
        }
    }

    pub(crate) fn on_event(&mut self, ev: &SseEvent) -> Result<Vec<StreamItem>, AttemptError> {
        let data = &ev.data;
        if data.as_ref() == b"[DONE]" {
            return Ok(vec![StreamItem::Done]);
        }
        let view = ChunkView::parse(data).map_err(|e| {
            AttemptError::new(
                ErrorClass::Transient,
                format!("malformed upstream chunk: {e}"),
            )
        })?;
        if let Some(err) = view.error {
            let message = err
                .message
                .unwrap_or_else(|| "upstream stream error".into());
            let code = code_string(err.code);
            let class = match (code.as_deref(), err.kind.as_deref()) {
                (Some("rate_limit_exceeded"), _) | (_, Some("rate_limit_error")) => {
                    ErrorClass::RateLimited
                }
                (Some(c), _) if c.contains("context_length") => ErrorClass::ContextOverflow,
                _ => ErrorClass::Transient,
            };
            return Err(AttemptError::new(class, message));
        }
        if view.skippable {
            return Ok(Vec::new());
        }
        if let (true, false, Some(u)) = (view.usage_only, self.client_wants_usage, view.usage) {
            return Ok(vec![StreamItem::Usage(u)]);
        }
        let data = match view.model_span {
            Some(span) if data[span.clone()] != *self.model_id_json.as_bytes() => {
                splice(data, span, self.model_id_json.as_bytes())
            }
            _ => data.clone(),
        };
        Ok(vec![StreamItem::Chunk {
            data,
            has_content: view.has_content,
            finish_reason: view.finish_reason,
            usage: view.usage,
        }])
    }
}

/// OpenAI, Azure OpenAI and OpenAI-compatible servers: the client's bytes with `model`
/// rewritten (and `drop_params`/`extra_body` applied), answers passed through.
pub struct OpenAiFormat;

impl super::wire::WireFormat for OpenAiFormat {
    fn request(&self, model: &Model, req: &ChatRequest) -> Result<Outgoing, AttemptError> {
        request(model, req)
    }

    fn completion(
        &self,
        body: Bytes,
        _model: &Model,
    ) -> Result<super::wire::UpstreamAnswer, AttemptError> {
        Ok(super::wire::UpstreamAnswer::Chat(body))
    }

    fn stream(&self, model: &Model, req: &ChatRequest) -> Box<dyn super::wire::StreamTranslator> {
        Box::new(StreamState::new(model, req.include_usage))
    }
}

impl super::wire::StreamTranslator for StreamState {
    fn on_event(&mut self, ev: &SseEvent) -> Result<Vec<StreamItem>, AttemptError> {
        StreamState::on_event(self, ev)
    }

    // OpenAI-compatible servers sometimes omit `[DONE]`.
    fn eof_after_finish_is_complete(&self) -> bool {
        true
    }
}
