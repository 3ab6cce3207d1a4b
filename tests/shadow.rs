//! Shadow traffic against a live gateway and mock: sampled requests also run on the
//! backup models off the request's path, each shadow answer is compared and recorded,
//! and shadow outcomes feed the backups' breakers and health.

mod common;

use std::time::{Duration, Instant};

use common::stores::{Db, Kind, TestStore};
use common::{start, TempDir};
use serde_json::{json, Value};

const CONFIG: &str = r#"
server: { request_timeout: 30s, attempt_timeout: 10s }
retry: { max_retries: 0, seed: 1 }
shadow_seed: 7
store: { path: "{db}", flush_interval: 20ms }
providers:
  mock: { kind: openai, base_url: "{mock}", api_key: "sk-test" }
models:
  primary: { provider: mock, model_id: p, cost_per_1k_input: 0.01, cost_per_1k_output: 0.02 }
  backup:  { provider: mock, model_id: b, cost_per_1k_input: 0.001, cost_per_1k_output: 0.002 }
  spare:   { provider: mock, model_id: x, cost_per_1k_input: 0.001, cost_per_1k_output: 0.002 }
chains:
  main:
    models: [primary, backup, spare]
    shadow: { models: [backup], sample: SAMPLE, max_inflight: 64 }
  plain: [primary, backup, spare]
"#;

fn config(dir: &TempDir, sample: &str) -> String {
    CONFIG
        .replace("{db}", &dir.path().join("cascade.db").display().to_string())
        .replace("SAMPLE", sample)
}

fn config_on(store: &TestStore, sample: &str) -> String {
    CONFIG
        .replace("path: \"{db}\"", &store.yaml())
        .replace("SAMPLE", sample)
}

/// Waits until `sql` counts at least `n` (shadow work ends after the answer).
async fn until(h: &common::Harness, store: &TestStore, sql: &str, n: i64) -> Db {
    let conn = store.db().await;
    for _ in 0..400 {
        h.state.store.clone().unwrap().flush().await;
        if conn.count(sql).await >= n {
            return conn;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("never reached {n}: {sql}");
}

async fn shadow_rows(conn: &Db) -> Vec<Value> {
    conn.rows(
        "SELECT request_id, chain, served_model, shadow_model, success, error_type, latency_ms,
                ttft_ms, served_latency_ms, length_ratio, json_valid, tool_calls_match,
                similarity, served_finish_reason, shadow_finish_reason, cost_usd
         FROM shadow_results ORDER BY id",
    )
    .await
}

async fn a_slow_shadow_never_delays_the_answer_and_is_compared(kind: Kind) {
    let Some(store) = TestStore::new(kind, "shadow-slow") else {
        return;
    };
    let h = start(&config_on(&store, "1.0")).await;
    h.mock.set("b", "latency=2s");
    let mut ids = Vec::new();
    for _ in 0..4 {
        let t = Instant::now();
        let r = h.chat("main", &[]).await;
        assert!(
            t.elapsed() < Duration::from_millis(1000),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-cascade-model"), Some("primary"));
        assert_eq!(r.header("x-cascade-shadow"), Some("backup"));
        ids.push(r.header("x-request-id").unwrap().to_string());
    }
    // A stream is shadowed by a stream.
    h.mock.set("b", "latency=100ms,ttft=50ms");
    let streamed = h.chat_stream("main", &[]).await;
    assert_eq!(streamed.header("x-cascade-shadow"), Some("backup"));
    assert!(streamed.text.ends_with("data: [DONE]\n\n"));
    ids.push(streamed.header("x-request-id").unwrap().to_string());

    let conn = until(&h, &store, "SELECT COUNT(*) FROM shadow_results", 5).await;
    assert_eq!(h.mock.calls("b"), 5, "one shadow call per sampled request");
    assert_eq!(h.mock.calls("p"), 5);
    let all = shadow_rows(&conn).await;
    assert_eq!(all.len(), 5);
    // In the order the requests were sent (rows are written as shadow calls end).
    let rows: Vec<&Value> = ids
        .iter()
        .map(|id| all.iter().find(|r| r["request_id"] == json!(id)).unwrap())
        .collect();
    for row in &rows {
        assert_eq!(
            (
                &row["chain"],
                &row["served_model"],
                &row["shadow_model"],
                &row["success"]
            ),
            (
                &json!("main"),
                &json!("primary"),
                &json!("backup"),
                &json!(1)
            )
        );
        let sim = row["similarity"].as_f64().unwrap();
        assert!(sim > 0.0 && sim < 1.0, "`from p` against `from b`: {row}");
        assert_eq!(row["length_ratio"], 1.0, "{row}");
        assert_eq!(row["json_valid"], Value::Null);
        assert_eq!(row["tool_calls_match"], Value::Null);
        assert_eq!(
            (&row["served_finish_reason"], &row["shadow_finish_reason"]),
            (&json!("stop"), &json!("stop"))
        );
        assert!(row["cost_usd"].as_f64().unwrap() > 0.0);
        assert!(row["served_latency_ms"].as_f64().unwrap() < row["latency_ms"].as_f64().unwrap());
    }
    assert!(rows[0]["latency_ms"].as_f64().unwrap() >= 2000.0);
    assert!(rows[4]["ttft_ms"].is_number(), "the streamed shadow's TTFT");
    let sent = h.mock.bodies("b").pop().unwrap();
    assert_eq!(sent["stream"], true);
    // Each shadow call is also a model_calls row of kind `shadow`.
    let shadow_calls = conn.count("SELECT COUNT(*) FROM model_calls WHERE kind = 'shadow' AND model_name = 'backup' AND success = 1").await;
    assert_eq!(shadow_calls, 5);
    // The shadow call's metrics, and none of the request's own.
    let m = h.get("/metrics").await.text;
    assert!(
        m.contains(r#"cascade_shadow_requests_total{chain="main",model="backup",outcome="ok"} 5"#),
        "{m}"
    );
    let backup_attempts: Vec<&str> = m
        .lines()
        .filter(|l| l.starts_with(r#"cascade_attempts_total{chain="main",model="backup""#))
        .collect();
    assert!(
        backup_attempts.iter().all(|l| l.ends_with(" 0")),
        "{backup_attempts:?}"
    );
    assert!(m.contains("cascade_shadow_similarity_count{chain=\"main\",model=\"backup\"} 5"));
    // The report by shadow.
    let report = h.get("/admin/report?since=1h&by=shadow").await.json();
    let row = &report["rows"][0];
    assert_eq!(
        (
            &row["chain"],
            &row["served_model"],
            &row["shadow_model"],
            &row["calls"]
        ),
        (
            &json!("main"),
            &json!("primary"),
            &json!("backup"),
            &json!(5)
        )
    );
    assert_eq!(row["success_rate"], 1.0);
    assert!(row["avg_similarity"].as_f64().unwrap() > 0.0);
    assert!(row["p50_ms"].as_f64().unwrap() > row["served_p50_ms"].as_f64().unwrap());
}

#[tokio::test]
async fn seeded_sampling_takes_its_share_the_same_way_every_run() {
    let mut runs = Vec::new();
    for _ in 0..2 {
        let dir = TempDir::new("shadow-sample");
        let h = start(&config(&dir, "0.2")).await;
        let mut sampled = Vec::new();
        for i in 0..500 {
            let r = h.chat("main", &[]).await;
            if r.header("x-cascade-shadow").is_some() {
                sampled.push(i);
            }
        }
        let share = sampled.len() as f64 / 500.0;
        assert!((share - 0.2).abs() < 0.04, "{share}");
        runs.push(sampled);
    }
    assert_eq!(runs[0], runs[1], "the same requests are sampled");
}

#[tokio::test]
async fn a_failing_shadow_model_opens_its_breaker_and_moves_last() {
    let store = TestStore::new(Kind::Sqlite, "shadow-breaker").unwrap();
    let yaml = config_on(&store, "1.0").replace(
        "store: {",
        "breaker: { consecutive_failures: 3, cooldown: 1m }\nhealth: { min_calls: 3 }\nstore: {",
    );
    let h = start(&yaml).await;
    h.mock.set("b", "status=500");
    for _ in 0..3 {
        assert_eq!(
            h.chat("main", &[]).await.header("x-cascade-model"),
            Some("primary")
        );
    }
    until(&h, &store, "SELECT COUNT(*) FROM shadow_results", 3).await;
    let health = h.get("/admin/health").await.json();
    let backup = health["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["model"] == "backup")
        .unwrap()
        .clone();
    assert_eq!(
        (&backup["state"], &backup["degraded"]),
        (&json!("open"), &json!(true)),
        "{backup}"
    );
    // No client request was ever served by it, yet the chain now skips it.
    h.mock.set("p", "status=500");
    let r = h.chat("main", &[]).await;
    assert_eq!(r.header("x-cascade-model"), Some("spare"));
    assert_eq!(h.mock.calls("b"), 3, "only the three shadow calls");
    assert_eq!(
        r.header("x-cascade-shadow"),
        None,
        "its breaker is open: skipped"
    );
    let m = h.get("/metrics").await.text;
    assert!(
        m.contains(r#"cascade_shadow_skipped_total{chain="main",reason="breaker_open"} 1"#),
        "{m}"
    );
    assert!(m.contains(
        r#"cascade_shadow_requests_total{chain="main",model="backup",outcome="transient"} 3"#
    ));
}

async fn the_cost_cap_stops_shadow_calls_for_the_hour(kind: Kind) {
    let Some(store) = TestStore::new(kind, "shadow-cap") else {
        return;
    };
    let yaml = config_on(&store, "1.0")
        .replace("backup:  { provider: mock, model_id: b, cost_per_1k_input: 0.001, cost_per_1k_output: 0.002 }",
                 "backup:  { provider: mock, model_id: b, cost_per_1k_input: 1.0, cost_per_1k_output: 1.0 }")
        .replace("max_inflight: 64", "max_inflight: 64, max_cost_per_hour: 0.05");
    let h = start(&yaml).await;
    let mut shadowed = 0;
    for _ in 0..5 {
        let r = h.chat("main", &[]).await;
        shadowed += usize::from(r.header("x-cascade-shadow").is_some());
        h.state.shadow.drain(Duration::from_secs(5)).await;
    }
    assert_eq!(
        shadowed, 1,
        "one call (about $0.03) fits under $0.05, a second would not"
    );
    assert_eq!(h.mock.calls("b"), 1);
    let m = h.get("/metrics").await.text;
    assert!(
        m.contains(r#"cascade_shadow_skipped_total{chain="main",reason="cost_cap"} 4"#),
        "{m}"
    );
    let conn = until(&h, &store, "SELECT COUNT(*) FROM shadow_results", 1).await;
    let spent = conn
        .rows("SELECT SUM(cost_usd) AS spent FROM shadow_results")
        .await[0]["spent"]
        .as_f64()
        .unwrap();
    assert!(spent > 0.0 && spent <= 0.05, "{spent}");
}

#[tokio::test]
async fn shadow_calls_never_touch_the_cache_or_the_other_headers() {
    let dir = TempDir::new("shadow-cache");
    let yaml = config(&dir, "1.0").replace(
        "    shadow: { models: [backup], sample: 1.0, max_inflight: 64 }",
        "    shadow: { models: [backup], sample: 1.0, max_inflight: 64 }\n    cache: { mode: all }",
    );
    let h = start(&yaml).await;
    let first = h.chat("main", &[]).await;
    assert_eq!(first.header("x-cascade-shadow"), Some("backup"));
    h.state.shadow.drain(Duration::from_secs(5)).await;
    let hit = h.chat("main", &[]).await;
    assert_eq!(hit.header("x-cascade-cache"), Some("hit"));
    assert_eq!(
        hit.header("x-cascade-model"),
        Some("primary"),
        "the cache holds the served answer"
    );
    assert_eq!(
        hit.header("x-cascade-shadow"),
        None,
        "hits are never sampled"
    );
    assert_eq!(h.mock.calls("b"), 1);
    // Beside `x-cascade-shadow`, the headers are those of an unsampled chain.
    let plain = h.chat("plain", &[]).await;
    let names = |r: &common::Reply| {
        let mut n: Vec<String> = r
            .headers
            .keys()
            .map(|k| k.as_str().to_string())
            .filter(|k| k.starts_with("x-cascade-") && k != "x-cascade-shadow")
            .collect();
        n.sort();
        n
    };
    assert_eq!(names(&first), names(&plain));
    assert_eq!(first.json()["choices"], plain.json()["choices"]);
}

#[tokio::test]
async fn shutdown_waits_for_shadow_calls_in_flight() {
    let dir = TempDir::new("shadow-drain");
    let h = start(&config(&dir, "1.0")).await;
    h.mock.set("b", "latency=300ms");
    assert_eq!(
        h.chat("main", &[]).await.header("x-cascade-shadow"),
        Some("backup")
    );
    assert_eq!(h.state.shadow.inflight(), 1);
    let t = Instant::now();
    h.state.shadow.drain(Duration::from_secs(5)).await;
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(h.state.shadow.inflight(), 0);
    // A call that outlives the limit: the drain gives up on time.
    h.mock.set("b", "stall");
    assert_eq!(
        h.chat("main", &[]).await.header("x-cascade-shadow"),
        Some("backup")
    );
    let t = Instant::now();
    h.state.shadow.drain(Duration::from_millis(200)).await;
    assert!(t.elapsed() < Duration::from_secs(1));
    assert_eq!(h.state.shadow.inflight(), 1);
}

async fn json_and_tool_answers_are_judged(kind: Kind) {
    let Some(store) = TestStore::new(kind, "shadow-judge") else {
        return;
    };
    let h = start(&config_on(&store, "1.0")).await;
    // JSON asked for: the served answer parses, the shadow's does not.
    h.mock.set("p", r#"content={"a":1}"#);
    h.mock.set("b", "content=not json");
    let body = json!({"model": "main", "response_format": {"type": "json_object"},
                      "messages": [{"role": "user", "content": "json please"}]});
    let r = h.post_raw(body.to_string(), &[]).await;
    assert_eq!(
        (r.status, r.header("x-cascade-shadow")),
        (200, Some("backup"))
    );
    // Tools: both call the same one.
    h.mock.set("p", "tool=get_weather");
    h.mock.set("b", "tool=get_weather");
    let tools = json!({"model": "main", "messages": [{"role": "user", "content": "weather?"}],
                       "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]});
    let t = h.post_raw(tools.to_string(), &[]).await;
    assert_eq!(t.status, 200);
    let conn = until(&h, &store, "SELECT COUNT(*) FROM shadow_results", 2).await;
    let rows = shadow_rows(&conn).await;
    let json_row = rows
        .iter()
        .find(|x| x["request_id"] == json!(r.header("x-request-id").unwrap()))
        .unwrap();
    assert_eq!(
        (
            &json_row["success"],
            &json_row["error_type"],
            &json_row["json_valid"]
        ),
        (&json!(0), &json!("invalid_output"), &json!(0))
    );
    let tool_row = rows
        .iter()
        .find(|x| x["request_id"] == json!(t.header("x-request-id").unwrap()))
        .unwrap();
    assert_eq!(
        (&tool_row["success"], &tool_row["tool_calls_match"]),
        (&json!(1), &json!(1)),
        "{tool_row}"
    );
    assert_eq!(tool_row["served_finish_reason"], "tool_calls");
}

#[test]
fn shadow_config_errors_name_their_path() {
    let base = |shadow: &str| {
        format!(
            r#"
store: {{ enabled: false }}
providers:
  mock: {{ kind: openai, base_url: "http://127.0.0.1:9/v1" }}
models:
  a: {{ provider: mock, model_id: a }}
  b: {{ provider: mock, model_id: b }}
chains:
  main:
    models: [a, b]
    shadow: {shadow}
"#
        )
    };
    for (shadow, path) in [
        ("{ models: [b, b] }", "chains.main.shadow.models[1]"),
        ("{ models: [nope] }", "chains.main.shadow.models[0]"),
        ("{ sample: 1.5 }", "chains.main.shadow.sample"),
        ("{ max_inflight: 0 }", "chains.main.shadow.max_inflight"),
        (
            "{ max_cost_per_hour: -1 }",
            "chains.main.shadow.max_cost_per_hour",
        ),
    ] {
        let e = cascade::config::Config::from_yaml_with_env(&base(shadow), &|_| None)
            .err()
            .unwrap_or_else(|| panic!("{shadow} was accepted"))
            .to_string();
        assert!(e.contains(path), "{shadow}: {e}");
    }
    let ok =
        cascade::config::Config::from_yaml_with_env(&base("{ sample: 0.5 }"), &|_| None).unwrap();
    let plan = ok.chains["main"].shadow.as_ref().unwrap();
    let names: Vec<&str> = plan.targets.iter().map(|t| &*t.model.name).collect();
    assert_eq!(
        (names, plan.sample, plan.max_inflight),
        (vec!["b"], 0.5, 32),
        "default: the chain after its first"
    );
}

on_both_stores!(
    a_slow_shadow_never_delays_the_answer_and_is_compared,
    the_cost_cap_stops_shadow_calls_for_the_hour,
    json_and_tool_answers_are_judged,
);
