//! Upstream providers: translation to each wire format plus the client that sends it.
//! Every outcome leaves this module already classified (`AttemptError::class`);
//! the provider never decides about fallback.

pub mod openai;
pub mod sse;

use std::time::Duration;

use bytes::Bytes;

use crate::api::{ChatRequest, Usage};
pub use crate::classify::AttemptError;
use crate::classify::ErrorClass;
use crate::config::{Model, ProviderKind};

/// The shared HTTP client: one connection pool, `TCP_NODELAY`, never retries on its own.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(1024)
        .no_proxy()
        .build()
        .unwrap_or_else(|_| reqwest::Client::new())
}

/// A transport error from reqwest, classified.
pub(crate) fn transport_error(e: reqwest::Error) -> AttemptError {
    let class = if e.is_timeout() {
        ErrorClass::Timeout
    } else {
        ErrorClass::Transient
    };
    // Drop the URL: some providers' URLs identify accounts.
    let e = e.without_url();
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    AttemptError::new(class, msg)
}

/// A complete (non-streaming) answer, already in OpenAI format.
#[derive(Debug, Clone)]
pub struct Completion {
    pub body: Bytes,
    pub usage: Option<Usage>,
    pub finish_reason: Option<String>,
}

/// What an upstream call produced.
pub enum Reply {
    Complete(Completion),
    Stream(openai::ChunkStream),
}

/// One call to `model`'s provider. Translation and classification happen in here.
pub async fn call(
    http: &reqwest::Client,
    model: &Model,
    req: &ChatRequest,
) -> Result<Reply, AttemptError> {
    match model.provider.kind {
        ProviderKind::Openai | ProviderKind::OpenaiCompatible => {
            openai::call(http, model, req).await
        }
        kind => Err(AttemptError::new(
            ErrorClass::NotFound,
            format!(
                "provider kind {} is not supported by this build",
                kind.as_str()
            ),
        )),
    }
}

/// Reads at most `limit` bytes of an error body; the rest is dropped.
pub(crate) async fn read_limited(mut resp: reqwest::Response, limit: usize) -> Vec<u8> {
    let mut out = Vec::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        let room = limit.saturating_sub(out.len());
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if out.len() >= limit {
            break;
        }
    }
    out
}

/// Removes any provider key from text that may reach a client or a log.
pub(crate) fn redact(text: &str, model: &Model) -> String {
    match &model.provider.api_key {
        Some(k) if k.expose().len() >= 4 && text.contains(k.expose()) => {
            text.replace(k.expose(), "***")
        }
        _ => text.to_string(),
    }
}
