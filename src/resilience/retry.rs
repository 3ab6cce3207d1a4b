//! Retry layer: the one place where a target is retried. Exponential backoff with full
//! jitter, Retry-After honoured, and three limits: the per-request attempt budget, the
//! request deadline (and `max_retry_wait`), and the gateway-wide retry budget.

use crate::name::Name;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus::{IntCounter, IntCounterVec};
use tokio::time::Instant;
use tower::{Layer, Service};

use super::backoff::Jitter;
use super::budget::Budget;
use super::Attempt;
use crate::classify::{Action, AttemptError, ErrorClass};

/// Same-target retry settings (resolved per chain target by the config).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetrySettings {
    pub max_retries: u32,
    pub base: Duration,
    pub cap: Duration,
    pub max_retry_wait: Duration,
}

/// When to retry the same target.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub settings: RetrySettings,
    /// Which classes are retried (`Action::Retry`).
    pub actions: [Action; ErrorClass::ALL.len()],
}

/// Shared, gateway-wide pieces of the retry layer.
#[derive(Clone)]
pub struct RetryShared {
    pub budget: Arc<Budget>,
    pub jitter: Arc<Jitter>,
    /// `cascade_retries_total{model,class}`.
    pub retries: IntCounterVec,
    /// `cascade_retry_budget_exhausted_total`.
    pub exhausted: IntCounter,
}

#[derive(Clone)]
pub struct RetryLayer {
    policy: RetryPolicy,
    shared: RetryShared,
    /// Metric label.
    model: Name,
}

impl RetryLayer {
    pub fn new(policy: RetryPolicy, shared: RetryShared, model: Name) -> Self {
        RetryLayer {
            policy,
            shared,
            model,
        }
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;
    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Retry<S> {
    inner: S,
    layer: RetryLayer,
}

impl<S, Req, R> Service<Req> for Retry<S>
where
    S: Service<Req, Response = R, Error = AttemptError> + Clone + Send + 'static,
    S::Future: Send + 'static,
    Req: Attempt,
    R: Send + 'static,
{
    type Response = R;
    type Error = AttemptError;
    type Future = Pin<Box<dyn Future<Output = Result<R, AttemptError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), AttemptError>> {
        // Readiness is checked per call (the inner stack is cloned for each try).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let mut inner = self.inner.clone();
        let layer = self.layer.clone();
        Box::pin(async move {
            let RetryLayer {
                policy,
                shared,
                model,
            } = layer;
            let mut retry = 0u32;
            let mut last: Option<AttemptError> = None;
            loop {
                if !req.take_attempt() {
                    let mut e = AttemptError::new(
                        ErrorClass::Transient,
                        "the request's attempt budget is spent",
                    );
                    e.not_sent = true;
                    return Err(last.unwrap_or(e));
                }
                let err = match inner.call(req.clone()).await {
                    Ok(r) => {
                        if retry == 0 {
                            shared.budget.deposit();
                        }
                        return Ok(r);
                    }
                    Err(e) => e,
                };
                if err.not_sent {
                    // Turned away before any call (an open breaker): the attempt is not
                    // spent, and a retry reports the failure that caused it.
                    req.refund_attempt();
                    return Err(last.unwrap_or(err));
                }
                if retry == 0 {
                    shared.budget.deposit();
                }
                if policy.actions[err.class.index()] != Action::Retry
                    || retry >= policy.settings.max_retries
                    || err.deadline_cut
                    || (err.class == ErrorClass::Timeout && req.defer_timeouts())
                {
                    return Err(err);
                }
                let wait = match err.retry_after {
                    // A hint too far out: move on to the next target instead of waiting.
                    Some(hint) if hint > policy.settings.max_retry_wait => return Err(err),
                    Some(hint) => hint,
                    None => shared
                        .jitter
                        .backoff(policy.settings.base, policy.settings.cap, retry),
                };
                if Instant::now() + wait >= req.deadline() {
                    return Err(err);
                }
                if !shared.budget.try_withdraw() {
                    shared.exhausted.inc();
                    return Err(err);
                }
                shared
                    .retries
                    .with_label_values(&[&model, err.class.as_str()])
                    .inc();
                tokio::time::sleep(wait).await;
                retry += 1;
                last = Some(err);
            }
        })
    }
}
