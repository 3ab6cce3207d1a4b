//! Shadow traffic: a sampled share of a chain's requests also runs on its backup
//! models, so their health data stays fresh, and each shadow answer is compared with
//! the one served.
//!
//! Shadow calls start once the served answer is committed (its first content, or the
//! whole answer) and run on their own tasks: they never delay, change or fail the
//! client's answer, and a client that leaves does not cancel them. Each goes through
//! its target's breaker, translation and timeouts, but never through the cache, never
//! retries, and takes nothing from the request's attempts or the retry and hedge
//! budgets. Its outcome feeds the target's breaker and health window like any call.
//! Cost is capped per chain and hour, concurrency per chain.

pub mod compare;

use crate::name::Name;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use tower::ServiceExt;

use crate::api::{ChatRequest, Usage};
use crate::classify::ErrorClass;
use arc_swap::ArcSwap;

use crate::config::{Chain, Config, Model, Target};
use crate::metrics::Metrics;
use crate::providers::StreamItem;
use crate::resilience::breaker::{Admission, BreakerState, CallResult};
use crate::routing::engine::{Answer, CommittedStream};
use crate::routing::target::{shadow_stack, Call, Launch, RequestCtx, StackShared, StreamEnding};
use crate::store::{round_usd, Row, ShadowRow, Store};
use compare::Summary;

/// How long shadow calls still in flight at shutdown may run before they are dropped.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// The served answer, as the comparison gets it: now (a complete answer), or when its
/// stream ends (`None` if it did not end complete).
pub enum Served {
    /// A complete answer's body (read off the request path, by the shadow task).
    Now {
        body: bytes::Bytes,
        latency_ms: f64,
    },
    Later(oneshot::Receiver<ServedStream>),
}

/// What a served stream sent: its chunks (read into a summary by the shadow task, off
/// the request path) and the output tokens of a usage chunk the client did not see.
#[derive(Default)]
pub struct ServedChunks {
    pub chunks: Vec<bytes::Bytes>,
    pub output_tokens: Option<u64>,
}

/// A served stream's answer when it ends (`None` unless complete), and its latency.
pub type ServedStream = (Option<ServedChunks>, f64);

/// The served stream's side: its chunks so far, and where they go at the end.
pub type StreamTap = (ServedChunks, oneshot::Sender<ServedStream>);

impl Served {
    async fn get(self) -> (Option<Summary>, Option<f64>) {
        match self {
            Served::Now { body, latency_ms } => {
                (Some(Summary::from_completion(&body)), Some(latency_ms))
            }
            Served::Later(rx) => match rx.await {
                Ok((chunks, latency_ms)) => {
                    let summary = chunks.map(|c| {
                        let mut s = Summary::default();
                        for chunk in &c.chunks {
                            s.push_chunk(chunk);
                        }
                        if c.output_tokens.is_some() {
                            s.output_tokens = c.output_tokens;
                        }
                        s
                    });
                    (summary, Some(latency_ms))
                }
                Err(_) => (None, None),
            },
        }
    }
}

/// Live shadow state of one chain.
/// A chain's name and its shadow state.
type Bound = (Name, Arc<ChainState>);

struct ChainState {
    rng: Mutex<rand::rngs::SmallRng>,
    inflight: AtomicUsize,
    spend: Mutex<Spend>,
}

/// This hour's shadow spend: what finished calls cost, and what running ones may cost.
#[derive(Default)]
struct Spend {
    hour: i64,
    spent: f64,
    reserved: f64,
}

impl Spend {
    fn roll(&mut self, now_ms: i64) {
        let hour = now_ms.div_euclid(3_600_000);
        if hour != self.hour {
            self.hour = hour;
            self.spent = 0.0;
        }
    }
}

pub struct Shadow {
    shared: StackShared,
    store: Option<Store>,
    metrics: Arc<Metrics>,
    /// By `Chain::index` of the config bound last; `None` for chains without shadow
    /// traffic.
    chains: ArcSwap<Vec<Option<Bound>>>,
    /// Shadow calls in flight across chains, and a wake-up when it reaches zero.
    inflight: Arc<(AtomicUsize, Notify)>,
    /// When shutdown began: the drain limit counts from the signal.
    shutdown_at: Mutex<Option<Instant>>,
}

impl Shadow {
    pub fn new(
        config: &Config,
        shared: StackShared,
        store: Option<Store>,
        metrics: Arc<Metrics>,
    ) -> Shadow {
        let shadow = Shadow {
            shared,
            store,
            metrics,
            chains: ArcSwap::from_pointee(Vec::new()),
            inflight: Arc::new((AtomicUsize::new(0), Notify::new())),
            shutdown_at: Mutex::new(None),
        };
        shadow.rebind(config);
        shadow
    }

    /// Binds the per-chain state (sampling, in-flight count, hourly spend) to a new
    /// config: a chain kept by a reload keeps its state, by name.
    pub fn rebind(&self, config: &Config) {
        let old = self.chains.load();
        let mut chains: Vec<Option<Bound>> = Vec::new();
        for chain in config.chains.values() {
            if chains.len() <= chain.index {
                chains.resize_with(chain.index + 1, || None);
            }
            if chain.shadow.is_none() {
                continue;
            }
            let kept = old
                .iter()
                .flatten()
                .find(|(name, _)| *name == chain.name)
                .map(|(_, s)| s.clone());
            let state = kept.unwrap_or_else(|| {
                let rng = match config.shadow_seed {
                    Some(seed) => {
                        rand::rngs::SmallRng::seed_from_u64(seed.wrapping_add(chain.index as u64))
                    }
                    None => rand::rngs::SmallRng::from_entropy(),
                };
                Arc::new(ChainState {
                    rng: Mutex::new(rng),
                    inflight: AtomicUsize::new(0),
                    spend: Mutex::new(Spend::default()),
                })
            });
            chains[chain.index] = Some((chain.name, state));
        }
        self.chains.store(Arc::new(chains));
    }

    /// The state of `chain`, if it belongs to the config bound last (a request still
    /// running on a replaced config finds its chain by name).
    fn state(&self, chain: &Chain) -> Option<Arc<ChainState>> {
        let chains = self.chains.load();
        match chains.get(chain.index).and_then(Option::as_ref) {
            Some((name, s)) if *name == chain.name => Some(s.clone()),
            _ => chains
                .iter()
                .flatten()
                .find(|(name, _)| *name == chain.name)
                .map(|(_, s)| s.clone()),
        }
    }

    /// Draws whether this request of `chain` is sampled.
    pub fn sampled(&self, chain: &Chain) -> bool {
        let (Some(plan), Some(state)) = (&chain.shadow, self.state(chain)) else {
            return false;
        };
        if plan.sample <= 0.0 {
            return false;
        }
        let draw: f64 = match state.rng.lock() {
            Ok(mut r) => r.gen(),
            Err(p) => p.into_inner().gen(),
        };
        draw < plan.sample
    }

    /// Starts the shadow calls of a sampled request served by `served_by`: one per
    /// shadow model but the one that served, skipping those whose breaker is open, past
    /// the chain's in-flight limit, or past its hourly cost cap. The pool names started,
    /// in config order.
    pub fn start(
        &self,
        chain: &Arc<Chain>,
        req: &Arc<ChatRequest>,
        request_id: &Arc<str>,
        served_by: &Arc<Model>,
        served_usage: Option<Usage>,
        served: Served,
    ) -> Vec<Name> {
        let (Some(plan), Some(state)) = (&chain.shadow, self.state(chain)) else {
            return Vec::new();
        };
        let estimate = estimated_usage(req, served_usage);
        let mut started = Vec::new();
        let mut launches = Vec::new();
        for target in &plan.targets {
            if Arc::ptr_eq(&target.model, served_by) {
                continue;
            }
            if target.model.breaker.state() == BreakerState::Open {
                self.skipped(chain, "breaker_open");
                continue;
            }
            if state.inflight.fetch_add(1, Ordering::AcqRel) >= plan.max_inflight {
                state.inflight.fetch_sub(1, Ordering::AcqRel);
                self.skipped(chain, "inflight");
                continue;
            }
            let reserve = target.model.cost_usd(&estimate);
            let within_cap = {
                let mut spend = lock(&state.spend);
                spend.roll(crate::clock::now_ms());
                let fits = plan
                    .max_cost_per_hour
                    .is_none_or(|cap| spend.spent + spend.reserved + reserve <= cap);
                if fits {
                    spend.reserved += reserve;
                }
                fits
            };
            if !within_cap {
                state.inflight.fetch_sub(1, Ordering::AcqRel);
                self.skipped(chain, "cost_cap");
                continue;
            }
            started.push(target.model.name);
            launches.push((target.clone(), reserve));
        }
        if launches.is_empty() {
            return started;
        }
        // The served answer is read once, by whichever call ends first.
        let served = Arc::new(ServedOnce {
            source: tokio::sync::Mutex::new(Some(served)),
            value: tokio::sync::OnceCell::new(),
        });
        for (target, reserve) in launches {
            self.inflight.0.fetch_add(1, Ordering::AcqRel);
            let release = Release {
                chain: state.clone(),
                all: self.inflight.clone(),
                reserve,
                cost: 0.0,
            };
            let row = Pending {
                row: Some(ShadowRow {
                    request_id: request_id.clone(),
                    started_ms: crate::clock::now_ms(),
                    chain: chain.name,
                    served_model: served_by.name,
                    shadow_model: target.model.name,
                    success: false,
                    error_type: Some("cancelled"),
                    latency_ms: None,
                    ttft_ms: None,
                    served_latency_ms: None,
                    length_ratio: None,
                    json_valid: None,
                    tool_calls_match: None,
                    similarity: None,
                    served_finish_reason: None,
                    shadow_finish_reason: None,
                    cost_usd: 0.0,
                }),
                store: self.store.clone(),
            };
            let job = Job {
                row,
                shared: self.shared.clone(),
                store: self.store.clone(),
                metrics: self.metrics.clone(),
                chain: chain.clone(),
                target,
                req: req.clone(),
                request_id: request_id.clone(),
                served: served.clone(),
            };
            tokio::spawn(job.run(release));
        }
        started
    }

    fn skipped(&self, chain: &Chain, reason: &'static str) {
        self.metrics
            .shadow_skipped_total
            .with_label_values(&[&chain.name, reason])
            .inc();
    }

    /// Shadow calls in flight, across chains.
    pub fn inflight(&self) -> usize {
        self.inflight.0.load(Ordering::Acquire)
    }

    /// Notes that shutdown began (the first call counts).
    pub fn note_shutdown(&self) {
        lock(&self.shutdown_at).get_or_insert_with(Instant::now);
    }

    /// Waits until no shadow call is in flight, or `limit` has passed since shutdown
    /// began (or since now); the calls left are then dropped with their runtime, and
    /// recorded as `cancelled`.
    pub async fn drain(&self, limit: Duration) {
        let (count, idle) = &*self.inflight;
        let until = lock(&self.shutdown_at).unwrap_or_else(Instant::now) + limit;
        let _ = tokio::time::timeout_at(until, async {
            loop {
                let notified = idle.notified();
                if count.load(Ordering::Acquire) == 0 {
                    return;
                }
                notified.await;
            }
        })
        .await;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// What a shadow call may cost before it ends: the served answer's tokens, or for a
/// stream not yet finished, the prompt's estimate and the request's output cap.
fn estimated_usage(req: &ChatRequest, served: Option<Usage>) -> Usage {
    // The shadow provider is unlikely to hold the served one's prompt cache.
    served
        .map(|u| Usage {
            cached_tokens: 0,
            ..u
        })
        .unwrap_or_else(|| {
            let prompt = req.estimated_prompt_tokens();
            let completion = req.max_tokens.unwrap_or(512);
            Usage {
                prompt_tokens: prompt,
                completion_tokens: completion,
                total_tokens: prompt + completion,
                cached_tokens: 0,
                reasoning_tokens: 0,
            }
        })
}

/// The served answer, read once and shared by the shadow calls of one request.
struct ServedOnce {
    source: tokio::sync::Mutex<Option<Served>>,
    value: tokio::sync::OnceCell<(Option<Summary>, Option<f64>)>,
}

impl ServedOnce {
    async fn get(&self) -> &(Option<Summary>, Option<f64>) {
        self.value
            .get_or_init(|| async {
                let source = self.source.lock().await.take();
                match source {
                    Some(s) => s.get().await,
                    None => (None, None),
                }
            })
            .await
    }
}

/// Gives back what a running shadow call held, however it ends: its place under the
/// chain's in-flight limit, its cost reservation (its real cost counted instead), and
/// its place in the drain count.
struct Release {
    chain: Arc<ChainState>,
    all: Arc<(AtomicUsize, Notify)>,
    reserve: f64,
    /// What the call really cost, once known.
    cost: f64,
}

impl Drop for Release {
    fn drop(&mut self) {
        self.chain.inflight.fetch_sub(1, Ordering::AcqRel);
        {
            let mut spend = lock(&self.chain.spend);
            spend.reserved = (spend.reserved - self.reserve).max(0.0);
            spend.roll(crate::clock::now_ms());
            spend.spent += self.cost;
        }
        if self.all.0.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.all.1.notify_waiters();
        }
    }
}

/// One shadow call, from its start to its `shadow_results` row.
struct Job {
    shared: StackShared,
    store: Option<Store>,
    metrics: Arc<Metrics>,
    chain: Arc<Chain>,
    target: Target,
    req: Arc<ChatRequest>,
    request_id: Arc<str>,
    served: Arc<ServedOnce>,
    /// Its `shadow_results` row, made when the call is started, so a call dropped even
    /// before its task first runs still leaves a `cancelled` row.
    row: Pending,
}

/// How the shadow call itself went.
struct Outcome {
    /// `Ok(summary)`, or the class it failed with.
    result: Result<Summary, &'static str>,
    usage: Option<Usage>,
    ttft: Option<Duration>,
    /// The provider answered (a 200), even if the answer then failed (cut, not JSON).
    answered: bool,
}

impl Job {
    async fn run(mut self, mut release: Release) {
        let start = Instant::now();
        let model = self.target.model.clone();
        let mut row = std::mem::replace(
            &mut self.row,
            Pending {
                row: None,
                store: None,
            },
        );
        let ctx = Arc::new(RequestCtx::for_request(
            start + self.chain.request_timeout,
            1,
            self.request_id.clone(),
            self.chain.name,
            self.store.clone(),
        ));
        let outcome = self.call(&ctx).await;
        let latency = start.elapsed();
        // The real cost when the provider reported usage; an answer that came but
        // cannot be priced is charged its reservation (it was likely billed).
        let cost = match (&outcome.usage, outcome.answered) {
            (Some(u), _) => round_usd(model.cost_usd(u)),
            (None, true) => release.reserve,
            (None, false) => 0.0,
        };
        release.cost = cost;
        // The call is over: its slot and reservation go back before the comparison
        // waits for the served stream.
        drop(release);
        drop(ctx);
        let waited = tokio::time::timeout(self.chain.request_timeout, self.served.get()).await;
        let (served, served_latency_ms) = waited.ok().cloned().unwrap_or((None, None));
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let labels = [&*self.chain.name, &*model.name];
        let Some(r) = row.row.as_mut() else {
            return;
        };
        r.latency_ms = Some(ms(latency));
        r.ttft_ms = outcome.ttft.map(ms);
        r.served_latency_ms = served_latency_ms;
        r.served_finish_reason = served.as_ref().and_then(|s| s.finish_reason.clone());
        r.cost_usd = if outcome.result.is_ok() { cost } else { 0.0 };
        match &outcome.result {
            Ok(shadow) => {
                r.success = true;
                r.error_type = None;
                r.shadow_finish_reason = shadow.finish_reason.clone();
                if let Some(served) = &served {
                    let c = compare::compare(served, shadow, self.req.wants_json);
                    r.length_ratio = c.length_ratio;
                    r.json_valid = c.json_valid;
                    r.tool_calls_match = c.tool_calls_match;
                    r.similarity = Some(c.similarity);
                    self.metrics
                        .shadow_similarity
                        .with_label_values(&labels)
                        .observe(c.similarity);
                }
            }
            Err(class) => {
                r.error_type = Some(class);
                if *class == ErrorClass::InvalidOutput.as_str() {
                    r.json_valid = Some(false);
                }
            }
        }
        let outcome_label = r.error_type.unwrap_or("ok");
        self.metrics
            .shadow_requests_total
            .with_label_values(&[labels[0], labels[1], outcome_label])
            .inc();
        if cost > 0.0 {
            self.metrics
                .shadow_cost_usd_total
                .with_label_values(&labels)
                .inc_by(cost);
        }
        row.write();
    }

    /// The call through the target's shadow stack; a stream is read to its end.
    async fn call(&self, ctx: &Arc<RequestCtx>) -> Outcome {
        let svc = shadow_stack(&self.shared, &self.chain, &self.target, self.req.stream);
        let call = Call {
            req: self.req.clone(),
            ctx: ctx.clone(),
            force: false,
            launch: Launch::Shadow,
            more_targets: false,
        };
        let start = Instant::now();
        match svc.oneshot(call).await {
            Ok(Answer::Complete(c)) => Outcome {
                result: Ok(Summary::from_completion(&c.body)),
                usage: c.usage,
                ttft: None,
                answered: true,
            },
            Ok(Answer::Stream(committed)) => {
                let ttft = start.elapsed();
                let mut out = read_stream(*committed, &self.target, ctx, self.req.wants_json).await;
                out.ttft = Some(ttft);
                out
            }
            Err(e) => Outcome {
                result: Err(e.class.as_str()),
                usage: None,
                ttft: None,
                // A judged 200 (not the JSON asked for) was billed.
                answered: e.status == Some(200),
            },
        }
    }
}

/// Reads a committed shadow stream to its end, then tells the target's breaker and
/// health window how it ended (as the served stream's body does) and settles the
/// call's record. A stream whose text is not the JSON asked for is a failed call.
async fn read_stream(
    committed: CommittedStream,
    target: &Target,
    ctx: &RequestCtx,
    wants_json: bool,
) -> Outcome {
    let model = &target.model;
    let mut summary = Summary::default();
    for chunk in &committed.head {
        summary.push_chunk(chunk);
    }
    let mut usage = None;
    let mut failure: Option<ErrorClass> = None;
    let mut deadline_cut = false;
    // Dropped mid-stream (shutdown past the drain limit): the call is cancelled.
    let mut unsettled = Unsettled {
        ctx,
        call: committed.call,
        armed: true,
    };
    if let Some(mut rest) = committed.rest {
        let idle = target.policy.idle_timeout;
        loop {
            let limit = match idle {
                Some(i) => ctx.deadline.min(Instant::now() + i),
                None => ctx.deadline,
            };
            match tokio::time::timeout_at(limit, rest.next()).await {
                Ok(Some(Ok(StreamItem::Chunk { data, usage: u, .. }))) => {
                    if u.is_some() {
                        usage = u;
                    }
                    summary.push_chunk(&data);
                }
                Ok(Some(Ok(StreamItem::Usage(u)))) => {
                    summary.output_tokens = Some(u.completion_tokens);
                    usage = Some(u);
                }
                Ok(Some(Ok(StreamItem::Done))) => break,
                Ok(None)
                    if summary.finish_reason.is_some() && rest.eof_after_finish_is_complete() =>
                {
                    break
                }
                Ok(None) => {
                    failure = Some(ErrorClass::Transient);
                    break;
                }
                Ok(Some(Err(e))) => {
                    failure = Some(e.class);
                    break;
                }
                Err(_) => {
                    // The request's own deadline is not the target's fault.
                    deadline_cut = limit >= ctx.deadline;
                    failure = Some(ErrorClass::Timeout);
                    break;
                }
            }
        }
    }
    if let Some(u) = &usage {
        summary.output_tokens = Some(u.completion_tokens);
    }
    if failure.is_none()
        && wants_json
        && summary.tools.is_empty()
        && !compare::json_valid(&summary.text)
    {
        failure = Some(ErrorClass::InvalidOutput);
    }
    unsettled.armed = false;
    match failure {
        None => {
            model
                .breaker
                .record(Admission::Allowed, CallResult::Success);
            ctx.settle_stream(committed.call, usage, StreamEnding::Complete);
            Outcome {
                result: Ok(summary),
                usage,
                ttft: None,
                answered: true,
            }
        }
        Some(class) => {
            if crate::resilience::breaker::counts_against_target(class) && !deadline_cut {
                model.breaker.record(
                    Admission::Allowed,
                    CallResult::Failure { retry_after: None },
                );
                model.health.record_failure();
            }
            ctx.settle_stream(
                committed.call,
                usage,
                StreamEnding::Failed {
                    class,
                    deadline_cut,
                },
            );
            Outcome {
                result: Err(class.as_str()),
                usage,
                ttft: None,
                answered: true,
            }
        }
    }
}

/// Settles a committed shadow call as cancelled if its stream is dropped unread.
struct Unsettled<'a> {
    ctx: &'a RequestCtx,
    call: usize,
    armed: bool,
}

impl Drop for Unsettled<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.ctx
                .settle_stream(self.call, None, StreamEnding::ClientGone);
        }
    }
}

/// The shadow call's row, written once: when the comparison is done, or as
/// `cancelled` if the call is dropped first (shutdown after the drain limit).
struct Pending {
    row: Option<ShadowRow>,
    store: Option<Store>,
}

impl Pending {
    fn write(&mut self) {
        if let (Some(row), Some(store)) = (self.row.take(), &self.store) {
            store.record(Row::Shadow(Box::new(row)));
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.write();
    }
}
