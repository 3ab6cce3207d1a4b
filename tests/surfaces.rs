//! The surfaces beside chat: Responses, Messages, embeddings and pass-through, on the
//! real app with the store on, checked by their bodies, events, calls and rows.

mod common;

use common::stores::{Kind, TestStore};
use common::{start, TempDir};
use serde_json::{json, Value};

fn config(dir: &TempDir, extra: &str) -> String {
    config_on(
        &format!("path: \"{}\"", dir.path().join("c.db").display()),
        extra,
    )
}

/// The config with `store` as the store's location keys.
fn config_on(store: &str, extra: &str) -> String {
    format!(
        r#"
server:
  request_timeout: 30s
  max_body: 1KiB
  {extra}
retry: {{ max_retries: 0 }}
cache: {{ mode: all }}
store: {{ {store}, flush_interval: 10ms }}
providers:
  mock:   {{ kind: openai, base_url: "{{mock}}", api_key: "sk-mock-SECRET" }}
  claude: {{ kind: anthropic, base_url: "http://{{mock_addr}}", api_key: "sk-ant-SECRET" }}
models:
  primary: {{ provider: mock, model_id: p }}
  sonnet:  {{ provider: claude, model_id: claude-x }}
  plain:   {{ provider: mock, model_id: plain, capabilities: [] }}
chains:
  main: [primary, sonnet]
  claude_first: [sonnet, primary]
  picky: [plain, primary]
  only_plain: [plain]
"#
    )
}

async fn post(
    h: &common::Harness,
    path: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> common::Reply {
    let mut req = h
        .http
        .post(h.url(path))
        .header("content-type", "application/json")
        .body(body.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("answers");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    common::Reply {
        status,
        headers,
        text: resp.text().await.unwrap_or_default(),
    }
}

/// Waits for the store to hold `n` rows of `sql`'s first column count.
async fn rows(h: &common::Harness, dir: &TempDir, sql: &str, n: i64) -> rusqlite::Connection {
    if let Some(s) = &h.state.store {
        s.flush().await;
    }
    let conn = rusqlite::Connection::open(dir.path().join("c.db")).unwrap();
    for _ in 0..200 {
        let got: i64 = conn.query_row(sql, [], |r| r.get(0)).unwrap_or(0);
        if got >= n {
            return conn;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("store never held {n} rows for {sql}");
}

#[tokio::test]
async fn responses_and_messages_are_recorded_under_their_surface() {
    let dir = TempDir::new("surfaces-store");
    let h = start(&config(&dir, "")).await;
    h.mock.set("p", "status=500");
    let r = post(
        &h,
        "/v1/responses",
        &json!({"model": "main", "input": "hi"}),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["model"], "claude-x");
    let m = post(
        &h,
        "/v1/messages",
        &json!({"model": "claude_first", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}),
        &[("anthropic-version", "2023-06-01")],
    )
    .await;
    assert_eq!(m.status, 200, "{}", m.text);
    let conn = rows(&h, &dir, "SELECT COUNT(*) FROM requests", 2).await;
    let mut stmt = conn
        .prepare(
            "SELECT surface, model_name, attempts, fallbacks, status FROM requests ORDER BY id",
        )
        .unwrap();
    let got: Vec<(String, String, i64, i64, i64)> = stmt
        .query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        got,
        vec![
            ("responses".into(), "sonnet".into(), 2, 1, 200),
            ("messages".into(), "sonnet".into(), 1, 0, 200),
        ]
    );
    let calls: i64 = conn
        .query_row("SELECT COUNT(*) FROM model_calls", [], |r| r.get(0))
        .unwrap();
    assert_eq!(calls, 3);
}

#[tokio::test]
async fn a_messages_stream_falls_over_invisibly_before_its_first_content() {
    let dir = TempDir::new("surfaces-stream");
    let h = start(&config(&dir, "")).await;
    // The Anthropic target cuts its stream before any text: the client sees only the
    // OpenAI target's answer, as Anthropic events written by cascade.
    h.mock.set("claude-x", "cut_after=0");
    let body = json!({"model": "claude_first", "max_tokens": 10, "stream": true,
                      "messages": [{"role": "user", "content": "hi"}]});
    let r = post(&h, "/v1/messages", &body, &[]).await;
    assert_eq!(r.header("x-cascade-model"), Some("primary"));
    let kinds: Vec<&str> = r
        .text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(kinds.first(), Some(&"message_start"));
    assert_eq!(kinds.last(), Some(&"message_stop"));
    assert_eq!(kinds.iter().filter(|k| **k == "message_start").count(), 1);
    assert!(
        !r.text.contains("msg_mock"),
        "no trace of the failed attempt: {}",
        r.text
    );
    let text: String = r
        .text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter(|e| e["type"] == "content_block_delta")
        .filter_map(|e| e["delta"]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(text, "Hello from p! This is a mock answer.");
    // Served by the Anthropic target itself, its own events pass through.
    h.mock.set("claude-x", "chunks=3");
    let mut body = body;
    body["messages"][0]["content"] = json!("hi again");
    let r = post(&h, "/v1/messages", &body, &[]).await;
    assert_eq!(r.header("x-cascade-model"), Some("sonnet"));
    assert!(r.text.contains("msg_mock"), "{}", r.text);
    assert_eq!(r.text.matches("event: message_stop").count(), 1);
}

#[tokio::test]
async fn a_responses_answer_is_served_again_from_the_cache_with_its_own_id() {
    let dir = TempDir::new("surfaces-cache");
    let h = start(&config(&dir, "")).await;
    let body = json!({"model": "main", "input": "cache me", "temperature": 0});
    let a = post(&h, "/v1/responses", &body, &[]).await;
    let b = post(&h, "/v1/responses", &body, &[]).await;
    assert_eq!(b.header("x-cascade-cache"), Some("hit"));
    assert_eq!(a.json()["output_text"], b.json()["output_text"]);
    assert_ne!(a.json()["id"], b.json()["id"]);
    assert_eq!(h.mock.calls("p"), 1);
    // A hit replayed as a stream is written as Responses events.
    let s = post(
        &h,
        "/v1/responses",
        &json!({"model": "main", "input": "cache me", "temperature": 0, "stream": true}),
        &[],
    )
    .await;
    assert!(s.text.contains("event: response.completed"), "{}", s.text);
    // The kept answer can be followed up.
    let id = b.json()["id"].as_str().unwrap().to_string();
    let f = post(
        &h,
        "/v1/responses",
        &json!({"model": "main", "input": "and?", "previous_response_id": id}),
        &[],
    )
    .await;
    assert_eq!(f.status, 200, "{}", f.text);
}

#[tokio::test]
async fn capabilities_skip_targets_without_a_call() {
    let dir = TempDir::new("surfaces-caps");
    let h = start(&config(&dir, "")).await;
    let tools =
        json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
    let r = h
        .post_raw(
            json!({"model": "picky", "messages": [{"role": "user", "content": "x"}], "tools": tools}).to_string(),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("x-cascade-model"), Some("primary"));
    assert_eq!(h.mock.calls("plain"), 0);
    let trace = r.header("x-cascade-trace").unwrap();
    assert!(
        trace.starts_with("plain:skipped:capability,primary:ok:"),
        "{trace}"
    );
    // Nothing in the chain can: a 400 naming the capability.
    let r = h
        .post_raw(
            json!({"model": "only_plain", "messages": [{"role": "user", "content": "x"}], "tools": tools}).to_string(),
            &[],
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("tools"));
    // Images and JSON schemas count too.
    let image = json!({"model": "picky", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}]});
    let r = h.post_raw(image.to_string(), &[]).await;
    assert_eq!(r.header("x-cascade-model"), Some("primary"));
    let schema = json!({"model": "picky", "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}}}});
    let r = h.post_raw(schema.to_string(), &[]).await;
    assert_eq!(r.header("x-cascade-model"), Some("primary"));
    assert_eq!(h.mock.calls("plain"), 0);
    // A plain request uses it.
    let r = h.chat("picky", &[]).await;
    assert_eq!(r.header("x-cascade-model"), Some("plain"));
}

#[tokio::test]
async fn passthrough_forwards_unchanged_with_the_providers_key() {
    let dir = TempDir::new("surfaces-pass");
    let h = start(&config(&dir, "passthrough: mock")).await;
    // An upload far over `max_body` streams through.
    let upload = vec![b'x'; 64 * 1024];
    let resp = h
        .http
        .post(h.url("/v1/files?purpose=batch"))
        .header("authorization", "Bearer caller-key")
        .header("api-key", "caller-azure-key")
        .header("x-mock-status", "201")
        .header("proxy-authorization", "Basic Zm9v")
        .body(upload)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    let echo: Value = resp.json().await.unwrap();
    assert_eq!(echo["bytes"], 64 * 1024);
    assert_eq!(echo["query"], "purpose=batch");
    assert_eq!(echo["authorization"], "Bearer sk-mock-SECRET");
    let seen = h.mock.last_headers().unwrap();
    assert!(seen.get("api-key").is_none() && seen.get("proxy-authorization").is_none());
    let del = h
        .http
        .delete(h.url("/v1/files/file-1"))
        .send()
        .await
        .unwrap();
    let echo: Value = del.json().await.unwrap();
    assert_eq!(
        (echo["method"].as_str(), echo["path"].as_str()),
        (Some("DELETE"), Some("/v1/files/file-1"))
    );
}

#[tokio::test]
async fn without_passthrough_other_paths_say_how_to_turn_it_on() {
    let dir = TempDir::new("surfaces-nopass");
    let h = start(&config(&dir, "")).await;
    let r = h.get("/v1/files").await;
    assert_eq!(r.status, 404);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("server.passthrough"));
    assert_eq!(h.mock.calls("passthrough"), 0);
}

async fn kept_responses_survive_a_restart_on_the_same_store(kind: Kind) {
    let Some(store) = TestStore::new(kind, "surfaces-restart") else {
        return;
    };
    let auth = [("authorization", "Bearer tenant-a")];
    let (id, gone) = {
        let h = start(&config_on(&store.yaml(), "")).await;
        let r = post(
            &h,
            "/v1/responses",
            &json!({"model": "main", "input": "remember Ada"}),
            &auth,
        )
        .await;
        let g = post(
            &h,
            "/v1/responses",
            &json!({"model": "main", "input": "then forget"}),
            &auth,
        )
        .await;
        let gone = g.json()["id"].as_str().unwrap().to_string();
        let d = h
            .http
            .delete(h.url(&format!("/v1/responses/{gone}")))
            .header("authorization", "Bearer tenant-a")
            .send()
            .await
            .unwrap();
        assert_eq!(d.status().as_u16(), 200);
        h.state.store.as_ref().unwrap().flush().await;
        (r.json()["id"].as_str().unwrap().to_string(), gone)
    };
    let h = start(&config_on(&store.yaml(), "")).await;
    let get = |id: String, who: &'static str| {
        let req = h
            .http
            .get(h.url(&format!("/v1/responses/{id}")))
            .header("authorization", who);
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(get(id.clone(), "Bearer tenant-a").await, 200);
    assert_eq!(get(id.clone(), "Bearer tenant-b").await, 404);
    assert_eq!(get(gone, "Bearer tenant-a").await, 404);
    let f = post(
        &h,
        "/v1/responses",
        &json!({"model": "main", "input": "who?", "previous_response_id": id}),
        &auth,
    )
    .await;
    assert_eq!(f.status, 200, "{}", f.text);
    let sent = h.mock.bodies("p");
    let last = sent.last().unwrap().to_string();
    assert!(
        last.contains("remember Ada") && last.contains("who?"),
        "{last}"
    );
}

on_both_stores!(kept_responses_survive_a_restart_on_the_same_store);
