//! The console's JSON (`/admin/chains`, `/admin/events`, `/admin/stats`) against a live
//! gateway and mock: live order after health and breakers, fallbacks from the store.

mod common;

use std::time::Duration;

use common::stores::{Kind, TestStore};
use common::{start, TempDir};
use serde_json::{json, Value};

fn config(dir: &TempDir) -> String {
    config_on(&format!("path: \"{}\"", dir.path().join("c.db").display()))
}

fn config_on(store: &str) -> String {
    format!(
        r#"
server: {{ request_timeout: 30s }}
retry: {{ max_retries: 0 }}
breaker: {{ consecutive_failures: 100, failure_rate: 1.0 }}
health: {{ window: 5m, min_calls: 3, degraded_below: 0.8 }}
store: {{ {store}, flush_interval: 10ms }}
providers:
  mock: {{ kind: openai, base_url: "{{mock}}" }}
models:
  a: {{ provider: mock, model_id: a }}
  b: {{ provider: mock, model_id: b }}
  c: {{ provider: mock, model_id: c, breaker: {{ consecutive_failures: 1, cooldown: 60s }} }}
  d: {{ provider: mock, model_id: d, fallbacks: [a] }}
chains:
  degrading: [a, b]
  breaking:
    models: [c, d]
    strategy: sequential
"#
    )
}

fn targets(chains: &Value, name: &str) -> Vec<Value> {
    chains["chains"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no chain {name}: {chains}"))["targets"]
        .as_array()
        .unwrap()
        .clone()
}

fn order(targets: &[Value]) -> Vec<(&str, &str)> {
    targets
        .iter()
        .map(|t| (t["model"].as_str().unwrap(), t["state"].as_str().unwrap()))
        .collect()
}

async fn chains_show_the_live_order_and_events_the_fallbacks(kind: Kind) {
    let Some(store) = TestStore::new(kind, "console") else {
        return;
    };
    let h = start(&config_on(&store.yaml())).await;

    // Nothing yet: configured order, all closed, no rates.
    let chains = h.get("/admin/chains").await.json();
    assert_eq!(
        order(&targets(&chains, "degrading")),
        [("a", "closed"), ("b", "closed")]
    );
    assert_eq!(
        targets(&chains, "degrading")[0]["success_rate"],
        Value::Null
    );
    assert_eq!(chains["chains"][1]["strategy"], "sequential");
    // A model with fallbacks is a chain a client can name, listed after the named ones.
    assert_eq!(chains["chains"][1]["implicit"], false);
    assert_eq!(
        order(&targets(&chains, "d")),
        [("d", "closed"), ("a", "closed")]
    );
    assert_eq!(chains["chains"][2]["implicit"], true);
    assert_eq!(
        chains["chains"].as_array().map(Vec::len),
        Some(3),
        "{chains}"
    );

    // `a` fails every call: after three it is degraded and moved last (closed).
    h.mock.set("a", "status=500");
    let mut fell_back = Vec::new();
    for _ in 0..3 {
        let r = h.chat("degrading", &[]).await;
        assert_eq!(r.header("x-cascade-model"), Some("b"));
        fell_back.push(r.header("x-request-id").unwrap().to_string());
    }
    // `c` fails once: its breaker opens, and it stays in place, marked open.
    h.mock.set("c", "status=503");
    let r = h.chat("breaking", &[]).await;
    assert_eq!(r.header("x-cascade-model"), Some("d"));
    fell_back.push(r.header("x-request-id").unwrap().to_string());

    let chains = h.get("/admin/chains").await.json();
    let degrading = targets(&chains, "degrading");
    assert_eq!(order(&degrading), [("b", "closed"), ("a", "closed")]);
    assert_eq!(
        (
            &degrading[1]["degraded"],
            &degrading[1]["success_rate"],
            &degrading[1]["position"],
            &degrading[1]["configured_position"]
        ),
        (&json!(true), &json!(0.0), &json!(1), &json!(0))
    );
    assert_eq!(degrading[0]["success_rate"], 1.0);
    assert!(degrading[0]["p50_ms"].is_number());
    let breaking = targets(&chains, "breaking");
    assert_eq!(order(&breaking), [("c", "open"), ("d", "closed")]);
    assert!(breaking[0]["retry_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(breaking[1]["retry_at"], Value::Null);

    // The fallbacks, newest first, from the store.
    h.state.store.clone().unwrap().flush().await;
    let events = h.get("/admin/events?limit=50").await;
    assert_eq!(events.status, 200, "{}", events.text);
    let events = events.json()["events"].as_array().unwrap().clone();
    assert_eq!(events.len(), 4, "{events:?}");
    let newest = &events[0];
    assert_eq!(
        (
            &newest["request_id"],
            &newest["chain"],
            &newest["from"],
            &newest["to"],
            &newest["reason"],
            &newest["status"]
        ),
        (
            &json!(fell_back[3]),
            &json!("breaking"),
            &json!("c"),
            &json!("d"),
            &json!("transient"),
            &json!(503)
        )
    );
    assert!(newest["timestamp"].as_str().unwrap().ends_with('Z'));
    let ids: Vec<&str> = events
        .iter()
        .map(|e| e["request_id"].as_str().unwrap())
        .collect();
    let mut want: Vec<&str> = fell_back.iter().map(String::as_str).collect();
    want.reverse();
    assert_eq!(ids, want);
    assert_eq!(events[1]["status"], 500);
    let one = h.get("/admin/events?limit=1").await.json();
    assert_eq!(one["events"].as_array().unwrap().len(), 1);
    for bad in ["0", "501", "x"] {
        let r = h.get(&format!("/admin/events?limit={bad}")).await;
        assert_eq!(r.status, 400, "{bad}");
        assert_eq!(r.json()["error"]["param"], "limit");
    }
}

#[tokio::test]
async fn stats_sum_up_the_gateway() {
    let dir = TempDir::new("console-stats");
    let h = start(&config(&dir).replace("retry: {", "cache: { mode: all }\nretry: {")).await;
    let first = h.get("/admin/stats").await.json();
    assert_eq!(first["requests"], 0);
    assert_eq!(first["cache_hit_ratio"], Value::Null);
    assert_eq!(first["overhead_p99_ms"], Value::Null);
    assert_eq!(first["last_reload"], Value::Null);
    assert_eq!(first["config_hash"], json!(h.state.config().hash));
    assert_eq!(first["version"], env!("CARGO_PKG_VERSION"));
    for _ in 0..4 {
        assert_eq!(h.chat("degrading", &[]).await.status, 200);
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    let stats = h.get("/admin/stats").await.json();
    assert_eq!(stats["requests"], 4, "{stats}");
    // The same body four times: one miss, then three hits.
    assert_eq!(stats["cache_hit_ratio"], 0.75, "{stats}");
    let rps = stats["requests_per_second"].as_f64().unwrap();
    assert!(rps > 0.0, "{stats}");
    assert!(stats["overhead_p99_ms"].as_f64().unwrap() > 0.0, "{stats}");
    assert_eq!(
        (&stats["store"], &stats["store_dropped"]),
        (&json!("on"), &json!(0))
    );
    assert!(stats["uptime_s"].as_i64().unwrap() >= 0);
}

on_both_stores!(chains_show_the_live_order_and_events_the_fallbacks);
