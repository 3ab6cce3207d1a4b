//! One chain target as a tower stack:
//!
//! `Retry -> Circuit -> Record -> Timeout -> Upstream`
//!
//! Retries wrap everything, so each try passes the breaker and gets its own timeout;
//! `Record` sits outside `Timeout` so a timed-out call is still recorded.

use crate::name::Name;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

use super::engine::{Answer, AttemptRecord, CommittedStream};
use crate::api::{ChatRequest, Usage};
use crate::classify::{AttemptError, ErrorClass};
use crate::config::{Chain, Chaos, Model};
use crate::metrics::Metrics;
use crate::providers::{self, Reply};
use crate::providers::{ChunkStream, StreamItem};
use crate::resilience::backoff::Jitter;
use crate::resilience::circuit::CircuitLayer;
use crate::resilience::retry::{RetryLayer, RetryPolicy, RetryShared};
use crate::resilience::timeout::TimeoutLayer;
use crate::resilience::Attempt;
use crate::store::{CallKind, CallRow, Row, Store};

/// State shared by every call made for one client request.
///
/// It also owns the request's call records: when the last handle goes (the answer
/// sent, the stream ended, or the client gone and every call dropped), each call
/// becomes one `model_calls` row. Calls still in flight at that point have already
/// pushed their `cancelled` record, since each call holds a handle.
pub struct RequestCtx {
    pub deadline: Instant,
    attempts_left: AtomicU32,
    trace: Mutex<Trace>,
    pub request_id: Arc<str>,
    pub chain: Name,
    store: Option<Store>,
}

#[derive(Default)]
struct Trace {
    records: Vec<AttemptRecord>,
    /// Chain positions called so far, to tell a retry from a first call.
    started: Vec<usize>,
}

impl std::fmt::Debug for RequestCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestCtx")
            .field("request_id", &self.request_id)
            .field("chain", &self.chain)
            .finish_non_exhaustive()
    }
}

impl RequestCtx {
    pub fn new(deadline: Instant, max_attempts: u32) -> Self {
        Self::for_request(deadline, max_attempts, "".into(), Name::new(""), None)
    }

    /// The context of request `request_id` on `chain`; its calls go to `store`.
    pub fn for_request(
        deadline: Instant,
        max_attempts: u32,
        request_id: Arc<str>,
        chain: Name,
        store: Option<Store>,
    ) -> Self {
        RequestCtx {
            deadline,
            attempts_left: AtomicU32::new(max_attempts),
            trace: Mutex::new(Trace::default()),
            request_id,
            chain,
            store,
        }
    }

    pub fn attempts_left(&self) -> u32 {
        self.attempts_left.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Trace> {
        match self.trace.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// The calls made so far, in the order they ended.
    pub fn attempts(&self) -> Vec<AttemptRecord> {
        self.lock().records.clone()
    }

    /// Calls started so far (ended or not).
    pub fn calls_started(&self) -> usize {
        self.lock().started.len()
    }

    /// Notes a call to the target at `position`: its number in this request, and what
    /// kind of call it is.
    fn start_call(&self, position: usize, launch: Launch) -> (usize, CallKind) {
        let mut t = self.lock();
        let again = t.started.contains(&position);
        let call = t.started.len();
        t.started.push(position);
        let kind = match launch {
            _ if again => CallKind::Retry,
            Launch::First => CallKind::Primary,
            Launch::Next | Launch::LastResort => CallKind::Fallback,
            Launch::Race => CallKind::Race,
            Launch::Hedge => CallKind::Hedge,
            Launch::Shadow => CallKind::Shadow,
        };
        (call, kind)
    }

    /// Takes the calls recorded so far, to be written with their request's row; any
    /// that end later are written when the context goes.
    pub fn take_rows(&self) -> impl Iterator<Item = CallRow> + '_ {
        let records = std::mem::take(&mut self.lock().records);
        records
            .into_iter()
            .map(|r| r.row(&self.request_id, self.chain))
    }

    fn push(&self, record: AttemptRecord) {
        self.lock().records.push(record);
    }

    /// A committed stream ended: its call's record gets the whole stream's time and
    /// usage, and how it ended after the commit point.
    pub fn settle_stream(&self, call: usize, usage: Option<Usage>, end: StreamEnding) {
        let mut t = self.lock();
        if let Some(r) = t.records.iter_mut().find(|r| r.call == call) {
            r.latency = r.started_at.elapsed();
            r.usage = usage;
            match end {
                StreamEnding::Complete => {}
                StreamEnding::Failed {
                    class,
                    deadline_cut,
                } => {
                    r.class = Some(class);
                    r.deadline_cut = deadline_cut;
                }
                StreamEnding::ClientGone => r.cancelled = true,
            }
        }
    }
}

impl Drop for RequestCtx {
    fn drop(&mut self) {
        let Some(store) = &self.store else {
            return;
        };
        let records = std::mem::take(&mut self.lock().records);
        for r in records {
            store.record(Row::Call(r.row(&self.request_id, self.chain)));
        }
    }
}

/// How a committed stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnding {
    Complete,
    /// The upstream failed after the commit point (`deadline_cut`: the request's own
    /// deadline ended it).
    Failed {
        class: ErrorClass,
        deadline_cut: bool,
    },
    /// The client left before the end.
    ClientGone,
}

/// Why the engine starts a call, which decides its `model_calls.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launch {
    /// The request's first call.
    First,
    /// Moving on to a later target.
    Next,
    /// One of a race's other starters.
    Race,
    /// A hedge fired because the first answer was slow.
    Hedge,
    /// A shadow call, beside the served answer.
    Shadow,
    /// A target skipped for its open breaker, called as a half-open probe before the
    /// request gives up.
    LastResort,
}

/// The request type that flows through a target stack.
#[derive(Clone)]
pub struct Call {
    pub req: Arc<ChatRequest>,
    pub ctx: Arc<RequestCtx>,
    pub force: bool,
    pub launch: Launch,
    /// Targets after this one are still untried (see `Attempt::defer_timeouts`).
    pub more_targets: bool,
}

impl Attempt for Call {
    fn deadline(&self) -> Instant {
        self.ctx.deadline
    }

    fn take_attempt(&self) -> bool {
        self.ctx
            .attempts_left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
    }

    fn refund_attempt(&self) {
        self.ctx.attempts_left.fetch_add(1, Ordering::AcqRel);
    }

    fn force_breaker(&self) -> bool {
        self.force
    }

    fn defer_timeouts(&self) -> bool {
        self.more_targets
    }
}

/// Gateway-wide pieces every stack shares.
#[derive(Clone)]
pub struct StackShared {
    pub http: Arc<crate::providers::HttpClients>,
    pub metrics: Arc<Metrics>,
    pub retry: RetryShared,
    pub jitter: Arc<Jitter>,
}

/// Builds the stack for `target` in chain `chain`, ready to take one `Call`.
pub fn stack(
    shared: &StackShared,
    chain: &Chain,
    position: usize,
    streaming: bool,
) -> impl Service<Call, Response = Answer, Error = AttemptError, Future: Send> + Send {
    let target = &chain.targets[position];
    let policy = RetryPolicy {
        settings: target.policy.retry,
        actions: target.policy.actions,
    };
    let call_once = once(shared, chain, target, Some(position), streaming);
    RetryLayer::new(policy, shared.retry.clone(), target.model.name).layer(call_once)
}

/// One try at the target at `position` of `chain`, with no same-target retry (the
/// engine's second pass decides those itself).
pub fn single_call(
    shared: &StackShared,
    chain: &Chain,
    position: usize,
    streaming: bool,
) -> impl Service<Call, Response = Answer, Error = AttemptError, Future: Send> + Send {
    once(
        shared,
        chain,
        &chain.targets[position],
        Some(position),
        streaming,
    )
}

/// The stack of a shadow call to `target` for chain `chain`: the target's breaker,
/// record, timeouts and translation, and no retry (a shadow call is tried once, and
/// never takes from the request's attempts or the retry budget). Its outcome feeds the
/// target's breaker and health like any call; it is not counted in
/// `cascade_attempts_total`, which counts what requests cost.
pub fn shadow_stack(
    shared: &StackShared,
    chain: &Chain,
    target: &crate::config::Target,
    streaming: bool,
) -> impl Service<Call, Response = Answer, Error = AttemptError, Future: Send> + Send {
    once(shared, chain, target, None, streaming)
}

/// One try at `target`: `Circuit -> Record -> Timeout -> Upstream`. `position` is the
/// target's place in the chain, `None` for a shadow call.
fn once(
    shared: &StackShared,
    chain: &Chain,
    target: &crate::config::Target,
    position: Option<usize>,
    streaming: bool,
) -> impl Service<Call, Response = Answer, Error = AttemptError, Future: Send> + Send + Clone {
    let p = &target.policy;
    let limit = if streaming {
        p.first_token_timeout.min(p.attempt_timeout)
    } else {
        p.attempt_timeout
    };
    ServiceBuilder::new()
        .layer(CircuitLayer::new(target.model.breaker.clone()))
        .layer_fn(|inner| Record {
            inner,
            model: target.model.clone(),
            chain: (chain.name, chain.index, chain.uid),
            position: position.unwrap_or(usize::MAX),
            metrics: shared.metrics.clone(),
            count_attempts: position.is_some(),
        })
        .layer(TimeoutLayer::new(limit))
        .service(Upstream {
            http: shared.http.clone(),
            model: target.model.clone(),
            idle_timeout: p.idle_timeout,
            jitter: shared.jitter.clone(),
        })
}

/// Runs one call through a stack.
pub async fn run_stack<S>(stack: S, call: Call) -> Result<Answer, AttemptError>
where
    S: Service<Call, Response = Answer, Error = AttemptError>,
{
    stack.oneshot(call).await
}

/// The innermost service: one upstream call; a stream comes back once committed.
#[derive(Clone)]
pub struct Upstream {
    http: Arc<crate::providers::HttpClients>,
    model: Arc<Model>,
    idle_timeout: Option<Duration>,
    jitter: Arc<Jitter>,
}

impl Service<Call> for Upstream {
    type Response = Answer;
    type Error = AttemptError;
    type Future = Pin<Box<dyn Future<Output = Result<Answer, AttemptError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), AttemptError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let mut cut_stream = false;
            if let Some(chaos) = this.model.chaos {
                if let Some(e) = inject(&chaos, &this.jitter).await {
                    return Err(e);
                }
                cut_stream = chaos.cut_stream > 0.0 && this.jitter.next_unit() < chaos.cut_stream;
            }
            match providers::call(this.http.local(), &this.model, &call.req).await? {
                Reply::Complete(c) => Ok(Answer::Complete(c)),
                // The stream's status was 2xx; what fails before the commit point fails with it.
                Reply::Stream(s) => until_commit(s, this.idle_timeout)
                    .await
                    .map(|mut c| {
                        c.chaos_cut = cut_stream;
                        Answer::Stream(Box::new(c))
                    })
                    .map_err(|mut e| {
                        e.status.get_or_insert(200);
                        e
                    }),
            }
        })
    }
}

/// Chaos: with probability `rate`, wait `latency` and fail with `class`.
async fn inject(chaos: &Chaos, jitter: &Jitter) -> Option<AttemptError> {
    if jitter.next_unit() >= chaos.rate {
        return None;
    }
    if !chaos.latency.is_zero() {
        tokio::time::sleep(chaos.latency).await;
    }
    let mut e = AttemptError::new(
        chaos.class,
        format!("chaos: injected {}", chaos.class.as_str()),
    );
    if chaos.class == ErrorClass::RateLimited {
        e.status = Some(429);
    }
    Some(e)
}

/// Reads a stream until its first content chunk. Anything that goes wrong before that
/// is an ordinary attempt failure, so the chain can still fall back invisibly.
async fn until_commit(
    mut stream: Box<ChunkStream>,
    idle_timeout: Option<Duration>,
) -> Result<CommittedStream, AttemptError> {
    let mut head = Vec::new();
    loop {
        match stream.next().await {
            None => {
                return Err(AttemptError::new(
                    ErrorClass::Transient,
                    "the upstream stream ended before any content",
                ))
            }
            Some(Err(e)) => return Err(e),
            // Usage before any content: nothing to commit to yet.
            Some(Ok(StreamItem::Usage(_))) => {}
            Some(Ok(StreamItem::Done)) => {
                return Err(AttemptError::new(
                    ErrorClass::Empty,
                    "the upstream stream had no content",
                ))
            }
            Some(Ok(StreamItem::Chunk {
                data,
                has_content,
                finish_reason,
                ..
            })) => {
                head.push(data);
                if has_content {
                    return Ok(CommittedStream {
                        head,
                        rest: Some(stream),
                        idle_timeout,
                        chaos_cut: false,
                        head_finished: finish_reason.is_some(),
                        call: usize::MAX,
                    });
                }
                match finish_reason.as_deref() {
                    Some("content_filter") => {
                        let mut e =
                            AttemptError::new(ErrorClass::ContentPolicy, "the answer was filtered");
                        e.filtered = Some(head);
                        return Err(e);
                    }
                    Some(_) => {
                        return Err(AttemptError::new(
                            ErrorClass::Empty,
                            "the upstream stream had no content",
                        ))
                    }
                    None => {}
                }
            }
        }
    }
}

/// Records every upstream call: the request's trace, metrics and the health window.
#[derive(Clone)]
pub struct Record<S> {
    inner: S,
    model: Arc<Model>,
    /// The chain's name and `Chain::index`.
    chain: (Name, usize, u64),
    /// The target's position in the chain.
    position: usize,
    metrics: Arc<Metrics>,
    /// Count the call in `cascade_attempts_total` (not for shadow calls).
    count_attempts: bool,
}

impl<S> Service<Call> for Record<S>
where
    S: Service<Call, Response = Answer, Error = AttemptError>,
{
    type Response = Answer;
    type Error = AttemptError;
    type Future = RecordFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), AttemptError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let (number, kind) = call.ctx.start_call(self.position, call.launch);
        let recorder = Recorder {
            number,
            kind,
            started_ms: crate::clock::now_ms(),
            model: self.model.clone(),
            chain: self.chain,
            position: self.position,
            metrics: self.metrics.clone(),
            count_attempts: self.count_attempts,
            ctx: call.ctx.clone(),
            start: Instant::now(),
            done: false,
            last_resort: call.launch == Launch::LastResort,
        };
        RecordFuture {
            inner: self.inner.call(call),
            recorder,
        }
    }
}

pin_project! {
    /// The inner call; its recorder writes the record when it ends or is dropped.
    pub struct RecordFuture<F> {
        #[pin]
        inner: F,
        recorder: Recorder,
    }
}

impl<F> Future for RecordFuture<F>
where
    F: Future<Output = Result<Answer, AttemptError>>,
{
    type Output = Result<Answer, AttemptError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut result = ready!(this.inner.poll(cx));
        if let Ok(Answer::Stream(committed)) = &mut result {
            // Whoever ends the stream settles this call's record by its number.
            committed.call = this.recorder.number;
        }
        this.recorder.finish(&result);
        Poll::Ready(result)
    }
}

/// Writes one call's record when it ends, or, if the call is dropped first (a race or
/// hedge lost, the client left), a `cancelled` record.
struct Recorder {
    /// The call's number in its request.
    number: usize,
    kind: CallKind,
    /// Wall-clock start, for the store.
    started_ms: i64,
    model: Arc<Model>,
    chain: (Name, usize, u64),
    position: usize,
    metrics: Arc<Metrics>,
    count_attempts: bool,
    ctx: Arc<RequestCtx>,
    start: Instant,
    done: bool,
    last_resort: bool,
}

impl Recorder {
    fn finish(&mut self, result: &Result<Answer, AttemptError>) {
        self.done = true;
        let latency = self.start.elapsed();
        let model = &self.model;
        let mut record = self.record(latency);
        let outcome = match result {
            Ok(answer) => {
                let ttft = matches!(answer, Answer::Stream(_)).then_some(latency);
                self.metrics.observe_upstream(model, latency, ttft);
                model.health.record_success(latency, ttft);
                record.status = Some(200);
                record.ttft = ttft;
                if let Answer::Complete(c) = answer {
                    record.usage = c.usage;
                }
                "ok"
            }
            Err(e) => {
                self.metrics.observe_upstream(model, latency, None);
                if crate::resilience::breaker::counts_against_target(e.class) && !e.deadline_cut {
                    model.health.record_failure();
                }
                record.status = e.status;
                record.class = Some(e.class);
                record.retry_after = e.retry_after;
                record.deadline_cut = e.deadline_cut;
                e.class.as_str()
            }
        };
        self.push(record, outcome);
    }

    /// A record of this call, as if it ended now with no outcome yet.
    fn record(&self, latency: Duration) -> AttemptRecord {
        AttemptRecord {
            call: self.number,
            model: self.model.clone(),
            position: self.position,
            kind: self.kind,
            started_ms: self.started_ms,
            started_at: self.start,
            status: None,
            class: None,
            latency,
            ttft: None,
            retry_after: None,
            usage: None,
            cancelled: false,
            deadline_cut: false,
            last_resort: self.last_resort,
        }
    }

    fn push(&self, record: AttemptRecord, outcome: &str) {
        if self.count_attempts {
            let chain = (&self.chain.0, self.chain.1, self.chain.2);
            self.metrics
                .count_attempt(chain, self.position, &self.model, outcome);
        }
        self.ctx.push(record);
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if !self.done {
            let mut record = self.record(self.start.elapsed());
            record.cancelled = true;
            self.push(record, "cancelled");
        }
    }
}
