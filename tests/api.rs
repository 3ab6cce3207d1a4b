//! Chain resolution, bad input, and the other endpoints.

mod common;

use common::{start, THREE};

#[tokio::test]
async fn header_picks_the_chain() {
    let h = start(THREE).await;
    h.mock.set("p", "status=500");
    let r = h.chat("whatever", &[("x-cascade-task", "main")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-cascade-chain"), Some("main"));
    assert_eq!(r.header("x-cascade-model"), Some("secondary"));
}

#[tokio::test]
async fn model_names_a_chain_or_a_pool_model_with_fallbacks() {
    let h = start(THREE).await;
    let r = h.chat("default", &[]).await;
    assert_eq!(r.header("x-cascade-chain"), Some("default"));
    assert_eq!(r.header("x-cascade-model"), Some("primary"));

    // A pool model alone: `secondary` then its fallback `tertiary`.
    h.mock.set("s", "status=500");
    let r = h.chat("secondary", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-cascade-chain"), Some("secondary"));
    assert_eq!(r.header("x-cascade-model"), Some("tertiary"));
    assert_eq!(h.mock.calls("p"), 1);

    // A pool model with no fallbacks is tried alone.
    h.mock.set("t", "status=500");
    let r = h.chat("tertiary", &[]).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.header("x-cascade-attempts"), Some("1"));
}

#[tokio::test]
async fn unknown_model_is_404_listing_names() {
    let h = start(THREE).await;
    let r = h.chat("gpt-9", &[]).await;
    assert_eq!(r.status, 404);
    let e = &r.json()["error"];
    assert_eq!(e["code"], "model_not_found");
    let msg = e["message"].as_str().unwrap();
    for name in ["main", "default", "primary", "secondary", "tertiary"] {
        assert!(msg.contains(name), "{msg}");
    }
    let r = h.chat("main", &[("x-cascade-task", "nope")]).await;
    assert_eq!(r.status, 404);
    assert_eq!(h.mock.total_calls(), 0);
}

#[tokio::test]
async fn bad_input_gets_openai_errors_naming_param() {
    let h = start(THREE).await;
    let cases: &[(&str, u16, Option<&str>)] = &[
        ("{not json", 400, None),
        (r#"{"model":"main"}"#, 400, Some("messages")),
        (r#"{"model":"main","messages":"hi"}"#, 400, Some("messages")),
        (r#"{"model":"main","messages":[]}"#, 400, Some("messages")),
        (
            r#"{"model":"main","messages":[{"role":"user","content":"x"}],"temperature":"hot"}"#,
            400,
            Some("temperature"),
        ),
        (
            r#"{"model":"main","messages":[{"role":"user","content":"x"}],"stream":"yes"}"#,
            400,
            Some("stream"),
        ),
        (
            r#"{"model":"main","messages":[{"content":"x"}]}"#,
            400,
            Some("messages[0]"),
        ),
        (r#""just a string""#, 400, None),
        ("", 400, None),
    ];
    for (body, status, param) in cases {
        let r = h.post_raw(body.to_string(), &[]).await;
        assert_eq!(r.status, *status, "{body}: {}", r.text);
        let e = &r.json()["error"];
        assert_eq!(e["type"], "invalid_request_error", "{body}");
        assert_eq!(e["param"].as_str(), *param, "{body}: {e}");
        assert!(e.get("code").is_some());
        assert!(r.header("x-request-id").is_some());
    }
    assert_eq!(h.mock.total_calls(), 0);
}

#[tokio::test]
async fn oversized_body_is_413() {
    let h = start(&THREE.replace(
        "request_timeout: 60s",
        "request_timeout: 60s\n  max_body: 1KiB",
    ))
    .await;
    let big = "x".repeat(2000);
    let body = serde_json::json!({"model":"main","messages":[{"role":"user","content": big}]});
    let r = h.post_raw(body.to_string(), &[]).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"]["code"], "request_too_large");
    // Chunked, with no Content-Length: still caught.
    let stream =
        futures_util::stream::iter(vec![Ok::<_, std::io::Error>(body.to_string().into_bytes())]);
    let r = h.post_raw(reqwest::Body::wrap_stream(stream), &[]).await;
    assert_eq!(r.status, 413);
    assert_eq!(h.mock.total_calls(), 0);
}

#[tokio::test]
async fn request_id_is_echoed_or_generated() {
    let h = start(THREE).await;
    let r = h.chat("main", &[("x-request-id", "req-42")]).await;
    assert_eq!(r.header("x-request-id"), Some("req-42"));
    let r = h.chat("main", &[]).await;
    assert_eq!(r.header("x-request-id").map(str::len), Some(36));
}

#[tokio::test]
async fn models_health_ready_and_metrics() {
    let h = start(THREE).await;
    let r = h.get("/v1/models").await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["main", "default", "primary", "secondary", "tertiary"]);
    for m in v["data"].as_array().unwrap() {
        assert_eq!(m["object"], "model");
        assert!(m["created"].is_u64() && m["owned_by"].is_string());
    }
    assert_eq!(h.get("/healthz").await.status, 200);
    assert_eq!(h.get("/readyz").await.status, 200);
    let m = h.get("/metrics").await;
    assert!(m.header("content-type").unwrap().starts_with("text/plain"));
    assert!(m.text.contains("# TYPE cascade_inflight_requests gauge"));
    let r = h.get("/nope").await;
    assert_eq!(r.status, 404);
    assert!(r.json()["error"]["message"].is_string());
}
