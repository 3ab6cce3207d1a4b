//! Each fallback trigger and each fail-fast case, against a real HTTP mock upstream,
//! with upstream call counts asserted.

mod common;

use common::{start, THREE};

/// Asserts a successful answer came from `model` (pool name) with model id `id`.
fn assert_answered_by(r: &common::Reply, model: &str, id: &str, attempts: &str, fallbacks: &str) {
    assert_eq!(r.status, 200, "body: {}", r.text);
    assert_eq!(r.header("x-cascade-model"), Some(model));
    assert_eq!(r.header("x-cascade-provider"), Some("mock"));
    assert_eq!(r.header("x-cascade-attempts"), Some(attempts));
    assert_eq!(r.header("x-cascade-fallbacks"), Some(fallbacks));
    assert_eq!(r.header("x-cascade-chain"), Some("main"));
    let body = r.json();
    assert_eq!(
        body["model"], id,
        "the body names the model id that answered"
    );
    assert!(body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .contains(&format!("from {id}")));
}

async fn falls_back_on(knobs: &str) {
    let h = start(THREE).await;
    h.mock.set("p", knobs);
    let r = h.chat("main", &[]).await;
    assert_answered_by(&r, "secondary", "s", "2", "1");
    assert_eq!(h.mock.calls("p"), 1, "no retry of the primary ({knobs})");
    assert_eq!(h.mock.calls("s"), 1);
    assert_eq!(h.mock.calls("t"), 0);
}

#[tokio::test]
async fn primary_answers_without_fallback() {
    let h = start(THREE).await;
    let r = h.chat("main", &[]).await;
    assert_answered_by(&r, "primary", "p", "1", "0");
    assert_eq!(h.mock.calls("p"), 1);
    assert_eq!(h.mock.calls("s"), 0);
    // The upstream got the target's model id and the client's messages, untouched.
    let sent = &h.mock.bodies("p")[0];
    assert_eq!(sent["model"], "p");
    assert_eq!(sent["messages"][1]["content"], "hello");
    // The model's max_tokens is the default output cap (OpenAI's newer field name).
    assert_eq!(sent["max_completion_tokens"], 100);
    // And our key, as a bearer token.
    let auth = h.mock.last_headers().unwrap();
    assert_eq!(auth["authorization"], "Bearer sk-test-SECRET-123");
}

#[tokio::test]
async fn falls_back_on_500() {
    falls_back_on("status=500").await;
}

#[tokio::test]
async fn falls_back_on_503() {
    falls_back_on("status=503").await;
}

#[tokio::test]
async fn falls_back_on_429() {
    falls_back_on("status=429,retry_after=3").await;
}

#[tokio::test]
async fn falls_back_on_401_403_404() {
    falls_back_on("status=401").await;
    falls_back_on("status=403").await;
    falls_back_on("status=404").await;
}

#[tokio::test]
async fn falls_back_on_other_4xx_like_410() {
    falls_back_on("status=410").await;
    falls_back_on("status=413").await;
}

#[tokio::test]
async fn falls_back_on_empty_answer() {
    falls_back_on("empty").await;
}

#[tokio::test]
async fn falls_back_on_malformed_body() {
    falls_back_on("malformed").await;
}

#[tokio::test]
async fn falls_back_on_connection_reset() {
    falls_back_on("reset").await;
}

#[tokio::test]
async fn falls_back_on_content_filter() {
    falls_back_on("finish_reason=content_filter,content=").await;
}

#[tokio::test(start_paused = true)]
async fn falls_back_on_attempt_timeout() {
    let h = start(&THREE.replace("attempt_timeout: 10s", "attempt_timeout: 2s")).await;
    h.mock.set("p", "stall");
    let started = tokio::time::Instant::now();
    let r = h.chat("main", &[]).await;
    assert_answered_by(&r, "secondary", "s", "2", "1");
    let waited = started.elapsed();
    assert!(
        waited >= std::time::Duration::from_secs(2),
        "waited the attempt timeout: {waited:?}"
    );
    assert!(
        waited < std::time::Duration::from_secs(3),
        "and no longer: {waited:?}"
    );
    assert_eq!(h.mock.calls("p"), 1);
}

#[tokio::test]
async fn falls_back_when_unreachable() {
    // A port with nothing listening.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let yaml = THREE.replacen(
        "\nmodels:",
        &format!("\n  down: {{ kind: openai, base_url: \"http://{free}/v1\" }}\nmodels:\n  dead: {{ provider: down, model_id: dead }}"),
        1,
    )
    .replace("main: [primary, secondary, tertiary]", "main: [dead, secondary]");
    let h = start(&yaml).await;
    let r = h.chat("main", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-cascade-model"), Some("secondary"));
    assert_eq!(r.header("x-cascade-attempts"), Some("2"));
    assert_eq!(h.mock.calls("s"), 1);
}

#[tokio::test]
async fn fails_fast_on_400_and_422() {
    for status in [400, 422] {
        let h = start(THREE).await;
        h.mock.set("p", &format!("status={status}"));
        let r = h.chat("main", &[]).await;
        assert_eq!(r.status, status, "{}", r.text);
        let body = r.json();
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("mock:"),
            "upstream message kept"
        );
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(h.mock.calls("p"), 1);
        assert_eq!(h.mock.calls("s"), 0, "no fallback on {status}");
        assert_eq!(r.header("x-cascade-attempts"), Some("1"));
        assert_eq!(r.header("x-cascade-fallbacks"), Some("0"));
        assert_eq!(
            r.header("x-cascade-model"),
            None,
            "no model header on failure"
        );
    }
}

#[tokio::test]
async fn context_overflow_400_falls_back() {
    // A 400 that means "prompt too long" is this model's limit, not a bad request.
    falls_back_on("status=400,code=context_length_exceeded").await;
}

#[tokio::test]
async fn quota_429_falls_back() {
    falls_back_on("status=429,code=insufficient_quota").await;
}

#[tokio::test]
async fn all_targets_failed_is_502_with_attempts() {
    let h = start(THREE).await;
    h.mock.set("p", "status=500");
    h.mock.set("s", "status=503");
    h.mock.set("t", "empty");
    let r = h.chat("main", &[]).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.header("x-cascade-attempts"), Some("3"));
    assert_eq!(r.header("x-cascade-fallbacks"), Some("2"));
    assert_eq!(r.header("x-cascade-chain"), Some("main"));
    assert_eq!(r.header("x-cascade-model"), None);
    assert_eq!(r.header("x-cascade-provider"), None);
    let body = r.json();
    assert_eq!(body["error"]["code"], "all_targets_failed");
    let attempts = body["error"]["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 3);
    assert_eq!(attempts[0]["model"], "primary");
    assert_eq!(attempts[0]["provider"], "mock");
    assert_eq!(attempts[0]["status"], 500);
    assert_eq!(attempts[0]["class"], "transient");
    assert_eq!(attempts[1]["status"], 503);
    assert_eq!(attempts[2]["status"], 200);
    assert_eq!(attempts[2]["class"], "empty");
    assert!(attempts[0]["latency_ms"].is_u64());
    assert!(!r.text.contains("SECRET"), "no key in errors");
}

#[tokio::test]
async fn all_rate_limited_is_429_with_soonest_retry_after() {
    let h = start(THREE).await;
    h.mock.set("p", "status=429,retry_after=30");
    h.mock.set("s", "status=429,retry_after=7");
    h.mock.set("t", "status=429,retry_after=12");
    let r = h.chat("main", &[]).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("7"));
    assert_eq!(r.json()["error"]["code"], "all_targets_failed");
}

#[tokio::test(start_paused = true)]
async fn deadline_is_504() {
    let yaml = THREE.replace("request_timeout: 60s", "request_timeout: 3s");
    let h = start(&yaml).await;
    for m in ["p", "s", "t"] {
        h.mock.set(m, "stall");
    }
    let started = tokio::time::Instant::now();
    let r = h.chat("main", &[]).await;
    assert_eq!(r.status, 504, "{}", r.text);
    assert_eq!(r.json()["error"]["code"], "deadline_exceeded");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(4),
        "never outlives the deadline"
    );
    assert_eq!(h.mock.calls("p"), 1);
    assert_eq!(
        h.mock.calls("s"),
        0,
        "the deadline was spent on the primary"
    );
}

#[tokio::test]
async fn metrics_count_attempts_and_fallbacks() {
    let h = start(THREE).await;
    h.mock.set("p", "status=500");
    h.chat("main", &[]).await;
    let m = h.get("/metrics").await.text;
    assert!(m.contains(r#"cascade_attempts_total{chain="main",model="primary",outcome="transient",provider="mock"} 1"#), "{m}");
    assert!(m.contains(
        r#"cascade_attempts_total{chain="main",model="secondary",outcome="ok",provider="mock"} 1"#
    ));
    assert!(m.contains(r#"cascade_fallbacks_total{chain="main",from_model="primary",reason="transient",to_model="secondary"} 1"#));
    assert!(m.contains(r#"cascade_requests_total{chain="main",status="200"} 1"#));
    assert!(m.contains("cascade_overhead_seconds_count 1"));
    assert!(m.contains("cascade_inflight_requests 0"));
    assert!(m.contains("cascade_request_duration_seconds_bucket{chain=\"main\""));
    assert!(
        m.contains("cascade_upstream_duration_seconds_bucket{model=\"primary\",provider=\"mock\"")
    );
    assert!(!m.contains("SECRET"));
}

#[tokio::test]
async fn json_mode_answers_that_do_not_parse_fall_back() {
    let h = start(THREE).await;
    // The mock answers JSON when asked for it, unless told what to say.
    h.mock.set("p", "content=Sure! Here it is.");
    h.mock.set("s", r#"content={"ok":true}"#);
    let mut body = common::chat_body("main", false);
    body["response_format"] = serde_json::json!({"type": "json_object"});
    let r = h.post_raw(body.to_string(), &[]).await;
    assert_eq!(r.header("x-cascade-model"), Some("secondary"), "{}", r.text);
    assert_eq!(
        r.json()["choices"][0]["message"]["content"],
        r#"{"ok":true}"#
    );
    assert!(r
        .header("x-cascade-trace")
        .unwrap()
        .starts_with("primary:invalid_output:"));
    // Without JSON mode the same text is a fine answer.
    let r = h.chat("main", &[]).await;
    assert_eq!(r.header("x-cascade-model"), Some("primary"));
}

#[tokio::test]
async fn preflight_estimate_skips_models_whose_window_is_too_small() {
    let yaml = THREE.replace(
        "primary:   { provider: mock, model_id: p, max_tokens: 100, context_window: 8000,",
        "primary:   { provider: mock, model_id: p, max_tokens: 100, context_window: 500,",
    );
    let h = start(&yaml).await;
    let long = "lorem ipsum ".repeat(400); // ~1200 tokens
    let body =
        serde_json::json!({"model": "main", "messages": [{"role": "user", "content": long}]});
    let r = h.post_raw(body.to_string(), &[]).await;
    assert_eq!(r.header("x-cascade-model"), Some("secondary"));
    assert_eq!(h.mock.calls("p"), 0, "no call that could only overflow");
    // Too big for every model: a 400 the caller can act on, with no upstream call.
    let huge = "lorem ipsum ".repeat(4000);
    let body =
        serde_json::json!({"model": "main", "messages": [{"role": "user", "content": huge}]});
    let r = h.post_raw(body.to_string(), &[]).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "context_length_exceeded");
    assert_eq!(h.mock.total_calls(), 1);
}
