//! The seam every upstream wire format implements: how to build its request, read its
//! answer, and translate its stream events. Adding a provider is one file implementing
//! [`WireFormat`] and one line in [`for_kind`]; the call path never matches on a kind.
//!
//! Error bodies are read by one shared reader (`errors.rs`) that recognises each
//! format's shape, so a status and a body classify the same whichever format sent them.

use bytes::Bytes;
use http::HeaderValue;

use super::sse::SseEvent;
use super::stream::StreamItem;
use super::{AttemptError, Outgoing};
use crate::api::ChatRequest;
use crate::config::{Model, ProviderKind};

/// One upstream wire format. Implementations are pure: no I/O.
pub trait WireFormat: Sync {
    /// The upstream request for `req`: URL, body and the format's own headers (the
    /// provider's credential and extra headers are added by the caller).
    fn request(&self, model: &Model, req: &ChatRequest) -> Result<Outgoing, AttemptError>;

    /// A whole 200 answer: OpenAI `chat.completion` bytes, and the answer's parts when
    /// a translation read them (so judging them needs no second parse).
    fn completion(&self, body: Bytes, model: &Model) -> Result<UpstreamAnswer, AttemptError>;

    /// The translator of this format's stream events into OpenAI chunks.
    fn stream(&self, model: &Model, req: &ChatRequest) -> Box<dyn StreamTranslator>;

    /// The `Accept` header a streaming request needs, if any.
    fn stream_accept(&self) -> Option<HeaderValue> {
        None
    }

    /// Whether this format is the Messages surface's own (the client's bytes go as they
    /// are, and the answer comes back as it came).
    fn speaks_messages(&self) -> bool {
        false
    }
}

/// A whole answer from the upstream, in OpenAI format.
pub enum UpstreamAnswer {
    /// The upstream spoke OpenAI's format: its bytes, not read yet.
    Chat(Bytes),
    /// Translated: the OpenAI body written, and the parts it was written from.
    Assembled(Bytes, crate::api::output::Assembled),
}

/// Turns one upstream stream, event by event, into OpenAI stream items.
pub trait StreamTranslator: Send {
    fn on_event(&mut self, ev: &SseEvent) -> Result<Vec<StreamItem>, AttemptError>;

    /// Items owed at the end of the upstream body (formats with no terminator).
    fn at_eof(&mut self) -> Vec<StreamItem> {
        Vec::new()
    }

    /// Whether the end of the body after a finish chunk counts as complete (servers that
    /// omit their terminator).
    fn eof_after_finish_is_complete(&self) -> bool {
        false
    }
}

/// The registry: a provider kind's wire format.
pub fn for_kind(kind: ProviderKind) -> &'static dyn WireFormat {
    match kind {
        ProviderKind::Openai | ProviderKind::OpenaiCompatible | ProviderKind::AzureOpenai => {
            &super::openai::OpenAiFormat
        }
        ProviderKind::Anthropic => &super::anthropic::AnthropicFormat,
        ProviderKind::Gemini => &super::gemini::GeminiFormat,
    }
}
