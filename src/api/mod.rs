//! The OpenAI-compatible types cascade accepts and returns. Knows nothing about providers.

pub mod answer;
pub mod chat;
pub mod embeddings;
pub mod error;
pub mod messages;
pub mod output;
pub mod request;
pub mod response;
pub mod responses;
pub mod surface;

pub use error::ApiError;
pub use request::{Capabilities, ChatRequest};
pub use response::{ChunkView, CompletionView, Usage};

/// More tool calls than any model makes in one turn: later indexes are ignored.
pub(crate) const MAX_TOOL_CALLS: usize = 128;

/// The caller's tenant: a hash of its credential (`Authorization` or `x-api-key`, the
/// `Bearer ` prefix set aside, so one key is one tenant on every surface). Callers
/// without a credential share the zero namespace.
pub fn tenant(headers: &http::HeaderMap) -> u128 {
    let value = headers
        .get(http::header::AUTHORIZATION)
        .or_else(|| headers.get("x-api-key"))
        .map(|v| v.as_bytes());
    match value {
        Some(v) => {
            let key = v.strip_prefix(b"Bearer ").unwrap_or(v);
            xxhash_rust::xxh3::xxh3_128(key)
        }
        None => 0,
    }
}

/// JSON bytes as text, validated as UTF-8 once as a whole: serde_json validates every
/// string again when it reads from a byte slice, but not when it reads from a `&str`.
pub(crate) fn json_text(bytes: &[u8]) -> Result<&str, serde_json::Error> {
    std::str::from_utf8(bytes).map_err(|e| serde::de::Error::custom(format!("invalid UTF-8: {e}")))
}

/// Byte range of a borrowed `RawValue` inside the buffer it was parsed from.
pub(crate) fn span_in(base: &[u8], raw: &serde_json::value::RawValue) -> std::ops::Range<usize> {
    let start = raw.get().as_ptr() as usize - base.as_ptr() as usize;
    start..start + raw.get().len()
}

/// Copies `body` with `range` replaced by `with`.
pub(crate) fn splice(body: &[u8], range: std::ops::Range<usize>, with: &[u8]) -> bytes::Bytes {
    splice_all(body, &[(range, with)])
}

/// Copies `body` once with several replacements, given in order of position and not
/// overlapping.
pub(crate) fn splice_all(body: &[u8], edits: &[(std::ops::Range<usize>, &[u8])]) -> bytes::Bytes {
    let extra: usize = edits.iter().map(|(_, with)| with.len()).sum();
    let mut out = Vec::with_capacity(body.len() + extra);
    let mut at = 0;
    for (range, with) in edits {
        out.extend_from_slice(&body[at..range.start]);
        out.extend_from_slice(with);
        at = range.end;
    }
    out.extend_from_slice(&body[at..]);
    out.into()
}
