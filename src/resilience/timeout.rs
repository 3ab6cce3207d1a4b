//! Timeout layer: one upstream call gets `limit`, and never outlives the request deadline.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{timeout_at, Instant};
use tower::{Layer, Service};

use super::Attempt;
use crate::classify::{AttemptError, ErrorClass};

#[derive(Debug, Clone, Copy)]
pub struct TimeoutLayer {
    limit: Duration,
}

impl TimeoutLayer {
    pub fn new(limit: Duration) -> Self {
        TimeoutLayer { limit }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;
    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout {
            inner,
            limit: self.limit,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Timeout<S> {
    inner: S,
    limit: Duration,
}

impl<S, Req, R> Service<Req> for Timeout<S>
where
    S: Service<Req, Response = R, Error = AttemptError>,
    Req: Attempt,
{
    type Response = R;
    type Error = AttemptError;
    type Future = TimeoutFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), AttemptError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let started = Instant::now();
        let own_limit = started + self.limit;
        let deadline = req.deadline().min(own_limit);
        let cut_by_request = req.deadline() < own_limit;
        TimeoutFuture {
            inner: timeout_at(deadline, self.inner.call(req)),
            waited: deadline.saturating_duration_since(started),
            cut_by_request,
        }
    }
}

pin_project! {
    /// The inner call, failed with a `timeout` error when its deadline passes.
    pub struct TimeoutFuture<F> {
        #[pin]
        inner: tokio::time::Timeout<F>,
        waited: Duration,
        cut_by_request: bool,
    }
}

impl<F, R> Future for TimeoutFuture<F>
where
    F: Future<Output = Result<R, AttemptError>>,
{
    type Output = Result<R, AttemptError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match ready!(this.inner.poll(cx)) {
            Ok(r) => Poll::Ready(r),
            Err(_) => {
                let mut e = AttemptError::new(
                    ErrorClass::Timeout,
                    format!("no answer within {} ms", this.waited.as_millis()),
                );
                e.deadline_cut = *this.cut_by_request;
                Poll::Ready(Err(e))
            }
        }
    }
}
