//! An upstream SSE stream decoded into OpenAI chunks, whatever the wire format.

use std::collections::VecDeque;

use bytes::Bytes;

use super::sse::SseDecoder;
use super::wire::{StreamTranslator, WireFormat};
use super::AttemptError;
use crate::api::{ChatRequest, Usage};
use crate::config::Model;

/// One item of an upstream stream, already in OpenAI chunk format.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamItem {
    Chunk {
        /// The JSON of one `chat.completion.chunk`.
        data: Bytes,
        /// Text, a tool call, a refusal or reasoning: the first such chunk commits.
        has_content: bool,
        finish_reason: Option<String>,
        usage: Option<Usage>,
    },
    /// Usage the client did not ask for (cascade asked for it to count the tokens):
    /// counted, not sent.
    Usage(Usage),
    /// The stream is complete.
    Done,
}

impl StreamItem {
    /// A chunk with no finish and no usage.
    pub fn delta(data: Bytes, has_content: bool) -> StreamItem {
        StreamItem::Chunk {
            data,
            has_content,
            finish_reason: None,
            usage: None,
        }
    }
}

/// An upstream stream, decoded and translated.
pub struct ChunkStream {
    body: hyper::body::Incoming,
    decoder: SseDecoder,
    dialect: Box<dyn StreamTranslator>,
    pending: VecDeque<StreamItem>,
    eof: bool,
    drained: bool,
    /// To scrub from in-stream error messages.
    key: Option<crate::secret::Secret>,
    /// The upstream's own events, kept when the client speaks this format (Anthropic
    /// events to the Messages surface) and taken as they are sent.
    native: Option<Vec<u8>>,
}

impl ChunkStream {
    pub(crate) fn new(
        body: hyper::body::Incoming,
        model: &Model,
        req: &ChatRequest,
        wire: &dyn WireFormat,
    ) -> Self {
        ChunkStream {
            body,
            decoder: SseDecoder::new(),
            dialect: wire.stream(model, req),
            pending: VecDeque::new(),
            eof: false,
            drained: false,
            key: model.provider.api_key.clone(),
            native: (wire.speaks_messages() && req.native.is_some()).then(Vec::new),
        }
    }

    /// Whether the upstream's own events are kept for the client.
    pub fn is_native(&self) -> bool {
        self.native.is_some()
    }

    /// The upstream's own events read since the last call (native streams only).
    pub fn take_native(&mut self) -> Option<Bytes> {
        let buf = self.native.as_mut().filter(|b| !b.is_empty())?;
        Some(Bytes::from(std::mem::take(buf)))
    }

    /// Whether the end of the body after a finish chunk counts as a complete answer.
    /// OpenAI-compatible servers sometimes omit `[DONE]`; an Anthropic stream is only
    /// complete at `message_stop` (Gemini's end of body is its terminator, handled above).
    pub fn eof_after_finish_is_complete(&self) -> bool {
        self.dialect.eof_after_finish_is_complete()
    }

    /// The next item; `None` when the upstream closed the connection.
    pub async fn next(&mut self) -> Option<Result<StreamItem, AttemptError>> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some(Ok(item));
            }
            let event = if let Some(ev) = self.decoder.next_event() {
                ev
            } else if self.eof {
                match self.decoder.finish() {
                    Some(ev) => ev,
                    None if !self.drained => {
                        self.drained = true;
                        let tail = self.dialect.at_eof();
                        self.pending.extend(tail);
                        continue;
                    }
                    None => return None,
                }
            } else {
                match super::client::next_chunk(&mut self.body).await {
                    Some(Ok(bytes)) => {
                        self.decoder.push(&bytes);
                        continue;
                    }
                    None => {
                        self.eof = true;
                        continue;
                    }
                    Some(Err(e)) => return Some(Err(e)),
                }
            };
            match self.dialect.on_event(&event) {
                Ok(items) => {
                    if let Some(buf) = self.native.as_mut() {
                        if let Some(name) = &event.event {
                            buf.extend_from_slice(b"event: ");
                            buf.extend_from_slice(name.as_bytes());
                            buf.push(b'\n');
                        }
                        buf.extend_from_slice(b"data: ");
                        buf.extend_from_slice(&event.data);
                        buf.extend_from_slice(b"\n\n");
                    }
                    self.pending.extend(items)
                }
                Err(mut e) => {
                    if let Some(k) = self.key.as_ref().filter(|k| k.expose().len() >= 4) {
                        e.message = e.message.replace(k.expose(), "***");
                    }
                    return Some(Err(e));
                }
            }
        }
    }
}
