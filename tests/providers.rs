//! Cross-provider chains through the gateway, against mocks that speak each provider's
//! wire format: headers, translations both ways, streams, tool calls, errors, cost.

mod common;

use common::start;
use serde_json::{json, Value};

/// One mock serves every format; each provider points at it with its own API shape.
const MIXED: &str = r#"
server:
  request_timeout: 30s
  attempt_timeout: 5s
retry: { max_retries: 0 }
providers:
  openai:    { kind: openai, base_url: "{mock}", api_key: "sk-openai-SECRET" }
  claude:    { kind: anthropic, base_url: "http://{mock_addr}", api_key: "sk-ant-SECRET" }
  google:    { kind: gemini, base_url: "http://{mock_addr}", api_key: "goog-SECRET" }
  azure:     { kind: azure_openai, base_url: "http://{mock_addr}/az", api_key: "az-SECRET", api_version: "2024-10-21" }
  groq:      { kind: openai_compatible, base_url: "{mock}", api_key: "gsk", drop_params: [logprobs, user], extra_body: { service_tier: flex } }
models:
  gpt:    { provider: openai, model_id: gpt-x, cost_per_1k_input: 1.0, cost_per_1k_output: 2.0 }
  sonnet: { provider: claude, model_id: claude-x, max_tokens: 333, cost_per_1k_input: 3.0, cost_per_1k_output: 15.0 }
  flash:  { provider: google, model_id: gemini-x, cost_per_1k_input: 0.1, cost_per_1k_output: 0.4 }
  az:     { provider: azure, model_id: my-deployment }
  llama:  { provider: groq, model_id: llama-x }
chains:
  cross: [gpt, sonnet, flash]
  claude_first: [sonnet, flash]
  gemini_first: [flash, sonnet]
  az_first: [az, gpt]
"#;

fn tool_request(model: &str, stream: bool) -> Value {
    json!({
        "model": model,
        "stream": stream,
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Weather in Paris?"}
        ],
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Get weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}],
        "tool_choice": "auto"
    })
}

/// Reassembles streamed tool calls as the OpenAI SDK does: by index, arguments joined.
fn streamed_tool_calls(r: &common::Reply) -> Vec<(String, String, String)> {
    let mut calls: Vec<(String, String, String)> = Vec::new();
    for e in r.events() {
        let Ok(v) = serde_json::from_str::<Value>(&e) else {
            continue;
        };
        for tc in v["choices"][0]["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let i = tc["index"].as_u64().unwrap() as usize;
            if calls.len() <= i {
                calls.resize(i + 1, Default::default());
            }
            if let Some(id) = tc["id"].as_str() {
                calls[i].0 = id.into();
            }
            if let Some(n) = tc["function"]["name"].as_str() {
                calls[i].1 = n.into();
            }
            calls[i]
                .2
                .push_str(tc["function"]["arguments"].as_str().unwrap_or_default());
        }
    }
    calls
}

#[tokio::test]
async fn falls_back_from_openai_to_anthropic_to_gemini() {
    let h = start(MIXED).await;
    h.mock.set("gpt-x", "status=503");
    h.mock.set("claude-x", "status=529");
    let r = h.chat("cross", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("x-cascade-provider"), Some("google"));
    assert_eq!(r.header("x-cascade-model"), Some("flash"));
    assert_eq!(
        r.header("x-cascade-trace").map(|t| t.split(',').count()),
        Some(3)
    );
    let body = r.json();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "gemini-x");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "Hello from gemini-x! This is a mock answer."
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert!(body["usage"]["total_tokens"].as_u64().unwrap() > 0);
    assert_eq!(
        (
            h.mock.calls("gpt-x"),
            h.mock.calls("claude-x"),
            h.mock.calls("gemini-x")
        ),
        (1, 1, 1)
    );
    assert!(!r.text.contains("SECRET"));
}

#[tokio::test]
async fn anthropic_gets_its_headers_and_a_translated_request() {
    let h = start(MIXED).await;
    let r = h
        .post_raw(tool_request("claude_first", false).to_string(), &[])
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let headers = h.mock.last_headers().unwrap();
    assert_eq!(headers["x-api-key"], "sk-ant-SECRET");
    assert_eq!(headers["anthropic-version"], "2023-06-01");
    assert!(headers.get("authorization").is_none());
    let sent = &h.mock.bodies("claude-x")[0];
    assert_eq!(sent["model"], "claude-x");
    assert_eq!(sent["system"], "Be terse.");
    assert_eq!(
        sent["max_tokens"], 333,
        "the model's max_tokens fills the required field"
    );
    assert_eq!(
        sent["messages"],
        json!([{"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]}])
    );
    assert_eq!(sent["tools"][0]["name"], "get_weather");
    assert_eq!(
        sent["tools"][0]["input_schema"]["required"],
        json!(["city"])
    );
    assert_eq!(sent["tool_choice"], json!({"type": "auto"}));
}

#[tokio::test]
async fn anthropic_tool_calls_come_back_in_openai_shape_streamed_or_not() {
    let h = start(MIXED).await;
    h.mock.set("claude-x", "tool=get_weather");
    let r = h
        .post_raw(tool_request("claude_first", false).to_string(), &[])
        .await;
    let body = r.json();
    let call = &body["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(body["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Paris"}));

    let r = h
        .post_raw(tool_request("claude_first", true).to_string(), &[])
        .await;
    assert_eq!(r.status, 200);
    let calls = streamed_tool_calls(&r);
    assert_eq!(calls.len(), 1);
    assert!(calls[0].0.starts_with("call_mock"), "{calls:?}");
    assert_eq!(calls[0].1, "get_weather");
    let args: Value = serde_json::from_str(&calls[0].2).unwrap();
    assert_eq!(args, json!({"city": "Paris"}));
    assert_eq!(r.events().last().map(String::as_str), Some("[DONE]"));
}

#[tokio::test]
async fn anthropic_streams_translate_with_usage() {
    let h = start(MIXED).await;
    let mut body = common::chat_body("claude_first", true);
    body["stream_options"] = json!({"include_usage": true});
    let r = h.post_raw(body.to_string(), &[]).await;
    assert_eq!(r.header("x-cascade-provider"), Some("claude"));
    assert_eq!(
        r.streamed_text(),
        "Hello from claude-x! This is a mock answer."
    );
    let chunks: Vec<Value> = r.chunks();
    let ids: std::collections::HashSet<_> = chunks
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 1, "one id across chunks");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert!(usage["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    assert_eq!(
        chunks
            .iter()
            .filter(|c| !c["choices"][0]["finish_reason"].is_null()
                && c["choices"].as_array().is_some_and(|a| !a.is_empty()))
            .count(),
        1
    );
}

#[tokio::test]
async fn anthropic_mid_stream_error_ends_with_an_error_event() {
    let h = start(MIXED).await;
    h.mock.set("claude-x", "chunks=4,error_event_after=2");
    let r = h.chat_stream("claude_first", &[]).await;
    assert_eq!(r.header("x-cascade-provider"), Some("claude"));
    let last = r.events().last().cloned().unwrap();
    assert!(last.contains("overloaded_error"), "{last}");
    assert_ne!(r.events().last().map(String::as_str), Some("[DONE]"));
}

#[tokio::test]
async fn anthropic_error_before_the_first_token_falls_back() {
    let h = start(MIXED).await;
    h.mock.set("claude-x", "chunks=4,error_event_after=0");
    let r = h.chat_stream("claude_first", &[]).await;
    assert_eq!(r.header("x-cascade-provider"), Some("google"));
    assert_eq!(
        r.streamed_text(),
        "Hello from gemini-x! This is a mock answer."
    );
}

#[tokio::test]
async fn anthropic_context_overflow_and_refusal_fall_back() {
    let h = start(MIXED).await;
    h.mock
        .set("claude-x", "status=400,code=context_length_exceeded");
    let r = h.chat("claude_first", &[]).await;
    assert_eq!(r.header("x-cascade-provider"), Some("google"));
    assert!(r
        .header("x-cascade-trace")
        .unwrap()
        .starts_with("sonnet:400:"));
    h.mock
        .set("claude-x", "finish_reason=content_filter,content=");
    let r = h.chat("claude_first", &[]).await;
    assert_eq!(r.header("x-cascade-provider"), Some("google"));
    // A plain 400 from Anthropic is the caller's error: no fallback.
    h.mock.set("claude-x", "status=400");
    let r = h.chat("claude_first", &[]).await;
    assert_eq!(r.status, 400);
}

#[tokio::test]
async fn gemini_key_goes_in_a_header_and_the_request_is_translated() {
    let h = start(MIXED).await;
    let r = h
        .post_raw(tool_request("gemini_first", false).to_string(), &[])
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("x-cascade-provider"), Some("google"));
    let headers = h.mock.last_headers().unwrap();
    assert_eq!(headers["x-goog-api-key"], "goog-SECRET");
    let sent = &h.mock.bodies("gemini-x")[0];
    assert_eq!(
        sent["systemInstruction"],
        json!({"parts": [{"text": "Be terse."}]})
    );
    assert_eq!(
        sent["contents"],
        json!([{"role": "user", "parts": [{"text": "Weather in Paris?"}]}])
    );
    assert_eq!(
        sent["tools"][0]["functionDeclarations"][0]["name"],
        "get_weather"
    );
    assert_eq!(
        sent["toolConfig"],
        json!({"functionCallingConfig": {"mode": "AUTO"}})
    );
    assert!(sent.get("model").is_none(), "the model is in the URL");
}

#[tokio::test]
async fn gemini_tool_calls_and_streams() {
    let h = start(MIXED).await;
    h.mock.set("gemini-x", "tool=get_weather");
    let r = h
        .post_raw(tool_request("gemini_first", false).to_string(), &[])
        .await;
    let body = r.json();
    assert_eq!(body["choices"][0]["finish_reason"], "tool_calls");
    let call = &body["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_weather");
    assert!(call["id"].as_str().unwrap().starts_with("call_"));
    let r = h
        .post_raw(tool_request("gemini_first", true).to_string(), &[])
        .await;
    let calls = streamed_tool_calls(&r);
    assert_eq!(calls[0].1, "get_weather");
    assert_eq!(
        serde_json::from_str::<Value>(&calls[0].2).unwrap(),
        json!({"city": "Paris"})
    );

    h.mock.set("gemini-x", "chunks=3");
    let mut body = common::chat_body("gemini_first", true);
    body["stream_options"] = json!({"include_usage": true});
    let r = h.post_raw(body.to_string(), &[]).await;
    assert_eq!(
        r.streamed_text(),
        "Hello from gemini-x! This is a mock answer."
    );
    let events = r.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert!(usage["usage"]["total_tokens"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn gemini_safety_blocks_and_empty_candidates_fall_back() {
    let h = start(MIXED).await;
    for knobs in ["finish_reason=content_filter,content=", "blocked", "empty"] {
        h.mock.set("gemini-x", knobs);
        let r = h.chat("gemini_first", &[]).await;
        assert_eq!(r.header("x-cascade-provider"), Some("claude"), "{knobs}");
        let r = h.chat_stream("gemini_first", &[]).await;
        assert_eq!(
            r.header("x-cascade-provider"),
            Some("claude"),
            "stream, {knobs}"
        );
        assert_eq!(
            r.streamed_text(),
            "Hello from claude-x! This is a mock answer."
        );
    }
    h.mock.set("gemini-x", "status=429,retry_after=2");
    let r = h.chat("gemini_first", &[]).await;
    assert_eq!(r.header("x-cascade-provider"), Some("claude"));
}

#[tokio::test]
async fn azure_uses_its_deployment_url_and_api_key_header() {
    let h = start(MIXED).await;
    let r = h.chat("az_first", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("x-cascade-provider"), Some("azure"));
    let headers = h.mock.last_headers().unwrap();
    assert_eq!(headers["api-key"], "az-SECRET");
    assert!(headers.get("authorization").is_none());
    // A content-filtered prompt on Azure is a 400 `content_filter`: the next target answers.
    h.mock
        .set("my-deployment", "status=400,code=content_filter");
    let r = h.chat("az_first", &[]).await;
    assert_eq!(r.header("x-cascade-provider"), Some("openai"));
}

#[tokio::test]
async fn compatible_servers_get_their_quirks_applied() {
    let h = start(MIXED).await;
    let mut body = common::chat_body("llama", false);
    body["logprobs"] = json!(true);
    body["user"] = json!("u1");
    let r = h.post_raw(body.to_string(), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let sent = &h.mock.bodies("llama-x")[0];
    assert!(
        sent.get("logprobs").is_none() && sent.get("user").is_none(),
        "{sent}"
    );
    assert_eq!(sent["service_tier"], "flex");
    assert_eq!(sent["model"], "llama-x");
}

#[tokio::test]
async fn cost_is_reported_and_counted() {
    let h = start(MIXED).await;
    let r = h.chat("cross", &[]).await;
    let u = &r.json()["usage"];
    let (p, c) = (
        u["prompt_tokens"].as_f64().unwrap(),
        u["completion_tokens"].as_f64().unwrap(),
    );
    let expected = (p * 1.0 + c * 2.0) / 1000.0;
    let got: f64 = r.header("x-cascade-cost-usd").unwrap().parse().unwrap();
    assert!((got - expected).abs() < 1e-9, "{got} vs {expected}");
    let m = h.get("/metrics").await.text;
    assert!(
        m.contains(&format!(
            "cascade_tokens_total{{kind=\"prompt\",model=\"gpt\"}} {p}"
        )),
        "{m}"
    );
    assert!(m.contains("cascade_cost_usd_total{model=\"gpt\"}"));
    // Streams count their usage when they end.
    let mut body = common::chat_body("claude_first", true);
    body["stream_options"] = json!({"include_usage": true});
    h.post_raw(body.to_string(), &[]).await;
    let m = h.get("/metrics").await.text;
    assert!(
        m.contains("cascade_tokens_total{kind=\"completion\",model=\"sonnet\"}"),
        "{m}"
    );
}
