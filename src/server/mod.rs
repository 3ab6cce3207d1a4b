//! HTTP surface: routes, handlers, SSE encoding and response headers. Routing
//! decisions belong to `routing`; this module only translates to and from HTTP.

mod admin;
mod admin_access;
pub mod balance;
pub use admin::{read_report, report_query, start_scheduled_report};
mod chat;
mod console;
pub mod drain;
pub mod explain;
mod history;
mod passthrough;
mod record;
pub mod reload;
mod request_id;
mod responses;
mod sse;

use std::future::Future;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::Request;
use axum::extract::State;
use axum::http::{header, HeaderValue, Response, StatusCode};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;

use crate::api::ApiError;
use crate::cache::ResponseCache;
use crate::config::{Config, Scheduler};
use crate::metrics::Metrics;
use crate::providers;
use crate::resilience::registry::TargetRegistry;
use crate::routing::engine::Engine;
use crate::shadow::Shadow;
use crate::store::{OpenError, Store};
use arc_swap::ArcSwap;

/// Everything a handler needs, built once at startup.
pub struct AppState {
    /// The config in use and what is derived from it, swapped whole by a reload. A
    /// request loads it once and keeps that snapshot to its end.
    live: ArcSwap<Live>,
    /// Each target's breaker and health window, kept across reloads.
    targets: TargetRegistry,
    /// The file a reload reads (`None` for a config built from text, in tests).
    config_path: Option<std::path::PathBuf>,
    /// One reload at a time.
    reloading: tokio::sync::Mutex<()>,
    /// Shutdown: readiness, and the end of the drain.
    pub drain: Arc<drain::Drain>,
    pub engine: Engine,
    pub cache: Arc<ResponseCache>,
    pub metrics: Arc<Metrics>,
    /// `None` with `store.enabled: false`.
    pub store: Option<Store>,
    pub shadow: Shadow,
    /// Responses kept for follow-up turns.
    pub responses: Arc<responses::ResponsesState>,
    /// For `server.passthrough`.
    passthrough: passthrough::StreamingClient,
    /// When the gateway started, for the scheduled report.
    pub started_ms: i64,
    /// The last reload, for `/admin/stats`.
    last_reload: std::sync::Mutex<Option<console::LastReload>>,
    /// Each model's last 30 minutes, for the status page.
    pub history: history::History,
    /// Request counts sampled by `/admin/stats`, for its requests per second.
    rate_samples: std::sync::Mutex<std::collections::VecDeque<(std::time::Instant, u64)>>,
}

/// One config generation: the validated config and the bodies built from it.
pub struct Live {
    pub config: Arc<Config>,
    models_body: Bytes,
    anthropic_models_body: Bytes,
}

impl Live {
    fn new(config: Arc<Config>) -> Live {
        Live {
            models_body: models_body(&config),
            anthropic_models_body: anthropic_models_body(&config),
            config,
        }
    }
}

impl AppState {
    /// Builds the state; opens the store (creating it) and fills each model's health
    /// window from the calls it recorded within `health.window`, so a restart forgets
    /// nothing it knew about its targets.
    pub fn new(config: Arc<Config>) -> Result<Arc<AppState>, OpenError> {
        Self::with_path(config, None)
    }

    /// [`AppState::new`] for a config read from `path`, which a reload reads again.
    pub fn with_path(
        config: Arc<Config>,
        path: Option<std::path::PathBuf>,
    ) -> Result<Arc<AppState>, OpenError> {
        let targets = TargetRegistry::default();
        let mut generation = targets.generation();
        for m in config.models.values() {
            generation.keep(m.target_key(), m.state());
        }
        generation.commit();
        let metrics = Arc::new(Metrics::for_config(&config));
        metrics.config_info(&config.hash);
        let store = match &config.store {
            Some(settings) => {
                let store = Store::open_lanes(
                    settings.clone(),
                    metrics.store.clone(),
                    worker_lanes(&config),
                )?;
                if store.open_at_start() {
                    admin::restore_health(&config, &settings.backend);
                }
                Some(store)
            }
            None => None,
        };
        let engine = Engine::new(
            providers::HttpClients::new(worker_lanes(&config)),
            metrics.clone(),
            &config,
        );
        let shadow = Shadow::new(
            &config,
            engine.shared().clone(),
            store.clone(),
            metrics.clone(),
        );
        let app = Arc::new(AppState {
            responses: Arc::new(responses::ResponsesState::new(
                &config.responses,
                store
                    .clone()
                    .zip(config.store.as_ref().map(|s| s.backend.clone())),
            )),
            passthrough: passthrough::client(),
            store,
            shadow,
            started_ms: crate::clock::now_ms(),
            last_reload: std::sync::Mutex::new(None),
            history: history::History::default(),
            rate_samples: std::sync::Mutex::default(),
            engine,
            cache: Arc::new(ResponseCache::new(&config.cache, metrics.clone())),
            live: ArcSwap::from_pointee(Live::new(config)),
            targets,
            config_path: path,
            reloading: tokio::sync::Mutex::new(()),
            drain: Arc::new(drain::Drain::default()),
            metrics,
        });
        if let Some(url) = app.config().state_redis_url.clone() {
            let targets =
                crate::resilience::fleet::targets_of(Arc::downgrade(&app), |a: &AppState| {
                    a.config()
                        .models
                        .values()
                        .map(|m| crate::resilience::fleet::SharedTarget {
                            id: m.target_key().id(),
                            breaker: m.breaker.clone(),
                            health: m.health.clone(),
                        })
                        .collect()
                });
            if let Err(e) =
                crate::resilience::fleet::start(&url, targets, app.metrics.state_errors.clone())
            {
                tracing::warn!(error = %e, "shared state: cannot start; each replica keeps its own breakers and health");
            }
        }
        history::start(&app);
        Ok(app)
    }

    /// The config generation in use now.
    pub fn live(&self) -> Arc<Live> {
        self.live.load_full()
    }

    /// The config in use now.
    pub fn config(&self) -> Arc<Config> {
        self.live.load().config.clone()
    }
}

/// Per-core workers each keep their own upstream pool, store lane and log buffer
/// (indexed by `workers::index()`); work stealing shares one of each.
pub fn worker_lanes(config: &Config) -> usize {
    match config.server.scheduler {
        Scheduler::PerCore => config.server.worker_threads,
        Scheduler::WorkStealing => 1,
    }
}

/// The main listener's routes. The admin endpoints and `/metrics` are here unless
/// `admin.listen` moves them to [`admin_router`] (`/metrics` stays with
/// `admin.metrics_on_main`); moved paths answer 404 here, never the pass-through.
pub fn router(state: Arc<AppState>) -> Router {
    let admin = state.config().admin.clone();
    let api = api_routes();
    let api = match admin.listen {
        None => api
            .route("/metrics", get(metrics))
            .route("/ui", get(console::page))
            .merge(admin_routes(&state)),
        Some(_) => {
            let api = api
                .route("/admin/{*rest}", axum::routing::any(not_here))
                .route("/ui", axum::routing::any(not_here));
            if admin.metrics_on_main {
                api.route("/metrics", get(metrics))
            } else {
                api.route("/metrics", axum::routing::any(not_here))
            }
        }
    };
    // `/admin` itself is no API path to pass through.
    api.route("/admin", axum::routing::any(not_here))
        .route("/admin/", axum::routing::any(not_here))
        .fallback(passthrough::forward)
        .with_state(state)
}

/// The admin listener's routes (`admin.listen`).
pub fn admin_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/ui", get(console::page))
        .merge(admin_routes(&state))
        .fallback(not_here)
        .with_state(state)
}

/// `/admin/*`, each behind the access guard.
fn admin_routes(state: &Arc<AppState>) -> Router<Arc<AppState>> {
    Router::new()
        .route("/admin/health", get(admin::health))
        .route("/admin/report", get(admin::report))
        .route("/admin/reload", post(reload::admin_reload))
        .route("/admin/chains", get(console::chains))
        .route("/admin/events", get(console::events))
        .route("/admin/stats", get(console::stats))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            admin_access::guard,
        ))
}

async fn not_here() -> Response<Body> {
    error_response(
        &ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", "Not found.")
            .with_code("not_found"),
    )
}

fn api_routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/responses", post(chat::responses))
        .route(
            "/v1/responses/{id}",
            get(responses::get_response).delete(responses::delete_response),
        )
        .route("/v1/messages", post(chat::messages))
        .route("/v1/embeddings", post(chat::embeddings))
        .route("/v1/messages/count_tokens", post(chat::count_tokens))
        .route("/v1/cascade/explain", post(explain::handler))
        .route("/v1/models", get(list_models))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

/// After the drain timeout, how long error events and 503s have to reach their
/// clients before the remaining connections are dropped.
const HARD_STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Serves the router on `listener` until `shutdown` resolves.
///
/// The middleware wraps the whole router once instead of going through
/// `Router::layer`, which boxes the layer around every route and clones those boxes on
/// each request.
pub async fn serve(
    state: Arc<AppState>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(state.clone());
    serve_router(state, nodelay(listener), app, shutdown).await
}

/// A listener whose connections send without Nagle's delay.
fn nodelay(
    listener: tokio::net::TcpListener,
) -> impl axum::serve::Listener<Addr = std::net::SocketAddr> {
    use axum::serve::ListenerExt;
    listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    })
}

/// Serves the admin router on `admin.listen`'s listener until the process ends.
pub async fn serve_admin(
    state: Arc<AppState>,
    listener: tokio::net::TcpListener,
) -> std::io::Result<()> {
    let app = admin_router(state.clone());
    serve_router(state, nodelay(listener), app, std::future::pending()).await
}

async fn serve_router(
    state: Arc<AppState>,
    listener: impl axum::serve::Listener<Addr = std::net::SocketAddr>,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = tower::ServiceBuilder::new()
        .map_response(|r: Response<_>| r.map(Body::new))
        .layer(request_id::RequestIdLayer)
        .layer(SetSensitiveRequestHeadersLayer::new([
            header::AUTHORIZATION,
            header::HeaderName::from_static("x-api-key"),
        ]))
        .layer(CatchPanicLayer::custom(|_| {
            error_response(&ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal error in the gateway",
            ))
        }))
        .service(router);
    let signalled = state.clone();
    let shutdown = async move {
        shutdown.await;
        signalled.shadow.note_shutdown();
    };
    // The peer's socket address, for the admin guard's loopback rule.
    // The peer address goes only on admin requests (the loopback check reads it):
    // `into_make_service_with_connect_info` would put it in every request's extensions,
    // an allocation on the hot path.
    let make = tower::service_fn(move |io: axum::serve::IncomingStream<'_, _>| {
        let peer: std::net::SocketAddr = *io.remote_addr();
        let svc =
            tower::ServiceExt::<Request>::map_request(app.clone(), move |mut req: Request| {
                if req.uri().path().starts_with("/admin") {
                    req.extensions_mut()
                        .insert(axum::extract::ConnectInfo(peer));
                }
                req
            });
        std::future::ready(Ok::<_, std::convert::Infallible>(svc))
    });
    let served = axum::serve(listener, make).with_graceful_shutdown(shutdown);
    // The end of the drain is a hard stop: what still holds a connection a moment
    // after it (a pass-through body, a client that stopped reading its stream) is cut.
    let stopped = state.drain.stopped();
    let served = tokio::select! {
        r = served => r,
        () = async {
            stopped.await;
            tokio::time::sleep(HARD_STOP_GRACE).await;
        } => {
            tracing::warn!("drain: connections still open after drain_timeout were closed");
            Ok(())
        }
    };
    // Shadow calls still running get a little longer; then they are dropped (and
    // recorded as cancelled) with the runtime.
    state.shadow.drain(crate::shadow::DRAIN_LIMIT).await;
    served
}

/// The listening socket, with a backlog of 1,024 (std's `bind` keeps 128, short for a
/// burst of new connections).
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Serves on `listener` with `scheduler: per_core`: one worker thread per
/// `server.worker_threads`, each running [`serve`] on its own runtime over its own
/// handle of the same socket. A connection stays on the worker that accepted it; the
/// workers share new ones out evenly (`balance.rs`).
/// Blocks until `shutdown` resolves (polled on worker 0) and every worker has drained.
pub fn serve_per_core(
    state: Arc<AppState>,
    listener: std::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let workers = state.config().server.worker_threads;
    // One handle per worker, and none kept here: the socket closes (new connections
    // are refused) once every worker has stopped accepting.
    let listeners: Vec<Option<std::net::TcpListener>> = (0..workers)
        .map(|_| listener.try_clone().map(Some))
        .collect::<std::io::Result<_>>()?;
    drop(listener);
    let listeners = std::sync::Mutex::new(listeners);
    let balance = balance::Balance::new(
        (0..workers)
            .map(|i| {
                state
                    .metrics
                    .worker_connections
                    .with_label_values(&[&i.to_string()])
            })
            .collect(),
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let shutdown = std::sync::Mutex::new(Some((shutdown, stop)));
    crate::workers::run(workers, move |i| {
        let state = state.clone();
        let balance = balance.clone();
        let listener = listeners
            .lock()
            .ok()
            .and_then(|mut l| l.get_mut(i).and_then(Option::take))
            .ok_or_else(|| std::io::Error::other("no listener for this worker"));
        let mut stopped = stopped.clone();
        let signal = if i == 0 {
            shutdown.lock().ok().and_then(|mut s| s.take())
        } else {
            None
        };
        async move {
            if let Some((signal, stop)) = signal {
                tokio::spawn(async move {
                    signal.await;
                    let _ = stop.send(true);
                });
            }
            let listener = balance::BalancedListener::new(listener?, balance, i)?;
            let app = router(state.clone());
            serve_router(state, listener, app, async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await
        }
    })
}

pub(crate) fn error_response(e: &ApiError) -> Response<Body> {
    surface_error(&crate::api::surface::Surface::Chat, e)
}

/// An error in a surface's own shape and status.
pub(crate) fn surface_error(
    surface: &crate::api::surface::Surface,
    e: &ApiError,
) -> Response<Body> {
    let (status, body) = surface.error(e);
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
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

/// Anthropic's model list: `{data: [{type, id, display_name, created_at}], has_more, ...}`.
fn anthropic_models_body(config: &Config) -> Bytes {
    let created = crate::clock::rfc3339_s(crate::clock::now_ms());
    let mut seen = std::collections::HashSet::new();
    let ids: Vec<&str> = config
        .routable_names()
        .filter(|n| seen.insert(*n))
        .collect();
    let data: Vec<serde_json::Value> = ids
        .iter()
        .map(|id| serde_json::json!({"type": "model", "id": id, "display_name": id, "created_at": created}))
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "data": data, "has_more": false, "first_id": ids.first(), "last_id": ids.last(),
    }))
    .unwrap_or_default()
    .into()
}

/// `GET /v1/models`, in Anthropic's shape when the request carries `anthropic-version`.
async fn list_models(State(app): State<Arc<AppState>>, headers: http::HeaderMap) -> Response<Body> {
    let live = app.live.load();
    if headers.contains_key("anthropic-version") {
        return json_response(live.anthropic_models_body.clone());
    }
    json_response(live.models_body.clone())
}

/// `cascade healthcheck`: one plain `GET url` over HTTP/1.1; `Ok` for a 200 within
/// `timeout`. Blocking, with no runtime: it runs as its own short process.
pub fn healthcheck(url: &str, timeout: std::time::Duration) -> Result<(), String> {
    use std::io::{Read, Write};
    let u = url::Url::parse(url).map_err(|e| format!("bad URL {url:?}: {e}"))?;
    if u.scheme() != "http" {
        return Err("only http:// URLs are supported".into());
    }
    let host = u.host_str().ok_or("the URL has no host")?;
    let port = u.port_or_known_default().unwrap_or(80);
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .map_err(|e| e.to_string())?
        .next()
        .ok_or("the host did not resolve")?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let path = match u.query() {
        Some(q) => format!("{}?{q}", u.path()),
        None => u.path().to_string(),
    };
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut head = [0u8; 64];
    let n = s.read(&mut head).map_err(|e| e.to_string())?;
    let line = String::from_utf8_lossy(&head[..n]);
    let status = line.split_whitespace().nth(1).unwrap_or("");
    if status == "200" {
        Ok(())
    } else {
        Err(format!(
            "{url} answered {:?}",
            line.lines().next().unwrap_or("")
        ))
    }
}

async fn healthz() -> Response<Body> {
    json_response(Bytes::from_static(br#"{"status":"ok"}"#))
}

async fn readyz(State(app): State<Arc<AppState>>) -> Response<Body> {
    // Not ready while shutting down, so a load balancer stops sending new requests.
    if app.drain.is_draining() {
        let mut r = json_response(Bytes::from_static(br#"{"status":"draining"}"#));
        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        return r;
    }
    // Ready once the config is loaded and at least one chain is routable.
    if app.config().models.is_empty() {
        let mut r = json_response(Bytes::from_static(br#"{"status":"not_ready"}"#));
        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        return r;
    }
    json_response(Bytes::from_static(br#"{"status":"ready"}"#))
}

async fn metrics(State(app): State<Arc<AppState>>) -> Response<Body> {
    app.metrics
        .cache_bytes
        .set(i64::try_from(app.cache.weighted_size().await).unwrap_or(i64::MAX));
    // Breaker states move with time (open -> half-open), so read them at scrape time.
    for (name, m) in &app.config().models {
        app.metrics
            .circuit_state
            .with_label_values(&[name])
            .set(m.breaker.state().gauge());
    }
    let m = &app.metrics;
    let lost = crate::log::dropped_lines();
    m.log_dropped
        .inc_by(lost.saturating_sub(m.log_dropped.get()));
    let mut resp = Response::new(Body::from(app.metrics.render()));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}
