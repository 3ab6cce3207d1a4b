//! Upstream error bodies, in every shape providers use, read into one classification:
//! OpenAI `{"error":{message,type,param,code}}`, Anthropic `{"type":"error","error":{type,message}}`,
//! Gemini `{"error":{code,message,status,details}}`, vLLM/Mistral `{"object":"error",...}`,
//! and plain text or HTML.

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use super::{redact, AttemptError};
use crate::api::ApiError;
use crate::classify::{classify_status, parse_go_duration, retry_after, ErrorClass};
use crate::config::Model;

const ERROR_BODY_LIMIT: usize = 64 * 1024;

#[derive(Deserialize, Default)]
struct Envelope {
    error: Option<Fields>,
    message: Option<String>,
    #[serde(rename = "type")]
    kind: Option<Value>,
    code: Option<Value>,
}

#[derive(Deserialize, Default)]
struct Fields {
    message: Option<String>,
    #[serde(rename = "type")]
    kind: Option<Value>,
    param: Option<String>,
    code: Option<Value>,
    /// Gemini's canonical status name (`RESOURCE_EXHAUSTED`...); a number on Azure.
    status: Option<Value>,
    #[serde(default)]
    details: Vec<Value>,
    innererror: Option<Value>,
}

pub(crate) fn code_string(v: Option<Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// What an error body says, whatever its shape.
#[derive(Debug, Default, PartialEq)]
pub struct ErrorInfo {
    pub message: Option<String>,
    pub kind: Option<String>,
    pub param: Option<String>,
    pub code: Option<String>,
    /// A hint inside the body (Gemini `RetryInfo.retryDelay`).
    pub retry_after: Option<Duration>,
    /// Provider-specific facts that change the class.
    pub override_class: Option<ErrorClass>,
}

pub fn parse(body: &[u8]) -> ErrorInfo {
    // Gemini's non-SSE stream errors come as a one-element array.
    let value: Value = match serde_json::from_slice(body) {
        Ok(Value::Array(mut a)) if !a.is_empty() => a.swap_remove(0),
        Ok(v) => v,
        Err(_) => return ErrorInfo::default(),
    };
    let env: Envelope = serde_json::from_value(value).unwrap_or_default();
    let Some(f) = env.error else {
        return ErrorInfo {
            message: env.message,
            kind: code_string(env.kind),
            code: code_string(env.code),
            ..Default::default()
        };
    };
    let mut info = ErrorInfo {
        message: f.message,
        kind: code_string(f.kind).or(f
            .status
            .filter(Value::is_string)
            .and_then(|v| code_string(Some(v)))),
        param: f.param,
        code: code_string(f.code),
        ..Default::default()
    };
    if f.innererror
        .as_ref()
        .and_then(|i| i.get("code"))
        .and_then(Value::as_str)
        == Some("ResponsibleAIPolicyViolation")
    {
        info.override_class = Some(ErrorClass::ContentPolicy);
    }
    for d in &f.details {
        let kind = d.get("@type").and_then(Value::as_str).unwrap_or_default();
        if kind.ends_with("RetryInfo") {
            info.retry_after = d
                .get("retryDelay")
                .and_then(Value::as_str)
                .and_then(parse_go_duration);
        } else if kind.ends_with("ErrorInfo")
            && d.get("reason").and_then(Value::as_str) == Some("API_KEY_INVALID")
        {
            info.override_class = Some(ErrorClass::Auth);
        } else if kind.ends_with("QuotaFailure") && d.to_string().contains("PerDay") {
            // A daily quota will not clear soon: move on rather than retry.
            info.override_class = Some(ErrorClass::Quota);
        }
    }
    info
}

/// Extra message fragments that mean quota or billing, across providers.
const QUOTA_MESSAGES: &[&str] = &[
    "credit balance is too low",
    "insufficient balance",
    "spend limit",
];

pub(crate) async fn from_response(
    resp: http::Response<hyper::body::Incoming>,
    model: &Model,
) -> AttemptError {
    let status = resp.status();
    let header_hint = retry_after(resp.headers());
    let body = super::client::read_body(resp.into_body(), Some(ERROR_BODY_LIMIT))
        .await
        .unwrap_or_default();
    classify(status.as_u16(), header_hint, &body, model)
}

/// Classifies an error answer from its status, retry hint and body.
pub fn classify(
    status: u16,
    header_hint: Option<Duration>,
    body: &[u8],
    model: &Model,
) -> AttemptError {
    let info = parse(body);
    let message = redact(
        &info.message.clone().unwrap_or_else(|| {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            if text.is_empty() || text.starts_with('<') {
                format!("upstream returned HTTP {status}")
            } else {
                text.chars().take(500).collect()
            }
        }),
        model,
    );
    let lower = message.to_ascii_lowercase();
    let class = info.override_class.unwrap_or_else(|| {
        if QUOTA_MESSAGES.iter().any(|m| lower.contains(m)) {
            ErrorClass::Quota
        } else {
            classify_status(status, info.code.as_deref(), info.kind.as_deref(), &message)
        }
    });
    let client_error = (class == ErrorClass::BadRequest).then(|| {
        let code = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::BAD_REQUEST);
        let mut e = ApiError::new(code, "invalid_request_error", message.clone());
        e.param = info.param.clone();
        e.code = info.code.clone();
        Box::new(e)
    });
    let mut e = AttemptError::new(class, message);
    e.status = Some(status);
    e.retry_after = header_hint.or(info.retry_after);
    e.client_error = client_error;
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_shape() {
        let openai = br#"{"error":{"message":"m","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#;
        let i = parse(openai);
        assert_eq!(
            (i.code.as_deref(), i.param.as_deref()),
            (Some("context_length_exceeded"), Some("messages"))
        );
        let anthropic = br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"},"request_id":"req_1"}"#;
        assert_eq!(parse(anthropic).kind.as_deref(), Some("overloaded_error"));
        let gemini = br#"{"error":{"code":429,"message":"quota","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"17s"}]}}"#;
        let i = parse(gemini);
        assert_eq!(i.retry_after, Some(Duration::from_secs(17)));
        assert_eq!(i.code.as_deref(), Some("429"));
        let key = br#"{"error":{"code":400,"message":"API key not valid","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID"}]}}"#;
        assert_eq!(parse(key).override_class, Some(ErrorClass::Auth));
        let vllm = br#"{"object":"error","message":"bad","type":"BadRequestError","param":null,"code":400}"#;
        assert_eq!(parse(vllm).code.as_deref(), Some("400"));
        let azure = br#"{"error":{"message":"filtered","type":null,"param":"prompt","code":"content_filter","status":400,"innererror":{"code":"ResponsibleAIPolicyViolation"}}}"#;
        assert_eq!(parse(azure).override_class, Some(ErrorClass::ContentPolicy));
        assert_eq!(parse(b"<html>bad gateway</html>"), ErrorInfo::default());
    }
}
