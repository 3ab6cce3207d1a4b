//! Circuit-breaker layer: asks the target's `Breaker` before each call and reports
//! the outcome after it. A rejected call never reaches the upstream.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
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
    Req: Attempt,
    R: Settled,
{
    type Response = R;
    type Error = AttemptError;
    type Future = CircuitFuture<S::Future>;

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
            return CircuitFuture {
                inner: None,
                rejected: Some(e),
                guard: None,
            };
        }
        CircuitFuture {
            inner: Some(self.inner.call(req)),
            rejected: None,
            guard: Some(ProbeGuard {
                breaker: self.breaker.clone(),
                admission: Some(admission),
            }),
        }
    }
}

pin_project! {
    /// The admitted call, reporting its outcome to the breaker; or the breaker's
    /// refusal.
    pub struct CircuitFuture<F> {
        #[pin]
        inner: Option<F>,
        rejected: Option<AttemptError>,
        guard: Option<ProbeGuard>,
    }
}

impl<F, R> Future for CircuitFuture<F>
where
    F: Future<Output = Result<R, AttemptError>>,
    R: Settled,
{
    type Output = Result<R, AttemptError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(inner) = this.inner.as_pin_mut() else {
            let e = this.rejected.take();
            return Poll::Ready(Err(e.unwrap_or_else(|| {
                AttemptError::new(ErrorClass::Transient, "circuit breaker open")
            })));
        };
        let result = ready!(inner.poll(cx));
        let outcome = match &result {
            Ok(r) if r.settled() => CallResult::Success,
            // A stream that has only started reports its end itself.
            Ok(_) => CallResult::Neutral,
            Err(e) if e.deadline_cut => CallResult::Neutral,
            Err(e) => CallResult::of(Some(e.class), e.retry_after),
        };
        if let Some(guard) = this.guard.as_mut() {
            guard.record(outcome);
        }
        Poll::Ready(result)
    }
}

/// Holds an admitted call's slot: it reports the outcome once, or, if the call is
/// dropped first (a race lost, the client left), releases the slot as neutral.
struct ProbeGuard {
    breaker: Arc<Breaker>,
    admission: Option<Admission>,
}

impl ProbeGuard {
    fn record(&mut self, outcome: CallResult) {
        if let Some(a) = self.admission.take() {
            self.breaker.record(a, outcome);
        }
    }
}

impl Drop for ProbeGuard {
    fn drop(&mut self) {
        self.record(CallResult::Neutral);
    }
}
