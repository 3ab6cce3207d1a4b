//! Hot reload: read the config file again, validate it, and swap it in whole.
//!
//! Triggers: SIGHUP, `POST /admin/reload`, and a change to the file (watched through
//! its directory, so the rename and symlink swaps of an editor or of a Kubernetes
//! ConfigMap are seen too; debounced). A request in flight keeps the config it
//! started with. Targets whose identity is unchanged keep their breaker and health
//! (`resilience::registry`); settings that only a restart can apply keep their running
//! value and are named in the answer.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{Response, StatusCode};
use serde::Serialize;

use super::{error_response, json_response, AppState, Live};
use crate::api::ApiError;
use crate::config::{Config, ConfigError};

/// Changes to the file closer together than this are one reload.
pub const DEBOUNCE: Duration = Duration::from_millis(500);

/// What a reload did (`POST /admin/reload`'s answer and the reload's log line).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Reloaded {
    pub result: &'static str,
    pub hash: String,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    pub restart_required: Vec<&'static str>,
}

/// Reads the config file again and swaps it in; on any error nothing changes.
/// `trigger` names what asked, for the log line.
pub async fn reload(app: &AppState, trigger: &'static str) -> Result<Reloaded, ConfigError> {
    let Some(path) = app.config_path.clone() else {
        return Err(ConfigError::Load {
            file: "<inline>".into(),
            message: "this gateway was not started from a config file".into(),
        });
    };
    let _one_at_a_time = app.reloading.lock().await;
    let mut targets = app.targets.generation();
    let mut next = match Config::load_in(&path, &mut targets) {
        Ok(c) => c,
        Err(e) => {
            app.metrics
                .config_reloads
                .with_label_values(&["error"])
                .inc();
            tracing::error!(
                trigger,
                error = %e,
                "config reload failed; the running config is unchanged"
            );
            app.note_reload("error", None);
            return Err(e);
        }
    };
    let running = app.config();
    let changes = running.fingerprints.changes_to(&next.fingerprints);
    keep_restart_only(&running, &mut next);
    let next = Arc::new(next);
    app.metrics.rebind(&next);
    app.shadow.rebind(&next);
    app.live.store(Arc::new(Live::new(next.clone())));
    // After the swap, so a scrape on the old config cannot bring them back.
    for name in running.models.keys() {
        if !next.models.contains_key(name) {
            let _ = app.metrics.circuit_state.remove_label_values(&[name]);
        }
    }
    targets.commit();
    app.metrics.config_reloads.with_label_values(&["ok"]).inc();
    app.metrics.config_info(&next.hash);
    app.note_reload("ok", Some(next.hash.clone()));
    let done = Reloaded {
        result: "ok",
        hash: next.hash.clone(),
        added: changes.added,
        removed: changes.removed,
        changed: changes.changed,
        restart_required: changes.restart_required,
    };
    tracing::info!(
        trigger,
        hash = %done.hash,
        added = ?done.added,
        removed = ?done.removed,
        changed = ?done.changed,
        restart_required = ?done.restart_required,
        "config reloaded"
    );
    Ok(done)
}

/// Settings a running gateway cannot change keep their running values (so the live
/// config always says what is in use), and their fingerprints with them, so the next
/// reload still names them until a restart.
fn keep_restart_only(running: &Config, next: &mut Config) {
    next.server.listen = running.server.listen;
    next.server.worker_threads = running.server.worker_threads;
    next.server.scheduler = running.server.scheduler;
    next.server.drain_delay = running.server.drain_delay;
    next.server.drain_timeout = running.server.drain_timeout;
    next.store = running.store.clone();
    next.log = running.log;
    next.cache = running.cache.clone();
    next.responses = running.responses;
    next.retry_budget = running.retry_budget;
    next.hedge_budget = running.hedge_budget;
    next.mock = running.mock.clone();
    next.report = running.report.clone();
    next.shadow_seed = running.shadow_seed;
    next.state_redis_url = running.state_redis_url.clone();
    next.admin = running.admin.clone();
    next.fingerprints.restart_only = running.fingerprints.restart_only.clone();
}

/// `POST /admin/reload`.
pub async fn admin_reload(State(app): State<Arc<AppState>>) -> Response<Body> {
    match reload(&app, "admin").await {
        Ok(done) => json_response(serde_json::to_vec(&done).unwrap_or_default().into()),
        Err(e) => {
            let mut err = ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                e.to_string(),
            );
            err.code = Some("invalid_config".into());
            if let ConfigError::At { path, .. } = &e {
                err.param = Some(path.clone());
            }
            error_response(&err)
        }
    }
}

/// Starts the thread that reloads on SIGHUP and when the config file changes. Runs
/// for the life of the process.
pub fn start_watching(app: Arc<AppState>) -> std::io::Result<()> {
    let Some(path) = app.config_path.clone() else {
        return Ok(());
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Registered now: a SIGHUP right after start must reload, not end the process.
    #[cfg(unix)]
    let hup = rt.block_on(async {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
    });
    #[cfg(not(unix))]
    let hup = None;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let watcher = watch(&path, tx);
    if let Err(e) = &watcher {
        tracing::warn!(path = %path.display(), error = %e, "cannot watch the config file; reload with SIGHUP or POST /admin/reload");
    }
    std::thread::Builder::new()
        .name("cascade-reload".into())
        .spawn(move || {
            // The watcher lives as long as this thread.
            let _watcher = watcher;
            rt.block_on(run(app, path, rx, hup));
        })?;
    Ok(())
}

async fn run(
    app: Arc<AppState>,
    path: PathBuf,
    mut changed: tokio::sync::mpsc::UnboundedReceiver<()>,
    #[cfg(unix)] mut hup: Option<tokio::signal::unix::Signal>,
    #[cfg(not(unix))] _hup: Option<()>,
) {
    let mut watching = true;
    loop {
        #[cfg(unix)]
        let sighup = async {
            match hup.as_mut() {
                Some(s) => s.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let sighup = std::future::pending::<Option<()>>();
        tokio::select! {
            Some(()) = sighup => {
                let _ = reload(&app, "sighup").await;
            }
            event = changed.recv(), if watching => {
                if event.is_none() {
                    // No watcher: signals only.
                    watching = false;
                    continue;
                }
                // Debounce: wait for a quiet spell, then reload if the text changed.
                while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, changed.recv()).await {}
                let text = tokio::fs::read_to_string(&path).await;
                if let Ok(text) = text {
                    if crate::config::text_hash(&text) != app.config().hash {
                        let _ = reload(&app, "file").await;
                    }
                }
            }
        }
    }
}

/// Watches the directory holding `path`: a file replaced by rename, or a symlink
/// swapped (`..data` in a Kubernetes ConfigMap mount), shows up there and not on the
/// old file.
fn watch(
    path: &Path,
    tx: tokio::sync::mpsc::UnboundedSender<()>,
) -> notify::Result<notify::RecommendedWatcher> {
    use notify::Watcher;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().map(|n| n.to_os_string());
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if event.kind.is_access() {
            return;
        }
        // Only the file itself and Kubernetes' `..data` links: a store in the same
        // directory must not wake the reloader on every write.
        let relevant = event.paths.iter().any(|p| {
            p.file_name().is_some_and(|f| {
                Some(f) == name.as_deref() || f.to_string_lossy().starts_with("..")
            })
        });
        if relevant {
            let _ = tx.send(());
        }
    })?;
    watcher.watch(&dir, notify::RecursiveMode::NonRecursive)?;
    Ok(watcher)
}
