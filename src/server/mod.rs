//! HTTP surface: routes, handlers, SSE encoding and response headers. Routing
//! decisions belong to `routing`; this module only translates to and from HTTP.

mod chat;
mod sse;

use std::future::Future;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderValue, Response, StatusCode};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;

use crate::api::ApiError;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::providers;
use crate::routing::engine::Engine;

/// Everything a handler needs, built once at startup.
pub struct AppState {
    pub config: Arc<Config>,
    pub engine: Engine,
    pub metrics: Arc<Metrics>,
    models_body: Bytes,
}

impl AppState {
    pub fn new(config: Arc<Config>) -> Arc<AppState> {
        let metrics = Arc::new(Metrics::new());
        Arc::new(AppState {
            engine: Engine::new(providers::http_client(), metrics.clone()),
            models_body: models_body(&config),
            config,
            metrics,
        })
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/models", get(list_models))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(state)
        .layer(CatchPanicLayer::custom(|_| {
            error_response(&ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal error in the gateway",
            ))
        }))
        .layer(SetSensitiveRequestHeadersLayer::new([
            header::AUTHORIZATION,
            header::HeaderName::from_static("x-api-key"),
        ]))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
}

/// Serves `router` on `listener` until `shutdown` resolves.
pub async fn serve(
    state: Arc<AppState>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

pub(crate) fn error_response(e: &ApiError) -> Response<Body> {
    let mut resp = Response::new(Body::from(e.body()));
    *resp.status_mut() = e.status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(secs) = e.retry_after {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

fn json_response(body: Bytes) -> Response<Body> {
    let mut resp = Response::new(Body::from(body));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn models_body(config: &Config) -> Bytes {
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut seen = std::collections::HashSet::new();
    let data: Vec<serde_json::Value> = config
        .routable_names()
        .filter(|n| seen.insert(*n))
        .map(|id| serde_json::json!({"id": id, "object": "model", "created": created, "owned_by": "cascade"}))
        .collect();
    serde_json::to_vec(&serde_json::json!({"object": "list", "data": data}))
        .unwrap_or_default()
        .into()
}

async fn list_models(State(app): State<Arc<AppState>>) -> Response<Body> {
    json_response(app.models_body.clone())
}

async fn healthz() -> Response<Body> {
    json_response(Bytes::from_static(br#"{"status":"ok"}"#))
}

async fn readyz(State(app): State<Arc<AppState>>) -> Response<Body> {
    // Ready once the config is loaded and at least one chain is routable.
    if app.config.models.is_empty() {
        let mut r = json_response(Bytes::from_static(br#"{"status":"not_ready"}"#));
        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        return r;
    }
    json_response(Bytes::from_static(br#"{"status":"ready"}"#))
}

async fn metrics(State(app): State<Arc<AppState>>) -> Response<Body> {
    let mut resp = Response::new(Body::from(app.metrics.render()));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

async fn not_found() -> Response<Body> {
    error_response(
        &ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "Unknown endpoint.",
        )
        .with_code("not_found"),
    )
}
