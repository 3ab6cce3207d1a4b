//! The SSE body sent to clients for a committed stream: buffered head chunks, then the
//! rest of the upstream, ending in `data: [DONE]` or, on failure, an error event.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use prometheus::IntGauge;
use tokio::time::{timeout_at, Instant};

use super::chat::StreamStore;
use super::record::{Answered, Ledger};
use crate::api::surface::Encoder;
use crate::api::{ApiError, Usage};
use crate::cache::Assembler;
use crate::classify::ErrorClass;
use crate::config::Model;
use crate::metrics::Metrics;
use crate::providers::AttemptError;
use crate::providers::{ChunkStream, StreamItem};
use crate::resilience::breaker::{Admission, CallResult};
use crate::routing::engine::CommittedStream;
use crate::routing::target::{RequestCtx, StreamEnding};
use crate::shadow::StreamTap;

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

/// What the stream reports when it ends: the request's ledger and call context.
pub struct StreamEnd {
    pub ledger: Option<Ledger>,
    pub ctx: Arc<RequestCtx>,
    /// The committed call's number in `ctx`.
    pub call: usize,
    /// A sampled stream: the answer so far, and where it goes when the stream ends
    /// (the shadow comparison), `None` if it did not end complete.
    pub shadow: Option<StreamTap>,
    pub attempts: usize,
    pub fallbacks: usize,
    /// From the request's arrival to the commit point.
    pub ttft: Duration,
    /// Resolves when the gateway's drain ends: the stream ends with an error event.
    pub stopped: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
}

struct State {
    head: VecDeque<Bytes>,
    rest: Option<Box<ChunkStream>>,
    deadline: Instant,
    idle_timeout: Option<Duration>,
    chaos_cut: bool,
    saw_finish: bool,
    ended: bool,
    /// The last usage the upstream reported, counted when the stream ends.
    usage: Option<Usage>,
    model: Arc<Model>,
    metrics: Arc<Metrics>,
    /// Where to store the answer once it completes, and the answer so far.
    store: Option<(StreamStore, Assembler)>,
    end: StreamEnd,
    /// Writes the client's surface's events.
    encoder: Encoder,
    /// Told the final Responses object of a completed stream (to keep it).
    on_complete: Option<OnComplete>,
    _inflight: InflightGuard,
}

/// How the stream is written for the client's surface.
pub struct SurfaceOut {
    pub encoder: Encoder,
    pub on_complete: Option<OnComplete>,
}

/// What a completed Responses stream's final object is handed to.
pub type OnComplete = Box<dyn FnOnce(serde_json::Value) + Send>;

impl State {
    /// The stream completed: count its tokens and cost, and store it if asked to.
    async fn complete(&mut self) -> Bytes {
        self.ended = true;
        if let Some(u) = &self.usage {
            self.metrics.record_usage(&self.model, u);
        }
        self.model
            .breaker
            .record(Admission::Allowed, CallResult::Success);
        self.report(StreamEnding::Complete, None);
        let mut out = Vec::new();
        self.native_tail(&mut out);
        self.encoder.done(self.usage.as_ref(), &mut out);
        if let (Some(f), Some(v)) = (self.on_complete.take(), self.encoder.take_completed()) {
            f(v);
        }
        if let Some((store, asm)) = self.store.take() {
            let has_usage = asm.has_usage();
            if let Some(body) = asm.finish() {
                let (name, provider) = (self.model.name, self.model.provider.name);
                store
                    .cache
                    .put(store.key, body, name, provider, store.ttl, has_usage)
                    .await;
            }
        }
        Bytes::from(out)
    }

    /// The upstream's own events read so far, for a native stream.
    fn native_tail(&mut self, out: &mut Vec<u8>) {
        if let Some(raw) = self.rest.as_mut().and_then(|r| r.take_native()) {
            out.extend_from_slice(&raw);
        }
    }

    /// The upstream failed after the commit point: the target's breaker and health
    /// window hear of it, and the client gets an error event.
    fn fail(&mut self, e: &ApiError, class: ErrorClass) -> Bytes {
        self.ended = true;
        // The upstream's own error event is not passed on: the surface writes its own.
        let _ = self.rest.as_mut().and_then(|r| r.take_native());
        let mut event = Vec::new();
        self.encoder.fail(e, &mut event);
        self.model.breaker.record(
            Admission::Allowed,
            CallResult::Failure { retry_after: None },
        );
        self.model.health.record_failure();
        let ending = StreamEnding::Failed {
            class,
            deadline_cut: false,
        };
        self.report(ending, Some(class.as_str()));
        event.into()
    }

    /// The request's own deadline ended the stream: not the target's fault.
    fn deadline_passed(&mut self, e: &ApiError) -> Bytes {
        self.ended = true;
        let mut event = Vec::new();
        self.encoder.fail(e, &mut event);
        let ending = StreamEnding::Failed {
            class: ErrorClass::Timeout,
            deadline_cut: true,
        };
        self.report(ending, Some("timeout"));
        event.into()
    }

    /// The gateway's drain ended before the stream did: the client gets the
    /// surface's error event; the call is recorded as cancelled (not the target's fault).
    fn shutting_down(&mut self) -> Bytes {
        self.ended = true;
        let _ = self.rest.as_mut().and_then(|r| r.take_native());
        let mut event = Vec::new();
        self.encoder
            .fail(&super::drain::shutting_down(), &mut event);
        self.report(StreamEnding::ClientGone, Some("shutting_down"));
        event.into()
    }

    /// The call's record and the request's row, once.
    fn report(&mut self, ending: StreamEnding, error_type: Option<&'static str>) {
        let Some(ledger) = self.end.ledger.take() else {
            return;
        };
        if let Some((chunks, tx)) = self.end.shadow.take() {
            let complete = ending == StreamEnding::Complete;
            let _ = tx.send((complete.then_some(chunks), ledger.elapsed_ms()));
        }
        self.end
            .ctx
            .settle_stream(self.end.call, self.usage, ending);
        // A failed call costs nothing, in its call row and its request row alike.
        ledger.finish(Answered {
            status: 200,
            model: Some(&self.model),
            attempts: self.end.attempts,
            fallbacks: self.end.fallbacks,
            ttft: Some(self.end.ttft),
            usage: self.usage,
            charged: error_type.is_none(),
            error_type,
        });
    }
}

impl Drop for State {
    fn drop(&mut self) {
        // The client left mid-stream (the body was dropped before its end).
        self.report(StreamEnding::ClientGone, Some("cancelled"));
    }
}

/// A mid-stream failure as the client sees it: the surface's error event, never a
/// silent close.
fn failure(e: &AttemptError) -> ApiError {
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
}

/// The body stream for a committed upstream stream.
pub fn body(
    committed: CommittedStream,
    model: Arc<Model>,
    metrics: Arc<Metrics>,
    inflight: InflightGuard,
    store: Option<StreamStore>,
    end: StreamEnd,
    out: SurfaceOut,
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
        deadline: end.ctx.deadline,
        idle_timeout: committed.idle_timeout,
        chaos_cut: committed.chaos_cut,
        saw_finish: committed.head_finished,
        ended: false,
        usage: None,
        model,
        metrics,
        store,
        end,
        encoder: out.encoder,
        on_complete: out.on_complete,
        _inflight: inflight,
    };
    futures_util::stream::unfold(state, |mut s| async move {
        if s.ended {
            return None;
        }
        if !s.head.is_empty() {
            // Everything received before the commit point goes out in one write.
            let mut out = Vec::with_capacity(s.head.iter().map(|c| c.len() + 8).sum());
            let head: Vec<Bytes> = s.head.drain(..).collect();
            for chunk in head {
                s.encoder.chunk(&chunk, &mut out);
                if let Some((tap, _)) = s.end.shadow.as_mut() {
                    tap.chunks.push(chunk);
                }
            }
            s.native_tail(&mut out);
            return Some((Ok(Bytes::from(out)), s));
        }
        if s.chaos_cut {
            let e = AttemptError::new(ErrorClass::Transient, "chaos: stream cut");
            let out = s.fail(&failure(&e), e.class);
            return Some((Ok(out), s));
        }
        if s.rest.is_none() {
            // Nothing left upstream (an answer returned whole, such as a refusal).
            let out = s.complete().await;
            return Some((Ok(out), s));
        }
        let out = loop {
            // The idle limit restarts with every upstream item, written out or not.
            let limit = match s.idle_timeout {
                Some(idle) => s.deadline.min(Instant::now() + idle),
                None => s.deadline,
            };
            let Some(rest) = s.rest.as_mut() else {
                break s.complete().await;
            };
            let item = tokio::select! {
                biased;
                item = timeout_at(limit, rest.next()) => Some(item),
                () = &mut s.end.stopped => None,
            };
            let Some(item) = item else {
                break s.shutting_down();
            };
            break match item {
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
                    let mut out = Vec::with_capacity(data.len() + 8);
                    s.encoder.chunk(&data, &mut out);
                    s.native_tail(&mut out);
                    if let Some((tap, _)) = s.end.shadow.as_mut() {
                        tap.chunks.push(data);
                    }
                    if out.is_empty() {
                        continue;
                    }
                    Bytes::from(out)
                }
                // Counted, not sent: the client did not ask for usage.
                Ok(Some(Ok(StreamItem::Usage(u)))) => {
                    if let Some((tap, _)) = s.end.shadow.as_mut() {
                        tap.output_tokens = Some(u.completion_tokens);
                    }
                    s.usage = Some(u);
                    continue;
                }
                Ok(Some(Ok(StreamItem::Done))) => s.complete().await,
                Ok(Some(Err(e))) => s.fail(&failure(&e), e.class),
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
                    &ApiError::new(
                        StatusCode::BAD_GATEWAY,
                        "server_error",
                        "the upstream stream ended before it finished",
                    )
                    .with_code("stream_interrupted"),
                    ErrorClass::Transient,
                ),
                Err(_) if limit < s.deadline => s.fail(
                    &ApiError::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        "timeout_error",
                        "the upstream stream went idle for longer than idle_timeout",
                    )
                    .with_code("idle_timeout"),
                    ErrorClass::Timeout,
                ),
                Err(_) => s.deadline_passed(
                    &ApiError::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        "timeout_error",
                        "the request deadline passed while streaming",
                    )
                    .with_code("deadline_exceeded"),
                ),
            };
        };
        Some((Ok(out), s))
    })
}
