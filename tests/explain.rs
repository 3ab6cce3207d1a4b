//! `POST /v1/cascade/explain` and `cascade explain`: what a request would do, checked
//! against what the same request then does (its `x-cascade-trace`), across health
//! states, breakers, skips, the cache and errors; and that explaining calls no one.

mod common;

use common::{start, Harness, TempDir};
use serde_json::{json, Value};

fn config(store: &str) -> String {
    format!(
        r#"
server: {{ request_timeout: 30s, attempt_timeout: 7s }}
retry: {{ max_retries: 0 }}
breaker: {{ consecutive_failures: 100, failure_rate: 1.0 }}
health: {{ window: 5m, min_calls: 3, degraded_below: 0.8 }}
cache: {{ mode: deterministic, ttl: 60s }}
{store}
providers:
  mock: {{ kind: openai, base_url: "{{mock}}" }}
  other: {{ kind: openai, base_url: "{{mock}}" }}
models:
  a: {{ provider: mock, model_id: a }}
  b: {{ provider: other, model_id: b }}
  c: {{ provider: mock, model_id: c, breaker: {{ consecutive_failures: 1, cooldown: 60s }} }}
  small: {{ provider: mock, model_id: small, context_window: 50 }}
  notools: {{ provider: mock, model_id: notools, capabilities: [vision] }}
  shy: {{ provider: mock, model_id: shy, breaker: {{ consecutive_failures: 1, cooldown: 60s }} }}
chains:
  main: [a, b, c]
  skips: [small, notools, b]
  lonely:
    models: [shy]
    when_all_open: fail
  short:
    models: [a, b, c]
    max_attempts: 2
  fast:
    models: [b, a]
    request_timeout: 10s
    shadow: {{ models: [a], sample: 0.5 }}
"#
    )
}

async fn explain(h: &Harness, query: &str, body: &Value, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut req = h
        .http
        .post(h.url(&format!("/v1/cascade/explain{query}")))
        .header("content-type", "application/json")
        .body(body.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("gateway answers");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, v)
}

fn body(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hello"}]})
}

/// `(model, action, reason)` per target, in the order explained.
fn plan(e: &Value) -> Vec<(String, String, String)> {
    e["targets"]
        .as_array()
        .unwrap_or_else(|| panic!("no targets: {e}"))
        .iter()
        .map(|t| {
            (
                t["model"].as_str().unwrap_or_default().to_string(),
                t["action"].as_str().unwrap_or_default().to_string(),
                t["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// The models explain says would be called, in order (the last resort included).
fn called(e: &Value) -> Vec<String> {
    plan(e)
        .into_iter()
        .filter(|(_, action, _)| action != "skip")
        .map(|(m, _, _)| m)
        .collect()
}

/// The trace of a real request: the models called, in order, and those skipped.
fn trace(r: &common::Reply) -> (Vec<String>, Vec<String>) {
    let (mut calls, mut skipped) = (Vec::new(), Vec::new());
    for entry in r.header("x-cascade-trace").unwrap_or_default().split(',') {
        let mut parts = entry.split(':');
        let model = parts.next().unwrap_or_default().to_string();
        match parts.next() {
            Some("skipped") => skipped.push(model),
            Some(_) => calls.push(model),
            None => {}
        }
    }
    (calls, skipped)
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn explain_agrees_with_the_request_across_health_states() {
    let h = start(&config("store: { enabled: false }")).await;

    // Healthy: the configured order, and nothing is called to explain it.
    let (status, e) = explain(&h, "", &body("main"), &[]).await;
    assert_eq!(status, 200, "{e}");
    assert_eq!(e["surface"], "chat");
    assert_eq!(e["chain"], "main");
    assert_eq!(e["chain_source"], "model_names_chain");
    assert_eq!(
        plan(&e),
        [
            ("a".into(), "try".into(), "healthy".into()),
            ("b".into(), "try".into(), "healthy".into()),
            ("c".into(), "try".into(), "healthy".into()),
        ]
    );
    assert_eq!(h.mock.total_calls(), 0, "explain called a provider");
    let r = h.chat("main", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(trace(&r).0, names(&["a"]));

    // `a` fails three times: degraded, so moved last. The request agrees.
    h.mock.set("a", "status=500");
    for _ in 0..3 {
        assert_eq!(h.chat("main", &[]).await.status, 200);
    }
    let (_, e) = explain(&h, "", &body("main"), &[]).await;
    assert_eq!(
        plan(&e),
        [
            ("b".into(), "try".into(), "healthy".into()),
            ("c".into(), "try".into(), "healthy".into()),
            ("a".into(), "try".into(), "degraded".into()),
        ]
    );
    let detail = e["targets"][2]["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("below 80%"), "{detail}");
    let calls_before = h.mock.total_calls();
    let (_, again) = explain(&h, "", &body("main"), &[]).await;
    assert_eq!(
        h.mock.total_calls(),
        calls_before,
        "explain called a provider"
    );
    assert_eq!(plan(&again), plan(&e));
    let r = h.chat("main", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        trace(&r).0,
        called(&e)[..1].to_vec(),
        "b first, and it answers"
    );

    // `c` fails once (called as its own model): its breaker opens. Skipped with its
    // reopening time and kept as the last resort; the request skips it too and, with
    // every other target failing, calls it through its breaker, last.
    h.mock.set("c", "status=500");
    assert_ne!(h.chat("c", &[]).await.status, 200);
    let (_, e) = explain(&h, "", &body("main"), &[]).await;
    assert_eq!(
        plan(&e),
        [
            ("b".into(), "try".into(), "healthy".into()),
            ("a".into(), "try".into(), "degraded".into()),
            ("c".into(), "last_resort".into(), "breaker_open".into()),
        ]
    );
    let c = &e["targets"][2];
    assert_eq!(c["state"], "open", "{e}");
    assert!(c["retry_at"].is_string(), "{c}");
    h.mock.set("b", "status=500");
    let r = h.chat("main", &[]).await;
    assert_eq!(trace(&r).0, called(&e), "{:?}", r.header("x-cascade-trace"));
    assert!(
        r.header("x-cascade-trace")
            .unwrap_or_default()
            .ends_with(":last_resort"),
        "{:?}",
        r.header("x-cascade-trace")
    );
}

#[tokio::test]
async fn skips_errors_and_the_chain_choice_match_the_request() {
    let h = start(&config("store: { enabled: false }")).await;

    // Skipped for the context window (a long prompt) and for a capability (tools).
    let mut long = body("skips");
    long["messages"][0]["content"] = json!("word ".repeat(400));
    long["tools"] =
        json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
    let (status, e) = explain(&h, "", &long, &[]).await;
    assert_eq!(status, 200, "{e}");
    assert_eq!(
        plan(&e),
        [
            ("b".into(), "try".into(), "healthy".into()),
            ("small".into(), "skip".into(), "context_window".into()),
            ("notools".into(), "skip".into(), "capability".into()),
        ]
    );
    assert!(e["prompt_tokens_estimate"].as_u64().unwrap_or(0) > 50);
    let r = h.post_raw(long.to_string(), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(trace(&r), (names(&["b"]), names(&["small", "notools"])));

    // Every breaker open on a chain that fails fast: explain shows the error the
    // request gets.
    h.mock.set("shy", "status=500");
    assert_eq!(h.chat("lonely", &[]).await.status, 502);
    let (status, e) = explain(&h, "", &body("lonely"), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(e["error"]["status"], 503, "{e}");
    assert_eq!(e["error"]["body"]["error"]["code"], "all_targets_open");
    assert_eq!(
        plan(&e),
        [("shy".into(), "skip".into(), "breaker_open".into())]
    );
    let r = h.chat("lonely", &[]).await;
    assert_eq!(r.status, 503);
    assert_eq!(h.mock.calls("shy"), 1);

    // The header picks the chain; the client's timeout shortens the chain's.
    let (_, e) = explain(
        &h,
        "",
        &body("main"),
        &[("x-cascade-task", "fast"), ("x-cascade-timeout-ms", "2500")],
    )
    .await;
    assert_eq!(e["chain"], "fast");
    assert_eq!(e["chain_source"], "x-cascade-task");
    assert_eq!(e["timeouts"]["request_ms"], 2500);
    assert_eq!(e["timeouts"]["request_from"], "x-cascade-timeout-ms");
    assert_eq!(e["timeouts"]["attempt_ms"], 7000);
    assert_eq!(e["shadow"]["applies"], true);
    assert_eq!(e["shadow"]["sample"], 0.5);
    let (_, e) = explain(&h, "", &body("fast"), &[("x-cascade-timeout-ms", "60000")]).await;
    assert_eq!(e["timeouts"]["request_ms"], 10000, "never lengthened");
    // A pool model routes as itself plus its fallbacks; no model, the default chain.
    let (_, e) = explain(&h, "", &body("b"), &[]).await;
    assert_eq!(e["chain_source"], "model_names_pool_model");
    assert_eq!(called(&e), names(&["b"]));

    // Refused requests get the request's own error, in the surface's shape.
    let (status, e) = explain(&h, "", &body("nope"), &[]).await;
    assert_eq!(status, 404);
    assert_eq!(e["error"]["code"], "model_not_found");
    let (status, e) = explain(
        &h,
        "?surface=messages",
        &json!({"model": "main", "messages": [], "max_tokens": 5}),
        &[],
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(e["type"], "error", "{e}");
    let (status, e) = explain(&h, "?surface=speech", &body("main"), &[]).await;
    assert_eq!(status, 400);
    assert_eq!(e["error"]["param"], "surface");
    let (status, e) = explain(&h, "", &body("main"), &[("x-cascade-timeout-ms", "soon")]).await;
    assert_eq!(status, 400, "{e}");

    // Other surfaces: Messages and Responses explain on their chain.
    let (status, e) = explain(
        &h,
        "?surface=messages",
        &json!({"model": "main", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{e}");
    assert_eq!(e["surface"], "messages");
    assert_eq!(called(&e), names(&["a", "b", "c"]));
    let (status, e) = explain(
        &h,
        "?surface=responses",
        &json!({"model": "fast", "input": "hi"}),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{e}");
    assert_eq!(e["surface"], "responses");
    assert_eq!(
        h.mock.calls("a") + h.mock.calls("b"),
        1,
        "only the one real request above"
    );
}

#[tokio::test]
async fn cache_status_follows_what_is_cached() {
    let h = start(&config("store: { enabled: false }")).await;
    let mut req = body("main");
    req["temperature"] = json!(0);

    let (_, e) = explain(&h, "", &body("main"), &[]).await;
    assert_eq!(e["cache"]["decision"], "bypass", "not deterministic");
    assert_eq!(e["cache"]["key_status"], "not_cached");

    let (_, e) = explain(&h, "", &req, &[]).await;
    assert_eq!(e["cache"]["decision"], "lookup_and_store");
    assert_eq!(e["cache"]["key_status"], "miss");
    let r = h.post_raw(req.to_string(), &[]).await;
    assert_eq!(r.header("x-cascade-cache"), Some("miss"));

    let (_, e) = explain(&h, "", &req, &[]).await;
    assert_eq!(e["cache"]["key_status"], "hit", "{e}");
    assert_eq!(e["cache"]["model"], "a");
    let r = h.post_raw(req.to_string(), &[]).await;
    assert_eq!(r.header("x-cascade-cache"), Some("hit"));
    assert_eq!(h.mock.calls("a"), 1);

    // Another tenant's credential has its own entries.
    let (_, e) = explain(&h, "", &req, &[("authorization", "Bearer someone-else")]).await;
    assert_eq!(e["cache"]["key_status"], "miss");
    let (_, e) = explain(&h, "", &req, &[("cache-control", "no-cache")]).await;
    assert_eq!(e["cache"]["decision"], "store_only");
    assert_eq!(e["cache"]["key_status"], "not_read");
    let (_, e) = explain(&h, "", &req, &[("cache-control", "no-store")]).await;
    assert_eq!(e["cache"]["decision"], "lookup_only");
}

/// `cascade explain` reads health from the store: a model that failed before is
/// degraded and moved last, with no gateway running.
#[tokio::test]
async fn the_cli_explains_from_the_config_and_the_store() {
    let dir = TempDir::new("explain-cli");
    let db = dir.path().join("c.db");
    let store = format!(
        "store: {{ path: \"{}\", flush_interval: 10ms }}",
        db.display()
    );
    let h = start(&config(&store)).await;
    h.mock.set("a", "status=500");
    for _ in 0..3 {
        assert_eq!(h.chat("main", &[]).await.status, 200);
    }
    if let Some(s) = &h.state.store {
        s.flush().await;
    }
    let yaml = config(&store).replace("{mock}", &h.mock.url());
    let file = dir.path().join("cascade.yaml");
    std::fs::write(&file, yaml).unwrap();
    let request = dir.path().join("request.json");
    std::fs::write(&request, body("main").to_string()).unwrap();

    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cascade"))
            .arg("--config")
            .arg(&file)
            .arg("explain")
            .args(args)
            .output()
            .expect("cascade runs");
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));
        (out.status.code(), v)
    };
    let calls = h.mock.total_calls();
    let (code, e) = run(&[request.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{e}");
    assert_eq!(called(&e), names(&["b", "c", "a"]), "{e}");
    assert_eq!(e["targets"][2]["reason"], "degraded");
    assert!(
        e["state"].as_str().unwrap_or_default().contains("store"),
        "{e}"
    );
    assert_eq!(h.mock.total_calls(), calls, "the CLI called a provider");

    let (code, e) = run(&[request.to_str().unwrap(), "-H", "x-cascade-task: fast"]);
    assert_eq!(code, Some(0));
    assert_eq!(e["chain"], "fast");
    std::fs::write(&request, body("nope").to_string()).unwrap();
    let (code, e) = run(&[request.to_str().unwrap()]);
    assert_eq!(code, Some(2));
    assert_eq!(e["error"]["code"], "model_not_found");
}

#[tokio::test]
async fn a_target_past_the_attempt_budget_is_never_called() {
    let h = start(&config("store: { enabled: false }")).await;
    let (_, e) = explain(&h, "", &body("short"), &[]).await;
    assert_eq!(
        plan(&e),
        [
            ("a".into(), "try".into(), "healthy".into()),
            ("b".into(), "try".into(), "healthy".into()),
            ("c".into(), "skip".into(), "attempt_budget".into()),
        ]
    );
    h.mock.set("a", "status=500");
    h.mock.set("b", "status=500");
    let r = h.chat("short", &[]).await;
    assert_ne!(r.status, 200);
    assert_eq!(trace(&r).0, called(&e), "{:?}", r.header("x-cascade-trace"));
    assert_eq!(h.mock.calls("c"), 0);
}
