//! The SSE body sent to clients for a committed stream: buffered head chunks, then the
//! rest of the upstream, ending in `data: [DONE]` or, on failure, an error event.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;
use prometheus::IntGauge;
use tokio::time::{timeout_at, Instant};

use super::chat::StreamStore;
use crate::api::{ApiError, Usage};
use crate::cache::Assembler;
use crate::classify::ErrorClass;
use crate::config::Model;
use crate::metrics::Metrics;
use crate::providers::AttemptError;
use crate::providers::{ChunkStream, StreamItem};
use crate::resilience::breaker::{Admission, CallResult};
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
    rest: Option<Box<ChunkStream>>,
    deadline: Instant,
    idle_timeout: Option<std::time::Duration>,
    chaos_cut: bool,
    saw_finish: bool,
    ended: bool,
    /// The last usage the upstream reported, counted when the stream ends.
    usage: Option<Usage>,
    model: Arc<Model>,
    metrics: Arc<Metrics>,
    /// Where to store the answer once it completes, and the answer so far.
    store: Option<(StreamStore, Assembler)>,
    _inflight: InflightGuard,
}

impl State {
    /// The stream completed: count its tokens and cost, and store it if asked to.
    async fn complete(&mut self) -> Bytes {
        self.ended = true;
        if let Some(u) = self.usage.take() {
            self.metrics.record_usage(&self.model, &u);
        }
        self.model
            .breaker
            .record(Admission::Allowed, CallResult::Success);
        if let Some((store, asm)) = self.store.take() {
            let has_usage = asm.has_usage();
            if let Some(body) = asm.finish() {
                let (name, provider) = (self.model.name.clone(), self.model.provider.name.clone());
                store
                    .cache
                    .put(store.key, body, name, provider, store.ttl, has_usage)
                    .await;
            }
        }
        Bytes::from_static(DONE)
    }

    /// The upstream failed after the commit point: the target's breaker and health
    /// window hear of it, and the client gets an error event.
    fn fail(&mut self, event: Bytes) -> Bytes {
        self.ended = true;
        self.model.breaker.record(
            Admission::Allowed,
            CallResult::Failure { retry_after: None },
        );
        self.model.health.record_failure();
        event
    }
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
    committed: CommittedStream,
    model: Arc<Model>,
    metrics: Arc<Metrics>,
    deadline: Instant,
    inflight: InflightGuard,
    store: Option<StreamStore>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send {
    let store = store.map(|s| {
        let mut asm = Assembler::new(s.wants_json);
        for chunk in &committed.head {
            asm.push(chunk);
        }
        (s, asm)
    });
    let state = State {
        head: committed.head.into(),
        rest: committed.rest,
        deadline,
        idle_timeout: committed.idle_timeout,
        chaos_cut: committed.chaos_cut,
        saw_finish: committed.head_finished,
        ended: false,
        usage: None,
        model,
        metrics,
        store,
        _inflight: inflight,
    };
    futures_util::stream::unfold(state, |mut s| async move {
        if s.ended {
            return None;
        }
        if !s.head.is_empty() {
            // Everything received before the commit point goes out in one write.
            let mut out = Vec::with_capacity(s.head.iter().map(|c| c.len() + 8).sum());
            for chunk in s.head.drain(..) {
                out.extend_from_slice(&event(&chunk));
            }
            return Some((Ok(Bytes::from(out)), s));
        }
        if s.chaos_cut {
            let e = AttemptError::new(ErrorClass::Transient, "chaos: stream cut");
            let out = s.fail(failure_event(&e));
            return Some((Ok(out), s));
        }
        let Some(rest) = s.rest.as_mut() else {
            // Nothing left upstream (an answer returned whole, such as a refusal).
            let out = s.complete().await;
            return Some((Ok(out), s));
        };
        let limit = match s.idle_timeout {
            Some(idle) => s.deadline.min(Instant::now() + idle),
            None => s.deadline,
        };
        let out = match timeout_at(limit, rest.next()).await {
            Ok(Some(Ok(StreamItem::Chunk {
                data,
                finish_reason,
                usage,
                ..
            }))) => {
                s.saw_finish |= finish_reason.is_some();
                if usage.is_some() {
                    s.usage = usage;
                }
                if let Some((_, asm)) = s.store.as_mut() {
                    asm.push(&data);
                }
                event(&data)
            }
            Ok(Some(Ok(StreamItem::Done))) => s.complete().await,
            Ok(Some(Err(e))) => s.fail(failure_event(&e)),
            // Some servers close after the finish chunk without `[DONE]`.
            Ok(None)
                if s.saw_finish
                    && s.rest
                        .as_ref()
                        .is_some_and(|r| r.eof_after_finish_is_complete()) =>
            {
                s.complete().await
            }
            Ok(None) => s.fail(
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "server_error",
                    "the upstream stream ended before it finished",
                )
                .with_code("stream_interrupted")
                .sse_event(),
            ),
            Err(_) if limit < s.deadline => s.fail(
                ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "timeout_error",
                    "the upstream stream went idle for longer than idle_timeout",
                )
                .with_code("idle_timeout")
                .sse_event(),
            ),
            Err(_) => {
                // The request's own deadline: not the target's fault.
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
