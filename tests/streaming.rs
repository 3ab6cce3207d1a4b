//! Streaming: swappable until the first content delta, then committed.

mod common;

use common::{start, THREE};
use serde_json::Value;

#[tokio::test]
async fn streams_from_the_primary() {
    let h = start(THREE).await;
    let r = h.chat_stream("main", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    assert_eq!(r.header("x-cascade-model"), Some("primary"));
    assert_eq!(r.streamed_text(), "Hello from p! This is a mock answer.");
    assert_eq!(r.events().last().map(String::as_str), Some("[DONE]"));
    for c in r.chunks() {
        assert_eq!(c["model"], "p");
        assert_eq!(c["object"], "chat.completion.chunk");
    }
}

#[tokio::test]
async fn failure_before_first_token_falls_back_invisibly() {
    for knobs in [
        "status=500",
        "cut_after=0",
        "empty",
        "malformed",
        "reset",
        "status=429",
    ] {
        let h = start(THREE).await;
        h.mock.set("p", knobs);
        let r = h.chat_stream("main", &[]).await;
        assert_eq!(r.status, 200, "{knobs}: {}", r.text);
        assert_eq!(r.header("x-cascade-model"), Some("secondary"), "{knobs}");
        assert_eq!(r.header("x-cascade-attempts"), Some("2"));
        assert_eq!(
            r.streamed_text(),
            "Hello from s! This is a mock answer.",
            "{knobs}: nothing of p leaks"
        );
        assert!(!r.text.contains("\"error\""), "{knobs}");
        assert_eq!(r.events().last().map(String::as_str), Some("[DONE]"));
        assert_eq!(h.mock.calls("p"), 1);
        assert_eq!(h.mock.calls("s"), 1);
    }
}

#[tokio::test]
async fn failure_after_first_token_ends_with_error_event() {
    let h = start(THREE).await;
    h.mock.set("p", "chunks=5,cut_after=2");
    let r = h.chat_stream("main", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-cascade-model"), Some("primary"));
    let events = r.events();
    assert_ne!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "never closes as if complete"
    );
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert!(last["error"]["message"].is_string(), "{last}");
    assert!(last["error"]["type"].is_string());
    assert!(last["error"].get("param").is_some() && last["error"].get("code").is_some());
    assert_eq!(
        h.mock.calls("s"),
        0,
        "no splice of a second provider into a committed stream"
    );
    assert!(!r.streamed_text().is_empty());
}

#[tokio::test]
async fn include_usage_is_passed_through() {
    let h = start(THREE).await;
    let mut body = common::chat_body("main", true);
    body["stream_options"] = serde_json::json!({"include_usage": true});
    let r = h.post_raw(body.to_string(), &[]).await;
    let cs = r.chunks();
    let last = cs.last().unwrap();
    assert_eq!(last["choices"].as_array().unwrap().len(), 0);
    assert!(last["usage"]["total_tokens"].as_u64().unwrap() > 0);
}

#[tokio::test(start_paused = true)]
async fn stalled_stream_before_first_token_times_out_and_falls_back() {
    let h = start(&THREE.replace("attempt_timeout: 10s", "attempt_timeout: 1s")).await;
    h.mock.set("p", "ttft=30s");
    let r = h.chat_stream("main", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-cascade-model"), Some("secondary"));
    assert_eq!(r.streamed_text(), "Hello from s! This is a mock answer.");
}

#[tokio::test]
async fn all_failing_stream_gets_a_plain_json_error() {
    let h = start(THREE).await;
    for m in ["p", "s", "t"] {
        h.mock.set(m, "status=500");
    }
    let r = h.chat_stream("main", &[]).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["error"]["code"], "all_targets_failed");
}
