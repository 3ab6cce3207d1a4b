//! Admin endpoints: `GET /admin/health` (each model's window and breaker),
//! `GET /admin/report` (the fallback-cost report from the store), and the two jobs
//! that read the store outside the request path: health restored at start, and the
//! scheduled report.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{Response, StatusCode};
use bytes::Bytes;
use tokio::time::Instant;

use super::{error_response, json_response, AppState};
use crate::api::ApiError;
use crate::classify::ErrorClass;
use crate::clock;
use crate::config::{Config, ReportSchedule};
use crate::store::report::{self, GroupBy, ReportQuery};

#[derive(serde::Serialize)]
struct TargetHealth<'a> {
    model: &'a str,
    provider: &'a str,
    state: &'static str,
    success_rate: f64,
    calls: u64,
    avg_latency_ms: Option<f64>,
    p50_ms: Option<f64>,
    p95_ms: Option<f64>,
    ttft_p95_ms: Option<f64>,
    /// Below `health.degraded_below` over at least `health.min_calls` calls: moved last.
    degraded: bool,
    /// RFC 3339 time when an open breaker lets calls through again.
    retry_at: Option<String>,
}

/// `GET /admin/health`: the health window and breaker of every pool model.
pub async fn health(State(app): State<Arc<AppState>>) -> Response<Body> {
    let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
    let now = Instant::now();
    let now_ms = clock::now_ms();
    let config = app.config();
    let targets: Vec<TargetHealth> = config
        .models
        .values()
        .map(|m| {
            let h = m.health.snapshot();
            TargetHealth {
                model: &m.name,
                provider: &m.provider.name,
                state: m.breaker.state().as_str(),
                success_rate: h.success_rate,
                calls: h.calls,
                avg_latency_ms: ms(h.avg_latency),
                p50_ms: ms(h.p50),
                p95_ms: ms(h.p95),
                ttft_p95_ms: ms(h.ttft_p95),
                degraded: h.degraded,
                retry_at: m.breaker.retry_at().map(|t| {
                    let wait = t.saturating_duration_since(now).as_millis();
                    clock::rfc3339_s(now_ms + i64::try_from(wait).unwrap_or(0))
                }),
            }
        })
        .collect();
    json_response(
        serde_json::to_vec(&serde_json::json!({ "targets": targets }))
            .unwrap_or_default()
            .into(),
    )
}

/// The report's parameters, from a query string or the command line.
pub fn report_query(
    config: &Config,
    since: Option<&str>,
    until: Option<&str>,
    by: Option<&str>,
    now_ms: i64,
) -> Result<ReportQuery, String> {
    let since_ms =
        clock::parse_instant(since.unwrap_or("7d"), now_ms).map_err(|e| format!("since: {e}"))?;
    let until_ms =
        clock::parse_instant(until.unwrap_or("now"), now_ms).map_err(|e| format!("until: {e}"))?;
    if until_ms <= since_ms {
        return Err("until must be later than since".into());
    }
    Ok(ReportQuery {
        since_ms,
        until_ms,
        by: GroupBy::parse(by.unwrap_or("chain"))?,
        degraded_below: config.health.degraded_below,
        min_calls: config.health.min_calls,
    })
}

/// `GET /admin/report?since=7d&until=now&by=chain|model|day`: the report as JSON.
pub async fn report(
    State(app): State<Arc<AppState>>,
    Query(params): Query<HashMap<String, String>>,
) -> Response<Body> {
    let Some(settings) = &app.config().store else {
        return error_response(
            &ApiError::new(
                StatusCode::CONFLICT,
                "invalid_request_error",
                "The store is off (store.enabled: false), so there is nothing to report.",
            )
            .with_code("store_disabled"),
        );
    };
    let get = |k: &str| params.get(k).map(String::as_str);
    let query = match report_query(
        &app.config(),
        get("since"),
        get("until"),
        get("by"),
        clock::now_ms(),
    ) {
        Ok(q) => q,
        Err(e) => {
            return error_response(
                &ApiError::invalid_request(format!("Invalid report parameters: {e}"))
                    .with_code("invalid_value"),
            )
        }
    };
    let backend = settings.backend.clone();
    let built = tokio::task::spawn_blocking(move || read_report(&backend, &query)).await;
    match built {
        Ok(Ok(v)) => json_response(Bytes::from(serde_json::to_vec(&v).unwrap_or_default())),
        Ok(Err(e)) => error_response(&ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            format!("The store could not be read: {e}"),
        )),
        Err(_) => error_response(&ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "The report failed.",
        )),
    }
}

/// Reads the report from the store (read-only; a SQLite file must exist). Blocks.
pub fn read_report(
    backend: &crate::store::Backend,
    q: &ReportQuery,
) -> Result<serde_json::Value, String> {
    report::run(backend, q).map_err(|e| e.to_string())
}

/// Fills each model's health window from the calls the store recorded within
/// `health.window`, so a model that was degraded before a restart is still moved last
/// after it, before any new call to it. A store that cannot be read restores nothing.
///
/// On PostgreSQL the window holds the whole fleet's calls: a replica starts with what
/// its peers have seen.
pub fn restore_health(config: &Config, backend: &crate::store::Backend) {
    let window = config.health.window;
    let now_ms = clock::now_ms();
    let since = now_ms - i64::try_from(window.as_millis()).unwrap_or(i64::MAX / 2);
    let rows = match crate::store::recent_calls(backend, since) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "store: could not restore the health windows");
            return;
        }
    };
    let now = Instant::now();
    let mut restored = 0u64;
    for call in rows {
        let Some(model) = config.models.get(&call.model) else {
            continue;
        };
        let age = Duration::from_millis(u64::try_from(now_ms - call.started_ms).unwrap_or(0));
        let at = now.checked_sub(age).unwrap_or(now);
        let latency = Duration::from_secs_f64(call.latency_ms.max(0.0) / 1000.0);
        match call.error_type.as_deref() {
            None => {
                let ttft = call
                    .ttft_ms
                    .map(|t| Duration::from_secs_f64(t.max(0.0) / 1000.0));
                model.health.record_success_at(at, latency, ttft);
            }
            Some(class) => {
                let counts = ErrorClass::from_name(class)
                    .is_some_and(crate::resilience::breaker::counts_against_target);
                if counts && !call.deadline_cut {
                    model.health.record_failure_at(at);
                }
            }
        }
        restored += 1;
    }
    if restored > 0 {
        tracing::info!(calls = restored, "store: health windows restored");
    }
}

/// Runs the scheduled report on its own thread: at the end of each period (the first
/// one `every` after start) it covers the last `every`, writes
/// `cascade-report-<until>.md` and `.json` into `dir`, and posts the JSON to the
/// webhook if one is set. Nothing here can block or fail a request.
pub fn start_scheduled_report(app: Arc<AppState>) -> std::io::Result<()> {
    let config = app.config();
    let (Some(schedule), Some(store)) = (config.report.clone(), config.store.clone()) else {
        return Ok(());
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("cascade-report".into())
        .spawn(move || {
            rt.block_on(async move {
                let http = crate::providers::HttpClients::new(1);
                loop {
                    tokio::time::sleep(schedule.every).await;
                    let until_ms = clock::now_ms();
                    let span = i64::try_from(schedule.every.as_millis()).unwrap_or(i64::MAX / 2);
                    let q = ReportQuery {
                        since_ms: until_ms - span,
                        until_ms,
                        by: schedule.by,
                        degraded_below: app.config().health.degraded_below,
                        min_calls: app.config().health.min_calls,
                    };
                    let backend = store.backend.clone();
                    let built =
                        tokio::task::spawn_blocking(move || read_report(&backend, &q)).await;
                    match built {
                        Ok(Ok(v)) => publish(&schedule, &v, until_ms, &http).await,
                        Ok(Err(e)) => {
                            tracing::error!(error = %e, "scheduled report: cannot read the store")
                        }
                        Err(e) => tracing::error!(error = %e, "scheduled report failed"),
                    }
                }
            })
        })?;
    Ok(())
}

/// Writes one period's files, then posts the JSON. A failed post is logged; its
/// files stay.
pub async fn publish(
    schedule: &ReportSchedule,
    report: &serde_json::Value,
    until_ms: i64,
    http: &crate::providers::HttpClients,
) {
    let stamp = compact_stamp(until_ms);
    let base = schedule.dir.join(format!("cascade-report-{stamp}"));
    let json = serde_json::to_vec_pretty(report).unwrap_or_default();
    let written = std::fs::create_dir_all(&schedule.dir)
        .and_then(|()| std::fs::write(base.with_extension("md"), report::to_markdown(report)))
        .and_then(|()| std::fs::write(base.with_extension("json"), &json));
    match written {
        Ok(()) => {
            tracing::info!(file = %base.with_extension("md").display(), "scheduled report written")
        }
        Err(e) => {
            tracing::error!(dir = %schedule.dir.display(), error = %e, "scheduled report: cannot write its files")
        }
    }
    let Some(url) = &schedule.webhook else {
        return;
    };
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    let post = crate::providers::client::post(http.local(), url.clone(), headers, json.into());
    match tokio::time::timeout(Duration::from_secs(10), post).await {
        Ok(Ok(resp)) if resp.status().is_success() => {
            tracing::info!(status = resp.status().as_u16(), "scheduled report posted")
        }
        Ok(Ok(resp)) => tracing::warn!(
            status = resp.status().as_u16(),
            "scheduled report: the webhook refused the report"
        ),
        Ok(Err(e)) => tracing::warn!(error = %e.message, "scheduled report: webhook post failed"),
        Err(_) => tracing::warn!("scheduled report: webhook post timed out"),
    }
}

/// `20261201T221238Z`.
fn compact_stamp(ms: i64) -> String {
    clock::rfc3339_s(ms).replace(['-', ':'], "")
}

#[cfg(test)]
mod tests {
    #[test]
    fn compact_stamps() {
        assert_eq!(super::compact_stamp(1_764_627_158_123), "20251201T221238Z");
    }
}
