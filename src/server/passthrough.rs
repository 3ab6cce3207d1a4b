//! Pass-through for the `/v1/*` paths cascade does not serve itself (`/v1/files`,
//! `/v1/batches`, `/v1/moderations`, `/v1/audio/*`, ...): forwarded to
//! `server.passthrough` unchanged (method, path, query, status), bodies streamed both
//! ways, hop-by-hop headers dropped and the caller's credential replaced by the
//! provider's own.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use http::{header, HeaderMap, HeaderName, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::record::{Answered, Ledger};
use super::{error_response, AppState};
use crate::api::ApiError;
use crate::config::Provider;

/// A client whose request bodies stream (uploads are never held whole).
pub type StreamingClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Body>;

pub fn client() -> StreamingClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(std::time::Duration::from_secs(90))
        .pool_timer(TokioTimer::new())
        .build(crate::providers::client::https_connector())
}

/// Headers that belong to one connection, not to the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// The caller's credentials and cookies: never forwarded.
const CREDENTIALS: [HeaderName; 5] = [
    header::AUTHORIZATION,
    HeaderName::from_static("x-api-key"),
    HeaderName::from_static("api-key"),
    HeaderName::from_static("x-goog-api-key"),
    header::COOKIE,
];

/// How long the upstream may take to answer (its head), uploads included.
const HEAD_TIMEOUT_FLOOR: std::time::Duration = std::time::Duration::from_secs(600);

fn strip(headers: &mut HeaderMap) {
    // Headers named by `Connection` are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::try_from(n.trim()).ok())
        .collect();
    for name in HOP_BY_HOP.iter().chain(named.iter()) {
        headers.remove(name);
    }
    headers.remove(header::TRANSFER_ENCODING);
}

/// The upstream URL: the provider's base URL joined with the path (a base ending in
/// `/v1` takes the path after `/v1`), the query kept.
pub fn upstream_uri(p: &Provider, uri: &Uri) -> Result<Uri, String> {
    let base = p.base_url.as_str().trim_end_matches('/');
    let path = uri.path();
    // Dot segments (plain or percent-encoded) and empty ones could climb out of the
    // provider's base path with cascade's key attached.
    let lowered = path.to_ascii_lowercase().replace("%2e", ".");
    if lowered
        .split('/')
        .skip(1)
        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
        || lowered.contains("%2f")
        || lowered.contains("%5c")
    {
        return Err("the path has empty or dot segments".into());
    }
    let path = match base.ends_with("/v1") {
        true => path.strip_prefix("/v1").unwrap_or(path),
        false => path,
    };
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    format!("{base}{path}{query}")
        .parse()
        .map_err(|e| format!("{e}"))
}

/// The router's fallback: pass-through for `/v1/*` when configured, else a 404 that
/// says how to turn it on.
pub async fn forward(State(app): State<Arc<AppState>>, request: Request) -> http::Response<Body> {
    let Some(provider) = app.config().passthrough.clone() else {
        let hint = if request.uri().path().starts_with("/v1/") {
            " Set `server.passthrough: PROVIDER` to forward other /v1 paths to a provider."
        } else {
            ""
        };
        return error_response(
            &ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("Unknown endpoint {}.{hint}", request.uri().path()),
            )
            .with_code("not_found"),
        );
    };
    if !request.uri().path().starts_with("/v1/") {
        return error_response(
            &ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "Unknown endpoint.",
            )
            .with_code("not_found"),
        );
    }
    let start = tokio::time::Instant::now();
    let ledger = Ledger::new(&app, request.headers(), start, "passthrough");
    let (mut parts, body) = request.into_parts();
    let uri = match upstream_uri(&provider, &parts.uri) {
        Ok(u) => u,
        Err(e) => {
            return failed(
                ledger,
                StatusCode::BAD_REQUEST,
                format!("cannot forward this path: {e}"),
            )
        }
    };
    strip(&mut parts.headers);
    for name in &CREDENTIALS {
        parts.headers.remove(name);
    }
    // cascade's own request headers are for cascade.
    let own: Vec<HeaderName> = parts
        .headers
        .keys()
        .filter(|k| k.as_str().starts_with("x-cascade-"))
        .cloned()
        .collect();
    for name in own {
        parts.headers.remove(name);
    }
    parts.headers.remove(header::HOST);
    if let Some(host) = &provider.host {
        parts.headers.insert(header::HOST, host.clone());
    }
    if let Some((name, value)) = &provider.auth {
        parts.headers.insert(name.clone(), value.clone());
    }
    for (name, value) in &provider.extra_headers {
        parts.headers.insert(name.clone(), value.clone());
    }
    parts.uri = uri;
    let upstream = http::Request::from_parts(parts, body);
    // The answer's head must come within the request timeout (at least ten minutes:
    // the upload streams within it too); its body then streams.
    let sent = tokio::time::timeout(
        app.config().server.request_timeout.max(HEAD_TIMEOUT_FLOOR),
        app.passthrough.request(upstream),
    )
    .await;
    let resp = match sent {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            let msg = crate::providers::redact_key(&e.to_string(), provider.api_key.as_ref());
            return failed(
                ledger,
                StatusCode::BAD_GATEWAY,
                format!("the pass-through provider could not be reached: {msg}"),
            );
        }
        Err(_) => {
            return failed(
                ledger,
                StatusCode::GATEWAY_TIMEOUT,
                "the pass-through provider did not answer in time".into(),
            )
        }
    };
    let (mut parts, body) = resp.into_parts();
    strip(&mut parts.headers);
    parts.headers.remove(header::SET_COOKIE);
    ledger.finish(Answered {
        status: parts.status.as_u16(),
        model: None,
        attempts: 1,
        fallbacks: 0,
        ttft: None,
        usage: None,
        charged: false,
        error_type: None,
    });
    http::Response::from_parts(parts, Body::new(body))
}

fn failed(ledger: Ledger, status: StatusCode, message: String) -> http::Response<Body> {
    let e = ApiError::new(status, "server_error", message).with_code("passthrough_failed");
    ledger.finish(Answered::rejected(&e));
    error_response(&e)
}
