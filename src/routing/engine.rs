//! The engine: the one fallback loop. It walks a chain in order under one request
//! deadline, records every attempt, and decides from each failure's class whether to
//! move on or stop.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use serde::Serialize;
use tokio::time::{timeout_at, Instant};

use crate::api::{ApiError, ChatRequest};
use crate::classify::{Action, ErrorClass};
use crate::config::{Chain, Model};
use crate::metrics::Metrics;
use crate::providers::openai::{ChunkStream, StreamItem};
use crate::providers::{self, AttemptError, Completion, Reply};

/// One upstream call, as reported in headers and error bodies.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub model: Arc<Model>,
    pub status: Option<u16>,
    /// `None` when the attempt succeeded.
    pub class: Option<ErrorClass>,
    pub latency: Duration,
    /// The upstream's hint for when to try again.
    pub retry_after: Option<Duration>,
}

/// A stream that has passed its commit point: `head` holds the chunks received so far
/// (the first content chunk last); `rest` continues from the upstream.
pub struct CommittedStream {
    pub head: Vec<Bytes>,
    pub rest: ChunkStream,
}

pub enum Answer {
    Complete(Completion),
    Stream(CommittedStream),
}

/// The result of running a request through its chain.
pub struct Outcome {
    pub attempts: Vec<AttemptRecord>,
    /// Chain positions moved past (0: the primary answered or failed alone).
    pub fallbacks: usize,
    /// Time spent waiting on upstreams.
    pub upstream_time: Duration,
    pub result: Result<(Arc<Model>, Answer), ApiError>,
}

pub struct Engine {
    http: reqwest::Client,
    metrics: Arc<Metrics>,
}

impl Engine {
    pub fn new(http: reqwest::Client, metrics: Arc<Metrics>) -> Self {
        Engine { http, metrics }
    }

    /// Runs `req` through `chain` until a target answers, a failure must be returned
    /// as is, the chain is exhausted, or `deadline` passes.
    pub async fn run(&self, chain: &Chain, req: &ChatRequest, deadline: Instant) -> Outcome {
        let mut attempts = Vec::with_capacity(chain.targets.len());
        let mut upstream_time = Duration::ZERO;
        let mut deadline_hit = false;
        let mut position = 0;

        for (pos, target) in chain.targets.iter().enumerate() {
            let now = Instant::now();
            if now >= deadline {
                deadline_hit = true;
                break;
            }
            position = pos;
            let attempt_deadline = deadline.min(now + target.attempt_timeout);
            let result = match timeout_at(attempt_deadline, self.attempt(target, req)).await {
                Ok(r) => r,
                Err(_) => {
                    deadline_hit = attempt_deadline == deadline;
                    Err(AttemptError::new(
                        ErrorClass::Timeout,
                        format!(
                            "no answer within {} ms",
                            attempt_deadline.duration_since(now).as_millis()
                        ),
                    ))
                }
            };
            let latency = now.elapsed();
            upstream_time += latency;
            self.metrics
                .upstream_duration
                .with_label_values(&[&target.name, &target.provider.name])
                .observe(latency.as_secs_f64());

            let err = match result {
                Ok(answer) => {
                    self.count_attempt(chain, target, "ok");
                    attempts.push(AttemptRecord {
                        model: target.clone(),
                        status: Some(200),
                        class: None,
                        latency,
                        retry_after: None,
                    });
                    return Outcome {
                        attempts,
                        fallbacks: pos,
                        upstream_time,
                        result: Ok((target.clone(), answer)),
                    };
                }
                Err(e) => e,
            };
            self.count_attempt(chain, target, err.class.as_str());
            tracing::debug!(chain = %chain.name, model = %target.name, class = err.class.as_str(), status = ?err.status, message = %err.message, "attempt failed");
            attempts.push(AttemptRecord {
                model: target.clone(),
                status: err.status,
                class: Some(err.class),
                latency,
                retry_after: err.retry_after,
            });
            if deadline_hit {
                break;
            }
            if err.class.action() == Action::Fail {
                let error = err
                    .client_error
                    .map(|e| *e)
                    .unwrap_or_else(|| ApiError::invalid_request(err.message.clone()));
                return Outcome {
                    attempts,
                    fallbacks: pos,
                    upstream_time,
                    result: Err(error),
                };
            }
            if let Some(next) = chain.targets.get(pos + 1) {
                self.metrics
                    .fallbacks_total
                    .with_label_values(&[&chain.name, &target.name, &next.name, err.class.as_str()])
                    .inc();
            }
        }

        let error = all_failed(&attempts, deadline_hit);
        Outcome {
            attempts,
            fallbacks: position,
            upstream_time,
            result: Err(error),
        }
    }

    fn count_attempt(&self, chain: &Chain, target: &Model, outcome: &str) {
        self.metrics
            .attempts_total
            .with_label_values(&[&chain.name, &target.name, &target.provider.name, outcome])
            .inc();
    }

    /// One call to one target; a stream is returned only once it has committed.
    async fn attempt(&self, target: &Model, req: &ChatRequest) -> Result<Answer, AttemptError> {
        match providers::call(&self.http, target, req).await? {
            Reply::Complete(c) => Ok(Answer::Complete(c)),
            // The stream's HTTP status was 2xx; what fails before the commit point fails with it.
            Reply::Stream(s) => until_commit(s).await.map(Answer::Stream).map_err(|mut e| {
                e.status.get_or_insert(200);
                e
            }),
        }
    }
}

/// Reads a stream until its first content chunk. Anything that goes wrong before that
/// is an ordinary attempt failure, so the chain can still fall back invisibly.
async fn until_commit(mut stream: ChunkStream) -> Result<CommittedStream, AttemptError> {
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
                if has_content {
                    head.push(data);
                    return Ok(CommittedStream { head, rest: stream });
                }
                match finish_reason.as_deref() {
                    Some("content_filter") => {
                        return Err(AttemptError::new(
                            ErrorClass::ContentPolicy,
                            "the answer was filtered",
                        ))
                    }
                    Some(_) => {
                        return Err(AttemptError::new(
                            ErrorClass::Empty,
                            "the upstream stream had no content",
                        ))
                    }
                    None => head.push(data),
                }
            }
        }
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
            class: a.class.map_or("ok", ErrorClass::as_str),
            latency_ms: a.latency.as_millis() as u64,
        })
        .collect();
    let summary = attempts
        .iter()
        .map(|a| {
            format!(
                "{} ({})",
                a.model.name,
                a.status
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| a.class.map_or("ok", ErrorClass::as_str).to_string())
            )
        })
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
