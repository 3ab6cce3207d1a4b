//! The SSE body sent to clients for a committed stream: buffered head chunks, then the
//! rest of the upstream, ending in `data: [DONE]` or, on failure, an error event.

use std::collections::VecDeque;

use bytes::Bytes;
use http::StatusCode;
use prometheus::IntGauge;
use tokio::time::{timeout_at, Instant};

use crate::api::ApiError;
use crate::classify::ErrorClass;
use crate::providers::AttemptError;
use crate::providers::{ChunkStream, StreamItem};
use crate::routing::engine::CommittedStream;

/// Decrements the in-flight gauge when the request (or its stream) ends.
pub struct InflightGuard(IntGauge);

impl InflightGuard {
    pub fn new(g: &IntGauge) -> Self {
        g.inc();
        InflightGuard(g.clone())
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

struct State {
    head: VecDeque<Bytes>,
    rest: Option<ChunkStream>,
    deadline: Instant,
    idle_timeout: Option<std::time::Duration>,
    chaos_cut: bool,
    saw_finish: bool,
    ended: bool,
    _inflight: InflightGuard,
}

fn event(data: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(data.len() + 8);
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\n\n");
    out.into()
}

const DONE: &[u8] = b"data: [DONE]\n\n";

/// A mid-stream failure as the client sees it: an OpenAI error event, never a silent close.
fn failure_event(e: &AttemptError) -> Bytes {
    let code = match e.class {
        ErrorClass::Timeout => "timeout",
        ErrorClass::RateLimited => "rate_limit_exceeded",
        _ => "upstream_error",
    };
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "server_error",
        format!("upstream stream failed: {}", e.message),
    )
    .with_code(code)
    .sse_event()
}

/// The body stream for a committed upstream stream.
pub fn body(
    committed: Box<CommittedStream>,
    deadline: Instant,
    inflight: InflightGuard,
) -> impl futures_util::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send {
    let state = State {
        head: committed.head.into(),
        rest: committed.rest,
        deadline,
        idle_timeout: committed.idle_timeout,
        chaos_cut: committed.chaos_cut,
        saw_finish: false,
        ended: false,
        _inflight: inflight,
    };
    futures_util::stream::unfold(state, |mut s| async move {
        if s.ended {
            return None;
        }
        if let Some(chunk) = s.head.pop_front() {
            return Some((Ok(event(&chunk)), s));
        }
        if s.chaos_cut {
            s.ended = true;
            let e = AttemptError::new(ErrorClass::Transient, "chaos: stream cut");
            return Some((Ok(failure_event(&e)), s));
        }
        let Some(rest) = s.rest.as_mut() else {
            // Nothing left upstream (a replayed, already complete answer).
            s.ended = true;
            return Some((Ok(Bytes::from_static(DONE)), s));
        };
        let limit = match s.idle_timeout {
            Some(idle) => s.deadline.min(Instant::now() + idle),
            None => s.deadline,
        };
        let out = match timeout_at(limit, rest.next()).await {
            Ok(Some(Ok(StreamItem::Chunk {
                data,
                finish_reason,
                ..
            }))) => {
                s.saw_finish |= finish_reason.is_some();
                event(&data)
            }
            Ok(Some(Ok(StreamItem::Done))) => {
                s.ended = true;
                Bytes::from_static(DONE)
            }
            Ok(Some(Err(e))) => {
                s.ended = true;
                failure_event(&e)
            }
            Ok(None) if s.saw_finish => {
                // Some servers close after the finish chunk without `[DONE]`.
                s.ended = true;
                Bytes::from_static(DONE)
            }
            Ok(None) => {
                s.ended = true;
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "server_error",
                    "the upstream stream ended before it finished",
                )
                .with_code("stream_interrupted")
                .sse_event()
            }
            Err(_) if limit < s.deadline => {
                s.ended = true;
                ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "timeout_error",
                    "the upstream stream went idle for longer than idle_timeout",
                )
                .with_code("idle_timeout")
                .sse_event()
            }
            Err(_) => {
                s.ended = true;
                ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "timeout_error",
                    "the request deadline passed while streaming",
                )
                .with_code("deadline_exceeded")
                .sse_event()
            }
        };
        Some((Ok(out), s))
    })
}
