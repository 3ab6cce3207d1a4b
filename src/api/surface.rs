//! The inbound surfaces (`/v1/chat/completions`, `/v1/responses`, `/v1/messages`): what
//! differs between them once a request has become the internal chat request is how an
//! answer, a stream and an error are written. Everything else (chains, cache, engine,
//! store) is shared.

use bytes::Bytes;
use http::StatusCode;

use super::{messages, responses, ApiError, Usage};

/// The surface a request came in on, with what it needs to write its answer.
#[derive(Debug, Clone)]
pub enum Surface {
    Chat,
    Responses(Box<responses::Meta>),
    Messages,
    Embeddings,
}

impl Surface {
    /// The `surface` column and log field.
    pub fn label(&self) -> &'static str {
        match self {
            Surface::Chat => "chat",
            Surface::Responses(_) => "responses",
            Surface::Messages => "messages",
            Surface::Embeddings => "embeddings",
        }
    }

    /// An error in this surface's shape and status.
    pub fn error(&self, e: &ApiError) -> (StatusCode, Bytes) {
        match self {
            Surface::Messages => messages::error_body(e),
            _ => (e.status, e.body()),
        }
    }

    /// A whole answer (an OpenAI `chat.completion` body, or the upstream's own body when
    /// it speaks this surface's format) in this surface's format.
    pub fn complete(
        &self,
        chat_body: &Bytes,
        native: Option<&Bytes>,
        read: Option<&super::answer::ChatAnswer>,
        model_id: &str,
    ) -> Result<Bytes, serde_json::Error> {
        let value = match (self, read) {
            (Surface::Chat | Surface::Embeddings, _) => return Ok(chat_body.clone()),
            (Surface::Messages, _) if native.is_some() => {
                return Ok(native.cloned().unwrap_or_default())
            }
            (Surface::Messages, Some(a)) => messages::from_answer(model_id, a),
            (Surface::Messages, None) => messages::from_chat(model_id, chat_body)?,
            (Surface::Responses(meta), Some(a)) => responses::from_answer(meta, model_id, a),
            (Surface::Responses(meta), None) => responses::from_chat(meta, model_id, chat_body)?,
        };
        serde_json::to_vec(&value).map(Bytes::from)
    }

    /// The writer of this surface's stream events.
    pub fn encoder(&self, model_id: &str, native: bool) -> Encoder {
        match self {
            Surface::Chat | Surface::Embeddings => Encoder::Chat,
            Surface::Messages if native => Encoder::Native,
            Surface::Messages => Encoder::Messages(Box::new(messages::Events::new(model_id))),
            Surface::Responses(meta) => {
                Encoder::Responses(Box::new(responses::Events::new((**meta).clone(), model_id)))
            }
        }
    }
}

/// Writes one surface's stream from the engine's chat chunks.
#[derive(Debug)]
pub enum Encoder {
    Chat,
    Responses(Box<responses::Events>),
    Messages(Box<messages::Events>),
    /// The upstream's own events go out as they came (an Anthropic stream to the
    /// Messages surface); the chunks are only read for usage and the end.
    Native,
}

const DONE: &[u8] = b"data: [DONE]\n\n";

impl Encoder {
    /// The wire bytes for one chat chunk (its JSON).
    pub fn chunk(&mut self, data: &[u8], out: &mut Vec<u8>) {
        match self {
            Encoder::Chat => {
                out.reserve(data.len() + 8);
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(data);
                out.extend_from_slice(b"\n\n");
            }
            Encoder::Responses(ev) => ev.chunk(data, out),
            Encoder::Messages(ev) => ev.chunk(data, out),
            Encoder::Native => {}
        }
    }

    /// The stream completed.
    pub fn done(&mut self, usage: Option<&Usage>, out: &mut Vec<u8>) {
        match self {
            Encoder::Chat => out.extend_from_slice(DONE),
            Encoder::Responses(ev) => ev.done(usage, out),
            Encoder::Messages(ev) => ev.done(usage, out),
            Encoder::Native => {}
        }
    }

    /// The stream failed after its commit point: the surface's own error event.
    pub fn fail(&mut self, e: &ApiError, out: &mut Vec<u8>) {
        match self {
            Encoder::Chat => out.extend_from_slice(&e.sse_event()),
            Encoder::Responses(ev) => {
                ev.fail(e.code.as_deref().unwrap_or("server_error"), &e.message, out)
            }
            Encoder::Messages(ev) => ev.fail(e, out),
            Encoder::Native => messages::Events::new("").fail(e, out),
        }
    }

    /// The Responses object a completed stream ended with (to keep for follow-ups).
    pub fn take_completed(&mut self) -> Option<serde_json::Value> {
        match self {
            Encoder::Responses(ev) => ev.completed.take(),
            _ => None,
        }
    }
}
