//! OpenAI and OpenAI-compatible upstreams. The request body is forwarded as the client
//! sent it with only `model` rewritten; answers are checked and passed back as they are.

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::HeaderValue;
use serde::Deserialize;

use super::sse::SseDecoder;
use super::{read_limited, redact, AttemptError, Completion, Reply};
use crate::api::{splice, ApiError, ChatRequest, ChunkView, CompletionView, Usage};
use crate::classify::{classify_status, retry_after, ErrorClass};
use crate::config::Model;

const ERROR_BODY_LIMIT: usize = 64 * 1024;

pub async fn call(
    http: &reqwest::Client,
    model: &Model,
    req: &ChatRequest,
) -> Result<Reply, AttemptError> {
    let mut builder = http
        .post(&model.provider.chat_url)
        .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
        .headers(model.provider.extra_headers.clone())
        .body(req.body_for_model(&model.model_id_json));
    if let Some(key) = &model.provider.api_key {
        let mut value =
            HeaderValue::from_str(&format!("Bearer {}", key.expose())).map_err(|_| {
                AttemptError::new(
                    ErrorClass::Auth,
                    "the provider's api_key is not a valid header value",
                )
            })?;
        value.set_sensitive(true);
        builder = builder.header(AUTHORIZATION, value);
    }
    let resp = builder.send().await.map_err(super::transport_error)?;
    let status = resp.status();
    if !status.is_success() {
        return Err(error_from_response(resp, model).await);
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
        return Ok(Reply::Stream(ChunkStream::new(
            resp,
            model.model_id_json.clone(),
        )));
    }
    let body = resp.bytes().await.map_err(super::transport_error)?;
    completion(body, model, req.wants_json)
        .map(Reply::Complete)
        .map_err(|mut e| {
            e.status = Some(status.as_u16());
            e
        })
}

/// Judges a 200 answer: malformed, empty, filtered or fine. Rewrites `model` to the target's id.
fn completion(body: Bytes, model: &Model, wants_json: bool) -> Result<Completion, AttemptError> {
    let view = CompletionView::parse(&body).map_err(|e| {
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
    })
}

/// OpenAI's error body, and the `{"object":"error",...}` variant of vLLM and Mistral.
#[derive(Deserialize)]
struct ErrorEnvelope {
    error: Option<ErrorFields>,
    message: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    code: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct ErrorFields {
    message: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    param: Option<String>,
    code: Option<serde_json::Value>,
}

fn code_string(v: Option<serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

async fn error_from_response(resp: reqwest::Response, model: &Model) -> AttemptError {
    let status = resp.status();
    let retry = retry_after(resp.headers());
    let body = read_limited(resp, ERROR_BODY_LIMIT).await;
    let (message, kind, param, code) = match serde_json::from_slice::<ErrorEnvelope>(&body) {
        Ok(ErrorEnvelope { error: Some(e), .. }) => {
            (e.message, e.kind, e.param, code_string(e.code))
        }
        Ok(env) => (env.message, env.kind, None, code_string(env.code)),
        Err(_) => (None, None, None, None),
    };
    let message = redact(
        &message.unwrap_or_else(|| {
            let text = String::from_utf8_lossy(&body);
            let text = text.trim();
            if text.is_empty() || text.starts_with('<') {
                format!("upstream returned HTTP {}", status.as_u16())
            } else {
                text.chars().take(500).collect()
            }
        }),
        model,
    );
    let class = classify_status(status.as_u16(), code.as_deref(), kind.as_deref(), &message);
    let client_error = (class == ErrorClass::BadRequest).then(|| {
        let mut e = ApiError::new(status, "invalid_request_error", message.clone());
        e.param = param;
        e.code = code;
        Box::new(e)
    });
    AttemptError {
        class,
        status: Some(status.as_u16()),
        message,
        retry_after: retry,
        client_error,
        not_sent: false,
        filtered: None,
    }
}

/// One item of an upstream stream, already in OpenAI chunk format.
#[derive(Debug)]
pub enum StreamItem {
    Chunk {
        /// The JSON of one `chat.completion.chunk`.
        data: Bytes,
        has_content: bool,
        finish_reason: Option<String>,
        usage: Option<Usage>,
    },
    /// The upstream said `[DONE]`.
    Done,
}

/// An upstream SSE stream, decoded into OpenAI chunks.
pub struct ChunkStream {
    resp: reqwest::Response,
    decoder: SseDecoder,
    model_id_json: Box<str>,
    eof: bool,
}

impl ChunkStream {
    fn new(resp: reqwest::Response, model_id_json: Box<str>) -> Self {
        ChunkStream {
            resp,
            decoder: SseDecoder::new(),
            model_id_json,
            eof: false,
        }
    }

    /// The next item; `None` when the upstream closed the connection.
    pub async fn next(&mut self) -> Option<Result<StreamItem, AttemptError>> {
        loop {
            let event = if self.eof {
                self.decoder.finish()?
            } else if let Some(ev) = self.decoder.next_event() {
                ev
            } else {
                match self.resp.chunk().await {
                    Ok(Some(bytes)) => {
                        self.decoder.push(&bytes);
                        continue;
                    }
                    Ok(None) => {
                        self.eof = true;
                        continue;
                    }
                    Err(e) => return Some(Err(super::transport_error(e))),
                }
            };
            let data = event.data;
            if data.as_ref() == b"[DONE]" {
                return Some(Ok(StreamItem::Done));
            }
            return Some(self.chunk(data));
        }
    }

    fn chunk(&self, data: Bytes) -> Result<StreamItem, AttemptError> {
        let view = ChunkView::parse(&data).map_err(|e| {
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
        let data = match view.model_span {
            Some(span) if data[span.clone()] != *self.model_id_json.as_bytes() => {
                splice(&data, span, self.model_id_json.as_bytes())
            }
            _ => data,
        };
        Ok(StreamItem::Chunk {
            data,
            has_content: view.has_content,
            finish_reason: view.finish_reason,
            usage: view.usage,
        })
    }
}
