//! The engine: the one fallback loop. It orders a chain's targets by health (open
//! breakers skipped, degraded targets last), runs them by the chain's strategy
//! (sequential, race or hedge) under one request deadline and one attempt budget, and
//! decides from each failure's class whether to move on, jump, or stop.
//! Retries happen inside each target's stack (`target.rs`), never here.

use crate::name::Name;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use http::StatusCode;
use serde::Serialize;
use tokio::time::Instant;

use super::target::{run_stack, single_call, stack, Call, Launch, RequestCtx, StackShared};
use crate::api::{ApiError, ChatRequest, Usage};
use crate::classify::{Action, AttemptError, ErrorClass};
use crate::config::{Chain, Config, HedgeDelay, Model, Strategy, WhenAllOpen};
use crate::metrics::Metrics;
use crate::providers::ChunkStream;
use crate::providers::Completion;
use crate::resilience::backoff::Jitter;
use crate::resilience::breaker::BreakerState;
use crate::resilience::budget::Budget;
use crate::resilience::retry::RetryShared;
use crate::resilience::Attempt;
use crate::store::{CallKind, CallRow, Tokens};

/// One upstream call, as reported in headers, error bodies and the store.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    /// The call's number in its request (the order calls started).
    pub call: usize,
    pub model: Arc<Model>,
    /// The target's position in the chain.
    pub position: usize,
    pub kind: CallKind,
    /// Wall-clock start (Unix milliseconds), for the store.
    pub started_ms: i64,
    pub started_at: Instant,
    pub status: Option<u16>,
    /// `None` when the attempt succeeded.
    pub class: Option<ErrorClass>,
    /// To the answer, or for a committed stream to its commit point until the stream
    /// ends (then to its end).
    pub latency: Duration,
    /// Streams: time to the first content.
    pub ttft: Option<Duration>,
    /// The upstream's hint for when to try again.
    pub retry_after: Option<Duration>,
    pub usage: Option<Usage>,
    /// Dropped before it ended (a race or hedge lost, the client left).
    pub cancelled: bool,
    /// Cut by the request's own deadline rather than the target's fault.
    pub deadline_cut: bool,
    /// A last resort: called through its open breaker before the request gave up.
    pub last_resort: bool,
}

impl AttemptRecord {
    /// The error class as the store and logs name it: `None` for a success.
    pub fn error_type(&self) -> Option<&'static str> {
        if self.cancelled {
            Some("cancelled")
        } else {
            self.class.map(ErrorClass::as_str)
        }
    }

    /// This call as a `model_calls` row. A failed call costs nothing.
    pub fn row(&self, request_id: &Arc<str>, chain: Name) -> CallRow {
        let success = self.error_type().is_none();
        let tokens = self.usage.as_ref().map(Tokens::from);
        CallRow {
            started_ms: self.started_ms,
            request_id: request_id.clone(),
            chain,
            model: self.model.name,
            provider: self.model.provider.name,
            kind: self.kind,
            success,
            status: self.status,
            error_type: self.error_type(),
            latency_ms: self.latency.as_secs_f64() * 1000.0,
            ttft_ms: self.ttft.map(|t| t.as_secs_f64() * 1000.0),
            tokens,
            cost_usd: match (&self.usage, success) {
                (Some(u), true) => crate::store::round_usd(self.model.cost_usd(u)),
                _ => 0.0,
            },
            deadline_cut: self.deadline_cut,
        }
    }

    /// `ok`, the HTTP status of a failed call, or the class: the `x-cascade-trace` outcome.
    pub fn outcome(&self) -> String {
        let mut out = String::new();
        self.write_outcome(&mut out);
        out
    }

    /// Appends [`Self::outcome`] to `out`.
    pub fn write_outcome(&self, out: &mut String) {
        if self.cancelled {
            return out.push_str("cancelled");
        }
        match (self.class, self.status) {
            (None, _) => out.push_str("ok"),
            (Some(_), Some(s)) if !(200..300).contains(&s) => {
                out.push_str(itoa::Buffer::new().format(s))
            }
            (Some(c), _) => out.push_str(c.as_str()),
        }
    }
}

/// A stream that has passed its commit point: `head` holds the chunks received so far
/// (the first content chunk last); `rest` continues from the upstream, if anything is left.
pub struct CommittedStream {
    pub head: Vec<Bytes>,
    pub rest: Option<Box<ChunkStream>>,
    /// The longest gap allowed between chunks after the commit point.
    pub idle_timeout: Option<Duration>,
    /// Chaos: cut this stream after its head.
    pub chaos_cut: bool,
    /// A head chunk already carried a `finish_reason`.
    pub head_finished: bool,
    /// The committed call's number in its request's context (set by `Record`).
    pub call: usize,
}

pub enum Answer {
    Complete(Completion),
    Stream(Box<CommittedStream>),
}

impl crate::resilience::Settled for Answer {
    fn settled(&self) -> bool {
        matches!(self, Answer::Complete(_))
    }
}

/// The result of running a request through its chain.
pub struct Outcome {
    pub attempts: Vec<AttemptRecord>,
    /// Chain positions moved past (0: the first target tried answered or failed alone).
    pub fallbacks: usize,
    /// Time spent waiting on upstreams.
    pub upstream_time: Duration,
    pub result: Result<(Arc<Model>, Answer), ApiError>,
    /// Targets left out without a call.
    pub skipped: Vec<Skipped>,
}

pub struct Engine {
    shared: StackShared,
    hedge_budget: Budget,
}

/// Targets to try, as chain positions in the order to try them.
pub(crate) struct Plan {
    pub(crate) order: Vec<usize>,
    /// Every breaker was open: this target is called through its breaker.
    pub(crate) forced: Option<usize>,
    /// Targets left out without a call, and why (`capability`, `context_window`).
    pub(crate) skipped: Vec<Skipped>,
    /// Targets left out for an open breaker, soonest to reopen first: the last
    /// resort of a request that would otherwise fail.
    pub(crate) open: Vec<usize>,
}

/// A target the plan left out without calling it.
#[derive(Debug, Clone)]
pub struct Skipped {
    pub model: Arc<Model>,
    pub reason: &'static str,
}

/// How a walk over the targets ended without an answer.
struct Failure {
    /// Index in the plan of the last target tried.
    last: usize,
    /// Set when the error goes back as it is (fail fast).
    fail_fast: Option<Box<ApiError>>,
    /// The last failure, when it was a content-filtered answer: returned as it is.
    filtered: Option<(Arc<Model>, Vec<Bytes>)>,
    /// Ended by a class configured to `fail`: nothing more is tried.
    stopped: bool,
}

type Walk = Result<(usize, Arc<Model>, Answer), Failure>;

impl Engine {
    pub fn new(
        http: crate::providers::HttpClients,
        metrics: Arc<Metrics>,
        config: &Config,
    ) -> Self {
        let jitter = Arc::new(Jitter::new(config.jitter_seed));
        Engine {
            shared: StackShared {
                http: Arc::new(http),
                retry: RetryShared {
                    budget: Arc::new(Budget::new(config.retry_budget)),
                    jitter: jitter.clone(),
                    retries: metrics.retries_total.clone(),
                    exhausted: metrics.retry_budget_exhausted.clone(),
                },
                metrics,
                jitter,
            },
            hedge_budget: Budget::new(config.hedge_budget),
        }
    }

    fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// The pieces every target stack shares (for shadow calls).
    pub fn shared(&self) -> &StackShared {
        &self.shared
    }

    /// Runs `req` through `chain` until a target answers, a failure must be returned
    /// as is, the chain or the attempt budget is exhausted, or `deadline` passes.
    pub async fn run(
        &self,
        chain: &Chain,
        req: Arc<ChatRequest>,
        ctx: &Arc<RequestCtx>,
    ) -> Outcome {
        let deadline = ctx.deadline;
        let ctx = ctx.clone();
        let (walk, plan_order, skipped) = match plan(chain, &req) {
            Ok(mut plan) => {
                let mut walk = match chain.strategy {
                    Strategy::Sequential => self.sequential(chain, &plan, 0, &req, &ctx).await,
                    Strategy::Race { k } => self.race(chain, &plan, k, &req, &ctx).await,
                    Strategy::Hedge { delay } => self.hedge(chain, &plan, delay, &req, &ctx).await,
                };
                if let Err(f) = &walk {
                    if f.fail_fast.is_none() && f.filtered.is_none() && !f.stopped {
                        if let Some(answered) =
                            self.second_chance(chain, &mut plan, &req, &ctx).await
                        {
                            walk = Ok(answered);
                        }
                    }
                }
                (walk, plan.order, plan.skipped)
            }
            Err(failed) => {
                let (e, skipped) = *failed;
                return Outcome {
                    attempts: Vec::new(),
                    fallbacks: 0,
                    upstream_time: Duration::ZERO,
                    result: Err(e),
                    skipped,
                };
            }
        };
        let attempts = ctx.attempts();
        let upstream_time = attempts.iter().map(|a| a.latency).sum();
        // `x-cascade-fallbacks` counts chain positions, whatever order the plan used.
        let position = |i: usize| plan_order.get(i).copied().unwrap_or(0);
        let (fallbacks, result) = match walk {
            Ok((i, model, answer)) => (position(i), Ok((model, answer))),
            Err(Failure {
                last,
                filtered: Some((model, chunks)),
                ..
            }) => (
                position(last),
                Ok((model, filtered_answer(chunks, req.stream))),
            ),
            Err(Failure {
                last,
                fail_fast: Some(e),
                ..
            }) => (position(last), Err(*e)),
            Err(Failure { last, .. }) => (
                position(last),
                Err(all_failed(&attempts, Instant::now() >= deadline)),
            ),
        };
        Outcome {
            attempts,
            fallbacks,
            upstream_time,
            result,
            skipped,
        }
    }

    /// A walk that ran out of targets, before it gives up:
    /// 1. a second pass spends each target's unused same-target retries on failures
    ///    that retrying can fix (`transient`, `timeout`, `rate_limited` with a hint that
    ///    fits, and `empty`), one call at a time, within the retry budget;
    /// 2. a target skipped for its open breaker (the one that reopens soonest) is
    ///    called through it as a half-open probe.
    ///
    /// Both take from the request's attempts and stop at its deadline. In an outage
    /// the first pass has already spent the retries and the breakers are open, so this
    /// adds at most the one probe.
    async fn second_chance(
        &self,
        chain: &Chain,
        plan: &mut Plan,
        req: &Arc<ChatRequest>,
        ctx: &Arc<RequestCtx>,
    ) -> Option<(usize, Arc<Model>, Answer)> {
        for i in 0..plan.order.len() {
            let pos = plan.order[i];
            let policy = &chain.targets[pos].policy;
            let calls = ctx.attempts();
            let at: Vec<&AttemptRecord> = calls.iter().filter(|a| a.position == pos).collect();
            let Some(last) = at.iter().max_by_key(|a| a.call) else {
                continue;
            };
            let (Some(class), false) = (last.class, last.cancelled || last.deadline_cut) else {
                continue;
            };
            let fixable = match class {
                ErrorClass::Transient | ErrorClass::Timeout | ErrorClass::RateLimited => {
                    policy.action(class) == Action::Retry
                }
                ErrorClass::Empty => policy.action(class) == Action::Next,
                _ => false,
            } && last
                .retry_after
                .is_none_or(|h| h <= policy.retry.max_retry_wait);
            let used = u32::try_from(at.len().saturating_sub(1)).unwrap_or(u32::MAX);
            if !fixable || used >= policy.retry.max_retries {
                continue;
            }
            if chain.targets[pos].model.breaker.state() == BreakerState::Open {
                continue;
            }
            let ended = last.started_at + last.latency;
            let wait = last.retry_after.unwrap_or_else(|| {
                self.shared
                    .jitter
                    .backoff(policy.retry.base, policy.retry.cap, used)
            });
            let at_time = (ended + wait).max(Instant::now());
            if at_time >= ctx.deadline || ctx.attempts_left() == 0 {
                continue;
            }
            if !self.shared.retry.budget.try_withdraw() {
                self.shared.retry.exhausted.inc();
                continue;
            }
            self.shared
                .retry
                .retries
                .with_label_values(&[&chain.targets[pos].model.name, class.as_str()])
                .inc();
            tokio::time::sleep_until(at_time).await;
            if let Ok(answer) = self
                .call_once(chain, pos, false, req, ctx, Launch::Next)
                .await
            {
                return Some((i, chain.targets[pos].model.clone(), answer));
            }
        }
        if Instant::now() >= ctx.deadline || ctx.attempts_left() == 0 {
            return None;
        }
        // One probe per opening of a breaker, fleet traffic or not.
        let pos = plan
            .open
            .iter()
            .copied()
            .find(|&p| chain.targets[p].model.breaker.claim_last_resort())?;
        plan.order.push(pos);
        let i = plan.order.len() - 1;
        match self
            .call_once(chain, pos, true, req, ctx, Launch::LastResort)
            .await
        {
            Ok(answer) => Some((i, chain.targets[pos].model.clone(), answer)),
            Err(_) => None,
        }
    }

    /// One call to the target at `pos`, without same-target retries; `force` calls
    /// through an open breaker (as a half-open probe).
    async fn call_once(
        &self,
        chain: &Chain,
        pos: usize,
        force: bool,
        req: &Arc<ChatRequest>,
        ctx: &Arc<RequestCtx>,
        launch: Launch,
    ) -> Result<Answer, AttemptError> {
        let call = Call {
            req: req.clone(),
            ctx: ctx.clone(),
            force,
            launch,
            more_targets: false,
        };
        if !call.take_attempt() {
            return Err(AttemptError::new(
                ErrorClass::Transient,
                "the request's attempt budget is spent",
            ));
        }
        let svc = single_call(&self.shared, chain, pos, req.stream);
        let result = run_stack(svc, call.clone()).await;
        if result.as_ref().is_err_and(|e| e.not_sent) {
            call.refund_attempt();
        }
        result
    }

    fn call(
        &self,
        chain: &Chain,
        pos: usize,
        plan: &Plan,
        req: &Arc<ChatRequest>,
        ctx: &Arc<RequestCtx>,
        launch: Launch,
    ) -> impl std::future::Future<Output = Result<Answer, AttemptError>> + Send + 'static {
        let svc = stack(&self.shared, chain, pos, req.stream);
        run_stack(
            svc,
            Call {
                req: req.clone(),
                ctx: ctx.clone(),
                force: plan.forced == Some(pos),
                launch,
                more_targets: plan
                    .order
                    .iter()
                    .position(|&p| p == pos)
                    .is_some_and(|i| i + 1 < plan.order.len()),
            },
        )
    }

    /// One move from chain position `from` to `to`: counted, and one `warn` line.
    fn count_fallback(
        &self,
        chain: &Chain,
        ctx: &RequestCtx,
        (from, to): (usize, usize),
        e: &AttemptError,
    ) {
        let (from, to) = (
            &chain.targets[from].model.name,
            &chain.targets[to].model.name,
        );
        tracing::warn!(
            target: crate::log::FALLBACK,
            request_id = &*ctx.request_id,
            chain = &*chain.name,
            from = &**from,
            to = &**to,
            reason = e.class.as_str(),
            status = e.status,
            "fallback"
        );
        let class = e.class;
        self.metrics()
            .fallbacks_total
            .with_label_values(&[&chain.name, from, to, class.as_str()])
            .inc();
    }

    /// What to do after target `i` of the plan failed with `e`: `Ok(j)` to go on with
    /// plan index `j` (never below `at_least`), `Err` to stop. At the end of the chain a
    /// content-filtered answer is kept to be returned as it is.
    fn next_after(
        &self,
        chain: &Chain,
        plan: &Plan,
        i: usize,
        e: AttemptError,
        at_least: usize,
        ctx: &RequestCtx,
    ) -> Result<usize, Failure> {
        let pos = plan.order[i];
        let action = chain.targets[pos].policy.action(e.class);
        if action == Action::Fail {
            // The caller's own error goes back as the upstream said it; any other class
            // configured to `fail` ends the walk with the usual aggregate error.
            return Err(Failure {
                last: i,
                fail_fast: e.client_error,
                filtered: None,
                stopped: true,
            });
        }
        let next = match action {
            Action::JumpTo(target) => plan
                .order
                .iter()
                .position(|&p| p == target)
                .filter(|&j| j > i)
                .unwrap_or(i + 1),
            _ => i + 1,
        }
        .max(at_least);
        match plan.order.get(next) {
            Some(&to) => {
                self.count_fallback(chain, ctx, (pos, to), &e);
                Ok(next)
            }
            None => Err(Failure {
                last: i,
                fail_fast: None,
                filtered: e
                    .filtered
                    .filter(|_| e.class == ErrorClass::ContentPolicy)
                    .map(|f| (chain.targets[pos].model.clone(), f)),
                stopped: false,
            }),
        }
    }

    /// Tries targets one after another from plan index `from`.
    async fn sequential(
        &self,
        chain: &Chain,
        plan: &Plan,
        from: usize,
        req: &Arc<ChatRequest>,
        ctx: &Arc<RequestCtx>,
    ) -> Walk {
        let mut i = from;
        let mut last = from.saturating_sub(1);
        while i < plan.order.len() {
            if Instant::now() >= ctx.deadline || ctx.attempts_left() == 0 {
                break;
            }
            last = i;
            let pos = plan.order[i];
            let launch = if i == 0 { Launch::First } else { Launch::Next };
            match self.call(chain, pos, plan, req, ctx, launch).await {
                Ok(answer) => return Ok((i, chain.targets[pos].model.clone(), answer)),
                Err(e) => i = self.next_after(chain, plan, i, e, 0, ctx)?,
            }
        }
        Err(Failure {
            last,
            fail_fast: None,
            filtered: None,
            stopped: false,
        })
    }

    /// Starts the first `k` targets at once; the first answer wins and the others are
    /// cancelled (dropped). If all of them fail, the rest of the chain runs in order.
    async fn race(
        &self,
        chain: &Chain,
        plan: &Plan,
        k: usize,
        req: &Arc<ChatRequest>,
        ctx: &Arc<RequestCtx>,
    ) -> Walk {
        let k = k.min(plan.order.len());
        let mut racing: FuturesUnordered<_> = (0..k)
            .map(|i| {
                let launch = if i == 0 { Launch::First } else { Launch::Race };
                let fut = self.call(chain, plan.order[i], plan, req, ctx, launch);
                async move { (i, fut.await) }
            })
            .collect();
        let mut resume = k;
        while let Some((i, result)) = racing.next().await {
            let e = match result {
                Ok(answer) => return Ok((i, chain.targets[plan.order[i]].model.clone(), answer)),
                Err(e) => e,
            };
            if racing.is_empty() {
                // The last racer decides where the chain goes on (or how it ends).
                resume = self.next_after(chain, plan, i, e, k, ctx)?;
            } else if chain.targets[plan.order[i]].policy.action(e.class) == Action::Fail {
                return Err(self
                    .next_after(chain, plan, i, e, k, ctx)
                    .err()
                    .unwrap_or(Failure {
                        last: i,
                        fail_fast: None,
                        filtered: None,
                        stopped: true,
                    }));
            }
        }
        self.sequential(chain, plan, resume, req, ctx).await
    }

    /// Starts the first target; each time `delay` passes with no answer, starts the next
    /// one as a hedge (within the gateway-wide hedge budget). The first answer wins.
    /// A failure with nothing else in flight moves on to the next target at once.
    async fn hedge(
        &self,
        chain: &Chain,
        plan: &Plan,
        delay: HedgeDelay,
        req: &Arc<ChatRequest>,
        ctx: &Arc<RequestCtx>,
    ) -> Walk {
        let delay = match delay {
            HedgeDelay::Fixed(d) => d,
            HedgeDelay::P95 => chain.targets[plan.order[0]]
                .model
                .health
                .snapshot()
                .p95
                .unwrap_or(Duration::from_secs(1)),
        };
        self.hedge_budget.deposit();
        let hedges = &self.metrics().hedges_total;
        let mut inflight = FuturesUnordered::new();
        let launch = |i: usize, hedged: bool| {
            let why = match (i, hedged) {
                (0, _) => Launch::First,
                (_, true) => Launch::Hedge,
                _ => Launch::Next,
            };
            let fut = self.call(chain, plan.order[i], plan, req, ctx, why);
            async move { (i, hedged, fut.await) }
        };
        inflight.push(launch(0, false));
        let mut next = 1;
        let mut hedged_any = false;
        let mut hedging = true;
        let mut last = 0;
        let mut next_hedge = Instant::now() + delay;
        loop {
            let can_hedge = hedging && next < plan.order.len() && next_hedge < ctx.deadline;
            tokio::select! {
                Some((i, was_hedge, result)) = inflight.next() => match result {
                    Ok(answer) => {
                        if was_hedge {
                            hedges.with_label_values(&[&chain.name, "won"]).inc();
                        } else if hedged_any {
                            hedges.with_label_values(&[&chain.name, "lost"]).inc();
                        }
                        return Ok((i, chain.targets[plan.order[i]].model.clone(), answer));
                    }
                    Err(e) => {
                        last = last.max(i);
                        if inflight.is_empty() {
                            if Instant::now() >= ctx.deadline || ctx.attempts_left() == 0 {
                                break;
                            }
                            let j = self.next_after(chain, plan, i, e, next, ctx)?;
                            inflight.push(launch(j, false));
                            next = j + 1;
                            next_hedge = Instant::now() + delay;
                        } else if chain.targets[plan.order[i]].policy.action(e.class) == Action::Fail {
                            return Err(self.next_after(chain, plan, i, e, next, ctx).err().unwrap_or(Failure {
                                last: i,
                                fail_fast: None,
                                filtered: None,
                                stopped: true,
                            }));
                        }
                    }
                },
                _ = tokio::time::sleep_until(next_hedge), if can_hedge => {
                    if self.hedge_budget.try_withdraw() {
                        hedges.with_label_values(&[&chain.name, "fired"]).inc();
                        inflight.push(launch(next, true));
                        hedged_any = true;
                        next += 1;
                        next_hedge = Instant::now() + delay;
                    } else {
                        hedges.with_label_values(&[&chain.name, "denied"]).inc();
                        hedging = false;
                    }
                },
                else => break,
            }
        }
        Err(Failure {
            last,
            fail_fast: None,
            filtered: None,
            stopped: false,
        })
    }
}

/// The order to try a chain's targets in: open breakers skipped, degraded targets
/// last, and targets that cannot serve the request (a capability it needs, a context
/// window too small for the prompt) left out without a call.
/// The order a request meets `chain`'s targets in now. `routing::explain` reads the
/// same plan, so what it says is what a request does.
pub(crate) fn plan(
    chain: &Chain,
    req: &ChatRequest,
) -> Result<Plan, Box<(ApiError, Vec<Skipped>)>> {
    let needs_estimate = chain
        .targets
        .iter()
        .any(|t| t.model.context_window.is_some());
    let prompt_tokens = if needs_estimate {
        req.estimated_prompt_tokens()
    } else {
        0
    };
    let mut order = Vec::with_capacity(chain.targets.len());
    let mut degraded = Vec::new();
    let mut open = Vec::new();
    let mut too_small = 0;
    let mut skipped = Vec::new();
    let mut missing = None;
    for (pos, t) in chain.targets.iter().enumerate() {
        if let Some(cap) = t.model.capabilities.first_missing(req.needs) {
            missing.get_or_insert(cap);
            skipped.push(Skipped {
                model: t.model.clone(),
                reason: "capability",
            });
        } else if t.model.context_window.is_some_and(|w| prompt_tokens > w) {
            too_small += 1;
            skipped.push(Skipped {
                model: t.model.clone(),
                reason: "context_window",
            });
        } else if t.model.breaker.state() == BreakerState::Open {
            open.push(pos);
        } else if t.model.health.is_degraded() {
            degraded.push(pos);
        } else {
            order.push(pos);
        }
    }
    order.extend(degraded);
    open.sort_by_key(|&p| chain.targets[p].model.breaker.retry_at());
    if !order.is_empty() {
        return Ok(Plan {
            order,
            forced: None,
            skipped,
            open,
        });
    }
    if skipped.len() == chain.targets.len() {
        let e = match missing {
            Some(cap) if too_small == 0 => ApiError::invalid_request(format!(
                "The request needs `{cap}`, and no model in chain `{}` declares that capability.",
                chain.name
            ))
            .with_code("unsupported_capability"),
            Some(cap) => ApiError::invalid_request(format!(
                "No model in chain `{}` can serve the request: some lack the capability `{cap}`, the others' context windows are smaller than the prompt (about {prompt_tokens} tokens).",
                chain.name
            ))
            .with_code("unsupported_capability"),
            None => ApiError::invalid_request(format!(
                "The prompt (about {prompt_tokens} tokens) is larger than the context window of every model in chain `{}`.",
                chain.name
            ))
            .with_param("messages")
            .with_code("context_length_exceeded"),
        };
        return Err(Box::new((e, skipped)));
    }
    let soonest = open
        .iter()
        .copied()
        .min_by_key(|&p| chain.targets[p].model.breaker.retry_at())
        .unwrap_or(0);
    match chain.when_all_open {
        WhenAllOpen::TrySoonest => Ok(Plan {
            order: vec![soonest],
            forced: Some(soonest),
            skipped,
            open: open.into_iter().filter(|&p| p != soonest).collect(),
        }),
        WhenAllOpen::Fail => {
            let wait = chain.targets[soonest]
                .model
                .breaker
                .retry_at()
                .map(|t| t.saturating_duration_since(Instant::now()))
                .unwrap_or_default();
            let mut e = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "Every target in the chain has an open circuit breaker.",
            )
            .with_code("all_targets_open");
            e.retry_after = Some(wait.as_secs_f64().ceil().max(1.0) as u64);
            Err(Box::new((e, skipped)))
        }
    }
}

fn filtered_answer(chunks: Vec<Bytes>, stream: bool) -> Answer {
    if stream {
        Answer::Stream(Box::new(CommittedStream {
            head: chunks,
            rest: None,
            idle_timeout: None,
            chaos_cut: false,
            head_finished: true,
            call: usize::MAX,
        }))
    } else {
        Answer::Complete(Completion {
            body: chunks.into_iter().next().unwrap_or_default(),
            usage: None,
            finish_reason: Some("content_filter".into()),
            refused: true,
            native: None,
            answer: None,
        })
    }
}

#[derive(Serialize)]
struct AttemptJson<'a> {
    model: &'a str,
    provider: &'a str,
    status: Option<u16>,
    class: &'a str,
    latency_ms: u64,
}

/// The error for a chain where no target answered: 429 when every failure was a rate
/// limit, 504 when the deadline ran out, 502 otherwise.
fn all_failed(attempts: &[AttemptRecord], deadline_hit: bool) -> ApiError {
    let list: Vec<AttemptJson> = attempts
        .iter()
        .map(|a| AttemptJson {
            model: &a.model.name,
            provider: &a.model.provider.name,
            status: a.status,
            class: if a.cancelled {
                "cancelled"
            } else {
                a.class.map_or("ok", ErrorClass::as_str)
            },
            latency_ms: a.latency.as_millis() as u64,
        })
        .collect();
    let summary = attempts
        .iter()
        .map(|a| format!("{} ({})", a.model.name, a.outcome()))
        .collect::<Vec<_>>()
        .join(", ");
    let all_rate_limited = !attempts.is_empty()
        && attempts
            .iter()
            .all(|a| a.class == Some(ErrorClass::RateLimited));

    let mut error = if deadline_hit {
        ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout_error",
            format!("The request deadline passed before any target answered. Attempts: {summary}."),
        )
        .with_code("deadline_exceeded")
    } else if all_rate_limited {
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!("Every target in the chain is rate limited. Attempts: {summary}."),
        )
        .with_code("all_targets_failed");
        e.retry_after = Some(soonest_retry(attempts));
        e
    } else {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "server_error",
            format!("Every target in the chain failed. Attempts: {summary}."),
        )
        .with_code("all_targets_failed")
    };
    error.extra = serde_json::to_value(list).ok().map(Box::new);
    error
}

/// Whole seconds until the soonest rate-limited target may be tried again (at least 1).
fn soonest_retry(attempts: &[AttemptRecord]) -> u64 {
    attempts
        .iter()
        .filter_map(|a| a.retry_after)
        .min()
        .map(|d| d.as_secs_f64().ceil().max(1.0) as u64)
        .unwrap_or(1)
}
