//! Circuit-breaker layer: asks the target's `Breaker` before each call and reports
//! the outcome after it. A rejected call never reaches the upstream.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::{Layer, Service};

use super::breaker::{Admission, Breaker, CallResult};
use super::{Attempt, Settled};
use crate::classify::{AttemptError, ErrorClass};

#[derive(Debug, Clone)]
pub struct CircuitLayer {
    breaker: Arc<Breaker>,
}

impl CircuitLayer {
    pub fn new(breaker: Arc<Breaker>) -> Self {
        CircuitLayer { breaker }
    }
}

impl<S> Layer<S> for CircuitLayer {
    type Service = Circuit<S>;
    fn layer(&self, inner: S) -> Circuit<S> {
        Circuit {
            inner,
            breaker: self.breaker.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Circuit<S> {
    inner: S,
    breaker: Arc<Breaker>,
}

impl<S, Req, R> Service<Req> for Circuit<S>
where
    S: Service<Req, Response = R, Error = AttemptError>,
    S::Future: Send + 'static,
    Req: Attempt,
    R: Settled + Send + 'static,
{
    type Response = R;
    type Error = AttemptError;
    type Future = Pin<Box<dyn Future<Output = Result<R, AttemptError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), AttemptError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let admission = if req.force_breaker() {
            self.breaker.force()
        } else {
            self.breaker.admit()
        };
        if let Admission::Rejected { .. } = admission {
            let mut e = AttemptError::new(ErrorClass::Transient, "circuit breaker open");
            e.not_sent = true;
            return Box::pin(std::future::ready(Err(e)));
        }
        let breaker = self.breaker.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            // If this future is dropped (a race lost, the client left) the probe slot
            // must still be released.
            let mut guard = ProbeGuard {
                breaker: &breaker,
                admission: Some(admission),
            };
            let result = fut.await;
            let outcome = match &result {
                Ok(r) if r.settled() => CallResult::Success,
                // A stream that has only started reports its end itself.
                Ok(_) => CallResult::Neutral,
                Err(e) if e.deadline_cut => CallResult::Neutral,
                Err(e) => CallResult::of(Some(e.class), e.retry_after),
            };
            if let Some(a) = guard.admission.take() {
                breaker.record(a, outcome);
            }
            result
        })
    }
}

struct ProbeGuard<'a> {
    breaker: &'a Breaker,
    admission: Option<Admission>,
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if let Some(a) = self.admission.take() {
            self.breaker.record(a, CallResult::Neutral);
        }
    }
}
