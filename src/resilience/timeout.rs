//! Timeout layer: one upstream call gets `limit`, and never outlives the request deadline.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

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
    S::Future: Send + 'static,
    Req: Attempt,
{
    type Response = R;
    type Error = AttemptError;
    type Future = Pin<Box<dyn Future<Output = Result<R, AttemptError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), AttemptError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let now = Instant::now();
        let own_limit = now + self.limit;
        let deadline = req.deadline().min(own_limit);
        let cut_by_request = req.deadline() < own_limit;
        let fut = self.inner.call(req);
        Box::pin(async move {
            match timeout_at(deadline, fut).await {
                Ok(r) => r,
                Err(_) => {
                    let mut e = AttemptError::new(
                        ErrorClass::Timeout,
                        format!(
                            "no answer within {} ms",
                            deadline.duration_since(now).as_millis()
                        ),
                    );
                    e.deadline_cut = cut_by_request;
                    Err(e)
                }
            }
        })
    }
}
