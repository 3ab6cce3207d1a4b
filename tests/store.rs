//! The store against a live gateway and mock: one `requests` row per client request
//! and one `model_calls` row per upstream call the mock counted, with the right kind,
//! class, tokens and cost; health restored across a restart; faults that drop rows
//! count them and never cost an answer.

mod common;

use std::time::Duration;

use cascade::store::report::{self, GroupBy, ReportQuery};
use common::stores::{Db, Kind, TestStore};
use common::{start, TempDir};
use rusqlite::Connection;
use serde_json::{json, Value};

const CONFIG: &str = r#"
server: { request_timeout: 60s, attempt_timeout: 10s }
retry: { max_retries: 0, seed: 1 }
breaker: { consecutive_failures: 1000, failure_rate: 1.0 }
store: { path: "{db}", flush_interval: 20ms }
cache: { mode: deterministic }
providers:
  mock: { kind: openai, base_url: "{mock}", api_key: "sk-test-SECRET-123" }
  claude: { kind: anthropic, base_url: "http://{mock_addr}", api_key: "sk-ant-SECRET-456" }
  quiet: { kind: openai_compatible, base_url: "{mock}", drop_params: [stream_options] }
models:
  primary:   { provider: mock, model_id: p, cost_per_1k_input: 0.01, cost_per_1k_output: 0.02, cost_per_1k_cached_input: 0.005 }
  secondary: { provider: mock, model_id: s, cost_per_1k_input: 0.001, cost_per_1k_output: 0.002 }
  tertiary:  { provider: mock, model_id: t, cost_per_1k_input: 0.003, cost_per_1k_output: 0.004 }
  sonnet:    { provider: claude, model_id: c, cost_per_1k_input: 0.003, cost_per_1k_output: 0.015, cost_per_1k_cached_input: 0.0003 }
  plain:     { provider: quiet, model_id: q, cost_per_1k_input: 0.001, cost_per_1k_output: 0.001 }
chains:
  main: [primary, secondary, tertiary]
  cross: [primary, sonnet]
  quiet: [plain]
"#;

fn config(store: &TestStore) -> String {
    CONFIG.replace("path: \"{db}\"", &store.yaml())
}

/// Waits until the store holds `n` request rows (streams end asynchronously).
async fn settle(h: &common::Harness, store: &TestStore, n: i64) -> Db {
    let writer = h.state.store.clone().unwrap();
    let conn = store.db().await;
    for _ in 0..200 {
        writer.flush().await;
        if conn.count("SELECT COUNT(*) FROM requests").await >= n {
            return conn;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the store never reached {n} request rows");
}

/// The `requests` row of the answer `r`.
async fn request_row(conn: &Db, r: &common::Reply) -> Value {
    let id = r.header("x-request-id").expect("x-request-id");
    let mut found = conn
        .rows(&format!("SELECT * FROM requests WHERE request_id = '{id}'"))
        .await;
    assert_eq!(found.len(), 1, "one row for request {id}");
    found.remove(0)
}

async fn calls_of(conn: &Db, r: &common::Reply) -> Vec<Value> {
    let id = r.header("x-request-id").expect("x-request-id");
    conn.rows(&format!(
        "SELECT * FROM model_calls WHERE request_id = '{id}' ORDER BY id"
    ))
    .await
}

/// `(model_name, kind, success, error_type)` of each call, in the order they ended.
fn summary(calls: &[Value]) -> Vec<(String, String, i64, Option<String>)> {
    calls
        .iter()
        .map(|c| {
            (
                c["model_name"].as_str().unwrap().to_string(),
                c["kind"].as_str().unwrap().to_string(),
                c["success"].as_i64().unwrap(),
                c["error_type"].as_str().map(str::to_string),
            )
        })
        .collect()
}

fn call(
    model: &str,
    kind: &str,
    ok: bool,
    error: Option<&str>,
) -> (String, String, i64, Option<String>) {
    (
        model.into(),
        kind.into(),
        i64::from(ok),
        error.map(str::to_string),
    )
}

async fn every_request_and_call_has_its_row(kind: Kind) {
    let Some(store) = TestStore::new(kind, "store-rows") else {
        return;
    };
    let h = start(&config(&store)).await;
    let mut sent = 0;

    // 1. The primary answers.
    let ok = h.chat("main", &[]).await;
    assert_eq!(ok.status, 200);
    sent += 1;
    // 2. A fallback.
    h.mock.set("p", "status=500");
    let fell_back = h.chat("main", &[]).await;
    assert_eq!(fell_back.header("x-cascade-model"), Some("secondary"));
    sent += 1;
    // 3. Fail fast on the caller's own bad request.
    h.mock.set("p", "status=400");
    let bad = h.chat("main", &[]).await;
    assert_eq!(bad.status, 400);
    sent += 1;
    // 4. Every target fails.
    for m in ["p", "s", "t"] {
        h.mock.set(m, "status=500");
    }
    let all_failed = h.chat("main", &[]).await;
    assert_eq!(all_failed.status, 502);
    sent += 1;
    for m in ["s", "t"] {
        h.mock.set(m, "");
    }
    // 5. The deadline passes.
    h.mock.set("p", "stall");
    let late = h.chat("main", &[("x-cascade-timeout-ms", "150")]).await;
    assert_eq!(late.status, 504);
    sent += 1;
    h.mock.set("p", "");
    // 6. A miss, then a cache hit (temperature 0 is cacheable).
    let body = json!({"model": "main", "temperature": 0, "messages": [{"role": "user", "content": "cache me"}]});
    let miss = h.post_raw(body.to_string(), &[]).await;
    let hit = h.post_raw(body.to_string(), &[]).await;
    assert_eq!(
        (
            miss.header("x-cascade-cache"),
            hit.header("x-cascade-cache")
        ),
        (Some("miss"), Some("hit"))
    );
    sent += 2;
    // 7. A stream.
    let streamed = h.chat_stream("main", &[]).await;
    assert!(streamed.text.ends_with("data: [DONE]\n\n"));
    sent += 1;
    // 8. A stream cut after its commit point.
    h.mock.set("p", "chunks=4,cut_after=2");
    let cut = h.chat_stream("main", &[]).await;
    assert_eq!(cut.status, 200);
    assert!(!cut.text.contains("[DONE]"));
    sent += 1;
    // 9. A client that leaves mid-stream.
    h.mock.set("p", "chunks=50,gap=50ms");
    let resp = h
        .http
        .post(h.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(common::chat_body("main", true).to_string())
        .send()
        .await
        .unwrap();
    let gone_id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let mut resp = resp;
    assert!(resp.chunk().await.unwrap().is_some());
    drop(resp);
    sent += 1;
    // 10. Our own refusals: bad JSON, an unknown model.
    let not_json = h.post_raw("{oops", &[]).await;
    assert_eq!(not_json.status, 400);
    let unknown = h.chat("nope", &[]).await;
    assert_eq!(unknown.status, 404);
    sent += 2;

    let conn = settle(&h, &store, sent).await;
    let n = conn.count("SELECT COUNT(*) FROM requests").await;
    assert_eq!(n, sent, "exactly one row per request");
    let calls = conn.count("SELECT COUNT(*) FROM model_calls").await;
    assert_eq!(
        calls as u64,
        h.mock.total_calls(),
        "one row per upstream call"
    );

    let r = request_row(&conn, &ok).await;
    assert_eq!(
        (
            &r["status"],
            &r["model_name"],
            &r["provider"],
            &r["attempts"],
            &r["fallbacks"],
            &r["cache"],
            &r["surface"],
            &r["chain"]
        ),
        (
            &json!(200),
            &json!("primary"),
            &json!("mock"),
            &json!(1),
            &json!(0),
            &json!("bypass"),
            &json!("chat"),
            &json!("main")
        )
    );
    assert_eq!(r["error_type"], Value::Null);
    assert!(r["timestamp"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        r["timestamp"].as_str().unwrap().len(),
        24,
        "RFC 3339 with milliseconds"
    );
    assert_eq!(
        summary(&calls_of(&conn, &ok).await),
        [call("primary", "primary", true, None)]
    );

    let r = request_row(&conn, &fell_back).await;
    assert_eq!(
        (&r["model_name"], &r["attempts"], &r["fallbacks"]),
        (&json!("secondary"), &json!(2), &json!(1))
    );
    let c = calls_of(&conn, &fell_back).await;
    assert_eq!(
        summary(&c),
        [
            call("primary", "primary", false, Some("transient")),
            call("secondary", "fallback", true, None)
        ]
    );
    assert_eq!(
        (&c[0]["status"], &c[0]["cost_usd"]),
        (&json!(500), &json!(0.0))
    );

    let r = request_row(&conn, &bad).await;
    assert_eq!(
        (&r["status"], &r["model_name"], &r["error_type"]),
        (&json!(400), &Value::Null, &json!("bad_request"))
    );
    assert_eq!(
        summary(&calls_of(&conn, &bad).await),
        [call("primary", "primary", false, Some("bad_request"))]
    );

    let r = request_row(&conn, &all_failed).await;
    assert_eq!(
        (
            &r["status"],
            &r["attempts"],
            &r["fallbacks"],
            &r["error_type"],
            &r["provider"]
        ),
        (
            &json!(502),
            &json!(3),
            &json!(2),
            &json!("transient"),
            &Value::Null
        )
    );
    assert_eq!(
        summary(&calls_of(&conn, &all_failed).await),
        [
            call("primary", "primary", false, Some("transient")),
            call("secondary", "fallback", false, Some("transient")),
            call("tertiary", "fallback", false, Some("transient")),
        ]
    );

    let r = request_row(&conn, &late).await;
    assert_eq!(
        (&r["status"], &r["error_type"]),
        (&json!(504), &json!("timeout"))
    );
    let c = calls_of(&conn, &late).await;
    assert_eq!(
        summary(&c),
        [call("primary", "primary", false, Some("timeout"))]
    );
    assert_eq!(c[0]["deadline_cut"], 1);

    let r = request_row(&conn, &miss).await;
    assert_eq!(r["cache"], "miss");
    let r = request_row(&conn, &hit).await;
    assert_eq!(
        (
            &r["cache"],
            &r["attempts"],
            &r["cost_usd"],
            &r["primary_cost_usd"],
            &r["model_name"]
        ),
        (
            &json!("hit"),
            &json!(0),
            &json!(0.0),
            &json!(0.0),
            &json!("primary")
        )
    );
    assert!(
        calls_of(&conn, &hit).await.is_empty(),
        "a hit makes no call"
    );

    let r = request_row(&conn, &streamed).await;
    assert_eq!(
        (&r["stream"], &r["status"], &r["error_type"]),
        (&json!(1), &json!(200), &Value::Null)
    );
    assert!(r["ttft_ms"].as_f64().unwrap() <= r["latency_ms"].as_f64().unwrap());
    let c = calls_of(&conn, &streamed).await;
    assert_eq!(summary(&c), [call("primary", "primary", true, None)]);
    assert!(c[0]["ttft_ms"].is_number());
    assert!(
        c[0]["output_tokens"].as_i64().unwrap() > 0,
        "stream tokens counted"
    );

    let r = request_row(&conn, &cut).await;
    assert_eq!(
        (&r["status"], &r["error_type"], &r["model_name"]),
        (&json!(200), &json!("transient"), &json!("primary"))
    );
    assert_eq!(
        summary(&calls_of(&conn, &cut).await),
        [call("primary", "primary", false, Some("transient"))]
    );

    let gone = conn
        .rows(&format!(
            "SELECT * FROM requests WHERE request_id = '{gone_id}'"
        ))
        .await;
    assert_eq!(gone.len(), 1);
    assert_eq!(
        (&gone[0]["error_type"], &gone[0]["stream"]),
        (&json!("cancelled"), &json!(1))
    );
    let gone_calls = conn
        .rows(&format!(
            "SELECT * FROM model_calls WHERE request_id = '{gone_id}'"
        ))
        .await;
    assert_eq!(
        summary(&gone_calls),
        [call("primary", "primary", false, Some("cancelled"))]
    );

    for (reply, class) in [(&not_json, "bad_request"), (&unknown, "not_found")] {
        let r = request_row(&conn, reply).await;
        assert_eq!(
            (&r["chain"], &r["error_type"], &r["attempts"]),
            (&Value::Null, &json!(class), &json!(0))
        );
    }

    // The store's metrics agree.
    let metrics = h.get("/metrics").await.text;
    assert!(
        metrics.contains(&format!(
            "cascade_store_rows_total{{table=\"requests\"}} {sent}"
        )),
        "{metrics}"
    );
    assert!(metrics.contains("cascade_store_dropped_total 0"));
}

async fn retries_races_and_hedges_have_their_kinds(kind: Kind) {
    let Some(store) = TestStore::new(kind, "store-kinds") else {
        return;
    };
    let yaml = config(&store).replace(
        "  quiet: [plain]\n",
        "  quiet: [plain]
  retried: { models: [primary, secondary], retry: { max_retries: 1, base: 1ms, cap: 1ms } }
  raced: { models: [primary, secondary], strategy: race }
  hedged: { models: [primary, secondary], strategy: hedge, hedge_delay: 50ms }
",
    );
    let h = start(&yaml).await;
    h.mock.set("p", "fail_first=1");
    let retried = h.chat("retried", &[]).await;
    assert_eq!(retried.header("x-cascade-model"), Some("primary"));
    h.mock.set("p", "latency=300ms");
    let raced = h.chat("raced", &[]).await;
    assert_eq!(raced.header("x-cascade-model"), Some("secondary"));
    let hedged = h.chat("hedged", &[]).await;
    assert_eq!(hedged.header("x-cascade-model"), Some("secondary"));
    let conn = settle(&h, &store, 3).await;
    assert_eq!(
        summary(&calls_of(&conn, &retried).await),
        [
            call("primary", "primary", false, Some("transient")),
            call("primary", "retry", true, None)
        ]
    );
    assert_eq!(
        summary(&calls_of(&conn, &raced).await),
        [
            call("secondary", "race", true, None),
            call("primary", "primary", false, Some("cancelled"))
        ]
    );
    assert_eq!(
        summary(&calls_of(&conn, &hedged).await),
        [
            call("secondary", "hedge", true, None),
            call("primary", "primary", false, Some("cancelled"))
        ]
    );
}

async fn streams_count_tokens_without_showing_the_usage_chunk(kind: Kind) {
    let Some(store) = TestStore::new(kind, "store-usage") else {
        return;
    };
    let h = start(&config(&store)).await;
    h.mock.set("p", "cached=3");
    let plain = h.chat_stream("main", &[]).await;
    let sent = h.mock.bodies("p").pop().unwrap();
    assert_eq!(
        sent["stream_options"]["include_usage"], true,
        "cascade asks for usage"
    );
    assert!(
        plain.chunks().iter().all(|c| c["usage"].is_null()),
        "the client did not ask for usage: {}",
        plain.text
    );
    assert!(plain
        .chunks()
        .iter()
        .all(|c| !c["choices"].as_array().unwrap().is_empty()));

    let asked = h
        .post_raw(
            json!({"model": "main", "stream": true, "stream_options": {"include_usage": true},
                   "messages": [{"role": "user", "content": "hello"}]})
            .to_string(),
            &[],
        )
        .await;
    let last = asked.chunks().pop().unwrap();
    assert!(
        last["usage"]["prompt_tokens"].as_u64().unwrap() > 0,
        "{}",
        asked.text
    );

    // Anthropic streams carry usage in their own events.
    h.mock.set("p", "status=503");
    h.mock.set("c", "cached=2");
    let claude = h.chat_stream("cross", &[]).await;
    assert_eq!(claude.header("x-cascade-model"), Some("sonnet"));
    // A provider whose server rejects stream_options: tokens unknown, never guessed.
    let quiet = h.chat_stream("quiet", &[]).await;
    assert!(h
        .mock
        .bodies("q")
        .pop()
        .unwrap()
        .get("stream_options")
        .is_none());

    let conn = settle(&h, &store, 4).await;
    for (reply, model, price_in, price_cached, price_out) in [
        (&plain, "primary", 0.01, 0.005, 0.02),
        (&asked, "primary", 0.01, 0.005, 0.02),
        (&claude, "sonnet", 0.003, 0.0003, 0.015),
    ] {
        let r = request_row(&conn, reply).await;
        assert_eq!(r["model_name"], model);
        let input = r["input_tokens"].as_f64().unwrap();
        let cached = r["cached_input_tokens"].as_f64().unwrap();
        let output = r["output_tokens"].as_f64().unwrap();
        assert!(input > 0.0 && output > 0.0, "{r}");
        let want =
            ((input - cached) * price_in + cached * price_cached + output * price_out) / 1000.0;
        assert!(
            (r["cost_usd"].as_f64().unwrap() - want).abs() < 1e-9,
            "{r} want {want}"
        );
        let calls = calls_of(&conn, reply).await;
        let answered = calls.iter().find(|c| c["success"] == 1).unwrap();
        assert_eq!(answered["input_tokens"], r["input_tokens"]);
        assert_eq!(answered["cost_usd"], r["cost_usd"]);
    }
    let r = request_row(&conn, &plain).await;
    assert_eq!(r["cached_input_tokens"], 3);
    let r = request_row(&conn, &claude).await;
    assert_eq!(r["cached_input_tokens"], 2, "Anthropic's cache reads");
    // The primary's price for the same tokens: the fallback's cost differential.
    let input = r["input_tokens"].as_f64().unwrap();
    let output = r["output_tokens"].as_f64().unwrap();
    let primary = ((input - 2.0) * 0.01 + 2.0 * 0.005 + output * 0.02) / 1000.0;
    assert!(
        (r["primary_cost_usd"].as_f64().unwrap() - primary).abs() < 1e-9,
        "{r}"
    );
    let r = request_row(&conn, &quiet).await;
    assert_eq!(
        (&r["input_tokens"], &r["cost_usd"]),
        (&Value::Null, &json!(0.0))
    );
}

async fn the_report_sums_what_fallbacks_cost(kind: Kind) {
    let Some(store) = TestStore::new(kind, "store-report") else {
        return;
    };
    let h = start(&config(&store)).await;
    for _ in 0..3 {
        assert_eq!(h.chat("main", &[]).await.status, 200);
    }
    h.mock.set("p", "status=500");
    for _ in 0..4 {
        assert_eq!(
            h.chat("main", &[]).await.header("x-cascade-model"),
            Some("secondary")
        );
    }
    h.mock.set("p", "status=503");
    for _ in 0..2 {
        assert_eq!(
            h.chat("cross", &[]).await.header("x-cascade-model"),
            Some("sonnet")
        );
    }
    let conn = settle(&h, &store, 9).await;
    let sums = conn
        .rows("SELECT SUM(cost_usd) AS cost, SUM(primary_cost_usd) AS primary_cost FROM requests WHERE chain = 'main'")
        .await;
    let (cost, primary) = (
        sums[0]["cost"].as_f64().unwrap(),
        sums[0]["primary_cost"].as_f64().unwrap(),
    );
    assert!(primary > cost, "the fallback is cheaper than the primary");

    let now = cascade::clock::now_ms();
    let q = |by| ReportQuery {
        since_ms: now - 3_600_000,
        until_ms: now + 60_000,
        by,
        degraded_below: 0.8,
        min_calls: 3,
    };
    let by_chain = report::run(
        &h.state.config().store.as_ref().unwrap().backend,
        &q(GroupBy::Chain),
    )
    .unwrap();
    let main = by_chain["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["chain"] == "main")
        .unwrap()
        .clone();
    assert_eq!(main["requests"], 7);
    assert_eq!(main["success_rate"], 1.0);
    assert!((main["fallback_rate"].as_f64().unwrap() - 4.0 / 7.0).abs() < 1e-3);
    let delta = main["fallback_cost_delta_usd"].as_f64().unwrap();
    assert!(
        (delta - (cost - primary)).abs() < 1e-9,
        "{delta} vs {}",
        cost - primary
    );
    assert!(delta < 0.0);
    assert_eq!(by_chain["totals"]["requests"], 9);

    let by_model = report::run(
        &h.state.config().store.as_ref().unwrap().backend,
        &q(GroupBy::Model),
    )
    .unwrap();
    let model = |name: &str| {
        by_model["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["model"] == name)
            .unwrap()
            .clone()
    };
    let p = model("primary");
    assert_eq!((&p["calls"], &p["degraded"]), (&json!(9), &json!(true)));
    assert_eq!(p["errors"], json!({"transient": 6}));
    assert_eq!(model("secondary")["served_as_fallback"], 4);
    assert_eq!(model("sonnet")["served_as_fallback"], 2);

    // The running gateway answers the same report.
    let live = h.get("/admin/report?since=1h&by=chain").await;
    assert_eq!(live.status, 200, "{}", live.text);
    assert_eq!(live.json()["rows"], by_chain["rows"]);
    let bad = h.get("/admin/report?by=week").await;
    assert_eq!(bad.status, 400);
}

async fn a_restart_remembers_a_degraded_model(kind: Kind) {
    let Some(store) = TestStore::new(kind, "store-restart") else {
        return;
    };
    let yaml = config(&store).replace(
        "store: {",
        "health: { window: 5m, min_calls: 5, degraded_below: 0.8 }\nstore: {",
    );
    {
        let h = start(&yaml).await;
        h.mock.set("p", "status=500");
        for _ in 0..6 {
            assert_eq!(
                h.chat("main", &[]).await.header("x-cascade-model"),
                Some("secondary")
            );
        }
        let health = h.get("/admin/health").await.json();
        let p = &health["targets"][0];
        assert_eq!(
            (&p["model"], &p["degraded"]),
            (&json!("primary"), &json!(true))
        );
        let conn = settle(&h, &store, 6).await;
        let n = conn
            .count("SELECT COUNT(*) FROM model_calls WHERE model_name = 'primary'")
            .await;
        // After five failures it is degraded and moved last: the sixth request went
        // straight to the secondary.
        assert_eq!(n, 5, "{:?}", conn.rows("SELECT * FROM model_calls").await);
    }
    // A new gateway on the same store, and a primary that would answer.
    let h = start(&yaml).await;
    let health = h.get("/admin/health").await.json();
    let p = &health["targets"][0];
    assert_eq!(
        (&p["degraded"], &p["calls"]),
        (&json!(true), &json!(5)),
        "{health}"
    );
    assert!(
        p["avg_latency_ms"].is_null(),
        "no successful call to average"
    );
    let r = h.chat("main", &[]).await;
    assert_eq!(r.header("x-cascade-model"), Some("secondary"), "moved last");
    assert_eq!(h.mock.calls("p"), 0, "before any new call to it");
}

#[tokio::test]
async fn a_deleted_store_is_created_again_and_a_locked_one_drops_and_counts() {
    let store = TestStore::new(Kind::Sqlite, "store-faults").unwrap();
    let path = store.path();
    let h = start(&config(&store)).await;
    for _ in 0..3 {
        assert_eq!(h.chat("main", &[]).await.status, 200);
    }
    settle(&h, &store, 3).await;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    for _ in 0..5 {
        assert_eq!(h.chat("main", &[]).await.status, 200);
    }
    let conn = settle(&h, &store, 5).await;
    let n = conn.count("SELECT COUNT(*) FROM requests").await;
    assert_eq!(n, 5, "the new file holds what came after the delete");

    // Another connection holds the write lock: answers go on, rows are dropped and counted.
    let locker = Connection::open(&path).unwrap();
    locker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    for _ in 0..10 {
        assert_eq!(h.chat("main", &[]).await.status, 200);
    }
    h.state.store.clone().unwrap().flush().await;
    locker.execute_batch("COMMIT").unwrap();
    drop(locker);
    for _ in 0..2 {
        assert_eq!(h.chat("main", &[]).await.status, 200);
    }
    let conn = settle(&h, &store, 7).await;
    let requests = conn.count("SELECT COUNT(*) FROM requests").await;
    let calls = conn.count("SELECT COUNT(*) FROM model_calls").await;
    let dropped = h.state.metrics.store.dropped.get();
    assert_eq!(requests, 7, "the rows after the lock was released");
    assert_eq!(dropped, 20, "10 requests and 10 calls lost, and counted");
    assert_eq!(
        requests + calls + dropped as i64,
        2 * 20 - 2 * 3,
        "all but the deleted rows"
    );
}

fn settings(store: &TestStore, retention: Duration, queue: usize) -> cascade::store::StoreSettings {
    cascade::store::StoreSettings {
        backend: store.backend(),
        retention,
        queue,
        flush_interval: Duration::from_millis(10),
    }
}

/// Holds the store's write lock until dropped (SQLite: an exclusive transaction;
/// PostgreSQL: the `requests` table locked in an open transaction).
struct Locker {
    _sqlite: Option<Connection>,
    _pg: Option<tokio_postgres::Client>,
}

async fn lock(store: &TestStore) -> Locker {
    match store.kind {
        Kind::Sqlite => {
            let c = Connection::open(store.path()).unwrap();
            c.execute_batch("BEGIN EXCLUSIVE").unwrap();
            Locker {
                _sqlite: Some(c),
                _pg: None,
            }
        }
        Kind::Postgres => {
            let c = store.pg.as_ref().unwrap().client().await;
            c.batch_execute("BEGIN; LOCK TABLE requests IN ACCESS EXCLUSIVE MODE")
                .await
                .unwrap();
            Locker {
                _sqlite: None,
                _pg: Some(c),
            }
        }
    }
}

async fn a_full_queue_drops_and_counts(kind: Kind) {
    let Some(store) = TestStore::new(kind, "store-queue") else {
        return;
    };
    let metrics = cascade::metrics::Metrics::new();
    let writer = cascade::store::Store::open(
        settings(&store, Duration::from_secs(86_400), 8),
        metrics.store.clone(),
    )
    .unwrap();
    // Hold the lock so the writer stalls on its first batch.
    let locker = lock(&store).await;
    let row = cascade::store::RequestRow {
        request_id: "r".into(),
        arrived_ms: cascade::clock::now_ms(),
        surface: "chat",
        chain: None,
        status: 200,
        model: None,
        provider: None,
        attempts: 0,
        fallbacks: 0,
        cache: "bypass",
        stream: false,
        latency_ms: 1.0,
        ttft_ms: None,
        tokens: None,
        cost_usd: 0.0,
        primary_cost_usd: 0.0,
        error_type: None,
    };
    let started = std::time::Instant::now();
    for _ in 0..1000 {
        writer.record(cascade::store::Row::Request(row.clone()));
    }
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "recording never waits"
    );
    // Let the writer take its first batch and stall on the lock.
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(locker);
    writer.flush().await;
    let written = store
        .db()
        .await
        .count("SELECT COUNT(*) FROM requests")
        .await;
    let dropped = metrics.store.dropped.get() as i64;
    assert!(dropped > 900, "{dropped}");
    assert_eq!(written + dropped, 1000, "every row written or counted");
    assert_eq!(metrics.store.queue_depth.get(), 0);
}

#[test]
fn a_store_directory_that_does_not_exist_is_a_start_error() {
    let yaml = r#"
store: { path: /nonexistent-dir/cascade.db }
providers:
  mock: { kind: openai, base_url: "http://127.0.0.1:9/v1" }
models:
  m: { provider: mock, model_id: m }
"#;
    let config = cascade::config::Config::from_yaml_with_env(yaml, &|_| None).unwrap();
    let e = match cascade::server::AppState::new(std::sync::Arc::new(config)) {
        Ok(_) => panic!("started without its store"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("store.path") && e.contains("/nonexistent-dir"),
        "{e}"
    );
}

async fn retention_deletes_old_rows_at_start(kind: Kind) {
    let Some(store) = TestStore::new(kind, "store-retention") else {
        return;
    };
    let now = cascade::clock::now_ms();
    let day = 86_400_000;
    {
        let metrics = cascade::metrics::Metrics::new();
        let writer = cascade::store::Store::open(
            settings(&store, Duration::from_secs(3650 * 86_400), 1024),
            metrics.store.clone(),
        )
        .unwrap();
        for age_days in [40, 31, 29, 1] {
            writer.record(cascade::store::Row::Call(cascade::store::CallRow {
                started_ms: now - age_days * day,
                request_id: format!("r{age_days}").into(),
                chain: cascade::name::Name::new("c"),
                model: cascade::name::Name::new("m"),
                provider: cascade::name::Name::new("p"),
                kind: cascade::store::CallKind::Primary,
                success: true,
                status: Some(200),
                error_type: None,
                latency_ms: 1.0,
                ttft_ms: None,
                tokens: None,
                cost_usd: 0.0,
                deadline_cut: false,
            }));
        }
        writer.flush().await;
    }
    let metrics = cascade::metrics::Metrics::new();
    let writer = cascade::store::Store::open(
        settings(&store, Duration::from_secs(30 * 86_400), 1024),
        metrics.store.clone(),
    )
    .unwrap();
    writer.flush().await;
    let left = store
        .db()
        .await
        .rows("SELECT request_id FROM model_calls ORDER BY id")
        .await;
    assert_eq!(
        left,
        [json!({"request_id": "r29"}), json!({"request_id": "r1"})]
    );
}

async fn callers_that_share_a_flight_pay_once(kind: Kind) {
    let Some(store) = TestStore::new(kind, "store-flight") else {
        return;
    };
    let h = start(&config(&store)).await;
    h.mock.set("p", "latency=200ms");
    let body = json!({"model": "main", "temperature": 0, "messages": [{"role": "user", "content": "same"}]})
        .to_string();
    let (a, b) = tokio::join!(h.post_raw(body.clone(), &[]), h.post_raw(body, &[]));
    assert_eq!((a.status, b.status), (200, 200));
    assert_eq!(h.mock.calls("p"), 1, "one flight");
    let conn = settle(&h, &store, 2).await;
    let mut both = [request_row(&conn, &a).await, request_row(&conn, &b).await];
    both.sort_by_key(|r| r["attempts"].as_i64());
    let (joined, ran) = (&both[0], &both[1]);
    assert_eq!(
        (
            &joined["attempts"],
            &joined["cost_usd"],
            &joined["model_name"]
        ),
        (&json!(0), &json!(0.0), &json!("primary"))
    );
    assert_eq!(ran["attempts"], 1);
    assert!(ran["cost_usd"].as_f64().unwrap() > 0.0);
    let calls = conn.count("SELECT COUNT(*) FROM model_calls").await;
    assert_eq!(calls, 1);
}

on_both_stores!(
    every_request_and_call_has_its_row,
    retries_races_and_hedges_have_their_kinds,
    streams_count_tokens_without_showing_the_usage_chunk,
    the_report_sums_what_fallbacks_cost,
    a_restart_remembers_a_degraded_model,
    a_full_queue_drops_and_counts,
    retention_deletes_old_rows_at_start,
    callers_that_share_a_flight_pay_once,
);

// PostgreSQL only: the same tables, a database that goes away, and its URL's secret.

/// Each table's columns in order, as the store created them.
async fn columns(store: &TestStore, table: &str) -> Vec<(String, String)> {
    let db = store.db().await;
    let sql = match store.kind {
        Kind::Sqlite => format!("SELECT name, type FROM pragma_table_info('{table}') ORDER BY cid"),
        Kind::Postgres => format!(
            "SELECT column_name::text AS name, data_type::text AS type FROM information_schema.columns
             WHERE table_name = '{table}' ORDER BY ordinal_position"
        ),
    };
    db.rows(&sql)
        .await
        .into_iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap().to_string(),
                r["type"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test]
async fn postgres_keeps_the_same_tables_and_migrations_as_sqlite() {
    let Some(pg) = TestStore::new(Kind::Postgres, "store-schema-pg") else {
        return;
    };
    let lite = TestStore::new(Kind::Sqlite, "store-schema-lite").unwrap();
    let metrics = cascade::metrics::Metrics::new();
    let day = Duration::from_secs(86_400);
    for s in [&pg, &lite] {
        cascade::store::Store::open(settings(s, day, 16), metrics.store.clone())
            .unwrap()
            .flush()
            .await;
    }
    // Twice on PostgreSQL: opening again applies nothing twice.
    cascade::store::Store::open(settings(&pg, day, 16), metrics.store.clone())
        .unwrap()
        .flush()
        .await;
    for table in ["model_calls", "requests", "shadow_results", "responses"] {
        let (a, b) = (columns(&lite, table).await, columns(&pg, table).await);
        let names = |c: &[(String, String)]| c.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        assert_eq!(names(&a), names(&b), "{table}");
        for (name, ty) in &b {
            let want = match name.as_str() {
                "timestamp" | "created_at" => "timestamp with time zone",
                "success" | "stream" | "deadline_cut" | "json_valid" | "tool_calls_match" => {
                    "integer"
                }
                _ => continue,
            };
            assert_eq!(ty, want, "{table}.{name}");
        }
    }
    let versions = pg
        .db()
        .await
        .rows("SELECT version FROM schema_version")
        .await;
    assert_eq!(
        versions,
        [json!({"version": cascade::store::postgres::VERSION})]
    );
    let lite_version = lite
        .db()
        .await
        .count("SELECT version FROM schema_version")
        .await;
    assert_eq!(lite_version, cascade::store::postgres::VERSION);
}

#[tokio::test]
async fn a_lost_database_drops_and_counts_and_writing_resumes() {
    let Some(mut store) = TestStore::new(Kind::Postgres, "store-lost") else {
        return;
    };
    let h = start(&config(&store)).await;
    for _ in 0..3 {
        assert_eq!(h.chat("main", &[]).await.status, 200);
    }
    settle(&h, &store, 3).await;
    store.pg.as_mut().unwrap().stop();
    for _ in 0..5 {
        assert_eq!(h.chat("main", &[]).await.status, 200, "answers go on");
    }
    let writer = h.state.store.clone().unwrap();
    writer.flush().await;
    let dropped = h.state.metrics.store.dropped.get();
    assert_eq!(dropped, 10, "5 requests and 5 calls, counted");
    store.pg.as_mut().unwrap().restart();
    // The writer tries the database again at most once a second: send until it writes.
    let mut sent = 8;
    let db = store.db().await;
    for _ in 0..100 {
        assert_eq!(h.chat("main", &[]).await.status, 200);
        sent += 1;
        writer.flush().await;
        if db.count("SELECT COUNT(*) FROM requests").await > 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let requests = db.count("SELECT COUNT(*) FROM requests").await;
    let calls = db.count("SELECT COUNT(*) FROM model_calls").await;
    assert!(requests > 3, "writing resumed");
    assert_eq!(
        requests + calls + h.state.metrics.store.dropped.get() as i64,
        2 * sent,
        "every row written or counted"
    );
}

#[tokio::test]
async fn a_gateway_starts_and_serves_while_postgres_is_down() {
    let port = common::process::free_port();
    let yaml = CONFIG.replace(
        "path: \"{db}\"",
        &format!("url: \"postgres://cascade:pg-SECRET-789@127.0.0.1:{port}/cascade\""),
    );
    let h = start(&yaml).await;
    for _ in 0..3 {
        assert_eq!(h.chat("main", &[]).await.status, 200);
    }
    h.state.store.clone().unwrap().flush().await;
    assert_eq!(h.state.metrics.store.dropped.get(), 6);
    // The report says why, without the password.
    let r = h.get("/admin/report?since=1h").await;
    assert_eq!(r.status, 503, "{}", r.text);
    assert!(!r.text.contains("pg-SECRET-789"), "{}", r.text);
    let m = h.get("/metrics").await.text;
    assert!(!m.contains("pg-SECRET-789"));
    assert!(!format!("{:?}", h.state.config().store).contains("pg-SECRET-789"));
}

#[test]
fn a_store_url_is_checked_without_connecting() {
    let yaml = |store: &str| {
        format!(
            "store: {{ {store} }}
providers:
  mock: {{ kind: openai, base_url: \"http://127.0.0.1:9/v1\" }}
models:
  m: {{ provider: mock, model_id: m }}
"
        )
    };
    let load = |store: &str| cascade::config::Config::from_yaml_with_env(&yaml(store), &|_| None);
    let both = load("path: c.db, url: \"postgres://u@h/db\"")
        .unwrap_err()
        .to_string();
    assert!(
        both.contains("store.url") && both.contains("store.path"),
        "{both}"
    );
    for bad in [
        "url: \"http://u:pw-SECRET@h/db\"",
        "url: \"postgres:///db\"",
        "url: \"\"",
        // An unencoded @ would print the rest of the password as the host.
        "url: \"postgres://u:pw-SECRET@x@h/db\"",
        "url: \"postgres://u:pw-SECRET@h2/x@realhost/db\"",
        // A CA for a connection that does not ask for TLS.
        "url: \"postgres://u:pw-SECRET@h/db\", ca_file: ca.pem",
    ] {
        let e = load(bad).unwrap_err().to_string();
        assert!(e.contains("store.url"), "{bad}: {e}");
        assert!(!e.contains("pw-SECRET"), "{e}");
    }
    let e = load("url: \"postgres://u:pw-SECRET@h/db?sslmode=require\", ca_file: /no/ca.pem")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("store.ca_file") && e.contains("/no/ca.pem"),
        "{e}"
    );
    let e = load("path: c.db, ca_file: ca.pem").unwrap_err().to_string();
    assert!(e.contains("store.ca_file"), "{e}");
    // `cascade check` accepts a URL it cannot reach: it parses, it never connects.
    let dir = TempDir::new("store-check");
    let file = dir.path().join("c.yaml");
    std::fs::write(
        &file,
        yaml("url: \"postgres://cascade:pg-SECRET@10.255.255.1:5432/cascade?connect_timeout=30\""),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cascade"))
        .args(["check", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "it did not wait for a connection"
    );
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!printed.contains("pg-SECRET"), "{printed}");
}

/// `sslmode=require` speaks TLS and verifies the server: with the server's CA in
/// `store.ca_file` rows are written; without it, or in plain text (which this server
/// refuses), they are dropped and counted, and answers go on.
#[tokio::test]
async fn postgres_over_tls_verifies_the_server() {
    let dir = TempDir::new("store-tls");
    let (ca, cert, key) = common::postgres::test_certificates(dir.path());
    let Some(pg) = common::postgres::Postgres::start_tls(&cert, &key).or_else(|| {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must provide PostgreSQL"
        );
        None
    }) else {
        return;
    };
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port);
    let with = |store: String| CONFIG.replace("path: \"{db}\"", &store);
    let cases = [
        (
            format!(
                "url: \"{url}?sslmode=require\", ca_file: \"{}\"",
                ca.display()
            ),
            true,
        ),
        (format!("url: \"{url}?sslmode=require\""), false),
        (format!("url: \"{url}?sslmode=disable\""), false),
    ];
    let db = pg.socket_client().await;
    let mut written = 0;
    for (store, verified) in cases {
        let h = start(&with(store.clone())).await;
        for _ in 0..2 {
            assert_eq!(h.chat("main", &[]).await.status, 200, "{store}");
        }
        h.state.store.clone().unwrap().flush().await;
        let dropped = h.state.metrics.store.dropped.get();
        if verified {
            written += 2;
            assert_eq!(dropped, 0, "{store}");
            // The writer's connection is encrypted.
            let tls: i64 = db
                .query_one(
                    "SELECT COUNT(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid)
                     WHERE ssl AND application_name = 'cascade'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            assert!(tls >= 1, "{store}");
        } else {
            assert_eq!(
                dropped, 4,
                "{store}: 2 requests and 2 calls dropped and counted"
            );
        }
        let n: i64 = db
            .query_one("SELECT COUNT(*) FROM requests", &[])
            .await
            .map(|r| r.get(0))
            .unwrap_or(0);
        assert_eq!(n, written, "{store}");
    }
}
