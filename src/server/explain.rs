//! `POST /v1/cascade/explain`: what a request would do, without calling any provider.
//! The body and headers are the request's own; `?surface=` names its surface (chat by
//! default). The answer is read from the same functions the request path runs (the
//! surface's parser, chain resolution, the engine's plan, the cache's decision), so it
//! says what the request then does, for the targets' state at that moment.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Response, StatusCode};
use bytes::Bytes;
use serde_json::{json, Value};

use super::chat::{self, Inbound, Prepared};
use super::{error_response, json_response, AppState};
use crate::api::request::ChatRequest;
use crate::api::ApiError;
use crate::classify::{Action, ErrorClass};
use crate::clock;
use crate::config::{CacheMode, Chain, Target};
use crate::routing::explain::{explain as plan, Step};
use crate::routing::{resolve_why, ChainReason};

/// `POST /v1/cascade/explain[?surface=chat|responses|messages|embeddings]`.
pub async fn handler(State(app): State<Arc<AppState>>, request: Request) -> Response<Body> {
    let (parts, body) = request.into_parts();
    let inbound = match surface_param(parts.uri.query()) {
        Ok(i) => i,
        Err(e) => return error_response(&e),
    };
    let limit = app.config().server.max_body;
    match chat::read_body(body, &parts.headers, limit).await {
        Ok(body) => explain(&app, inbound, &parts.headers, body).await,
        Err(e) => super::surface_error(&inbound.error_surface(), &e),
    }
}

/// `?surface=`, chat when absent.
pub fn surface_param(query: Option<&str>) -> Result<Inbound, ApiError> {
    let value = query
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("surface="));
    match value {
        None | Some("chat") => Ok(Inbound::Chat),
        Some("responses") => Ok(Inbound::Responses),
        Some("messages") => Ok(Inbound::Messages),
        Some("embeddings") => Ok(Inbound::Embeddings),
        Some(other) => Err(ApiError::invalid_request(format!(
            "Unknown surface {other:?}: expected chat, responses, messages or embeddings."
        ))
        .with_param("surface")
        .with_code("invalid_value")),
    }
}

/// The explanation of one request, or the error the request itself would get before
/// any chain is walked (in its surface's shape, with its status).
pub async fn explain(
    app: &AppState,
    inbound: Inbound,
    headers: &HeaderMap,
    body: Bytes,
) -> Response<Body> {
    let Prepared {
        req,
        surface,
        dropped_tools,
        ..
    } = match chat::prepare(app, inbound, body, headers).await {
        Ok(p) => p,
        Err(e) => return super::surface_error(&inbound.error_surface(), &e),
    };
    let config = app.config();
    let task = headers.get(chat::X_TASK).and_then(|v| v.to_str().ok());
    let (chain, why) = match resolve_why(&config, task, req.model.as_deref()) {
        Ok(c) => c,
        Err(e) => return super::surface_error(&surface, &e),
    };
    if let Err(e) = chat::serves_kind(chain, &req) {
        return super::surface_error(&surface, &e);
    }
    let (request_timeout, timeout_from) = match chat::request_timeout(headers, chain) {
        Ok((t, true)) => (t, "x-cascade-timeout-ms"),
        Ok((t, false)) => (t, "chain"),
        Err(e) => return super::surface_error(&surface, &e),
    };
    let planned = plan(chain, &req);
    let (now, now_ms) = (tokio::time::Instant::now(), clock::now_ms());
    let targets: Vec<Value> = planned
        .targets
        .iter()
        .map(|t| {
            let policy = &chain.targets[t.position].policy;
            let detail = match t.retry_at {
                Some(at) => format!("{} (reopens at {})", t.detail, wall(at, now, now_ms)),
                None => t.detail.clone(),
            };
            json!({
                "model": &*t.model.name,
                "provider": &*t.model.provider.name,
                "position": t.position,
                "action": t.step.as_str(),
                "reason": t.reason,
                "detail": detail,
                "state": t.model.breaker.state().as_str(),
                "retry_at": t.retry_at.map(|at| wall(at, now, now_ms)),
                "attempt_timeout_ms": millis(policy.attempt_timeout),
                "first_token_timeout_ms": millis(policy.first_token_timeout),
                "max_retries": policy.retry.max_retries,
            })
        })
        .collect();
    // The first target called sets the timeouts and retries shown at the top.
    let lead = planned
        .targets
        .iter()
        .find(|t| t.step != Step::Skip)
        .or(planned.targets.first())
        .map(|t| &chain.targets[t.position]);
    let error = planned.error.as_ref().map(|e| {
        let (status, body) = surface.error(e);
        json!({
            "status": status.as_u16(),
            "body": serde_json::from_slice::<Value>(&body).unwrap_or(Value::Null),
        })
    });
    let cache_json = cache(app, chain, &req, headers).await;
    let cache_hit = cache_json["key_status"] == "hit";
    let out = json!({
        "surface": inbound.label(),
        "chain": &*chain.name,
        "chain_reason": chain_reason(why, chain, task, req.model.as_deref()),
        "chain_source": why.as_str(),
        "strategy": super::console::strategy(&chain.strategy),
        "stream": req.stream,
        "prompt_tokens_estimate": planned.prompt_tokens,
        "targets": targets,
        "error": error,
        "timeouts": json!({
            "request_ms": millis(request_timeout),
            "request_from": timeout_from,
            "attempt_ms": lead.map(|t| millis(t.policy.attempt_timeout)),
            "first_token_ms": lead.map(|t| millis(t.policy.first_token_timeout)),
            "idle_ms": lead.and_then(|t| t.policy.idle_timeout.map(millis)),
        }),
        "retry": retry(chain, lead),
        "cache": cache_json,
        "shadow": shadow(chain, &req, cache_hit),
        "dropped_tools": dropped_tools,
    });
    json_response(serde_json::to_vec_pretty(&out).unwrap_or_default().into())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn wall(at: tokio::time::Instant, now: tokio::time::Instant, now_ms: i64) -> String {
    clock::rfc3339_ms(clock::ms_at(at, now, now_ms))
}

fn chain_reason(
    why: ChainReason,
    chain: &Chain,
    task: Option<&str>,
    model: Option<&str>,
) -> String {
    match why {
        ChainReason::TaskHeader => format!(
            "the x-cascade-task header names the chain `{}`{}",
            task.unwrap_or_default(),
            model.map_or(String::new(), |m| format!(
                " (the body's model `{m}` is not used to route)"
            ))
        ),
        ChainReason::ModelIsChain => {
            format!("the body's model `{}` names the chain", chain.name)
        }
        ChainReason::ModelInPool => format!(
            "the body's model `{}` is a pool model: it is tried first, then its fallbacks",
            chain.name
        ),
        ChainReason::Default => {
            "the body names no model and there is no x-cascade-task header: the `default` chain"
                .into()
        }
    }
}

fn action(chain: &Chain, a: Action) -> Value {
    match a {
        Action::Retry => json!("retry"),
        Action::Next => json!("next"),
        Action::Fail => json!("fail"),
        Action::JumpTo(pos) => json!({
            "jump_to": chain.targets.get(pos).map(|t| &*t.model.name)
        }),
    }
}

fn retry(chain: &Chain, lead: Option<&Target>) -> Value {
    let Some(t) = lead else {
        return json!({ "max_attempts": chain.max_attempts });
    };
    let r = &t.policy.retry;
    let on: serde_json::Map<String, Value> = ErrorClass::ALL
        .iter()
        .map(|&c| (c.as_str().to_string(), action(chain, t.policy.action(c))))
        .collect();
    json!({
        "max_attempts": chain.max_attempts,
        "max_retries": r.max_retries,
        "backoff_base_ms": millis(r.base),
        "backoff_cap_ms": millis(r.cap),
        "max_retry_wait_ms": millis(r.max_retry_wait),
        "on": on,
    })
}

async fn cache(app: &AppState, chain: &Chain, req: &ChatRequest, headers: &HeaderMap) -> Value {
    let mode = app.cache.mode(chain);
    let d = app.cache.decide(chain, req, headers);
    let Some(key) = d.key else {
        let reason = match mode {
            CacheMode::Off => "the cache is off for this chain (cache.mode: off)",
            CacheMode::Deterministic => {
                "cache.mode is deterministic and the request sets neither temperature: 0 nor a seed"
            }
            CacheMode::All => "the request cannot be keyed",
        };
        return json!({
            "decision": "bypass",
            "key_status": "not_cached",
            "detail": reason,
        });
    };
    let decision = match (d.read, d.write) {
        (true, true) => "lookup_and_store",
        (true, false) => "lookup_only",
        (false, true) => "store_only",
        (false, false) => "bypass",
    };
    let entry = app.cache.get(key).await;
    let servable = entry
        .as_ref()
        .is_some_and(|e| chat::servable(chain, e, req).is_some());
    let (status, detail) = match (&entry, d.read) {
        (_, false) => (
            "not_read",
            "Cache-Control: no-cache: the cache is not read for this request",
        ),
        (Some(_), true) if !servable => (
            "miss",
            "a cached answer exists but cannot serve this request (stored without usage, or its model left the chain): the chain is walked",
        ),
        (Some(e), true) if e.is_fresh() => (
            "hit",
            "a fresh answer is cached: it is served and no target is called",
        ),
        (Some(_), true) if d.stale => (
            "stale",
            "only an expired answer is cached: the chain is walked, and that answer is served if every target fails",
        ),
        (Some(_), true) => (
            "miss",
            "only an expired answer is cached, and this chain does not serve stale answers",
        ),
        (None, true) => ("miss", "nothing is cached for this request: the chain is walked"),
    };
    let mut out = json!({
        "decision": decision,
        "key_status": status,
        "detail": detail,
        "ttl_s": d.ttl.as_secs(),
        "serve_stale": d.stale,
    });
    if let (Some(e), true) = (&entry, d.read) {
        out["age_s"] = json!(e.age_secs());
        out["model"] = json!(&*e.model);
    }
    out
}

fn shadow(chain: &Chain, req: &ChatRequest, cache_hit: bool) -> Value {
    let Some(s) = &chain.shadow else {
        return json!({"applies": false, "detail": "the chain has no shadow traffic"});
    };
    let models: Vec<&str> = s.targets.iter().map(|t| &*t.model.name).collect();
    let (applies, detail) = if cache_hit {
        (
            false,
            "a cached answer is served: nothing is shadowed".to_string(),
        )
    } else if req.embedding.is_some() {
        (false, "embeddings are not shadowed".to_string())
    } else if s.sample <= 0.0 {
        (false, "the chain's shadow sample is 0".to_string())
    } else {
        (
            true,
            format!(
                "sampled with probability {}: after the answer, the same request also goes to each shadow model but the one that served",
                s.sample
            ),
        )
    };
    json!({
        "applies": applies,
        "sample": s.sample,
        "models": models,
        "max_cost_per_hour": s.max_cost_per_hour,
        "detail": detail,
    })
}

/// `cascade explain`: the same answer from a config, with no gateway running. Health
/// comes from the store's recent calls (as a gateway starting on that config would
/// restore it); breakers start closed and the cache empty, since they live only in a
/// running gateway's memory. Returns the status and the JSON body.
pub async fn offline(
    mut config: crate::config::Config,
    surface: Option<&str>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(u16, Value), String> {
    let inbound = surface_param(surface.map(|s| format!("surface={s}")).as_deref())
        .map_err(|e| e.message.clone())?;
    // Nothing here writes rows, shares breakers or joins a fleet.
    let backend = config.store.take().map(|s| s.backend);
    config.state_redis_url = None;
    // Nor does it wait on a Redis cache it may not reach: the cache reads as empty.
    config.cache.redis_url = None;
    let config = Arc::new(config);
    let app = AppState::new(config.clone()).map_err(|e| e.to_string())?;
    let state = match &backend {
        Some(crate::store::Backend::Sqlite(p)) if !p.is_file() => "none: no store file yet",
        Some(b) => {
            super::admin::restore_health(&config, b);
            "health from the store's recent calls; breakers closed and the cache empty (a running gateway's POST /v1/cascade/explain shows its live state)"
        }
        None => "none: the store is off; breakers closed and the cache empty",
    };
    let resp = explain(&app, inbound, &headers, body).await;
    let status = resp.status().as_u16();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .map_err(|e| e.to_string())?;
    let mut out: Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    if status == StatusCode::OK.as_u16() {
        out["state"] = json!(state);
    }
    Ok((status, out))
}
