//! The error taxonomy. Every upstream outcome is classified once, at the provider
//! boundary; everything after that matches on `ErrorClass`, never on strings or statuses.

use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;

use crate::api::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// 5xx, overloaded, reset connection, malformed body.
    Transient,
    /// 429 with a chance of clearing soon.
    RateLimited,
    Timeout,
    ContextOverflow,
    ContentPolicy,
    /// 401/403 from the upstream: our key, not the caller's.
    Auth,
    /// Billing or quota exhausted.
    Quota,
    NotFound,
    /// The caller's request is invalid; it would fail anywhere.
    BadRequest,
    /// 200 with no content and no tool calls.
    Empty,
    /// JSON was asked for and the answer does not parse.
    InvalidOutput,
}

/// A failed attempt, classified once at the provider boundary.
#[derive(Debug, Clone)]
pub struct AttemptError {
    pub class: ErrorClass,
    /// The upstream HTTP status, when there was one.
    pub status: Option<u16>,
    pub message: String,
    /// The upstream's hint for when to try again.
    pub retry_after: Option<Duration>,
    /// For failures the caller must see as they are (fail-fast 4xx): the upstream error,
    /// already in OpenAI shape.
    pub client_error: Option<Box<ApiError>>,
    /// No upstream call was made (an open breaker turned it away).
    pub not_sent: bool,
    /// Cut short by the request's own deadline: not the target's fault.
    pub deadline_cut: bool,
    /// A content-filtered answer, in OpenAI format (the body, or a stream's chunks), kept
    /// so that the last target's refusal can be returned as it is.
    pub filtered: Option<Vec<Bytes>>,
}

impl AttemptError {
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        AttemptError {
            class,
            status: None,
            message: message.into(),
            retry_after: None,
            client_error: None,
            not_sent: false,
            deadline_cut: false,
            filtered: None,
        }
    }
}

/// What happens after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Retry the same target (within the retry policy and budgets), then move on.
    Retry,
    /// Move on to the next target in the chain.
    Next,
    /// Stop and return this error to the caller.
    Fail,
    /// Move on to the chain target at this position.
    JumpTo(usize),
}

impl ErrorClass {
    pub const ALL: [ErrorClass; 11] = [
        ErrorClass::Transient,
        ErrorClass::RateLimited,
        ErrorClass::Timeout,
        ErrorClass::ContextOverflow,
        ErrorClass::ContentPolicy,
        ErrorClass::Auth,
        ErrorClass::Quota,
        ErrorClass::NotFound,
        ErrorClass::BadRequest,
        ErrorClass::Empty,
        ErrorClass::InvalidOutput,
    ];

    pub fn from_name(name: &str) -> Option<ErrorClass> {
        Self::ALL.into_iter().find(|c| c.as_str() == name)
    }

    /// Position in `ALL`, for per-class tables.
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::RateLimited => "rate_limited",
            ErrorClass::Timeout => "timeout",
            ErrorClass::ContextOverflow => "context_overflow",
            ErrorClass::ContentPolicy => "content_policy",
            ErrorClass::Auth => "auth",
            ErrorClass::Quota => "quota",
            ErrorClass::NotFound => "not_found",
            ErrorClass::BadRequest => "bad_request",
            ErrorClass::Empty => "empty",
            ErrorClass::InvalidOutput => "invalid_output",
        }
    }

    /// The default action for this class.
    pub fn default_action(self) -> Action {
        match self {
            ErrorClass::Transient | ErrorClass::Timeout | ErrorClass::RateLimited => Action::Retry,
            ErrorClass::BadRequest => Action::Fail,
            _ => Action::Next,
        }
    }
}

/// Provider error codes that mean "the prompt is too long for this model".
const CONTEXT_CODES: &[&str] = &["context_length_exceeded", "exceed_context_size_error"];
/// Lower-case message fragments that mean the same, across providers.
const CONTEXT_MESSAGES: &[&str] = &[
    "maximum context length",
    "context length exceeded",
    "exceed context limit",
    "model's maximum context limit",
    "is longer than the model's context length",
    "input tokens exceed the configured limit",
    "exceeds the available context size",
    "exceeds the maximum number of tokens allowed",
    "prompt is too long",
    "context window",
];
const CONTENT_POLICY_CODES: &[&str] = &["content_filter", "content_policy_violation"];
const QUOTA_CODES: &[&str] = &[
    "insufficient_quota",
    "billing_error",
    "billing_hard_limit_reached",
];

/// Classifies a non-2xx upstream answer from its status and (OpenAI-shaped) error body.
pub fn classify_status(
    status: u16,
    code: Option<&str>,
    kind: Option<&str>,
    message: &str,
) -> ErrorClass {
    let code_or_type = |set: &[&str]| [code, kind].into_iter().flatten().any(|c| set.contains(&c));
    if code_or_type(QUOTA_CODES) || status == 402 {
        return ErrorClass::Quota;
    }
    match status {
        429 => ErrorClass::RateLimited,
        401 | 403 => ErrorClass::Auth,
        404 => ErrorClass::NotFound,
        408 => ErrorClass::Timeout,
        // Too big for this target; another may take it.
        413 => ErrorClass::ContextOverflow,
        400 | 422 => {
            let lower = message.to_ascii_lowercase();
            if code_or_type(CONTEXT_CODES) || CONTEXT_MESSAGES.iter().any(|m| lower.contains(m)) {
                ErrorClass::ContextOverflow
            } else if code_or_type(CONTENT_POLICY_CODES) {
                ErrorClass::ContentPolicy
            } else {
                ErrorClass::BadRequest
            }
        }
        409 | 425 => ErrorClass::Transient,
        s if s >= 500 => ErrorClass::Transient,
        // Any other status (410 Gone, 405, 415...) says this target cannot serve the
        // request as sent: move on. Only 400/422 are the caller's fault.
        _ => ErrorClass::NotFound,
    }
}

/// The longest wait a server hint is taken at; anything longer is read as this.
pub const MAX_HINT: Duration = Duration::from_secs(24 * 3600);

/// Seconds as a duration, never panicking, capped at `MAX_HINT`.
fn capped(secs: f64) -> Option<Duration> {
    if secs > MAX_HINT.as_secs_f64() {
        return Some(MAX_HINT);
    }
    Duration::try_from_secs_f64(secs).ok()
}

/// The server's hint for when to try again: `retry-after-ms`, `retry-after` (seconds or
/// HTTP date) or OpenAI's `x-ratelimit-reset-*` durations, in that order.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(ms) = get("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        if ms.is_finite() && ms >= 0.0 {
            return capped(ms / 1000.0);
        }
    }
    if let Some(v) = get("retry-after") {
        if let Ok(secs) = v.parse::<f64>() {
            if secs.is_finite() && secs >= 0.0 {
                return capped(secs);
            }
        }
        if let Ok(when) = httpdate_parse(v) {
            return Some(when);
        }
    }
    ["x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"]
        .into_iter()
        .filter_map(|h| get(h).and_then(parse_go_duration))
        .max()
}

/// An HTTP date in the future, as a duration from now.
fn httpdate_parse(v: &str) -> Result<Duration, ()> {
    let when = httpdate::parse_http_date(v).map_err(|_| ())?;
    Ok(when
        .duration_since(std::time::SystemTime::now())
        .unwrap_or(Duration::ZERO))
}

/// Go-style durations as OpenAI sends them: `12ms`, `1s`, `6m0s`, `1h2m3.5s`.
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let mut total = 0f64;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let value: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += value * scale;
        rest = &rest[unit_end..];
    }
    capped(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        assert_eq!(classify_status(500, None, None, ""), ErrorClass::Transient);
        assert_eq!(classify_status(529, None, None, ""), ErrorClass::Transient);
        assert_eq!(
            classify_status(429, Some("rate_limit_exceeded"), None, ""),
            ErrorClass::RateLimited
        );
        assert_eq!(
            classify_status(429, Some("insufficient_quota"), None, ""),
            ErrorClass::Quota
        );
        assert_eq!(classify_status(401, None, None, ""), ErrorClass::Auth);
        assert_eq!(classify_status(404, None, None, ""), ErrorClass::NotFound);
        assert_eq!(
            classify_status(400, None, None, "bad temperature"),
            ErrorClass::BadRequest
        );
        assert_eq!(classify_status(422, None, None, ""), ErrorClass::BadRequest);
        assert_eq!(classify_status(410, None, None, ""), ErrorClass::NotFound);
        assert_eq!(classify_status(415, None, None, ""), ErrorClass::NotFound);
        assert_eq!(
            classify_status(413, None, None, ""),
            ErrorClass::ContextOverflow
        );
        assert_eq!(
            classify_status(400, Some("context_length_exceeded"), None, ""),
            ErrorClass::ContextOverflow
        );
        assert_eq!(
            classify_status(
                400,
                None,
                None,
                "prompt is too long: 208656 tokens > 200000 maximum"
            ),
            ErrorClass::ContextOverflow
        );
        assert_eq!(
            classify_status(400, Some("content_filter"), None, ""),
            ErrorClass::ContentPolicy
        );
        assert_eq!(ErrorClass::BadRequest.default_action(), Action::Fail);
        assert_eq!(ErrorClass::Empty.default_action(), Action::Next);
        assert_eq!(ErrorClass::Transient.default_action(), Action::Retry);
        for (i, c) in ErrorClass::ALL.iter().enumerate() {
            assert_eq!(c.index(), i);
            assert_eq!(ErrorClass::from_name(c.as_str()), Some(*c));
        }
    }

    #[test]
    fn retry_after_headers() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", "7".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert("retry-after-ms", "1500".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(1500)));
        let mut h = HeaderMap::new();
        h.insert("x-ratelimit-reset-requests", "6m0s".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(360)));
        assert_eq!(parse_go_duration("12ms"), Some(Duration::from_millis(12)));
        assert_eq!(parse_go_duration("x"), None);
        let mut h = HeaderMap::new();
        h.insert("retry-after", "1e20".parse().unwrap());
        assert_eq!(retry_after(&h), Some(MAX_HINT), "no panic on absurd values");
        assert_eq!(parse_go_duration("99999999999999999999h"), Some(MAX_HINT));
    }
}
